//! Moving hash slots between stripes while both serve (docs/operations.md "Adding and removing
//! stripes").
//!
//! A slot moves from stripe A to stripe B in steps that are each one entry in one stripe's log,
//! driven by `ferrocotta array rebalance`, so a move cut short by a failover or a dead CLI is
//! resumed by running the command again:
//! 1. **freeze**: A's roster marks the slots `moving` to B. From that entry on, A applies no write
//!    and serves no read of them ([`ErrorReply::SlotMoving`]); its copy can no longer change.
//! 2. **import**: B's roster marks them `importing` from A; the entries A held when it froze them
//!    (values, written and access times, ttl and tti, cache settings) are copied into B's log in
//!    [`CommandKind::ImportSlots`] batches. B serves none of them yet.
//! 3. **own**: B's roster adds them to its slots. B serves them from here on.
//! 4. **release**: A's roster drops them from its slots and records B as their owner; applying it
//!    drops A's copy. A answers [`ErrorReply::WrongStripe`] for them.
//!
//! No key can be written on two stripes: A stops applying writes of a slot (step 1) before its
//! entries are read for the copy, and B applies none before step 3. Each check is made where the
//! write is applied and the read is served, against the roster in the same store, so a request
//! that passed the client port's check before the roster changed is still refused. Between steps
//! 1 and 3 the slot is unavailable: the client waits and asks again within its deadline.
//!
//! Session-owned (ephemeral) entries and locks belong to a session of their stripe, whose id is an
//! index of that stripe's log. A client holds a session on every stripe once it holds one at all
//! (its keep-alive opens the others), and each names the client's id (`Store::session_clients`).
//! So they move with their keys: the copy names the owning and holding *clients*, and B gives
//! each entry and hold to that client's session on B. The move of a slot is given up (the freeze
//! undone, the copy dropped, the operator told which slots and why) when B has no session of such
//! a client yet, when the client never gave its id (an older client), or when someone waits for
//! one of its locks (the waiting request lives in A's memory); running the command again later
//! moves it.
//!
//! [`CommandKind::ImportSlots`]: crate::command::CommandKind::ImportSlots

use bytes::Bytes;
use ferrocotta::protocol::{CacheSettings, ErrorReply, ReadOp};
use ferrocotta::slots::{slot_of_key, SlotSet};
use serde::{Deserialize, Serialize};

use crate::command::Change;
use crate::membership::{ChangeError, Changes};
use crate::roster::{is_internal_cache, Layout, Roster, SlotMove};
use crate::store::{ApplyContext, CacheEntry, LockState, Store};
use ferrocotta::protocol::LockMode;

/// What the store checks of every key, derived from its roster (rebuilt when a roster applies or
/// a snapshot loads). Off until the roster names its slots: until then the client port checks
/// keys against cluster.toml's split, which never changes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SlotGuard {
    /// Whether the roster names the stripe's slots.
    active: bool,
    /// Slots the stripe owns (frozen ones included).
    owned: SlotSet,
    /// Owned slots frozen for a move, with their destination.
    moving: Vec<SlotMove>,
    /// Slots being imported (held, not served).
    importing: SlotSet,
    /// Where released slots went.
    moved: Vec<SlotMove>,
}

impl SlotGuard {
    /// The guard a roster asks for.
    pub fn of(roster: &Roster) -> SlotGuard {
        let Some(owned) = roster.slots.clone() else {
            return SlotGuard::default();
        };
        let mut importing = SlotSet::empty();
        for m in &roster.importing {
            importing.insert_set(&m.slots);
        }
        SlotGuard {
            active: true,
            owned,
            moving: roster.moving.clone(),
            importing,
            moved: roster.moved.clone(),
        }
    }

    /// Why a request naming `key` is refused here, if it is.
    pub fn refusal(&self, key: &[u8]) -> Option<ErrorReply> {
        if !self.active {
            return None;
        }
        let slot = slot_of_key(key);
        if self.moving.iter().any(|m| m.slots.contains(slot)) {
            return Some(ErrorReply::SlotMoving { slot });
        }
        if self.owned.contains(slot) {
            return None;
        }
        let owner = self
            .moved
            .iter()
            .find(|m| m.slots.contains(slot))
            .map_or(u32::MAX, |m| m.stripe);
        Some(ErrorReply::WrongStripe { owner })
    }

    /// Whether the stripe serves `key` in listings (owned, frozen included: an imported copy is
    /// not served yet, a released one is gone).
    pub fn lists(&self, key: &[u8]) -> bool {
        !self.active || self.owned.contains(slot_of_key(key))
    }

    /// Whether a move is under way on this stripe (in either direction).
    pub fn busy(&self) -> bool {
        !self.moving.is_empty() || !self.importing.is_empty()
    }

