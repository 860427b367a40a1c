//! This server's membership in its stripe: the Raft node, how the stripe forms, and the safe
//! paths for writes and linearizable reads.
//!
//! How a server takes its place in the stripe (founding, joining) is [`crate::formation`].
//!
//! No quorum, no service: the active tracks when a majority last acknowledged it; when that is
//! older than the election timeout it answers `NoQuorum` at once instead of accepting writes it
//! cannot commit or serving reads it cannot prove fresh. A mirror names the active it knows of
//! (`NotLeader`), or answers `NoQuorum` when it knows none.

use std::collections::HashMap;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferrocotta::config::{ClusterConfig, ServerPosition};
use ferrocotta::protocol::{ErrorReply, ReadOp, Reply, Role};
use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::ServerState;
use tokio::sync::{mpsc, oneshot};

use crate::active::ActiveState;
use crate::command::{Change, Command, CommandKind, CommandResult, Lock};
use crate::roster::LiveRoster;
use crate::state_machine::SharedState;
use crate::types::{NodeId, Raft};

/// Linearizable reads that may wait for the next read-index round before callers block.
pub const READ_QUEUE_MAX: usize = 65_536;

/// Reads confirmed by one read-index round at most.
pub const READ_BATCH_MAX: usize = 4096;

type ReadWaiter = oneshot::Sender<Result<(), ErrorReply>>;

/// Writes that may wait for the write batcher before proposers block.
pub const WRITE_QUEUE_MAX: usize = 65_536;

/// How often a write waiting for its entry looks whether the active still has its quorum.
pub const QUORUM_WATCH_INTERVAL: Duration = Duration::from_millis(100);

/// How long giving up a place in a lock queue may take (after the client's own wait ran out).
pub const LOCK_WAIT_CANCEL_TIMEOUT: Duration = Duration::from_secs(5);

/// Client writes one log entry carries at most.
pub const WRITE_BATCH_MAX: usize = 1024;

/// Key and value bytes one batched entry carries at most (a larger single write goes alone), so an
/// entry stays far below the replication batch and frame limits.
pub const WRITE_BATCH_BYTES_MAX: usize = 256 * 1024;

/// Batched entries proposed and not yet applied at once. openraft 0.9 appends and fsyncs each
/// proposed entry before it takes the next, so writes arriving meanwhile gather in the queue and go
/// out as the next batch: one fsync for many writes.
///
/// One, measured (docs/performance.md): every entry costs an fsync and a round of work on each
/// server, so fewer, larger entries leave more of a CPU-bound machine to the writes. On the 2-core
/// reference machine, put at 256 in flight: 8 entries in flight 34k/s, 4 46k/s, 2 50k/s, 1 52k/s
/// (at 64 in flight: 4 18k/s, 2 24k/s, 1 26k/s). With more cores than work and a slow disk or
/// network, two would let the active append the next batch while the current one replicates.
pub const WRITE_BATCHES_IN_FLIGHT_MAX: usize = 1;

/// A write waiting for the batcher, and where its result goes.
struct PendingWrite {
    kind: CommandKind,
    reply: oneshot::Sender<Result<CommandResult, ErrorReply>>,
}

/// The stripe membership of this server.
pub struct Stripe {
    /// The Raft node.
    raft: Raft,
    /// The caches, shared with the state machine.
    shared: Arc<SharedState>,
    /// The whole array's config.
    config: Arc<ClusterConfig>,
    /// Where this server sits.
    position: ServerPosition,
    /// The stripe's servers: names and addresses by node id, as replicated.
    roster: Arc<LiveRoster>,
    /// Queue of linearizable reads waiting for a read-index round.
    reads: mpsc::Sender<ReadWaiter>,
    /// A majority acknowledgement older than this means the active has lost its quorum.
    quorum_stale_after: Duration,
    /// What this server tracks in memory while it is the active (keep-alives, reads).
    active: ActiveState,
    /// Queue of writes waiting for the write batcher.
    writes: mpsc::Sender<PendingWrite>,
    /// Set while this server, the active, hands over to a mirror: it takes no new request, and
    /// the write batcher proposes nothing more, so the mirror's log can be complete when it
    /// campaigns.
    handing_over: Arc<AtomicBool>,
    /// One permit per batch the write batcher may have proposed and not yet seen applied.
    batch_slots: Arc<tokio::sync::Semaphore>,
}

