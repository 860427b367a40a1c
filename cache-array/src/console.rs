//! What the cluster console shows of this server, and the gathering of every server's view.
//!
//! - [`Recorder`]: the last 15 minutes of per-second samples (ops by kind, errors, p50/p99
//!   latency, replication lag) and the last events (leader changes, session expiries, failed
//!   handshakes), bounded rings in memory. [`run_sampler`] fills it once a second.
//! - [`local_view`]: this server's facts (`GET /v1/console/local`).
//! - [`gather`]: every server's view through their admin ports (`GET /v1/console`), so the page
//!   opened on any one server shows the whole array; the page and `ferrocotta top` merge them.
//! - [`node_action`]: offline, online or clear sent on to an integration node's admin port with
//!   the token the operator gave (the array server holds no node token).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferrocotta::console::{
    ArrayView, CacheFacts, Event, EventLog, NodeMember, Sample, ServerEntry, ServerView, SessionFacts, EVENTS_KEPT,
    MEMBERS_CACHE_PREFIX, MEMBER_CLUSTERS_MAX, MEMBER_ENTRY_BYTES_MAX, SAMPLES_KEPT, SESSIONS_LISTED_MAX,
};
use ferrocotta::http::{request, Call};
use ferrocotta::protocol::{OpKind, Role};
use ferrocotta::tls::ClientTls;
use tokio_util::sync::CancellationToken;

use crate::metrics::{bucket_floor, Metrics, Totals, LATENCY_BUCKETS};
use crate::stripe::{now_ms, Stripe};

/// How often the sampler runs.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

/// Every this many samples the caches' entries and bytes are counted again (a walk over the
/// stripe's entries under the store's read lock).
pub const CACHE_FACTS_EVERY: u32 = 5;

/// Member entries listed per node cluster at most.
pub const MEMBERS_LISTED_MAX: usize = 1000;

/// Entries whose bytes one count walks at most, over all caches: a larger cache is shown with its
/// entry count alone, so that the walk (under the store's read lock, which applying the log
/// waits for) stays short.
pub const CACHE_BYTES_WALK_MAX: usize = 200_000;

/// Largest answer of a node to an action that is read (its error, when it refuses).
pub const NODE_ANSWER_BYTES_MAX: usize = 64 * 1024;

/// Deadline for one server's view when gathering.
pub const GATHER_TIMEOUT: Duration = Duration::from_millis(1500);

/// Deadline for an action sent on to a node.
pub const NODE_ACTION_TIMEOUT: Duration = Duration::from_secs(5);

/// The console's memory of one server.
pub struct Recorder {
    /// The last [`SAMPLES_KEPT`] seconds, oldest first.
    samples: Mutex<VecDeque<Kept>>,
    /// The last [`EVENTS_KEPT`] events.
    events: EventLog,
    /// Entries and bytes by cache, as last counted.
    caches: Mutex<BTreeMap<String, CacheFacts>>,
}

impl Recorder {
    /// An empty recorder for server `source`.
    pub fn new(source: &str) -> Recorder {
        Recorder {
            samples: Mutex::new(VecDeque::with_capacity(SAMPLES_KEPT)),
            events: EventLog::new(source, EVENTS_KEPT),
            caches: Mutex::new(BTreeMap::new()),
        }
    }

    /// Records an event (the oldest goes when [`EVENTS_KEPT`] are kept).
    pub fn event(&self, kind: &str, text: String) {
        self.events.record(kind, text);
    }

    /// Keeps a sample (the oldest goes when [`SAMPLES_KEPT`] are kept).
    pub fn push_sample(&self, sample: Kept) {
        let mut samples = self.samples.lock().expect("samples lock");
        if samples.len() == SAMPLES_KEPT {
            samples.pop_front();
        }
        samples.push_back(sample);
    }

    /// The samples kept, oldest first.
    pub fn samples(&self) -> Vec<Sample> {
        self.samples
            .lock()
            .expect("samples lock")
            .iter()
            .map(Kept::to_sample)
            .collect()
    }

