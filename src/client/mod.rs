//! `ArrayClient`: bootstrap from a URL list, routing to stripes, failover.
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

mod connection;
mod nonstop;
mod session;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::time::Instant;

pub use connection::{CallError, Connection};
pub use nonstop::{CacheHandle, NonstopSettings, TimeoutBehavior, WriteOutcome, LOCAL_COPIES_MAX};
pub use session::{ClientEvent, ConnectionState, LockHandle, LockWait};

use crate::config::ClusterConfig;
use crate::handshake::{self, ClientIdentity, HandshakeError};
use crate::protocol::{
    ConnectionRole, ErrorReply, Op, PutOptions, ReadConsistency, ReadOp, Refusal, Reply, Role, WriteOp,
    SOFTWARE_VERSION,
};

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

/// Pause between rounds once every server of a stripe has been tried without success.
pub const ROUND_BACKOFF_MAX: Duration = Duration::from_millis(100);

/// Settings of an [`ArrayClient`]; the defaults are those of Terracotta's client. Their `Debug`
/// never shows the secret.
#[derive(Clone)]
pub struct ClientSettings {
    /// `host:port` of array servers, tried in order for the config download.
    pub array_urls: Vec<String>,
    /// The array expected; `None` accepts whichever answers.
    pub array_name: Option<String>,
    /// Shared secret (empty when the array has none).
    pub secret: Vec<u8>,
    /// How long the URL list may take to yield the config before bootstrap fails.
    pub connect_timeout: Duration,
    /// Pause between rounds of connecting to the servers of the downloaded config.
    pub reconnect_wait_interval: Duration,
    /// Rounds of connecting to the config's servers before giving up; `None` waits forever.
    pub max_connect_retries: Option<u32>,
    /// Deadline of each operation unless a call gives its own.
    pub request_timeout: Duration,
    /// Software version announced in the handshake. Only tests change it, to provoke a mismatch.
    pub software_version: String,
    /// Name this client gives its sessions (shown in lock listings and server logs).
    pub client_name: String,
    /// How often the client renews its sessions and checks that the array answers; also how long
    /// it waits for each renewal before it reports itself disconnected.
    pub keepalive_interval: Duration,
    /// Nonstop settings of caches not listed in `nonstop`.
    pub default_nonstop: NonstopSettings,
    /// Nonstop settings by cache name.
    pub nonstop: HashMap<String, NonstopSettings>,
    /// Addresses to dial instead of the ones in the config (`config address -> address to use`),
    /// for clients that reach the array through port forwarding (and tests, through a fault proxy).
    pub address_map: HashMap<String, String>,
    /// A named credential of the array's credentials file (less than full access); `secret` is
    /// then that credential's secret. `None`: `secret` is the cluster secret.
    pub credential: Option<String>,
    /// TLS, when the array's ports speak it: the CA that signed the servers' certificates, and
    /// this client's own certificate when the array requires one.
    pub tls: Option<Arc<crate::tls::ClientTls>>,
}

impl std::fmt::Debug for ClientSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientSettings")
            .field("array_urls", &self.array_urls)
            .field("array_name", &self.array_name)
            .field("credential", &self.credential)
            .field("secret", &format_args!("<{} bytes>", self.secret.len()))
            .field("tls", &self.tls.is_some())
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("client_name", &self.client_name)
            .finish_non_exhaustive()
    }
}

