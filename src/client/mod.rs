//! `ArrayClient`: bootstrap from a URL list, routing to stripes, failover.
//!
//! Here: bootstrap and the connections to the servers of the config. Beside it: `routing`
//! (`execute`, with the leader hints), `operations` (the cache operations, with one fan-out helper
//! for requests that span stripes), `session` (sessions, keep-alives, locks), `nonstop` (timeout
//! behaviours), `settings` and `error`. Requests travel on [`crate::pipelined`] connections,
//! which the peers' Raft calls use too.
//!
//! Bootstrap (SPEC 3.1): the URLs are tried in order until one answers the handshake and hands over
//! the configuration document; from then on the client talks to the servers that the document lists,
//! not to the URL list. Routing (SPEC 3.2): each key hashes to a slot and so to a stripe; requests go
//! to the stripe's active, `NotLeader` answers redirect, a changed document replaces the old one, and
//! each server gets one pipelined connection shared by every caller.
//!
//! Retries are bounded by each request's deadline. A write whose connection broke after it was sent
//! is never retried blindly: it may have been applied, so the caller gets
//! [`ClientError::Indeterminate`] and decides.

mod error;
mod nonstop;
mod operations;
mod routing;
mod session;
mod settings;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::time::Instant;

pub use crate::pipelined::{CallError, Connection};
pub use error::ClientError;
pub use nonstop::{CacheHandle, NonstopSettings, TimeoutBehavior, WriteOutcome, LOCAL_COPIES_MAX};
pub use session::{ClientEvent, ConnectionState, LockHandle, LockWait};
pub use settings::ClientSettings;

use crate::config::ClusterConfig;
use crate::handshake::{self, ClientIdentity, HandshakeError};
use crate::protocol::{Op, Reply, Role};
use error::list_failures;
use operations::unexpected;
use routing::{Routing, ServerHandle};

/// Pause between rounds over a stripe's servers grows by this much each round (to
/// [`ROUND_BACKOFF_MAX`]).
pub const ROUND_BACKOFF_STEP: Duration = Duration::from_millis(20);

/// Keys asked for per page when following every page.
pub const ALL_KEYS_PAGE: u32 = 1000;

/// Longest the client asks a stripe which server is its active.
pub const ACTIVE_LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest a single attempt to connect to one server may take (capped further by the request's
/// own deadline), for a URL of the list as for a server of the config: a server that does not
/// answer in this time is skipped for now, so one hung server never holds up a client.
pub const SERVER_CONNECT_ATTEMPT_MAX: Duration = Duration::from_secs(2);

/// Longest a request waits for a connection to one server before it tries the next (the dial
/// goes on in the background, up to [`SERVER_CONNECT_ATTEMPT_MAX`]): a silent server, paused or
/// cut off, costs a request this much, not a whole attempt.
pub const CONNECT_STAGGER: Duration = Duration::from_millis(250);

/// Pause between rounds once every server of a stripe has been tried without success.
pub const ROUND_BACKOFF_MAX: Duration = Duration::from_millis(100);

/// A key and its value.
pub type Entry = (Vec<u8>, Vec<u8>);

/// A cursor for paging through the keys of a cache across stripes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeysCursor {
    /// The stripe the next page comes from.
    pub stripe: usize,
    /// The last key returned from that stripe.
    pub after: Option<Vec<u8>>,
}

/// One page of keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeysPage {
    /// Keys in byte order within a stripe.
    pub keys: Vec<Vec<u8>>,
    /// Where the next page starts; `None` when this was the last.
    pub next: Option<KeysCursor>,
}

/// What one server said about itself, for status tooling.
#[derive(Debug, Clone)]
pub struct ServerProbe {
    /// Server name from the config.
    pub name: String,
    /// Stripe index.
    pub stripe: usize,
    /// Client address.
    pub addr: String,
    /// The answer, or why there was none.
    pub result: Result<Reply, String>,
    /// The configuration generation of its stripe the server goes by, when it answered.
    pub generation: Option<u64>,
}

/// The client of a ferrocotta array. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct ArrayClient {
    inner: Arc<Inner>,
}

/// When a stripe's servers were asked which of them is the active, and those that said so.
type ActivesAsked = (Instant, Vec<String>);

