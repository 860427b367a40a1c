//! `ferrocotta jobs`: the cluster's scheduled jobs through any integration node's admin API
//! (`/admin/jobs`, docs/operations.md). The node checks every job; this command only carries it.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde_json::{json, Value};

/// Subcommands of `ferrocotta jobs`.
#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// Every job of the cluster: id, service, schedule, target, state.
    List(NodeAdminArgs),
    /// Creates a job (from flags, or a JSON file with --file).
    Add(Box<AddArgs>),
    /// One job with its lanes (one per node for `all` jobs) and next firing.
    Show(IdArgs),
    /// Stops a job firing until it is resumed.
    Suspend(IdArgs),
    /// Lets a suspended job fire again (firings meanwhile follow its missed-firing policy).
    Resume(IdArgs),
    /// Deletes a job and its run records.
    Delete(IdArgs),
    /// A job's runs: firing time, node, outcome, lateness.
    Runs(IdArgs),
}

/// How to reach a node's admin port.
#[derive(Debug, Clone, Args)]
pub struct NodeAdminArgs {
    /// Admin address (`host:port`) of any integration node of the cluster.
    #[arg(long, env = "FERROCOTTA_NODE_ADMIN")]
    pub node_admin: Option<String>,
    /// File holding the nodes' admin token.
    #[arg(long, env = "FERROCOTTA_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// The folder of a running `ferrocotta up`: the first node's admin address, the admin token
    /// and the CA come from it (each flag still wins).
    #[arg(long, env = "FERROCOTTA_DIR")]
    pub dir: Option<PathBuf>,
    /// The CA that signed the node's certificate: speak https.
    #[arg(long, env = "FERROCOTTA_TLS_CA_FILE")]
    pub tls_ca_file: Option<PathBuf>,
    /// Print the node's JSON answer as it is.
    #[arg(long)]
    pub json: bool,
    /// Deadline of the request.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// A job id and the node to ask.
#[derive(Debug, Args)]
pub struct IdArgs {
    /// The job's id.
    pub id: String,
    #[command(flatten)]
    pub admin: NodeAdminArgs,
}

/// `jobs add`.
#[derive(Debug, Args)]
pub struct AddArgs {
    /// The whole job as JSON (the body of `POST /admin/jobs`); the flags below are then not used.
    #[arg(long, conflicts_with_all = ["service", "every", "cron", "once"])]
    pub file: Option<PathBuf>,
    /// Its id [default: a random one].
    #[arg(long)]
    pub id: Option<String>,
    /// The service each firing invokes (`folder:service`).
    #[arg(long)]
    pub service: Option<String>,
    /// The service's input, a JSON object.
    #[arg(long)]
    pub input: Option<String>,
    /// Fire every interval (`1s`, `5m`).
    #[arg(long, group = "when")]
    pub every: Option<String>,
    /// Fire by a cron expression in UTC (5 fields, or 6-7 with seconds first).
    #[arg(long, group = "when")]
    pub cron: Option<String>,
    /// Fire once at this time (RFC 3339, e.g. 2026-12-04T10:00:00Z).
    #[arg(long, group = "when")]
    pub once: Option<String>,
    /// No firing before this time (RFC 3339).
    #[arg(long)]
    pub start: Option<String>,
    /// No firing after this time (RFC 3339).
    #[arg(long)]
    pub end: Option<String>,
    /// `any` (one node per firing), `all` (every node) or `node:NAME`.
    #[arg(long, default_value = "any")]
    pub target: String,
    /// Firings that could not run in time: `skip` or `run_once`.
    #[arg(long, default_value = "skip")]
    pub missed: String,
    /// A firing while the previous run still runs: `skip` or `allow`.
    #[arg(long, default_value = "skip")]
    pub overlap: String,
    /// Create it suspended.
    #[arg(long)]
    pub suspended: bool,
    #[command(flatten)]
    pub admin: NodeAdminArgs,
}

/// Where to send requests, with what token and TLS.
struct NodeAdmin {
    addr: String,
    token: String,
    tls: Option<std::sync::Arc<ferrocotta::tls::ClientTls>>,
    timeout: Duration,
}

impl NodeAdminArgs {
    fn resolve(&self) -> anyhow::Result<NodeAdmin> {
        let local = self.dir.as_deref().map(super::up::Endpoints::read).transpose()?;
        let addr = match (&self.node_admin, &local) {
            (Some(a), _) => a.clone(),
            (None, Some(e)) => e
                .processes
                .iter()
                .find(|p| p.role == "node")
                .map(|p| p.admin.clone())
                .context("the `ferrocotta up` of --dir runs no integration node")?,
            (None, None) => bail!(
                "which node? Give --node-admin host:port (or FERROCOTTA_NODE_ADMIN), or --dir with the folder of a running `ferrocotta up`"
            ),
        };
        let token = match (&self.admin_token_file, &local) {
            (Some(path), _) => String::from_utf8_lossy(
                std::fs::read(path)
                    .with_context(|| format!("--admin-token-file {}", path.display()))?
                    .trim_ascii(),
            )
            .into_owned(),
            (None, Some(e)) => e
                .admin_token
                .clone()
                .context("the endpoints of --dir hold no admin token")?,
            (None, None) => {
                bail!("the admin API needs the token: give --admin-token-file (or FERROCOTTA_ADMIN_TOKEN_FILE)")
            }
        };
        let ca = self.tls_ca_file.clone().or_else(|| local.and_then(|e| e.tls_ca_file));
        let tls = match ca {
            None => None,
            Some(ca_file) => Some(ferrocotta::tls::ClientTls::load(
                "ferrocotta jobs",
                ferrocotta::tls::TlsFiles {
                    cert_file: None,
                    key_file: None,
                    ca_file,
                },
            )?),
        };
        Ok(NodeAdmin {
            addr,
            token,
            tls,
            timeout: self.timeout,
        })
    }
}

impl NodeAdmin {
    /// One request; the answer's JSON, or the node's error as the error.
    async fn call(&self, method: hyper::Method, path: &str, body: Option<&Value>) -> anyhow::Result<Value> {
        let mut call = ferrocotta::http::Call::get(path, self.timeout);
        call.method = method;
        call.headers.push(("authorization", format!("Bearer {}", self.token)));
        if let Some(b) = body {
            call.headers.push(("content-type", "application/json".into()));
            call.body = serde_json::to_vec(b)?;
        }
        let (status, answer) = ferrocotta::http::request(&self.addr, self.tls.as_deref(), call).await?;
        let value: Value =
            serde_json::from_slice(&answer).unwrap_or_else(|_| json!({ "text": String::from_utf8_lossy(&answer) }));
        if !(200..300).contains(&status) {
            let message = value["error"]["message"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| value.to_string());
            bail!("{} answered {status}: {message}", self.addr);
        }
        Ok(value)
    }
}

fn target_json(text: &str) -> anyhow::Result<Value> {
    Ok(match text {
        "any" | "all" => json!(text),
        other => match other.strip_prefix("node:") {
            Some(name) if !name.is_empty() => json!({ "node": name }),
            _ => bail!("--target is `any`, `all` or `node:NAME`, not `{other}`"),
        },
    })
}

impl AddArgs {
    fn body(&self) -> anyhow::Result<Value> {
        if let Some(path) = &self.file {
            let text = std::fs::read_to_string(path).with_context(|| format!("--file {}", path.display()))?;
            return serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()));
        }
        let Some(service) = &self.service else {
            bail!("a job needs --service (or --file with the whole job)");
        };
        let schedule = match (&self.every, &self.cron, &self.once) {
            (Some(e), None, None) => json!({ "every": e }),
            (None, Some(c), None) => json!({ "cron": c }),
            (None, None, Some(o)) => json!({ "once": o }),
            _ => bail!("a job needs one of --every, --cron and --once"),
        };
        let mut body = json!({
            "service": service,
            "schedule": schedule,
            "target": target_json(&self.target)?,
            "missed": self.missed,
            "overlap": self.overlap,
            "suspended": self.suspended,
        });
        if let Some(id) = &self.id {
            body["id"] = json!(id);
        }
        if let Some(input) = &self.input {
            body["input"] = serde_json::from_str(input).context("--input is not JSON")?;
        }
        if let Some(s) = &self.start {
            body["start"] = json!(s);
        }
        if let Some(e) = &self.end {
            body["end"] = json!(e);
        }
        Ok(body)
    }
}

