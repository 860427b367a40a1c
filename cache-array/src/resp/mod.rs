//! The Redis-protocol front end (docs/redis.md): a RESP2/RESP3 port on an array server that maps
//! Redis string commands onto the stripe's cache operations and presents the array as a Redis
//! Cluster whose every shard is a Raft-replicated stripe.
//!
//! - [`codec`]: requests parsed within bounds, replies encoded in RESP2 or RESP3.
//! - [`commands`]: the commands, each turned into one array operation.
//! - [`cluster`]: `CLUSTER`, `INFO`, `COMMAND`, `CLIENT`: what clients ask about the server.
//! - [`topology`]: the stripes' actives, for `MOVED` and `CLUSTER SLOTS`.
//!
//! Every operation goes through the client port's own path (`ClientService::handle`): the same
//! limits, credentials, slot checks and metrics as the native protocol. A connection runs its
//! commands one at a time, in order, like Redis: a pipelined `SET` then `GET` reads the `SET`.
//! Keys of another stripe get `-MOVED slot host:port` naming that stripe's active; on a mirror,
//! keyed commands are redirected to the active too, unless the connection said `READONLY` and
//! the command only reads (then it is served from the mirror's state, possibly stale).

pub mod cluster;
pub mod codec;
pub mod commands;
pub mod topology;

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use ferrocotta::admission::{Admission, Admitted};
use ferrocotta::config::ServerConfig;
use ferrocotta::log_throttle::LogThrottle;
use ferrocotta::protocol::{ErrorReply, Op, ReadConsistency, Reply, Request};
use ferrocotta::security::{constant_time_eq, Credentials, Grant};
use ferrocotta::slots::slot_of_key;
use ferrocotta::tls::{NetStream, ServerTls};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::service::{ClientService, REPLY_BYTES_QUEUED_PER_CONNECTION_MAX};
use codec::{parse_request, Partial, RequestLimits, Value, UNAUTHENTICATED_LIMITS};
use commands::{RunKind, READ_RUN_MAX};
use topology::Topology;

/// The cache Redis commands use until `SELECT` names another.
pub const DEFAULT_CACHE: &str = "redis";

/// How long one command may take on the server (a write's commit, a read's read-index round).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a connection may stay without authenticating (it counts as a pending handshake
/// meanwhile): long enough to type `AUTH` into redis-cli.
pub const UNAUTHENTICATED_MAX: Duration = Duration::from_secs(60);

/// Most `SCAN` cursors one connection keeps (the oldest is forgotten first).
pub const SCAN_CURSORS_MAX: usize = 16;

/// Most consecutive writes of a pipeline proposed together.
pub const WRITE_RUN_MAX: usize = 256;

/// Replies are written out once this many bytes are waiting, even mid-pipeline.
const WRITE_OUT_BYTES: usize = 64 * 1024;

/// The Redis version whose commands and replies the front end follows (reported by `HELLO` and
/// `INFO`, which clients read to pick features).
pub const REDIS_VERSION: &str = "7.2.0";

static PROTOCOL_ERROR: LogThrottle = LogThrottle::new();

/// A connected client, as `CLIENT LIST` shows it.
#[derive(Debug, Clone)]
pub struct ClientFacts {
    pub addr: SocketAddr,
    pub name: String,
    pub cache: String,
    pub connected: Instant,
    pub last_command: String,
    pub resp3: bool,
}

/// Everything the port needs.
pub struct RespService {
    /// The client port's request path.
    pub ops: Arc<ClientService>,
    /// The stripes' actives.
    pub topology: Arc<Topology>,
    /// The cluster secret (empty: none, every connection is authenticated).
    pub cluster_secret: Vec<u8>,
    /// Named credentials (`AUTH name secret`).
    pub credentials: Arc<RwLock<Credentials>>,
    /// TLS, when the array's ports speak it.
    pub tls: Option<Arc<ServerTls>>,
    /// Bounds on connections (the client port's limits, counted apart).
    pub admission: Admission,
    /// TLS handshake deadline.
    pub handshake_timeout: Duration,
    /// Bounds on one request.
    pub limits: RequestLimits,
    /// Connected clients by id.
    pub clients: Mutex<BTreeMap<u64, ClientFacts>>,
    /// The next client id.
    pub next_id: AtomicU64,
    /// When the server started (INFO's uptime).
    pub started: Instant,
}

