//! Client sessions, connection state, events, rejoin and locks (SPEC 2.5, 3.3).
//!
//! The client holds one session per stripe: none until it first needs one (a lock or an
//! ephemeral entry), then one on every stripe (the keep-alive task opens the others, and one on a
//! stripe added later), each naming the client's random id. When a hash slot moves to another
//! stripe, its ephemeral entries and locks go to this client's session there. A single keep-alive
//! task renews them every
//! `keepalive_interval` and is the client's view of the array: a renewal that fails makes the
//! client `Disconnected` (event `Disconnected`); the next that succeeds makes it `Connected` again
//! (event `Reconnected`). A renewal answered `SessionExpired` means the array gave up on this client
//! (it was gone longer than the reconnect window): the client **rejoins**: it opens a new session,
//! clears its local copies and emits `Rejoined`. Locks taken under the old session are gone;
//! releasing one reports `InvalidLockAfterRejoin`.
//!
//! The task holds only a weak reference to the client, so it ends when the last clone is dropped;
//! reconnects and rejoins reuse it and its connections, so nothing grows with their number.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::{broadcast, watch};

use super::{ArrayClient, ClientError, Inner};
use crate::protocol::{ErrorReply, LockInfo, LockMode, Op, ReadConsistency, ReadOp, Reply, SessionOp};

/// Longest a closing client waits for each of its sessions to be closed.
pub const SESSION_CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Shortest wait for a keep-alive answer, whatever the interval: a loaded machine must not make a
/// client with a short interval think the array is gone.
pub const KEEPALIVE_TIMEOUT_MIN: Duration = Duration::from_millis(500);

/// Events a subscriber may fall behind by before it misses some.
pub const EVENT_BUFFER_MAX: usize = 256;

/// The client's view of the array.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionState {
    /// Every stripe answered the last renewal.
    Connected,
    /// Some stripe did not answer its last renewal.
    Disconnected,
}

/// Events of the connection (SPEC 3.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    /// The client connected and opened its sessions.
    Connected,
    /// A stripe stopped answering.
    Disconnected,
    /// Every stripe answers again, and the sessions survived.
    Reconnected,
    /// A session had expired; the client opened a new one and cleared its local copies.
    Rejoined {
        /// The stripe whose session was replaced.
        stripe: usize,
        /// Rejoins of this client so far.
        rejoins: u64,
    },
}

/// How long `lock` waits for a lock held by someone else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockWait {
    /// Fail at once if the lock is taken.
    NoWait,
    /// Wait at most this long.
    For(Duration),
    /// Wait until granted.
    Forever,
}

impl LockWait {
    /// From the integer convention of the seed's services: < 0 forever, 0 no wait, > 0 that many ms.
    pub fn from_millis(ms: i64) -> LockWait {
        match ms {
            ms if ms < 0 => LockWait::Forever,
            0 => LockWait::NoWait,
            ms => LockWait::For(Duration::from_millis(ms as u64)),
        }
    }

    fn as_millis(self) -> i64 {
        match self {
            LockWait::NoWait => 0,
            LockWait::For(d) => (d.as_millis() as i64).max(1),
            LockWait::Forever => -1,
        }
    }
}

/// A lock held by this client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockHandle {
    /// Cache of the locked key.
    pub cache: String,
    /// The locked key.
    pub key: Vec<u8>,
    /// Stripe of the key when it was taken (the lock moves with its key's slot, to this
    /// client's session on the new stripe).
    pub stripe: usize,
    /// Session that took it; a rejoin replaces the session and so voids the handle.
    pub session: u64,
}

/// Session bookkeeping of a client.
pub(super) struct SessionState {
    /// Session id per stripe, once opened.
    pub(super) ids: Mutex<Vec<Option<u64>>>,
    /// This client's id, named by each of its sessions (random, for this client's life).
    client_id: u64,
    /// Serializes opening sessions (so concurrent callers share one).
    opening: tokio::sync::Mutex<()>,
    /// Current connection state.
    state: watch::Sender<ConnectionState>,
    /// Event stream.
    events: broadcast::Sender<ClientEvent>,
    /// Rejoins so far.
    rejoins: AtomicU64,
    /// Stops the keep-alive task on `close`.
    stop: tokio_util::sync::CancellationToken,
}