    /// The slots whose entries the stripe keeps: owned or being imported (every slot, until the
    /// roster names its slots).
    fn kept(&self) -> SlotSet {
        if !self.active {
            return SlotSet::range(0, ferrocotta::slots::SLOT_COUNT);
        }
        let mut kept = self.owned.clone();
        kept.insert_set(&self.importing);
        kept
    }
}

/// Keys a client change names.
fn change_keys(change: &Change) -> Vec<&[u8]> {
    match change {
        Change::PutAll(p) => p.entries.iter().map(|(k, _)| k.as_slice()).collect(),
        Change::Txn(t) => t.txn.targets().map(|(_, k, _)| k).collect(),
        other => other.first_key().map(|(_, k)| k).into_iter().collect(),
    }
}

impl Store {
    /// Why this change is refused by the slot rules, if it is. A whole-cache clear waits while a
    /// move is under way (it would miss the entries on their way, or clear ones not served yet).
    pub(crate) fn slot_refusal(&self, change: &Change) -> Option<ErrorReply> {
        let guard = &self.slot_guard;
        if !guard.active {
            return None;
        }
        if let Change::Clear(_) = change {
            if guard.busy() {
                let slot = guard
                    .moving
                    .first()
                    .and_then(|m| m.slots.ranges().first())
                    .or(guard.importing.ranges().first())
                    .map_or(0, |r| r[0]);
                return Some(ErrorReply::SlotMoving { slot });
            }
        }
        change_keys(change).into_iter().find_map(|k| guard.refusal(k))
    }

    /// Why this read is refused by the slot rules, if it is.
    pub(crate) fn read_refusal(&self, op: &ReadOp) -> Option<ErrorReply> {
        // Every read passes here: no list of its keys unless the roster names slots.
        if !self.slot_guard.active {
            return None;
        }
        op.keys().into_iter().find_map(|k| self.slot_guard.refusal(k))
    }

    /// Entries this stripe holds but does not serve (imported, not owned yet) in a cache, for its
    /// size.
    pub(crate) fn unserved_entries(&self, cache: &str) -> usize {
        if !self.slot_guard.active || self.slot_guard.importing.is_empty() {
            return 0;
        }
        self.caches
            .get(cache)
            .map_or(0, |c| c.entries.keys().filter(|k| !self.slot_guard.lists(k)).count())
    }
}

/// After a roster entry applied: the new guard, and the entries of slots the stripe neither owns
/// nor imports any more (released after a move, or an import given up) are dropped.
pub fn roster_applied(store: &mut Store, roster: &Roster) {
    let before = std::mem::replace(&mut store.slot_guard, SlotGuard::of(roster));
    let guard = &store.slot_guard;
    if !guard.active {
        return;
    }
    // Only a slot kept before and not now can hold entries to drop.
    let mut lost = before.kept();
    lost.remove_set(&guard.kept());
    if lost.is_empty() {
        return;
    }
    let doomed: Vec<(String, Vec<u8>)> = store
        .caches
        .iter()
        .filter(|(name, _)| !is_internal_cache(name))
        .flat_map(|(name, c)| {
            c.entries
                .keys()
                .filter(|k| lost.contains(slot_of_key(k)))
                .map(move |k| (name.clone(), k.clone()))
        })
        .collect();
    let count = doomed.len();
    for (cache, key) in doomed {
        store.remove_entry(&cache, &key);
    }
    let doomed_locks: Vec<(String, Vec<u8>)> = store
        .locks
        .keys()
        .filter(|(_, k)| lost.contains(slot_of_key(k)))
        .cloned()
        .collect();
    let locks = doomed_locks.len();
    for lock in doomed_locks {
        drop_lock(store, lock);
    }
    tracing::info!(event = "slots.dropped", slots = %lost, entries = count, locks);
}

/// Drops a lock of a slot the stripe lost, and its place in its holders' and waiters' sessions.
fn drop_lock(store: &mut Store, lock: (String, Vec<u8>)) {
    let Some(state) = store.locks.remove(&lock) else {
        return;
    };
    let sessions = state.holders.keys().chain(state.waiters.iter().map(|(s, _)| s));
    for session in sessions {
        if let Some(s) = store.sessions.get_mut(session) {
            s.locks.remove(&lock);
        }
    }
}

/// The guard a loaded store asks for (after a snapshot was loaded or installed).
pub fn rebuild_guard(store: &mut Store) {
    store.slot_guard = Roster::stored(store).map(|r| SlotGuard::of(&r)).unwrap_or_default();
}

/// One entry on its way to another stripe, as it was: times, ttl and tti included.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImportedEntry {
    /// Its cache.
    pub cache: String,
    /// Its key.
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    /// Its value.
    pub value: Bytes,
    /// When it was last written.
    pub written_ms: u64,
    /// When it was last accessed, as replicated.
    pub accessed_ms: u64,
    /// Its time to live.
    pub ttl_ms: Option<u64>,
    /// Its time to idle.
    pub tti_ms: Option<u64>,
    /// The client whose session owns it (an ephemeral entry): it goes to that client's session on
    /// the new stripe.
    pub owner: Option<u64>,
}