fn time(ms: &Value) -> String {
    ms.as_u64()
        .map(|ms| humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string())
        .unwrap_or_else(|| "-".into())
}

fn print_jobs(answer: &Value) {
    println!(
        "{:<24} {:<24} {:<28} {:<16} STATE",
        "ID", "SERVICE", "SCHEDULE", "TARGET"
    );
    for job in answer["jobs"].as_array().into_iter().flatten() {
        println!(
            "{:<24} {:<24} {:<28} {:<16} {}",
            job["id"].as_str().unwrap_or(""),
            job["service"].as_str().unwrap_or(""),
            job["schedule"].to_string(),
            job["target"].to_string().trim_matches('"'),
            job["state"].as_str().unwrap_or("")
        );
    }
}

fn print_runs(answer: &Value) {
    println!(
        "{:<26} {:<16} {:<18} {:>9} ERROR",
        "FIRING", "NODE", "OUTCOME", "LATE(ms)"
    );
    for run in answer["runs"].as_array().into_iter().flatten() {
        let late = run["claimed_ms"]
            .as_u64()
            .unwrap_or(0)
            .saturating_sub(run["firing_ms"].as_u64().unwrap_or(0));
        let mut outcome = run["outcome"].as_str().unwrap_or("").to_string();
        if let Some(n) = run["missed_before"].as_u64().filter(|n| *n > 0) {
            outcome.push_str(&format!(" (+{n} missed)"));
        }
        println!(
            "{:<26} {:<16} {:<18} {:>9} {}",
            time(&run["firing_ms"]),
            run["owner"]["node"].as_str().unwrap_or(""),
            outcome,
            late,
            run["error"].as_str().unwrap_or("")
        );
    }
}

