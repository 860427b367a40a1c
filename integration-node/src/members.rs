//! The member list: one entry per live node in the array cache `ferrocotta.node.members.<cluster>`,
//! ephemeral (tied to the node's array session, so a node that dies leaves it when its session
//! expires). Below the node: these functions take the backend and the cache, and know nothing of
//! the node that calls them.

use ferrocotta::client::ConnectionState;
use ferrocotta::ClientError;
use serde::{Deserialize, Serialize};

use crate::backend::Backend;

/// Members listed at most.
pub const MEMBERS_LISTED_MAX: usize = 10_000;

/// One node's entry. The field names are the list's format, read by every node of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Its unique logical name (also the entry's key).
    pub logical_name: String,
    /// Its identity: its state folder's (kept across restarts, so a restarted node can take over
    /// the entry its dead process left), else random per process. Not shown by the public service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// Its service address.
    pub service: String,
    /// Its admin address (not shown by the public service).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<String>,
    /// Whether its ports speak TLS (https), so that the cluster console reaches its admin port.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tls: bool,
    /// Its software version.
    pub version: String,
    /// When it started, ms since the epoch.
    pub start_time_ms: u64,
    /// `online` or `offline`.
    pub state: String,
    /// Times the node rejoined the array (its array session had expired).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub rejoins: u64,
    /// Operations of its nonstop caches whose timeout behaviour applied.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub nonstop_timeouts: u64,
    /// Its last events (rejoins, nonstop timeouts, offline and online), oldest first, for the
    /// cluster console. Not shown by the public service.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<ferrocotta::console::Event>,
}

/// Counters at zero are left out, so an entry of a node that saw nothing reads as entries always
/// have.
fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Member {
    /// The entry as the public service shows it: without the admin address and the instance id,
    /// which only the admin port gives out.
    pub fn public(mut self) -> Member {
        self.admin = None;
        self.instance = None;
        self.events = Vec::new();
        self
    }
}

/// The members as this node sees them. A node cut from the array sees an empty list (as in the
/// seed guide); in stand-alone mode the list is `me` alone.
pub async fn list(backend: &Backend, cache: &str, me: &Member) -> Vec<Member> {
    match backend {
        Backend::Local(_) => vec![me.clone()],
        Backend::Array(c) => {
            if c.connection_state() == ConnectionState::Disconnected {
                return Vec::new();
            }
            read_all(c, cache).await.unwrap_or_default()
        }
    }
}

/// Every entry of the member list, or why it could not be read: for decisions that must not take
/// an unreadable list for an empty one (declaring a dead node's scheduled runs in doubt).
pub async fn read_all(c: &ferrocotta::ArrayClient, cache: &str) -> Result<Vec<Member>, ClientError> {
    let keys = c.all_keys(cache, b"", MEMBERS_LISTED_MAX).await?;
    let values = c.get_all(cache, &keys).await?;
    Ok(values
        .into_iter()
        .flatten()
        .filter_map(|v| serde_json::from_slice(&v).ok())
        .collect())
}

/// The entry stored under `name`, if any (`Ok(None)` also for one that does not read as an entry).
pub async fn entry_of(backend: &Backend, cache: &str, name: &str) -> Result<Option<Member>, ClientError> {
    match backend {
        Backend::Local(_) => Ok(None),
        Backend::Array(c) => Ok(c
            .get(cache, name.as_bytes())
            .await?
            .and_then(|v| serde_json::from_slice(&v).ok())),
    }
}

/// Writes `me` (ephemeral: it disappears when the node's array session ends).
pub async fn register(backend: &Backend, cache: &str, me: &Member) -> Result<(), ClientError> {
    if let Backend::Array(c) = backend {
        let value = serde_json::to_vec(me).expect("a member entry always encodes");
        c.put_ephemeral(cache, me.logical_name.as_bytes(), &value).await?;
    }
    Ok(())
}

/// Writes `me` only if no entry of its name exists, in one replicated step (so of two nodes
/// starting with one name exactly one gets it). `Ok(None)`: the entry is now ours; `Ok(Some(raw))`:
/// the entry already there, as stored.
pub async fn claim(backend: &Backend, cache: &str, me: &Member) -> Result<Option<Vec<u8>>, ClientError> {
    match backend {
        Backend::Local(_) => Ok(None),
        Backend::Array(c) => {
            let value = serde_json::to_vec(me).expect("a member entry always encodes");
            c.put_ephemeral_if_absent(cache, me.logical_name.as_bytes(), &value)
                .await
        }
    }
}

/// Removes `name`'s entry (graceful stop).
pub async fn leave(backend: &Backend, cache: &str, name: &str) -> Result<(), ClientError> {
    if let Backend::Array(c) = backend {
        c.remove(cache, name.as_bytes()).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_reads_as_the_list_has_always_stored_it_and_the_public_view_hides_what_it_must() {
        let stored = r#"{"logical_name":"n1","instance":"ab12","service":"127.0.0.1:5555","admin":"127.0.0.1:9999","version":"0.1.0","start_time_ms":7,"state":"online"}"#;
        let m: Member = serde_json::from_str(stored).unwrap();
        assert_eq!(serde_json::to_string(&m).unwrap(), stored);
        let public = serde_json::to_value(m.public()).unwrap();
        assert!(public.get("admin").is_none() && public.get("instance").is_none());
        assert_eq!(public["service"], "127.0.0.1:5555");
    }
}
