//! A pipelined connection to one array server: many requests in flight over one framed stream,
//! replies matched by id. It is the client's transport and the peers' Raft transport (a server
//! calls its peers through it), so it lives beside both rather than inside the client.
//!
//! A writer task drains a bounded queue of outgoing requests into the socket, flushing once per
//! burst rather than once per request; a reader task matches replies to waiting callers by request
//! id. Many requests are in flight at once, and replies may come back in any order.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{mpsc, oneshot};

use crate::handshake::FramedConn;
use crate::protocol::{decode, encode, ClientMessage, ErrorReply, Op, PeerRpc, Reply, Request, ServerMessage, Welcome};

/// Requests queued for the writer of one connection before callers wait for room.
pub const OUTGOING_QUEUE_MAX: usize = 4096;

/// Id of the pings a client sends on a connection that has been idle (no caller waits for them;
/// request ids start at 1).
const IDLE_PING_ID: u64 = 0;

/// How a call on a connection failed.
#[derive(Debug, Clone)]
pub enum CallError {
    /// The connection was already closed; the request was never sent, so retrying is safe.
    NotSent(String),
    /// The connection broke after the request was queued: it may or may not have been applied.
    Lost(String),
    /// The server answered with an error.
    Server(ErrorReply),
    /// No answer within the caller's timeout; the outcome is unknown.
    TimedOut,
    /// The request is larger than the frame limit: it was not sent (a definite refusal).
    TooLarge {
        /// Bytes of the encoded request.
        bytes: usize,
        /// The frame limit.
        max: usize,
    },
}

/// What a waiter receives.
enum Answer {
    /// Reply to a client request.
    Reply(Result<Reply, ErrorReply>),
    /// Reply to a peer's Raft call (opaque payload).
    Peer(Vec<u8>),
}

type Waiter = oneshot::Sender<Answer>;

struct Pending {
    /// Callers waiting for a reply, by request id.
    waiters: HashMap<u64, Waiter>,
    /// Set when the connection broke; no new waiter is added after that.
    closed: Option<String>,
}

/// A live connection; cheap to share.
pub struct Connection {
    /// What the server said in the handshake.
    pub welcome: Welcome,
    /// Queue of encoded frames for the writer task.
    outgoing: mpsc::Sender<bytes::Bytes>,
    /// Callers waiting for replies.
    pending: Arc<Mutex<Pending>>,
    /// Source of request ids.
    next_id: AtomicU64,
    /// Largest frame the server accepts; a larger request is refused here, before it is sent.
    max_frame_bytes: usize,
    /// The reader task, stopped when the last holder lets the connection go (a connection
    /// dropped because it stopped answering must not keep its socket for ever).
    reader: tokio::task::AbortHandle,
    /// The highest configuration generation the server's responses named.
    generation: Arc<AtomicU64>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Connection {
    /// Takes over a connection that finished its handshake and starts its reader and writer.
    /// With `idle_ping`, a connection that has sent nothing for that long sends a ping, so the
    /// server's idle timeout never closes a connection a client still holds (which could race with
    /// a request and make its outcome unknown). Peer connections carry heartbeats and pass `None`.
    pub fn start(framed: FramedConn, welcome: Welcome, idle_ping: Option<Duration>) -> Arc<Connection> {
        let max_frame_bytes = framed.codec().max_frame_length();
        let (sink, stream) = framed.split();
        let (tx, rx) = mpsc::channel::<bytes::Bytes>(OUTGOING_QUEUE_MAX);
        let pending = Arc::new(Mutex::new(Pending {
            waiters: HashMap::new(),
            closed: None,
        }));
        let ping = idle_ping.map(|every| {
            let frame = encode(&ClientMessage::Request(Request {
                id: IDLE_PING_ID,
                timeout_ms: every.as_millis().min(u32::MAX as u128) as u32,
                op: Op::Ping,
            }));
            (every, frame)
        });
        tokio::spawn(write_loop(sink, rx, pending.clone(), ping));
        let generation = Arc::new(AtomicU64::new(0));
        let reader = tokio::spawn(read_loop(stream, pending.clone(), generation.clone())).abort_handle();
        Arc::new(Connection {
            welcome,
            outgoing: tx,
            pending,
            next_id: AtomicU64::new(1),
            max_frame_bytes,
            reader,
            generation,
        })
    }

    /// The highest configuration generation of its stripe the server has named in a response
    /// (0 before the first).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Whether the connection is known to be broken.
    pub fn is_closed(&self) -> bool {
        self.pending.lock().expect("pending lock").closed.is_some()
    }

    /// Sends one request and waits for its reply, at most `timeout`.
    pub async fn call(&self, op: Op, timeout: Duration) -> Result<Reply, CallError> {
        let timeout_ms = timeout.as_millis().min(u32::MAX as u128) as u32;
        let answer = self
            .roundtrip(timeout, |id| ClientMessage::Request(Request { id, timeout_ms, op }))
            .await?;
        match answer {
            Answer::Reply(Ok(reply)) => Ok(reply),
            Answer::Reply(Err(e)) => Err(CallError::Server(e)),
            Answer::Peer(_) => Err(CallError::Lost(
                "the server answered a request with a peer reply".into(),
            )),
        }
    }

    /// Sends one Raft call to a peer server and waits for its opaque reply, at most `timeout`.
    pub async fn call_peer(&self, rpc: PeerRpc, payload: Vec<u8>, timeout: Duration) -> Result<Vec<u8>, CallError> {
        match self
            .roundtrip(timeout, |id| ClientMessage::PeerCall { id, rpc, payload })
            .await?
        {
            Answer::Peer(bytes) => Ok(bytes),
            Answer::Reply(_) => Err(CallError::Lost(
                "the peer answered a Raft call with a client reply".into(),
            )),
        }
    }

    async fn roundtrip(
        &self,
        timeout: Duration,
        message: impl FnOnce(u64) -> ClientMessage,
    ) -> Result<Answer, CallError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = encode(&message(id));
        if frame.len() > self.max_frame_bytes {
            return Err(CallError::TooLarge {
                bytes: frame.len(),
                max: self.max_frame_bytes,
            });
        }
        let (tx, rx) = oneshot::channel();
        {
            let mut p = self.pending.lock().expect("pending lock");
            if let Some(why) = &p.closed {
                return Err(CallError::NotSent(why.clone()));
            }
            p.waiters.insert(id, tx);
        }
        let outcome = tokio::time::timeout(timeout, async {
            if self.outgoing.send(frame).await.is_err() {
                return Err(CallError::NotSent("connection closed".into()));
            }
            rx.await.map_err(|_| {
                CallError::Lost(
                    self.pending
                        .lock()
                        .expect("pending lock")
                        .closed
                        .clone()
                        .unwrap_or_else(|| "connection closed".into()),
                )
            })
        })
        .await;
        match outcome {
            Ok(r) => r,
            Err(_) => {
                self.pending.lock().expect("pending lock").waiters.remove(&id);
                Err(CallError::TimedOut)
            }
        }
    }
}

