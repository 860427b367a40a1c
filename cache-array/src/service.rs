//! The client port: authenticated, pipelined request handling.
//!
//! Each connection has a reader (this task) and a writer task. Every request is checked against the
//! limits and the stripe's slots before anything else, then served: writes through the Raft log,
//! linearizable reads after a batched read-index round, eventual reads straight from memory.
//! A malformed or oversized frame gets a `Fatal` message and the connection closes; other
//! connections are not affected.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferrocotta::handshake::{self, FramedConn, ServerIdentity};
use ferrocotta::protocol::{
    decode, encode, ClientMessage, ErrorReply, Op, ReadConsistency, Reply, Request, Response, ServerMessage,
    MAX_BATCH_KEYS, MAX_CACHE_NAME_BYTES, MAX_KEYS_PAGE,
};
use futures::StreamExt;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::Metrics;
use crate::stripe::{now_ms, Stripe};

/// Requests one client connection may have in flight; beyond it the server stops reading that
/// connection until some finish (backpressure instead of unbounded memory).
pub const REQUESTS_IN_FLIGHT_PER_CONNECTION_MAX: usize = 4096;

/// Replies queued for the writer of one connection.
pub const REPLY_QUEUE_MAX: usize = 4096;

/// Longest a new connection may take to complete its handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest deadline a request may ask for.
pub const REQUEST_TIMEOUT_MAX: Duration = Duration::from_secs(600);

/// What the client port needs.
pub struct ClientService {
    /// This server's stripe membership.
    pub stripe: Arc<Stripe>,
    /// Handshake identity (client port flavour).
    pub identity: ServerIdentity,
    /// Counters.
    pub metrics: Arc<Metrics>,
}

