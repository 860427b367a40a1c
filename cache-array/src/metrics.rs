//! Counters of the request path, rendered with the Raft facts as Prometheus text.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use ferrocotta::protocol::OpKind;

/// Kinds of requests counted: every kind.
pub const KINDS: usize = OpKind::ALL.len();

/// Counters of one server.
#[derive(Debug)]
pub struct Metrics {
    /// Requests served by kind.
    ops: [AtomicU64; KINDS],
    /// Requests answered with an error, by kind.
    op_errors: [AtomicU64; KINDS],
    /// Sum of request latencies by kind, in microseconds.
    op_latency_us: [AtomicU64; KINDS],
    /// Client connections open now.
    pub client_connections: AtomicU64,
    /// Connections closed for a malformed or oversized frame, or a failed handshake.
    pub rejected_connections: AtomicU64,
    /// Requests by latency bucket (all kinds): see [`bucket_of`].
    latency_buckets: [AtomicU64; LATENCY_BUCKETS],
}

/// Latency buckets: four per power of two of microseconds; the last holds everything from about
/// 235 s up.
pub const LATENCY_BUCKETS: usize = 4 * 27;

/// The bucket of a latency: exact below 4 µs, then four buckets per power of two (each at most
/// 25% wide, so a percentile read from buckets is within 25% of the true one).
pub fn bucket_of(us: u64) -> usize {
    if us < 4 {
        return us as usize;
    }
    let e = 63 - us.leading_zeros() as usize; // floor(log2 us), >= 2
    let sub = ((us >> (e - 2)) & 3) as usize;
    (4 * (e - 1) + sub).min(LATENCY_BUCKETS - 1)
}

/// The smallest latency in bucket `i`, microseconds (the inverse of [`bucket_of`]).
pub fn bucket_floor(i: usize) -> u64 {
    if i < 4 {
        return i as u64;
    }
    let e = i / 4 + 1;
    let sub = (i % 4) as u64;
    (4 + sub) << (e - 2)
}

/// Cumulative counters, read once per sample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Totals {
    /// Requests by kind.
    pub ops: [u64; KINDS],
    /// Errors, all kinds.
    pub errors: u64,
    /// Requests by latency bucket.
    pub latency: [u64; LATENCY_BUCKETS],
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            ops: std::array::from_fn(|_| AtomicU64::new(0)),
            op_errors: std::array::from_fn(|_| AtomicU64::new(0)),
            op_latency_us: std::array::from_fn(|_| AtomicU64::new(0)),
            client_connections: AtomicU64::new(0),
            rejected_connections: AtomicU64::new(0),
            latency_buckets: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl Metrics {
    /// Counts one served request.
    pub fn record(&self, kind: OpKind, ok: bool, latency_us: u64) {
        let i = kind as usize;
        self.ops[i].fetch_add(1, Relaxed);
        self.op_latency_us[i].fetch_add(latency_us, Relaxed);
        self.latency_buckets[bucket_of(latency_us)].fetch_add(1, Relaxed);
        if !ok {
            self.op_errors[i].fetch_add(1, Relaxed);
        }
    }

    /// The counters so far (the console's sampler takes differences).
    pub fn totals(&self) -> Totals {
        Totals {
            ops: std::array::from_fn(|i| self.ops[i].load(Relaxed)),
            errors: self.op_errors.iter().map(|e| e.load(Relaxed)).sum(),
            latency: std::array::from_fn(|i| self.latency_buckets[i].load(Relaxed)),
        }
    }

    /// Appends the request counters in Prometheus text format.
    pub fn render(&self, out: &mut String) {
        let _ = writeln!(out, "# TYPE ferrocotta_ops_total counter");
        for (i, k) in OpKind::ALL.iter().map(|k| k.name()).enumerate() {
            let _ = writeln!(out, "ferrocotta_ops_total{{op=\"{k}\"}} {}", self.ops[i].load(Relaxed));
        }
        let _ = writeln!(out, "# TYPE ferrocotta_op_errors_total counter");
        for (i, k) in OpKind::ALL.iter().map(|k| k.name()).enumerate() {
            let _ = writeln!(
                out,
                "ferrocotta_op_errors_total{{op=\"{k}\"}} {}",
                self.op_errors[i].load(Relaxed)
            );
        }
        let _ = writeln!(out, "# TYPE ferrocotta_op_latency_seconds_sum counter");
        for (i, k) in OpKind::ALL.iter().map(|k| k.name()).enumerate() {
            let _ = writeln!(
                out,
                "ferrocotta_op_latency_seconds_sum{{op=\"{k}\"}} {:.6}",
                self.op_latency_us[i].load(Relaxed) as f64 / 1e6
            );
        }
        let _ = writeln!(out, "# TYPE ferrocotta_client_connections gauge");
        let _ = writeln!(
            out,
            "ferrocotta_client_connections {}",
            self.client_connections.load(Relaxed)
        );
        let _ = writeln!(out, "# TYPE ferrocotta_rejected_connections_total counter");
        let _ = writeln!(
            out,
            "ferrocotta_rejected_connections_total {}",
            self.rejected_connections.load(Relaxed)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_buckets_are_ordered_and_tight() {
        let mut last = 0;
        for us in [
            0u64, 1, 3, 4, 5, 7, 8, 9, 15, 16, 100, 1000, 12_345, 1_000_000, 60_000_000,
        ] {
            let b = bucket_of(us);
            assert!(b >= last, "{us}");
            last = b;
            assert!(bucket_floor(b) <= us, "{us}: floor {}", bucket_floor(b));
            assert!(us < bucket_floor(b + 1), "{us}: next floor {}", bucket_floor(b + 1));
            assert!(bucket_floor(b + 1) as f64 <= (bucket_floor(b) as f64 * 1.25).max(bucket_floor(b) as f64 + 1.0));
        }
        assert_eq!(bucket_of(u64::MAX), LATENCY_BUCKETS - 1);
    }
}
