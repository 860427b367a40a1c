//! The stripe's roster: which servers belong to it, with their addresses and Raft node ids, as a
//! replicated, versioned document (docs/operations.md "Changing the array's servers").
//!
//! cluster.toml is the seed of a new array; afterwards the roster in the stripe's own log is the
//! truth. It is kept as one entry of a cache whose name holds a control character, which no client
//! can name (`ferrocotta::protocol::check_cache_name`), so it travels in snapshots like any entry
//! and changes only through [`crate::command::CommandKind::SetRoster`], a compare-and-set on its
//! generation. Each change adds one to the generation: the live document a server hands to clients
//! carries it (`stripes[i].generation`), and every reply names it, so a client that meets a newer
//! one downloads the document again.
//!
//! Which servers vote is openraft's membership, not the roster: a server is put in the roster
//! before it is added as a learner and taken out after it left the membership, so the roster
//! always names every server the membership does (a peer's address is looked up here). Names of
//! removed servers are kept (`retired`) and never used again, so a stale server started from an old
//! cluster.toml is refused by name instead of being taken for a new one.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use ferrocotta::config::{ClusterConfig, ServerConfig, StripeConfig};
use ferrocotta::slots::SlotSet;
use serde::{Deserialize, Serialize};

use crate::state_machine::SharedState;
use crate::store::{CacheEntry, Store};
use crate::types::NodeId;

/// The cache that holds the roster: its name has a control character, so no client can name it.
pub const ROSTER_CACHE: &str = "\u{1}array";

/// The roster's key in [`ROSTER_CACHE`].
const ROSTER_KEY: &[u8] = b"roster";

/// Whether a cache is internal (hidden from listings and counts).
pub fn is_internal_cache(name: &str) -> bool {
    name.starts_with('\u{1}')
}

/// One stripe's servers at one generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Roster {
    /// Changes committed since the seed (0: as cluster.toml says).
    pub generation: u64,
    /// The stripe's servers, each with its node id set.
    pub servers: Vec<ServerConfig>,
    /// Servers added and not yet voters (the active promotes them once caught up).
    #[serde(default)]
    pub joining: Vec<String>,
    /// Names of removed servers: never used again.
    #[serde(default)]
    pub retired: Vec<String>,
    /// The node id the next added server gets (ids are never reused).
    pub next_id: NodeId,
    /// The slots the stripe owns, once slots have moved (`None`: as cluster.toml says).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slots: Option<SlotSet>,
    /// Owned slots being handed to another stripe: frozen, neither read nor written, until the
    /// other stripe owns them and this one lets them go (`crate::slot_moves`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub moving: Vec<SlotMove>,
    /// Slots being received from another stripe: their entries are imported here, and nothing of
    /// them is served until the stripe owns them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub importing: Vec<SlotMove>,
    /// Where slots this stripe let go went, for the redirect that names their owner.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub moved: Vec<SlotMove>,
    /// The array's stripes as this stripe last heard of them, once stripes were added or
    /// removed (`None`: as cluster.toml says).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layout: Option<Layout>,
}

/// Slots on their way between this stripe and another.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlotMove {
    /// The slots.
    pub slots: SlotSet,
    /// The other stripe (index).
    pub stripe: u32,
}

/// The array's list of stripes after stripes were added or removed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Layout {
    /// Number of additions and removals of stripes (the document's `layout`).
    pub version: u64,
    /// Every stripe, as last heard of (this stripe's own section is taken from its roster).
    pub stripes: Vec<StripeConfig>,
}

