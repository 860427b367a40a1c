//! `ferrocotta-peers`: runs `ferrocotta bench`'s workloads against etcd and Redis, through the same
//! load generator ([`ferrocotta::loadgen`]), so the numbers of the three systems compare like for
//! like. `benches/peers/run.sh` starts the peers and ferrocotta and prints them side by side.
//!
//! - [`etcd`]: the etcd v3 target (gRPC: ranges, puts, Txn).
//! - [`redis`]: the Redis target (multiplexed connections: GET, SET, MSET, a Lua compare-and-swap).
//!
//! Exit codes follow `ferrocotta bench`: 0 clean run, 1 the run finished with failed operations,
//! 2 the run could not be made.

mod etcd;
mod redis;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use ferrocotta::loadgen::{self, LoadArgs, LoadOptions, LoadReport, OpError, Target, Workload};

/// The allocator `ferrocotta bench` uses, so the load generator costs the same against every system.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Pause between two probes of `ping`.
const PING_INTERVAL: Duration = Duration::from_millis(200);

/// Load etcd or Redis exactly as `ferrocotta bench` loads ferrocotta.
#[derive(Debug, Parser)]
#[command(name = "ferrocotta-peers", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one workload and report throughput and latency percentiles.
    Run(RunArgs),
    /// Wait until the peer answers a linearizable read (or the timeout passes).
    Ping(PingArgs),
}

/// The peer systems.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PeerKind {
    /// An etcd v3 cluster (`--endpoints host:port,...`, its client URLs).
    Etcd,
    /// One Redis server (`--endpoints host:port`).
    Redis,
}

/// How to reach a peer; shared by `run` and `ping`.
#[derive(Debug, Clone, Args)]
struct PeerArgs {
    /// Which system.
    #[arg(long)]
    target: PeerKind,
    /// Its endpoints as `host:port,host:port` (Redis: exactly one).
    #[arg(long)]
    endpoints: String,
    /// How long connecting may take.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    connect_timeout: Duration,
    /// Deadline of each operation (as `ferrocotta bench --timeout`).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

impl PeerArgs {
    fn endpoints(&self) -> anyhow::Result<Vec<String>> {
        let list: Vec<String> = self
            .endpoints
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
        if list.is_empty() {
            anyhow::bail!("--endpoints is empty");
        }
        Ok(list)
    }
}

/// Flags of `ferrocotta-peers run` (the same names and defaults as `ferrocotta bench`).
#[derive(Debug, Args)]
struct RunArgs {
    #[command(flatten)]
    peer: PeerArgs,
    /// What to run.
    #[arg(long, value_enum, default_value = "put")]
    workload: Workload,
    #[command(flatten)]
    load: LoadArgs,
    /// Name of the system in the report (default: the target, e.g. `redis-aof` for a second Redis).
    #[arg(long)]
    label: Option<String>,
}

/// Flags of `ferrocotta-peers ping`.
#[derive(Debug, Args)]
struct PingArgs {
    #[command(flatten)]
    peer: PeerArgs,
    /// How long to keep trying.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    wait: Duration,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The same runtime as `ferrocotta bench` (multi-threaded, one worker per core), so the client
    // side of every system is given the same machine.
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ferrocotta-peers: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(a) => run(a).await,
            Command::Ping(a) => ping(a).await,
        }
    });
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("ferrocotta-peers: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(args: RunArgs) -> anyhow::Result<u8> {
    let workload = args.workload;
    let options = args.load.options(workload).map_err(anyhow::Error::msg)?;
    let endpoints = args.peer.endpoints()?;
    let label = args.label.clone().unwrap_or_else(|| match args.peer.target {
        PeerKind::Etcd => "etcd".into(),
        PeerKind::Redis => "redis".into(),
    });
    let report = match args.peer.target {
        PeerKind::Etcd => {
            let target = etcd::EtcdTarget::connect(&endpoints, args.load.connections, &args.peer).await?;
            measure(target, &label, options).await?
        }
        PeerKind::Redis => {
            let target = redis::RedisTarget::connect(&endpoints, args.load.connections, &args.peer).await?;
            measure(target, &label, options).await?
        }
    };
    args.load.print(&report);
    Ok(if report.error_count() == 0 { 0 } else { 1 })
}

async fn measure<T: Target>(target: T, label: &str, options: LoadOptions) -> anyhow::Result<LoadReport> {
    loadgen::run(Arc::new(target), label, options)
        .await
        .map_err(|e| anyhow::anyhow!("bench failed: {}", e.kind))
}

/// Polls with a linearizable read of one key until the peer answers: a Redis that accepts
/// commands, an etcd cluster that has a leader.
async fn ping(args: PingArgs) -> anyhow::Result<u8> {
    let endpoints = args.peer.endpoints()?;
    let deadline = Instant::now() + args.wait;
    let mut last = String::new();
    while Instant::now() < deadline {
        let answer = match args.peer.target {
            PeerKind::Etcd => match etcd::EtcdTarget::connect(&endpoints, 1, &args.peer).await {
                Ok(t) => probe(&t).await,
                Err(e) => Err(format!("{e:#}")),
            },
            PeerKind::Redis => match redis::RedisTarget::connect(&endpoints, 1, &args.peer).await {
                Ok(t) => probe(&t).await,
                Err(e) => Err(format!("{e:#}")),
            },
        };
        match answer {
            Ok(()) => {
                println!("{:?} at {} answers", args.peer.target, args.peer.endpoints);
                return Ok(0);
            }
            Err(e) => last = e,
        }
        tokio::time::sleep(PING_INTERVAL).await;
    }
    Err(anyhow::anyhow!("{last}")).with_context(|| format!("no answer within {:?}", args.wait))
}

async fn probe<T: Target>(target: &T) -> Result<(), String> {
    target
        .get(b"ferrocotta-peers-ping", true)
        .await
        .map(drop)
        .map_err(|e: OpError| e.kind)
}

/// Bounds one operation by the `--timeout` deadline, as the array client bounds each request.
async fn deadline<T>(
    timeout: Duration,
    op: impl std::future::Future<Output = Result<T, OpError>>,
) -> Result<T, OpError> {
    tokio::time::timeout(timeout, op)
        .await
        .unwrap_or_else(|_| Err(OpError::new("timeout")))
}
