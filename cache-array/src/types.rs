//! The openraft type configuration of a stripe, declared once, and the log entry payload.

use ferrocotta::protocol::{ErrorReply, Op, Reply};
use serde::{Deserialize, Serialize};

openraft::declare_raft_types!(
    /// Types of one stripe's Raft group.
    pub TypeConfig:
        D = Command,
        R = CommandResult,
        NodeId = NodeId,
        Node = openraft::EmptyNode,
        Entry = openraft::Entry<TypeConfig>,
        // The snapshot file itself: built, sent and received on disk, never whole in memory.
        SnapshotData = tokio::fs::File,
        AsyncRuntime = openraft::TokioRuntime,
);

/// A server's Raft node id: its position in its stripe, from 1.
pub type NodeId = u64;
/// The Raft handle of a stripe member.
pub type Raft = openraft::Raft<TypeConfig>;
/// A log entry.
pub type Entry = openraft::Entry<TypeConfig>;
/// A log id.
pub type LogId = openraft::LogId<NodeId>;
/// A vote.
pub type Vote = openraft::Vote<NodeId>;
/// Storage errors.
pub type StorageError = openraft::StorageError<NodeId>;
/// Snapshot metadata.
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, openraft::EmptyNode>;
/// A snapshot with its data.
pub type Snapshot = openraft::storage::Snapshot<TypeConfig>;
/// The last membership a state machine has applied.
pub type StoredMembership = openraft::StoredMembership<NodeId, openraft::EmptyNode>;

/// A log entry's payload: what to do, and when the active said it happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Command {
    /// Wall-clock milliseconds since the Unix epoch on the active when it proposed the entry. Apply
    /// uses this, never its own clock, so every replica judges time the same way.
    pub at_ms: u64,
    /// The change.
    pub kind: CommandKind,
}

/// The changes the log carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CommandKind {
    /// A write from a client, exactly as it arrived (only write operations are logged).
    Client(Op),
    /// Accesses the active served since its last batch: (cache, key, access time).
    Touch(Vec<(String, Vec<u8>, u64)>),
    /// Entries the active found expired; each is removed only if it is still expired at `at_ms`.
    Expire(Vec<(String, Vec<u8>)>),
    /// Sessions the active has not heard from within the reconnect window.
    ExpireSessions(Vec<u64>),
    /// A lock waiter whose wait ran out gives up its place (unless it was granted meanwhile).
    LockWaitCancel { cache: String, key: Vec<u8>, session: u64 },
    /// Client writes the active gathered while earlier entries were on their way: applied in
    /// order, each with its own result, all made durable by one append (group commit). Never holds
    /// an `OpenSession` (a session's id is its entry's index).
    Batch(Vec<Op>),
}

/// The outcome of applying a command, returned to the client that proposed it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CommandResult {
    /// The result of a single command.
    One(Result<Reply, ErrorReply>),
    /// The results of a [`CommandKind::Batch`], in its order.
    Batch(Vec<Result<Reply, ErrorReply>>),
}