impl Stripe {
    /// Wraps a started Raft node and starts the read batcher.
    pub fn new(
        raft: Raft,
        shared: Arc<SharedState>,
        config: Arc<ClusterConfig>,
        position: ServerPosition,
        roster: Arc<LiveRoster>,
    ) -> Stripe {
        let (tx, rx) = mpsc::channel(READ_QUEUE_MAX);
        let quorum_stale_after = config.timing.election_timeout.0;
        tokio::spawn(read_batcher(raft.clone(), rx, roster.clone(), quorum_stale_after * 2));
        let (writes, writes_rx) = mpsc::channel(WRITE_QUEUE_MAX);
        let batcher = WriteBatcher {
            raft: raft.clone(),
            roster: roster.clone(),
            acks: AckLog {
                term: Arc::new(AtomicU64::new(0)),
                stripe: position.stripe,
                server: config.server(position).name.clone(),
            },
            handing_over: Arc::new(AtomicBool::new(false)),
            slots: Arc::new(tokio::sync::Semaphore::new(WRITE_BATCHES_IN_FLIGHT_MAX)),
        };
        let (handing_over, batch_slots) = (batcher.handing_over.clone(), batcher.slots.clone());
        tokio::spawn(batcher.run(writes_rx));
        Stripe {
            raft,
            shared,
            config,
            position,
            roster,
            reads: tx,
            quorum_stale_after,
            active: ActiveState::default(),
            writes,
            handing_over,
            batch_slots,
        }
    }

    /// The Raft node (for admin facts and shutdown; requests go through the methods below).
    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// The replicated data, as this server has applied it.
    pub fn shared(&self) -> &Arc<SharedState> {
        &self.shared
    }

    /// The whole array's config.
    pub fn config(&self) -> &Arc<ClusterConfig> {
        &self.config
    }

    /// Where this server sits.
    pub fn position(&self) -> ServerPosition {
        self.position
    }

    /// What this server tracks in memory while it is the active.
    pub fn active(&self) -> &ActiveState {
        &self.active
    }

    /// This server's name.
    pub fn name(&self) -> &str {
        &self.config.server(self.position).name
    }

    /// The stripe's servers by node id, with their names.
    pub fn members(&self) -> HashMap<NodeId, String> {
        self.roster.names()
    }

    /// The stripe's roster.
    pub fn roster(&self) -> &Arc<LiveRoster> {
        &self.roster
    }

    /// The name of a stripe member.
    pub fn name_of(&self, id: NodeId) -> Option<String> {
        self.roster.name_of(id)
    }

    /// Role, term, leader name, last log index and applied index, from the Raft metrics.
    pub fn snapshot_metrics(&self) -> MetricsView {
        let m = self.raft.metrics();
        let m = m.borrow();
        MetricsView {
            role: if m.state == ServerState::Leader {
                Role::Active
            } else {
                Role::Mirror
            },
            state: format!("{:?}", m.state),
            term: m.current_term,
            leader: m.current_leader.and_then(|id| self.name_of(id)),
            last_log_index: m.last_log_index.unwrap_or(0),
            applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
            snapshot_index: m.snapshot.map(|l| l.index),
            purged_index: m.purged.map(|l| l.index),
            millis_since_quorum_ack: m.millis_since_quorum_ack,
        }
    }

    /// Marks the start and end of a hand-over by this server (`crate::membership`).
    pub fn set_handing_over(&self, on: bool) {
        self.handing_over.store(on, Ordering::SeqCst);
    }

    /// During a hand-over: whether every write the batcher proposed has been applied, so none
    /// is left to reach the log (it proposes no new one meanwhile).
    pub fn writes_settled(&self) -> bool {
        // Pairs with the batcher's fence: either it sees the hand-over, or this sees its batch.
        fence(Ordering::SeqCst);
        self.batch_slots.available_permits() == WRITE_BATCHES_IN_FLIGHT_MAX
    }

