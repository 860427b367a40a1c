//! The load generator behind `ferrocotta bench` and the peer comparison (`bench-peers`): the same
//! workloads, key choice, warm-up and measurement against any [`Target`], so ferrocotta, etcd and
//! Redis are measured by one piece of code.
//!
//! A run keeps `concurrency` operations in flight (one per worker task) for a warm-up and then a
//! measured period, records each operation's latency in an hdrhistogram, counts errors by kind and
//! stops by itself.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

/// Longest measured period a run may ask for.
pub const DURATION_MAX: Duration = Duration::from_secs(3600);

/// Keys written per call while preloading.
const PRELOAD_BATCH: u64 = 500;

/// Zipfian skew of YCSB's request distribution.
const ZIPF_THETA: f64 = 0.99;

/// What each operation does (the command-line names are kebab-case: `get-eventual`, `ycsb-a`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// Puts of uniformly chosen keys.
    Put,
    /// Linearizable gets of preloaded keys.
    Get,
    /// Eventually consistent gets of preloaded keys (any replica).
    GetEventual,
    /// Compare-and-swap of preloaded keys; each worker owns its keys, so every swap applies.
    Cas,
    /// YCSB workload A: 50% linearizable reads, 50% updates, zipfian keys (a session store).
    YcsbA,
    /// Read and update of one session per request (through an integration node for ferrocotta; a
    /// get and a put of the session record for stores without one); each worker owns its sessions.
    Session,
}

impl Workload {
    /// Value size unless the run says otherwise: YCSB's 1 KiB records for `ycsb-a`, else 100 bytes.
    pub fn default_value_size(self) -> usize {
        match self {
            Workload::YcsbA => 1024,
            _ => 100,
        }
    }

    /// Whether the keys must exist before the measurement (sessions start empty, puts create).
    fn needs_preload(self) -> bool {
        !matches!(self, Workload::Put | Workload::Session)
    }
}

/// A failed operation, by kind (for the error table).
#[derive(Debug, Clone)]
pub struct OpError {
    /// Short stable name: `timeout`, `unavailable`, `refused`, ...
    pub kind: String,
}

impl OpError {
    /// An error of a kind.
    pub fn new(kind: impl Into<String>) -> OpError {
        OpError { kind: kind.into() }
    }
}

/// A system under load. Each method is one request (or, for `session`, the requests one session
/// update takes).
pub trait Target: Send + Sync + 'static {
    /// Sets a key.
    fn put(&self, key: &[u8], value: &[u8]) -> impl Future<Output = Result<(), OpError>> + Send;
    /// Reads a key, linearizable or from any replica.
    fn get(&self, key: &[u8], linearizable: bool) -> impl Future<Output = Result<Option<Vec<u8>>, OpError>> + Send;
    /// Sets `key` to `new` if it holds `expected`; whether it did.
    fn cas(&self, key: &[u8], expected: &[u8], new: &[u8]) -> impl Future<Output = Result<bool, OpError>> + Send;
    /// Writes many keys (preloading; need not be atomic).
    fn put_many(&self, entries: &[crate::client::Entry]) -> impl Future<Output = Result<(), OpError>> + Send;
    /// Reads and updates one session. The default is what an application server does with a
    /// plain store: read the record, write it back changed.
    fn session(&self, session: &[u8], record: &[u8]) -> impl Future<Output = Result<(), OpError>> + Send {
        async move {
            let _ = self.get(session, true).await?;
            self.put(session, record).await
        }
    }
}

/// The shape of a run.
#[derive(Debug, Clone, Serialize)]
pub struct LoadOptions {
    /// What to run.
    pub workload: Workload,
    /// Operations in flight at once.
    pub concurrency: usize,
    /// Measured period.
    #[serde(serialize_with = "secs")]
    pub duration: Duration,
    /// Unmeasured period before it.
    #[serde(serialize_with = "secs")]
    pub warmup: Duration,
    /// Distinct keys (sessions for the session workload).
    pub keys: u64,
    /// Value size in bytes.
    pub value_size: usize,
    /// Seed of key choices.
    pub seed: u64,
}