struct Inner {
    /// Settings given at connect.
    settings: ClientSettings,
    /// What the handshake states.
    identity: ClientIdentity,
    /// Current routing state, replaced when the config changes.
    routing: RwLock<Arc<Routing>>,
    /// Name of the last known active of each stripe.
    leaders: Mutex<Vec<Option<String>>>,
    /// Rotates the starting server of eventual reads and leader searches.
    rotation: std::sync::atomic::AtomicUsize,
    /// The URL that handed over the config, and the name of the server behind it.
    config_source: (String, String),
    /// Sessions, connection state and events.
    sessions: session::SessionState,
    /// Local copies for the `local_reads` nonstop behaviours.
    local: nonstop::LocalCopies,
    /// Operations of nonstop caches whose timeout behaviour applied.
    nonstop_timeouts: std::sync::atomic::AtomicU64,
    /// Per stripe and silent server: when the stripe's other servers were last asked which of
    /// them is the active, and who said so (shared by every request waiting on that server, so
    /// they ask once between them).
    actives_asked: Mutex<HashMap<(usize, String), ActivesAsked>>,
    /// Per stripe: the newer generation a server named, and when the document was last
    /// downloaded again for it (at most once per [`REFRESH_AGAIN_AFTER`] per generation, so a
    /// document that cannot be taken never costs a handshake per request).
    refreshed: Mutex<HashMap<usize, (u64, Instant)>>,
    /// Held while every stripe's document is downloaded ([`ArrayClient::refresh_everywhere`]).
    moved_refresh: tokio::sync::Mutex<()>,
    /// When that was last done.
    moved_refreshed: Mutex<Option<Instant>>,
}

/// How long after downloading the document again for a generation it is downloaded again for
/// the same one (when the first download did not bring it).
const REFRESH_AGAIN_AFTER: Duration = Duration::from_secs(1);

/// How often a client downloads every stripe's document when servers say a key is not theirs.
const MOVED_REFRESH_EVERY: Duration = Duration::from_millis(50);

impl ArrayClient {
    /// Bootstraps from the URL list (SPEC 3.1) and connects to the servers of the config.
    pub async fn connect(settings: ClientSettings) -> Result<ArrayClient, ClientError> {
        let client = Self::bootstrap(settings).await?;
        client.connect_to_servers().await?;
        client.start_sessions().await?;
        Ok(client)
    }

    /// Only the first half of [`ArrayClient::connect`]: downloads the config from the URL list, and
    /// connects to the other servers lazily, on first use. Status tools use this to report on an
    /// array whose servers are partly down.
    pub async fn bootstrap(settings: ClientSettings) -> Result<ArrayClient, ClientError> {
        let identity = settings.identity();
        let (url, mut framed, welcome) = download_config(&settings, &identity).await?;
        let config_toml = welcome.config_toml.clone();
        let config = ClusterConfig::parse(&config_toml)
            .map_err(|e| ClientError::Invalid(format!("the array sent a config this client cannot read: {e}")))?;
        framed
            .codec_mut()
            .set_max_frame_length(config.limits.max_frame_bytes as usize);
        let first = Connection::start(framed, welcome, Some(idle_ping_interval(&config)));
        tracing::info!(
            event = "client.config_downloaded",
            array = %config.array_name,
            from = %first.welcome.server_name,
            stripes = config.stripes.len()
        );
        let stripes = config.stripes.len();
        let first_name = first.welcome.server_name.clone();
        let routing = Routing::new(Arc::new(config), config_toml, None, &settings.address_map);
        if let Some(h) = routing.servers.get(&first.welcome.server_name) {
            *h.conn.try_lock().expect("fresh handle") = Some(first);
        }
        let client = ArrayClient {
            inner: Arc::new(Inner {
                settings,
                identity,
                routing: RwLock::new(Arc::new(routing)),
                leaders: Mutex::new(vec![None; stripes]),
                rotation: std::sync::atomic::AtomicUsize::new(rand::random::<u16>() as usize),
                config_source: (url, first_name),
                sessions: session::SessionState::new(stripes),
                local: nonstop::LocalCopies::default(),
                nonstop_timeouts: std::sync::atomic::AtomicU64::new(0),
                actives_asked: Mutex::new(HashMap::new()),
                refreshed: Mutex::new(HashMap::new()),
                moved_refresh: tokio::sync::Mutex::new(()),
                moved_refreshed: Mutex::new(None),
            }),
        };
        Ok(client)
    }