/// A held lock on its way to another stripe: its mode and how many times each client holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImportedLock {
    /// Its cache.
    pub cache: String,
    /// Its key.
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    /// The holders' mode.
    pub mode: LockMode,
    /// Holding clients and their holds (locks are reentrant).
    pub holders: Vec<(u64, u32)>,
}

/// A batch of entries of moving slots, with the settings of their caches.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SlotImport {
    /// Settings of the caches the entries belong to (a cache created with its own settings keeps
    /// them on the new stripe).
    pub caches: Vec<(String, CacheSettings)>,
    /// The entries.
    pub entries: Vec<ImportedEntry>,
    /// The held locks (all in the first batch of a split).
    pub locks: Vec<ImportedLock>,
}

impl SlotImport {
    /// Key and value bytes it carries.
    pub fn bytes(&self) -> usize {
        self.entries.iter().map(|e| e.key.len() + e.value.len()).sum()
    }

    /// Splits it into batches of at most `max_bytes` of keys and values (at least one entry each).
    pub fn split(self, max_bytes: usize) -> Vec<SlotImport> {
        let mut out = Vec::new();
        let mut current = SlotImport {
            caches: self.caches.clone(),
            entries: Vec::new(),
            locks: self.locks,
        };
        let mut bytes = 0;
        for e in self.entries {
            let size = e.key.len() + e.value.len();
            if !current.entries.is_empty() && bytes + size > max_bytes {
                out.push(std::mem::replace(
                    &mut current,
                    SlotImport {
                        caches: self.caches.clone(),
                        entries: Vec::new(),
                        locks: Vec::new(),
                    },
                ));
                bytes = 0;
            }
            bytes += size;
            current.entries.push(e);
        }
        if !current.entries.is_empty() || !current.locks.is_empty() || out.is_empty() {
            out.push(current);
        }
        out
    }
}

/// The entries and held locks of frozen slots, to copy to their new stripe, with the clients
/// that own and hold them. Refused when a slot is not frozen (its entries could still change),
/// and ("cannot move now") when an ephemeral entry or a lock belongs to a client that never gave
/// its id, or a lock has waiting requests.
pub fn export(store: &Store, slots: &SlotSet, now_ms: u64) -> Result<SlotImport, String> {
    if !store.slot_guard.moving.iter().any(|m| m.slots.contains_set(slots)) {
        return Err(format!("slots {slots} are not frozen for a move here"));
    }
    let client_of = |session: &u64| store.session_clients.get(session).copied();
    let mut out = SlotImport::default();
    let mut anonymous = 0usize;
    for (name, cache) in store.caches.iter().filter(|(n, _)| !is_internal_cache(n)) {
        let before = out.entries.len();
        for (key, e) in &cache.entries {
            if !slots.contains(slot_of_key(key)) || e.expired(now_ms) {
                continue;
            }
            let owner = match e.owner.as_ref().map(client_of) {
                None => None,
                Some(Some(client)) => Some(client),
                Some(None) => {
                    anonymous += 1;
                    continue;
                }
            };
            out.entries.push(ImportedEntry {
                cache: name.clone(),
                key: key.clone(),
                value: e.value.clone(),
                written_ms: e.written_ms,
                accessed_ms: e.accessed_ms,
                ttl_ms: e.ttl_ms,
                tti_ms: e.tti_ms,
                owner,
            });
        }
        if out.entries.len() > before || cache.settings != CacheSettings::default() {
            out.caches.push((name.clone(), cache.settings));
        }
    }
    let mut waited = 0usize;
    for ((cache, key), lock) in store.locks.iter().filter(|((_, k), _)| slots.contains(slot_of_key(k))) {
        if !lock.waiters.is_empty() {
            waited += 1;
            continue;
        }
        let holders: Option<Vec<(u64, u32)>> = lock
            .holders
            .iter()
            .map(|(session, holds)| client_of(session).map(|c| (c, *holds)))
            .collect();
        match holders {
            Some(holders) if !holders.is_empty() => out.locks.push(ImportedLock {
                cache: cache.clone(),
                key: key.clone(),
                mode: lock.mode,
                holders,
            }),
            Some(_) => {}
            None => anonymous += 1,
        }
    }
    let mut why = Vec::new();
    if anonymous > 0 {
        why.push(format!(
            "{anonymous} ephemeral entries or locks belong to sessions of clients that did not give their id (clients of an earlier version)"
        ));
    }
    if waited > 0 {
        why.push(format!("{waited} locks have requests waiting for them"));
    }
    if !why.is_empty() {
        return Err(format!(
            "slots {slots} cannot move now: {}; they were not moved",
            why.join(", ")
        ));
    }
    Ok(out)
}

