//! What the cluster console's memory costs one server: the heap a full ring of samples and
//! events holds, and the CPU of one sample (reading the counters and turning their difference
//! into a sample). Prints figures; asserts nothing about speed (docs/performance.md).
//!
//! `cargo bench -p cache-array --bench console_ring`

use std::time::Instant;

use cache_array::console::{sample_between, Recorder};
use cache_array::metrics::Metrics;
use ferrocotta::console::{EVENTS_KEPT, SAMPLES_KEPT};
use ferrocotta::protocol::OpKind;

/// Resident memory of this process in bytes.
fn rss() -> i64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: i64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// Recorders filled at once, so that the resident memory they add is well above the noise.
const RECORDERS: usize = 200;

fn main() {
    let metrics = Metrics::default();
    // A busy second: six kinds of requests, spread latencies.
    let kinds = [
        OpKind::Get,
        OpKind::Put,
        OpKind::KeepAlive,
        OpKind::Ping,
        OpKind::Remove,
        OpKind::Lock,
    ];
    let load = |m: &Metrics| {
        for (i, k) in kinds.iter().enumerate() {
            for n in 0..50u64 {
                m.record(*k, n % 97 != 0, 50 + n * 37 + i as u64 * 400);
            }
        }
    };

    let before = rss();
    let mut recorders = Vec::with_capacity(RECORDERS);
    let mut previous = metrics.totals();
    for r in 0..RECORDERS {
        let recorder = Recorder::new("a1");
        for t in 0..SAMPLES_KEPT as u64 {
            load(&metrics);
            let now = metrics.totals();
            recorder.push_sample(sample_between(&previous, &now, t * 1000, Some(3)));
            previous = now;
        }
        for i in 0..EVENTS_KEPT {
            recorder.event(
                "handshake_failed",
                format!(
                    "client port, from 127.0.0.1:{}: protocol: wrong secret ({r})",
                    40000 + i
                ),
            );
        }
        recorders.push(recorder);
    }
    let per_server = (rss() - before) as f64 / RECORDERS as f64;
    println!(
        "one server's full rings ({SAMPLES_KEPT} samples of 6 request kinds, {EVENTS_KEPT} events): {:.0} KiB resident (mean of {RECORDERS})",
        per_server / 1024.0
    );
    let recorder = recorders.pop().unwrap();
    drop(recorders);

    let rounds = 20_000;
    let started = Instant::now();
    for t in 0..rounds {
        let now = metrics.totals();
        recorder.push_sample(sample_between(&previous, &now, t, Some(3)));
        previous = now;
        metrics.record(OpKind::Get, true, 100 + t % 1000);
    }
    let per = started.elapsed() / rounds as u32;
    println!("one sample (read the counters, build it, push it, drop the oldest): {per:?}");
    drop(recorder);
}
