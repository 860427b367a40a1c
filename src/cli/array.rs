//! `ferrocotta array`: operations on a running array as a whole.
//!
//! `restart --rolling` restarts the servers of a `ferrocotta up` one at a time: in each stripe the
//! mirrors first and the active last, each server only once the one before it is serving again
//! and has applied everything its stripe's active had when it came back. Before the active is
//! stopped it hands over to its most up-to-date mirror (`POST /v1/roster/hand-over`, proved with
//! the peer secret); if it cannot, its mirrors elect a new active when its port closes. A stopping
//! server answers requests that reach it while it drains `ShuttingDown` (not applied), finishes
//! the ones it had, then closes. Clients retry inside their timeout, so none of their requests
//! fails. `ferrocotta up` starts each stopped server again; servers run by systemd or Kubernetes
//! follow the same order by hand (docs/operations.md, "Rolling restart").
//!
//! `add-server`, `remove-server`, `replace-server` and `roster` change and show a stripe's
//! servers while it runs (docs/operations.md, "Changing the array's servers"): each request goes
//! to the stripe's active, proved with the peer secret.

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
    /// Add a server to a stripe of the running array: it joins as a learner, catches up, and
    /// becomes a voter (start it after this, from the same cluster.toml with its new name).
    AddServer(AddServerArgs),
    /// Remove a server from its stripe (the active hands over first).
    RemoveServer(RemoveServerArgs),
    /// Replace a server (a dead one, say) by a new one: add the new one, wait until it votes,
    /// then remove the old one.
    ReplaceServer(ReplaceServerArgs),
    /// Show each stripe's roster: generation, servers, who votes, who is joining.
    Roster(RosterArgs),
    /// Ask a stripe's active to hand over to its most up-to-date mirror (before stopping it).
    HandOver(HandOverArgs),
    /// Add a stripe: write the array's cluster.toml with it (`--out`); once its servers run from
    /// that file, register it with the array (`--config`). It owns no slot until `rebalance`.
    AddStripe(super::stripes::AddStripeArgs),
    /// Move hash slots between stripes until every stripe holds an even share, while reads and
    /// writes continue (a moving slot waits a moment).
    Rebalance(super::stripes::RebalanceArgs),
    /// Drain the last stripe's slots to the others, then take it out of the array.
    RemoveStripe(super::stripes::RemoveStripeArgs),
}

/// Flags of `ferrocotta array hand-over`.
#[derive(Debug, Args)]
pub struct HandOverArgs {
    /// The stripe (index from 0).
    #[arg(long, default_value_t = 0)]
    stripe: usize,
    #[command(flatten)]
    change: ChangeArgs,
}

/// How a membership change reaches the array and proves itself.
#[derive(Debug, Args, Clone)]
pub struct ChangeArgs {
    /// The array's peer secret (a membership change is proved with it; no client credential can
    /// make one). Default with --dir: DIR/peer-secret.
    #[arg(long, env = "FERROCOTTA_PEER_SECRET_FILE")]
    peer_secret_file: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub(super) array: ArrayArgs,
}

/// Flags of `ferrocotta array add-server`.
#[derive(Debug, Args)]
pub struct AddServerArgs {
    /// The stripe (index from 0) the server joins.
    #[arg(long)]
    stripe: usize,
    #[command(flatten)]
    server: NewServer,
    /// Wait until the new server votes (it must be started meanwhile), at most this long.
    #[arg(long, value_parser = humantime::parse_duration)]
    wait: Option<Duration>,
    #[command(flatten)]
    change: ChangeArgs,
}

/// The new server's settings.
#[derive(Debug, Args, Clone)]
pub struct NewServer {
    /// Its name (never one a removed server had).
    #[arg(long)]
    name: String,
    /// Its client port, `host:port` (the host is how peers and clients reach all its ports).
    #[arg(long)]
    client: String,
    /// Its group (Raft) port, `host:port`.
    #[arg(long)]
    group: String,
    /// Its admin port, `host:port`.
    #[arg(long)]
    admin: String,
    /// Its Redis-protocol port, if it has one.
    #[arg(long)]
    resp_port: Option<u16>,
    /// Where it keeps its data, relative to its cluster.toml (default `data/NAME`).
    #[arg(long)]
    data_dir: Option<std::path::PathBuf>,
    /// The address its ports listen on, when not the host.
    #[arg(long)]
    listen_host: Option<String>,
}

