//! `ferrocotta up`: a whole local cluster in one command.
//!
//! Writes `DIR/cluster.toml`, the secrets (`secret` for clients, `peer-secret` for the servers,
//! `credentials.toml` with the nodes' credential and `node-credential` holding its secret) and,
//! with `--tls`, a local CA and a certificate per process in `DIR/tls/` (all kept and reused on the
//! next run, so the data survives; the nodes' ports are kept in `DIR/nodes.toml`). The folder is
//! 0700 and every secret 0600. Refuses at once when a port it needs is taken. Starts one
//! `cache-array` process per server and one `integration-node` per node (each with its state
//! folder `DIR/data/NAME`), logs in `DIR/logs/`; a process that exits while they start ends `up`
//! at once with its log's last lines. Once everything serves it writes `DIR/endpoints.json`
//! (SPEC 9, 0600: it holds the admin token) and prints the same facts; from then on a process
//! that dies is started again ([`processes`]). Ctrl-C (or SIGTERM, or `ferrocotta down`) stops
//! every process it started: SIGTERM first, SIGKILL after a grace period.

mod background;
mod processes;

use std::ffi::OsString;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use ferrocotta::config::{
    local_array, ClusterConfig, ConfigDuration, Security, ServerConfig, ServerPorts, TlsSettings,
};
use ferrocotta::protocol::{Reply, Role};
use ferrocotta::security::{new_secret_hex, write_private_file, AccessMode, AccessRule, Credential, CredentialsFile};
use ferrocotta::tls::{names_for, ClientTls, LocalCa, TlsFiles};
use ferrocotta::{ArrayClient, ClientSettings};
use serde::{Deserialize, Serialize};

pub use background::{down, DownArgs};
use processes::{Event, Kind, Proc};

/// Flags of `ferrocotta up`. The shape flags (stripes, servers, ports, names) only shape a new
/// folder: they are `Option`s so that a re-run can say which of them an existing folder ignores.
#[derive(Debug, Args)]
pub struct UpArgs {
    /// Folder for the config, secret, data and logs (reused when it already holds a config).
    #[arg(long, env = "FERROCOTTA_DIR", default_value = "ferrocotta-local")]
    dir: PathBuf,
    /// Number of stripes [default: 1].
    #[arg(long)]
    stripes: Option<usize>,
    /// Servers per stripe [default: 3].
    #[arg(long)]
    servers_per_stripe: Option<usize>,
    /// Address every process listens on [default: 127.0.0.1].
    #[arg(long)]
    host: Option<String>,
    /// First client port; server i uses client port BASE+i, group port BASE+20+i, admin port
    /// BASE+30+i, Redis-protocol port BASE+40+i (so the first server gets the defaults 9510, 9530,
    /// 9540, and 9550). 0 picks free ports [default: 9510].
    #[arg(long)]
    base_port: Option<u16>,
    /// Name of the array [default: local].
    #[arg(long)]
    array_name: Option<String>,
    /// Delete the folder's config and data first.
    #[arg(long)]
    fresh: bool,
    /// How long the array may take to elect an active in every stripe.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    ready_timeout: Duration,
    /// The `cache-array` binary (default: next to this `ferrocotta` binary).
    #[arg(long, env = "FERROCOTTA_CACHE_ARRAY_BIN")]
    cache_array_bin: Option<PathBuf>,
    /// Number of integration nodes to start (0 for the array alone).
    #[arg(long, default_value_t = 2)]
    nodes: usize,
    /// Cluster name of the integration nodes.
    #[arg(long, default_value = "local")]
    cluster_name: String,
    /// First service port of new nodes; node i uses service port BASE+i and admin port 9999+i
    /// (the defaults 5555 and 9999 for the first). With `--base-port 0` new nodes get free ports.
    /// A node's ports are kept in DIR/nodes.toml and reused on the next run.
    #[arg(long, default_value_t = 5555)]
    node_base_port: u16,
    /// The `integration-node` binary (default: next to this `ferrocotta` binary).
    #[arg(long, env = "FERROCOTTA_INTEGRATION_NODE_BIN")]
    integration_node_bin: Option<PathBuf>,
    /// TLS on every port: a local CA and a certificate per process are made in `DIR/tls/`
    /// (clients trust `DIR/tls/ca.crt`). Only for a new folder (or with `--fresh`).
    #[arg(long)]
    tls: bool,
    /// Leave a process that dies down (by default `up` starts it again after a second, and gives
    /// up on one that dies three times within a minute).
    #[arg(long)]
    no_restart: bool,
    /// Start in the background: return once everything serves, printing the same table; stop it
    /// with `ferrocotta down`. Its own output goes to DIR/logs/up.log.
    #[arg(long)]
    detach: bool,
}

