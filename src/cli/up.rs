//! `ferrocotta up`: a whole local array in one command.
//!
//! Writes `DIR/cluster.toml`, the secrets (`secret` for clients, `peer-secret` for the servers,
//! `credentials.toml` with the nodes' credential and `node-credential` holding its secret) and,
//! with `--tls`, a local CA and a certificate per process in `DIR/tls/` (all kept and reused on the
//! next run, so the data survives). The folder is 0700 and every secret 0600. Starts one
//! `cache-array` process per server with its log in `DIR/logs/`, waits until every stripe has an
//! active, writes `DIR/endpoints.json` (SPEC 9, 0600: it holds the admin token) and prints the same
//! facts. Ctrl-C (or SIGTERM) stops every process it started: SIGTERM first, SIGKILL after a grace
//! period.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use ferrocotta::config::{local_array, ClusterConfig, ConfigDuration, Security, ServerPorts, TlsSettings};
use ferrocotta::protocol::{Reply, Role};
use ferrocotta::security::{new_secret_hex, write_private_file, AccessMode, AccessRule, Credential, CredentialsFile};
use ferrocotta::tls::{names_for, ClientTls, LocalCa, TlsFiles};
use ferrocotta::{ArrayClient, ClientSettings};
use serde::Serialize;
use tokio::process::{Child, Command};

/// Longest a stopping server gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Flags of `ferrocotta up`.
#[derive(Debug, Args)]
pub struct UpArgs {
    /// Folder for the config, secret, data and logs (reused when it already holds a config).
    #[arg(long, default_value = "ferrocotta-local")]
    dir: PathBuf,
    /// Number of stripes.
    #[arg(long, default_value_t = 1)]
    stripes: usize,
    /// Servers per stripe.
    #[arg(long, default_value_t = 3)]
    servers_per_stripe: usize,
    /// Address every process listens on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// First client port; server i uses client port BASE+i, group port BASE+20+i, admin port
    /// BASE+30+i (so the first server gets the defaults 9510, 9530, 9540). 0 picks free ports.
    #[arg(long, default_value_t = 9510)]
    base_port: u16,
    /// Name of the array.
    #[arg(long, default_value = "local")]
    array_name: String,
    /// Delete the folder's config and data first.
    #[arg(long)]
    fresh: bool,
    /// How long the array may take to elect an active in every stripe.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    ready_timeout: Duration,
    /// The `cache-array` binary (default: next to this `ferrocotta` binary).
    #[arg(long, env = "FERROCOTTA_CACHE_ARRAY_BIN")]
    cache_array_bin: Option<PathBuf>,
    /// Integration nodes to start (0 for the array alone).
    #[arg(long, default_value_t = 2)]
    nodes: usize,
    /// Cluster name of the integration nodes.
    #[arg(long, default_value = "local")]
    cluster_name: String,
    /// First service port of the nodes; node i uses service port BASE+i and admin port
    /// 9999+i (the defaults 5555 and 9999 for the first). With `--base-port 0` nodes get free
    /// ports too.
    #[arg(long, default_value_t = 5555)]
    node_base_port: u16,
    /// The `integration-node` binary (default: next to this `ferrocotta` binary).
    #[arg(long, env = "FERROCOTTA_INTEGRATION_NODE_BIN")]
    integration_node_bin: Option<PathBuf>,
    /// TLS on every port: a local CA and a certificate per process are made in `DIR/tls/`
    /// (clients trust `DIR/tls/ca.crt`). Only for a new folder (or with `--fresh`).
    #[arg(long)]
    tls: bool,
}

