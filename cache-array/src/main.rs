//! `cache-array --config cluster.toml --name a1`: runs one array server.
//! `cache-array repair --config cluster.toml --name a1 [--wipe | --allow-vote]`: checks its data
//! folder, or sets a damaged one aside (docs/security.md).

use std::path::PathBuf;

use cache_array::data_folder::{repair, RepairAction};
use cache_array::server::{run, ServerOptions};
use clap::{Args as ClapArgs, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

/// mimalloc instead of the system allocator: see docs/performance.md (allocation was about 16% of
/// an array server's CPU under write load with glibc malloc).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// One server of a ferrocotta cache array.
#[derive(Debug, Parser)]
#[command(
    version,
    about,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    server: Server,
    /// Log format: `text` or `json`.
    #[arg(long, default_value = "text", global = true)]
    log_format: String,
}

#[derive(Debug, ClapArgs)]
struct Server {
    /// The cluster configuration file (identical on every server).
    #[arg(long, env = "FERROCOTTA_CONFIG", required = true)]
    config: Option<PathBuf>,
    /// The name of this server in the configuration.
    #[arg(long, env = "FERROCOTTA_NAME", required = true)]
    name: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check a stopped server's data folder (exit 0 healthy, 1 damaged); with --wipe set it aside
    /// so the server rejoins its stripe empty and is caught up by its peers.
    Repair(RepairArgs),
}

#[derive(Debug, ClapArgs)]
struct RepairArgs {
    /// The cluster configuration file.
    #[arg(long, env = "FERROCOTTA_CONFIG")]
    config: PathBuf,
    /// The server whose data folder to look at.
    #[arg(long, env = "FERROCOTTA_NAME")]
    name: String,
    /// Rename the data folder (kept as `<folder>.damaged-<time>`) and start an empty one that
    /// joins its stripe: it neither votes nor campaigns until the active has caught it up.
    #[arg(long, conflicts_with = "allow_vote")]
    wipe: bool,
    /// Let a joining server vote before it is caught up: only when most of its stripe lost its
    /// data and the servers that kept theirs must be elected (what only the lost folders held is
    /// gone).
    #[arg(long)]
    allow_vote: bool,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    init_tracing(&args.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cache-array: cannot start the runtime: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    if let Some(Command::Repair(r)) = args.command {
        let action = if r.wipe {
            RepairAction::Wipe
        } else if r.allow_vote {
            RepairAction::AllowVote
        } else {
            RepairAction::Check
        };
        return match runtime.block_on(repair(&r.config, &r.name, action)) {
            Ok(code) => std::process::ExitCode::from(code),
            Err(e) => {
                eprintln!("cache-array repair: {e:#}");
                std::process::ExitCode::from(2)
            }
        };
    }
    match ferrocotta::admission::raise_open_files_limit() {
        Ok(n) => tracing::debug!(event = "server.open_files_limit", limit = n),
        Err(e) => tracing::warn!(event = "server.open_files_limit", error = %e),
    }
    let (Some(config), Some(name)) = (args.server.config, args.server.name) else {
        eprintln!("cache-array: --config and --name are required");
        return std::process::ExitCode::from(2);
    };
    let result = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let signals = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!(event = "server.signal", "stop requested");
            signals.cancel();
        });
        run(
            ServerOptions {
                config_path: config,
                name,
            },
            shutdown,
        )
        .await
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(event = "server.failed", error = format!("{e:#}"));
            eprintln!("cache-array: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn init_tracing(format: &str) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn,sled=warn"));
    let quiet = tracing_subscriber::filter::filter_fn(|m| !is_openraft_rpc_noise(m));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let layer = if format == "json" {
        layer.json().with_filter(quiet).boxed()
    } else {
        layer.with_filter(quiet).boxed()
    };
    tracing_subscriber::registry().with(filter).with(layer).init();
}

/// openraft's lines for each failed Raft call while a peer is down (an ERROR `RPCError` and
/// three WARNs about every 200-300 ms: the failed replication, its backoff, the failed
/// heartbeat), and its ERROR for each vote request that found no peer: the group port logs
/// `peer.unreachable` and `peer.reachable` once per change instead (cache-array/src/network.rs).
/// openraft's storage errors (ERROR with an `error` field in replication) still show.
fn is_openraft_rpc_noise(m: &tracing::Metadata<'_>) -> bool {
    let has = |f: &str| m.fields().field(f).is_some();
    let (error, warn) = (*m.level() == tracing::Level::ERROR, *m.level() == tracing::Level::WARN);
    match m.target() {
        "openraft::replication" => (error && has("err")) || warn,
        "openraft::engine::handler::replication_handler" => warn,
        "openraft::core::raft_core" => error && has("error") && has("target"),
        _ => false,
    }
}