    /// Whether this server may serve writes and strong reads right now.
    fn check_serving(&self) -> Result<(), ErrorReply> {
        let m = self.raft.metrics();
        let m = m.borrow();
        if m.state == ServerState::Leader && self.handing_over.load(Ordering::Acquire) {
            Err(ErrorReply::NotLeader { leader: None })
        } else if m.state == ServerState::Leader {
            match m.millis_since_quorum_ack {
                Some(ms) if Duration::from_millis(ms) > self.quorum_stale_after => Err(ErrorReply::NoQuorum),
                _ => Ok(()),
            }
        } else {
            match m.current_leader {
                Some(id) if id != self.position.node_id() => Err(ErrorReply::NotLeader {
                    leader: self.name_of(id),
                }),
                _ => Err(ErrorReply::NoQuorum),
            }
        }
    }

    /// Whether a write already in flight should be given up as "outcome unknown": this server is
    /// no longer the active, or no majority has acknowledged it for twice the election timeout.
    /// Twice, not once as for new requests: abandoning a write that would still commit costs the
    /// client an indeterminate answer, so a busy machine's late heartbeat must not cause it.
    fn quorum_lost(&self) -> bool {
        let m = self.raft.metrics();
        let m = m.borrow();
        m.state != ServerState::Leader
            || m.millis_since_quorum_ack
                .map(|ms| Duration::from_millis(ms) > self.quorum_stale_after * 2)
                .unwrap_or(false)
    }

    /// The current term if this server is the active, else `None`.
    pub fn active_term(&self) -> Option<u64> {
        let m = self.raft.metrics();
        let m = m.borrow();
        (m.state == ServerState::Leader).then_some(m.current_term)
    }

    /// Proposes a client's change and waits for it to be committed and applied.
    pub async fn write(&self, change: Change, timeout: Duration) -> Result<Reply, ErrorReply> {
        client_result(self.propose(CommandKind::Client(change), timeout).await?)
    }

    /// Proposes a command through the write batcher and waits for what applying it produced.
    pub async fn propose(&self, kind: CommandKind, timeout: Duration) -> Result<CommandResult, ErrorReply> {
        self.check_serving()?;
        let deadline = tokio::time::Instant::now() + timeout;
        let result = self.enqueue(kind, deadline).await?;
        self.outcome(result, deadline).await
    }