    /// Operations of nonstop caches whose timeout behaviour applied so far (the array did not
    /// answer in time, or the client knew it was disconnected).
    pub fn nonstop_timeouts(&self) -> u64 {
        self.inner.nonstop_timeouts.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The configuration document in use.
    pub fn config(&self) -> Arc<ClusterConfig> {
        self.routing().config.clone()
    }

    /// The URL of the list that handed over the config, and the name of the server behind it.
    pub fn config_source(&self) -> (&str, &str) {
        (&self.inner.config_source.0, &self.inner.config_source.1)
    }

    /// The settings the client was built with.
    pub fn settings(&self) -> &ClientSettings {
        &self.inner.settings
    }

    fn routing(&self) -> Arc<Routing> {
        self.inner.routing.read().expect("routing lock").clone()
    }

    /// Waits until every stripe has at least one reachable server, retrying every
    /// `reconnect_wait_interval`, at most `max_connect_retries` times when set.
    async fn connect_to_servers(&self) -> Result<(), ClientError> {
        let mut retries = 0u32;
        loop {
            let routing = self.routing();
            let mut failures = Vec::new();
            let mut all = true;
            for names in &routing.stripe_servers {
                // All of the stripe's servers at once: the first that answers will do, and a
                // silent one does not hold up the others.
                let mut dials: futures::stream::FuturesUnordered<_> = names
                    .iter()
                    .map(|name| {
                        let handle = routing.servers[name].clone();
                        async move {
                            let result = self.connection(&handle, SERVER_CONNECT_ATTEMPT_MAX).await;
                            (name, handle, result)
                        }
                    })
                    .collect();
                let mut reached = false;
                while let Some((name, handle, result)) = futures::StreamExt::next(&mut dials).await {
                    match result {
                        Ok(_) => {
                            reached = true;
                            break;
                        }
                        Err(ConnectFailure::Final(e)) => return Err(e),
                        Err(ConnectFailure::Retry(why)) => failures.push((format!("{name} ({})", handle.addr), why)),
                    }
                }
                all &= reached;
            }
            if all {
                return Ok(());
            }
            if let Some(max) = self.inner.settings.max_connect_retries {
                if retries >= max {
                    return Err(ClientError::ConnectRetriesExhausted { retries, failures });
                }
            }
            retries += 1;
            tracing::warn!(event = "client.connect_retry", retry = retries, failures = %list_failures(&failures));
            tokio::time::sleep(self.inner.settings.reconnect_wait_interval).await;
        }
    }

    /// The live connection to a server, connecting if needed. The dial runs in a task of its own
    /// for up to [`SERVER_CONNECT_ATTEMPT_MAX`]; the caller waits at most `wait` for it, so a
    /// silent server costs a request only that long (it goes on to the next server) while the
    /// dial may still succeed for later requests. Concurrent callers share one dial.
    async fn connection(&self, handle: &Arc<ServerHandle>, wait: Duration) -> Result<Arc<Connection>, ConnectFailure> {
        if let Ok(slot) = handle.conn.try_lock() {
            if let Some(live) = live_connection(handle, &slot) {
                return live;
            }
        }
        let asked = Instant::now();
        let dial = {
            let this = self.clone();
            let handle = handle.clone();
            tokio::spawn(async move { this.dial(&handle, asked).await })
        };
        match tokio::time::timeout(wait, dial).await {
            Ok(Ok(result)) => result,
            Ok(Err(e)) => Err(ConnectFailure::Retry(format!("dial task failed: {e}"))),
            Err(_) => Err(ConnectFailure::Retry(format!(
                "no handshake answer within {wait:?} (still trying)"
            ))),
        }
    }

    /// Connects to a server unless a connection is live, or a dial that started after `asked`
    /// failed already (its answer stands: callers queued behind a failing dial do not each dial
    /// again).
    async fn dial(&self, handle: &ServerHandle, asked: Instant) -> Result<Arc<Connection>, ConnectFailure> {
        let mut slot = handle.conn.lock().await;
        if let Some(live) = live_connection(handle, &slot) {
            return live;
        }
        // The connection of a stopping server closed: whatever answers next is a new process.
        handle.stopping.store(false, std::sync::atomic::Ordering::Release);
        if let Some((at, why)) = handle.last_failure.lock().expect("failure lock").as_ref() {
            if *at >= asked {
                return Err(ConnectFailure::Retry(why.clone()));
            }
        }
        *slot = None;
        *handle.dialling_since.lock().expect("dialling lock") = Some(Instant::now());
        let max_frame = self.routing().config.limits.max_frame_bytes as usize;
        let dialled = handshake::connect(
            &handle.addr,
            &self.inner.identity,
            SERVER_CONNECT_ATTEMPT_MAX,
            max_frame,
        )
        .await;
        *handle.dialling_since.lock().expect("dialling lock") = None;
        match dialled {
            Ok((framed, welcome)) => {
                *handle.last_failure.lock().expect("failure lock") = None;
                let config_toml = welcome.config_toml.clone();
                let conn = Connection::start(framed, welcome, Some(idle_ping_interval(&self.routing().config)));
                *slot = Some(conn.clone());
                drop(slot);
                self.maybe_refresh_config(config_toml);
                Ok(conn)
            }
            Err(e) => {
                *handle.last_failure.lock().expect("failure lock") = Some((Instant::now(), e.to_string()));
                if e.is_final() {
                    if let HandshakeError::Refused(r) = e {
                        return Err(ConnectFailure::Final(ClientError::from_refusal(r)));
                    }
                }
                Err(ConnectFailure::Retry(e.to_string()))
            }
        }
    }

    /// Takes what is newer in a document a server handed over: each stripe's servers at a higher
    /// generation than this client's (a server's document is current for its own stripe only, so
    /// a document never replaces another whole).
    fn maybe_refresh_config(&self, config_toml: String) {
        if config_toml.is_empty() || config_toml == self.routing().config_toml {
            return;
        }
        let incoming = match ClusterConfig::parse(&config_toml) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(event = "client.config_rejected", error = %e);
                return;
            }
        };
        let mut guard = self.inner.routing.write().expect("routing lock");
        let Some((merged, changed)) = merge_documents(&guard.config, &incoming) else {
            return;
        };
        let merged_toml = merged.to_toml();
        let next = Routing::new(
            Arc::new(merged),
            merged_toml,
            Some(&guard),
            &self.inner.settings.address_map,
        );
        let stripes = next.stripe_servers.len();
        *guard = Arc::new(next);
        let mut leaders = self.inner.leaders.lock().expect("leaders lock");
        leaders.resize(stripes, None);
        self.inner
            .sessions
            .ids
            .lock()
            .expect("sessions lock")
            .resize(stripes, None);
        for s in &changed {
            if let Some(l) = leaders.get_mut(*s) {
                *l = None;
            }
        }
        tracing::info!(event = "client.config_refreshed", stripes = ?changed);
    }

    /// Downloads the document again from a server whose responses name `generation` for
    /// `stripe`, newer than this client's (one handshake; the connection is then dropped), unless
    /// that was done for this generation within [`REFRESH_AGAIN_AFTER`].
    async fn refresh_from(&self, handle: &routing::ServerHandle, stripe: usize, generation: u64) {
        {
            let mut refreshed = self.inner.refreshed.lock().expect("refreshed lock");
            if let Some((g, at)) = refreshed.get(&stripe) {
                if *g >= generation && at.elapsed() < REFRESH_AGAIN_AFTER {
                    return;
                }
            }
            refreshed.insert(stripe, (generation, Instant::now()));
        }
        if let Some(doc) = self.download_document(&handle.addr, SERVER_CONNECT_ATTEMPT_MAX).await {
            self.maybe_refresh_config(doc);
        }
    }

    /// The document a server hands over in its welcome (one handshake; the connection is then
    /// dropped).
    async fn download_document(&self, addr: &str, timeout: Duration) -> Option<String> {
        let max_frame = self.routing().config.limits.max_frame_bytes as usize;
        match handshake::connect(addr, &self.inner.identity, timeout, max_frame).await {
            Ok((_, welcome)) => Some(welcome.config_toml),
            Err(e) => {
                tracing::debug!(event = "client.refresh_failed", server = %addr, error = %e);
                None
            }
        }
    }

    /// Downloads the document from one server of every stripe (a server said a key is not its
    /// stripe's: slots moved, or stripes were added), at most once per [`MOVED_REFRESH_EVERY`];
    /// concurrent callers wait for the one download under way.
    pub(super) async fn refresh_everywhere(&self) {
        let _one = self.inner.moved_refresh.lock().await;
        {
            let last = self.inner.moved_refreshed.lock().expect("refreshed lock");
            if last.is_some_and(|at| at.elapsed() < MOVED_REFRESH_EVERY) {
                return;
            }
        }
        // Twice: the first round may name stripes this client did not know.
        for _ in 0..2 {
            let routing = self.routing();
            let downloads = routing.stripe_servers.iter().enumerate().map(|(stripe, names)| {
                // The active first (its roster is the newest), then the others.
                let leader = self
                    .inner
                    .leaders
                    .lock()
                    .expect("leaders lock")
                    .get(stripe)
                    .cloned()
                    .flatten();
                let mut order: Vec<String> = leader.into_iter().collect();
                for n in names {
                    if !order.contains(n) {
                        order.push(n.clone());
                    }
                }
                let addrs: Vec<String> = order
                    .iter()
                    .filter_map(|n| routing.servers.get(n).map(|h| h.addr.clone()))
                    .collect();
                async move {
                    for addr in addrs {
                        if let Some(doc) = self.download_document(&addr, CONNECT_STAGGER).await {
                            return Some(doc);
                        }
                    }
                    None
                }
            });
            let before = routing.stripe_servers.len();
            for doc in futures::future::join_all(downloads).await.into_iter().flatten() {
                self.maybe_refresh_config(doc);
            }
            if self.routing().stripe_servers.len() == before {
                break;
            }
        }
        *self.inner.moved_refreshed.lock().expect("refreshed lock") = Some(Instant::now());
    }

    /// Downloads every stripe's document now (tools that change the array's layout).
    pub async fn refresh_document(&self) {
        *self.inner.moved_refreshed.lock().expect("refreshed lock") = None;
        self.refresh_everywhere().await;
    }

    /// Asks every server of the config about itself (for status tooling); never fails as a whole.
    pub async fn probe_all(&self, timeout: Duration) -> Vec<ServerProbe> {
        let routing = self.routing();
        let probes = routing.config.servers().map(|(pos, srv)| {
            let handle = routing.servers[&srv.name].clone();
            let name = srv.name.clone();
            async move {
                let (result, generation) = match self.connection(&handle, timeout).await {
                    Ok(conn) => {
                        let r = conn.call(Op::Ping, timeout).await.map_err(|e| format!("{e:?}"));
                        let generation = r.is_ok().then(|| conn.generation());
                        (r, generation)
                    }
                    Err(ConnectFailure::Final(e)) => (Err(e.to_string()), None),
                    Err(ConnectFailure::Retry(why)) => (Err(why), None),
                };
                ServerProbe {
                    name,
                    stripe: pos.stripe,
                    addr: handle.addr.clone(),
                    result,
                    generation,
                }
            }
        });
        futures::future::join_all(probes).await
    }

    /// The active of a stripe as last seen (asks the stripe when unknown).
    pub async fn active_of(&self, stripe: usize) -> Result<String, ClientError> {
        match self.execute(stripe, Op::Ping, ACTIVE_LOOKUP_TIMEOUT).await? {
            Reply::Pong {
                role: Role::Active,
                server,
                ..
            } => Ok(server),
            Reply::Pong { leader: Some(l), .. } => Ok(l),
            Reply::Pong { .. } => Err(ClientError::NoQuorum { stripe }),
            other => Err(unexpected(other)),
        }
    }
}

