//! The running node, the context every service and handler reaches: its identity, its backend,
//! whether it serves, and its entry in the member list (registered, refreshed, re-registered after
//! a clear or a rejoin, removed when it leaves). Services and HTTP build on it; it knows neither.
//!
//! Everything shared lives in the array, reached only through the root crate's `ArrayClient`:
//! sessions in `ferrocotta.node.sessions.<cluster>` (tti = session timeout), the member list in
//! `ferrocotta.node.members.<cluster>` as ephemeral entries tied to the node's array session. In
//! stand-alone mode (`on_startup_error = "standalone"`) the same data lives in this process.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use ferrocotta::client::{ClientEvent, ConnectionState};
use ferrocotta::console::EventLog;
use ferrocotta::ClientError;
use tokio_util::sync::CancellationToken;

use crate::backend::Backend;
use crate::members::{self, Member};
use crate::settings::NodeSettings;

/// Everything a request handler reaches.
pub struct Node {
    /// Settings.
    pub settings: NodeSettings,
    /// Shared state.
    pub backend: Backend,
    /// The unique logical name.
    pub logical_name: String,
    /// Identity of this node in its member entry: its state folder's (kept across restarts), else
    /// random per process.
    pub instance_id: String,
    /// The state folder, locked for as long as the node runs.
    pub state_dir: Option<crate::state_dir::StateDir>,
    /// Start time, ms since the epoch.
    pub started_ms: u64,
    /// Bound service address.
    pub service_addr: String,
    /// Bound admin address.
    pub admin_addr: String,
    /// Rejoins so far.
    pub rejoins: AtomicU64,
    /// Whether the service port serves.
    pub online: AtomicBool,
    /// Wakes the service loop when the node goes online or offline.
    pub online_changed: tokio::sync::Notify,
    /// Requests served.
    pub requests: AtomicU64,
    /// TLS of both ports, if they speak it.
    pub tls: Option<Arc<ferrocotta::tls::ServerTls>>,
    /// The last [`NODE_EVENTS_KEPT`] events, shown by the cluster console through the member entry.
    pub events: EventLog,
    /// Guaranteed-delivery counters.
    pub gd_metrics: crate::gd::GdMetrics,
    /// Guaranteed-delivery transactions this process runs now (by tid): a `running` record of
    /// this process that is not here is a run that ended without writing its end.
    pub gd_in_flight: std::sync::Mutex<std::collections::HashSet<String>>,
    /// The node's services (set once at start): guaranteed delivery calls them.
    pub services: std::sync::OnceLock<Arc<crate::services::Registry>>,
    /// This node as shared (set once at start), for work that outlives a request.
    pub this: std::sync::OnceLock<std::sync::Weak<Node>>,
    /// Failover clients of the remote aliases, by (alias, `$clusterRetry`).
    pub remote_clients:
        tokio::sync::Mutex<std::collections::HashMap<(String, bool), Arc<ferrocotta::node_client::NodeClient>>>,
}

/// Events a node keeps in its member entry.
pub const NODE_EVENTS_KEPT: usize = 8;

