//! `cache-array --config cluster.toml --name a1`: runs one array server.

use std::path::PathBuf;

use cache_array::server::{run, ServerOptions};
use clap::Parser;
use tokio_util::sync::CancellationToken;

/// mimalloc instead of the system allocator: see docs/performance.md (allocation was about 16% of
/// an array server's CPU under write load with glibc malloc).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// One server of a ferrocotta cache array.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// The cluster configuration file (identical on every server).
    #[arg(long, env = "FERROCOTTA_CONFIG")]
    config: PathBuf,
    /// The name of this server in the configuration.
    #[arg(long, env = "FERROCOTTA_NAME")]
    name: String,
    /// Log format: `text` or `json`.
    #[arg(long, default_value = "text")]
    log_format: String,
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
                config_path: args.config,
                name: args.name,
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
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn,sled=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}
