//! Routing requests to a stripe's servers: the active first (the leader hint, learned from replies
//! and `NotLeader` redirects), the others at a rotating offset, recently failed servers last; one
//! request retried within its deadline until a server answers for sure.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::ClusterConfig;
use crate::protocol::{ErrorReply, Op, ReadConsistency, Reply, Role};

use super::{
    ArrayClient, CallError, ClientError, ConnectFailure, Connection, CONNECT_STAGGER, ROUND_BACKOFF_MAX,
    ROUND_BACKOFF_STEP,
};

/// One server of the current config, with its connection.
pub(super) struct ServerHandle {
    /// Client address.
    pub(super) addr: String,
    /// The live connection, if any; the async mutex makes concurrent callers share one connect.
    pub(super) conn: tokio::sync::Mutex<Option<Arc<Connection>>>,
    /// When the last connect failed and why; such a server is tried last for a while.
    pub(super) last_failure: Mutex<Option<(Instant, String)>>,
    /// When the dial in progress started, if one is; a server that takes long to answer one is
    /// tried last, like one that failed.
    pub(super) dialling_since: Mutex<Option<Instant>>,
    /// Set when the server answered `ShuttingDown`: its live connection takes no new request (so
    /// the server can finish and close it); a connection made after it closed clears it.
    pub(super) stopping: std::sync::atomic::AtomicBool,
}

/// How long a request waits on the stripe's active before it asks the other servers whether
/// another one is the active now (one that is means the awaited server is cut off or deposed).
pub const SILENT_ACTIVE_AFTER: Duration = Duration::from_millis(400);

/// Pause before a key a server disowned is routed again (the refreshed document may still be
/// catching up with a move that is finishing).
const MOVED_RETRY_PAUSE: Duration = Duration::from_millis(10);

/// How often the other servers are asked after that.
const SILENT_ACTIVE_POLL: Duration = Duration::from_millis(100);

/// Routing state derived from one config document.
pub(super) struct Routing {
    /// The document.
    pub(super) config: Arc<ClusterConfig>,
    /// Its text, to notice when a server hands over a different one.
    pub(super) config_toml: String,
    /// Server handles by name.
    pub(super) servers: HashMap<String, Arc<ServerHandle>>,
    /// Names of each stripe's servers, in config order.
    pub(super) stripe_servers: Vec<Vec<String>>,
}