fn print_state(v: &Value) {
    println!(
        "job {} is {}",
        v["job"]["id"].as_str().unwrap_or("?"),
        v["job"]["state"].as_str().unwrap_or("?")
    )
}

/// What a subcommand sends and how it prints the answer: where, method, path, body, printer.
type Request = (NodeAdminArgs, hyper::Method, String, Option<Value>, fn(&Value));

/// Runs a `jobs` subcommand; the exit code.
pub async fn run(command: JobsCommand) -> anyhow::Result<u8> {
    use hyper::Method;
    let one = |i: &IdArgs, tail: &str| format!("/admin/jobs/{}{tail}", i.id);
    let request: Request = match command {
        JobsCommand::List(a) => (a, Method::GET, "/admin/jobs".into(), None, print_jobs),
        JobsCommand::Add(add) => {
            let body = add.body()?;
            (add.admin, Method::POST, "/admin/jobs".into(), Some(body), |v| {
                println!("created job {}", v["job"]["id"].as_str().unwrap_or("?"))
            })
        }
        JobsCommand::Show(i) => (i.admin.clone(), Method::GET, one(&i, ""), None, |v| {
            println!("{}", serde_json::to_string_pretty(v).unwrap_or_default())
        }),
        JobsCommand::Suspend(i) => (i.admin.clone(), Method::POST, one(&i, "/suspend"), None, print_state),
        JobsCommand::Resume(i) => (i.admin.clone(), Method::POST, one(&i, "/resume"), None, print_state),
        JobsCommand::Delete(i) => (i.admin.clone(), Method::DELETE, one(&i, ""), None, |v| {
            println!("deleted job {}", v["deleted"].as_str().unwrap_or("?"))
        }),
        JobsCommand::Runs(i) => (i.admin.clone(), Method::GET, one(&i, "/runs"), None, print_runs),
    };
    let (args, method, path, body, printer) = request;
    let answer = args.resolve()?.call(method, &path, body.as_ref()).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
    } else {
        printer(&answer);
    }
    Ok(0)
}