impl NewServer {
    fn config(&self) -> anyhow::Result<ferrocotta::config::ServerConfig> {
        let split = |what: &str, addr: &str| -> anyhow::Result<(String, u16)> {
            let (h, p) = addr
                .rsplit_once(':')
                .with_context(|| format!("--{what} {addr}: expected host:port"))?;
            Ok((
                h.to_string(),
                p.parse().with_context(|| format!("--{what} {addr}: bad port"))?,
            ))
        };
        let (host, port) = split("client", &self.client)?;
        let (ghost, group_port) = split("group", &self.group)?;
        let (ahost, admin_port) = split("admin", &self.admin)?;
        if ghost != host || ahost != host {
            bail!("--client, --group and --admin must name the same host (one server, one address)");
        }
        Ok(ferrocotta::config::ServerConfig {
            name: self.name.clone(),
            id: None,
            host,
            port,
            group_port,
            admin_port,
            data_dir: self
                .data_dir
                .clone()
                .unwrap_or_else(|| std::path::PathBuf::from(format!("data/{}", self.name))),
            listen_host: self.listen_host.clone(),
            resp_port: self.resp_port,
        })
    }
}

/// Flags of `ferrocotta array remove-server`.
#[derive(Debug, Args)]
pub struct RemoveServerArgs {
    /// The server to remove.
    name: String,
    #[command(flatten)]
    change: ChangeArgs,
}

/// Flags of `ferrocotta array replace-server`.
#[derive(Debug, Args)]
pub struct ReplaceServerArgs {
    /// The server to replace.
    old: String,
    #[command(flatten)]
    server: NewServer,
    /// How long the new server may take to start and catch up.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    wait: Duration,
    #[command(flatten)]
    change: ChangeArgs,
}

/// Flags of `ferrocotta array roster`.
#[derive(Debug, Args)]
pub struct RosterArgs {
    #[command(flatten)]
    array: ArrayArgs,
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
        ArrayCommand::AddServer(args) => {
            let admin = Admin::connect(&args.change).await?;
            let server = args.server.config()?;
            let name = server.name.clone();
            let outcome = admin.add(args.stripe, &server).await?;
            println!(
                "{name}: {} (node id {}, generation {})",
                outcome.message, outcome.id, outcome.generation
            );
            if let Some(wait) = args.wait {
                admin.wait_voting(args.stripe, &name, wait).await?;
                println!("{name}: a voter of stripe {}", args.stripe);
            } else {
                println!(
                    "start it with its name and the array's cluster.toml: cache-array --config cluster.toml --name {name}"
                );
            }
            Ok(0)
        }
        ArrayCommand::RemoveServer(args) => {
            let admin = Admin::connect(&args.change).await?;
            let stripe = admin.stripe_named(&args.name)?;
            let outcome = admin.remove(stripe, &args.name).await?;
            println!("{}: {} (generation {})", args.name, outcome.message, outcome.generation);
            Ok(0)
        }
        ArrayCommand::ReplaceServer(args) => {
            let admin = Admin::connect(&args.change).await?;
            let stripe = admin.stripe_named(&args.old)?;
            let server = args.server.config()?;
            let name = server.name.clone();
            let outcome = admin.add(stripe, &server).await?;
            println!(
                "{name}: {} (node id {}, generation {})",
                outcome.message, outcome.id, outcome.generation
            );
            println!("{name}: waiting until it votes (start it now: cache-array --config cluster.toml --name {name})");
            admin.wait_voting(stripe, &name, args.wait).await?;
            println!("{name}: a voter of stripe {stripe}");
            let outcome = admin.remove(stripe, &args.old).await?;
            println!("{}: {} (generation {})", args.old, outcome.message, outcome.generation);
            Ok(0)
        }
        ArrayCommand::HandOver(args) => {
            let admin = Admin::connect(&args.change).await?;
            let active = admin.active(args.stripe).await?;
            hand_over(Some(&admin), args.stripe, &active).await;
            Ok(0)
        }
        ArrayCommand::AddStripe(args) => super::stripes::add_stripe(args).await,
        ArrayCommand::Rebalance(args) => super::stripes::rebalance(args).await,
        ArrayCommand::RemoveStripe(args) => super::stripes::remove_stripe(args).await,
        ArrayCommand::Roster(args) => {
            let admin = Admin::connect(&ChangeArgs {
                peer_secret_file: None,
                array: args.array,
            })
            .await?;
            for stripe in 0..admin.config().stripes.len() {
                let view = admin.roster(stripe).await?;
                println!("{}", serde_json::to_string_pretty(&view)?);
            }
            Ok(0)
        }
    }
}