    /// The events kept, oldest first.
    pub fn events(&self) -> Vec<Event> {
        self.events.to_vec()
    }
}

/// One second as the ring keeps it: the request kinds by index, with no name strings (a ring of
/// these is a fifth of one of [`Sample`]s); turned into a [`Sample`] when served.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Kept {
    /// End of the second, ms since the epoch.
    pub t_ms: u64,
    /// (index in [`OpKind::ALL`], requests) of the kinds with any.
    pub ops: Box<[(u8, u32)]>,
    /// Of those, answered with an error.
    pub errors: u32,
    /// Median latency, µs.
    pub p50_us: u32,
    /// 99th percentile, µs.
    pub p99_us: u32,
    /// Entries the slowest mirror is behind, on an active.
    pub replication_lag: Option<u64>,
}

impl Kept {
    /// The sample as the console documents carry it.
    pub fn to_sample(&self) -> Sample {
        Sample {
            t_ms: self.t_ms,
            ops: self
                .ops
                .iter()
                .filter_map(|(i, n)| OpKind::ALL.get(*i as usize).map(|k| (k.name().to_string(), *n)))
                .collect(),
            errors: self.errors,
            p50_us: self.p50_us,
            p99_us: self.p99_us,
            replication_lag: self.replication_lag,
        }
    }
}

/// The latency below which `q` of the requests in `counts` fell (the bucket's floor), in µs.
fn percentile(counts: &[u64; LATENCY_BUCKETS], q: f64) -> u32 {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return 0;
    }
    let rank = ((total as f64) * q).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, n) in counts.iter().enumerate() {
        seen += n;
        if seen >= rank {
            return bucket_floor(i).min(u32::MAX as u64) as u32;
        }
    }
    0
}

/// One sample from two readings of the counters a second apart.
pub fn sample_between(before: &Totals, after: &Totals, t_ms: u64, replication_lag: Option<u64>) -> Kept {
    let ops = (0..OpKind::ALL.len())
        .filter_map(|i| {
            let n = after.ops[i].saturating_sub(before.ops[i]);
            (n > 0).then_some((i as u8, n.min(u32::MAX as u64) as u32))
        })
        .collect();
    let latency: [u64; LATENCY_BUCKETS] = std::array::from_fn(|i| after.latency[i].saturating_sub(before.latency[i]));
    Kept {
        t_ms,
        ops,
        errors: after.errors.saturating_sub(before.errors).min(u32::MAX as u64) as u32,
        p50_us: percentile(&latency, 0.50),
        p99_us: percentile(&latency, 0.99),
        replication_lag,
    }
}

/// Log entries the slowest mirror is behind, on an active; None on a mirror.
fn replication_lag(stripe: &Stripe) -> Option<u64> {
    let m = stripe.raft().metrics();
    let m = m.borrow();
    let last = m.last_log_index.unwrap_or(0);
    m.replication.as_ref().map(|r| {
        r.iter()
            .filter(|(id, _)| **id != stripe.position().node_id())
            // A mirror whose position is not known yet (just after an election) is left out
            // rather than counted as the whole log behind.
            .filter_map(|(_, matched)| matched.map(|l| last.saturating_sub(l.index)))
            .max()
            .unwrap_or(0)
    })
}

/// Counts entries by cache, and bytes of the caches that fit in [`CACHE_BYTES_WALK_MAX`] walked
/// entries (smallest first).
fn cache_facts(stripe: &Stripe) -> BTreeMap<String, CacheFacts> {
    stripe.shared().read(|d| {
        let mut by_size: Vec<(&String, &crate::store::Cache)> = d
            .store
            .caches
            .iter()
            .filter(|(n, _)| !crate::roster::is_internal_cache(n))
            .collect();
        by_size.sort_by_key(|(_, c)| c.entries.len());
        let mut budget = CACHE_BYTES_WALK_MAX;
        by_size
            .into_iter()
            .map(|(name, c)| {
                let bytes = (c.entries.len() <= budget).then(|| {
                    budget -= c.entries.len();
                    c.entries.iter().map(|(k, e)| (k.len() + e.value.len()) as u64).sum()
                });
                (
                    name.clone(),
                    CacheFacts {
                        entries: c.entries.len() as u64,
                        bytes,
                    },
                )
            })
            .collect()
    })
}