/// Files `up` keeps in its folder (and `--fresh` removes).
const FOLDER_ENTRIES: [&str; 11] = [
    "cluster.toml",
    "nodes.toml",
    "secret",
    "peer-secret",
    "credentials.toml",
    "node-credential",
    "admin-token",
    "tls",
    "data",
    "logs",
    "endpoints.json",
];

/// The credential the integration nodes use (read-write on every cache: they serve
/// `pub.cache` for any cache name), so that they never hold the cluster secret.
const NODE_CREDENTIAL: &str = "node";

/// Defaults of the shape flags (for a new folder).
const DEFAULT_STRIPES: usize = 1;
const DEFAULT_SERVERS_PER_STRIPE: usize = 3;
const DEFAULT_HOST: &str = "127.0.0.1";
const DEFAULT_BASE_PORT: u16 = 9510;
const DEFAULT_ARRAY_NAME: &str = "local";
/// Admin port of the first node when ports are laid out from a base.
const NODE_ADMIN_BASE_PORT: u16 = 9999;

/// One process in `endpoints.json` (field names are a stable interface, SPEC 9).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcessEntry {
    /// `array` or `node`.
    pub role: String,
    pub name: String,
    pub pid: u32,
    /// Stripe of an array server.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stripe: Option<usize>,
    /// Client port of an array server.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// Group port of an array server.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Service port of a node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Redis-protocol port of an array server (docs/redis.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resp: Option<String>,
    /// Admin port (both roles).
    pub admin: String,
}

/// `DIR/endpoints.json`, written once everything serves and rewritten when a process is
/// restarted (its pid changes); removed when `up` stops.
#[derive(Debug, Serialize, Deserialize)]
pub struct Endpoints {
    pub array_name: String,
    pub config: PathBuf,
    pub secret_file: PathBuf,
    /// The CA clients trust, when the ports speak TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca_file: Option<PathBuf>,
    pub array_urls: String,
    /// Token of the nodes' admin ports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_token: Option<String>,
    /// Process id of `ferrocotta up` itself (what `ferrocotta down` stops).
    #[serde(default)]
    pub up_pid: u32,
    pub processes: Vec<ProcessEntry>,
}

impl Endpoints {
    /// Reads `DIR/endpoints.json` of a running `up`.
    pub fn read(dir: &Path) -> anyhow::Result<Endpoints> {
        let path = dir.join("endpoints.json");
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "cannot read {}: is `ferrocotta up --dir {}` running?",
                path.display(),
                dir.display()
            )
        })?;
        serde_json::from_str(&text).with_context(|| format!("{} is not an endpoints file", path.display()))
    }

    fn write(&self, dir: &Path) -> anyhow::Result<PathBuf> {
        let path = dir.join("endpoints.json");
        // It holds the admin token.
        write_private_file(&path, (serde_json::to_string_pretty(self)? + "\n").as_bytes())
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(path)
    }
}

/// A node's addresses, kept in `DIR/nodes.toml` so a re-run gives it the same ports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct NodeLayout {
    name: String,
    service: String,
    admin: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodesFile {
    #[serde(default)]
    node: Vec<NodeLayout>,
}

/// Finds a binary of the workspace next to the running `ferrocotta`.
pub fn sibling_binary(name: &str, explicit: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p);
    }
    let exe = std::env::current_exe().context("cannot find the ferrocotta binary's path")?;
    let dir = exe.parent().context("the ferrocotta binary has no folder")?;
    let path = dir.join(name);
    if !path.exists() {
        // Not `--workspace`: that also builds the peer benchmarks, which need protoc.
        bail!(
            "cannot find `{name}` next to {}; build all three binaries first: `cargo build --release` \
             (from the repository's root), or name it with --{name}-bin",
            exe.display()
        );
    }
    Ok(path)
}