impl ClientSettings {
    /// Settings with defaults for a comma-separated URL list (`h1:9510,h2:9510`).
    pub fn new(array_urls: &str) -> Result<ClientSettings, ClientError> {
        let urls: Vec<String> = array_urls
            .split(',')
            .map(|u| u.trim())
            .filter(|u| !u.is_empty())
            .map(|u| u.strip_prefix("tcp://").unwrap_or(u).to_string())
            .collect();
        if urls.is_empty() {
            return Err(ClientError::Invalid("the array URL list is empty".into()));
        }
        for u in &urls {
            let ok = u
                .rsplit_once(':')
                .map(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
                .unwrap_or(false);
            if !ok {
                return Err(ClientError::Invalid(format!("array URL `{u}` is not host:port")));
            }
        }
        Ok(ClientSettings {
            array_urls: urls,
            array_name: None,
            secret: Vec::new(),
            connect_timeout: Duration::from_secs(30),
            reconnect_wait_interval: Duration::from_secs(1),
            max_connect_retries: None,
            request_timeout: Duration::from_secs(30),
            software_version: SOFTWARE_VERSION.to_string(),
            client_name: format!("client-{}", std::process::id()),
            keepalive_interval: Duration::from_secs(1),
            default_nonstop: NonstopSettings::default(),
            nonstop: HashMap::new(),
            address_map: HashMap::new(),
            credential: None,
            tls: None,
        })
    }

    fn identity(&self) -> ClientIdentity {
        ClientIdentity {
            software_version: self.software_version.clone(),
            array_name: self.array_name.clone(),
            secret: self.secret.clone(),
            role: match &self.credential {
                Some(name) => ConnectionRole::Credential { name: name.clone() },
                None => ConnectionRole::Client,
            },
            tls: self.tls.clone(),
        }
    }
}

/// Errors of the client, for callers to match on.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// No URL of the list yielded the config within `connect_timeout`.
    #[error("could not download the array configuration within {waited:?} from any URL: {}", list_failures(.failures))]
    Bootstrap {
        /// Each URL with the last reason it failed.
        failures: Vec<(String, String)>,
        /// How long was spent.
        waited: Duration,
    },
    /// Client and server versions differ.
    #[error("{}", crate::protocol::version_mismatch_message(.client, .server))]
    VersionMismatch {
        /// Client software version.
        client: String,
        /// Server software version.
        server: String,
    },
    /// The server belongs to another array.
    #[error("wrong array name: expected `{expected}`, the server belongs to `{actual}`")]
    WrongArrayName {
        /// The name the client expected.
        expected: String,
        /// The array the server belongs to.
        actual: String,
    },
    /// The shared secret does not match.
    #[error("authentication failed: {0}")]
    AuthenticationFailed(String),
    /// The servers of the downloaded config stayed unreachable for `max_connect_retries` rounds.
    #[error("could not connect to the array's servers after {retries} retries: {}", list_failures(.failures))]
    ConnectRetriesExhausted {
        /// Rounds tried.
        retries: u32,
        /// Each server with the last reason it failed.
        failures: Vec<(String, String)>,
    },
    /// The stripe has no active that can reach a majority.
    #[error("stripe {stripe} has no quorum: no server could serve the request safely before the deadline")]
    NoQuorum {
        /// The stripe.
        stripe: usize,
    },
    /// No server of the stripe could be reached before the deadline.
    #[error("stripe {stripe} is unreachable: {}", list_failures(.failures))]
    Unavailable {
        /// The stripe.
        stripe: usize,
        /// Each server with the last reason it failed.
        failures: Vec<(String, String)>,
    },
    /// The deadline passed.
    #[error("the request timed out after {0:?}; a write may or may not have been applied")]
    Timeout(Duration),
    /// The connection broke after a write was sent: it may or may not have been applied.
    #[error("the outcome of the write is unknown: {0}")]
    Indeterminate(String),
    /// The server refused the request.
    #[error("{0}")]
    Server(ErrorReply),
    /// Bad input from the caller.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// A nonstop deadline passed (SPEC 3.3): the array did not answer in time.
    #[error("nonstop timeout: `{op}` on cache `{cache}` got no answer within {timeout:?}")]
    NonstopTimeout {
        /// The operation.
        op: &'static str,
        /// The cache.
        cache: String,
        /// The deadline that passed.
        timeout: Duration,
    },
    /// The client's session on a stripe expired; the client has rejoined with a new one.
    #[error("the client session expired; the client rejoined with a new session")]
    SessionExpired,
    /// A lock taken before a rejoin cannot be released: the session that held it is gone, and with
    /// it the lock.
    #[error("the lock was taken before the client rejoined the array; it is no longer held")]
    InvalidLockAfterRejoin,
    /// The lock was not granted within the wait time.
    #[error("the lock was not granted within the wait time")]
    LockTimeout,
}

fn list_failures(failures: &[(String, String)]) -> String {
    failures
        .iter()
        .map(|(who, why)| format!("{who}: {why}"))
        .collect::<Vec<_>>()
        .join("; ")
}

impl ClientError {
    /// Whether the error means "the array did not answer in time" (the case nonstop behaviours
    /// handle) rather than a definite answer.
    pub fn is_unavailability(&self) -> bool {
        matches!(
            self,
            ClientError::Timeout(_)
                | ClientError::NoQuorum { .. }
                | ClientError::Unavailable { .. }
                | ClientError::Indeterminate(_)
                | ClientError::NonstopTimeout { .. }
        )
    }