fn close(pending: &Mutex<Pending>, why: String) {
    let mut p = pending.lock().expect("pending lock");
    if p.closed.is_none() {
        p.closed = Some(why);
    }
    // Dropping the senders wakes every waiter with `Lost`.
    p.waiters.clear();
}

async fn write_loop(
    sink: futures::stream::SplitSink<FramedConn, bytes::Bytes>,
    rx: mpsc::Receiver<bytes::Bytes>,
    pending: Arc<Mutex<Pending>>,
    idle_ping: Option<(Duration, bytes::Bytes)>,
) {
    if let Err(e) = crate::handshake::write_frames(sink, rx, idle_ping).await {
        close(&pending, format!("write failed: {e}"));
    }
}

fn deliver(pending: &Mutex<Pending>, id: u64, answer: Answer) {
    let waiter = pending.lock().expect("pending lock").waiters.remove(&id);
    if let Some(w) = waiter {
        let _ = w.send(answer);
    }
}

async fn read_loop(
    mut stream: futures::stream::SplitStream<FramedConn>,
    pending: Arc<Mutex<Pending>>,
    generation: Arc<AtomicU64>,
) {
    let why = loop {
        match stream.next().await {
            None => break "the server closed the connection".to_string(),
            Some(Err(e)) => break format!("read failed: {e}"),
            Some(Ok(bytes)) => match decode::<ServerMessage>(&bytes) {
                Ok(ServerMessage::Response(resp)) => {
                    generation.fetch_max(resp.generation, Ordering::AcqRel);
                    deliver(&pending, resp.id, Answer::Reply(resp.result))
                }
                Ok(ServerMessage::PeerReply { id, payload }) => deliver(&pending, id, Answer::Peer(payload)),
                Ok(ServerMessage::Fatal(why)) => break format!("the server closed the connection: {why}"),
                Ok(other) => break format!("unexpected message from server: {other:?}"),
                Err(e) => break format!("undecodable reply: {e}"),
            },
        }
    };
    tracing::debug!(event = "client.connection_closed", reason = %why);
    close(&pending, why);
}