    /// Proposes one connection's client changes in their order (the log keeps it: a later change
    /// never applies before an earlier one) and waits for them together, so they share the
    /// batcher's group commit; each change's own result, in order.
    pub async fn write_many(&self, changes: Vec<Change>, timeout: Duration) -> Vec<Result<Reply, ErrorReply>> {
        if let Err(e) = self.check_serving() {
            return changes.iter().map(|_| Err(e.clone())).collect();
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut queued = Vec::with_capacity(changes.len());
        // Once one could not be queued (the deadline passed, the server stops), none after it is:
        // a later change must not apply when an earlier one did not.
        let mut failed: Option<ErrorReply> = None;
        for change in changes {
            let q = match &failed {
                Some(e) => Err(e.clone()),
                None => self.enqueue(CommandKind::Client(change), deadline).await,
            };
            if let Err(e) = &q {
                failed.get_or_insert_with(|| e.clone());
            }
            queued.push(q);
        }
        let mut out = Vec::with_capacity(queued.len());
        for q in queued {
            out.push(match q {
                Ok(result) => self.outcome(result, deadline).await.and_then(client_result),
                Err(e) => Err(e),
            });
        }
        out
    }

    /// Queues a command for the write batcher by `deadline`; where its result will come.
    async fn enqueue(
        &self,
        kind: CommandKind,
        deadline: tokio::time::Instant,
    ) -> Result<oneshot::Receiver<Result<CommandResult, ErrorReply>>, ErrorReply> {
        let (reply, result) = oneshot::channel();
        tokio::select! {
            sent = self.writes.send(PendingWrite { kind, reply }) => {
                if sent.is_err() {
                    return Err(ErrorReply::ShuttingDown);
                }
            }
            // Not queued, so certainly not applied.
            _ = tokio::time::sleep_until(deadline) => return Err(ErrorReply::NoQuorum),
        }
        Ok(result)
    }

    /// Waits by `deadline` for what applying a queued command produced.
    async fn outcome(
        &self,
        result: oneshot::Receiver<Result<CommandResult, ErrorReply>>,
        deadline: tokio::time::Instant,
    ) -> Result<CommandResult, ErrorReply> {
        tokio::pin!(result);
        let mut watch = tokio::time::interval(QUORUM_WATCH_INTERVAL);
        loop {
            tokio::select! {
                r = &mut result => return r.unwrap_or(Err(ErrorReply::ShuttingDown)),
                _ = tokio::time::sleep_until(deadline) => return Err(ErrorReply::Timeout),
                _ = watch.tick() => {
                    // The entry may be in our log and still commit later: the outcome is unknown,
                    // so this is a timeout, never `NoQuorum` (which promises "not applied").
                    if self.quorum_lost() {
                        return Err(ErrorReply::Timeout);
                    }
                }
            }
        }
    }

    /// Answers a keep-alive from memory: the session lives if the store has it.
    pub fn keep_alive(&self, session: u64) -> Result<Reply, ErrorReply> {
        self.check_serving()?;
        if self.shared.read(|d| d.store.sessions.contains_key(&session)) {
            self.active.saw_session(session);
            Ok(Reply::Done)
        } else {
            Err(ErrorReply::SessionExpired)
        }
    }

    /// Takes a lock, waiting in the replicated queue as the request asks (see `locks`).
    pub async fn lock(&self, lock: Lock, timeout: Duration) -> Result<Reply, ErrorReply> {
        let (cache, key, session, wait_ms) = (lock.cache.clone(), lock.key.clone(), lock.session, lock.wait_ms);
        let started = tokio::time::Instant::now();
        match self.write(Change::Lock(lock), timeout).await? {
            Reply::Done => return Ok(Reply::Done),
            Reply::Bool(false) => {} // queued
            other => return Err(ErrorReply::Internal(format!("unexpected lock result {other:?}"))),
        }
        self.active.saw_session(session);
        let rx = self.shared.wait_for_grant(&cache, &key, session)?;
        let wait = if wait_ms > 0 {
            Duration::from_millis(wait_ms as u64).min(timeout)
        } else {
            timeout
        };
        let granted = self.shared.read(|d| d.store.holds(&cache, &key, session))
            || tokio::time::timeout(wait.saturating_sub(started.elapsed()), rx)
                .await
                .is_ok_and(|r| r.is_ok());
        self.shared.forget_waiters(&cache, &key, session);
        if granted {
            return Ok(Reply::Done);
        }
        if wait_ms < 0 {
            // Waiting forever: keep the place in the queue; the client asks again.
            return Err(ErrorReply::LockTimeout);
        }
        let cancel = CommandKind::LockWaitCancel { cache, key, session };
        client_result(self.propose(cancel, LOCK_WAIT_CANCEL_TIMEOUT).await?)
    }

    /// Records reads of entries whose access time matters (tti, LRU), while this server is active.
    pub fn record_reads(&self, op: &ReadOp, now_ms: u64) {
        let (cache, keys): (&str, Vec<&[u8]>) = match op {
            ReadOp::Get { cache, key } | ReadOp::Contains { cache, key } => (cache, vec![key.as_slice()]),
            ReadOp::GetAll { cache, keys } | ReadOp::Entries { cache, keys } => {
                (cache, keys.iter().map(|k| k.as_slice()).collect())
            }
            ReadOp::Keys { .. } | ReadOp::Size { .. } | ReadOp::ListLocks { .. } | ReadOp::Time => return,
        };
        if self.active_term().is_none() {
            return;
        }
        let wanted: Vec<&[u8]> = self.shared.read(|d| {
            let Some(c) = d.store.caches.get(cache) else {
                return Vec::new();
            };
            let lru = c.settings.max_entries.is_some();
            keys.into_iter()
                .filter(|k| c.entries.get(*k).is_some_and(|e| lru || e.tti_ms.is_some()))
                .collect()
        });
        for k in wanted {
            self.active.record_access(cache, k, now_ms);
        }
    }

    /// Waits until a read started now may be served from local state linearizably (read index,
    /// batched with every other read waiting at the same time).
    pub async fn read_barrier(&self, timeout: Duration) -> Result<(), ErrorReply> {
        self.check_serving()?;
        let (tx, rx) = oneshot::channel();
        self.reads.send(tx).await.map_err(|_| ErrorReply::ShuttingDown)?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(ErrorReply::ShuttingDown),
            Err(_) => Err(ErrorReply::Timeout),
        }
    }
}