impl SessionState {
    pub(super) fn new(stripes: usize) -> SessionState {
        SessionState {
            ids: Mutex::new(vec![None; stripes]),
            client_id: rand::random(),
            opening: tokio::sync::Mutex::new(()),
            state: watch::channel(ConnectionState::Connected).0,
            events: broadcast::channel(EVENT_BUFFER_MAX).0,
            rejoins: AtomicU64::new(0),
            stop: tokio_util::sync::CancellationToken::new(),
        }
    }
}

impl ArrayClient {
    /// Starts the keep-alive task. Sessions open lazily, on a stripe's first lock or ephemeral
    /// entry, so clients that only read and write plain entries cost the array no log writes.
    pub(super) async fn start_sessions(&self) -> Result<(), ClientError> {
        let stripes = self.config().stripes.len();
        let _ = self.inner.sessions.events.send(ClientEvent::Connected);
        tracing::info!(event = "client.connected", stripes);
        tokio::spawn(keepalive_loop(
            Arc::downgrade(&self.inner),
            self.inner.sessions.stop.clone(),
        ));
        Ok(())
    }

    /// This client's session on a stripe, opening it if needed.
    pub async fn session_for(&self, stripe: usize) -> Result<u64, ClientError> {
        if let Some(id) = self.current_session(stripe) {
            return Ok(id);
        }
        let _guard = self.inner.sessions.opening.lock().await;
        match self.current_session(stripe) {
            Some(id) => Ok(id),
            None => self.open_session(stripe).await,
        }
    }

    fn current_session(&self, stripe: usize) -> Option<u64> {
        self.inner
            .sessions
            .ids
            .lock()
            .expect("sessions lock")
            .get(stripe)
            .copied()
            .flatten()
    }

    /// Opens a session; the caller holds `opening`.
    async fn open_session(&self, stripe: usize) -> Result<u64, ClientError> {
        let op = Op::Session(SessionOp::Open {
            client_name: self.inner.settings.client_name.clone(),
            client_id: self.inner.sessions.client_id,
        });
        match self.execute(stripe, op, self.inner.settings.request_timeout).await? {
            Reply::Session { id, .. } => {
                if let Some(slot) = self.inner.sessions.ids.lock().expect("sessions lock").get_mut(stripe) {
                    *slot = Some(id);
                }
                Ok(id)
            }
            other => Err(ClientError::Invalid(format!(
                "unexpected reply to OpenSession: {other:?}"
            ))),
        }
    }

    /// Replaces an expired session (`expired`) on a stripe with a new one: clears every local copy
    /// and emits `Rejoined`. A no-op if the session was already replaced.
    pub(super) async fn rejoin(&self, stripe: usize, expired: u64) -> Result<u64, ClientError> {
        let _guard = self.inner.sessions.opening.lock().await;
        if let Some(current) = self.current_session(stripe) {
            if current != expired {
                return Ok(current);
            }
        }
        // The expired id stays in place until a new session is open, so a failed attempt is retried
        // (and counted) by the next caller that meets `SessionExpired`.
        self.inner.local.clear();
        let id = self.open_session(stripe).await?;
        let rejoins = self.inner.sessions.rejoins.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::warn!(
            event = "client.rejoined",
            stripe,
            old_session = expired,
            new_session = id,
            rejoins
        );
        let _ = self
            .inner
            .sessions
            .events
            .send(ClientEvent::Rejoined { stripe, rejoins });
        Ok(id)
    }

    /// Subscribes to connection events.
    pub fn events(&self) -> broadcast::Receiver<ClientEvent> {
        self.inner.sessions.events.subscribe()
    }

    /// The connection state now.
    pub fn connection_state(&self) -> ConnectionState {
        *self.inner.sessions.state.borrow()
    }

    /// A receiver that sees every change of the connection state.
    pub fn watch_state(&self) -> watch::Receiver<ConnectionState> {
        self.inner.sessions.state.subscribe()
    }

    /// How many times this client has rejoined.
    pub fn rejoin_count(&self) -> u64 {
        self.inner.sessions.rejoins.load(Ordering::Relaxed)
    }

    /// The session ids in use, by stripe.
    pub fn session_ids(&self) -> Vec<Option<u64>> {
        self.inner.sessions.ids.lock().expect("sessions lock").clone()
    }

    pub(super) fn mark_disconnected(&self) {
        set_state(&self.inner, ConnectionState::Disconnected);
    }

