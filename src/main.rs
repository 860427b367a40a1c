//! `ferrocotta`: the operator CLI.
//!
//! Exit codes (SPEC 9): 0 success, 1 "not found / condition false", 2 or more errors, with the
//! reason on stderr.

mod cli;

use std::process::ExitCode;

use clap::Parser;

/// mimalloc instead of the system allocator, as in the servers (docs/performance.md): the client
/// side of `ferrocotta bench` allocates per request too.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    // The client library's log is off unless asked for (FERROCOTTA_LOG=info, for example): every
    // error a command meets reaches its one `ferrocotta: ...` line, and printing the library's
    // record of it as well would say everything twice.
    let filter = tracing_subscriber::EnvFilter::try_from_env("FERROCOTTA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ferrocotta: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(cli::run(args)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("ferrocotta: {e:#}");
            ExitCode::from(2)
        }
    }
}