/// Takes a sample every second until `shutdown` (leader changes are noted where the server
/// already watches them, `server::spawn_leader_log`).
pub async fn run_sampler(
    recorder: Arc<Recorder>,
    stripe: Arc<Stripe>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut before = metrics.totals();
    let mut n: u32 = 0;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let after = metrics.totals();
        recorder.push_sample(sample_between(&before, &after, now_ms(), replication_lag(&stripe)));
        before = after;

        if n.is_multiple_of(CACHE_FACTS_EVERY) {
            // A walk of up to CACHE_BYTES_WALK_MAX entries: off the runtime's workers.
            let walker = stripe.clone();
            if let Ok(facts) = tokio::task::spawn_blocking(move || cache_facts(&walker)).await {
                *recorder.caches.lock().expect("caches lock") = facts;
            }
        }
        n = n.wrapping_add(1);
    }
}

/// The first 16 hex digits of the SHA-256 of the config document.
pub fn config_digest(config_toml: &str) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(config_toml.as_bytes());
    d.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// A member entry's key and value as stored.
type RawEntry = (Vec<u8>, bytes::Bytes);

/// This server's facts for the console.
pub fn local_view(stripe: &Stripe, recorder: &Recorder, metrics: &Metrics, config_digest: &str) -> ServerView {
    let m = stripe.snapshot_metrics();
    let active = m.role == Role::Active;
    let matched = {
        let raft = stripe.raft().metrics();
        let raft = raft.borrow();
        raft.replication
            .iter()
            .flatten()
            .filter(|(id, _)| **id != stripe.position().node_id())
            .map(|(id, l)| {
                (
                    stripe.name_of(*id).unwrap_or_else(|| format!("node {id}")),
                    l.map(|l| l.index),
                )
            })
            .collect()
    };
    let (sessions, session_count, raw_members) = stripe.shared().read(|d| {
        let sessions: Vec<SessionFacts> = d
            .store
            .sessions
            .iter()
            .take(SESSIONS_LISTED_MAX)
            .map(|(id, s)| SessionFacts {
                id: *id,
                client_name: s.client_name.clone(),
                opened_ms: s.opened_ms,
            })
            .collect();
        // Only copied under the lock (values are reference-counted); read after it.
        let mut raw: Vec<(String, Vec<RawEntry>)> = Vec::new();
        if active {
            let now = now_ms();
            for (name, cache) in d.store.caches.range(MEMBERS_CACHE_PREFIX.to_string()..) {
                let Some(cluster) = name.strip_prefix(MEMBERS_CACHE_PREFIX) else {
                    break;
                };
                if raw.len() == MEMBER_CLUSTERS_MAX {
                    break;
                }
                let entries: Vec<RawEntry> = cache
                    .entries
                    .iter()
                    .filter(|(_, e)| !e.expired(now) && e.value.len() <= MEMBER_ENTRY_BYTES_MAX)
                    .take(MEMBERS_LISTED_MAX)
                    .map(|(k, e)| (k.clone(), e.value.clone()))
                    .collect();
                raw.push((cluster.to_string(), entries));
            }
        }
        (sessions, d.store.sessions.len() as u64, raw)
    });
    let members: BTreeMap<String, Vec<NodeMember>> = raw_members
        .into_iter()
        .map(|(cluster, entries)| {
            let nodes: Vec<NodeMember> = entries.iter().filter_map(|(k, v)| NodeMember::read(k, v)).collect();
            (ferrocotta::console::clean(&cluster), nodes)
        })
        .filter(|(_, nodes)| !nodes.is_empty())
        .collect();
    ServerView {
        name: stripe.name().to_string(),
        stripe: stripe.position().stripe,
        role: if active { "active" } else { "mirror" }.to_string(),
        term: m.term,
        leader: m.leader,
        last_log_index: m.last_log_index,
        applied_index: m.applied_index,
        matched,
        config_digest: config_digest.to_string(),
        client_connections: metrics.client_connections.load(std::sync::atomic::Ordering::Relaxed),
        sessions,
        session_count,
        caches: recorder.caches.lock().expect("caches lock").clone(),
        members,
        samples: recorder.samples(),
        events: recorder.events(),
        now_ms: now_ms(),
    }
}

