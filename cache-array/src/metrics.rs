//! Counters of the request path, rendered with the Raft facts as Prometheus text.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use ferrocotta::protocol::OpKind;

/// Kinds of requests counted: every kind.
const KINDS: usize = OpKind::ALL.len();

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
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            ops: std::array::from_fn(|_| AtomicU64::new(0)),
            op_errors: std::array::from_fn(|_| AtomicU64::new(0)),
            op_latency_us: std::array::from_fn(|_| AtomicU64::new(0)),
            client_connections: AtomicU64::new(0),
            rejected_connections: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    /// Counts one served request.
    pub fn record(&self, kind: OpKind, ok: bool, latency_us: u64) {
        let i = kind as usize;
        self.ops[i].fetch_add(1, Relaxed);
        self.op_latency_us[i].fetch_add(latency_us, Relaxed);
        if !ok {
            self.op_errors[i].fetch_add(1, Relaxed);
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