enum ConnectFailure {
    /// Refused for good (version, name, secret).
    Final(ClientError),
    /// Worth trying again later or elsewhere.
    Retry(String),
}

/// `current` with each stripe of `incoming` that has a higher generation; `None` when nothing is
/// newer or the two describe different arrays. Also the stripes taken. The list of stripes is
/// the one of the higher `layout` (stripes added or removed); each stripe's section is the one of
/// the higher generation, from whichever document.
fn merge_documents(current: &ClusterConfig, incoming: &ClusterConfig) -> Option<(ClusterConfig, Vec<usize>)> {
    if current.array_name != incoming.array_name {
        return None;
    }
    // Once either names slots, both are compared with every section naming its own.
    let (current, incoming) = if current.names_slots() || incoming.names_slots() {
        (current.with_slots_named(), incoming.with_slots_named())
    } else {
        (current.clone(), incoming.clone())
    };
    let newer_layout = incoming.layout > current.layout;
    let (mut merged, other) = match incoming.layout.cmp(&current.layout) {
        std::cmp::Ordering::Greater => (incoming, current),
        std::cmp::Ordering::Less => (current, incoming),
        std::cmp::Ordering::Equal if current.stripes.len() == incoming.stripes.len() => (current, incoming),
        std::cmp::Ordering::Equal => return None,
    };
    let mut changed: Vec<usize> = if newer_layout {
        (0..merged.stripes.len()).collect()
    } else {
        Vec::new()
    };
    for (i, section) in merged.stripes.iter_mut().enumerate() {
        let theirs = other.stripes.get(i).filter(|s| s.name == section.name);
        if let Some(theirs) = theirs.filter(|s| s.generation > section.generation) {
            *section = theirs.clone();
            if !changed.contains(&i) {
                changed.push(i);
            }
        }
    }
    if changed.is_empty() {
        return None;
    }
    // Two stripes' documents together must still make one valid array.
    ClusterConfig::parse(&merged.to_toml()).ok().map(|m| (m, changed))
}