impl Routing {
    pub(super) fn new(
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
                    dialling_since: Mutex::new(None),
                    stopping: std::sync::atomic::AtomicBool::new(false),
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

/// Whether connecting to a server failed within the last `window`, or a dial to it has gone
/// unanswered for longer than [`CONNECT_STAGGER`] (a mirror's `NotLeader` hint naming a dead
/// active must not send the client straight back to it).
fn recently_failed(routing: &Routing, name: &str, window: Duration) -> bool {
    let Some(h) = routing.servers.get(name) else {
        return false;
    };
    let failed = h
        .last_failure
        .lock()
        .expect("failure lock")
        .as_ref()
        .is_some_and(|(at, _)| at.elapsed() < window);
    let hanging = h
        .dialling_since
        .lock()
        .expect("dialling lock")
        .is_some_and(|since| since.elapsed() >= CONNECT_STAGGER);
    failed || hanging
}

impl ArrayClient {
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

    /// Resolves once another server of the stripe says it is the active, after the request to
    /// `name` has gone unanswered for [`SILENT_ACTIVE_AFTER`]; pending for ever otherwise (the
    /// caller races it against the request).
    async fn active_moved(&self, routing: &Routing, stripe: usize, name: &str) -> String {
        tokio::time::sleep(SILENT_ACTIVE_AFTER).await;
        loop {
            let actives = self.others_saying_active(routing, stripe, name).await;
            if let Some(active) = actives.into_iter().find(|s| s != name) {
                return active;
            }
            tokio::time::sleep(SILENT_ACTIVE_POLL).await;
        }
    }

    /// The servers of a stripe other than `silent` that say they are its active, as asked at
    /// most [`SILENT_ACTIVE_POLL`] ago by this or another request waiting on `silent` (one asks
    /// while the others wait for its answer).
    async fn others_saying_active(&self, routing: &Routing, stripe: usize, silent: &str) -> Vec<String> {
        let key = (stripe, silent.to_string());
        {
            let mut asked = self.inner.actives_asked.lock().expect("actives lock");
            if let Some((at, actives)) = asked.get(&key) {
                if at.elapsed() < SILENT_ACTIVE_POLL {
                    return actives.clone();
                }
            }
            // Claimed while this request asks: the others wait for the next round.
            asked.insert(key.clone(), (Instant::now(), Vec::new()));
        }
        let others = routing.stripe_servers[stripe].iter().filter(|s| *s != silent);
        let asks = others.map(|server| {
            let handle = routing.servers[server].clone();
            async move {
                let conn = self.connection(&handle, CONNECT_STAGGER).await.ok()?;
                match conn.call(Op::Ping, SILENT_ACTIVE_POLL * 2).await {
                    Ok(Reply::Pong {
                        role: Role::Active,
                        server,
                        ..
                    }) => Some(server),
                    _ => None,
                }
            }
        });
        let actives: Vec<String> = futures::future::join_all(asks).await.into_iter().flatten().collect();
        self.inner
            .actives_asked
            .lock()
            .expect("actives lock")
            .insert(key, (Instant::now(), actives.clone()));
        actives
    }

    /// Runs `attempt` (which routes its keys by the current document) again while a server says
    /// a key is not its stripe's, or the stripe it picked left the layout meanwhile, until the
    /// request timeout: slots moved, and the document was refreshed meanwhile
    /// ([`ArrayClient::refresh_everywhere`]).
    pub(super) async fn follow_moves<T, F, Fut>(&self, mut attempt: F) -> Result<T, ClientError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        let deadline = Instant::now() + self.inner.settings.request_timeout;
        loop {
            match attempt().await {
                Err(ClientError::Server(ErrorReply::WrongStripe { .. }) | ClientError::StripeRemoved { .. })
                    if Instant::now() < deadline =>
                {
                    tokio::time::sleep(MOVED_RETRY_PAUSE).await;
                }
                other => return other,
            }
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
                // The layout shrank after the caller picked the stripe (a removed stripe).
                return Err(ClientError::StripeRemoved { stripe });
            }
            let mut redirected = false;
            for name in self.candidates(&routing, stripe, needs_leader) {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                let handle = routing.servers[&name].clone();
                let conn = match self.connection(&handle, CONNECT_STAGGER.min(deadline - now)).await {
                    Ok(c) => c,
                    Err(ConnectFailure::Final(e)) => return Err(e),
                    Err(ConnectFailure::Retry(why)) => {
                        failures.insert(name.clone(), why);
                        continue;
                    }
                };
                let left = deadline.saturating_duration_since(Instant::now());
                let answer = if needs_leader && routing.stripe_servers[stripe].len() > 1 {
                    let call = conn.call(op.clone(), left);
                    tokio::pin!(call);
                    tokio::select! {
                        biased;
                        answer = &mut call => Some(answer),
                        active = self.active_moved(&routing, stripe, &name) => {
                            // The server we wait on is cut off or deposed: it may never answer.
                            tracing::debug!(event = "client.active_moved", from = %name, to = %active);
                            self.set_leader(stripe, Some(active.clone()));
                            let why = format!("no answer, and {active} is the active now");
                            *handle.last_failure.lock().expect("failure lock") = Some((Instant::now(), why.clone()));
                            if changes {
                                return Err(ClientError::Indeterminate(format!(
                                    "{name} did not answer and {active} is the stripe's active now: the request may or may not have been applied"
                                )));
                            }
                            failures.insert(name.clone(), why);
                            redirected = true;
                            None
                        }
                    }
                } else {
                    Some(conn.call(op.clone(), left).await)
                };
                let Some(answer) = answer else {
                    break;
                };
                // The server's stripe changed servers since this client's document: take the new
                // one before following a redirect that may name a server this client has not met.
                let generation = conn.generation();
                if generation > routing.config.stripes[stripe].generation {
                    self.refresh_from(&handle, stripe, generation).await;
                }
                match answer {
                    Ok(reply) => {
                        if needs_leader {
                            self.set_leader(stripe, Some(name));
                        }
                        return Ok(reply);
                    }
                    Err(CallError::Server(ErrorReply::NotLeader { leader: Some(l) }))
                        if l != name
                            && self.routing().servers.contains_key(&l)
                            && !recently_failed(&self.routing(), &l, self.inner.settings.reconnect_wait_interval) =>
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
                        // Slots moved (or stripes were added) since this client's document: take
                        // every stripe's, and let the caller route the key again
                        // ([`ArrayClient::follow_moves`]). Nothing was applied.
                        tracing::debug!(event = "client.key_moved", server = %name, owner);
                        self.refresh_everywhere().await;
                        return Err(ClientError::Server(ErrorReply::WrongStripe { owner }));
                    }
                    Err(CallError::Server(ErrorReply::SlotMoving { slot })) => {
                        // A moment while the slot's entries are copied to its new stripe: ask
                        // again after the round's pause (nothing was applied).
                        failures.insert(name.clone(), format!("slot {slot} is moving"));
                        break;
                    }
                    Err(CallError::Server(ErrorReply::ShuttingDown)) => {
                        // It is stopping (and did not apply the request): try it last for a while,
                        // and not as the active.
                        self.forget_leader(stripe, &name);
                        handle.stopping.store(true, std::sync::atomic::Ordering::Release);
                        *handle.last_failure.lock().expect("failure lock") =
                            Some((Instant::now(), "shutting down".into()));
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
}
