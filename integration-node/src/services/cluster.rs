//! `wm.server.cluster`: the member list, as the seed's services name it.

use serde_json::{json, Value};

use super::{Registry, ServiceError};
use crate::node::Node;

/// Registers `wm.server.cluster:*`.
pub fn register(r: &mut Registry) {
    // Public: the members without their admin addresses or instance ids.
    r.register("wm.server.cluster:getMembers", |node, _, _| {
        Box::pin(async move { Ok(json!({"members": node.public_members().await})) })
    });
    r.register_admin("wm.server.cluster:clearClusterMemberList", |node, _, _| {
        Box::pin(clear_members(node))
    });
}

/// `clearClusterMemberList`: empties the member list; live members re-register within one
/// refresh interval.
pub async fn clear_members(node: &Node) -> Result<Value, ServiceError> {
    let removed = node.backend.remove_all(&node.settings.members_cache()).await?;
    tracing::info!(event = "node.members_cleared", removed);
    Ok(json!({"removed": removed}))
}
