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
    /// Operations of nonstop caches whose timeout behaviour applied.
    nonstop_timeouts: std::sync::atomic::AtomicU64,
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
                nonstop_timeouts: std::sync::atomic::AtomicU64::new(0),
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