/// Every server's view: this one's at once, the others' through their admin ports, all at the
/// same time, each within [`GATHER_TIMEOUT`].
pub async fn gather(stripe: &Stripe, me: ServerView, tls: Option<Arc<ClientTls>>) -> ArrayView {
    let config = stripe.config().clone();
    let servers = config
        .stripes
        .iter()
        .enumerate()
        .flat_map(|(s, st)| st.servers.iter().map(move |server| (s, server)));
    let entries = futures::future::join_all(servers.map(|(s, server)| {
        let (me, tls) = (&me, tls.as_deref());
        async move {
            let admin = server.admin_addr();
            let (view, error) = if server.name == me.name {
                (Some(me.clone()), None)
            } else {
                match request(&admin, tls, Call::get("/v1/console/local", GATHER_TIMEOUT)).await {
                    Ok((200, body)) => match serde_json::from_slice::<ServerView>(&body) {
                        Ok(v) => (Some(v), None),
                        Err(e) => (None, Some(format!("unreadable answer: {e}"))),
                    },
                    Ok((code, _)) => (None, Some(format!("HTTP {code}"))),
                    Err(e) => (None, Some(e.to_string())),
                }
            };
            ServerEntry {
                name: server.name.clone(),
                stripe: s,
                admin,
                view,
                error,
            }
        }
    }))
    .await;
    ArrayView {
        array_name: config.array_name.clone(),
        stripes: config.stripes.iter().map(|s| s.name.clone()).collect(),
        gathered_by: me.name,
        servers: entries,
    }
}

/// What an operator may ask of a node through the console.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeAction {
    /// `POST /admin/offline`.
    Offline,
    /// `POST /admin/online`.
    Online,
    /// `POST /admin/cluster/clear` (the node's member list).
    Clear,
}

impl NodeAction {
    /// The action named in the console's URL.
    pub fn parse(s: &str) -> Option<NodeAction> {
        match s {
            "offline" => Some(NodeAction::Offline),
            "online" => Some(NodeAction::Online),
            "clear" => Some(NodeAction::Clear),
            _ => None,
        }
    }

    /// Its name in the console's URL.
    pub fn name(self) -> &'static str {
        match self {
            NodeAction::Offline => "offline",
            NodeAction::Online => "online",
            NodeAction::Clear => "clear",
        }
    }

    fn path(self) -> &'static str {
        match self {
            NodeAction::Offline => "/admin/offline",
            NodeAction::Online => "/admin/online",
            NodeAction::Clear => "/admin/cluster/clear",
        }
    }
}

/// Why a node action was not carried out.
#[derive(Debug, thiserror::Error)]
pub enum NodeActionError {
    /// No active lists that node.
    #[error("no node `{name}` in cluster `{cluster}` is in the member list")]
    UnknownNode {
        /// The cluster asked for.
        cluster: String,
        /// The node asked for.
        name: String,
    },
    /// Its member entry gives no admin address.
    #[error("node `{0}` gives no admin address in its member entry")]
    NoAdminAddress(String),
    /// The node did not answer.
    #[error(transparent)]
    Unreachable(#[from] ferrocotta::http::CallError),
}

/// What a node answered to an action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAnswer {
    /// Its status code.
    pub status: u16,
    /// Its error code and message when it refused (only those two fields of its answer, each
    /// [`clean`](ferrocotta::console::clean)ed: nothing else a reachable address says comes back
    /// through the console).
    pub error: Option<(String, String)>,
}

