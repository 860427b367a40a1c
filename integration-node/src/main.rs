//! `integration-node --array-urls h1:9510,h2:9510 --cluster-name myCluster`.

use std::process::ExitCode;

use clap::Parser;
use integration_node::services::Registry;
use integration_node::settings::{Args, NodeSettings};

/// mimalloc instead of the system allocator, as in the array servers (docs/performance.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let settings = match NodeSettings::from_args(args).and_then(|s| integration_node::check(&s).map(|_| s)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("integration-node: {e:#}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("integration-node: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    runtime.block_on(async {
        let running = match integration_node::start(settings, Registry::with_builtins()).await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("integration-node: {e}");
                return ExitCode::from(e.exit_code());
            }
        };
        println!(
            "node {} serving on {} (admin {}), array {}",
            running.node.logical_name,
            running.node.service_addr,
            running.node.admin_addr,
            running.node.backend.array_state()
        );
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        running.shutdown.cancel();
        let _ = running.done.await;
        ExitCode::SUCCESS
    })
}