/// Applies an [`crate::command::CommandKind::ImportSlots`] entry: every key must be of a slot the
/// stripe is importing, and every owning or holding client must have a session here (which takes
/// over its entries and holds), or nothing is applied.
pub fn apply_import(store: &mut Store, import: &SlotImport, ctx: &ApplyContext) -> Result<(), ErrorReply> {
    let keys = import
        .entries
        .iter()
        .map(|e| &e.key)
        .chain(import.locks.iter().map(|l| &l.key));
    if let Some(key) = keys
        .into_iter()
        .find(|k| !store.slot_guard.importing.contains(slot_of_key(k)))
    {
        return Err(ErrorReply::Invalid(format!(
            "slot {} is not being imported by this stripe",
            slot_of_key(key)
        )));
    }
    let clients = import
        .entries
        .iter()
        .filter_map(|e| e.owner)
        .chain(import.locks.iter().flat_map(|l| l.holders.iter().map(|(c, _)| *c)));
    let mut session_of = std::collections::HashMap::new();
    for client in clients {
        if session_of.contains_key(&client) {
            continue;
        }
        let Some(session) = store.session_of_client(client) else {
            return Err(ErrorReply::Invalid(format!(
                "these slots cannot move now: client {client:016x} owns ephemeral entries or holds locks in them but has \
                 no session on this stripe yet (a client opens one on every stripe it learns of); they were not moved"
            )));
        };
        session_of.insert(client, session);
    }
    for (name, settings) in &import.caches {
        if is_internal_cache(name) {
            return Err(ErrorReply::Invalid("an internal cache cannot be imported".into()));
        }
        let cache = store.caches.entry(name.clone()).or_default();
        if cache.entries.is_empty() {
            cache.settings = *settings;
        }
    }
    for e in &import.entries {
        let entry = CacheEntry {
            value: e.value.clone(),
            written_ms: e.written_ms,
            accessed_ms: e.accessed_ms,
            ttl_ms: e.ttl_ms,
            tti_ms: e.tti_ms,
            owner: e.owner.map(|c| session_of[&c]),
        };
        store.insert_entry(&e.cache, e.key.clone(), entry, ctx);
    }
    for l in &import.locks {
        let lock = (l.cache.clone(), l.key.clone());
        drop_lock(store, lock.clone());
        let holders: std::collections::BTreeMap<u64, u32> =
            l.holders.iter().map(|(c, holds)| (session_of[c], *holds)).collect();
        for session in holders.keys() {
            if let Some(s) = store.sessions.get_mut(session) {
                s.locks.insert(lock.clone());
            }
        }
        store.locks.insert(
            lock,
            LockState {
                mode: l.mode,
                holders,
                waiters: Default::default(),
            },
        );
    }
    Ok(())
}

/// A step of a slot move, as `ferrocotta array rebalance` sends it to a stripe's active: the
/// slots and the other stripe of the move (destination of a freeze or release, source of an
/// import), the same pair the roster keeps in `moving` and `importing`.
pub type SlotStep = SlotMove;

/// What a slot step did.
#[derive(Debug, Clone, Serialize)]
pub struct SlotOutcome {
    /// The roster's generation after it.
    pub generation: u64,
    /// What happened, for the operator.
    pub message: String,
    /// Entries imported (an import).
    pub entries: u64,
    /// Bytes of keys and values imported (an import).
    pub bytes: u64,
}

/// Takes `step` out of a roster's list of moves; whether it was there.
fn take(list: &mut Vec<SlotMove>, step: &SlotStep) -> bool {
    let before = list.len();
    list.retain(|m| m != step);
    list.len() != before
}

/// Longest an import batch may take to commit.
const IMPORT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Keys and values in one `ImportSlots` log entry: openraft sends up to 300 entries in one
/// AppendEntries, which must stay well inside the group port's frame limit.
const IMPORT_ENTRY_BYTES: usize = 128 * 1024;

/// `ImportSlots` entries proposed at once (they share fsyncs).
const IMPORT_IN_FLIGHT: usize = 8;

impl Changes {
    fn me(&self) -> usize {
        self.stripe.position().stripe
    }

    fn outcome(&self, message: String) -> SlotOutcome {
        SlotOutcome {
            generation: self.stripe.roster().generation(),
            message,
            entries: 0,
            bytes: 0,
        }
    }

    /// Commits `next` (made from `current` by `change`) unless `change` says there is nothing to do.
    async fn slot_change(
        &self,
        change: impl FnOnce(&Roster, &mut Roster) -> Result<Option<String>, ChangeError>,
    ) -> Result<SlotOutcome, ChangeError> {
        self.check_active()?;
        let _one = self.lock.lock().await;
        let current = self.stripe.roster().get();
        let mut next = (*current).clone();
        next.slots = Some(current.owned_slots(&self.seed, self.me()));
        match change(&current, &mut next)? {
            None => Ok(self.outcome("already done".into())),
            Some(message) => {
                next.generation += 1;
                self.set_roster(&current, next).await?;
                tracing::info!(event = "slots.step", message = %message, generation = self.stripe.roster().generation());
                Ok(self.outcome(message))
            }
        }
    }

