//! The client port: authenticated, pipelined request handling.
//!
//! Each connection has a reader (this task) and a writer task. Every request is checked against the
//! limits, the connection's grant (full access, or a credential's rules) and the stripe's slots
//! before anything else, then served: writes through the Raft log, linearizable reads after a
//! batched read-index round, eventual reads straight from memory.
//!
//! Bounds (docs/security.md): connections through an [`Admission`]; a deadline for the handshake,
//! for each frame and for silence; per connection, requests in flight by count and by bytes, and
//! replies queued by bytes, so a client that sends without reading is simply not read any more.
//! A reply that would not fit a frame becomes an error reply. A malformed or oversized frame gets a
//! `Fatal` message and the connection closes; other connections are not affected. If the writer
//! stops (the socket broke), the reader stops too: no request is served that cannot be answered.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use ferrocotta::handshake::{self, FrameDeadlines, FramedConn};
use ferrocotta::log_throttle::LogThrottle;
use ferrocotta::protocol::{
    check_cache_name, decode, encode, ClientMessage, ConnectionRole, ErrorReply, Hello, Op, ReadConsistency, ReadOp,
    Refusal, Reply, Request, Response, ServerMessage, SessionOp, WriteOp, BATCH_KEYS_MAX, KEYS_PAGE_MAX,
};
use ferrocotta::security::{Credentials, Grant};
use ferrocotta::tls::NetStream;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::command::{Change, KeepAlive, OpenSession};
use crate::listener::{self, HandshakeFailed, Listening, Port};
use crate::metrics::Metrics;
use crate::store::{ReadError, ReplyRoom};
use crate::stripe::{now_ms, Stripe};

/// Requests one client connection may have in flight; beyond it the server stops reading that
/// connection until some finish (backpressure instead of unbounded memory).
pub const REQUESTS_IN_FLIGHT_PER_CONNECTION_MAX: usize = 1024;

/// Requests and replies up to this size are bounded by their count alone (1,024 in flight of at
/// most 64 KiB each); larger ones also take their size from the connection's byte budgets. Most
/// requests and replies are small, and two semaphores per request cost about as much as serving a
/// read from memory.
pub const SMALL_MESSAGE_BYTES: usize = 64 * 1024;

/// Bytes of large requests one connection may have in flight (a larger single request still goes,
/// alone).
pub const REQUEST_BYTES_IN_FLIGHT_PER_CONNECTION_MAX: usize = 64 * 1024 * 1024;

/// Replies queued for the writer of one connection.
pub const REPLY_QUEUE_MAX: usize = 4096;

/// Bytes of large replies queued for one connection's writer, taken before a reply is built: a
/// client that does not read its replies holds at most this much (plus the burst being written and
/// its small replies) before its requests wait.
pub const REPLY_BYTES_QUEUED_PER_CONNECTION_MAX: usize = 32 * 1024 * 1024;

/// Longest deadline a request may ask for.
pub const REQUEST_TIMEOUT_MAX: Duration = Duration::from_secs(600);

/// Longest client name a session may carry.
pub const CLIENT_NAME_BYTES_MAX: usize = 256;

/// Longest the server spends telling a refused connection why.
pub const REFUSAL_WRITE_MAX: Duration = Duration::from_millis(200);

/// Which secret proves which role on the client port.
pub struct ClientAuthority {
    /// The cluster secret (empty: the array has none and anyone has full access).
    pub cluster_secret: Vec<u8>,
    /// Named credentials; re-read on SIGHUP.
    pub credentials: Arc<RwLock<Credentials>>,
}

impl handshake::Authority for ClientAuthority {
    fn secret_for(&self, role: &ConnectionRole) -> Result<Option<Vec<u8>>, Refusal> {
        match role {
            ConnectionRole::Client => Ok(Some(self.cluster_secret.clone())),
            ConnectionRole::Credential { name } => {
                Ok(self.credentials.read().expect("credentials lock").secret_of(name))
            }
            ConnectionRole::Peer { .. } => Err(Refusal::WrongPort(
                "this is a client port; peers use the group port".into(),
            )),
        }
    }
}

