//! Who runs a piece of work the cluster shares (a scheduled firing, a guaranteed-delivery
//! transaction): a node's process, named so that a node restarted from the same folder is not
//! taken for the process that died, and judged alive by the member list.

use serde::{Deserialize, Serialize};

use crate::members::Member;
use crate::node::Node;

/// A node's process as the owner of shared work.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    /// Logical name.
    pub node: String,
    /// Instance id.
    pub instance: String,
    /// Its process' start time (the member entry's `start_time_ms`).
    pub started_ms: u64,
}

impl Owner {
    /// This node's process.
    pub fn of(node: &Node) -> Owner {
        Owner {
            node: node.logical_name.clone(),
            instance: node.instance_id.clone(),
            started_ms: node.started_ms,
        }
    }

    /// Whether this process is in the member list: its entry is tied to its array session, so it
    /// leaves when the process dies or loses the array for longer than the reconnect window.
    pub fn listed(&self, members: &[Member]) -> bool {
        members.iter().any(|m| {
            m.logical_name == self.node
                && m.instance.as_deref() == Some(self.instance.as_str())
                && m.start_time_ms == self.started_ms
        })
    }
}