    /// Step 1: freezes owned slots for a move to stripe `to`.
    pub async fn freeze(&self, step: SlotStep) -> Result<SlotOutcome, ChangeError> {
        let me = self.me();
        self.slot_change(|current, next| {
            if current.moving.contains(&step) {
                return Ok(None);
            }
            if step.stripe as usize == me {
                return Err(ChangeError::Invalid("a stripe cannot move slots to itself".into()));
            }
            let owned = next.slots.clone().unwrap_or_default();
            if !owned.contains_set(&step.slots) {
                return Err(ChangeError::Invalid(format!(
                    "slots {} are not all this stripe's (it owns {owned})",
                    step.slots
                )));
            }
            if current.moving.iter().any(|m| m.slots.overlaps(&step.slots)) {
                return Err(ChangeError::Invalid(format!("slots {} are already moving", step.slots)));
            }
            let message = format!("slots {} frozen for stripe {}", step.slots, step.stripe);
            next.moving.push(step);
            Ok(Some(message))
        })
        .await
    }

    /// Undoes a freeze: the slots are served here again (a move given up before the other stripe
    /// owned them).
    pub async fn unfreeze(&self, step: SlotStep) -> Result<SlotOutcome, ChangeError> {
        self.slot_change(|_, next| {
            Ok(take(&mut next.moving, &step).then(|| format!("slots {} served here again", step.slots)))
        })
        .await
    }

    /// Step 2: prepares to receive slots from stripe `from`.
    pub async fn begin_import(&self, step: SlotStep) -> Result<SlotOutcome, ChangeError> {
        self.slot_change(|current, next| {
            if current.importing.contains(&step) {
                return Ok(None);
            }
            let owned = next.slots.clone().unwrap_or_default();
            if owned.overlaps(&step.slots) || current.importing.iter().any(|m| m.slots.overlaps(&step.slots)) {
                return Err(ChangeError::Invalid(format!(
                    "slots {} are already this stripe's, or already being imported",
                    step.slots
                )));
            }
            let message = format!("importing slots {} from stripe {}", step.slots, step.stripe);
            next.importing.push(step);
            Ok(Some(message))
        })
        .await
    }

    /// Step 2, the copy: entries exported by the other stripe, into the log in
    /// [`IMPORT_ENTRY_BYTES`] entries. Repeating it writes the same entries again.
    pub async fn import(&self, batch: SlotImport) -> Result<SlotOutcome, ChangeError> {
        use futures::StreamExt;
        self.check_active()?;
        let (count, bytes) = (batch.entries.len(), batch.bytes());
        let proposals = batch.split(IMPORT_ENTRY_BYTES).into_iter().map(|part| async move {
            match self
                .stripe
                .propose(crate::command::CommandKind::ImportSlots(part), IMPORT_TIMEOUT)
                .await
            {
                Ok(crate::command::CommandResult::Client(Ok(_))) => Ok(()),
                Ok(crate::command::CommandResult::Client(Err(e))) => Err(ChangeError::Invalid(e.to_string())),
                Ok(other) => Err(ChangeError::Unavailable(format!("unexpected result {other:?}"))),
                Err(ErrorReply::NotLeader { leader }) => Err(ChangeError::NotActive { active: leader }),
                Err(e) => Err(ChangeError::Unavailable(format!("the import did not commit: {e}"))),
            }
        });
        let results: Vec<Result<(), ChangeError>> = futures::stream::iter(proposals)
            .buffer_unordered(IMPORT_IN_FLIGHT)
            .collect()
            .await;
        results.into_iter().collect::<Result<Vec<()>, ChangeError>>()?;
        let mut outcome = self.outcome(format!("{count} entries imported ({bytes} bytes)"));
        outcome.entries = count as u64;
        outcome.bytes = bytes as u64;
        Ok(outcome)
    }

    /// Gives up an import: the copied entries are dropped.
    pub async fn abandon_import(&self, step: SlotStep) -> Result<SlotOutcome, ChangeError> {
        self.slot_change(|_, next| {
            Ok(take(&mut next.importing, &step).then(|| format!("import of slots {} given up", step.slots)))
        })
        .await
    }

    /// Step 3: owns imported slots; this stripe serves them from now on.
    pub async fn own(&self, step: SlotStep) -> Result<SlotOutcome, ChangeError> {
        self.slot_change(|_, next| {
            let mut owned = next.slots.clone().unwrap_or_default();
            if owned.contains_set(&step.slots) {
                return Ok(None);
            }
            if !take(&mut next.importing, &step) {
                return Err(ChangeError::Invalid(format!(
                    "slots {} are not being imported from stripe {}",
                    step.slots, step.stripe
                )));
            }
            owned.insert_set(&step.slots);
            for m in next.moved.iter_mut() {
                m.slots.remove_set(&step.slots);
            }
            next.moved.retain(|m| !m.slots.is_empty());
            next.slots = Some(owned);
            Ok(Some(format!("slots {} owned", step.slots)))
        })
        .await
    }

