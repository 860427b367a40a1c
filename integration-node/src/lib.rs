//! A ferrocotta integration node: an application server that clusters through the cache array.
//!
//! It reaches the array only through the root crate's `ArrayClient`; it never depends on
//! openraft, sled or the array server.
//!
//! - [`settings`]: command line and `node.toml`.
//! - [`cluster_name`]: effective cluster names and logical-name rules.
//! - [`backend`]: where shared state lives (the array or this process), storage with a typed error.
//! - [`members`]: the member list in the array, a typed entry per node.
//! - [`node`]: the running node (its context): identity, its member entry, online state.
//! - [`state_dir`]: the node's own folder: an identity kept across restarts, locked while it runs.
//! - [`http`]: the service and admin ports: routers, the page, metrics.
//! - [`owner`]: who runs shared work (a node's process), judged alive by the member list.
//! - [`gd`]: guaranteed delivery: transactions whose service runs once and only once, kept in
//!   the array; its services are among the built-ins.
//! - [`jobs`]: scheduled jobs, kept in the array and fired by the array's clock.
//! - [`services`]: the service registry and the built-in services, each module owning its state:
//!   cache, session, locks (`pub.cache.lock`, `pub.storage`), checkpoint, cluster.

pub mod backend;
pub mod cluster_name;
pub mod gd;
pub mod http;
pub mod jobs;
pub mod members;
pub mod node;
pub mod owner;
pub mod services;
pub mod settings;
pub mod state_dir;

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use ferrocotta::http::HttpLimits;
use ferrocotta::{ArrayClient, ClientError, ClientSettings};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::backend::Backend;
use crate::node::Node;
use crate::services::Registry;
use crate::settings::{NodeSettings, OnStartupError};
use crate::state_dir::StateDir;

/// Exit code of a start-up refused for a version mismatch.
pub const EXIT_VERSION_MISMATCH: u8 = 3;
/// Exit code when the array cannot be reached at start-up (`on_startup_error = "shutdown"`).
pub const EXIT_NO_ARRAY: u8 = 4;
/// Exit code when the logical name is taken by a live member.
pub const EXIT_NAME_TAKEN: u8 = 5;

/// Why the node did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Client and array versions differ.
    #[error("{0}")]
    VersionMismatch(String),
    /// The array could not be reached.
    #[error("cannot join the cluster: {0}")]
    NoArray(String),
    /// The logical name is in use.
    #[error("{0}")]
    NameTaken(String),
    /// Anything else.
    #[error("{0:#}")]
    Other(anyhow::Error),
}

