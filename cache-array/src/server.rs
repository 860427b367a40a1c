//! Wiring of one array server: storage, Raft, the three listeners, and shutdown.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use ferrocotta::config::{ClusterConfig, ServerPosition};
use ferrocotta::handshake::{ClientIdentity, ServerIdentity};
use ferrocotta::protocol::{ConnectionRole, SOFTWARE_VERSION};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{self, AdminState};
use crate::log_store::LogStore;
use crate::metrics::Metrics;
use crate::network::{serve_peers, PeerNetworkFactory};
use crate::service::ClientService;
use crate::state_machine::StateMachineStore;
use crate::stripe::Stripe;
use crate::types::{NodeId, Raft};

/// Everything needed to start a server.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Path of the cluster config file.
    pub config_path: PathBuf,
    /// Name of this server in the config.
    pub name: String,
}

/// Reads the shared secret named by the config, if any.
pub fn read_secret(config_path: &Path, config: &ClusterConfig) -> anyhow::Result<Vec<u8>> {
    let Some(file) = &config.security.secret_file else {
        return Ok(Vec::new());
    };
    let path = ClusterConfig::resolve_path(config_path, file);
    let text = std::fs::read(&path).with_context(|| format!("security.secret_file: cannot read {}", path.display()))?;
    let secret: Vec<u8> = text.trim_ascii().to_vec();
    if secret.len() < 16 {
        bail!(
            "security.secret_file: {} holds fewer than 16 bytes; use a long random secret",
            path.display()
        );
    }
    Ok(secret)
}

async fn bind(what: &str, host: &str, port: u16) -> anyhow::Result<TcpListener> {
    TcpListener::bind((host, port))
        .await
        .with_context(|| format!("cannot listen on {what} {host}:{port}"))
}

/// Runs a server until `shutdown` is cancelled.
pub async fn run(opts: ServerOptions, shutdown: CancellationToken) -> anyhow::Result<()> {
    let config = ClusterConfig::load(&opts.config_path)?;
    for w in config.warnings() {
        tracing::warn!(event = "config.warning", "{w}");
    }
    let (position, me) = config.find_server(&opts.name).with_context(|| {
        format!(
            "--name {}: no server of that name in {}",
            opts.name,
            opts.config_path.display()
        )
    })?;
    let me = me.clone();
    let secret = read_secret(&opts.config_path, &config)?;
    let data_dir = ClusterConfig::resolve_path(&opts.config_path, &me.data_dir);
    std::fs::create_dir_all(&data_dir).with_context(|| format!("cannot create data_dir {}", data_dir.display()))?;
    let config_toml = std::fs::read_to_string(&opts.config_path)?;
    let config = Arc::new(config);

    // Bind first: a port clash is reported before anything touches the data.
    let client_listener = bind("client port", &me.host, me.port).await?;
    let group_listener = bind("group port", &me.host, me.group_port).await?;
    let admin_listener = bind("admin port", &me.host, me.admin_port).await?;

    let log_store = LogStore::open(&data_dir.join("raft"))
        .with_context(|| format!("cannot open the log under {}", data_dir.join("raft").display()))?;
    let flush_stats = log_store.flush_stats();
    let configured = config.caches.iter().map(|(n, c)| (n.clone(), c.settings())).collect();
    let snapshot_dir = data_dir.join("snapshots");
    let state_machine = StateMachineStore::open(&snapshot_dir, configured).map_err(anyhow::Error::msg)?;
    let shared = state_machine.shared();

    let raft = start_raft(&config, position, &secret, log_store.clone(), state_machine).await?;
    let stripe = Arc::new(Stripe::new(raft.clone(), shared, config.clone(), position));

    let tracker = TaskTracker::new();
    let peer_identity = Arc::new(ServerIdentity {
        server_name: me.name.clone(),
        array_name: config.array_name.clone(),
        secret: secret.clone(),
        config_toml: String::new(),
        accepts_peers: true,
    });
    tracker.spawn(serve_peers(
        group_listener,
        raft.clone(),
        peer_identity,
        shutdown.clone(),
        tracker.clone(),
    ));

    let metrics = Arc::new(Metrics::default());
    let service = Arc::new(ClientService {
        stripe: stripe.clone(),
        identity: ServerIdentity {
            server_name: me.name.clone(),
            array_name: config.array_name.clone(),
            secret,
            config_toml: config_toml.clone(),
            accepts_peers: false,
        },
        metrics: metrics.clone(),
    });
    tracker.spawn(service.serve(client_listener, shutdown.clone(), tracker.clone()));

    let admin_state = Arc::new(AdminState {
        stripe: stripe.clone(),
        metrics,
        flush_stats,
        config_toml,
    });
    let admin_shutdown = shutdown.clone();
    tracker.spawn(async move {
        let app = admin::router(admin_state);
        if let Err(e) = axum::serve(admin_listener, app)
            .with_graceful_shutdown(async move { admin_shutdown.cancelled().await })
            .await
        {
            tracing::error!(event = "admin.failed", error = %e);
        }
    });

    stripe.form().await?;
    tracing::info!(
        event = "server.serving",
        name = %me.name,
        stripe = position.stripe,
        client = %me.client_addr(),
        group = %me.group_addr(),
        admin = %me.admin_addr(),
        version = SOFTWARE_VERSION,
    );
    spawn_leader_log(&stripe, shutdown.clone());
    tracker.spawn(crate::upkeep::run(stripe.clone(), shutdown.clone()));
    tracker.spawn(crate::compaction::run(
        raft.clone(),
        log_store,
        snapshot_dir,
        crate::compaction::stagger(config.storage.snapshot_every_log_bytes, position.index),
        shutdown.clone(),
    ));

    shutdown.cancelled().await;
    tracing::info!(event = "server.stopping", name = %me.name);
    tracker.close();
    if tokio::time::timeout(Duration::from_secs(5), tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            event = "server.stop_timeout",
            "tasks still running after 5s; stopping anyway"
        );
    }
    if let Err(e) = raft.shutdown().await {
        tracing::warn!(event = "server.raft_shutdown_failed", error = %e);
    }
    Ok(())
}