fn pick_ports(host: &str, base: u16, count: usize) -> anyhow::Result<Vec<ServerPorts>> {
    if base != 0 {
        if count > 10 {
            bail!("--base-port lays out at most 10 servers; use --base-port 0 for free ports");
        }
        // The last port laid out is BASE+40+count-1; it must not wrap round past 65535.
        if base.checked_add(40 + count as u16).is_none() {
            bail!(
                "--base-port {base}: the ports of {count} server(s) would go past 65535 (the RESP ports are BASE+40..); pick a lower base"
            );
        }
        return Ok((0..count as u16)
            .map(|i| ServerPorts {
                port: base + i,
                group_port: base + 20 + i,
                admin_port: base + 30 + i,
                resp_port: Some(base + 40 + i),
            })
            .collect());
    }
    // Hold every listener until all are chosen so no port is handed out twice.
    let listeners = (0..count * 4)
        .map(|_| TcpListener::bind((host, 0)))
        .collect::<Result<Vec<_>, _>>()
        .context("cannot find free ports")?;
    let ports: Vec<u16> = listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<Result<_, _>>()?;
    Ok(ports
        .chunks(4)
        .map(|c| ServerPorts {
            port: c[0],
            group_port: c[1],
            admin_port: c[2],
            resp_port: Some(c[3]),
        })
        .collect())
}