/// What the client port needs.
pub struct ClientService {
    /// This server's stripe membership.
    pub stripe: Arc<Stripe>,
    /// The port: handshake identity (client flavour, with a [`ClientAuthority`]), TLS, bounds.
    pub listening: Listening,
    /// Credentials, to turn a credential's hello into its grant.
    pub credentials: Arc<RwLock<Credentials>>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// The console's events (failed handshakes).
    pub recorder: Arc<crate::console::Recorder>,
}

static HANDSHAKE_FAILED: LogThrottle = LogThrottle::new();
static BAD_FRAME: LogThrottle = LogThrottle::new();
static REFUSED: LogThrottle = LogThrottle::new();

/// A reply queued for the writer, holding its share of the connection's reply budget until the
/// writer takes it.
struct QueuedReply {
    frame: bytes::Bytes,
    _budget: Option<OwnedSemaphorePermit>,
}

impl From<QueuedReply> for bytes::Bytes {
    fn from(r: QueuedReply) -> bytes::Bytes {
        r.frame
    }
}

/// When the server stops, how long a connection must have sent no new request (with every
/// request it sent answered) before it is closed; see [`draining_done`].
pub const DRAIN_QUIET: Duration = Duration::from_millis(100);

/// Longest a connection drains when the server stops, however busy its client is.
pub const DRAIN_MAX: Duration = Duration::from_secs(3);