impl Roster {
    /// The roster cluster.toml describes for a stripe.
    pub fn seed(config: &ClusterConfig, stripe: usize) -> Roster {
        let servers: Vec<ServerConfig> = config.stripes[stripe]
            .servers
            .iter()
            .enumerate()
            .map(|(i, s)| ServerConfig {
                id: Some(s.node_id_at(i)),
                ..s.clone()
            })
            .collect();
        let next_id = servers.iter().filter_map(|s| s.id).max().unwrap_or(0) + 1;
        Roster {
            generation: config.stripes[stripe].generation,
            servers,
            joining: Vec::new(),
            retired: Vec::new(),
            next_id,
            slots: None,
            moving: Vec::new(),
            importing: Vec::new(),
            moved: Vec::new(),
            layout: None,
        }
    }

    /// The slots the stripe owns: its own record, or else what its cluster.toml says.
    pub fn owned_slots(&self, seed: &ClusterConfig, stripe: usize) -> SlotSet {
        self.slots.clone().unwrap_or_else(|| seed.stripe_slots(stripe))
    }

    /// The encoded roster a store holds, if a change was ever committed.
    fn stored_bytes(store: &Store) -> Option<&Bytes> {
        Some(&store.caches.get(ROSTER_CACHE)?.entries.get(ROSTER_KEY)?.value)
    }

    /// The roster a store holds, if a change was ever committed.
    pub fn stored(store: &Store) -> Option<Roster> {
        match serde_json::from_slice(Roster::stored_bytes(store)?) {
            Ok(r) => Some(r),
            Err(e) => {
                // Written by this code only; a roster that does not decode is a bug, said loudly.
                tracing::error!(event = "roster.undecodable", error = %e);
                None
            }
        }
    }

    /// The generation a store holds (0: no change since the seed).
    pub fn stored_generation(store: &Store) -> u64 {
        Roster::stored(store).map(|r| r.generation).unwrap_or(0)
    }

    /// Applies a `SetRoster` entry: stores `encoded` if the stored generation is `expected`.
    pub fn apply(store: &mut Store, expected: u64, encoded: &[u8], at_ms: u64) -> Result<(), String> {
        let current = Roster::stored_generation(store);
        if current != expected {
            return Err(format!(
                "the roster changed meanwhile: it is at generation {current}, the change was made against {expected}"
            ));
        }
        let entry = CacheEntry {
            value: Bytes::copy_from_slice(encoded),
            written_ms: at_ms,
            accessed_ms: at_ms,
            ttl_ms: None,
            tti_ms: None,
            owner: None,
        };
        let roster: Roster =
            serde_json::from_slice(encoded).map_err(|e| format!("the new roster does not decode: {e}"))?;
        store
            .caches
            .entry(ROSTER_CACHE.to_string())
            .or_default()
            .entries
            .insert(ROSTER_KEY.to_vec(), entry);
        crate::slot_moves::roster_applied(store, &roster);
        Ok(())
    }

    /// The encoding stored in the log and the store.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a roster always encodes")
    }

    /// A server by name.
    pub fn server(&self, name: &str) -> Option<&ServerConfig> {
        self.servers.iter().find(|s| s.name == name)
    }

    /// A server by node id.
    pub fn by_id(&self, id: NodeId) -> Option<&ServerConfig> {
        self.servers.iter().find(|s| s.id == Some(id))
    }
}

/// The roster this server goes by, refreshed as entries apply, with the document built from it.
pub struct LiveRoster {
    /// cluster.toml, whose other stripes and settings the document keeps.
    seed: Arc<ClusterConfig>,
    /// This server's stripe.
    stripe: usize,
    /// This server's name.
    me: String,
    /// The current roster, the stored bytes it came from, and the document.
    current: RwLock<Current>,
    /// Told the generation at each change.
    changed: tokio::sync::watch::Sender<u64>,
}

struct Current {
    roster: Arc<Roster>,
    bytes: Option<Bytes>,
    document: Arc<String>,
    config: Arc<ClusterConfig>,
}