/// The command-line flags every load tool shares (`ferrocotta bench`, `ferrocotta-peers run`), so
/// their names, defaults and checks cannot drift apart.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    /// Requests in flight at once.
    #[arg(long, default_value_t = 1)]
    pub concurrency: usize,
    /// Clients sharing the load (each pipelines its requests over its own connections).
    #[arg(long, default_value_t = 1)]
    pub connections: usize,
    /// Measured period.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Unmeasured period before it.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// Number of distinct keys (sessions for `session`).
    #[arg(long, default_value_t = 10_000)]
    pub keys: u64,
    /// Value size in bytes (default 100; 1024 for ycsb-a).
    #[arg(long)]
    pub value_size: Option<usize>,
    /// Seed of the key choice.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

impl LoadArgs {
    /// The checked options of a run of `workload`; the message names the bad flag.
    pub fn options(&self, workload: Workload) -> Result<LoadOptions, String> {
        if self.connections == 0 {
            return Err("--connections must be at least 1".into());
        }
        let options = LoadOptions {
            workload,
            concurrency: self.concurrency,
            duration: self.duration,
            warmup: self.warmup,
            keys: self.keys,
            value_size: self.value_size.unwrap_or(workload.default_value_size()),
            seed: self.seed,
        };
        options.validate()?;
        Ok(options)
    }

    /// Prints a report as JSON or as a table (header and row).
    pub fn print(&self, report: &LoadReport) {
        if self.json {
            println!(
                "{}",
                serde_json::to_string_pretty(report).expect("reports always encode")
            );
        } else {
            println!("{}", LoadReport::header());
            println!("{}", report.row());
        }
    }
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

impl LoadOptions {
    /// Checks the options; the message names the flag.
    pub fn validate(&self) -> Result<(), String> {
        if self.concurrency == 0 {
            return Err("--concurrency must be at least 1".into());
        }
        if self.keys == 0 {
            return Err("--keys must be at least 1".into());
        }
        if matches!(self.workload, Workload::Cas | Workload::Session) && self.keys < self.concurrency as u64 {
            return Err(format!(
                "the {} workload gives every in-flight slot its own keys: --keys must be at least --concurrency",
                workload_name(self.workload)
            ));
        }
        if self.duration.is_zero() || self.duration > DURATION_MAX {
            return Err(format!("--duration must be between 1 ms and {DURATION_MAX:?}"));
        }
        Ok(())
    }
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    /// The system measured (e.g. `ferrocotta`, `etcd`, `redis`).
    pub target: String,
    /// The options.
    #[serde(flatten)]
    pub options: LoadOptions,
    /// Successful operations in the measured period.
    pub ops: u64,
    /// Operations per second.
    pub ops_per_s: f64,
    /// Latency percentiles in microseconds.
    pub latency_us_p50: u64,
    /// 99th percentile.
    pub latency_us_p99: u64,
    /// 99.9th percentile.
    pub latency_us_p999: u64,
    /// Slowest.
    pub latency_us_max: u64,
    /// Failed operations by kind.
    pub errors: BTreeMap<String, u64>,
}

impl LoadReport {
    /// Failed operations in all.
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Header of [`LoadReport::row`].
    pub fn header() -> String {
        format!(
            "{:<11} {:<13} {:>5} {:>6} {:>10} {:>10} {:>8} {:>8} {:>8} {:>8}  ERRORS",
            "TARGET", "WORKLOAD", "CONC", "VALUE", "OPS", "OPS/S", "P50_US", "P99_US", "P999_US", "MAX_US"
        )
    }

