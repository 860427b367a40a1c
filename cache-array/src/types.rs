//! The openraft type configuration of a stripe, declared once. The log entry's payload is
//! [`crate::command`]'s.

use crate::command::{Command, CommandResult};

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