    /// Closes every session (releasing locks and ephemeral entries at once) and stops renewing.
    pub async fn close(&self) {
        self.inner.sessions.stop.cancel();
        let ids = self.session_ids();
        for (stripe, id) in ids.into_iter().enumerate() {
            if let Some(session) = id {
                let _ = self
                    .execute(stripe, Op::Session(SessionOp::Close { session }), SESSION_CLOSE_TIMEOUT)
                    .await;
            }
        }
    }

    /// Takes a lock on a key for this client's session. `Err(LockTimeout)` when not granted in the
    /// wait; a nonstop timeout when the array does not answer (whatever the cache's behaviour).
    pub async fn lock(
        &self,
        cache: &str,
        key: &[u8],
        mode: LockMode,
        wait: LockWait,
    ) -> Result<LockHandle, ClientError> {
        self.check_key(key)?;
        self.follow_moves(|| self.lock_once(cache, key, mode, wait)).await
    }

    /// [`ArrayClient::lock`] on the key's stripe by the current document.
    async fn lock_once(
        &self,
        cache: &str,
        key: &[u8],
        mode: LockMode,
        wait: LockWait,
    ) -> Result<LockHandle, ClientError> {
        let stripe = self.stripe_of(key);
        let nonstop = self.nonstop_settings(cache).timeout;
        let mut rejoined = false;
        let unavailable = |timeout| ClientError::NonstopTimeout {
            op: "lock",
            cache: cache.into(),
            timeout,
        };
        loop {
            let session = match tokio::time::timeout(nonstop, self.session_for(stripe)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) if e.is_unavailability() => return Err(unavailable(nonstop)),
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(unavailable(nonstop)),
            };
            let timeout = match wait {
                LockWait::For(d) => d + nonstop,
                _ => nonstop,
            };
            let op = Op::Session(SessionOp::Lock {
                cache: cache.into(),
                key: key.to_vec(),
                mode,
                session,
                wait_ms: wait.as_millis(),
            });
            match self.execute(stripe, op, timeout).await {
                Ok(_) => {
                    return Ok(LockHandle {
                        cache: cache.into(),
                        key: key.to_vec(),
                        stripe,
                        session,
                    })
                }
                Err(ClientError::Server(ErrorReply::LockTimeout)) if wait == LockWait::Forever => continue,
                Err(ClientError::Server(ErrorReply::LockTimeout)) => return Err(ClientError::LockTimeout),
                Err(ClientError::Server(ErrorReply::SessionExpired)) if !rejoined => {
                    self.rejoin(stripe, session).await?;
                    rejoined = true;
                }
                Err(e) if e.is_unavailability() => {
                    tracing::debug!(event = "client.lock_nonstop_timeout", error = %e);
                    return Err(unavailable(timeout));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Takes a lock only if it is free now; `Ok(None)` when it is taken.
    pub async fn try_lock(&self, cache: &str, key: &[u8], mode: LockMode) -> Result<Option<LockHandle>, ClientError> {
        match self.lock(cache, key, mode, LockWait::NoWait).await {
            Ok(h) => Ok(Some(h)),
            Err(ClientError::LockTimeout) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Releases a lock. `InvalidLockAfterRejoin` if the client rejoined since taking it.
    pub async fn unlock(&self, lock: &LockHandle) -> Result<(), ClientError> {
        if self.current_session(lock.stripe) != Some(lock.session) {
            return Err(ClientError::InvalidLockAfterRejoin);
        }
        let timeout = self.nonstop_settings(&lock.cache).timeout;
        // Where the key lives now, released by this client's session there.
        let unlocked = self.follow_moves(|| async {
            let stripe = self.stripe_of(&lock.key);
            let session = if stripe == lock.stripe {
                Some(lock.session)
            } else {
                self.current_session(stripe)
            };
            let Some(session) = session else {
                return Err(ClientError::InvalidLockAfterRejoin);
            };
            let op = Op::Session(SessionOp::Unlock {
                cache: lock.cache.clone(),
                key: lock.key.clone(),
                session,
            });
            self.execute(stripe, op, timeout).await
        });
        match unlocked.await {
            Ok(_) => Ok(()),
            Err(ClientError::Server(ErrorReply::SessionExpired)) => Err(ClientError::InvalidLockAfterRejoin),
            Err(e) if e.is_unavailability() => Err(ClientError::NonstopTimeout {
                op: "unlock",
                cache: lock.cache.clone(),
                timeout,
            }),
            Err(e) => Err(e),
        }
    }

    /// Releases a lock held by any session of this array, given the session id (for tools that
    /// take a lock in one process and release it from another, like the CLI).
    pub async fn unlock_session(&self, cache: &str, key: &[u8], session: u64) -> Result<(), ClientError> {
        self.check_key(key)?;
        let op = Op::Session(SessionOp::Unlock {
            cache: cache.into(),
            key: key.to_vec(),
            session,
        });
        self.keyed(key, op).await.map(|_| ())
    }

    /// Locks held or waited for on every stripe (of one cache, if given).
    pub async fn list_locks(&self, cache: Option<&str>) -> Result<Vec<LockInfo>, ClientError> {
        let stripes = self.config().stripes.len();
        let mut out = Vec::new();
        for stripe in 0..stripes {
            let op = Op::Read(
                ReadOp::ListLocks {
                    cache: cache.map(str::to_string),
                },
                ReadConsistency::Linearizable,
            );
            match self.execute(stripe, op, self.inner.settings.request_timeout).await? {
                Reply::Locks(l) => out.extend(l),
                other => {
                    return Err(ClientError::Invalid(format!(
                        "unexpected reply to ListLocks: {other:?}"
                    )))
                }
            }
        }
        Ok(out)
    }
}

fn set_state(inner: &Inner, next: ConnectionState) {
    let changed = inner.sessions.state.send_if_modified(|s| {
        let changed = *s != next;
        *s = next;
        changed
    });
    if changed {
        let event = match next {
            ConnectionState::Disconnected => ClientEvent::Disconnected,
            ConnectionState::Connected => ClientEvent::Reconnected,
        };
        match next {
            ConnectionState::Disconnected => tracing::warn!(event = "client.disconnected"),
            ConnectionState::Connected => tracing::info!(event = "client.reconnected"),
        }
        let _ = inner.sessions.events.send(event);
    }
}

/// Renews every session each interval until the client is dropped or closed.
async fn keepalive_loop(inner: Weak<Inner>, stop: tokio_util::sync::CancellationToken) {
    let interval = match inner.upgrade() {
        Some(i) => i.settings.keepalive_interval,
        None => return,
    };
    // Longest wait for one stripe's renewal (or session opening) in a round.
    let wait = interval.max(KEEPALIVE_TIMEOUT_MIN);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some(inner) = inner.upgrade() else { return };
        let client = ArrayClient { inner };
        let ids = client.session_ids();
        // A client with a session holds one on every stripe, so a slot that moves finds its
        // session on the new stripe (`SessionOp::Open`).
        let any_session = ids.iter().any(Option::is_some);
        let mut all_ok = true;
        for (stripe, id) in ids.into_iter().enumerate() {
            // Bounded like a keep-alive, so a stripe that cannot open one does not hold up the
            // others' renewals (an open cut short leaves a session that expires unused).
            let id = match id {
                None if any_session => {
                    let opened = tokio::time::timeout(wait, client.session_for(stripe));
                    match opened.await {
                        Ok(Ok(id)) => Some(id),
                        outcome => {
                            let error = match outcome {
                                Ok(Err(e)) => e.to_string(),
                                _ => "no answer in time".to_string(),
                            };
                            tracing::debug!(event = "client.session_open_failed", stripe, error);
                            all_ok = false;
                            continue;
                        }
                    }
                }
                id => id,
            };
            // Without a session on the stripe, a ping to any of its servers tells whether it answers.
            let op = match id {
                Some(session) => Op::Session(SessionOp::KeepAlive { session }),
                None => Op::Ping,
            };
            let result = client.execute(stripe, op, wait).await;
            match result {
                Ok(Reply::Pong { leader: None, .. }) => {
                    tracing::debug!(
                        event = "client.keepalive_failed",
                        stripe,
                        error = "the stripe has no active"
                    );
                    all_ok = false;
                }
                Ok(_) => {}
                Err(ClientError::Server(ErrorReply::SessionExpired)) => {
                    if let Some(expired) = id {
                        if client.rejoin(stripe, expired).await.is_err() {
                            all_ok = false;
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(event = "client.keepalive_failed", stripe, error = %e);
                    all_ok = false;
                }
            }
        }
        set_state(
            &client.inner,
            if all_ok {
                ConnectionState::Connected
            } else {
                ConnectionState::Disconnected
            },
        );
    }
}