/// One connection's state.
pub struct Conn {
    pub id: u64,
    /// `None` until authenticated.
    pub grant: Option<Arc<Grant>>,
    pub resp3: bool,
    pub cache: String,
    pub readonly: bool,
    /// `SCAN` cursors: id and the last key returned.
    pub scans: VecDeque<(u64, Vec<u8>)>,
    pub next_scan: u64,
    /// The connection's share of reply bytes (large reads wait for it).
    pub reply_budget: Arc<Semaphore>,
}

/// Accepts connections until `shutdown`.
pub async fn serve(svc: Arc<RespService>, listener: TcpListener, shutdown: CancellationToken, tracker: TaskTracker) {
    while let Some((tcp, remote, admitted)) = svc.admission.next(&listener, &shutdown, "resp").await {
        let svc = svc.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let admitted = match admitted {
                Ok(a) => a,
                Err(why) => {
                    let mut tcp = tcp;
                    let mut out = Vec::new();
                    Value::err(format!("ERR max number of clients reached ({why})")).encode(false, &mut out);
                    let _ = tokio::time::timeout(Duration::from_millis(200), tcp.write_all(&out)).await;
                    return;
                }
            };
            let stream = match &svc.tls {
                None => NetStream::Plain(tcp),
                Some(tls) => match tokio::time::timeout(svc.handshake_timeout, tls.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    _ => return,
                },
            };
            svc.connection(stream, remote, admitted, shutdown).await;
        });
    }
}

impl RespService {
    /// The grant of a connection that has not authenticated: full access when the array has no
    /// secret, else none.
    fn initial_grant(&self) -> Option<Arc<Grant>> {
        self.cluster_secret.is_empty().then(|| Arc::new(Grant::Full))
    }

    /// The grant `AUTH [user] password` earns: `default` (or no user) is the cluster secret, any
    /// other user a credential of that name.
    pub fn authenticate(&self, user: Option<&[u8]>, password: &[u8]) -> Option<Grant> {
        match user {
            None | Some(b"default") => (!self.cluster_secret.is_empty()
                && constant_time_eq(password, &self.cluster_secret))
            .then_some(Grant::Full),
            Some(name) => {
                let name = std::str::from_utf8(name).ok()?;
                let creds = self.credentials.read().expect("credentials lock");
                let secret = creds.secret_of(name)?;
                constant_time_eq(password, &secret)
                    .then(|| creds.grant_of(name))
                    .flatten()
            }
        }
    }