async fn start_raft(
    config: &Arc<ClusterConfig>,
    position: ServerPosition,
    secret: &[u8],
    log_store: LogStore,
    state_machine: StateMachineStore,
) -> anyhow::Result<Raft> {
    let timing = &config.timing;
    let election_ms = timing.election_timeout.0.as_millis() as u64;
    let raft_config = openraft::Config {
        cluster_name: config.array_name.clone(),
        heartbeat_interval: timing.heartbeat_interval.0.as_millis() as u64,
        election_timeout_min: election_ms,
        // A narrow randomization range keeps failover short: openraft adds the leader lease
        // (= election_timeout_max) to the timeout, so a wide range would double the wait. Split
        // votes stay rare at 25% spread and cost one more short round when they happen.
        election_timeout_max: election_ms + election_ms / 4,
        // Staggered like the size threshold (compaction.rs): the servers of a stripe snapshot one
        // after another.
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(crate::compaction::stagger(
            config.storage.snapshot_every_entries,
            position.index,
        )),
        // Keep some log behind the snapshot so a briefly lagging mirror catches up from the log.
        max_in_snapshot_log_to_keep: 1000,
        ..Default::default()
    };
    let raft_config = Arc::new(raft_config.validate().context("raft settings")?);
    let stripe = &config.stripes[position.stripe];
    let addrs: HashMap<NodeId, String> = stripe
        .servers
        .iter()
        .enumerate()
        .map(|(i, s)| (i as NodeId + 1, s.group_addr()))
        .collect();
    let me = config.server(position);
    let network = PeerNetworkFactory::new(
        ClientIdentity {
            software_version: SOFTWARE_VERSION.to_string(),
            array_name: Some(config.array_name.clone()),
            secret: secret.to_vec(),
            role: ConnectionRole::Peer { from: me.name.clone() },
        },
        addrs,
    );
    let raft = Raft::new(position.node_id(), raft_config, network, log_store, state_machine)
        .await
        .context("starting raft")?;
    Ok(raft)
}

/// Logs every change of active as seen by this server (stable event `stripe.leader_changed`).
fn spawn_leader_log(stripe: &Arc<Stripe>, shutdown: CancellationToken) {
    let stripe = stripe.clone();
    tokio::spawn(async move {
        let mut rx = stripe.raft.metrics();
        let mut last: Option<(Option<u64>, u64)> = None;
        loop {
            let now = {
                let m = rx.borrow_and_update();
                (m.current_leader, m.current_term)
            };
            if last != Some(now) {
                if last.map(|l| l.0) != Some(now.0) {
                    tracing::info!(
                        event = "stripe.leader_changed",
                        term = now.1,
                        leader = ?now.0.and_then(|id| stripe.name_of(id)),
                        me = stripe.name(),
                    );
                }
                last = Some(now);
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = rx.changed() => if r.is_err() { return },
            }
        }
    });
}
