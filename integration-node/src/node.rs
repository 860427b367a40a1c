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
use ferrocotta::ClientError;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::backend::Backend;
use crate::settings::NodeSettings;

/// Everything a request handler reaches.
pub struct Node {
    /// Settings.
    pub settings: NodeSettings,
    /// Shared state.
    pub backend: Backend,
    /// The unique logical name.
    pub logical_name: String,
    /// Random id of this process, to tell our member entry from another node's.
    pub instance_id: String,
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
}

/// Milliseconds since the epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Node {
    /// This node's member entry.
    pub fn member_entry(&self) -> Value {
        json!({
            "logical_name": self.logical_name,
            "instance": self.instance_id,
            "service": self.service_addr,
            "admin": self.admin_addr,
            "version": env!("CARGO_PKG_VERSION"),
            "start_time_ms": self.started_ms,
            "state": if self.online.load(Ordering::Relaxed) { "online" } else { "offline" },
        })
    }

    /// The members as the public service `wm.server.cluster:getMembers` shows them: without
    /// their admin addresses and instance ids, which only the admin port gives out.
    pub async fn public_members(&self) -> Vec<Value> {
        let mut members = self.members().await;
        for m in &mut members {
            if let Some(o) = m.as_object_mut() {
                o.remove("admin");
                o.remove("instance");
            }
        }
        members
    }

    /// Members of the cluster as this node sees them. A node cut from the array sees an empty
    /// list (as in the seed guide); in stand-alone mode it sees itself.
    pub async fn members(&self) -> Vec<Value> {
        match &self.backend {
            Backend::Local(_) => vec![self.member_entry()],
            Backend::Array(c) => {
                if c.connection_state() == ConnectionState::Disconnected {
                    return Vec::new();
                }
                let cache = self.settings.members_cache();
                let Ok(keys) = c.all_keys(&cache, b"", 10_000).await else {
                    return Vec::new();
                };
                let Ok(values) = c.get_all(&cache, &keys).await else {
                    return Vec::new();
                };
                values
                    .into_iter()
                    .flatten()
                    .filter_map(|v| serde_json::from_slice(&v).ok())
                    .collect()
            }
        }
    }

    /// Writes this node's member entry (ephemeral: it disappears when the node's array session
    /// ends).
    pub async fn register(&self) -> Result<(), ClientError> {
        if let Backend::Array(c) = &self.backend {
            let value = serde_json::to_vec(&self.member_entry()).expect("json");
            c.put_ephemeral(&self.settings.members_cache(), self.logical_name.as_bytes(), &value)
                .await?;
        }
        Ok(())
    }

    /// Removes this node's member entry (graceful stop).
    pub async fn leave(&self) {
        if let Backend::Array(c) = &self.backend {
            let _ = c
                .remove(&self.settings.members_cache(), self.logical_name.as_bytes())
                .await;
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
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
            e = events.recv() => {
                if let Ok(ClientEvent::Rejoined { .. }) = e {
                    let n = node.rejoins.fetch_add(1, Ordering::Relaxed) + 1;
                    tracing::warn!(event = "node.rejoined", rejoins = n, "the array session had expired; re-registering");
                }
                continue;
            }
        }
        if client.connection_state() == ConnectionState::Disconnected {
            continue;
        }
        let cache = node.settings.members_cache();
        let ours = match client.get(&cache, node.logical_name.as_bytes()).await {
            Ok(Some(v)) => serde_json::from_slice::<Value>(&v)
                .map(|v| v["instance"] == node.instance_id.as_str())
                .unwrap_or(false),
            Ok(None) => false,
            Err(_) => continue,
        };
        if !ours {
            match node.register().await {
                Ok(()) => tracing::info!(event = "node.member_registered", name = %node.logical_name),
                Err(e) => tracing::warn!(event = "node.member_register_failed", error = %e),
            }
        }
    }
}
