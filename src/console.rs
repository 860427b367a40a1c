//! The cluster console's documents: what each array server tells about itself
//! (`GET /v1/console/local` on its admin port) and the whole array as one server gathers it
//! (`GET /v1/console`). The console page and `ferrocotta top` read them; both merge the servers'
//! samples themselves. Field names are a stable interface (SPEC 9).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Seconds of samples a server keeps (one per second): the console's 15 minutes.
pub const SAMPLES_KEPT: usize = 900;

/// Events a server keeps, oldest dropped first.
pub const EVENTS_KEPT: usize = 256;

/// One second of a server's requests.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// End of the second, ms since the epoch (the server's clock).
    pub t_ms: u64,
    /// Requests served in that second by kind (kinds with none are left out).
    pub ops: BTreeMap<String, u32>,
    /// Of those, answered with an error.
    pub errors: u32,
    /// Median request latency in that second, microseconds (0 with no requests).
    pub p50_us: u32,
    /// 99th percentile, microseconds.
    pub p99_us: u32,
    /// On an active: how many log entries its slowest mirror is behind. None on a mirror.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication_lag: Option<u64>,
}

/// Something an operator wants to see happen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// When, ms since the epoch (the clock of whoever recorded it).
    pub t_ms: u64,
    /// Who recorded it (a server or a node name).
    pub source: String,
    /// Stable kind: `leader_change`, `session_expired`, `handshake_failed`, `rejoined`,
    /// `nonstop_timeout`, `offline`, `online`.
    pub kind: String,
    /// What happened, for people.
    pub text: String,
}

/// One cache on one stripe.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheFacts {
    /// Entries (expired ones count until the sweep removes them).
    pub entries: u64,
    /// Bytes of keys and values.
    pub bytes: u64,
}

/// One client session on a stripe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionFacts {
    /// Its id on the stripe.
    pub id: u64,
    /// The name its client gave.
    pub client_name: String,
    /// When it was opened, ms since the epoch.
    pub opened_ms: u64,
}

/// What one array server tells about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerView {
    /// Server name.
    pub name: String,
    /// Stripe index.
    pub stripe: usize,
    /// `active` or `mirror`.
    pub role: String,
    /// Current term.
    pub term: u64,
    /// The active this server knows.
    pub leader: Option<String>,
    /// Last log index.
    pub last_log_index: u64,
    /// Last applied index.
    pub applied_index: u64,
    /// On an active: each mirror's last replicated index (None: not known yet).
    #[serde(default)]
    pub matched: BTreeMap<String, Option<u64>>,
    /// The config document this server runs, as the first 16 hex digits of its SHA-256: equal on
    /// every server of an array that runs one document.
    pub config_digest: String,
    /// Client connections open now.
    pub client_connections: u64,
    /// Live client sessions on the stripe (at most [`SESSIONS_LISTED_MAX`] listed).
    pub sessions: Vec<SessionFacts>,
    /// Live client sessions in all.
    pub session_count: u64,
    /// Caches on this stripe, computed at most every few seconds.
    pub caches: BTreeMap<String, CacheFacts>,
    /// Integration node member entries this server holds, as the nodes wrote them (JSON), by
    /// cluster. Only an active lists them (a mirror's copy may lag).
    #[serde(default)]
    pub members: BTreeMap<String, Vec<serde_json::Value>>,
    /// The last [`SAMPLES_KEPT`] seconds, oldest first.
    pub samples: Vec<Sample>,
    /// The last [`EVENTS_KEPT`] events, oldest first.
    pub events: Vec<Event>,
    /// This server's clock when it answered, ms since the epoch.
    pub now_ms: u64,
}

/// Client sessions a server lists at most (the count is always exact).
pub const SESSIONS_LISTED_MAX: usize = 200;

/// One server as the gathering server saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerEntry {
    /// Server name (from the config).
    pub name: String,
    /// Stripe index (from the config).
    pub stripe: usize,
    /// Its admin address.
    pub admin: String,
    /// What it said, or None when it did not answer.
    pub view: Option<ServerView>,
    /// Why it did not answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The whole array, gathered by one server (`GET /v1/console`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArrayView {
    /// The array's name.
    pub array_name: String,
    /// Stripe names, by index.
    pub stripes: Vec<String>,
    /// The server that gathered this.
    pub gathered_by: String,
    /// Every server of the config, in config order.
    pub servers: Vec<ServerEntry>,
}

impl ArrayView {
    /// The active of `stripe` that answered, if any.
    pub fn active_of(&self, stripe: usize) -> Option<&ServerView> {
        self.servers
            .iter()
            .filter_map(|s| s.view.as_ref())
            .filter(|v| v.stripe == stripe && v.role == "active")
            .max_by_key(|v| v.term)
    }

    /// Every member entry the stripes' actives hold: (cluster, entry).
    pub fn members(&self) -> Vec<(String, serde_json::Value)> {
        let mut out = Vec::new();
        for stripe in 0..self.stripes.len() {
            if let Some(active) = self.active_of(stripe) {
                for (cluster, entries) in &active.members {
                    out.extend(entries.iter().map(|e| (cluster.clone(), e.clone())));
                }
            }
        }
        out.sort_by(|a, b| (&a.0, a.1["logical_name"].as_str()).cmp(&(&b.0, b.1["logical_name"].as_str())));
        out
    }

    /// The member entry of node `name` in `cluster`, if an active holds one.
    pub fn member(&self, cluster: &str, name: &str) -> Option<serde_json::Value> {
        self.members()
            .into_iter()
            .find(|(c, e)| c == cluster && e["logical_name"].as_str() == Some(name))
            .map(|(_, e)| e)
    }
}

/// The cache that holds a node cluster's member list (the integration node's naming).
pub const MEMBERS_CACHE_PREFIX: &str = "ferrocotta.node.members.";

/// The cache that holds a node cluster's sessions.
pub const SESSIONS_CACHE_PREFIX: &str = "ferrocotta.node.sessions.";
