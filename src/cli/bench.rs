//! `ferrocotta bench`: a load generator against a running array.
//!
//! Keeps `--concurrency` requests in flight over the client's pipelined connections for a warm-up
//! and then a measured period, and reports throughput and latency percentiles (hdrhistogram) as a
//! table or JSON. Bounded: it stops after `--duration` (plus warm-up) by itself.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use ferrocotta::protocol::ReadConsistency;
use ferrocotta::ArrayClient;
use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::ArrayArgs;

/// Longest duration a run may ask for.
const DURATION_MAX: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone, Copy, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
enum Workload {
    /// Puts of random keys.
    Put,
    /// Linearizable gets of keys written during set-up.
    Get,
}

/// Flags of `ferrocotta bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    array: ArrayArgs,
    /// What to run.
    #[arg(long, value_enum, default_value = "put")]
    workload: Workload,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Measured period.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Unmeasured period before it.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Number of distinct keys.
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
    /// Value size in bytes.
    #[arg(long, default_value_t = 100)]
    value_size: usize,
    /// Read with eventual consistency (any server) instead of linearizable.
    #[arg(long)]
    eventual: bool,
    /// Seed of the key choice.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct BenchReport {
    workload: Workload,
    concurrency: usize,
    duration_s: f64,
    ops: u64,
    errors: u64,
    ops_per_s: f64,
    latency_us_p50: u64,
    latency_us_p99: u64,
    latency_us_p999: u64,
    latency_us_max: u64,
}

const CACHE: &str = "ferrocotta.bench";

fn key(i: u64) -> Vec<u8> {
    format!("bench-{i:010}").into_bytes()
}

pub async fn run(args: BenchArgs) -> anyhow::Result<u8> {
    if args.concurrency == 0 || args.keys == 0 {
        anyhow::bail!("--concurrency and --keys must be at least 1");
    }
    if args.duration > DURATION_MAX {
        anyhow::bail!("--duration is at most {DURATION_MAX:?}");
    }
    let client = args.array.connect().await?;
    let value = vec![b'x'; args.value_size];
    if matches!(args.workload, Workload::Get) {
        // Set-up: every key exists, written in batches.
        let mut i = 0;
        while i < args.keys {
            let end = (i + 500).min(args.keys);
            let batch: Vec<(Vec<u8>, Vec<u8>)> = (i..end).map(|k| (key(k), value.clone())).collect();
            client.put_all(CACHE, &batch).await?;
            i = end;
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let measure_from = Instant::now() + args.warmup;
    let read = if args.eventual {
        ReadConsistency::Eventual
    } else {
        ReadConsistency::Linearizable
    };
    let workers: Vec<_> = (0..args.concurrency)
        .map(|w| {
            let client = client.clone();
            let stop = stop.clone();
            let value = value.clone();
            let (workload, keys, seed) = (args.workload, args.keys, args.seed);
            tokio::spawn(async move {
                worker(
                    client,
                    workload,
                    read,
                    keys,
                    value,
                    seed ^ (w as u64),
                    measure_from,
                    stop,
                )
                .await
            })
        })
        .collect();
    tokio::time::sleep(args.warmup + args.duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut hist = Histogram::<u64>::new(3)?;
    let mut errors = 0;
    for w in workers {
        let (h, e) = w.await?;
        hist.add(h)?;
        errors += e;
    }
    let secs = args.duration.as_secs_f64();
    let report = BenchReport {
        workload: args.workload,
        concurrency: args.concurrency,
        duration_s: secs,
        ops: hist.len(),
        errors,
        ops_per_s: hist.len() as f64 / secs,
        latency_us_p50: hist.value_at_quantile(0.5),
        latency_us_p99: hist.value_at_quantile(0.99),
        latency_us_p999: hist.value_at_quantile(0.999),
        latency_us_max: hist.max(),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{:<8} {:>5} {:>10} {:>10} {:>8} {:>9} {:>9} {:>9} {:>9}",
            "WORKLOAD", "CONC", "OPS", "OPS/S", "ERRORS", "P50_US", "P99_US", "P999_US", "MAX_US"
        );
        println!(
            "{:<8} {:>5} {:>10} {:>10.0} {:>8} {:>9} {:>9} {:>9} {:>9}",
            format!("{:?}", report.workload).to_lowercase(),
            report.concurrency,
            report.ops,
            report.ops_per_s,
            report.errors,
            report.latency_us_p50,
            report.latency_us_p99,
            report.latency_us_p999,
            report.latency_us_max
        );
    }
    Ok(if errors == 0 { 0 } else { 1 })
}

#[allow(clippy::too_many_arguments)] // one worker's whole configuration, passed once at spawn
async fn worker(
    client: ArrayClient,
    workload: Workload,
    read: ReadConsistency,
    keys: u64,
    value: Vec<u8>,
    seed: u64,
    measure_from: Instant,
    stop: Arc<AtomicBool>,
) -> (Histogram<u64>, u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut hist = Histogram::<u64>::new(3).expect("histogram");
    let mut errors = 0;
    while !stop.load(Ordering::Relaxed) {
        let k = key(rng.gen_range(0..keys));
        let started = Instant::now();
        let ok = match workload {
            Workload::Put => client.put(CACHE, &k, &value).await.is_ok(),
            Workload::Get => client.get_with(CACHE, &k, read).await.is_ok(),
        };
        if started >= measure_from {
            if ok {
                let _ = hist.record(started.elapsed().as_micros() as u64);
            } else {
                errors += 1;
            }
        }
    }
    (hist, errors)
}