/// Attempts at following a `not_active` answer to the stripe's active.
const FOLLOW_ACTIVE_MAX: usize = 6;

/// The admin ports of the array, reached through the client's document.
pub(super) struct Admin {
    pub(super) client: ArrayClient,
    peer_secret: Vec<u8>,
    pub(super) tls: Option<std::sync::Arc<ferrocotta::tls::ClientTls>>,
    pub(super) timeout: Duration,
}

impl Admin {
    pub(super) async fn connect(args: &ChangeArgs) -> anyhow::Result<Admin> {
        let peer_secret_file = match (&args.peer_secret_file, &args.array.dir) {
            (Some(f), _) => f.clone(),
            (None, Some(dir)) => dir.join("peer-secret"),
            (None, None) => {
                bail!("a membership change is proved with the array's peer secret: pass --peer-secret-file")
            }
        };
        let peer_secret = match ferrocotta::security::read_secret_file(&peer_secret_file) {
            Ok(s) => s,
            // `roster` only reads.
            Err(_) if args.peer_secret_file.is_none() && args.array.dir.is_none() => Vec::new(),
            Err(e) => return Err(e).context("--peer-secret-file"),
        };
        let resolved = args.array.resolved()?;
        let tls = match &resolved.tls_ca_file {
            None => None,
            Some(ca) => Some(ferrocotta::tls::ClientTls::load(
                "admin client",
                ferrocotta::tls::TlsFiles {
                    cert_file: resolved.tls_cert_file.clone(),
                    key_file: resolved.tls_key_file.clone(),
                    ca_file: ca.clone(),
                },
            )?),
        };
        Ok(Admin {
            client: args.array.connect().await?,
            peer_secret,
            tls,
            timeout: args.array.timeout,
        })
    }

    /// The stripe's active, asking again (a server that just started may not know it yet, and an
    /// election may be under way) until the command's timeout.
    pub(super) async fn active(&self, stripe: usize) -> anyhow::Result<String> {
        let deadline = Instant::now() + self.timeout;
        loop {
            match self.client.active_of(stripe).await {
                Ok(a) => return Ok(a),
                Err(e) if Instant::now() >= deadline => {
                    return Err(e).with_context(|| format!("stripe {stripe} has no active"))
                }
                Err(_) => tokio::time::sleep(POLL * 2).await,
            }
        }
    }

    pub(super) fn config(&self) -> std::sync::Arc<ferrocotta::config::ClusterConfig> {
        self.client.config()
    }

    fn stripe_of(&self, name: &str) -> Option<(usize, ferrocotta::config::ServerConfig)> {
        self.config().find_server(name).map(|(p, s)| (p.stripe, s.clone()))
    }

    /// The stripe of a server the array's document names.
    fn stripe_named(&self, name: &str) -> anyhow::Result<usize> {
        self.stripe_of(name)
            .map(|(stripe, _)| stripe)
            .with_context(|| format!("no server named `{name}` in the array"))
    }

    fn admin_addr(&self, name: &str) -> anyhow::Result<String> {
        self.stripe_of(name)
            .map(|(_, s)| s.admin_addr())
            .with_context(|| format!("`{name}` is not in the array's document"))
    }

    /// Sends a change to the stripe's active, following `not_active` answers; its JSON answer.
    pub(super) async fn change(
        &self,
        stripe: usize,
        method: hyper::Method,
        path: &str,
        body: Vec<u8>,
    ) -> anyhow::Result<serde_json::Value> {
        let answer = self.send(stripe, method, path, body).await?;
        Ok(serde_json::from_slice(&answer).unwrap_or_default())
    }

    /// Sends a change to the stripe's active, following `not_active` answers; its answer's body.
    pub(super) async fn send(
        &self,
        stripe: usize,
        method: hyper::Method,
        path: &str,
        body: Vec<u8>,
    ) -> anyhow::Result<bytes::Bytes> {
        let mut target = self.active(stripe).await?;
        for _ in 0..FOLLOW_ACTIVE_MAX {
            let proof = ferrocotta::protocol::admin_proof_header(&self.peer_secret, method.as_str(), path, &body);
            let call = ferrocotta::http::Call {
                method: method.clone(),
                path,
                headers: vec![(ferrocotta::protocol::ADMIN_PROOF_HEADER, proof)],
                body: body.clone(),
                body_max: ferrocotta::http::ANSWER_BYTES_MAX,
                timeout: self.timeout.max(Duration::from_secs(10)),
            };
            let addr = self.admin_addr(&target)?;
            let (status, answer) = ferrocotta::http::request(&addr, self.tls.as_deref(), call).await?;
            let json: serde_json::Value = serde_json::from_slice(&answer).unwrap_or_default();
            match status {
                200 => return Ok(answer),
                409 => {
                    // Not (or no longer) the active: follow the one it names, or look again.
                    tokio::time::sleep(POLL * 3).await;
                    target = match json["error"]["active"].as_str() {
                        Some(a) if a != target => a.to_string(),
                        _ => self.active(stripe).await?,
                    };
                }
                _ => bail!(
                    "{target} refused the change ({status}): {}",
                    json["error"]["message"]
                        .as_str()
                        .unwrap_or(&String::from_utf8_lossy(&answer))
                ),
            }
        }
        bail!("the stripe's active kept changing; try again")
    }