    /// Step 4: lets frozen slots go to the stripe that owns them now; their entries are dropped.
    pub async fn release(&self, step: SlotStep) -> Result<SlotOutcome, ChangeError> {
        self.slot_change(|_, next| {
            let mut owned = next.slots.clone().unwrap_or_default();
            if !take(&mut next.moving, &step) {
                if !owned.overlaps(&step.slots) {
                    return Ok(None);
                }
                return Err(ChangeError::Invalid(format!(
                    "slots {} are not frozen for stripe {}",
                    step.slots, step.stripe
                )));
            }
            owned.remove_set(&step.slots);
            next.slots = Some(owned);
            let message = format!("slots {} released to stripe {}", step.slots, step.stripe);
            match next.moved.iter_mut().find(|m| m.stripe == step.stripe) {
                Some(m) => m.slots.insert_set(&step.slots),
                None => next.moved.push(step),
            }
            Ok(Some(message))
        })
        .await
    }

    /// Takes a newer list of the array's stripes (a stripe added or removed).
    pub async fn set_layout(&self, layout: Layout) -> Result<SlotOutcome, ChangeError> {
        let me = self.me();
        if layout.stripes.len() <= me {
            return Err(ChangeError::Invalid(format!(
                "the new layout has {} stripes and leaves out this one (stripe {me}): remove it by `ferrocotta array remove-stripe`, which drains it first",
                layout.stripes.len()
            )));
        }
        let mut doc = (*self.seed).clone();
        doc.stripes = layout.stripes.clone();
        doc.layout = layout.version;
        ferrocotta::config::ClusterConfig::parse(&doc.to_toml())
            .map_err(|e| ChangeError::Invalid(format!("the new layout is not a valid array: {e}")))?;
        self.slot_change(|current, next| {
            let known = current.layout.as_ref().map_or(0, |l| l.version);
            if known >= layout.version {
                return Ok(None);
            }
            let (count, version) = (layout.stripes.len(), layout.version);
            next.layout = Some(layout);
            Ok(Some(format!(
                "the array has {count} stripes (layout {known} -> {version})"
            )))
        })
        .await
    }

    /// The entries of frozen slots (step 2's copy), from this server's store.
    pub fn export(&self, slots: &SlotSet) -> Result<SlotImport, ChangeError> {
        self.check_active()?;
        let now = crate::stripe::now_ms();
        self.stripe
            .shared()
            .read(|d| export(&d.store, slots, now))
            .map_err(ChangeError::Invalid)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use ferrocotta::protocol::Reply;

    use super::*;
    use crate::command::Put;
    use crate::store::ReplyRoom;

    /// Caches named in no config.
    static UNCONFIGURED: BTreeMap<String, CacheSettings> = BTreeMap::new();

    /// The context of the entry at index `now`, applied at time `now`.
    fn ctx(now: u64) -> ApplyContext<'static> {
        ApplyContext {
            now_ms: now,
            index: now,
            configured: &UNCONFIGURED,
            grants: Vec::new(),
        }
    }

    fn config(stripes: usize) -> ferrocotta::config::ClusterConfig {
        crate::roster::test_config(stripes, 1)
    }

    fn put(key: &[u8], value: &str) -> Change {
        Change::Put(Put {
            cache: "c".into(),
            key: key.to_vec(),
            value: value.into(),
            ttl_ms: Some(60_000),
            tti_ms: None,
            session: None,
        })
    }

    fn get(store: &Store, key: &[u8]) -> Result<Reply, crate::store::ReadError> {
        let room = ReplyRoom {
            limit: 1 << 20,
            granted: 1 << 20,
        };
        let op = ReadOp::Get {
            cache: "c".into(),
            key: key.to_vec(),
        };
        store.read(&op, 10, room, &|_, _| None)
    }

    fn set(store: &mut Store, roster: &Roster) {
        let expected = crate::roster::Roster::stored_generation(store);
        crate::roster::Roster::apply(store, expected, &roster.encode(), 1).unwrap();
    }

    /// A key of the given slot.
    fn key_in(slot: u16) -> Vec<u8> {
        (0..u32::MAX)
            .map(|i| format!("k{i}").into_bytes())
            .find(|k| slot_of_key(k) == slot)
            .unwrap()
    }