/// Files `up` keeps in its folder (and `--fresh` removes).
const FOLDER_ENTRIES: [&str; 10] = [
    "cluster.toml",
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

/// One process in `endpoints.json` (field names are a stable interface, SPEC 9).
#[derive(Debug, Serialize)]
struct ProcessEntry {
    /// `array` or `node`.
    role: &'static str,
    name: String,
    pid: u32,
    /// Stripe of an array server.
    #[serde(skip_serializing_if = "Option::is_none")]
    stripe: Option<usize>,
    /// Client port of an array server.
    #[serde(skip_serializing_if = "Option::is_none")]
    client: Option<String>,
    /// Group port of an array server.
    #[serde(skip_serializing_if = "Option::is_none")]
    group: Option<String>,
    /// Service port of a node.
    #[serde(skip_serializing_if = "Option::is_none")]
    service: Option<String>,
    /// Admin port (both roles).
    admin: String,
}

#[derive(Debug, Serialize)]
struct Endpoints {
    array_name: String,
    config: PathBuf,
    secret_file: PathBuf,
    /// The CA clients trust, when the ports speak TLS.
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_ca_file: Option<PathBuf>,
    array_urls: String,
    /// Token of the nodes' admin ports.
    #[serde(skip_serializing_if = "Option::is_none")]
    admin_token: Option<String>,
    processes: Vec<ProcessEntry>,
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
        bail!(
            "cannot find `{name}` next to {}; build the whole workspace first: `cargo build --release --workspace`",
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
        // The last port laid out is BASE+30+count-1; it must not wrap round past 65535.
        if base.checked_add(30 + count as u16).is_none() {
            bail!(
                "--base-port {base}: the ports of {count} server(s) would go past 65535 (the admin ports are BASE+30..); pick a lower base"
            );
        }
        return Ok((0..count as u16)
            .map(|i| ServerPorts {
                port: base + i,
                group_port: base + 20 + i,
                admin_port: base + 30 + i,
            })
            .collect());
    }
    // Hold every listener until all are chosen so no port is handed out twice.
    let listeners = (0..count * 3)
        .map(|_| TcpListener::bind((host, 0)))
        .collect::<Result<Vec<_>, _>>()
        .context("cannot find free ports")?;
    let ports: Vec<u16> = listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<Result<_, _>>()?;
    Ok(ports
        .chunks(3)
        .map(|c| ServerPorts {
            port: c[0],
            group_port: c[1],
            admin_port: c[2],
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
        eprintln!(
            "reusing {} ({} stripe(s)); pass --fresh to start over",
            config_path.display(),
            config.stripes.len()
        );
        return Ok((config_path, config));
    }
    if args.stripes == 0 || args.servers_per_stripe == 0 {
        bail!("--stripes and --servers-per-stripe must be at least 1");
    }
    let ports = pick_ports(&args.host, args.base_port, args.stripes * args.servers_per_stripe)?;
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
        &args.array_name,
        &args.host,
        args.stripes,
        args.servers_per_stripe,
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

/// Makes the local CA and a certificate for every process that lacks one, in `DIR/tls/`.
fn ensure_certificates(dir: &Path, config: &ClusterConfig, host: &str, nodes: usize) -> anyhow::Result<PathBuf> {
    let tls_dir = dir.join("tls");
    let ca = LocalCa::in_dir(&tls_dir)?;
    let servers = config.servers().map(|(_, s)| (s.name.clone(), s.host.clone()));
    let nodes = (1..=nodes).map(|i| (format!("node{i}"), host.to_string()));
    for (name, host) in servers.chain(nodes) {
        if !tls_dir.join(format!("{name}.crt")).exists() {
            ca.issue_files(&tls_dir, &name, &names_for(&name, &host))?;
        }
    }
    Ok(LocalCa::cert_path(&tls_dir))
}

/// The log file of a process in `DIR/logs/`, opened for appending (kept across runs).
fn open_log(dir: &Path, name: &str) -> anyhow::Result<std::fs::File> {
    let log_path = dir.join("logs").join(format!("{name}.log"));
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))
}

fn spawn_server(bin: &Path, config_path: &Path, dir: &Path, name: &str) -> anyhow::Result<Child> {
    let log = open_log(dir, name)?;
    Command::new(bin)
        .arg("--config")
        .arg(config_path)
        .arg("--name")
        .arg(name)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))
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

async fn stop_all(children: &mut [(String, Child)]) {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    // Nodes first, so they can leave the member list while the array still answers; then the
    // array servers.
    for nodes in [true, false] {
        let group = children
            .iter_mut()
            .filter(|(name, _)| name.starts_with("node") == nodes);
        let group: Vec<&mut (String, Child)> = group.collect();
        for (_, child) in group.iter() {
            if let Some(pid) = child.id() {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
            }
        }
        for (name, child) in group {
            match tokio::time::timeout(STOP_GRACE, child.wait()).await {
                Ok(_) => eprintln!("stopped {name}"),
                Err(_) => {
                    let _ = child.kill().await;
                    eprintln!("killed {name} (did not stop within {STOP_GRACE:?})");
                }
            }
        }
    }
}

pub async fn run(args: UpArgs) -> anyhow::Result<u8> {
    let bin = sibling_binary("cache-array", args.cache_array_bin.clone())?;
    let (config_path, config) = prepare(&args)?;
    let config_path = std::fs::canonicalize(&config_path)?;
    let dir = config_path.parent().expect("config has a folder").to_path_buf();
    let secret_path = dir.join("secret");
    let secret = ferrocotta::security::read_secret_file(&secret_path)?;
    let ca_file = match &config.security.tls {
        Some(_) => Some(ensure_certificates(&dir, &config, &args.host, args.nodes)?),
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

    let mut children: Vec<(String, Child)> = Vec::new();
    let mut entries = Vec::new();
    for (pos, srv) in config.servers() {
        let child = match spawn_server(&bin, &config_path, &dir, &srv.name) {
            Ok(c) => c,
            Err(e) => {
                stop_all(&mut children).await;
                return Err(e);
            }
        };
        entries.push(ProcessEntry {
            role: "array",
            name: srv.name.clone(),
            pid: child.id().unwrap_or(0),
            stripe: Some(pos.stripe),
            client: Some(srv.client_addr()),
            group: Some(srv.group_addr()),
            service: None,
            admin: srv.admin_addr(),
        });
        children.push((srv.name.clone(), child));
    }
    eprintln!(
        "starting {} array server(s); logs in {}",
        children.len(),
        dir.join("logs").display()
    );
    if let Err(e) = wait_ready(&config, secret, client_tls, args.ready_timeout).await {
        stop_all(&mut children).await;
        return Err(e);
    }
    let array_urls = entries
        .iter()
        .filter_map(|e| e.client.clone())
        .collect::<Vec<_>>()
        .join(",");
    let admin_token = if args.nodes > 0 {
        match start_nodes(
            &args,
            &dir,
            &array_urls,
            ca_file.as_deref(),
            &mut children,
            &mut entries,
        )
        .await
        {
            Ok(token) => Some(token),
            Err(e) => {
                stop_all(&mut children).await;
                return Err(e);
            }
        }
    } else {
        None
    };
    let endpoints = Endpoints {
        array_name: config.array_name.clone(),
        config: config_path.clone(),
        secret_file: secret_path.clone(),
        tls_ca_file: ca_file.clone(),
        array_urls: array_urls.clone(),
        admin_token: admin_token.clone(),
        processes: entries,
    };
    let endpoints_path = dir.join("endpoints.json");
    // It holds the admin token.
    write_private_file(
        &endpoints_path,
        (serde_json::to_string_pretty(&endpoints)? + "\n").as_bytes(),
    )?;
    let scheme = if ca_file.is_some() { "https" } else { "http" };

    println!(
        "array `{}` is up ({} stripe(s)), {} integration node(s)",
        config.array_name,
        config.stripes.len(),
        args.nodes
    );
    println!(
        "{:<6} {:<6} {:>6} {:>8} {:<22} {:<22} ADMIN",
        "ROLE", "NAME", "STRIPE", "PID", "CLIENT/SERVICE", "GROUP"
    );
    for e in &endpoints.processes {
        let stripe = e.stripe.map(|s| s.to_string()).unwrap_or_else(|| "-".into());
        let front = e
            .client
            .clone()
            .or(e.service.clone().map(|s| format!("{scheme}://{s}")))
            .unwrap_or_default();
        println!(
            "{:<6} {:<6} {:>6} {:>8} {:<22} {:<22} {scheme}://{}",
            e.role,
            e.name,
            stripe,
            e.pid,
            front,
            e.group.as_deref().unwrap_or("-"),
            e.admin
        );
    }
    println!();
    println!("endpoints: {}", endpoints_path.display());
    if let Some(token) = &admin_token {
        println!("node admin token: {token}");
    }
    println!("try it:");
    println!(
        "  export FERROCOTTA_ARRAY_URLS={array_urls} FERROCOTTA_SECRET_FILE={}",
        secret_path.display()
    );
    let cacert = match &ca_file {
        Some(ca) => {
            println!("  export FERROCOTTA_TLS_CA_FILE={}", ca.display());
            format!(" --cacert {}", ca.display())
        }
        None => String::new(),
    };
    println!("  ferrocotta cache put --cache demo hello world && ferrocotta cache get --cache demo hello");
    println!("  ferrocotta status");
    let nodes: Vec<&str> = endpoints
        .processes
        .iter()
        .filter_map(|e| e.service.as_deref())
        .collect();
    if nodes.len() >= 2 {
        println!(
            "  curl -s{cacert} -c jar -b jar -X POST {scheme}://{}/invoke/demo:counter   # counter 1, on node1",
            nodes[0]
        );
        println!(
            "  curl -s{cacert} -c jar -b jar -X POST {scheme}://{}/invoke/demo:counter   # counter 2, same session on node2",
            nodes[1]
        );
    }
    println!("press Ctrl-C to stop everything");

    let code = wait_until_stopped(&mut children).await;
    stop_all(&mut children).await;
    let _ = std::fs::remove_file(&endpoints_path);
    Ok(code)
}

/// Starts the integration nodes and waits until each serves; returns the admin token.
async fn start_nodes(
    args: &UpArgs,
    dir: &Path,
    array_urls: &str,
    ca_file: Option<&Path>,
    children: &mut Vec<(String, Child)>,
    entries: &mut Vec<ProcessEntry>,
) -> anyhow::Result<String> {
    let bin = sibling_binary("integration-node", args.integration_node_bin.clone())?;
    let token_path = dir.join("admin-token");
    ensure_secret(&token_path)?;
    let token = std::fs::read_to_string(&token_path)?.trim().to_string();
    let ports: Vec<(u16, u16)> = if args.base_port == 0 {
        let free = pick_ports(&args.host, 0, args.nodes)?;
        free.iter().map(|p| (p.port, p.admin_port)).collect()
    } else {
        (0..args.nodes as u16)
            .map(|i| (args.node_base_port + i, 9999u16.saturating_add(i)))
            .collect()
    };
    let mut addrs = Vec::new();
    for (i, (service_port, admin_port)) in ports.iter().enumerate() {
        let name = format!("node{}", i + 1);
        let service = format!("{}:{service_port}", args.host);
        let admin = format!("{}:{admin_port}", args.host);
        let log = open_log(dir, &name)?;
        let mut command = Command::new(&bin);
        command
            .args(["--array-urls", array_urls, "--cluster-name", &args.cluster_name])
            .args(["--listen", &service, "--admin-listen", &admin, "--logical-name", &name])
            .args(["--credential", NODE_CREDENTIAL])
            .arg("--secret-file")
            .arg(dir.join("node-credential"))
            .arg("--admin-token-file")
            .arg(&token_path);
        if let Some(ca) = ca_file {
            let tls_dir = dir.join("tls");
            command
                .arg("--array-tls-ca-file")
                .arg(ca)
                .arg("--tls-cert-file")
                .arg(tls_dir.join(format!("{name}.crt")))
                .arg("--tls-key-file")
                .arg(tls_dir.join(format!("{name}.key")));
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        entries.push(ProcessEntry {
            role: "node",
            name: name.clone(),
            pid: child.id().unwrap_or(0),
            stripe: None,
            client: None,
            group: None,
            service: Some(service.clone()),
            admin: admin.clone(),
        });
        children.push((name.clone(), child));
        addrs.push((name, admin));
    }
    let deadline = tokio::time::Instant::now() + args.ready_timeout;
    for (name, admin) in addrs {
        while tokio::net::TcpStream::connect(&admin).await.is_err() {
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "integration node {name} did not start within {:?}; see its log",
                    args.ready_timeout
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(token)
}

/// Waits for Ctrl-C or SIGTERM; reports servers that exit on their own meanwhile. Both signals
/// are listened to once, before the loop: a listener made anew on every turn (as `ctrl_c()` would
/// be) misses a signal that arrives between two turns.
async fn wait_until_stopped(children: &mut [(String, Child)]) -> u8 {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut interrupt)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        eprintln!("cannot install the SIGTERM and SIGINT handlers");
        return 2;
    };
    let mut reported = vec![false; children.len()];
    loop {
        tokio::select! {
            _ = interrupt.recv() => return 0,
            _ = term.recv() => return 0,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                for (i, (name, child)) in children.iter_mut().enumerate() {
                    if !reported[i] {
                        if let Ok(Some(status)) = child.try_wait() {
                            eprintln!("array server {name} exited ({status}); the rest keep running");
                            reported[i] = true;
                        }
                    }
                }
            }
        }
    }
}