    async fn add(&self, stripe: usize, server: &ferrocotta::config::ServerConfig) -> anyhow::Result<Outcome> {
        if stripe >= self.config().stripes.len() {
            bail!(
                "--stripe {stripe}: the array has {} stripe(s)",
                self.config().stripes.len()
            );
        }
        let body = serde_json::to_vec(server)?;
        Outcome::of(
            self.change(stripe, hyper::Method::POST, "/v1/roster/servers", body)
                .await?,
        )
    }

    async fn remove(&self, stripe: usize, name: &str) -> anyhow::Result<Outcome> {
        let path = format!("/v1/roster/servers/{name}");
        Outcome::of(self.change(stripe, hyper::Method::DELETE, &path, Vec::new()).await?)
    }

    pub(super) async fn roster(&self, stripe: usize) -> anyhow::Result<serde_json::Value> {
        let active = self.active(stripe).await?;
        let addr = self.admin_addr(&active)?;
        let (status, body) = ferrocotta::http::request(
            &addr,
            self.tls.as_deref(),
            ferrocotta::http::Call::get("/v1/roster", self.timeout),
        )
        .await?;
        if status != 200 {
            bail!("{active} answered {status} to /v1/roster");
        }
        Ok(serde_json::from_slice(&body)?)
    }

    async fn wait_voting(&self, stripe: usize, name: &str, wait: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + wait;
        loop {
            if let Ok(view) = self.roster(stripe).await {
                let joining = view["joining"].as_array().is_some_and(|j| j.iter().any(|n| n == name));
                let id = view["servers"]
                    .as_array()
                    .and_then(|s| s.iter().find(|s| s["name"] == name))
                    .and_then(|s| s["id"].as_u64());
                let voting = id.is_some_and(|id| {
                    view["voters"]
                        .as_array()
                        .is_some_and(|v| v.iter().any(|v| v.as_u64() == Some(id)))
                });
                if voting && !joining {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                bail!("{name} is not a voter after {wait:?}: is it started, and can it reach its stripe?");
            }
            tokio::time::sleep(POLL * 5).await;
        }
    }
}

/// What a change answered.
struct Outcome {
    id: u64,
    generation: u64,
    message: String,
}

impl Outcome {
    fn of(v: serde_json::Value) -> anyhow::Result<Outcome> {
        Ok(Outcome {
            id: v["id"].as_u64().unwrap_or_default(),
            generation: v["generation"].as_u64().context("an answer without a generation")?,
            message: v["message"].as_str().unwrap_or_default().to_string(),
        })
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
    // The active hands over before it is stopped (no failover to wait for); without the peer
    // secret it is stopped like the others and its mirrors take over when its port closes.
    let admin = Admin::connect(&ChangeArgs {
        peer_secret_file: None,
        array: args.array.clone(),
    })
    .await
    .ok()
    .filter(|a| !a.peer_secret.is_empty());
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
            if name == active {
                hand_over(admin.as_ref(), stripe, &name).await;
            }
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

/// Asks the active `name` of `stripe` to hand over to its most up-to-date mirror; says how it went
/// (a failed hand-over leaves the restart to the failover when the active stops).
async fn hand_over(admin: Option<&Admin>, stripe: usize, name: &str) {
    let Some(admin) = admin else {
        println!("{name}: no peer secret to ask for a hand-over; its mirrors take over when it stops");
        return;
    };
    let asked = Instant::now();
    match admin
        .change(stripe, hyper::Method::POST, "/v1/roster/hand-over", Vec::new())
        .await
    {
        Ok(answer) => println!(
            "{name}: {} in {:.2}s",
            answer["message"].as_str().unwrap_or("handed over"),
            asked.elapsed().as_secs_f64()
        ),
        Err(e) => println!("{name}: no hand-over ({e:#}); its mirrors take over when it stops"),
    }
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