/// Sends `action` to node `name` of `cluster` at the admin address its member entry gives, with
/// the operator's `token`. The node checks the token.
pub async fn node_action(
    view: &ArrayView,
    cluster: &str,
    name: &str,
    action: NodeAction,
    token: &str,
    tls: Option<&ClientTls>,
) -> Result<NodeAnswer, NodeActionError> {
    let entry = view.member(cluster, name).ok_or_else(|| NodeActionError::UnknownNode {
        cluster: cluster.to_string(),
        name: name.to_string(),
    })?;
    let admin = entry
        .admin
        .clone()
        .ok_or_else(|| NodeActionError::NoAdminAddress(name.to_string()))?;
    // A node's ports speak TLS when its entry says so; the array's CA must then have signed its
    // certificate (as `ferrocotta up --tls` does).
    let tls = if entry.tls { tls } else { None };
    let call = Call {
        method: hyper::Method::POST,
        path: action.path(),
        headers: vec![("authorization", format!("Bearer {token}"))],
        body: Vec::new(),
        body_max: NODE_ANSWER_BYTES_MAX,
        timeout: NODE_ACTION_TIMEOUT,
    };
    let (status, body) = request(&admin, tls, call).await?;
    let error = (!(200..300).contains(&status)).then(|| {
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let field = |f: &str| ferrocotta::console::clean(v["error"][f].as_str().unwrap_or(""));
        (field("code"), field("message"))
    });
    Ok(NodeAnswer { status, error })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::bucket_of;

    #[test]
    fn percentiles_come_from_the_buckets_of_the_second() {
        let mut counts = [0u64; LATENCY_BUCKETS];
        assert_eq!(percentile(&counts, 0.5), 0, "no requests, no latency");
        for us in 1..=100u64 {
            counts[bucket_of(us * 100)] += 1;
        }
        let p50 = percentile(&counts, 0.5) as u64;
        let p99 = percentile(&counts, 0.99) as u64;
        assert!((4000..=5000).contains(&p50), "{p50}");
        assert!((7900..=9900).contains(&p99), "{p99}");
    }

    #[test]
    fn a_sample_is_the_difference_of_two_readings() {
        let zero = Totals {
            ops: [0; crate::metrics::KINDS],
            errors: 0,
            latency: [0; LATENCY_BUCKETS],
        };
        let mut after = zero.clone();
        after.ops[OpKind::Put as usize] = 7;
        after.errors = 2;
        after.latency[bucket_of(300)] = 7;
        let s = sample_between(&zero, &after, 42, Some(3)).to_sample();
        assert_eq!(s.ops.get(OpKind::Put.name()), Some(&7));
        assert_eq!(s.ops.len(), 1, "kinds with no requests are left out");
        assert_eq!((s.errors, s.t_ms, s.replication_lag), (2, 42, Some(3)));
        assert_eq!(s.p50_us, bucket_floor(bucket_of(300)) as u32);
    }

    #[test]
    fn the_rings_keep_the_last() {
        let r = Recorder::new("a1");
        for i in 0..(EVENTS_KEPT + 10) {
            r.event("handshake_failed", format!("{i}"));
        }
        let events = r.events();
        assert_eq!(events.len(), EVENTS_KEPT);
        assert_eq!(events[0].text, "10");
        for i in 0..(SAMPLES_KEPT + 5) {
            r.push_sample(Kept {
                t_ms: i as u64,
                ..Kept::default()
            });
        }
        let samples = r.samples();
        assert_eq!(samples.len(), SAMPLES_KEPT);
        assert_eq!(samples[0].t_ms, 5);
    }
}