/// Tries the URL list in order, round after round, until one server hands over the config or
/// `connect_timeout` passes. A URL that has not answered within [`CONNECT_STAGGER`] does not hold
/// up the list: the next one is dialled while it is still tried (each for up to
/// [`SERVER_CONNECT_ATTEMPT_MAX`]), and the first server to answer wins.
async fn download_config(
    settings: &ClientSettings,
    identity: &ClientIdentity,
) -> Result<(String, handshake::FramedConn, crate::protocol::Welcome), ClientError> {
    use futures::StreamExt;
    let started = Instant::now();
    let deadline = started + settings.connect_timeout;
    let urls = &settings.array_urls;
    let mut failures: Vec<(String, String)> = urls.iter().map(|u| (u.clone(), "not tried".into())).collect();
    loop {
        let mut dials = futures::stream::FuturesUnordered::new();
        let mut next = 0;
        let mut next_at = Instant::now();
        loop {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            if next < urls.len() && (dials.is_empty() || now >= next_at) {
                let url = urls[next].clone();
                let attempt = (deadline - now).min(SERVER_CONNECT_ATTEMPT_MAX);
                let i = next;
                dials.push(async move {
                    let result =
                        handshake::connect(&url, identity, attempt, crate::config::FRAME_BYTES_SETTING_MAX as usize)
                            .await;
                    (i, result)
                });
                failures[i].1 = "no answer yet".into();
                next += 1;
                next_at = now + CONNECT_STAGGER;
                continue;
            }
            if dials.is_empty() {
                break;
            }
            let stagger = tokio::time::sleep_until(if next < urls.len() { next_at } else { deadline });
            tokio::select! {
                Some((i, result)) = dials.next() => match result {
                    Ok((framed, welcome)) => return Ok((urls[i].clone(), framed, welcome)),
                    Err(HandshakeError::Refused(r)) => {
                        tracing::error!(event = "client.refused", url = %urls[i], reason = %r);
                        return Err(ClientError::from_refusal(r));
                    }
                    Err(e) => {
                        tracing::debug!(event = "client.url_failed", url = %urls[i], error = %e);
                        failures[i].1 = e.to_string();
                        // The next URL at once.
                        next_at = Instant::now();
                    }
                },
                _ = stagger => {}
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ClientError::Bootstrap {
                failures,
                waited: started.elapsed(),
            });
        }
        tokio::time::sleep(settings.reconnect_wait_interval.min(left)).await;
    }
}