/// A copy of the Raft facts status tooling shows.
#[derive(Debug, Clone)]
pub struct MetricsView {
    /// Active or mirror.
    pub role: Role,
    /// openraft's server state (Leader, Follower, Candidate, Learner).
    pub state: String,
    /// Current term.
    pub term: u64,
    /// Name of the known active.
    pub leader: Option<String>,
    /// Last log index.
    pub last_log_index: u64,
    /// Last applied index.
    pub applied_index: u64,
    /// Index covered by the last snapshot.
    pub snapshot_index: Option<u64>,
    /// Last purged log index.
    pub purged_index: Option<u64>,
    /// For the active: how long ago a majority last acknowledged it.
    pub millis_since_quorum_ack: Option<u64>,
}

/// Runs read-index rounds: each round confirms leadership once for every read that was waiting
/// when it started.
async fn read_batcher(
    raft: Raft,
    mut rx: mpsc::Receiver<ReadWaiter>,
    roster: Arc<LiveRoster>,
    round_timeout: Duration,
) {
    while let Some(first) = rx.recv().await {
        let mut waiters = vec![first];
        while waiters.len() < READ_BATCH_MAX {
            match rx.try_recv() {
                Ok(w) => waiters.push(w),
                Err(_) => break,
            }
        }
        let result = match tokio::time::timeout(round_timeout, raft.ensure_linearizable()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)))) => Err(ErrorReply::NotLeader {
                leader: f.leader_id.and_then(|id| roster.name_of(id)),
            }),
            Ok(Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_)))) => Err(ErrorReply::NoQuorum),
            Ok(Err(RaftError::Fatal(_))) => Err(ErrorReply::ShuttingDown),
            Err(_) => Err(ErrorReply::NoQuorum),
        };
        for w in waiters {
            let _ = w.send(result.clone());
        }
    }
}

/// Logs `stripe.active_ack` the first time this server acknowledges a write in a term: two
/// servers of a stripe logging it for the same term would be split brain (the chaos suite checks).
#[derive(Clone)]
struct AckLog {
    term: Arc<AtomicU64>,
    stripe: usize,
    server: String,
}

impl AckLog {
    fn note(&self, term: u64) {
        if self.term.fetch_max(term, Ordering::Relaxed) < term {
            tracing::info!(
                event = "stripe.active_ack",
                stripe = self.stripe,
                term,
                server = %self.server,
                "first write acknowledged as the active of this term"
            );
        }
    }
}

/// Whether a write may share a log entry with others (an `OpenSession` takes its entry's index as
/// the session id, so it goes alone).
fn batchable(kind: &CommandKind) -> bool {
    matches!(kind, CommandKind::Client(change) if !matches!(change, Change::OpenSession(_)))
}

/// Key and value bytes of a write (for the batch size limit).
fn payload_bytes(kind: &CommandKind) -> usize {
    match kind {
        CommandKind::Client(change) => change.payload_bytes(),
        _ => 0,
    }
}

/// What a client's change (or a lock wait's end) produced, from the result of its entry.
fn client_result(result: CommandResult) -> Result<Reply, ErrorReply> {
    match result {
        CommandResult::Client(r) => r,
        other => Err(ErrorReply::Internal(format!("a client's entry produced {other:?}"))),
    }
}