    async fn connection(
        self: Arc<Self>,
        stream: NetStream,
        remote: SocketAddr,
        mut admitted: Admitted,
        shutdown: CancellationToken,
    ) {
        let id = self.next_id.fetch_add(1, Relaxed) + 1;
        let mut conn = Conn {
            id,
            grant: self.initial_grant(),
            resp3: false,
            cache: DEFAULT_CACHE.to_string(),
            readonly: false,
            scans: VecDeque::new(),
            next_scan: 1,
            reply_budget: Arc::new(Semaphore::new(REPLY_BYTES_QUEUED_PER_CONNECTION_MAX)),
        };
        self.clients.lock().expect("clients lock").insert(
            id,
            ClientFacts {
                addr: remote,
                name: String::new(),
                cache: conn.cache.clone(),
                connected: Instant::now(),
                last_command: String::new(),
                resp3: false,
            },
        );
        let accepted = Instant::now();
        let (mut rd, mut wr) = tokio::io::split(stream);
        let mut buf = BytesMut::with_capacity(16 * 1024);
        // How far the request at the front of `buf` has been read, so that a request arriving in
        // many small pieces is not parsed from its start again at each piece.
        let mut partial: Option<Partial> = None;
        let mut out = Vec::with_capacity(16 * 1024);
        'conn: loop {
            if conn.grant.is_some() {
                admitted.handshake_done();
            }
            // What has arrived runs in order. Consecutive writes (up to a bound) are proposed
            // together (`run_writes`), consecutive reads of keys served together (`run_reads`);
            // anything else runs alone, after them.
            let mut run: Vec<Vec<Vec<u8>>> = Vec::new();
            let mut run_kind = None;
            loop {
                // Before AUTH, requests are held to Redis' own pre-authentication bounds.
                let limits = if conn.grant.is_some() {
                    self.limits
                } else {
                    UNAUTHENTICATED_LIMITS
                };
                let parsed = parse_request(&mut buf, limits, &mut partial);
                let joins = match &parsed {
                    Ok(Some(args)) if args.is_empty() => continue,
                    Ok(Some(args)) => self.run_kind(&conn, args),
                    _ => None,
                };
                let room = match run_kind {
                    Some(RunKind::Reads) => READ_RUN_MAX,
                    _ => WRITE_RUN_MAX,
                };
                if joins.is_some() && joins == run_kind && run.len() < room {
                    if let Ok(Some(args)) = parsed {
                        run.push(args);
                    }
                    continue;
                }
                if !run.is_empty() {
                    let run = std::mem::take(&mut run);
                    let replies = match run_kind {
                        Some(RunKind::Reads) => self.run_reads(&conn, run).await,
                        _ => self.run_writes(&conn, run).await,
                    };
                    for reply in replies {
                        reply.encode(conn.resp3, &mut out);
                    }
                }
                run_kind = joins;
                match parsed {
                    Ok(Some(args)) if joins.is_some() => run.push(args),
                    Ok(Some(args)) => {
                        let (reply, close) = self.command(&mut conn, args).await;
                        reply.encode(conn.resp3, &mut out);
                        if close {
                            let _ = wr.write_all(&out).await;
                            break 'conn;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        if let Some(suppressed) = PROTOCOL_ERROR.allow() {
                            tracing::warn!(event = "resp.protocol_error", %remote, error = %e, suppressed);
                        }
                        Value::err(format!("ERR {e}")).encode(conn.resp3, &mut out);
                        let _ = wr.write_all(&out).await;
                        break 'conn;
                    }
                }
                if out.len() >= WRITE_OUT_BYTES {
                    if wr.write_all(&out).await.is_err() {
                        break 'conn;
                    }
                    out.clear();
                }
            }
            if !out.is_empty() {
                if wr.write_all(&out).await.is_err() {
                    break;
                }
                out.clear();
            }
            let read = async {
                if conn.grant.is_none() {
                    let left = UNAUTHENTICATED_MAX.saturating_sub(accepted.elapsed());
                    tokio::time::timeout(left, rd.read_buf(&mut buf)).await.unwrap_or(Ok(0))
                } else {
                    rd.read_buf(&mut buf).await
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                n = read => match n {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                },
            }
        }
        let _ = wr.shutdown().await;
        self.clients.lock().expect("clients lock").remove(&id);
    }

    /// Runs one array operation through the client port's path.
    pub async fn exec(&self, conn: &Conn, op: Op, slot: Option<u16>) -> Result<Reply, Value> {
        let grant = conn.grant.as_ref().ok_or_else(noauth)?;
        let request = Request {
            id: 0,
            timeout_ms: COMMAND_TIMEOUT.as_millis() as u32,
            op,
        };
        let (result, _budget) = self.ops.handle(request, grant, &conn.reply_budget).await;
        result.map_err(|e| self.error_value(e, slot))
    }