    fn from_refusal(r: Refusal) -> ClientError {
        match r {
            Refusal::VersionMismatch { client, server, .. } => ClientError::VersionMismatch { client, server },
            Refusal::WrongArrayName { expected, actual } => ClientError::WrongArrayName { expected, actual },
            Refusal::AuthenticationFailed => {
                ClientError::AuthenticationFailed("the server refused our proof of the shared secret".into())
            }
            Refusal::WrongPort(why) => ClientError::Invalid(why),
            Refusal::Busy(why) => ClientError::Invalid(format!("the server is busy: {why}")),
        }
    }
}

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
}

/// One server of the current config, with its connection.
struct ServerHandle {
    /// Client address.
    addr: String,
    /// The live connection, if any; the async mutex makes concurrent callers share one connect.
    conn: tokio::sync::Mutex<Option<Arc<Connection>>>,
    /// When the last connect failed and why; such a server is tried last for a while.
    last_failure: Mutex<Option<(Instant, String)>>,
}

/// Routing state derived from one config document.
struct Routing {
    /// The document.
    config: Arc<ClusterConfig>,
    /// Its text, to notice when a server hands over a different one.
    config_toml: String,
    /// Server handles by name.
    servers: HashMap<String, Arc<ServerHandle>>,
    /// Names of each stripe's servers, in config order.
    stripe_servers: Vec<Vec<String>>,
}

