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

/// The last events of one source, oldest dropped first: an array server's and a node's.
#[derive(Debug)]
pub struct EventLog {
    source: String,
    kept: usize,
    events: std::sync::Mutex<std::collections::VecDeque<Event>>,
}

impl EventLog {
    /// An empty log of `source`'s events keeping the last `kept`.
    pub fn new(source: &str, kept: usize) -> EventLog {
        EventLog {
            source: source.to_string(),
            kept,
            events: std::sync::Mutex::new(std::collections::VecDeque::with_capacity(kept)),
        }
    }

    /// Records an event now (by the wall clock, ms since the epoch).
    pub fn record(&self, kind: &str, text: String) {
        let t_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let mut events = self.events.lock().expect("events lock");
        if events.len() == self.kept {
            events.pop_front();
        }
        events.push_back(Event {
            t_ms,
            source: self.source.clone(),
            kind: kind.to_string(),
            text,
        });
    }

    /// The events kept, oldest first.
    pub fn to_vec(&self) -> Vec<Event> {
        self.events.lock().expect("events lock").iter().cloned().collect()
    }
}

/// One cache on one stripe.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheFacts {
    /// Entries (expired ones count until the sweep removes them).
    pub entries: u64,
    /// Bytes of keys and values; None when the cache was too large to count at this sample
    /// (counting walks its entries under the store's lock).
    pub bytes: Option<u64>,
}

/// An integration node as its member entry describes it: only the fields the console shows, read
/// from what the node wrote (entries that do not read as one are left out). Not its instance
/// identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeMember {
    /// Its logical name (also the entry's key).
    pub logical_name: String,
    /// Its service address.
    #[serde(default)]
    pub service: String,
    /// Its admin address, where the console sends node actions.
    #[serde(default)]
    pub admin: Option<String>,
    /// Whether its ports speak TLS.
    #[serde(default)]
    pub tls: bool,
    /// Its software version.
    #[serde(default)]
    pub version: String,
    /// When it started, ms since the epoch.
    #[serde(default)]
    pub start_time_ms: u64,
    /// `online` or `offline`.
    #[serde(default)]
    pub state: String,
    /// Rejoins so far.
    #[serde(default)]
    pub rejoins: u64,
    /// Nonstop timeouts so far.
    #[serde(default)]
    pub nonstop_timeouts: u64,
    /// Its last events.
    #[serde(default)]
    pub events: Vec<Event>,
}

/// Largest member entry the console reads (a node's is well under 4 KiB).
pub const MEMBER_ENTRY_BYTES_MAX: usize = 16 * 1024;

/// Events of one member entry the console keeps.
pub const MEMBER_EVENTS_MAX: usize = 8;

/// Longest text of a field shown by the console (longer ones are cut).
pub const FIELD_CHARS_MAX: usize = 300;

/// Cuts `s` to [`FIELD_CHARS_MAX`] characters and replaces control characters (a terminal's
/// escape sequences among them) with U+FFFD: what a console shows of a value others wrote.
pub fn clean(s: &str) -> String {
    s.chars()
        .take(FIELD_CHARS_MAX)
        .map(|c| if c.is_control() { '\u{FFFD}' } else { c })
        .collect()
}

impl NodeMember {
    /// The member entry stored under `key`, if it reads as one whose name is its key; every text
    /// field [`clean`]ed, events bounded.
    pub fn read(key: &[u8], value: &[u8]) -> Option<NodeMember> {
        if value.len() > MEMBER_ENTRY_BYTES_MAX {
            return None;
        }
        let mut m: NodeMember = serde_json::from_slice(value).ok()?;
        if m.logical_name.as_bytes() != key {
            return None;
        }
        m.logical_name = clean(&m.logical_name);
        m.service = clean(&m.service);
        m.admin = m.admin.as_deref().map(clean);
        m.version = clean(&m.version);
        m.state = clean(&m.state);
        let skip = m.events.len().saturating_sub(MEMBER_EVENTS_MAX);
        m.events = m
            .events
            .into_iter()
            .skip(skip)
            .map(|e| Event {
                t_ms: e.t_ms,
                source: clean(&e.source),
                kind: clean(&e.kind),
                text: clean(&e.text),
            })
            .collect();
        Some(m)
    }
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
    /// Integration nodes whose member entries this server holds, by cluster (at most
    /// [`MEMBER_CLUSTERS_MAX`] clusters). Only an active lists them (a mirror's copy may lag).
    #[serde(default)]
    pub members: BTreeMap<String, Vec<NodeMember>>,
    /// The last [`SAMPLES_KEPT`] seconds, oldest first.
    pub samples: Vec<Sample>,
    /// The last [`EVENTS_KEPT`] events, oldest first.
    pub events: Vec<Event>,
    /// This server's clock when it answered, ms since the epoch.
    pub now_ms: u64,
}