impl LiveRoster {
    /// Starts from `roster` (the stored one, or the one learned from a peer, or the seed).
    pub fn new(seed: Arc<ClusterConfig>, stripe: usize, me: &str, roster: Roster) -> Arc<LiveRoster> {
        let (document, config) = document_and_config(&seed, stripe, &roster);
        let (changed, _) = tokio::sync::watch::channel(roster.generation);
        Arc::new(LiveRoster {
            seed,
            stripe,
            me: me.to_string(),
            current: RwLock::new(Current {
                roster: Arc::new(roster),
                bytes: None,
                document,
                config,
            }),
            changed,
        })
    }

    /// The live document, parsed: which stripe owns which slot, as this server knows it.
    pub fn config(&self) -> Arc<ClusterConfig> {
        self.current.read().expect("roster lock").config.clone()
    }

    /// cluster.toml as this server was started with it.
    pub fn seed(&self) -> &Arc<ClusterConfig> {
        &self.seed
    }

    /// The roster now.
    pub fn get(&self) -> Arc<Roster> {
        self.current.read().expect("roster lock").roster.clone()
    }

    /// Its generation.
    pub fn generation(&self) -> u64 {
        self.get().generation
    }

    /// The configuration document served to clients: cluster.toml with this stripe's servers and
    /// generation from the roster.
    pub fn document(&self) -> Arc<String> {
        self.current.read().expect("roster lock").document.clone()
    }

    /// Waits for changes (the value is the generation).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Takes the store's roster if it changed since last looked at; returns whether it did.
    pub fn refresh(&self, shared: &SharedState) -> bool {
        let stored = shared.read(|d| Roster::stored_bytes(&d.store).cloned());
        let Some(bytes) = stored else {
            return false;
        };
        if self.current.read().expect("roster lock").bytes.as_ref() == Some(&bytes) {
            return false;
        }
        let roster: Roster = match serde_json::from_slice(&bytes) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(event = "roster.undecodable", error = %e);
                return false;
            }
        };
        let generation = roster.generation;
        let (document, config) = document_and_config(&self.seed, self.stripe, &roster);
        let before = {
            let mut c = self.current.write().expect("roster lock");
            let before = c.roster.generation;
            *c = Current {
                roster: Arc::new(roster),
                bytes: Some(bytes),
                document,
                config,
            };
            before
        };
        if before != generation {
            let r = self.get();
            tracing::info!(
                event = "roster.changed",
                generation,
                servers = %r.servers.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(","),
                joining = %r.joining.join(","),
            );
            self.changed.send_replace(generation);
        }
        true
    }

    /// Names of the stripe's servers by node id.
    pub fn names(&self) -> HashMap<NodeId, String> {
        self.get()
            .servers
            .iter()
            .filter_map(|s| Some((s.id?, s.name.clone())))
            .collect()
    }

    /// The name of a server of the stripe.
    pub fn name_of(&self, id: NodeId) -> Option<String> {
        self.get().by_id(id).map(|s| s.name.clone())
    }

    /// The group address of a server of the stripe.
    pub fn group_addr(&self, id: NodeId) -> Option<String> {
        self.get().by_id(id).map(|s| s.group_addr())
    }

    /// The node id of another server of the stripe, by name (peers authenticate by name).
    pub fn peer_id(&self, name: &str) -> Option<NodeId> {
        if name == self.me {
            return None;
        }
        self.get().server(name).and_then(|s| s.id)
    }

    /// Why a peer of this name is refused, when it is a removed server.
    pub fn retired_message(&self, name: &str) -> Option<String> {
        let r = self.get();
        r.retired.iter().any(|n| n == name).then(|| {
            format!(
                "server `{name}` was removed from stripe `{}` (the stripe's servers are now {} at generation {}); \
                 a removed server must not start again: delete its data or give it a new name with \
                 `ferrocotta array add-server`",
                self.seed.stripes[self.stripe].name,
                r.servers.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", "),
                r.generation
            )
        })
    }
}