/// Group commit of client writes: takes what waits in the queue, proposes it as one entry (a
/// `Batch`, or the command itself when alone), and hands each write its own result. At most
/// [`WRITE_BATCHES_IN_FLIGHT_MAX`] entries are proposed and unapplied at once; writes arriving
/// meanwhile form the next batch. Entries are proposed in queue order. During a hand-over it
/// proposes nothing and refuses what is queued.
struct WriteBatcher {
    raft: Raft,
    roster: Arc<LiveRoster>,
    acks: AckLog,
    /// [`Stripe::set_handing_over`]: while set, queued writes are refused, not proposed.
    handing_over: Arc<AtomicBool>,
    /// [`WRITE_BATCHES_IN_FLIGHT_MAX`] permits; a proposed batch holds one until applied.
    slots: Arc<tokio::sync::Semaphore>,
}

impl WriteBatcher {
    async fn run(self, mut rx: mpsc::Receiver<PendingWrite>) {
        let WriteBatcher {
            raft,
            roster,
            acks,
            handing_over,
            slots,
        } = self;
        let mut carry: Option<PendingWrite> = None;
        loop {
            let first = match carry.take() {
                Some(w) => w,
                None => match rx.recv().await {
                    Some(w) => w,
                    None => return,
                },
            };
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            // Pairs with `Stripe::writes_settled`: the slot is taken before the flag is read.
            fence(Ordering::SeqCst);
            if handing_over.load(Ordering::SeqCst) {
                // Not proposed, so certainly not applied: the client asks again, of the next active.
                let _ = first.reply.send(Err(ErrorReply::NotLeader { leader: None }));
                continue;
            }
            let mut batch = vec![first];
            if batchable(&batch[0].kind) {
                let mut bytes = payload_bytes(&batch[0].kind);
                while batch.len() < WRITE_BATCH_MAX {
                    match rx.try_recv() {
                        Ok(w) if batchable(&w.kind) && bytes + payload_bytes(&w.kind) <= WRITE_BATCH_BYTES_MAX => {
                            bytes += payload_bytes(&w.kind);
                            batch.push(w);
                        }
                        Ok(w) => {
                            carry = Some(w);
                            break;
                        }
                        Err(_) => break,
                    }
                }
            }
            let (kind, replies) = if batch.len() == 1 {
                let w = batch.pop().expect("one write");
                (w.kind, vec![w.reply])
            } else {
                let mut changes = Vec::with_capacity(batch.len());
                let mut replies = Vec::with_capacity(batch.len());
                for w in batch {
                    if let CommandKind::Client(change) = w.kind {
                        changes.push(change);
                    }
                    replies.push(w.reply);
                }
                (CommandKind::Batch(changes), replies)
            };
            let submitted = raft.client_write_ff(Command { at_ms: now_ms(), kind }).await;
            let (roster, acks) = (roster.clone(), acks.clone());
            tokio::spawn(async move {
                let n = replies.len();
                let results: Vec<Result<CommandResult, ErrorReply>> = match submitted {
                    Err(_) => vec![Err(ErrorReply::ShuttingDown); n],
                    Ok(rx) => match rx.await {
                        Ok(Ok(resp)) => {
                            acks.note(resp.log_id.leader_id.term);
                            match resp.data {
                                CommandResult::Batch(rs) => {
                                    rs.into_iter().map(|r| Ok(CommandResult::Client(r))).collect()
                                }
                                one => vec![Ok(one)],
                            }
                        }
                        Ok(Err(ClientWriteError::ForwardToLeader(f))) => {
                            let leader = f.leader_id.and_then(|id| roster.name_of(id));
                            vec![Err(ErrorReply::NotLeader { leader }); n]
                        }
                        Ok(Err(e)) => vec![Err(ErrorReply::Internal(e.to_string())); n],
                        Err(_) => vec![Err(ErrorReply::ShuttingDown); n],
                    },
                };
                drop(slot);
                for (reply, result) in replies.into_iter().zip(results) {
                    let _ = reply.send(result);
                }
            });
        }
    }
}

/// Wall-clock milliseconds since the Unix epoch, for the active's timestamps.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