impl StartError {
    /// The process exit code for this failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            StartError::VersionMismatch(_) => EXIT_VERSION_MISMATCH,
            StartError::NoArray(_) => EXIT_NO_ARRAY,
            StartError::NameTaken(_) => EXIT_NAME_TAKEN,
            StartError::Other(_) => 2,
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

async fn connect(
    settings: &NodeSettings,
    array_tls: Option<Arc<ferrocotta::tls::ClientTls>>,
) -> Result<Option<ArrayClient>, StartError> {
    let mut cs = ClientSettings::new(&settings.array_urls).map_err(|e| StartError::Other(e.into()))?;
    cs.secret = settings.secret.clone();
    cs.credential = settings.credential.clone();
    cs.tls = array_tls;
    cs.connect_timeout = settings.connect_timeout;
    cs.request_timeout = settings.request_timeout;
    cs.keepalive_interval = settings.keepalive_interval;
    cs.client_name = format!("integration-node {}", settings.effective_cluster_name);
    cs.max_connect_retries = Some((settings.connect_timeout.as_secs() as u32).max(1));
    cs.default_nonstop.timeout = settings.request_timeout;
    if let Some(n) = settings.sessions_nonstop {
        cs.nonstop.insert(settings.sessions_cache(), n);
    }
    match ArrayClient::connect(cs).await {
        Ok(c) => Ok(Some(c)),
        Err(e @ ClientError::VersionMismatch { .. }) => {
            tracing::error!(event = "node.version_mismatch", "{e}");
            Err(StartError::VersionMismatch(e.to_string()))
        }
        Err(e) => match settings.on_startup_error {
            OnStartupError::Shutdown => {
                tracing::error!(event = "node.no_array", error = %e);
                Err(StartError::NoArray(e.to_string()))
            }
            OnStartupError::Standalone => {
                tracing::warn!(event = "node.standalone", error = %e, "running stand-alone with local state");
                Ok(None)
            }
        },
    }
}

/// A node that has started: its addresses and the handle to stop it.
pub struct RunningNode {
    /// The node's state.
    pub node: Arc<Node>,
    /// Cancel to stop (graceful).
    pub shutdown: CancellationToken,
    /// Completes when the node has stopped.
    pub done: tokio::task::JoinHandle<()>,
}

/// Starts a node: binds its ports, joins the array (or runs stand-alone), registers in the member
/// list and serves until `shutdown` is cancelled.
pub async fn start(settings: NodeSettings, registry: Registry) -> Result<RunningNode, StartError> {
    let tls = match &settings.tls {
        None => None,
        Some(t) => Some(
            ferrocotta::tls::ServerTls::load("node ports", t.files.clone(), t.require_client_cert)
                .map_err(|e| StartError::Other(e.into()))?,
        ),
    };
    let array_tls = match &settings.array_tls {
        None => None,
        Some(files) => Some(
            ferrocotta::tls::ClientTls::load("array client of the node", files.clone())
                .map_err(|e| StartError::Other(e.into()))?,
        ),
    };
    let service = TcpListener::bind(&settings.listen)
        .await
        .with_context(|| format!("cannot listen on {}", settings.listen))
        .map_err(StartError::Other)?;
    let admin = TcpListener::bind(&settings.admin_listen)
        .await
        .with_context(|| format!("cannot listen on {}", settings.admin_listen))
        .map_err(StartError::Other)?;
    let service_addr = service
        .local_addr()
        .map_err(|e| StartError::Other(e.into()))?
        .to_string();
    let admin_addr = admin.local_addr().map_err(|e| StartError::Other(e.into()))?.to_string();
    let logical_name = settings
        .logical_name
        .clone()
        .unwrap_or_else(|| format!("{}:{}", hostname(), service_addr.rsplit(':').next().unwrap_or("0")));
    tracing::info!(
        event = "node.starting",
        cluster = %settings.cluster_name,
        effective_cluster = %settings.effective_cluster_name,
        logical_name = %logical_name
    );
    // Opened before the array is reached: a second process on the same folder stops here.
    let state_dir = match &settings.state_dir {
        Some(path) => Some(StateDir::open(path).map_err(StartError::Other)?),
        None => None,
    };
    let backend = match connect(&settings, array_tls.clone()).await? {
        Some(c) => Backend::Array(c),
        None => Backend::Local(Default::default()),
    };
    let instance_id = match &state_dir {
        Some(dir) => dir.instance().to_string(),
        None => {
            let instance: [u8; 8] = rand::random();
            instance.iter().map(|b| format!("{b:02x}")).collect()
        }
    };
    let events = ferrocotta::console::EventLog::new(&logical_name, node::NODE_EVENTS_KEPT);
    let node = Arc::new(Node {
        settings,
        backend,
        logical_name,
        instance_id,
        state_dir,
        started_ms: node::now_ms(),
        service_addr,
        admin_addr,
        rejoins: AtomicU64::new(0),
        online: AtomicBool::new(true),
        online_changed: tokio::sync::Notify::new(),
        requests: AtomicU64::new(0),
        tls,
        events,
        gd_metrics: Default::default(),
        gd_in_flight: Default::default(),
        services: Default::default(),
        this: Default::default(),
        remote_clients: Default::default(),
    });
    let _ = node.this.set(Arc::downgrade(&node));
    if let Backend::Array(_) = &node.backend {
        let cache = node.settings.members_cache();
        // Claimed in one step: a check then a put would let two nodes starting at once both
        // pass and then overwrite each other's entry for ever.
        let claimed = members::claim(&node.backend, &cache, &node.member_entry())
            .await
            .map_err(|e| StartError::NoArray(format!("cannot register in the member list: {e}")))?;
        if let Some(existing) = claimed {
            let entry = serde_json::from_slice::<members::Member>(&existing).ok();
            // Our own folder's entry, left by a process that died: the folder lock we hold proves
            // that process is gone, so the entry is ours to take over.
            let ours = node.state_dir.is_some()
                && entry
                    .as_ref()
                    .is_some_and(|m| m.instance.as_deref() == Some(node.instance_id.as_str()));
            if ours {
                tracing::warn!(
                    event = "node.took_over_stale_entry",
                    name = %node.logical_name,
                    "the member entry of this node's previous process (it did not stop cleanly) is replaced"
                );
                node.register().await.map_err(|e| StartError::NoArray(e.to_string()))?;
            } else {
                let who = entry
                    .map(|m| format!("at {} (started at {} ms)", m.service, m.start_time_ms))
                    .unwrap_or_else(|| "(an entry this version cannot read)".into());
                let hint = if node.state_dir.is_some() {
                    "it was not written from this node's --state-dir"
                } else {
                    "a node started with the same --state-dir as the entry's process takes it over at once"
                };
                return Err(StartError::NameTaken(format!(
                    "the logical name `{}` is already used by a live member {who}; pick another with --logical-name. \
                     If that member's process is dead, its entry leaves when its array session expires ({hint})",
                    node.logical_name
                )));
            }
        }
    }
    let shutdown = CancellationToken::new();
    let mut reloadables: Vec<Arc<dyn ferrocotta::tls::Reloadable>> = Vec::new();
    if let Some(t) = &node.tls {
        reloadables.push(t.clone());
    }
    if let Some(t) = array_tls {
        reloadables.push(t);
    }
    ferrocotta::tls::spawn_reloader(reloadables, TLS_RELOAD_INTERVAL, shutdown.clone());
    let registry = Arc::new(registry);
    let _ = node.services.set(registry.clone());
    let jobs = Arc::new(jobs::Jobs::new(node.clone(), registry.clone()));
    let done = tokio::spawn(serve(node.clone(), registry, jobs, service, admin, shutdown.clone()));
    tracing::info!(
        event = "node.serving",
        name = %node.logical_name,
        service = %node.service_addr,
        admin = %node.admin_addr,
        state = node.backend.array_state()
    );
    Ok(RunningNode { node, shutdown, done })
}

/// How often the node looks whether its certificate files changed (they are also re-read on
/// SIGHUP).
pub const TLS_RELOAD_INTERVAL: Duration = Duration::from_secs(60);

/// Connections the service port holds at once: many keep-alive connections from load balancers and
/// clients.
pub const SERVICE_CONNECTIONS_MAX: u32 = 4096;

/// Connections from one address to the service port (a load balancer is one address).
pub const SERVICE_CONNECTIONS_PER_IP_MAX: u32 = 2048;

/// Service-port connections still in their TLS handshake at once.
pub const SERVICE_PENDING_HANDSHAKES_MAX: u32 = 256;

/// Longest a stopping node waits for in-flight service requests.
pub const SERVICE_DRAIN_MAX: Duration = Duration::from_secs(10);

/// Longest a stopping node waits for in-flight admin requests.
pub const ADMIN_DRAIN_MAX: Duration = Duration::from_secs(2);

/// How often a node back online retries binding its service port.
pub const REBIND_RETRY_INTERVAL: Duration = Duration::from_millis(500);

/// Bounds of the service port: many keep-alive connections from load balancers and clients.
fn service_limits() -> HttpLimits {
    HttpLimits {
        admission: ferrocotta::admission::AdmissionLimits {
            connections_max: SERVICE_CONNECTIONS_MAX,
            connections_per_ip_max: SERVICE_CONNECTIONS_PER_IP_MAX,
            pending_handshakes_max: SERVICE_PENDING_HANDSHAKES_MAX,
        },
        ..HttpLimits::default()
    }
}

async fn serve(
    node: Arc<Node>,
    registry: Arc<Registry>,
    jobs: Arc<jobs::Jobs>,
    service: TcpListener,
    admin: TcpListener,
    shutdown: CancellationToken,
) {
    let refresh = tokio::spawn(node::member_refresh(node.clone(), shutdown.clone()));
    let declared = node.settings.jobs.clone();
    let (scheduler_jobs, scheduler_stop) = (jobs.clone(), shutdown.clone());
    let scheduler = tokio::spawn(async move {
        if !declared.is_empty() && scheduler_jobs.client().is_ok() {
            scheduler_jobs.declare(&declared).await;
        }
        jobs::run_scheduler(scheduler_jobs, scheduler_stop).await
    });
    let service_task = tokio::spawn(service_loop(node.clone(), registry, service, shutdown.clone()));
    let admin_task = tokio::spawn(ferrocotta::http::serve(
        "node admin",
        admin,
        node.tls.clone(),
        HttpLimits::default(),
        http::admin_router(node.clone(), jobs),
        shutdown.clone(),
    ));
    shutdown.cancelled().await;
    // Stop accepting and finish in-flight requests (bounded), then leave the member list.
    let _ = tokio::time::timeout(SERVICE_DRAIN_MAX, service_task).await;
    let _ = tokio::time::timeout(ADMIN_DRAIN_MAX, admin_task).await;
    refresh.abort();
    scheduler.abort();
    node.leave().await;
    tracing::info!(event = "node.stopped", name = %node.logical_name);
}

/// Serves the service port while the node is online: going offline closes the port (in-flight
/// requests finish), going online binds it again on the same address.
async fn service_loop(node: Arc<Node>, registry: Arc<Registry>, first: TcpListener, shutdown: CancellationToken) {
    let mut listener = Some(first);
    loop {
        let l = match listener.take() {
            Some(l) => l,
            None => match TcpListener::bind(&node.service_addr).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(event = "node.rebind_failed", addr = %node.service_addr, error = %e);
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(REBIND_RETRY_INTERVAL) => continue,
                    }
                }
            },
        };
        let stop = shutdown.child_token();
        let stopper = stop.clone();
        let watcher_node = node.clone();
        let watcher = tokio::spawn(async move {
            while watcher_node.online.load(std::sync::atomic::Ordering::Relaxed) {
                let notified = watcher_node.online_changed.notified();
                if !watcher_node.online.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                tokio::select! {
                    _ = notified => {}
                    _ = stopper.cancelled() => return,
                }
            }
            stopper.cancel();
        });
        ferrocotta::http::serve(
            "node service",
            l,
            node.tls.clone(),
            service_limits(),
            http::service_router(node.clone(), registry.clone()),
            stop.clone(),
        )
        .await;
        watcher.abort();
        if shutdown.is_cancelled() {
            return;
        }
        // Offline: wait until online again.
        while !node.online.load(std::sync::atomic::Ordering::Relaxed) {
            let notified = node.online_changed.notified();
            if node.online.load(std::sync::atomic::Ordering::Relaxed) {
                break;
            }
            tokio::select! {
                _ = notified => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }
}

/// Fails fast on settings that can never work.
pub fn check(settings: &NodeSettings) -> anyhow::Result<()> {
    if settings.session_max_bytes == 0 {
        bail!("session_max_bytes must be at least 1");
    }
    Ok(())
}