/// What a server's open connection gives a request: itself, or (once the server answered
/// `ShuttingDown`) a refusal so that it can drain; `None` when there is no open connection.
fn live_connection(
    handle: &ServerHandle,
    slot: &Option<Arc<Connection>>,
) -> Option<Result<Arc<Connection>, ConnectFailure>> {
    let c = slot.as_ref().filter(|c| !c.is_closed())?;
    Some(if handle.stopping.load(std::sync::atomic::Ordering::Acquire) {
        Err(ConnectFailure::Retry("shutting down".into()))
    } else {
        Ok(c.clone())
    })
}

/// How often a connection that sent nothing pings the server: well within the array's idle timeout.
fn idle_ping_interval(config: &ClusterConfig) -> Duration {
    config.limits.idle_timeout.0 / 3
}

#[cfg(test)]
mod merge_tests {
    use super::*;

    fn doc(stripes: usize) -> ClusterConfig {
        crate::config::local_array(
            "t",
            "127.0.0.1",
            stripes,
            3,
            crate::config::Security::secret_files("s", "p"),
            |i| crate::config::ServerPorts {
                port: 1000 + i as u16,
                group_port: 2000 + i as u16,
                admin_port: 3000 + i as u16,
                resp_port: None,
            },
        )
    }

    #[test]
    fn a_document_adds_only_the_stripes_it_has_newer() {
        let current = doc(2);
        // Stripe 1's server hands over its stripe at generation 1 and stripe 0 as cluster.toml
        // has it: only stripe 1 is taken.
        let mut from_stripe_1 = doc(2);
        from_stripe_1.stripes[1].servers.remove(0);
        from_stripe_1.stripes[1].generation = 1;
        let (merged, changed) = merge_documents(&current, &from_stripe_1).unwrap();
        assert_eq!(changed, vec![1]);
        assert_eq!(merged.stripes[1].servers.len(), 2);
        // Then stripe 0's server, which knows stripe 1 only from cluster.toml: stripe 1 stays.
        let mut from_stripe_0 = doc(2);
        from_stripe_0.stripes[0].generation = 2;
        from_stripe_0.stripes[0].servers.remove(2);
        let (merged, changed) = merge_documents(&merged, &from_stripe_0).unwrap();
        assert_eq!(changed, vec![0]);
        assert_eq!(merged.stripes[1].servers.len(), 2);
        assert_eq!(merged.stripes[0].servers.len(), 2);
        // An older or equal document changes nothing.
        assert!(merge_documents(&merged, &current).is_none());
    }

