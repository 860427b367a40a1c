//! `ferrocotta status`: every server of the array with its stripe, role, term and indexes, and
//! with `--dir` (a running `ferrocotta up`) its process id.
//!
//! Exit code: 0 when every stripe has an active, 1 when some stripe has none, 2 when the array
//! cannot be reached at all.

use std::time::Duration;

use clap::Args;
use ferrocotta::protocol::{Reply, Role};
use ferrocotta::ArrayClient;
use serde::Serialize;

use super::ArrayArgs;

/// Flags of `ferrocotta status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    array: ArrayArgs,
    /// Print JSON for scripts instead of a table.
    #[arg(long)]
    json: bool,
}

/// One server in `--json` output (field names are a stable interface, SPEC 9).
#[derive(Debug, Serialize)]
struct ServerStatus {
    name: String,
    stripe: usize,
    /// The stripe's name in the config.
    stripe_name: String,
    /// Its process id, when `--dir` names the `ferrocotta up` that runs it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pid: Option<u32>,
    /// `active`, `mirror` or `unreachable`.
    role: &'static str,
    term: Option<u64>,
    last_log_index: Option<u64>,
    applied_index: Option<u64>,
    leader: Option<String>,
    /// The configuration generation of its stripe this server goes by (every change of the
    /// stripe's servers adds one; a server behind its stripe's active has not applied one yet).
    generation: Option<u64>,
    address: String,
    /// Why the server did not answer, when it did not.
    error: Option<String>,
}

#[derive(Debug, Serialize)]
struct ArrayStatus {
    array_name: String,
    stripes: usize,
    /// The configuration generation: each stripe's highest, summed (one more per change).
    generation: u64,
    servers: Vec<ServerStatus>,
}

pub async fn run(args: StatusArgs) -> anyhow::Result<u8> {
    let client = ArrayClient::bootstrap(args.array.settings()?).await?;
    let config = client.config();
    let probes = client.probe_all(Duration::from_secs(2).min(args.array.timeout)).await;
    let local = args.array.local_endpoints()?;
    let pid_of = |name: &str| {
        local
            .as_ref()
            .and_then(|e| e.processes.iter().find(|p| p.role == "array" && p.name == name))
            .map(|p| p.pid)
    };
    let stripe_name = |s: usize| config.stripes.get(s).map(|s| s.name.clone()).unwrap_or_default();
    let servers: Vec<ServerStatus> = probes
        .into_iter()
        .map(|p| match p.result {
            Ok(Reply::Pong {
                role,
                leader,
                term,
                last_log_index,
                applied_index,
                ..
            }) => ServerStatus {
                pid: pid_of(&p.name),
                stripe_name: stripe_name(p.stripe),
                name: p.name,
                stripe: p.stripe,
                role: match role {
                    Role::Active => "active",
                    Role::Mirror => "mirror",
                },
                term: Some(term),
                last_log_index: Some(last_log_index),
                applied_index: Some(applied_index),
                leader,
                generation: p.generation,
                address: p.addr,
                error: None,
            },
            other => ServerStatus {
                pid: pid_of(&p.name),
                stripe_name: stripe_name(p.stripe),
                name: p.name,
                stripe: p.stripe,
                role: "unreachable",
                term: None,
                last_log_index: None,
                applied_index: None,
                leader: None,
                generation: None,
                address: p.addr,
                error: Some(match other {
                    Err(e) => e,
                    Ok(r) => format!("unexpected reply {r:?}"),
                }),
            },
        })
        .collect();
    let every_stripe_has_active =
        (0..config.stripes.len()).all(|s| servers.iter().any(|srv| srv.stripe == s && srv.role == "active"));
    let generation = (0..config.stripes.len())
        .map(|s| {
            servers
                .iter()
                .filter(|srv| srv.stripe == s)
                .filter_map(|srv| srv.generation)
                .max()
                .unwrap_or(config.stripes[s].generation)
        })
        .sum();
    let status = ArrayStatus {
        array_name: config.array_name.clone(),
        stripes: config.stripes.len(),
        generation,
        servers,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        println!(
            "array {} ({} stripe(s), configuration generation {})",
            status.array_name, status.stripes, status.generation
        );
        println!(
            "{:<12} {:<10} {:>8} {:<12} {:>6} {:>10} {:>10} {:>4} {:<12} ADDRESS",
            "SERVER", "STRIPE", "PID", "ROLE", "TERM", "LAST_LOG", "APPLIED", "GEN", "ACTIVE"
        );
        let dash = |v: Option<u64>| v.map(|n| n.to_string()).unwrap_or_else(|| "-".into());
        for s in &status.servers {
            println!(
                "{:<12} {:<10} {:>8} {:<12} {:>6} {:>10} {:>10} {:>4} {:<12} {}{}",
                s.name,
                s.stripe_name,
                dash(s.pid.map(u64::from)),
                s.role,
                dash(s.term),
                dash(s.last_log_index),
                dash(s.applied_index),
                dash(s.generation),
                s.leader.as_deref().unwrap_or("-"),
                s.address,
                s.error.as_deref().map(|e| format!("  ({e})")).unwrap_or_default()
            );
        }
    }
    Ok(if every_stripe_has_active { 0 } else { 1 })
}