/// cluster.toml with one stripe's servers, generation and slots taken from a roster, and the
/// array's stripes from the roster's layout once stripes were added or removed. Once any slot
/// has moved, every stripe's section names its slots: this stripe's own as its roster says, the
/// others' as this stripe last heard, less the slots this stripe owns (its roster is the truth
/// for those), so the document never names two owners of a slot this stripe holds.
pub fn document(seed: &ClusterConfig, stripe: usize, roster: &Roster) -> ClusterConfig {
    let mut doc = seed.clone();
    if let Some(layout) = &roster.layout {
        doc.stripes = layout.stripes.clone();
        doc.layout = layout.version;
    }
    let moved = roster.slots.is_some() || roster.layout.is_some() || seed.names_slots();
    if moved {
        doc = doc.with_slots_named();
        let own = roster.owned_slots(seed, stripe);
        for (i, s) in doc.stripes.iter_mut().enumerate() {
            match &mut s.slots {
                Some(set) if i != stripe => set.remove_set(&own),
                _ => {}
            }
        }
        if let Some(s) = doc.stripes.get_mut(stripe) {
            s.slots = Some(own);
        }
    }
    if let Some(own) = doc.stripes.get_mut(stripe) {
        own.servers = roster.servers.clone();
        own.generation = roster.generation;
    }
    doc
}

fn document_and_config(seed: &ClusterConfig, stripe: usize, roster: &Roster) -> (Arc<String>, Arc<ClusterConfig>) {
    let doc = document(seed, stripe, roster);
    (Arc::new(doc.to_toml()), Arc::new(doc))
}

/// Keeps `live` in step with the store: looks once at start (a roster loaded with the snapshot
/// or replayed from the log), then whenever the state machine says the stored roster may have
/// changed (a `SetRoster` entry applied, a snapshot installed).
pub async fn follow(live: Arc<LiveRoster>, shared: Arc<SharedState>, shutdown: tokio_util::sync::CancellationToken) {
    loop {
        live.refresh(&shared);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = shared.roster_changed() => {}
        }
    }
}

/// A config of `stripes` x `per_stripe` servers on fixed ports, for unit tests.
#[cfg(test)]
pub(crate) fn test_config(stripes: usize, per_stripe: usize) -> ClusterConfig {
    ferrocotta::config::local_array(
        "t",
        "127.0.0.1",
        stripes,
        per_stripe,
        ferrocotta::config::Security::secret_files("s", "p"),
        |i| ferrocotta::config::ServerPorts {
            port: 1000 + i as u16,
            group_port: 2000 + i as u16,
            admin_port: 3000 + i as u16,
            resp_port: None,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ClusterConfig {
        test_config(1, 3)
    }

    #[test]
    fn a_change_applies_only_against_the_generation_it_was_made_for() {
        let c = config();
        let mut store = Store::default();
        let mut r = Roster::seed(&c, 0);
        assert_eq!(r.next_id, 4);
        r.generation = 1;
        r.servers.remove(0);
        r.retired.push("a1".into());
        Roster::apply(&mut store, 0, &r.encode(), 5).unwrap();
        assert_eq!(Roster::stored(&store), Some(r.clone()));
        // A second change made against generation 0 (a lost race) is refused.
        let err = Roster::apply(&mut store, 0, &r.encode(), 6).unwrap_err();
        assert!(err.contains("generation 1"), "{err}");
    }

    #[test]
    fn the_document_carries_the_roster_and_parses() {
        let c = config();
        let mut r = Roster::seed(&c, 0);
        let mut added = r.servers[0].clone();
        added.name = "a4".into();
        added.id = Some(4);
        added.port = 1100;
        added.group_port = 2100;
        added.admin_port = 3100;
        r.servers.push(added);
        r.generation = 2;
        let doc = ClusterConfig::parse(&document(&c, 0, &r).to_toml()).unwrap();
        assert_eq!(doc.stripes[0].generation, 2);
        let (pos, _) = doc.find_server("a4").unwrap();
        assert_eq!(pos.node_id(), 4);
    }
}