    #[test]
    fn a_higher_layout_brings_its_stripes_and_moved_slots_are_merged_per_stripe() {
        use crate::slots::SlotSet;
        let current = doc(1);
        // Stripe 0 after a stripe was added and half its slots moved (its own section is newer).
        let mut two = doc(2);
        two.array_name = current.array_name.clone();
        two.layout = 1;
        two.stripes[0] = current.stripes[0].clone();
        two.stripes[0].generation = 3;
        two.stripes[0].slots = Some(SlotSet::range(0, 8192));
        two.stripes[1].slots = Some(SlotSet::empty());
        let (merged, changed) = merge_documents(&current, &two).unwrap();
        assert_eq!(changed, vec![0, 1]);
        assert_eq!(merged.stripes.len(), 2);
        // The new stripe's own document, newer for its own section, takes the moved slots.
        let mut from_new = two.clone();
        from_new.stripes[0].generation = 0;
        from_new.stripes[0].slots = Some(SlotSet::range(0, 16384));
        from_new.stripes[1].generation = 2;
        from_new.stripes[1].slots = Some(SlotSet::range(8192, 16384));
        let (merged, changed) = merge_documents(&merged, &from_new).unwrap();
        assert_eq!(changed, vec![1]);
        assert_eq!(merged.stripe_of_slot(100), 0);
        assert_eq!(merged.stripe_of_slot(9000), 1);
        // A document of an older layout does not take the new stripe away.
        assert!(merge_documents(&merged, &current).is_none());
    }
}