/// Resolves when a draining connection may close: every request in flight was answered and no
/// new one came for [`DRAIN_QUIET`], or [`DRAIN_MAX`] passed. A request that arrives while it
/// drains is answered `ShuttingDown` (definitely not applied; clients try another server), so a
/// client never loses an answer to a request it sent before the connection closed: no write of a
/// stopping server is left in doubt.
async fn draining_done(since: Instant, last_request: Instant, in_flight: &Semaphore) {
    loop {
        let quiet = last_request.max(since).elapsed() >= DRAIN_QUIET;
        let answered = in_flight.available_permits() == REQUESTS_IN_FLIGHT_PER_CONNECTION_MAX;
        if (quiet && answered) || since.elapsed() >= DRAIN_MAX {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Permits of a byte budget for `bytes` (a single item larger than the budget takes all of it).
async fn take_budget(budget: &Arc<Semaphore>, bytes: usize, max: usize) -> Option<OwnedSemaphorePermit> {
    budget.clone().acquire_many_owned(bytes.clamp(1, max) as u32).await.ok()
}

impl Port for ClientService {
    fn listening(&self) -> &Listening {
        &self.listening
    }

    async fn refused(&self, tcp: TcpStream, remote: SocketAddr, why: String) {
        self.metrics.rejected_connections.fetch_add(1, Relaxed);
        if let Some(suppressed) = REFUSED.allow() {
            tracing::warn!(event = "client.connection_refused", remote = %remote, reason = %why, suppressed);
        }
        // Plain connections are told why; a TLS one would need a handshake first.
        if self.listening.tls.is_none() {
            handshake::refuse_busy(NetStream::Plain(tcp), why, REFUSAL_WRITE_MAX).await;
        }
    }

    fn handshake_failed(&self, remote: SocketAddr, error: HandshakeFailed) {
        if error.is_disconnect() {
            tracing::debug!(event = "client.left_before_handshake", remote = %remote, error = %error);
            return;
        }
        self.metrics.rejected_connections.fetch_add(1, Relaxed);
        if let Some(suppressed) = HANDSHAKE_FAILED.allow() {
            tracing::warn!(event = "client.handshake_failed", remote = %remote, error = %error, suppressed);
            let more = if suppressed > 0 {
                format!(" ({suppressed} more not shown)")
            } else {
                String::new()
            };
            self.recorder
                .event("handshake_failed", format!("client port, from {remote}: {error}{more}"));
        }
    }

    async fn serve_connection(
        self: Arc<Self>,
        framed: FramedConn,
        hello: Hello,
        remote: SocketAddr,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) {
        let grant = match &hello.role {
            ConnectionRole::Credential { name } => {
                match self.credentials.read().expect("credentials lock").grant_of(name) {
                    Some(g) => g,
                    None => return,
                }
            }
            _ => Grant::Full,
        };
        self.metrics.client_connections.fetch_add(1, Relaxed);
        self.connection(framed, remote, grant, shutdown, tracker).await;
        self.metrics.client_connections.fetch_sub(1, Relaxed);
    }
}

impl ClientService {
    async fn connection(
        self: &Arc<Self>,
        framed: FramedConn,
        remote: SocketAddr,
        grant: Grant,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) {
        let limits = &self.stripe.config().limits;
        let deadlines = FrameDeadlines {
            idle: limits.idle_timeout.0,
            frame: limits.frame_timeout.0,
        };
        let max_frame = limits.max_frame_bytes as usize;
        let (mut reader, writer) = handshake::split_framed(framed, deadlines);
        let (tx, rx) = mpsc::channel::<QueuedReply>(REPLY_QUEUE_MAX);
        let mut writer = tokio::spawn(handshake::write_frames(writer, rx, None));
        let in_flight = Arc::new(Semaphore::new(REQUESTS_IN_FLIGHT_PER_CONNECTION_MAX));
        let request_bytes = Arc::new(Semaphore::new(REQUEST_BYTES_IN_FLIGHT_PER_CONNECTION_MAX));
        let reply_bytes = Arc::new(Semaphore::new(REPLY_BYTES_QUEUED_PER_CONNECTION_MAX));
        let grant = Arc::new(grant);
        // Set when the server stops: (since when, last request seen).
        let mut draining: Option<(Instant, Instant)> = None;
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled(), if draining.is_none() => {
                    draining = Some((Instant::now(), Instant::now()));
                    continue;
                }
                _ = async {
                    match draining {
                        Some((since, last)) => draining_done(since, last, &in_flight).await,
                        None => std::future::pending().await,
                    }
                } => break,
                // The writer stopped (the socket broke): nothing could be answered any more.
                _ = &mut writer => return,
                n = reader.next() => n,
            };
            let bytes = match next {
                Ok(None) => break,
                Err(handshake::FrameError::Idle(d)) => {
                    tracing::debug!(event = "client.idle_closed", remote = %remote, idle = ?d);
                    let _ = tx.send(fatal(&format!("idle for {d:?}; closing"))).await;
                    break;
                }
                Err(e) if e.is_disconnect() => {
                    tracing::debug!(event = "client.connection_closed", remote = %remote, error = %e);
                    break;
                }
                Err(e) => {
                    self.metrics.rejected_connections.fetch_add(1, Relaxed);
                    if let Some(suppressed) = BAD_FRAME.allow() {
                        tracing::warn!(event = "client.bad_frame", remote = %remote, error = %e, suppressed);
                    }
                    let _ = tx.send(fatal(&e.to_string())).await;
                    break;
                }
                Ok(Some(b)) => b,
            };
            let request = match decode::<ClientMessage>(&bytes) {
                Ok(ClientMessage::Request(r)) => r,
                Ok(_) => {
                    let _ = tx.send(fatal("only requests are served here")).await;
                    break;
                }
                Err(e) => {
                    self.metrics.rejected_connections.fetch_add(1, Relaxed);
                    if let Some(suppressed) = BAD_FRAME.allow() {
                        tracing::warn!(event = "client.malformed_frame", remote = %remote, error = %e, suppressed);
                    }
                    let _ = tx.send(fatal(&format!("malformed frame: {e}"))).await;
                    break;
                }
            };
            if let Some((_, last)) = draining.as_mut() {
                *last = Instant::now();
                let frame = encode(&ServerMessage::Response(Response {
                    id: request.id,
                    generation: self.stripe.roster().generation(),
                    result: Err(ErrorReply::ShuttingDown),
                }));
                let _ = tx.send(QueuedReply { frame, _budget: None }).await;
                continue;
            }
            let frame_len = bytes.len();
            drop(bytes);
            // Backpressure: wait for room by count (and by bytes for a large request) before
            // reading on.
            let Ok(permit) = in_flight.clone().acquire_owned().await else {
                break;
            };
            let bytes_permit = if frame_len > SMALL_MESSAGE_BYTES {
                take_budget(&request_bytes, frame_len, REQUEST_BYTES_IN_FLIGHT_PER_CONNECTION_MAX).await
            } else {
                None
            };
            let this = self.clone();
            let tx = tx.clone();
            let grant = grant.clone();
            let reply_bytes = reply_bytes.clone();
            tracker.spawn(async move {
                let id = request.id;
                let (result, budget) = this.handle(request, &grant, &reply_bytes).await;
                let generation = this.stripe.roster().generation();
                let mut frame = encode(&ServerMessage::Response(Response { id, generation, result }));
                if frame.len() > max_frame {
                    let why = format!(
                        "the reply takes {} bytes, more than the frame limit of {max_frame}; ask for less",
                        frame.len()
                    );
                    frame = encode(&ServerMessage::Response(Response {
                        id,
                        generation,
                        result: Err(ErrorReply::Invalid(why)),
                    }));
                }
                drop(bytes_permit);
                let _ = tx.send(QueuedReply { frame, _budget: budget }).await;
                drop(permit);
            });
        }
        drop(tx);
        let _ = writer.await;
    }

    /// Serves a request; its result, and the share of the reply budget a large reply took. The
    /// Redis front end serves its commands through here too.
    pub(crate) async fn handle(
        &self,
        request: Request,
        grant: &Grant,
        reply_budget: &Arc<Semaphore>,
    ) -> (Result<Reply, ErrorReply>, Option<OwnedSemaphorePermit>) {
        let started = Instant::now();
        let kind = request.op.kind();
        let (result, budget) = match self.serve_request(request, grant, reply_budget).await {
            Ok((reply, budget)) => (Ok(reply), budget),
            Err(e) => (Err(e), None),
        };
        self.metrics
            .record(kind, result.is_ok(), started.elapsed().as_micros() as u64);
        (result, budget)
    }

    /// Serves one connection's run of writes (the Redis front end's pipelines): each checked as
    /// [`ClientService::handle`] checks it, then all proposed in their order and awaited together.
    pub(crate) async fn handle_writes(
        &self,
        ops: Vec<WriteOp>,
        grant: &Grant,
        timeout: Duration,
    ) -> Vec<Result<Reply, ErrorReply>> {
        let started = Instant::now();
        let max_value_bytes = self.stripe.config().limits.max_value_bytes as u64;
        let mut results: Vec<Option<Result<Reply, ErrorReply>>> = Vec::with_capacity(ops.len());
        let mut kinds = Vec::with_capacity(ops.len());
        let mut changes = Vec::new();
        for op in ops {
            let op = Op::Write(op);
            kinds.push(op.kind());
            match self.validate(&op).and_then(|_| self.authorize(&op, grant)) {
                Ok(()) => {
                    if let Op::Write(write) = op {
                        changes.push(Change::of_write(write, max_value_bytes));
                    }
                    results.push(None);
                }
                Err(e) => results.push(Some(Err(e))),
            }
        }
        let mut applied = self
            .stripe
            .write_many(changes, timeout.min(REQUEST_TIMEOUT_MAX))
            .await
            .into_iter();
        let results: Vec<Result<Reply, ErrorReply>> = results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| applied.next().unwrap_or(Err(ErrorReply::ShuttingDown))))
            .collect();
        let micros = started.elapsed().as_micros() as u64;
        for (kind, r) in kinds.iter().zip(&results) {
            self.metrics.record(*kind, r.is_ok(), micros);
        }
        results
    }

    async fn serve_request(
        &self,
        request: Request,
        grant: &Grant,
        reply_budget: &Arc<Semaphore>,
    ) -> Result<(Reply, Option<OwnedSemaphorePermit>), ErrorReply> {
        let Request { op, timeout_ms, .. } = request;
        self.validate(&op)?;
        self.authorize(&op, grant)?;
        let timeout = Duration::from_millis(timeout_ms as u64).min(REQUEST_TIMEOUT_MAX);
        match op {
            Op::Ping => Ok((self.pong(), None)),
            Op::Write(op) => {
                let max_value_bytes = self.stripe.config().limits.max_value_bytes as u64;
                let change = Change::of_write(op, max_value_bytes);
                Ok((self.stripe.write(change, timeout).await?, None))
            }
            Op::Session(op) => Ok((self.session(op, grant, timeout).await?, None)),
            Op::Read(op, consistency) => self.read(op, consistency, grant, reply_budget, timeout).await,
        }
    }

    /// This server's name, place and Raft facts.
    fn pong(&self) -> Reply {
        let stripe = &self.stripe;
        let m = stripe.snapshot_metrics();
        Reply::Pong {
            server: stripe.name().to_string(),
            stripe: stripe.position().stripe as u32,
            role: m.role,
            leader: m.leader,
            term: m.term,
            last_log_index: m.last_log_index,
            applied_index: m.applied_index,
        }
    }

    /// Sessions and locks: a keep-alive from memory, the rest through the log.
    async fn session(&self, op: SessionOp, grant: &Grant, timeout: Duration) -> Result<Reply, ErrorReply> {
        let stripe = &self.stripe;
        let change = match Change::try_from(op) {
            Ok(change) => change,
            Err(KeepAlive(session)) => return stripe.keep_alive(session),
        };
        match change {
            Change::OpenSession(OpenSession { client_name, client_id }) => {
                let client_name = grant.session_name(&client_name);
                match stripe
                    .write(Change::OpenSession(OpenSession { client_name, client_id }), timeout)
                    .await?
                {
                    Reply::Session { id, .. } => {
                        stripe.active().saw_session(id);
                        let window = stripe.config().timing.client_reconnect_window.0;
                        Ok(Reply::Session {
                            id,
                            reconnect_window_ms: window.as_millis() as u64,
                        })
                    }
                    other => Err(ErrorReply::Internal(format!("unexpected session reply {other:?}"))),
                }
            }
            Change::Lock(lock) => stripe.lock(lock, timeout).await,
            change => stripe.write(change, timeout).await,
        }
    }

    /// A read from this server's applied state, after a read-index round when it must be
    /// linearizable.
    async fn read(
        &self,
        op: ReadOp,
        consistency: ReadConsistency,
        grant: &Grant,
        reply_budget: &Arc<Semaphore>,
        timeout: Duration,
    ) -> Result<(Reply, Option<OwnedSemaphorePermit>), ErrorReply> {
        let stripe = &self.stripe;
        if consistency == ReadConsistency::Linearizable {
            stripe.read_barrier(timeout).await?;
        }
        let now = now_ms();
        let limit = stripe.config().limits.max_reply_payload_bytes();
        let mut room = ReplyRoom {
            limit,
            granted: SMALL_MESSAGE_BYTES,
        };
        let mut budget = None;
        let pending = |c: &str, k: &[u8]| stripe.active().pending_access(c, k);
        // A small reply in one pass; a large one takes its share of the connection's reply
        // budget first, then is built (see `Store::read`).
        let reply = loop {
            match stripe.shared().serve_read(&op, now, room, &pending) {
                Ok(reply) => break reply,
                Err(ReadError::Failed(e)) => return Err(e),
                // It grew between the two passes: it still fits a frame, so serve it.
                Err(ReadError::Larger(_)) if budget.is_some() => room.granted = limit,
                Err(ReadError::Larger(bytes)) => {
                    budget = take_budget(reply_budget, bytes, REPLY_BYTES_QUEUED_PER_CONNECTION_MAX).await;
                    room.granted = bytes;
                }
            }
        };
        stripe.record_reads(&op, now);
        let reply = match (reply, grant) {
            (Reply::Locks(locks), Grant::Limited { .. }) => {
                Reply::Locks(locks.into_iter().filter(|l| grant.may_read(&l.cache)).collect())
            }
            (reply, _) => reply,
        };
        Ok((reply, budget))
    }

    /// Checks what the connection's grant allows: reads and writes by cache, sessions by owner.
    fn authorize(&self, op: &Op, grant: &Grant) -> Result<(), ErrorReply> {
        let Grant::Limited { credential, .. } = grant else {
            return Ok(());
        };
        let forbidden = |what: String| {
            Err(ErrorReply::Forbidden(format!(
                "credential `{credential}` may not {what}"
            )))
        };
        // Reads need read access to the cache; changes, locks included, write access.
        for (cache, write) in op.caches() {
            let allowed = if write {
                grant.may_write(cache)
            } else {
                grant.may_read(cache)
            };
            if !allowed {
                return forbidden(format!("{} cache `{cache}`", if write { "write" } else { "read" }));
            }
        }
        let session = match op {
            Op::Session(SessionOp::Open { .. }) if !grant.may_open_sessions() => {
                return forbidden("open sessions".into())
            }
            Op::Session(op) => op.session(),
            Op::Write(op) => op.session(),
            Op::Ping | Op::Read(..) => None,
        };
        if let Some(id) = session {
            let owner = self
                .stripe
                .shared()
                .read(|d| d.store.sessions.get(&id).map(|s| s.client_name.clone()));
            if owner.is_some_and(|name| !grant.owns_session(&name)) {
                return forbidden(format!("use session {id}, which another client opened"));
            }
        }
        Ok(())
    }

    /// Checks limits and slot ownership.
    fn validate(&self, op: &Op) -> Result<(), ErrorReply> {
        let config = &self.stripe.config();
        let limits = &config.limits;
        for (cache, _) in op.caches() {
            check_cache_name(cache).map_err(ErrorReply::Invalid)?;
        }
        if let Op::Write(WriteOp::Txn(txn)) = op {
            txn.check().map_err(ErrorReply::Invalid)?;
        }
        let keys = op.keys();
        if keys.len() > BATCH_KEYS_MAX {
            return Err(ErrorReply::Invalid(format!(
                "at most {BATCH_KEYS_MAX} keys per request"
            )));
        }
        for key in &keys {
            if key.is_empty() || key.len() > limits.max_key_bytes as usize {
                return Err(ErrorReply::Invalid(format!(
                    "keys must be 1 to {} bytes",
                    limits.max_key_bytes
                )));
            }
        }
        if !keys.is_empty() {
            // Slot owners by the live document: slots move between stripes (`crate::slot_moves`).
            let live = self.stripe.roster().config();
            let mine = self.stripe.position().stripe;
            if let Some(owner) = keys.iter().map(|k| live.stripe_of_key(k)).find(|&o| o != mine) {
                return Err(ErrorReply::WrongStripe { owner: owner as u32 });
            }
        }
        if let Op::Session(SessionOp::Open { client_name, .. }) = op {
            if client_name.len() > CLIENT_NAME_BYTES_MAX {
                return Err(ErrorReply::Invalid(format!(
                    "client names are at most {CLIENT_NAME_BYTES_MAX} bytes"
                )));
            }
        }
        let value_too_big = match op {
            Op::Write(op) => op.largest_value() > limits.max_value_bytes as usize,
            Op::Ping | Op::Read(..) | Op::Session(_) => false,
        };
        if value_too_big {
            return Err(ErrorReply::Invalid(format!(
                "values must be at most {} bytes",
                limits.max_value_bytes
            )));
        }
        if let Op::Read(ReadOp::Keys { limit, .. }, _) = op {
            if *limit == 0 || *limit > KEYS_PAGE_MAX {
                return Err(ErrorReply::Invalid(format!(
                    "keys pages hold 1 to {KEYS_PAGE_MAX} keys"
                )));
            }
        }
        Ok(())
    }
}

fn fatal(why: &str) -> QueuedReply {
    QueuedReply {
        frame: listener::fatal(why),
        _budget: None,
    }
}