/// Writes a secret file (0600) unless it exists; an existing one is made 0600 too.
fn ensure_secret(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if path.exists() {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("cannot restrict {}", path.display()))?;
        return Ok(());
    }
    write_private_file(path, (new_secret_hex() + "\n").as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

fn prepare(args: &UpArgs) -> anyhow::Result<(PathBuf, ClusterConfig)> {
    use std::os::unix::fs::PermissionsExt;
    if args.fresh && args.dir.exists() {
        for sub in FOLDER_ENTRIES {
            let p = args.dir.join(sub);
            if p.is_dir() {
                std::fs::remove_dir_all(&p).with_context(|| format!("--fresh: cannot remove {}", p.display()))?;
            } else if p.exists() {
                std::fs::remove_file(&p).with_context(|| format!("--fresh: cannot remove {}", p.display()))?;
            }
        }
    }
    std::fs::create_dir_all(args.dir.join("logs")).with_context(|| format!("cannot create {}", args.dir.display()))?;
    // Secrets, keys and the admin token live here: only the owner may look in.
    std::fs::set_permissions(&args.dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot restrict {}", args.dir.display()))?;
    let config_path = args.dir.join("cluster.toml");
    ensure_secret(&args.dir.join("secret"))?;
    ensure_secret(&args.dir.join("peer-secret"))?;
    ensure_node_credential(&args.dir)?;
    if config_path.exists() {
        let config = ClusterConfig::load(&config_path)?;
        if args.tls && config.security.tls.is_none() {
            bail!(
                "{} was made without TLS; start over with `--tls --fresh` (or run without --tls)",
                config_path.display()
            );
        }
        let servers: Vec<&ServerConfig> = config.servers().map(|(_, s)| s).collect();
        eprintln!(
            "reusing {}: array `{}`, {} stripe(s) of {} server(s), client ports {}; pass --fresh to start over",
            config_path.display(),
            config.array_name,
            config.stripes.len(),
            config.stripes[0].servers.len(),
            servers.iter().map(|s| s.client_addr()).collect::<Vec<_>>().join(",")
        );
        let ignored: Vec<&str> = [
            ("--stripes", args.stripes.is_some_and(|n| n != config.stripes.len())),
            (
                "--servers-per-stripe",
                args.servers_per_stripe
                    .is_some_and(|n| config.stripes.iter().any(|s| s.servers.len() != n)),
            ),
            (
                "--host",
                args.host.as_ref().is_some_and(|h| servers.iter().any(|s| &s.host != h)),
            ),
            (
                "--base-port",
                args.base_port.is_some_and(|b| b != 0 && servers[0].port != b),
            ),
            (
                "--array-name",
                args.array_name.as_ref().is_some_and(|n| n != &config.array_name),
            ),
        ]
        .into_iter()
        .filter_map(|(flag, differs)| differs.then_some(flag))
        .collect();
        if !ignored.is_empty() {
            eprintln!(
                "note: {} differ(s) from the existing folder and has no effect; add --fresh to make a new array with them (its data is deleted)",
                ignored.join(", ")
            );
        }
        return Ok((config_path, config));
    }
    let stripes = args.stripes.unwrap_or(DEFAULT_STRIPES);
    let per_stripe = args.servers_per_stripe.unwrap_or(DEFAULT_SERVERS_PER_STRIPE);
    if stripes == 0 || per_stripe == 0 {
        bail!("--stripes and --servers-per-stripe must be at least 1");
    }
    let host = args.host.as_deref().unwrap_or(DEFAULT_HOST);
    let ports = pick_ports(host, args.base_port.unwrap_or(DEFAULT_BASE_PORT), stripes * per_stripe)?;
    let security = Security {
        credentials_file: Some(PathBuf::from("credentials.toml")),
        tls: args.tls.then(|| TlsSettings {
            cert_file: PathBuf::from("tls/{name}.crt"),
            key_file: PathBuf::from("tls/{name}.key"),
            ca_file: PathBuf::from("tls/ca.crt"),
            require_client_cert: false,
            reload_interval: ConfigDuration(Duration::from_secs(60)),
        }),
        ..Security::secret_files("secret", "peer-secret")
    };
    let config = local_array(
        args.array_name.as_deref().unwrap_or(DEFAULT_ARRAY_NAME),
        host,
        stripes,
        per_stripe,
        security,
        |i| ports[i],
    );
    config.validate()?;
    std::fs::write(&config_path, config.to_toml()).context("cannot write cluster.toml")?;
    Ok((config_path, config))
}

/// Writes `credentials.toml` with the nodes' credential and `node-credential` with its secret,
/// unless they exist.
fn ensure_node_credential(dir: &Path) -> anyhow::Result<()> {
    let file = dir.join("credentials.toml");
    let secret_file = dir.join("node-credential");
    if file.exists() && secret_file.exists() {
        return Ok(());
    }
    let secret = new_secret_hex();
    let credentials = CredentialsFile {
        credential: vec![Credential {
            name: NODE_CREDENTIAL.into(),
            secret: secret.clone(),
            access: vec![AccessRule {
                prefix: String::new(),
                mode: AccessMode::ReadWrite,
            }],
        }],
    };
    let text = format!(
        "# Client credentials of the array (ferrocotta up): the integration nodes use `{NODE_CREDENTIAL}`.\n{}",
        toml::to_string_pretty(&credentials)?
    );
    write_private_file(&file, text.as_bytes()).with_context(|| format!("cannot write {}", file.display()))?;
    write_private_file(&secret_file, (secret + "\n").as_bytes())
        .with_context(|| format!("cannot write {}", secret_file.display()))
}

/// The nodes' addresses: those kept in `DIR/nodes.toml` first, new ones laid out from the flags;
/// the file is rewritten when nodes were added.
fn node_layout(args: &UpArgs, dir: &Path) -> anyhow::Result<Vec<NodeLayout>> {
    let path = dir.join("nodes.toml");
    let saved: NodesFile = match std::fs::read_to_string(&path) {
        Ok(text) => toml::from_str(&text).with_context(|| format!("{} is not a nodes file", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => NodesFile::default(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let mut nodes: Vec<NodeLayout> = saved.node.iter().take(args.nodes).cloned().collect();
    if nodes.len() == args.nodes {
        return Ok(nodes);
    }
    let host = args.host.as_deref().unwrap_or(DEFAULT_HOST);
    let new = args.nodes - nodes.len();
    let free = if args.base_port == Some(0) {
        pick_ports(host, 0, new)?
    } else {
        Vec::new()
    };
    for i in nodes.len()..args.nodes {
        let (service, admin) = match free.get(i - (args.nodes - new)) {
            Some(p) => (p.port, p.admin_port),
            None => {
                let i = u16::try_from(i).context("too many nodes")?;
                (
                    args.node_base_port
                        .checked_add(i)
                        .context("--node-base-port: past 65535")?,
                    NODE_ADMIN_BASE_PORT
                        .checked_add(i)
                        .context("node admin ports past 65535")?,
                )
            }
        };
        nodes.push(NodeLayout {
            name: format!("node{}", i + 1),
            service: format!("{host}:{service}"),
            admin: format!("{host}:{admin}"),
        });
    }
    // Keep every node ever laid out (a later run with more nodes finds them again).
    let mut all = nodes.clone();
    all.extend(saved.node.into_iter().skip(args.nodes));
    let text = format!(
        "# Integration nodes of `ferrocotta up`: their ports, kept so that a re-run reuses them.\n{}",
        toml::to_string_pretty(&NodesFile { node: all })?
    );
    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(nodes)
}

/// Makes the local CA and a certificate for every process that lacks one, in `DIR/tls/`.
fn ensure_certificates(dir: &Path, config: &ClusterConfig, nodes: &[NodeLayout]) -> anyhow::Result<PathBuf> {
    let tls_dir = dir.join("tls");
    let ca = LocalCa::in_dir(&tls_dir)?;
    let servers = config.servers().map(|(_, s)| (s.name.clone(), s.host.clone()));
    let nodes = nodes.iter().map(|n| {
        let host = n.service.rsplit_once(':').map(|(h, _)| h).unwrap_or(&n.service);
        (n.name.clone(), host.to_string())
    });
    for (name, host) in servers.chain(nodes) {
        if !tls_dir.join(format!("{name}.crt")).exists() {
            ca.issue_files(&tls_dir, &name, &names_for(&name, &host))?;
        }
    }
    Ok(LocalCa::cert_path(&tls_dir))
}

/// Refuses to start when a port `up` is about to hand out is taken: by a foreign program or by
/// another array (whose servers would answer ours with "authentication failed").
fn check_ports_free(config: &ClusterConfig, nodes: &[NodeLayout]) -> anyhow::Result<()> {
    let mut wanted: Vec<(String, String)> = Vec::new();
    for (_, s) in config.servers() {
        wanted.push((s.client_addr(), format!("client port of array server {}", s.name)));
        wanted.push((s.group_addr(), format!("group port of array server {}", s.name)));
        wanted.push((s.admin_addr(), format!("admin port of array server {}", s.name)));
        if let Some(resp) = s.resp_addr() {
            wanted.push((resp, format!("Redis-protocol port of array server {}", s.name)));
        }
    }
    for n in nodes {
        wanted.push((
            n.service.clone(),
            format!("service port of integration node {}", n.name),
        ));
        wanted.push((n.admin.clone(), format!("admin port of integration node {}", n.name)));
    }
    for (addr, what) in wanted {
        if let Err(e) = TcpListener::bind(&addr) {
            bail!(
                "{addr} ({what}) cannot be used: {e}. Another program (or another array) holds it: stop it, \
                 or use other ports (a new folder with --base-port, 0 for free ones)"
            );
        }
    }
    Ok(())
}

/// The `cache-array` process of each server.
fn array_procs(bin: &Path, config_path: &Path, config: &ClusterConfig, dir: &Path) -> Vec<Proc> {
    config
        .servers()
        .map(|(_, s)| {
            let args = vec![
                "--config".into(),
                config_path.into(),
                "--name".into(),
                s.name.clone().into(),
            ];
            Proc::new(Kind::Array, &s.name, bin, args, dir)
        })
        .collect()
}

/// The `integration-node` process of each node; each has its state folder `DIR/data/NAME`, so a
/// node restarted after a crash takes over the member entry its dead process left.
fn node_procs(
    args: &UpArgs,
    bin: &Path,
    dir: &Path,
    nodes: &[NodeLayout],
    array_urls: &str,
    ca_file: Option<&Path>,
) -> Vec<Proc> {
    nodes
        .iter()
        .map(|n| {
            let mut a: Vec<OsString> = [
                "--array-urls",
                array_urls,
                "--cluster-name",
                &args.cluster_name,
                "--listen",
                &n.service,
                "--admin-listen",
                &n.admin,
                "--logical-name",
                &n.name,
                "--credential",
                NODE_CREDENTIAL,
            ]
            .iter()
            .map(OsString::from)
            .collect();
            a.push("--secret-file".into());
            a.push(dir.join("node-credential").into());
            a.push("--admin-token-file".into());
            a.push(dir.join("admin-token").into());
            a.push("--state-dir".into());
            a.push(dir.join("data").join(&n.name).into());
            if let Some(ca) = ca_file {
                let tls_dir = dir.join("tls");
                a.push("--array-tls-ca-file".into());
                a.push(ca.into());
                a.push("--tls-cert-file".into());
                a.push(tls_dir.join(format!("{}.crt", n.name)).into());
                a.push("--tls-key-file".into());
                a.push(tls_dir.join(format!("{}.key", n.name)).into());
            }
            Proc::new(Kind::Node, &n.name, bin, a, dir)
        })
        .collect()
}

async fn wait_ready(
    config: &ClusterConfig,
    secret: Vec<u8>,
    tls: Option<std::sync::Arc<ClientTls>>,
    timeout: Duration,
) -> anyhow::Result<()> {
    let urls: Vec<String> = config.servers().map(|(_, s)| s.client_addr()).collect();
    let mut settings = ClientSettings::new(&urls.join(","))?;
    settings.secret = secret;
    settings.tls = tls;
    settings.connect_timeout = timeout;
    settings.array_name = Some(config.array_name.clone());
    let deadline = tokio::time::Instant::now() + timeout;
    let client = ArrayClient::bootstrap(settings).await?;
    loop {
        let probes = client.probe_all(Duration::from_secs(1)).await;
        let ready = (0..config.stripes.len()).all(|s| {
            probes
                .iter()
                .any(|p| p.stripe == s && matches!(p.result, Ok(Reply::Pong { role: Role::Active, .. })))
        }) && probes.iter().all(|p| p.result.is_ok());
        if ready {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("the array did not elect an active in every stripe within {timeout:?}; see the logs");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until every node's admin port answers.
async fn wait_nodes_ready(nodes: &[NodeLayout], timeout: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    for n in nodes {
        while tokio::net::TcpStream::connect(&n.admin).await.is_err() {
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "integration node {} did not start within {timeout:?}; see its log",
                    n.name
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// Runs `ready` until it finishes, unless one of `procs` exits first: then that exit (with its
/// log's tail) is the error, at once rather than after the ready timeout.
async fn ready_or_exit(
    procs: &mut [Proc],
    ready: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    tokio::select! {
        r = ready => r,
        exit = processes::first_exit(procs) => bail!("{exit}"),
    }
}

/// Stops what was started and passes the error on.
async fn give_up<T>(procs: &mut [Proc], error: anyhow::Error) -> anyhow::Result<T> {
    processes::stop_all(procs).await;
    Err(error)
}

pub async fn run(args: UpArgs) -> anyhow::Result<u8> {
    if args.detach {
        return background::detach(&args.dir).await;
    }
    let bin = sibling_binary("cache-array", args.cache_array_bin.clone())?;
    let node_bin = match args.nodes {
        0 => None,
        _ => Some(sibling_binary("integration-node", args.integration_node_bin.clone())?),
    };
    // Claimed before anything in the folder is touched (--fresh would delete a running array).
    std::fs::create_dir_all(&args.dir).with_context(|| format!("cannot create {}", args.dir.display()))?;
    let _pid_file = background::PidFile::claim(&args.dir)?;
    let (config_path, config) = prepare(&args)?;
    let config_path = std::fs::canonicalize(&config_path)?;
    let dir = config_path.parent().expect("config has a folder").to_path_buf();
    let nodes = node_layout(&args, &dir)?;
    check_ports_free(&config, &nodes)?;
    let secret_path = dir.join("secret");
    let secret = ferrocotta::security::read_secret_file(&secret_path)?;
    let ca_file = match &config.security.tls {
        Some(_) => Some(ensure_certificates(&dir, &config, &nodes)?),
        None => None,
    };
    let client_tls = match &ca_file {
        Some(ca) => Some(ClientTls::load(
            "ferrocotta up",
            TlsFiles {
                cert_file: None,
                key_file: None,
                ca_file: ca.clone(),
            },
        )?),
        None => None,
    };

    let mut procs = array_procs(&bin, &config_path, &config, &dir);
    for i in 0..procs.len() {
        if let Err(e) = procs[i].spawn() {
            return give_up(&mut procs, e).await;
        }
    }
    eprintln!(
        "starting {} array server(s); logs in {}",
        procs.len(),
        dir.join("logs").display()
    );
    let ready = wait_ready(&config, secret, client_tls, args.ready_timeout);
    if let Err(e) = ready_or_exit(&mut procs, ready).await {
        return give_up(&mut procs, e).await;
    }
    let array_urls = config
        .servers()
        .map(|(_, s)| s.client_addr())
        .collect::<Vec<_>>()
        .join(",");
    let admin_token = match &node_bin {
        None => None,
        Some(node_bin) => {
            let token_path = dir.join("admin-token");
            ensure_secret(&token_path)?;
            let token = std::fs::read_to_string(&token_path)?.trim().to_string();
            let first_node = procs.len();
            procs.extend(node_procs(
                &args,
                node_bin,
                &dir,
                &nodes,
                &array_urls,
                ca_file.as_deref(),
            ));
            for i in first_node..procs.len() {
                if let Err(e) = procs[i].spawn() {
                    return give_up(&mut procs, e).await;
                }
            }
            if let Err(e) = ready_or_exit(&mut procs, wait_nodes_ready(&nodes, args.ready_timeout)).await {
                return give_up(&mut procs, e).await;
            }
            Some(token)
        }
    };
    let mut endpoints = Endpoints {
        array_name: config.array_name.clone(),
        config: config_path.clone(),
        secret_file: secret_path.clone(),
        tls_ca_file: ca_file.clone(),
        array_urls: array_urls.clone(),
        admin_token: admin_token.clone(),
        up_pid: std::process::id(),
        processes: process_entries(&config, &nodes, &procs),
    };
    let endpoints_path = endpoints.write(&dir)?;
    print_summary(&config, &endpoints, &endpoints_path, args.nodes);
    println!("press Ctrl-C to stop everything");

    let code = supervise(&mut procs, !args.no_restart, |procs| {
        endpoints.processes = process_entries(&config, &nodes, procs);
        if let Err(e) = endpoints.write(&dir) {
            eprintln!("cannot update {}: {e:#}", endpoints_path.display());
        }
    })
    .await;
    processes::stop_all(&mut procs).await;
    let _ = std::fs::remove_file(&endpoints_path);
    Ok(code)
}

/// The `endpoints.json` entry of every process, with its current pid.
fn process_entries(config: &ClusterConfig, nodes: &[NodeLayout], procs: &[Proc]) -> Vec<ProcessEntry> {
    let pid = |kind: Kind, name: &str| {
        procs
            .iter()
            .find(|p| p.kind == kind && p.name == name)
            .map(|p| p.pid)
            .unwrap_or(0)
    };
    let servers = config.servers().map(|(pos, s)| ProcessEntry {
        role: "array".into(),
        name: s.name.clone(),
        pid: pid(Kind::Array, &s.name),
        stripe: Some(pos.stripe),
        client: Some(s.client_addr()),
        group: Some(s.group_addr()),
        service: None,
        resp: s.resp_addr(),
        admin: s.admin_addr(),
    });
    let nodes = nodes
        .iter()
        .filter(|n| procs.iter().any(|p| p.kind == Kind::Node && p.name == n.name))
        .map(|n| ProcessEntry {
            role: "node".into(),
            name: n.name.clone(),
            pid: pid(Kind::Node, &n.name),
            stripe: None,
            client: None,
            group: None,
            service: Some(n.service.clone()),
            resp: None,
            admin: n.admin.clone(),
        });
    servers.chain(nodes).collect()
}

/// The table and the commands to try, as `up` prints them once everything serves.
fn print_summary(config: &ClusterConfig, endpoints: &Endpoints, endpoints_path: &Path, nodes: usize) {
    let scheme = if endpoints.tls_ca_file.is_some() {
        "https"
    } else {
        "http"
    };
    println!(
        "array `{}` is up ({} stripe(s)), {nodes} integration node(s)",
        config.array_name,
        config.stripes.len(),
    );
    println!(
        "{:<6} {:<6} {:<10} {:>8} {:<22} {:<22} {:<22} ADMIN",
        "ROLE", "NAME", "STRIPE", "PID", "CLIENT/SERVICE", "GROUP", "REDIS"
    );
    for e in &endpoints.processes {
        let stripe = e
            .stripe
            .map(|s| config.stripes[s].name.clone())
            .unwrap_or_else(|| "-".into());
        let front = e
            .client
            .clone()
            .or(e.service.clone().map(|s| format!("{scheme}://{s}")))
            .unwrap_or_default();
        println!(
            "{:<6} {:<6} {:<10} {:>8} {:<22} {:<22} {:<22} {scheme}://{}",
            e.role,
            e.name,
            stripe,
            e.pid,
            front,
            e.group.as_deref().unwrap_or("-"),
            e.resp.as_deref().unwrap_or("-"),
            e.admin
        );
    }
    println!();
    println!("endpoints: {}", endpoints_path.display());
    if let Some(token) = &endpoints.admin_token {
        println!("node admin token: {token}");
    }
    let dir = endpoints_path.parent().unwrap_or(Path::new("."));
    println!("try it:");
    println!("  export FERROCOTTA_DIR={}", dir.display());
    let cacert = match &endpoints.tls_ca_file {
        Some(ca) => format!(" --cacert {}", ca.display()),
        None => String::new(),
    };
    println!("  ferrocotta cache put --cache demo hello world && ferrocotta cache get --cache demo hello");
    println!("  ferrocotta status");
    let resp: Vec<&str> = endpoints.processes.iter().filter_map(|e| e.resp.as_deref()).collect();
    match resp.first() {
        Some(first) => {
            let (host, port) = first.rsplit_once(':').unwrap_or((first, ""));
            let tls = match &endpoints.tls_ca_file {
                Some(ca) => format!(" --tls --cacert {}", ca.display()),
                None => String::new(),
            };
            println!(
                "  redis-cli -c -h {host} -p {port}{tls} --user default --pass \"$(cat {})\" set hello world   # Redis protocol on {}",
                endpoints_path.parent().unwrap_or(Path::new(".")).join("secret").display(),
                resp.join(", ")
            );
        }
        None => {
            println!("  (no Redis-protocol ports: this folder's cluster.toml predates them; `up --fresh` adds them)")
        }
    }
    let services: Vec<&str> = endpoints
        .processes
        .iter()
        .filter_map(|e| e.service.as_deref())
        .collect();
    if services.len() >= 2 {
        println!(
            "  curl -s{cacert} -c jar -b jar -X POST {scheme}://{}/invoke/demo:counter   # counter 1, on node1",
            services[0]
        );
        println!(
            "  curl -s{cacert} -c jar -b jar -X POST {scheme}://{}/invoke/demo:counter   # counter 2, same session on node2",
            services[1]
        );
    }
}

/// Runs until Ctrl-C or SIGTERM, reporting processes that exit and starting them again (unless
/// `restart` is off); `changed` is called after a restart (the pids changed). Both signals are
/// listened to once, before the loop: a listener made anew on every turn (as `ctrl_c()` would be)
/// misses a signal that arrives between two turns.
async fn supervise(procs: &mut [Proc], restart: bool, mut changed: impl FnMut(&[Proc])) -> u8 {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut interrupt)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        eprintln!("cannot install the SIGTERM and SIGINT handlers");
        return 2;
    };
    loop {
        tokio::select! {
            _ = interrupt.recv() => return 0,
            _ = term.recv() => return 0,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {
                let mut restarted = false;
                for event in processes::supervise(procs, restart) {
                    match event {
                        Event::WillRestart(exit) => {
                            eprintln!("{exit}\nrestarting it in {:?}", processes::RESTART_DELAY);
                        }
                        Event::StaysDown { exit, why } => eprintln!("{exit}\n{why}; the rest keep running"),
                        Event::Restarted { kind, name, pid } => {
                            eprintln!("restarted {} {name} (pid {pid})", kind.label());
                            restarted = true;
                        }
                        Event::RestartFailed { kind, name, error } => {
                            eprintln!("cannot restart {} {name}: {error}", kind.label());
                        }
                    }
                }
                if restarted {
                    changed(procs);
                }
            }
        }
    }
}
