//! `ferrocotta array`: operations on a running array as a whole.
//!
//! `restart --rolling` restarts the servers of a `ferrocotta up` one at a time: in each stripe the
//! mirrors first and the active last, each server only once the one before it is serving again
//! and has applied everything its stripe's active had when it came back. A stopping server
//! answers requests that reach it while it drains `ShuttingDown` (not applied), finishes the ones
//! it had, then closes; when it is the active, its mirrors see its port refuse connections and
//! elect a new active at once. Clients retry inside their timeout, so none of their requests
//! fails. `ferrocotta up` starts each stopped server again; servers run by systemd or Kubernetes
//! follow the same order by hand (docs/operations.md, "Rolling restart").

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use ferrocotta::protocol::{Reply, Role};
use ferrocotta::ArrayClient;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::up::Endpoints;
use super::ArrayArgs;

/// How often the restart looks at the server it waits for.
const POLL: Duration = Duration::from_millis(100);

/// `ferrocotta array ...`
#[derive(Debug, Subcommand)]
pub enum ArrayCommand {
    /// Restart every server in turn (mirrors first, the active last, each after the previous one
    /// caught up), without failing a client request.
    Restart(RestartArgs),
}

/// Flags of `ferrocotta array restart`.
#[derive(Debug, Args)]
pub struct RestartArgs {
    /// One server at a time (the only kind offered: stopping them all at once is `down`).
    #[arg(long)]
    rolling: bool,
    /// Longest each server may take to be restarted and catch up.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    per_server_timeout: Duration,
    #[command(flatten)]
    array: ArrayArgs,
}

/// Runs `ferrocotta array ...`; the exit code.
pub async fn run(command: ArrayCommand) -> anyhow::Result<u8> {
    match command {
        ArrayCommand::Restart(args) => restart(args).await,
    }
}

async fn restart(args: RestartArgs) -> anyhow::Result<u8> {
    if !args.rolling {
        bail!("only a rolling restart is offered: pass --rolling (to stop everything, use `ferrocotta down`)");
    }
    let Some(dir) = args.array.dir.clone() else {
        bail!(
            "a rolling restart needs the folder of a running `ferrocotta up` (--dir), which starts again each server \
             it stops; for servers run by systemd or Kubernetes follow docs/operations.md, \"Rolling restart\""
        );
    };
    let client = args.array.connect().await?;
    let config = client.config();
    let started = Instant::now();
    for stripe in 0..config.stripes.len() {
        let active = client
            .active_of(stripe)
            .await
            .with_context(|| format!("stripe {stripe} has no active; a rolling restart needs a healthy array"))?;
        let mut order: Vec<String> = config.stripes[stripe]
            .servers
            .iter()
            .map(|s| s.name.clone())
            .filter(|n| *n != active)
            .collect();
        order.push(active.clone());
        for name in order {
            let took = restart_one(&client, &dir, stripe, &name, name == active, args.per_server_timeout).await?;
            println!("{name}: serving again and caught up after {:.1}s", took.as_secs_f64());
        }
    }
    println!(
        "rolling restart done: {} server(s) in {:.1}s",
        config.servers().count(),
        started.elapsed().as_secs_f64()
    );
    Ok(0)
}

/// Stops one server (SIGTERM), waits until `ferrocotta up` started it again and it applied what
/// its stripe's active had when it came back; how long that took.
async fn restart_one(
    client: &ArrayClient,
    dir: &Path,
    stripe: usize,
    name: &str,
    is_active: bool,
    timeout: Duration,
) -> anyhow::Result<Duration> {
    let pid = pid_of(dir, name)?;
    let what = if is_active {
        format!("the active of stripe {stripe}: its mirrors take over")
    } else {
        format!("a mirror of stripe {stripe}")
    };
    println!("{name}: stopping (pid {pid}), {what}");
    let stopped = Instant::now();
    kill(Pid::from_raw(pid as i32), Signal::SIGTERM).with_context(|| format!("cannot signal {name} (pid {pid})"))?;
    let deadline = stopped + timeout;
    while pid_of(dir, name).ok() == Some(pid) {
        if Instant::now() >= deadline {
            bail!("{name} was not started again within {timeout:?}: is `ferrocotta up` still running, without --no-restart?");
        }
        tokio::time::sleep(POLL).await;
    }
    let mut target: Option<u64> = None;
    loop {
        if Instant::now() >= deadline {
            bail!("{name} did not catch up within {timeout:?} of being stopped (applied up to {target:?} wanted)");
        }
        let probes = client.probe_all(Duration::from_secs(1)).await;
        let pong = |wanted: &dyn Fn(&str, &Role) -> bool| {
            probes.iter().find_map(|p| match &p.result {
                Ok(Reply::Pong {
                    server,
                    role,
                    last_log_index,
                    applied_index,
                    ..
                }) if p.stripe == stripe && wanted(server, role) => Some((*last_log_index, *applied_index)),
                _ => None,
            })
        };
        let restarted = pong(&|s, _| s == name);
        let active = pong(&|s, r| s != name && *r == Role::Active);
        match (restarted, active, target) {
            (Some(_), Some((active_last, _)), None) => target = Some(active_last),
            (Some((_, applied)), Some(_), Some(t)) if applied >= t => return Ok(stopped.elapsed()),
            _ => {}
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The pid `ferrocotta up` lists for a server.
fn pid_of(dir: &Path, name: &str) -> anyhow::Result<u32> {
    let endpoints = Endpoints::read(dir)?;
    endpoints
        .processes
        .iter()
        .find(|p| p.role == "array" && p.name == name)
        .map(|p| p.pid)
        .with_context(|| {
            format!(
                "{name} is not an array server of the `ferrocotta up` in {}",
                dir.display()
            )
        })
}