    /// Where a command on `keys` may run: `Ok` with the consistency to read at when this server
    /// serves it, else the redirect or error the client gets. Keyless commands run on this
    /// server's stripe.
    pub fn route(&self, conn: &Conn, keys: &[&[u8]], writes: bool) -> Result<(ReadConsistency, Option<u16>), Value> {
        let mut slot = None;
        for key in keys {
            let s = slot_of_key(key);
            match slot {
                None => slot = Some(s),
                Some(first) if first != s => {
                    return Err(Value::err("CROSSSLOT Keys in request don't hash to the same slot"))
                }
                Some(_) => {}
            }
        }
        let stripe = self.ops.stripe.clone();
        let mine = stripe.position().stripe;
        if let Some(s) = slot {
            // By the live document: slots move between stripes (`ferrocotta array rebalance`).
            let owner = stripe.roster().config().stripe_of_slot(s);
            if owner != mine {
                return Err(self.moved(s, owner));
            }
        }
        if stripe.active_term().is_some() {
            return Ok((ReadConsistency::Linearizable, slot));
        }
        match (writes, slot) {
            (false, _) if conn.readonly => Ok((ReadConsistency::Eventual, slot)),
            (false, None) => Ok((ReadConsistency::Eventual, None)),
            (true, None) => Err(Value::err("READONLY You can't write against a read only replica.")),
            (_, Some(s)) => match self.topology.active_of(mine) {
                Some(_) => Err(self.moved(s, mine)),
                None => Err(clusterdown()),
            },
        }
    }

    /// `-MOVED slot host:port` to a stripe's active (or a server of it when its active is not
    /// known here).
    fn moved(&self, slot: u16, stripe: usize) -> Value {
        // A stripe added after this server started is not in its topology: the client asks again
        // (`ferrocotta array add-stripe` documents this for the Redis-protocol port).
        let stripe = if stripe < self.topology.config().stripes.len() {
            stripe
        } else {
            self.ops.stripe.roster().config().stripe_of_slot(slot)
        };
        if stripe >= self.topology.config().stripes.len() {
            return Value::err(format!(
                "TRYAGAIN slot {slot} is on a stripe added after this server started"
            ));
        }
        self.moved_to(slot, self.topology.target_of(stripe))
    }

    /// `-MOVED slot host:port` to this server; never to this server itself (a client would come
    /// straight back): while it does not know its stripe's active, `-TRYAGAIN`.
    fn moved_to(&self, slot: u16, target: &ServerConfig) -> Value {
        let position = self.ops.stripe.position();
        let me = &self.topology.config().stripes[position.stripe].servers[position.index];
        if target.name == me.name {
            return Value::err("TRYAGAIN the stripe is choosing its active; try again");
        }
        match target.resp_port {
            Some(port) => Value::err(format!("MOVED {slot} {}:{port}", target.host)),
            None => Value::err(format!(
                "CLUSTERDOWN server {} of the slot's stripe has no resp_port",
                target.name
            )),
        }
    }

    /// An array error as Redis clients expect it.
    fn error_value(&self, e: ErrorReply, slot: Option<u16>) -> Value {
        let mine = self.ops.stripe.position().stripe;
        match (e, slot) {
            (ErrorReply::WrongStripe { owner }, Some(s)) => self.moved(s, owner as usize),
            (ErrorReply::NotLeader { leader: Some(l) }, Some(s)) => {
                match self
                    .topology
                    .config()
                    .servers()
                    .map(|(_, srv)| srv)
                    .find(|srv| srv.name == l)
                {
                    Some(target) => self.moved_to(s, target),
                    None => self.moved(s, mine),
                }
            }
            (ErrorReply::NotLeader { .. } | ErrorReply::NoQuorum, _) => clusterdown(),
            (ErrorReply::SlotMoving { slot }, _) => {
                Value::err(format!("TRYAGAIN slot {slot} is moving to another stripe"))
            }
            (ErrorReply::NotACounter, _) => Value::err("ERR value is not an integer or out of range"),
            (ErrorReply::Forbidden(m), _) => Value::err(format!("NOPERM {m}")),
            (ErrorReply::Invalid(m), _) => Value::err(format!("ERR {m}")),
            (ErrorReply::Timeout, _) => {
                Value::err("ERR timed out on the server; the command may or may not have taken effect")
            }
            (other, _) => Value::err(format!("ERR {other}")),
        }
    }
}

/// The reply to anything but `AUTH`, `HELLO`, `PING` and `QUIT` before authenticating.
pub fn noauth() -> Value {
    Value::err("NOAUTH Authentication required.")
}

/// The stripe has no active: writes and linearizable reads cannot be served now (nothing was
/// done; the client may retry).
pub fn clusterdown() -> Value {
    Value::err("CLUSTERDOWN The cluster is down")
}