    /// One table row.
    pub fn row(&self) -> String {
        let errors = if self.errors.is_empty() {
            "-".to_string()
        } else {
            self.errors
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        format!(
            "{:<11} {:<13} {:>5} {:>6} {:>10} {:>10.0} {:>8} {:>8} {:>8} {:>8}  {errors}",
            self.target,
            workload_name(self.options.workload),
            self.options.concurrency,
            self.options.value_size,
            self.ops,
            self.ops_per_s,
            self.latency_us_p50,
            self.latency_us_p99,
            self.latency_us_p999,
            self.latency_us_max
        )
    }
}

/// The command-line name of a workload.
pub fn workload_name(w: Workload) -> &'static str {
    match w {
        Workload::Put => "put",
        Workload::Get => "get",
        Workload::GetEventual => "get-eventual",
        Workload::Cas => "cas",
        Workload::YcsbA => "ycsb-a",
        Workload::Session => "session",
    }
}

/// Key `i` of the key space.
pub fn key(i: u64) -> Vec<u8> {
    format!("bench-{i:010}").into_bytes()
}

/// A value of `size` bytes that differs per `n` (so a cas has something to compare).
fn value(size: usize, n: u64) -> Vec<u8> {
    let mut v = format!("{n:016x}").into_bytes();
    v.resize(size.max(16), b'x');
    v.truncate(size.max(1));
    v
}

/// Writes every key of the key space once (for workloads that read or swap existing keys).
pub async fn preload<T: Target>(target: &T, options: &LoadOptions) -> Result<(), OpError> {
    let mut i = 0;
    while i < options.keys {
        let end = (i + PRELOAD_BATCH).min(options.keys);
        let batch: Vec<(Vec<u8>, Vec<u8>)> = (i..end).map(|k| (key(k), value(options.value_size, 0))).collect();
        target.put_many(&batch).await?;
        i = end;
    }
    Ok(())
}

/// Runs a workload against a target (after preloading when it needs existing keys).
pub async fn run<T: Target>(target: Arc<T>, name: &str, options: LoadOptions) -> Result<LoadReport, OpError> {
    options.validate().map_err(OpError::new)?;
    if options.workload.needs_preload() {
        preload(target.as_ref(), &options).await?;
    }
    let zipf = Arc::new(Zipf::new(options.keys, ZIPF_THETA));
    let stop = Arc::new(AtomicBool::new(false));
    let measure_from = Instant::now() + options.warmup;
    let workers: Vec<_> = (0..options.concurrency)
        .map(|w| {
            let (target, stop, zipf, options) = (target.clone(), stop.clone(), zipf.clone(), options.clone());
            tokio::spawn(async move { worker(target, w, options, zipf, measure_from, stop).await })
        })
        .collect();
    tokio::time::sleep(options.warmup + options.duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut hist = Histogram::<u64>::new(3).expect("histogram");
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for w in workers {
        let (h, e) = w.await.map_err(|e| OpError::new(format!("worker panicked: {e}")))?;
        hist.add(h).expect("histograms of one shape");
        for (k, n) in e {
            *errors.entry(k).or_default() += n;
        }
    }
    let secs = options.duration.as_secs_f64();
    Ok(LoadReport {
        target: name.to_string(),
        ops: hist.len(),
        ops_per_s: hist.len() as f64 / secs,
        latency_us_p50: hist.value_at_quantile(0.5),
        latency_us_p99: hist.value_at_quantile(0.99),
        latency_us_p999: hist.value_at_quantile(0.999),
        latency_us_max: hist.max(),
        errors,
        options,
    })
}

async fn worker<T: Target>(
    target: Arc<T>,
    id: usize,
    options: LoadOptions,
    zipf: Arc<Zipf>,
    measure_from: Instant,
    stop: Arc<AtomicBool>,
) -> (Histogram<u64>, BTreeMap<String, u64>) {
    let mut rng = StdRng::seed_from_u64(options.seed ^ (id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut hist = Histogram::<u64>::new(3).expect("histogram");
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let fixed = value(options.value_size, id as u64);
    // The cas and session workloads: this worker's keys (id, id + concurrency, ...) and, for cas,
    // what each holds now.
    let own: Vec<u64> = (id as u64..options.keys).step_by(options.concurrency).collect();
    let mut held: Vec<u64> = vec![0; own.len()];
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let started = Instant::now();
        let result = match options.workload {
            Workload::Put => target.put(&key(rng.gen_range(0..options.keys)), &fixed).await,
            Workload::Get => target.get(&key(rng.gen_range(0..options.keys)), true).await.map(drop),
            Workload::GetEventual => target.get(&key(rng.gen_range(0..options.keys)), false).await.map(drop),
            Workload::YcsbA => {
                let k = key(zipf.sample(&mut rng));
                if rng.gen_bool(0.5) {
                    target.get(&k, true).await.map(drop)
                } else {
                    target.put(&k, &fixed).await
                }
            }
            Workload::Cas => {
                let slot = rng.gen_range(0..own.len());
                let next = (id as u64) << 40 | n;
                let expected = value(options.value_size, held[slot]);
                match target
                    .cas(&key(own[slot]), &expected, &value(options.value_size, next))
                    .await
                {
                    Ok(true) => {
                        held[slot] = next;
                        Ok(())
                    }
                    Ok(false) => Err(OpError::new("cas_refused")),
                    Err(e) => Err(e),
                }
            }
            Workload::Session => {
                // Like a browser per user: a session never has two requests at once.
                let session = format!("s{}", own[rng.gen_range(0..own.len())]);
                target.session(session.as_bytes(), &fixed).await
            }
        };
        if started >= measure_from {
            match result {
                Ok(()) => {
                    let _ = hist.record(started.elapsed().as_micros() as u64);
                }
                Err(e) => *errors.entry(e.kind).or_default() += 1,
            }
        }
    }
    (hist, errors)
}

/// YCSB's zipfian key chooser (Gray et al., "Quickly generating billion-record synthetic
/// databases"), with the popular items scattered over the key space by a hash as YCSB's
/// "scrambled zipfian" does, so the hot keys do not all land in one stripe.
pub struct Zipf {
    items: u64,
    theta: f64,
    alpha: f64,
    zetan: f64,
    eta: f64,
}

impl Zipf {
    /// A chooser over `items` keys with skew `theta` (0 < theta < 1).
    pub fn new(items: u64, theta: f64) -> Zipf {
        let zeta = |n: u64| (1..=n).map(|i| 1.0 / (i as f64).powf(theta)).sum::<f64>();
        let zetan = zeta(items);
        let zeta2 = zeta(2.min(items));
        let alpha = 1.0 / (1.0 - theta);
        let eta = (1.0 - (2.0 / items as f64).powf(1.0 - theta)) / (1.0 - zeta2 / zetan);
        Zipf {
            items,
            theta,
            alpha,
            zetan,
            eta,
        }
    }

    /// A key index in `0..items`.
    pub fn sample(&self, rng: &mut impl Rng) -> u64 {
        let u: f64 = rng.gen();
        let uz = u * self.zetan;
        let rank = if uz < 1.0 {
            0
        } else if uz < 1.0 + 0.5f64.powf(self.theta) {
            1
        } else {
            ((self.items as f64) * (self.eta * u - self.eta + 1.0).powf(self.alpha)) as u64
        };
        scramble(rank.min(self.items - 1)) % self.items
    }
}

/// FNV-1a of the rank: spreads ranks over the key space deterministically.
fn scramble(rank: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in rank.to_le_bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_is_skewed_and_in_range() {
        let z = Zipf::new(1000, ZIPF_THETA);
        let mut rng = StdRng::seed_from_u64(7);
        let mut counts = vec![0u32; 1000];
        for _ in 0..100_000 {
            counts[z.sample(&mut rng) as usize] += 1;
        }
        counts.sort_unstable_by(|a, b| b.cmp(a));
        // The hottest key of a 0.99 zipfian over 1000 keys draws about 13% of requests; the
        // coldest half together draws only a few percent.
        assert!(counts[0] > 8_000, "hottest key drew {}", counts[0]);
        let cold: u32 = counts[500..].iter().sum();
        assert!(cold < 10_000, "the colder half drew {cold}");
    }

    #[test]
    fn values_have_the_asked_size_and_differ() {
        assert_eq!(value(100, 1).len(), 100);
        assert_eq!(value(1024, 1).len(), 1024);
        assert_eq!(value(4, 1).len(), 4);
        assert_ne!(value(100, 1), value(100, 2));
    }

    #[test]
    fn options_are_checked() {
        let mut o = LoadOptions {
            workload: Workload::Cas,
            concurrency: 8,
            duration: Duration::from_secs(1),
            warmup: Duration::ZERO,
            keys: 4,
            value_size: 100,
            seed: 1,
        };
        assert!(o.validate().unwrap_err().contains("--keys"));
        o.keys = 100;
        assert!(o.validate().is_ok());
        o.concurrency = 0;
        assert!(o.validate().unwrap_err().contains("--concurrency"));
    }
}