    #[test]
    fn a_slot_moves_with_its_entries_and_is_never_served_by_both_stripes() {
        let c = config(2);
        let key = key_in(100);
        let (mut a, mut b) = (Store::default(), Store::default());
        let (mut ra, mut rb) = (Roster::seed(&c, 0), Roster::seed(&c, 1));
        a.apply(&put(&key, "v1"), &mut ctx(5)).unwrap();

        // 1. A freezes slots 0-199 for B: no write, no read.
        ra.generation += 1;
        ra.slots = Some(ra.owned_slots(&c, 0));
        ra.moving.push(SlotMove {
            slots: SlotSet::range(0, 200),
            stripe: 1,
        });
        set(&mut a, &ra);
        assert_eq!(
            a.apply(&put(&key, "v2"), &mut ctx(6)),
            Err(ErrorReply::SlotMoving { slot: 100 })
        );
        assert_eq!(
            get(&a, &key),
            Err(crate::store::ReadError::Failed(ErrorReply::SlotMoving { slot: 100 }))
        );

        // 2. B imports; it serves nothing of the slot yet.
        rb.generation += 1;
        rb.slots = Some(rb.owned_slots(&c, 1));
        rb.importing.push(SlotMove {
            slots: SlotSet::range(0, 200),
            stripe: 0,
        });
        set(&mut b, &rb);
        let batch = export(&a, &SlotSet::range(0, 200), 10).unwrap();
        assert_eq!(batch.entries.len(), 1);
        assert_eq!(batch.entries[0].ttl_ms, Some(60_000));
        apply_import(&mut b, &batch, &ctx(11)).unwrap();
        assert!(matches!(
            get(&b, &key),
            Err(crate::store::ReadError::Failed(ErrorReply::WrongStripe { .. }))
        ));
        // An import of a slot not being imported is refused whole.
        let mut stray = batch.clone();
        stray.entries[0].key = key_in(300);
        assert!(apply_import(&mut b, &stray, &ctx(11)).is_err());

        // 3. B owns it: served, with its expiry metadata.
        rb.generation += 1;
        rb.importing.clear();
        rb.slots.as_mut().unwrap().insert(0, 200);
        set(&mut b, &rb);
        assert_eq!(get(&b, &key), Ok(Reply::Value(Some(b"v1".to_vec()))));
        assert_eq!(b.caches["c"].entries[&key].written_ms, 5);
        b.apply(&put(&key, "v3"), &mut ctx(12)).unwrap();

        // 4. A releases it: its copy is gone and it names B as the owner.
        ra.generation += 1;
        ra.moving.clear();
        ra.slots.as_mut().unwrap().remove(0, 200);
        ra.moved.push(SlotMove {
            slots: SlotSet::range(0, 200),
            stripe: 1,
        });
        set(&mut a, &ra);
        assert!(!a.caches.get("c").is_some_and(|c| c.entries.contains_key(&key)));
        assert_eq!(
            a.apply(&put(&key, "v4"), &mut ctx(13)),
            Err(ErrorReply::WrongStripe { owner: 1 })
        );

        // A snapshot of A loads with the same guard.
        let mut loaded: Store = postcard::from_bytes(&postcard::to_allocvec(&a).unwrap()).unwrap();
        loaded.rebuild_indexes();
        assert_eq!(loaded.slot_guard, a.slot_guard);
    }

    fn open(store: &mut Store, client: Option<u64>, index: u64) -> u64 {
        let change = Change::OpenSession(crate::command::OpenSession {
            client_name: "x".into(),
            client_id: client,
        });
        match store.apply(&change, &mut ctx(index)).unwrap() {
            Reply::Session { id, .. } => id,
            other => panic!("{other:?}"),
        }
    }

    fn ephemeral(key: &[u8], session: u64) -> Change {
        Change::Put(Put {
            cache: "c".into(),
            key: key.to_vec(),
            value: "v".into(),
            ttl_ms: None,
            tti_ms: None,
            session: Some(session),
        })
    }

    fn lock(key: &[u8], session: u64, wait_ms: i64) -> Change {
        Change::Lock(crate::command::Lock {
            cache: "c".into(),
            key: key.to_vec(),
            mode: LockMode::Exclusive,
            session,
            wait_ms,
        })
    }

    /// Store `stripe` of two, with the slots `moving` (stripe 0) or `importing` (stripe 1) the
    /// range 0-9.
    fn mid_move(store: &mut Store, stripe: usize) {
        let c = config(2);
        let mut r = Roster::seed(&c, stripe);
        r.generation = 1;
        r.slots = Some(r.owned_slots(&c, stripe));
        let step = SlotMove {
            slots: SlotSet::range(0, 10),
            stripe: 1 - stripe as u32,
        };
        if stripe == 0 {
            r.moving.push(step);
        } else {
            r.importing.push(step);
        }
        set(store, &r);
    }