/// Node clusters a server lists the members of at most.
pub const MEMBER_CLUSTERS_MAX: usize = 64;

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

    /// Every node the stripes' actives list: (cluster, member), by cluster and name.
    pub fn members(&self) -> Vec<(String, NodeMember)> {
        let mut out = Vec::new();
        for stripe in 0..self.stripes.len() {
            if let Some(active) = self.active_of(stripe) {
                for (cluster, entries) in &active.members {
                    out.extend(entries.iter().map(|e| (cluster.clone(), e.clone())));
                }
            }
        }
        out.sort_by(|a, b| (&a.0, &a.1.logical_name).cmp(&(&b.0, &b.1.logical_name)));
        out
    }

    /// Node `name` of `cluster`, if an active lists it (a name is a key: one entry at most).
    pub fn member(&self, cluster: &str, name: &str) -> Option<NodeMember> {
        self.members()
            .into_iter()
            .find(|(c, m)| c == cluster && m.logical_name == name)
            .map(|(_, m)| m)
    }
}

/// The cache that holds a node cluster's member list (the integration node's naming).
pub const MEMBERS_CACHE_PREFIX: &str = "ferrocotta.node.members.";

/// The cache that holds a node cluster's sessions.
pub const SESSIONS_CACHE_PREFIX: &str = "ferrocotta.node.sessions.";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_entries_are_read_as_the_console_shows_them_or_not_at_all() {
        let entry = br#"{"logical_name":"n1","instance":"ab12","service":"10.0.0.5:5555","admin":"10.0.0.5:9999","version":"0.1.0","start_time_ms":7,"state":"online"}"#;
        let m = NodeMember::read(b"n1", entry).unwrap();
        assert_eq!(
            (m.logical_name.as_str(), m.admin.as_deref()),
            ("n1", Some("10.0.0.5:9999"))
        );
        assert_eq!((m.rejoins, m.tls, m.events.len()), (0, false, 0));
        assert!(
            !serde_json::to_string(&m).unwrap().contains("ab12"),
            "no instance identity"
        );

        assert!(
            NodeMember::read(b"other", entry).is_none(),
            "an entry whose name is not its key"
        );
        for hostile in [
            &b"null"[..],
            b"[]",
            b"{}",
            br#"{"logical_name":5}"#,
            br#"{"logical_name":"n1","events":5}"#,
        ] {
            assert!(
                NodeMember::read(b"n1", hostile).is_none(),
                "{}",
                String::from_utf8_lossy(hostile)
            );
        }
        let big = format!(
            r#"{{"logical_name":"n1","service":"{}"}}"#,
            "x".repeat(MEMBER_ENTRY_BYTES_MAX)
        );
        assert!(NodeMember::read(b"n1", big.as_bytes()).is_none(), "too large");

        let events: Vec<String> = (0..20)
            .map(|i| format!(r#"{{"t_ms":{i},"source":"n1","kind":"rejoined","text":"\u001b[2J{i}"}}"#))
            .collect();
        let noisy = format!(
            r#"{{"logical_name":"n1","state":"on\u001bline","events":[{}]}}"#,
            events.join(",")
        );
        let m = NodeMember::read(b"n1", noisy.as_bytes()).unwrap();
        assert_eq!(m.events.len(), MEMBER_EVENTS_MAX);
        assert_eq!(m.events[0].t_ms, 12, "the last ones are kept");
        assert!(!m.state.contains('\u{1b}') && m.events.iter().all(|e| !e.text.contains('\u{1b}')));
    }

    #[test]
    fn clean_cuts_and_defuses() {
        assert_eq!(clean("a\u{1b}[31mb\n"), "a\u{FFFD}[31mb\u{FFFD}");
        assert_eq!(clean(&"é".repeat(1000)).chars().count(), FIELD_CHARS_MAX);
    }
}