/// Milliseconds since the epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Node {
    /// This node's member entry.
    pub fn member_entry(&self) -> Member {
        Member {
            logical_name: self.logical_name.clone(),
            instance: Some(self.instance_id.clone()),
            service: self.advertised(&self.service_addr),
            admin: Some(self.advertised(&self.admin_addr)),
            tls: self.tls.is_some(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            start_time_ms: self.started_ms,
            state: if self.online.load(Ordering::Relaxed) {
                "online"
            } else {
                "offline"
            }
            .to_string(),
            rejoins: self.rejoins.load(Ordering::Relaxed),
            nonstop_timeouts: match &self.backend {
                Backend::Array(c) => c.nonstop_timeouts(),
                Backend::Local(_) => 0,
            },
            events: self.events.to_vec(),
        }
    }

    /// This node's wall clock in ms since the epoch, with the `clock_skew_ms` of its settings (a
    /// test's way to give it a wrong clock). Only for estimates: the array's time decides
    /// scheduled firings.
    pub fn wall_ms(&self) -> i64 {
        now_ms() as i64 + self.settings.clock_skew_ms
    }

    /// A bound address as others reach it: its port with `advertise_host`, if one is set.
    fn advertised(&self, bound: &str) -> String {
        match (&self.settings.advertise_host, bound.rsplit_once(':')) {
            (Some(host), Some((_, port))) if host.contains(':') => format!("[{host}]:{port}"),
            (Some(host), Some((_, port))) => format!("{host}:{port}"),
            _ => bound.to_string(),
        }
    }

    /// The node's services.
    pub fn registry(&self) -> Arc<crate::services::Registry> {
        self.services.get().cloned().unwrap_or_default()
    }

    /// This node as shared.
    pub fn self_arc(&self) -> Arc<Node> {
        self.this
            .get()
            .and_then(std::sync::Weak::upgrade)
            .expect("the node is shared once started")
    }

    /// Records an event for the console (the oldest goes when [`NODE_EVENTS_KEPT`] are kept);
    /// the member refresh carries it to the array.
    pub fn event(&self, kind: &str, text: String) {
        self.events.record(kind, text);
    }

    /// Whether the node serves requests: online, and with its array (or stand-alone).
    pub fn ready(&self) -> bool {
        self.online.load(Ordering::Relaxed)
            && match &self.backend {
                Backend::Array(c) => c.connection_state() == ConnectionState::Connected,
                Backend::Local(_) => true,
            }
    }

    /// Members of the cluster as this node sees them (see [`members::list`]).
    pub async fn members(&self) -> Vec<Member> {
        members::list(&self.backend, &self.settings.members_cache(), &self.member_entry()).await
    }

    /// The members as the public service `wm.server.cluster:getMembers` shows them.
    pub async fn public_members(&self) -> Vec<Member> {
        self.members().await.into_iter().map(Member::public).collect()
    }

    /// Writes this node's member entry.
    pub async fn register(&self) -> Result<(), ClientError> {
        members::register(&self.backend, &self.settings.members_cache(), &self.member_entry()).await
    }

    /// Removes this node's member entry and closes its array session (graceful stop).
    pub async fn leave(&self) {
        let _ = members::leave(&self.backend, &self.settings.members_cache(), &self.logical_name).await;
        if let Backend::Array(c) = &self.backend {
            c.close().await;
        }
    }
}

/// Refreshes the member entry every interval: re-registers after a clear or a rejoin, counts
/// rejoins. Ends at `shutdown`.
pub async fn member_refresh(node: Arc<Node>, shutdown: CancellationToken) {
    let Backend::Array(client) = &node.backend else { return };
    let mut events = client.events();
    let mut tick = tokio::time::interval(node.settings.member_refresh_interval);
    let mut nonstop_seen = client.nonstop_timeouts();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
            e = events.recv() => {
                if let Ok(ClientEvent::Rejoined { .. }) = e {
                    let n = node.rejoins.fetch_add(1, Ordering::Relaxed) + 1;
                    tracing::warn!(event = "node.rejoined", rejoins = n, "the array session had expired; re-registering");
                    node.event("rejoined", format!("the array session had expired; rejoined (rejoin {n})"));
                }
                continue;
            }
        }
        let nonstop = client.nonstop_timeouts();
        if nonstop > nonstop_seen {
            node.event(
                "nonstop_timeout",
                format!(
                    "{} cache operation(s) took their nonstop timeout behaviour",
                    nonstop - nonstop_seen
                ),
            );
            nonstop_seen = nonstop;
        }
        if client.connection_state() == ConnectionState::Disconnected {
            continue;
        }
        // Absent (the list was cleared, or the session that held it ended): claimed again, only
        // if still absent. Ours but stale (still "online" after the admin took the node offline):
        // written again. Another node's (one that took the name while this node's entry was
        // gone): left alone and reported, so that two nodes never overwrite each other in turn.
        let cache = node.settings.members_cache();
        let me = node.member_entry();
        let written = match members::entry_of(&node.backend, &cache, &node.logical_name).await {
            Err(_) => continue,
            Ok(Some(entry)) if entry == me => continue,
            Ok(Some(entry)) if entry.instance == me.instance => node.register().await.map(|()| true),
            Ok(None) => members::claim(&node.backend, &cache, &me).await.map(|c| c.is_none()),
            Ok(Some(entry)) => {
                tracing::error!(
                    event = "node.name_conflict",
                    name = %node.logical_name,
                    holder = %entry.service,
                    "another live node holds this node's logical name in the member list"
                );
                continue;
            }
        };
        match written {
            Ok(true) => tracing::info!(event = "node.member_registered", name = %node.logical_name),
            Ok(false) => {}
            Err(e) => tracing::warn!(event = "node.member_register_failed", error = %e),
        }
    }
}