    #[test]
    fn ephemeral_entries_and_locks_move_to_their_clients_session_on_the_new_stripe() {
        let (owned, locked, plain) = (key_in(7), key_in(8), key_in(9));
        let mut a = Store::default();
        let on_a = open(&mut a, Some(0xC1), 5);
        a.apply(&ephemeral(&owned, on_a), &mut ctx(6)).unwrap();
        a.apply(&lock(&locked, on_a, 0), &mut ctx(7)).unwrap();
        a.apply(&lock(&locked, on_a, 0), &mut ctx(8)).unwrap();
        a.apply(&put(&plain, "p"), &mut ctx(9)).unwrap();
        mid_move(&mut a, 0);
        let batch = export(&a, &SlotSet::range(0, 10), 10).unwrap();
        assert_eq!(batch.entries.iter().filter(|e| e.owner == Some(0xC1)).count(), 1);
        assert_eq!(batch.locks.len(), 1);
        assert_eq!(
            batch.locks[0].holders,
            vec![(0xC1, 2)],
            "both holds of the reentrant lock"
        );

        // B without a session of that client: nothing applies, and it says why.
        let mut b = Store::default();
        mid_move(&mut b, 1);
        let err = apply_import(&mut b, &batch, &ctx(20)).unwrap_err().to_string();
        assert!(err.contains("cannot move") && err.contains("00000000000000c1"), "{err}");
        assert!(b.caches.get("c").is_none_or(|c| c.entries.is_empty()));

        // With one: the entry and the holds are that session's.
        let on_b = open(&mut b, Some(0xC1), 21);
        apply_import(&mut b, &batch, &ctx(22)).unwrap();
        assert_eq!(b.caches["c"].entries[&owned].owner, Some(on_b));
        assert_eq!(b.caches["c"].entries[&plain].owner, None);
        assert_eq!(
            b.locks[&("c".to_string(), locked.clone())].holders,
            BTreeMap::from([(on_b, 2)])
        );
        assert!(b.sessions[&on_b].ephemeral.contains(&("c".to_string(), owned.clone())));
        assert!(b.sessions[&on_b].locks.contains(&("c".to_string(), locked.clone())));

        // A lets the slots go: its copies and its session's hold are gone.
        let c = config(2);
        let mut ra = Roster::stored(&a).unwrap();
        ra.generation += 1;
        ra.moving.clear();
        ra.slots = Some(ra.owned_slots(&c, 0));
        ra.slots.as_mut().unwrap().remove(0, 10);
        set(&mut a, &ra);
        assert!(a.locks.is_empty());
        assert!(a.sessions[&on_a].ephemeral.is_empty() && a.sessions[&on_a].locks.is_empty());

        // The client's session on B ends: its moved entry and hold go with it.
        b.end_session(on_b, &mut ctx(30));
        assert!(!b.caches["c"].entries.contains_key(&owned));
        assert!(b.locks.is_empty());
        assert!(b.caches["c"].entries.contains_key(&plain));
    }

    #[test]
    fn what_cannot_move_yet_is_named_and_nothing_is_exported() {
        // A session of a client that never gave its id owns an entry.
        let mut a = Store::default();
        let anonymous = open(&mut a, None, 5);
        a.apply(&ephemeral(&key_in(7), anonymous), &mut ctx(6)).unwrap();
        mid_move(&mut a, 0);
        let err = export(&a, &SlotSet::range(0, 10), 10).unwrap_err();
        assert!(
            err.contains("cannot move") && err.contains("did not give their id"),
            "{err}"
        );

        // A lock with a request waiting for it.
        let mut a = Store::default();
        let (first, second) = (open(&mut a, Some(1), 5), open(&mut a, Some(2), 6));
        a.apply(&lock(&key_in(8), first, 0), &mut ctx(7)).unwrap();
        a.apply(&lock(&key_in(8), second, -1), &mut ctx(8)).unwrap();
        mid_move(&mut a, 0);
        let err = export(&a, &SlotSet::range(0, 10), 10).unwrap_err();
        assert!(err.contains("cannot move") && err.contains("waiting"), "{err}");
        // Slots not frozen are not exported.
        assert!(export(&a, &SlotSet::range(10, 20), 10).is_err());
    }

    #[test]
    fn a_split_import_carries_the_locks_once() {
        let entry = |i: u8| ImportedEntry {
            cache: "c".into(),
            key: vec![i],
            value: vec![0; 100].into(),
            written_ms: 0,
            accessed_ms: 0,
            ttl_ms: None,
            tti_ms: None,
            owner: None,
        };
        let import = SlotImport {
            caches: Vec::new(),
            entries: (0..10).map(entry).collect(),
            locks: vec![ImportedLock {
                cache: "c".into(),
                key: vec![1],
                mode: LockMode::Shared,
                holders: vec![(1, 1)],
            }],
        };
        let parts = import.split(250);
        assert!(parts.len() > 1);
        assert_eq!(parts.iter().map(|p| p.locks.len()).sum::<usize>(), 1);
        assert_eq!(parts.iter().map(|p| p.entries.len()).sum::<usize>(), 10);
    }
}
