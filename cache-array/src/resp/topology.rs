//! What the Redis front end tells clients about the array: which server is the active of each
//! stripe (for `MOVED` and `CLUSTER SLOTS`), and Redis Cluster node ids.
//!
//! This server knows its own stripe's active from Raft. The other stripes' actives are learnt by
//! asking their servers' admin ports (`/v1/status`) once a second while the front end runs; a
//! stale answer costs a client one more redirect (the server it is sent to redirects again).

use std::sync::{Arc, RwLock};
use std::time::Duration;

use ferrocotta::config::{ClusterConfig, ServerConfig};
use ferrocotta::http::{request, Call};
use ferrocotta::tls::ClientTls;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::stripe::Stripe;

/// How often the other stripes' actives are looked up.
pub const ACTIVES_REFRESH: Duration = Duration::from_secs(1);

/// Longest one lookup of a server's status may take.
const STATUS_TIMEOUT: Duration = Duration::from_millis(800);

/// The actives as this server knows them.
pub struct Topology {
    stripe: Arc<Stripe>,
    admin_tls: Option<Arc<ClientTls>>,
    /// By stripe: the name of its active, when known (this server's own stripe is read from Raft).
    others: RwLock<Vec<Option<String>>>,
}

impl Topology {
    pub fn new(stripe: Arc<Stripe>, admin_tls: Option<Arc<ClientTls>>) -> Topology {
        let stripes = stripe.config().stripes.len();
        Topology {
            stripe,
            admin_tls,
            others: RwLock::new(vec![None; stripes]),
        }
    }

    pub fn config(&self) -> &ClusterConfig {
        self.stripe.config()
    }

    /// The active of a stripe, when known.
    pub fn active_of(&self, stripe: usize) -> Option<&ServerConfig> {
        let name = if stripe == self.stripe.position().stripe {
            self.stripe.snapshot_metrics().leader
        } else {
            self.others
                .read()
                .expect("topology lock")
                .get(stripe)
                .cloned()
                .flatten()
        }?;
        self.config().servers().map(|(_, s)| s).find(|s| s.name == name)
    }

    /// Where to send a client for a stripe: its active, else its first server (which redirects
    /// again once it knows).
    pub fn target_of(&self, stripe: usize) -> &ServerConfig {
        self.active_of(stripe)
            .unwrap_or_else(|| &self.config().stripes[stripe].servers[0])
    }

    /// Looks up the other stripes' actives until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mine = self.stripe.position().stripe;
        let stripes = self.config().stripes.len();
        loop {
            for s in (0..stripes).filter(|s| *s != mine) {
                let found = self.ask_stripe(s).await;
                self.others.write().expect("topology lock")[s] = found;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(ACTIVES_REFRESH) => {}
            }
        }
    }

    /// The active a stripe's servers name: the first answer that names one.
    async fn ask_stripe(&self, stripe: usize) -> Option<String> {
        for server in &self.config().stripes[stripe].servers {
            let call = Call::get("/v1/status", STATUS_TIMEOUT);
            let Ok((200, body)) = request(&server.admin_addr(), self.admin_tls.as_deref(), call).await else {
                continue;
            };
            let leader = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("leader").and_then(|l| l.as_str()).map(str::to_string));
            if leader.is_some() {
                return leader;
            }
        }
        None
    }
}

/// A server's Redis Cluster node id: 40 hex digits, the same on every server and every start.
pub fn node_id(config: &ClusterConfig, server: &str) -> String {
    let digest = Sha256::digest(format!("ferrocotta/{}/{server}", config.array_name).as_bytes());
    digest.iter().take(20).map(|b| format!("{b:02x}")).collect()
}