/// The client of a ferrocotta array. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct ArrayClient {
    inner: Arc<Inner>,
}

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
}

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
            }),
        };
        Ok(client)
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
                let mut reached = false;
                for name in names {
                    let handle = &routing.servers[name];
                    match self.connection(handle, SERVER_CONNECT_ATTEMPT_MAX).await {
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

    /// The live connection to a server, connecting if needed.
    async fn connection(&self, handle: &ServerHandle, timeout: Duration) -> Result<Arc<Connection>, ConnectFailure> {
        let mut slot = handle.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            if !c.is_closed() {
                return Ok(c.clone());
            }
        }
        *slot = None;
        let max_frame = self.routing().config.limits.max_frame_bytes as usize;
        match handshake::connect(&handle.addr, &self.inner.identity, timeout, max_frame).await {
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

    /// Replaces the routing state when a server hands over a different config document.
    fn maybe_refresh_config(&self, config_toml: String) {
        if config_toml.is_empty() || config_toml == self.routing().config_toml {
            return;
        }
        match ClusterConfig::parse(&config_toml) {
            Ok(config) => {
                let mut guard = self.inner.routing.write().expect("routing lock");
                let stripes = config.stripes.len();
                let next = Routing::new(
                    Arc::new(config),
                    config_toml,
                    Some(&guard),
                    &self.inner.settings.address_map,
                );
                *guard = Arc::new(next);
                *self.inner.leaders.lock().expect("leaders lock") = vec![None; stripes];
                tracing::info!(event = "client.config_refreshed", stripes);
            }
            Err(e) => tracing::warn!(event = "client.config_rejected", error = %e),
        }
    }

    /// Order in which to try the servers of a stripe: the known active first, then the others
    /// starting at a rotating offset, servers that failed recently last.
    fn candidates(&self, routing: &Routing, stripe: usize, want_leader: bool) -> Vec<String> {
        let names = &routing.stripe_servers[stripe];
        let start = self.inner.rotation.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut order: Vec<String> = (0..names.len())
            .map(|i| names[(start + i) % names.len()].clone())
            .collect();
        let wait = self.inner.settings.reconnect_wait_interval;
        order.sort_by_key(|n| recently_failed(routing, n, wait) as u8);
        if want_leader {
            if let Some(leader) = self.inner.leaders.lock().expect("leaders lock")[stripe].clone() {
                if let Some(pos) = order.iter().position(|n| *n == leader) {
                    let l = order.remove(pos);
                    order.insert(0, l);
                }
            }
        }
        order
    }

    /// Drops the leader hint of a stripe if it names `server`.
    fn forget_leader(&self, stripe: usize, server: &str) {
        let mut leaders = self.inner.leaders.lock().expect("leaders lock");
        if let Some(slot) = leaders.get_mut(stripe) {
            if slot.as_deref() == Some(server) {
                *slot = None;
            }
        }
    }

    fn set_leader(&self, stripe: usize, leader: Option<String>) {
        let mut leaders = self.inner.leaders.lock().expect("leaders lock");
        if let Some(slot) = leaders.get_mut(stripe) {
            *slot = leader;
        }
    }

    /// Runs one operation on a stripe until it succeeds, fails for good, or `timeout` passes.
    pub async fn execute(&self, stripe: usize, op: Op, timeout: Duration) -> Result<Reply, ClientError> {
        let deadline = Instant::now() + timeout;
        // Pings and eventual reads are served by any server of the stripe.
        let needs_leader = !matches!(op, Op::Ping | Op::Read(_, ReadConsistency::Eventual));
        // Reading again changes nothing; a change whose connection broke may have been applied.
        let changes = matches!(op, Op::Write(_) | Op::Session(_));
        let mut failures: HashMap<String, String> = HashMap::new();
        let mut saw_no_quorum = false;
        let mut round = 0u32;
        loop {
            let routing = self.routing();
            if stripe >= routing.stripe_servers.len() {
                return Err(ClientError::Invalid(format!("no stripe {stripe} in the config")));
            }
            let mut redirected = false;
            for name in self.candidates(&routing, stripe, needs_leader) {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                let handle = routing.servers[&name].clone();
                let conn = match self
                    .connection(&handle, SERVER_CONNECT_ATTEMPT_MAX.min(deadline - now))
                    .await
                {
                    Ok(c) => c,
                    Err(ConnectFailure::Final(e)) => return Err(e),
                    Err(ConnectFailure::Retry(why)) => {
                        failures.insert(name.clone(), why);
                        continue;
                    }
                };
                let left = deadline.saturating_duration_since(Instant::now());
                match conn.call(op.clone(), left).await {
                    Ok(reply) => {
                        if needs_leader {
                            self.set_leader(stripe, Some(name));
                        }
                        return Ok(reply);
                    }
                    Err(CallError::Server(ErrorReply::NotLeader { leader: Some(l) }))
                        if l != name && !recently_failed(&routing, &l, self.inner.settings.reconnect_wait_interval) =>
                    {
                        self.set_leader(stripe, Some(l));
                        redirected = true;
                        break;
                    }
                    Err(CallError::Server(ErrorReply::NotLeader { .. }))
                    | Err(CallError::Server(ErrorReply::NoQuorum)) => {
                        saw_no_quorum = true;
                        self.set_leader(stripe, None);
                        failures.insert(name.clone(), "no quorum".into());
                    }
                    Err(CallError::Server(ErrorReply::WrongStripe { owner })) => {
                        // Our config is stale: the server's welcome carries the current one, so
                        // reconnecting refreshes it.
                        *handle.conn.lock().await = None;
                        failures.insert(name.clone(), format!("key owned by stripe {owner}"));
                        redirected = true;
                        break;
                    }
                    Err(CallError::Server(ErrorReply::ShuttingDown)) => {
                        failures.insert(name.clone(), "shutting down".into());
                    }
                    Err(CallError::Server(ErrorReply::Timeout)) => {
                        return Err(ClientError::Indeterminate(format!(
                            "{name} could not confirm the request before its deadline (it may have lost its quorum)"
                        )))
                    }
                    Err(CallError::Server(e)) => return Err(ClientError::Server(e)),
                    Err(CallError::TooLarge { bytes, max }) => {
                        return Err(ClientError::Invalid(format!(
                        "the request takes {bytes} bytes, more than the array's frame limit of {max}; it was not sent"
                    )))
                    }
                    Err(CallError::NotSent(why)) => {
                        failures.insert(name.clone(), why);
                    }
                    Err(CallError::Lost(why)) => {
                        if changes {
                            return Err(ClientError::Indeterminate(format!("connection to {name} lost: {why}")));
                        }
                        failures.insert(name.clone(), why);
                    }
                    Err(CallError::TimedOut) => {
                        // A silent server (paused, cut off without a reset) must not hold every
                        // later request for a whole timeout: forget it as the active and try the
                        // others first for a while; they name the new active.
                        self.forget_leader(stripe, &name);
                        *handle.last_failure.lock().expect("failure lock") =
                            Some((Instant::now(), "no answer before the deadline".into()));
                        tracing::debug!(event = "client.server_silent", server = %name);
                        return Err(ClientError::Timeout(timeout));
                    }
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(if saw_no_quorum {
                    ClientError::NoQuorum { stripe }
                } else if failures.is_empty() {
                    ClientError::Timeout(timeout)
                } else {
                    let mut f: Vec<(String, String)> = failures.into_iter().collect();
                    f.sort();
                    ClientError::Unavailable { stripe, failures: f }
                });
            }
            if !redirected {
                round += 1;
                let pause = (ROUND_BACKOFF_STEP * round).min(ROUND_BACKOFF_MAX).min(deadline - now);
                tokio::time::sleep(pause).await;
            }
        }
    }

    /// The stripe that owns a key.
    pub fn stripe_of(&self, key: &[u8]) -> usize {
        self.routing().config.stripe_of_key(key)
    }

    fn check_key(&self, key: &[u8]) -> Result<(), ClientError> {
        let max = self.routing().config.limits.max_key_bytes as usize;
        if key.is_empty() || key.len() > max {
            return Err(ClientError::Invalid(format!("keys must be 1 to {max} bytes")));
        }
        Ok(())
    }

    async fn keyed(&self, key: &[u8], op: Op) -> Result<Reply, ClientError> {
        self.check_key(key)?;
        self.execute(self.stripe_of(key), op, self.inner.settings.request_timeout)
            .await
    }

    /// The value of a key (linearizable).
    pub async fn get(&self, cache: &str, key: &[u8]) -> Result<Option<Vec<u8>>, ClientError> {
        self.get_with(cache, key, ReadConsistency::Linearizable).await
    }

    /// The value of a key with the given consistency.
    pub async fn get_with(
        &self,
        cache: &str,
        key: &[u8],
        read: ReadConsistency,
    ) -> Result<Option<Vec<u8>>, ClientError> {
        let op = Op::Read(
            ReadOp::Get {
                cache: cache.into(),
                key: key.to_vec(),
            },
            read,
        );
        expect_value(self.keyed(key, op).await?)
    }

    /// Values of many keys, in the order asked.
    pub async fn get_all(&self, cache: &str, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>, ClientError> {
        let mut by_stripe: HashMap<usize, Vec<usize>> = HashMap::new();
        for (i, k) in keys.iter().enumerate() {
            self.check_key(k)?;
            by_stripe.entry(self.stripe_of(k)).or_default().push(i);
        }
        let mut out = vec![None; keys.len()];
        let calls = by_stripe.into_iter().map(|(stripe, idx)| {
            let op = Op::Read(
                ReadOp::GetAll {
                    cache: cache.into(),
                    keys: idx.iter().map(|&i| keys[i].clone()).collect(),
                },
                ReadConsistency::Linearizable,
            );
            async move { (idx, self.execute(stripe, op, self.inner.settings.request_timeout).await) }
        });
        for (idx, result) in futures::future::join_all(calls).await {
            match result? {
                Reply::Values(vals) if vals.len() == idx.len() => {
                    for (i, v) in idx.into_iter().zip(vals) {
                        out[i] = v;
                    }
                }
                other => return Err(unexpected(other)),
            }
        }
        Ok(out)
    }

    /// Whether a key is present.
    pub async fn contains(&self, cache: &str, key: &[u8]) -> Result<bool, ClientError> {
        let op = Op::Read(
            ReadOp::Contains {
                cache: cache.into(),
                key: key.to_vec(),
            },
            ReadConsistency::Linearizable,
        );
        expect_bool(self.keyed(key, op).await?)
    }

    /// Sets a key; returns the previous value.
    pub async fn put(&self, cache: &str, key: &[u8], value: &[u8]) -> Result<Option<Vec<u8>>, ClientError> {
        self.put_with(cache, key, value, PutOptions::default()).await
    }

    /// Sets a key with a time to live or to idle of its own; returns the previous value.
    pub async fn put_with(
        &self,
        cache: &str,
        key: &[u8],
        value: &[u8],
        opts: PutOptions,
    ) -> Result<Option<Vec<u8>>, ClientError> {
        let op = Op::Write(WriteOp::Put {
            cache: cache.into(),
            key: key.to_vec(),
            value: value.to_vec(),
            opts,
        });
        expect_value(self.keyed(key, op).await?)
    }

    /// Sets a key tied to this client's session: the array removes it when the session ends
    /// (the client is gone longer than the reconnect window, or closes). Returns the previous value.
    pub async fn put_ephemeral(&self, cache: &str, key: &[u8], value: &[u8]) -> Result<Option<Vec<u8>>, ClientError> {
        self.check_key(key)?;
        let stripe = self.stripe_of(key);
        let mut retried = false;
        loop {
            let session = self.session_for(stripe).await?;
            let op = Op::Write(WriteOp::Put {
                cache: cache.into(),
                key: key.to_vec(),
                value: value.to_vec(),
                opts: PutOptions {
                    session: Some(session),
                    ..PutOptions::default()
                },
            });
            match self.execute(stripe, op, self.inner.settings.request_timeout).await {
                Err(ClientError::Server(ErrorReply::SessionExpired)) if !retried => {
                    self.rejoin(stripe, session).await?;
                    retried = true;
                }
                other => return expect_value(other?),
            }
        }
    }

    /// Sets many keys; atomic per stripe.
    pub async fn put_all(&self, cache: &str, entries: &[Entry]) -> Result<(), ClientError> {
        let mut by_stripe: HashMap<usize, Vec<Entry>> = HashMap::new();
        for (k, v) in entries {
            self.check_key(k)?;
            by_stripe
                .entry(self.stripe_of(k))
                .or_default()
                .push((k.clone(), v.clone()));
        }
        let calls = by_stripe.into_iter().map(|(stripe, entries)| {
            let op = Op::Write(WriteOp::PutAll {
                cache: cache.into(),
                entries,
            });
            self.execute(stripe, op, self.inner.settings.request_timeout)
        });
        for r in futures::future::join_all(calls).await {
            r?;
        }
        Ok(())
    }

    /// Sets a key if it is absent; returns the value already there, if any.
    pub async fn put_if_absent(&self, cache: &str, key: &[u8], value: &[u8]) -> Result<Option<Vec<u8>>, ClientError> {
        self.put_if_absent_with(cache, key, value, PutOptions::default()).await
    }

    /// Like [`ArrayClient::put_if_absent`], with the new entry's own ttl/tti/session.
    pub async fn put_if_absent_with(
        &self,
        cache: &str,
        key: &[u8],
        value: &[u8],
        opts: PutOptions,
    ) -> Result<Option<Vec<u8>>, ClientError> {
        let op = Op::Write(WriteOp::PutIfAbsent {
            cache: cache.into(),
            key: key.to_vec(),
            value: value.to_vec(),
            opts,
        });
        expect_value(self.keyed(key, op).await?)
    }

    /// Sets a key only if present; returns the previous value (`None`: nothing was replaced).
    pub async fn replace(&self, cache: &str, key: &[u8], value: &[u8]) -> Result<Option<Vec<u8>>, ClientError> {
        let op = Op::Write(WriteOp::Replace {
            cache: cache.into(),
            key: key.to_vec(),
            value: value.to_vec(),
        });
        expect_value(self.keyed(key, op).await?)
    }

    /// Compare-and-swap: sets `key` to `value` only if it holds `expected`.
    pub async fn replace_if_equal(
        &self,
        cache: &str,
        key: &[u8],
        expected: &[u8],
        value: &[u8],
    ) -> Result<bool, ClientError> {
        let op = Op::Write(WriteOp::ReplaceIfEqual {
            cache: cache.into(),
            key: key.to_vec(),
            expected: expected.to_vec(),
            value: value.to_vec(),
        });
        expect_bool(self.keyed(key, op).await?)
    }

    /// Removes a key; returns the previous value.
    pub async fn remove(&self, cache: &str, key: &[u8]) -> Result<Option<Vec<u8>>, ClientError> {
        let op = Op::Write(WriteOp::Remove {
            cache: cache.into(),
            key: key.to_vec(),
        });
        expect_value(self.keyed(key, op).await?)
    }

    /// Removes a key only if it holds `expected`.
    pub async fn remove_if_equal(&self, cache: &str, key: &[u8], expected: &[u8]) -> Result<bool, ClientError> {
        let op = Op::Write(WriteOp::RemoveIfEqual {
            cache: cache.into(),
            key: key.to_vec(),
            expected: expected.to_vec(),
        });
        expect_bool(self.keyed(key, op).await?)
    }

    /// Adds `delta` to a counter; returns the new value.
    pub async fn increment(&self, cache: &str, key: &[u8], delta: i64) -> Result<i64, ClientError> {
        let op = Op::Write(WriteOp::Increment {
            cache: cache.into(),
            key: key.to_vec(),
            delta,
        });
        match self.keyed(key, op).await? {
            Reply::Counter(n) => Ok(n),
            other => Err(unexpected(other)),
        }
    }

    /// One page of keys with `prefix`, starting at `cursor` (`None`: the beginning).
    pub async fn keys(
        &self,
        cache: &str,
        prefix: &[u8],
        cursor: Option<KeysCursor>,
        limit: u32,
    ) -> Result<KeysPage, ClientError> {
        let cursor = cursor.unwrap_or_default();
        let stripes = self.routing().config.stripes.len();
        if cursor.stripe >= stripes {
            return Ok(KeysPage {
                keys: Vec::new(),
                next: None,
            });
        }
        let op = Op::Read(
            ReadOp::Keys {
                cache: cache.into(),
                prefix: prefix.to_vec(),
                after: cursor.after.clone(),
                limit: limit.clamp(1, crate::protocol::KEYS_PAGE_MAX),
            },
            ReadConsistency::Linearizable,
        );
        match self
            .execute(cursor.stripe, op, self.inner.settings.request_timeout)
            .await?
        {
            Reply::Keys { keys, more } => {
                let next = if more {
                    Some(KeysCursor {
                        stripe: cursor.stripe,
                        after: keys.last().cloned(),
                    })
                } else if cursor.stripe + 1 < stripes {
                    Some(KeysCursor {
                        stripe: cursor.stripe + 1,
                        after: None,
                    })
                } else {
                    None
                };
                Ok(KeysPage { keys, next })
            }
            other => Err(unexpected(other)),
        }
    }

    /// Every key with `prefix`, following pages to the end (at most `max` keys).
    pub async fn all_keys(&self, cache: &str, prefix: &[u8], max: usize) -> Result<Vec<Vec<u8>>, ClientError> {
        let mut out = Vec::new();
        let mut cursor = None;
        loop {
            let page = self.keys(cache, prefix, cursor, ALL_KEYS_PAGE).await?;
            out.extend(page.keys);
            if out.len() >= max {
                out.truncate(max);
                return Ok(out);
            }
            match page.next {
                Some(c) => cursor = Some(c),
                None => return Ok(out),
            }
        }
    }

    /// Number of entries of a cache across all stripes.
    pub async fn size(&self, cache: &str) -> Result<u64, ClientError> {
        let stripes = self.routing().config.stripes.len();
        let calls = (0..stripes).map(|s| {
            let op = Op::Read(ReadOp::Size { cache: cache.into() }, ReadConsistency::Linearizable);
            self.execute(s, op, self.inner.settings.request_timeout)
        });
        let mut total = 0;
        for r in futures::future::join_all(calls).await {
            match r? {
                Reply::Size(n) => total += n,
                other => return Err(unexpected(other)),
            }
        }
        Ok(total)
    }

    /// Creates a cache with these settings on every stripe, unless it exists there (settings are
    /// fixed at creation). Returns whether any stripe created it.
    pub async fn create_cache(
        &self,
        cache: &str,
        settings: crate::protocol::CacheSettings,
    ) -> Result<bool, ClientError> {
        let stripes = self.routing().config.stripes.len();
        let calls = (0..stripes).map(|s| {
            let op = Op::Write(WriteOp::CreateCache {
                cache: cache.into(),
                settings,
            });
            self.execute(s, op, self.inner.settings.request_timeout)
        });
        let mut created = false;
        for r in futures::future::join_all(calls).await {
            created |= expect_bool(r?)?;
        }
        Ok(created)
    }

    /// Removes every entry of a cache on every stripe.
    pub async fn clear(&self, cache: &str) -> Result<(), ClientError> {
        let stripes = self.routing().config.stripes.len();
        let calls = (0..stripes).map(|s| {
            self.execute(
                s,
                Op::Write(WriteOp::Clear { cache: cache.into() }),
                self.inner.settings.request_timeout,
            )
        });
        for r in futures::future::join_all(calls).await {
            r?;
        }
        Ok(())
    }

    /// Asks every server of the config about itself (for status tooling); never fails as a whole.
    pub async fn probe_all(&self, timeout: Duration) -> Vec<ServerProbe> {
        let routing = self.routing();
        let probes = routing.config.servers().map(|(pos, srv)| {
            let handle = routing.servers[&srv.name].clone();
            let name = srv.name.clone();
            async move {
                let result = match self.connection(&handle, timeout).await {
                    Ok(conn) => conn.call(Op::Ping, timeout).await.map_err(|e| format!("{e:?}")),
                    Err(ConnectFailure::Final(e)) => Err(e.to_string()),
                    Err(ConnectFailure::Retry(why)) => Err(why),
                };
                ServerProbe {
                    name,
                    stripe: pos.stripe,
                    addr: handle.addr.clone(),
                    result,
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

impl Routing {
    fn new(
        config: Arc<ClusterConfig>,
        config_toml: String,
        previous: Option<&Arc<Routing>>,
        address_map: &HashMap<String, String>,
    ) -> Routing {
        let mut servers = HashMap::new();
        for (_, srv) in config.servers() {
            let addr = srv.client_addr();
            let addr = address_map.get(&addr).cloned().unwrap_or(addr);
            let reuse = previous
                .and_then(|p| p.servers.get(&srv.name))
                .filter(|h| h.addr == addr)
                .cloned();
            let handle = reuse.unwrap_or_else(|| {
                Arc::new(ServerHandle {
                    addr,
                    conn: tokio::sync::Mutex::new(None),
                    last_failure: Mutex::new(None),
                })
            });
            servers.insert(srv.name.clone(), handle);
        }
        let stripe_servers = config
            .stripes
            .iter()
            .map(|s| s.servers.iter().map(|srv| srv.name.clone()).collect())
            .collect();
        Routing {
            config,
            config_toml,
            servers,
            stripe_servers,
        }
    }
}

/// Whether connecting to a server failed within the last `window` (a mirror's `NotLeader` hint
/// naming a dead active must not send the client straight back to it).
fn recently_failed(routing: &Routing, name: &str, window: Duration) -> bool {
    routing
        .servers
        .get(name)
        .and_then(|h| {
            h.last_failure
                .lock()
                .expect("failure lock")
                .as_ref()
                .map(|(at, _)| at.elapsed() < window)
        })
        .unwrap_or(false)
}

/// Tries the URL list in order, round after round, until one server hands over the config or
/// `connect_timeout` passes.
async fn download_config(
    settings: &ClientSettings,
    identity: &ClientIdentity,
) -> Result<(String, handshake::FramedConn, crate::protocol::Welcome), ClientError> {
    let started = Instant::now();
    let deadline = started + settings.connect_timeout;
    let mut failures: Vec<(String, String)> = settings
        .array_urls
        .iter()
        .map(|u| (u.clone(), "not tried".into()))
        .collect();
    loop {
        for (i, url) in settings.array_urls.iter().enumerate() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            // One silent server (paused, cut off) must not spend the whole deadline: each URL gets
            // at most one attempt's time, then the next is tried.
            let attempt = left.min(SERVER_CONNECT_ATTEMPT_MAX);
            match handshake::connect(url, identity, attempt, crate::config::FRAME_BYTES_SETTING_MAX as usize).await {
                Ok((framed, welcome)) => return Ok((url.clone(), framed, welcome)),
                Err(HandshakeError::Refused(r)) => {
                    tracing::error!(event = "client.refused", url = %url, reason = %r);
                    return Err(ClientError::from_refusal(r));
                }
                Err(e) => {
                    tracing::debug!(event = "client.url_failed", url = %url, error = %e);
                    failures[i].1 = e.to_string();
                }
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

/// How often a connection that sent nothing pings the server: well within the array's idle timeout.
fn idle_ping_interval(config: &ClusterConfig) -> Duration {
    config.limits.idle_timeout.0 / 3
}

fn unexpected(reply: Reply) -> ClientError {
    ClientError::Invalid(format!("unexpected reply from the server: {reply:?}"))
}

fn expect_value(reply: Reply) -> Result<Option<Vec<u8>>, ClientError> {
    match reply {
        Reply::Value(v) => Ok(v),
        other => Err(unexpected(other)),
    }
}

fn expect_bool(reply: Reply) -> Result<bool, ClientError> {
    match reply {
        Reply::Bool(b) => Ok(b),
        other => Err(unexpected(other)),
    }
}