impl ClientService {
    /// Accepts clients until `shutdown`.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: CancellationToken, tracker: TaskTracker) {
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => return,
                a = listener.accept() => a,
            };
            let (stream, remote) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(event = "client.accept_failed", error = %e);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let this = self.clone();
            let shutdown = shutdown.clone();
            let inner = tracker.clone();
            tracker.spawn(async move {
                let max_frame = this.stripe.config.limits.max_frame_bytes as usize;
                match handshake::accept(stream, &this.identity, HANDSHAKE_TIMEOUT, max_frame).await {
                    Ok((framed, _hello)) => {
                        this.metrics.client_connections.fetch_add(1, Relaxed);
                        this.connection(framed, remote, shutdown, inner).await;
                        this.metrics.client_connections.fetch_sub(1, Relaxed);
                    }
                    Err(e) => {
                        this.metrics.rejected_connections.fetch_add(1, Relaxed);
                        tracing::warn!(event = "client.handshake_failed", remote = %remote, error = %e);
                    }
                }
            });
        }
    }

    async fn connection(
        self: &Arc<Self>,
        framed: FramedConn,
        remote: std::net::SocketAddr,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) {
        let (sink, mut stream) = framed.split();
        let (tx, rx) = mpsc::channel::<bytes::Bytes>(REPLY_QUEUE_MAX);
        let writer = tokio::spawn(handshake::write_frames(sink, rx));
        let in_flight = Arc::new(Semaphore::new(REQUESTS_IN_FLIGHT_PER_CONNECTION_MAX));
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => break,
                n = stream.next() => n,
            };
            let bytes = match next {
                None => break,
                Some(Err(e)) => {
                    self.metrics.rejected_connections.fetch_add(1, Relaxed);
                    tracing::warn!(event = "client.bad_frame", remote = %remote, error = %e);
                    let _ = tx.send(encode(&ServerMessage::Fatal(format!("bad frame: {e}")))).await;
                    break;
                }
                Some(Ok(b)) => b,
            };
            let request = match decode::<ClientMessage>(&bytes) {
                Ok(ClientMessage::Request(r)) => r,
                Ok(_) => {
                    let _ = tx
                        .send(encode(&ServerMessage::Fatal("only requests are served here".into())))
                        .await;
                    break;
                }
                Err(e) => {
                    self.metrics.rejected_connections.fetch_add(1, Relaxed);
                    tracing::warn!(event = "client.malformed_frame", remote = %remote, error = %e);
                    let _ = tx
                        .send(encode(&ServerMessage::Fatal(format!("malformed frame: {e}"))))
                        .await;
                    break;
                }
            };
            let Ok(permit) = in_flight.clone().acquire_owned().await else {
                break;
            };
            let this = self.clone();
            let tx = tx.clone();
            tracker.spawn(async move {
                let id = request.id;
                let result = this.handle(request).await;
                let _ = tx.send(encode(&ServerMessage::Response(Response { id, result }))).await;
                drop(permit);
            });
        }
        drop(tx);
        let _ = writer.await;
    }

    async fn handle(&self, request: Request) -> Result<Reply, ErrorReply> {
        let started = Instant::now();
        let kind = request.op.kind();
        let result = self.serve_request(request).await;
        self.metrics
            .record(kind, result.is_ok(), started.elapsed().as_micros() as u64);
        result
    }

    async fn serve_request(&self, request: Request) -> Result<Reply, ErrorReply> {
        let Request { op, timeout_ms, .. } = request;
        self.validate(&op)?;
        let timeout = Duration::from_millis(timeout_ms as u64).min(REQUEST_TIMEOUT_MAX);
        let stripe = &self.stripe;
        if let Op::Ping = op {
            let m = stripe.snapshot_metrics();
            return Ok(Reply::Pong {
                server: stripe.name().to_string(),
                stripe: stripe.position.stripe as u32,
                role: m.role,
                leader: m.leader,
                term: m.term,
                last_log_index: m.last_log_index,
                applied_index: m.applied_index,
            });
        }
        match op {
            Op::KeepAlive { session } => return stripe.keep_alive(session),
            Op::Lock { .. } => return stripe.lock(op, timeout).await,
            Op::OpenSession { .. } => {
                return match stripe.write(op, timeout).await? {
                    Reply::Session { id, .. } => {
                        stripe.active.saw_session(id);
                        Ok(Reply::Session {
                            id,
                            reconnect_window_ms: stripe.config.timing.client_reconnect_window.0.as_millis() as u64,
                        })
                    }
                    other => Err(ErrorReply::Internal(format!("unexpected session reply {other:?}"))),
                };
            }
            _ => {}
        }
        if op.is_write() {
            return stripe.write(op, timeout).await;
        }
        if op.read_consistency() == Some(ReadConsistency::Linearizable) {
            stripe.read_barrier(timeout).await?;
        }
        let now = now_ms();
        let reply = stripe
            .shared
            .serve_read(&op, now, &|c, k| stripe.active.pending_access(c, k))?;
        stripe.record_reads(&op, now);
        Ok(reply)
    }

    /// Checks limits and slot ownership.
    fn validate(&self, op: &Op) -> Result<(), ErrorReply> {
        let config = &self.stripe.config;
        let limits = &config.limits;
        if let Some(cache) = op.cache() {
            if cache.is_empty() || cache.len() > MAX_CACHE_NAME_BYTES {
                return Err(ErrorReply::Invalid(format!(
                    "cache names must be 1 to {MAX_CACHE_NAME_BYTES} bytes"
                )));
            }
        }
        let keys = op.keys();
        if keys.len() > MAX_BATCH_KEYS {
            return Err(ErrorReply::Invalid(format!(
                "at most {MAX_BATCH_KEYS} keys per request"
            )));
        }
        for key in &keys {
            if key.is_empty() || key.len() > limits.max_key_bytes as usize {
                return Err(ErrorReply::Invalid(format!(
                    "keys must be 1 to {} bytes",
                    limits.max_key_bytes
                )));
            }
            let owner = config.stripe_of_key(key);
            if owner != self.stripe.position.stripe {
                return Err(ErrorReply::WrongStripe { owner: owner as u32 });
            }
        }
        let too_big = |v: &Vec<u8>| v.len() > limits.max_value_bytes as usize;
        let value_too_big = match op {
            Op::Put { value, .. } | Op::PutIfAbsent { value, .. } | Op::Replace { value, .. } => too_big(value),
            Op::OpenSession { client_name } => client_name.len() > 256,
            Op::ReplaceIfEqual { expected, value, .. } => too_big(expected) || too_big(value),
            Op::RemoveIfEqual { expected, .. } => too_big(expected),
            Op::PutAll { entries, .. } => entries.iter().any(|(_, v)| too_big(v)),
            _ => false,
        };
        if value_too_big {
            return Err(ErrorReply::Invalid(format!(
                "values must be at most {} bytes",
                limits.max_value_bytes
            )));
        }
        if let Op::Keys { limit, .. } = op {
            if *limit == 0 || *limit > MAX_KEYS_PAGE {
                return Err(ErrorReply::Invalid(format!(
                    "keys pages hold 1 to {MAX_KEYS_PAGE} keys"
                )));
            }
        }
        Ok(())
    }
}
