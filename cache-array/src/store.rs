//! The replicated data of a stripe: caches with expiry and eviction, client sessions and locks.
//!
//! Architecture invariant: everything here is deterministic. Time comes in as the `now_ms` of the
//! log entry being applied (stamped by the active) or, for reads, as an argument; nothing here
//! reads a clock. Two servers that apply the same log hold the same store.
//!
//! Expiry: an entry expires at the earlier of `written_ms + ttl_ms` and `accessed_ms + tti_ms`.
//! Writes judge presence against the entry's `now_ms`; an expired entry is absent for them and is
//! dropped as it is met. The active removes the rest with `Expire` entries (see `upkeep`).
//! Access times move forward only through `Touch` entries that the active proposes in batches.
//!
//! Eviction: a cache with `max_entries` evicts the entry with the oldest access time (ties broken
//! by key) when a write takes it over the limit. Access times are the replicated ones, so every
//! server evicts the same entry.
//!
//! Sessions and locks live in [`crate::sessions`] and [`crate::locks`], as further `impl Store`
//! blocks on the same data, because expiring a session touches entries and locks at once.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;
use ferrocotta::protocol::{CacheSettings, ErrorReply, LockMode, ReadOp, Reply, KEYS_PAGE_MAX};

use crate::command::{
    CacheOf, Change, CreateCache, Increment, KeyOf, Lock, OpenSession, Put, PutAll, RemoveIfEqual, Replace,
    ReplaceIfEqual, SessionOf, Unlock,
};
use serde::{Deserialize, Serialize};

/// One cache entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheEntry {
    /// The value, opaque bytes; reference-counted, so cloning the store for a snapshot copies no
    /// value (the encoding is a Vec<u8>'s: postcard writes both as length and bytes).
    pub value: Bytes,
    /// When it was last written (active's clock, ms since the epoch).
    pub written_ms: u64,
    /// When it was last accessed, as replicated (writes and `Touch` entries).
    pub accessed_ms: u64,
    /// Time to live in effect for this entry.
    pub ttl_ms: Option<u64>,
    /// Time to idle in effect for this entry.
    pub tti_ms: Option<u64>,
    /// The session this entry is tied to (ephemeral), if any.
    pub owner: Option<u64>,
}

impl CacheEntry {
    /// When the entry expires given an access time, if it ever does.
    pub fn expires_at_with(&self, accessed_ms: u64) -> Option<u64> {
        let ttl = self.ttl_ms.map(|t| self.written_ms.saturating_add(t));
        let tti = self.tti_ms.map(|t| accessed_ms.saturating_add(t));
        match (ttl, tti) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// When the entry expires by its replicated access time.
    pub fn expires_at(&self) -> Option<u64> {
        self.expires_at_with(self.accessed_ms)
    }

    /// Whether it has expired at `now_ms`.
    pub fn expired(&self, now_ms: u64) -> bool {
        self.expires_at().is_some_and(|at| at <= now_ms)
    }
}

/// One named cache.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Cache {
    /// Settings fixed at creation.
    pub settings: CacheSettings,
    /// Entries in key order (so `keys` pages are stable).
    pub entries: BTreeMap<Vec<u8>, CacheEntry>,
    /// (access time, key) of every entry, kept only when `max_entries` is set. Derived; rebuilt
    /// after a snapshot is loaded.
    #[serde(skip)]
    pub lru: BTreeSet<(u64, Vec<u8>)>,
}

/// A lock on one key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LockState {
    /// Mode of the current holders.
    pub mode: LockMode,
    /// Holding sessions and how many times each holds it (locks are reentrant per session).
    pub holders: BTreeMap<u64, u32>,
    /// Sessions waiting, first come first served.
    pub waiters: VecDeque<(u64, LockMode)>,
}

/// A client session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Session {
    /// Name the client gave (for listings and logs).
    pub client_name: String,
    /// When it was opened.
    pub opened_ms: u64,
    /// Ephemeral entries tied to it: (cache, key).
    pub ephemeral: BTreeSet<(String, Vec<u8>)>,
    /// Locks it holds or waits for: (cache, key).
    pub locks: BTreeSet<(String, Vec<u8>)>,
}

/// A lock grant produced by applying an entry, for the server to wake the waiting request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Cache of the lock.
    pub cache: String,
    /// Key of the lock.
    pub key: Vec<u8>,
    /// Session that now holds it.
    pub session: u64,
}

/// All replicated data of a stripe.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Store {
    /// Caches by name; a cache exists once something was written to it or it was created.
    pub caches: BTreeMap<String, Cache>,
    /// Live client sessions by id (the log index of the entry that opened them).
    pub sessions: BTreeMap<u64, Session>,
    /// Locks held or waited for, by (cache, key).
    pub locks: BTreeMap<(String, Vec<u8>), LockState>,
    /// The client id each session's client gave, by session (sessions of clients that gave one):
    /// what ties a client's sessions on different stripes together for a slot move. The last
    /// field, so a snapshot of a build before it still decodes (`crate::snapshot_file`).
    pub session_clients: BTreeMap<u64, u64>,
    /// (expiry time, cache, key) of every entry that can expire. Derived; rebuilt after a
    /// snapshot is loaded.
    #[serde(skip)]
    pub expiry: BTreeSet<(u64, String, Vec<u8>)>,
    /// Which slots the stripe serves, from its roster (`crate::slot_moves`). Derived; rebuilt
    /// after a snapshot is loaded.
    #[serde(skip)]
    pub slot_guard: crate::slot_moves::SlotGuard,
}

/// How many bytes of keys and values a read's reply may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyRoom {
    /// Never more than this (a reply must fit a frame).
    pub limit: usize,
    /// What the connection's reply budget has given the request so far.
    pub granted: usize,
}

/// Why a read gave no reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadError {
    /// It failed (the client is told).
    Failed(ErrorReply),
    /// Its reply would carry this many bytes, more than granted: take that much budget and ask
    /// again.
    Larger(usize),
}

/// What a put asks of its entry's life: its own ttl and tti (else the cache's), its session.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Lifetime {
    pub ttl_ms: Option<u64>,
    pub tti_ms: Option<u64>,
    pub owner: Option<u64>,
}

impl Lifetime {
    fn of(put: &Put) -> Lifetime {
        Lifetime {
            ttl_ms: put.ttl_ms,
            tti_ms: put.tti_ms,
            owner: put.session,
        }
    }
}

/// What an applied entry needs besides the store: its time and the config's cache settings.
pub struct ApplyContext<'a> {
    /// The entry's timestamp (active's clock).
    pub now_ms: u64,
    /// The log index of the entry (ids of sessions it opens).
    pub index: u64,
    /// Settings of caches named in the config, used when such a cache is created implicitly.
    pub configured: &'a BTreeMap<String, CacheSettings>,
    /// Grants made while applying, collected for the server.
    pub grants: Vec<Grant>,
}

impl Store {
    /// Rebuilds the derived indexes (after loading a snapshot).
    pub fn rebuild_indexes(&mut self) {
        crate::slot_moves::rebuild_guard(self);
        self.expiry.clear();
        for (name, cache) in self.caches.iter_mut() {
            cache.lru.clear();
            for (key, e) in &cache.entries {
                if let Some(at) = e.expires_at() {
                    self.expiry.insert((at, name.clone(), key.clone()));
                }
                if cache.settings.max_entries.is_some() {
                    cache.lru.insert((e.accessed_ms, key.clone()));
                }
            }
        }
    }

    fn cache_mut(&mut self, name: &str, ctx: &ApplyContext) -> &mut Cache {
        self.caches.entry(name.to_string()).or_insert_with(|| Cache {
            settings: ctx.configured.get(name).copied().unwrap_or_default(),
            ..Cache::default()
        })
    }

    /// A live (unexpired at `now_ms`) entry.
    pub(crate) fn live(&self, cache: &str, key: &[u8], now_ms: u64) -> Option<&CacheEntry> {
        self.caches
            .get(cache)
            .and_then(|c| c.entries.get(key))
            .filter(|e| !e.expired(now_ms))
    }

    /// Removes an entry and every index entry pointing at it; returns it.
    pub fn remove_entry(&mut self, cache: &str, key: &[u8]) -> Option<CacheEntry> {
        let c = self.caches.get_mut(cache)?;
        let e = c.entries.remove(key)?;
        if let Some(at) = e.expires_at() {
            self.expiry.remove(&(at, cache.to_string(), key.to_vec()));
        }
        c.lru.remove(&(e.accessed_ms, key.to_vec()));
        if let Some(owner) = e.owner {
            if let Some(s) = self.sessions.get_mut(&owner) {
                s.ephemeral.remove(&(cache.to_string(), key.to_vec()));
            }
        }
        if c.entries.is_empty() && c.settings == CacheSettings::default() {
            self.caches.remove(cache);
        }
        Some(e)
    }

    /// Inserts an entry (replacing any), maintaining indexes, ownership and `max_entries`.
    pub(crate) fn insert_entry(&mut self, cache: &str, key: Vec<u8>, entry: CacheEntry, ctx: &ApplyContext) {
        self.remove_entry(cache, &key);
        if let Some(owner) = entry.owner {
            if let Some(s) = self.sessions.get_mut(&owner) {
                s.ephemeral.insert((cache.to_string(), key.clone()));
            }
        }
        if let Some(at) = entry.expires_at() {
            self.expiry.insert((at, cache.to_string(), key.clone()));
        }
        let c = self.cache_mut(cache, ctx);
        let max = c.settings.max_entries;
        if max.is_some() {
            c.lru.insert((entry.accessed_ms, key.clone()));
        }
        c.entries.insert(key.clone(), entry);
        if let Some(max) = max {
            let over = (c.entries.len() as u64).saturating_sub(max) as usize;
            let victims: Vec<Vec<u8>> = c
                .lru
                .iter()
                .filter(|(_, k)| *k != key)
                .take(over)
                .map(|(_, k)| k.clone())
                .collect();
            for victim in victims {
                self.remove_entry(cache, &victim);
            }
        }
    }

    pub(crate) fn new_entry(&self, cache: &str, value: &[u8], lifetime: Lifetime, ctx: &ApplyContext) -> CacheEntry {
        let settings = self
            .caches
            .get(cache)
            .map(|c| c.settings)
            .or_else(|| ctx.configured.get(cache).copied())
            .unwrap_or_default();
        CacheEntry {
            value: Bytes::copy_from_slice(value),
            written_ms: ctx.now_ms,
            accessed_ms: ctx.now_ms,
            ttl_ms: lifetime.ttl_ms.or(settings.ttl_ms),
            tti_ms: lifetime.tti_ms.or(settings.tti_ms),
            owner: lifetime.owner,
        }
    }

    /// Drops an entry found at `key` if it has expired at `now_ms` (so writes see it as absent);
    /// whether it did.
    fn drop_if_expired(&mut self, cache: &str, key: &[u8], now_ms: u64) -> bool {
        let expired = self
            .caches
            .get(cache)
            .and_then(|c| c.entries.get(key))
            .is_some_and(|e| e.expired(now_ms));
        if expired {
            self.remove_entry(cache, key);
        }
        expired
    }

    fn check_session(&self, session: Option<u64>) -> Result<(), ErrorReply> {
        match session {
            Some(id) if !self.sessions.contains_key(&id) => Err(ErrorReply::SessionExpired),
            _ => Ok(()),
        }
    }

    /// Applies one change a client asked for.
    pub fn apply(&mut self, change: &Change, ctx: &mut ApplyContext) -> Result<Reply, ErrorReply> {
        if let Some(refused) = self.slot_refusal(change) {
            return Err(refused);
        }
        let now = ctx.now_ms;
        if let Some((cache, key)) = change.first_key() {
            self.drop_if_expired(cache, key, now);
        }
        match change {
            Change::Put(put) => {
                self.check_session(put.session)?;
                let prev = self.remove_entry(&put.cache, &put.key).map(|e| Vec::from(e.value));
                let entry = self.new_entry(&put.cache, &put.value, Lifetime::of(put), ctx);
                self.insert_entry(&put.cache, put.key.clone(), entry, ctx);
                Ok(Reply::Value(prev))
            }
            Change::PutAll(PutAll { cache, entries }) => {
                for (k, v) in entries {
                    self.drop_if_expired(cache, k, now);
                    let entry = self.new_entry(cache, v, Lifetime::default(), ctx);
                    self.insert_entry(cache, k.clone(), entry, ctx);
                }
                Ok(Reply::Done)
            }
            Change::PutIfAbsent(put) => {
                if let Some(e) = self.live(&put.cache, &put.key, now) {
                    return Ok(Reply::Value(Some(e.value.to_vec())));
                }
                self.check_session(put.session)?;
                let entry = self.new_entry(&put.cache, &put.value, Lifetime::of(put), ctx);
                self.insert_entry(&put.cache, put.key.clone(), entry, ctx);
                Ok(Reply::Value(None))
            }
            Change::Replace(Replace { cache, key, value }) => self.rewrite(cache, key, None, value, ctx),
            Change::ReplaceIfEqual(ReplaceIfEqual {
                cache,
                key,
                expected,
                value,
            }) => match self.rewrite(cache, key, Some(expected), value, ctx)? {
                Reply::Value(prev) => Ok(Reply::Bool(prev.is_some())),
                other => Ok(other),
            },
            Change::Remove(KeyOf { cache, key }) => {
                Ok(Reply::Value(self.remove_entry(cache, key).map(|e| Vec::from(e.value))))
            }
            Change::RemoveIfEqual(RemoveIfEqual { cache, key, expected }) => {
                let equal = self.live(cache, key, now).is_some_and(|e| e.value == *expected);
                if equal {
                    self.remove_entry(cache, key);
                }
                Ok(Reply::Bool(equal))
            }
            Change::Clear(CacheOf { cache }) => {
                let keys: Vec<Vec<u8>> = self
                    .caches
                    .get(cache)
                    .map(|c| c.entries.keys().cloned().collect())
                    .unwrap_or_default();
                for k in keys {
                    self.remove_entry(cache, &k);
                }
                Ok(Reply::Done)
            }
            Change::Increment(Increment { cache, key, delta }) => {
                let current = match self.live(cache, key, now) {
                    None => 0i64,
                    Some(e) => match std::str::from_utf8(&e.value)
                        .ok()
                        .and_then(|s| s.trim().parse::<i64>().ok())
                    {
                        Some(n) => n,
                        None => return Err(ErrorReply::NotACounter),
                    },
                };
                let Some(next) = current.checked_add(*delta) else {
                    return Err(ErrorReply::Invalid("counter overflow".into()));
                };
                let text = next.to_string();
                match self.rewrite(cache, key, None, text.as_bytes(), ctx)? {
                    Reply::Value(Some(_)) => {}
                    _ => {
                        let entry = self.new_entry(cache, text.as_bytes(), Lifetime::default(), ctx);
                        self.insert_entry(cache, key.clone(), entry, ctx);
                    }
                }
                Ok(Reply::Counter(next))
            }
            Change::CreateCache(CreateCache { cache, settings }) => {
                if self.caches.contains_key(cache) {
                    return Ok(Reply::Bool(false));
                }
                self.caches.insert(
                    cache.clone(),
                    Cache {
                        settings: *settings,
                        ..Cache::default()
                    },
                );
                Ok(Reply::Bool(true))
            }
            Change::OpenSession(OpenSession { client_name, client_id }) => {
                Ok(self.open_session(client_name, *client_id, ctx))
            }
            Change::CloseSession(SessionOf { session }) => {
                self.end_session(*session, ctx);
                Ok(Reply::Done)
            }
            Change::Lock(Lock {
                cache,
                key,
                mode,
                session,
                wait_ms,
            }) => self.lock(cache, key, *mode, *session, *wait_ms, ctx),
            Change::Unlock(Unlock { cache, key, session }) => self.unlock(cache, key, *session, ctx),
            Change::Txn(txn) => self.apply_txn(txn, ctx),
        }
    }

    /// Writes a new value into a live entry, keeping its ttl, tti and owner; with `expected`, only
    /// if the value equals it. Replies the previous value (`None`: nothing written).
    fn rewrite(
        &mut self,
        cache: &str,
        key: &[u8],
        expected: Option<&Vec<u8>>,
        value: &[u8],
        ctx: &ApplyContext,
    ) -> Result<Reply, ErrorReply> {
        let Some(old) = self.live(cache, key, ctx.now_ms).cloned() else {
            return Ok(Reply::Value(None));
        };
        if expected.is_some_and(|e| *e != old.value) {
            return Ok(Reply::Value(None));
        }
        let entry = CacheEntry {
            value: Bytes::copy_from_slice(value),
            written_ms: ctx.now_ms,
            accessed_ms: ctx.now_ms,
            ..old.clone()
        };
        self.insert_entry(cache, key.to_vec(), entry, ctx);
        Ok(Reply::Value(Some(Vec::from(old.value))))
    }

    /// Moves access times forward (a `Touch` entry): each access counts only if the entry was
    /// still live when it was accessed.
    pub fn touch(&mut self, accesses: &[(String, Vec<u8>, u64)], ctx: &ApplyContext) {
        for (cache, key, at) in accesses {
            let Some(e) = self.caches.get(cache).and_then(|c| c.entries.get(key)) else {
                continue;
            };
            if e.expired(*at) || e.accessed_ms >= *at {
                continue;
            }
            let mut e = e.clone();
            e.accessed_ms = *at;
            self.insert_entry(cache, key.clone(), e, ctx);
        }
    }

    /// Removes the named entries that have expired at `now_ms` by the replicated state (an
    /// `Expire` entry); entries touched meanwhile stay.
    pub fn expire(&mut self, keys: &[(String, Vec<u8>)], now_ms: u64) -> usize {
        let mut removed = 0;
        for (cache, key) in keys {
            removed += self.drop_if_expired(cache, key, now_ms) as usize;
        }
        removed
    }

    /// Entries whose replicated expiry is at or before `now_ms`, oldest first, at most `max`.
    pub fn expired_candidates(&self, now_ms: u64, max: usize) -> Vec<(String, Vec<u8>)> {
        self.expiry
            .iter()
            .take_while(|(at, _, _)| *at <= now_ms)
            .take(max)
            .map(|(_, c, k)| (c.clone(), k.clone()))
            .collect()
    }

    /// Serves a read at `now_ms`. `pending_access` gives accesses the active has seen but not yet
    /// replicated, so an entry kept alive by recent reads is not reported expired.
    ///
    /// Replies are bounded before anything is copied. A reply carries at most `room.limit` bytes
    /// of keys and values: a `keys` page ends early (`more` says so), a `get_all` or `list_locks`
    /// that would carry more is refused (one request naming a 4 MiB key 100 times must not cost the
    /// server 400 MiB). A reply larger than `room.granted` (what the connection's reply budget has
    /// given so far) is not built: [`ReadError::Larger`] says how large it would be, the caller
    /// takes that much budget and asks again. So small replies cost one pass, and a client that
    /// asks for large values without reading its replies makes the server wait, not allocate.
    pub fn read(
        &self,
        op: &ReadOp,
        now_ms: u64,
        room: ReplyRoom,
        pending_access: &dyn Fn(&str, &[u8]) -> Option<u64>,
    ) -> Result<Reply, ReadError> {
        if let Some(refused) = self.read_refusal(op) {
            return Err(ReadError::Failed(refused));
        }
        let budget = room.limit;
        let too_large = |bytes: usize, what: &str| {
            Err(ReadError::Failed(ErrorReply::Invalid(format!(
                "the reply would carry {bytes} bytes, more than the limit of {budget}; {what}"
            ))))
        };
        let needs = |bytes: usize| -> Result<(), ReadError> {
            if bytes > room.granted {
                Err(ReadError::Larger(bytes))
            } else {
                Ok(())
            }
        };
        let visible = |cache: &str, key: &[u8]| -> Option<&CacheEntry> {
            let e = self.caches.get(cache)?.entries.get(key)?;
            let accessed = pending_access(cache, key).map_or(e.accessed_ms, |p| p.max(e.accessed_ms));
            match e.expires_at_with(accessed) {
                Some(at) if at <= now_ms => None,
                _ => Some(e),
            }
        };
        match op {
            ReadOp::Get { cache, key } => {
                let found = visible(cache, key);
                needs(found.map_or(0, |e| e.value.len()))?;
                Ok(Reply::Value(found.map(|e| e.value.to_vec())))
            }
            ReadOp::GetAll { cache, keys } => {
                let bytes: usize = keys
                    .iter()
                    .map(|k| visible(cache, k).map_or(0, |e| e.value.len()))
                    .sum();
                if bytes > budget {
                    return too_large(bytes, "ask for fewer keys at a time");
                }
                needs(bytes)?;
                Ok(Reply::Values(
                    keys.iter()
                        .map(|k| visible(cache, k).map(|e| e.value.to_vec()))
                        .collect(),
                ))
            }
            ReadOp::Entries { cache, keys } => {
                let bytes: usize = keys
                    .iter()
                    .map(|k| visible(cache, k).map_or(0, |e| e.value.len()))
                    .sum();
                if bytes > budget {
                    return too_large(bytes, "ask for fewer keys at a time");
                }
                needs(bytes)?;
                Ok(Reply::Entries(
                    keys.iter()
                        .map(|k| {
                            visible(cache, k).map(|e| {
                                let accessed = pending_access(cache, k).map_or(e.accessed_ms, |p| p.max(e.accessed_ms));
                                ferrocotta::protocol::EntryInfo {
                                    value: e.value.to_vec(),
                                    expires_at_ms: e.expires_at_with(accessed),
                                }
                            })
                        })
                        .collect(),
                ))
            }
            ReadOp::Contains { cache, key } => Ok(Reply::Bool(visible(cache, key).is_some())),
            ReadOp::Keys {
                cache,
                prefix,
                after,
                limit,
            } => {
                let Some(c) = self.caches.get(cache) else {
                    return Ok(Reply::Keys {
                        keys: Vec::new(),
                        more: false,
                    });
                };
                let limit = (*limit).clamp(1, KEYS_PAGE_MAX) as usize;
                let start = match after {
                    Some(a) if a.as_slice() >= prefix.as_slice() => std::ops::Bound::Excluded(a.clone()),
                    _ => std::ops::Bound::Included(prefix.clone()),
                };
                // The page's keys: at most `limit` of them and `budget` bytes (at least one key).
                let page = c
                    .entries
                    .range((start, std::ops::Bound::Unbounded))
                    .map(|(k, _)| k)
                    .take_while(|k| k.starts_with(prefix))
                    .filter(|k| self.slot_guard.lists(k) && visible(cache, k).is_some());
                let (mut count, mut bytes, mut more) = (0usize, 0usize, false);
                for k in page.clone() {
                    if count == limit || (count > 0 && bytes + k.len() > budget) {
                        more = true;
                        break;
                    }
                    count += 1;
                    bytes += k.len();
                }
                needs(bytes)?;
                Ok(Reply::Keys {
                    keys: page.take(count).cloned().collect(),
                    more,
                })
            }
            ReadOp::Size { cache } => {
                let Some(c) = self.caches.get(cache) else {
                    return Ok(Reply::Size(0));
                };
                // Count the expired ones through the expiry index: O(expired), not O(entries).
                let hidden = self
                    .expiry
                    .iter()
                    .take_while(|(at, _, _)| *at <= now_ms)
                    .filter(|(_, cn, k)| cn == cache && visible(cache, k).is_none())
                    .count();
                let unserved = self.unserved_entries(cache);
                Ok(Reply::Size(c.entries.len().saturating_sub(hidden + unserved) as u64))
            }
            ReadOp::Time => Ok(Reply::Time(now_ms)),
            ReadOp::ListLocks { cache } => {
                let locks = self.list_locks(cache.as_deref());
                let bytes: usize = locks
                    .iter()
                    .map(|l| l.cache.len() + l.key.len() + 16 * (l.holders.len() + l.waiters.len()))
                    .sum();
                if bytes > budget {
                    return too_large(bytes, "list the locks of one cache at a time");
                }
                needs(bytes)?;
                Ok(Reply::Locks(locks))
            }
        }
    }

    /// Entry counts by cache, for status (as stored, expired-but-unswept included).
    pub fn entry_counts(&self) -> BTreeMap<String, u64> {
        self.caches
            .iter()
            .filter(|(n, _)| !crate::roster::is_internal_cache(n))
            .map(|(n, c)| (n.clone(), c.entries.len() as u64))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values became `Bytes`; snapshots written when they were `Vec<u8>` must still load.
    #[test]
    fn a_bytes_value_encodes_as_a_vec_did() {
        let value: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        assert_eq!(
            postcard::to_allocvec(&Bytes::from(value.clone())).unwrap(),
            postcard::to_allocvec(&value).unwrap()
        );
        let decoded: Bytes = postcard::from_bytes(&postcard::to_allocvec(&value).unwrap()).unwrap();
        assert_eq!(decoded, value);
    }

    fn ctx(now_ms: u64, configured: &BTreeMap<String, CacheSettings>) -> ApplyContext<'_> {
        ApplyContext {
            now_ms,
            index: now_ms,
            configured,
            grants: Vec::new(),
        }
    }

    fn put(c: &str, k: &str, v: &str, ttl: Option<u64>, tti: Option<u64>) -> Change {
        Change::Put(Put {
            cache: c.into(),
            key: k.into(),
            value: v.into(),
            ttl_ms: ttl,
            tti_ms: tti,
            session: None,
        })
    }

    fn get(s: &Store, k: &str, now: u64) -> Option<Vec<u8>> {
        let op = ReadOp::Get {
            cache: "c".into(),
            key: k.into(),
        };
        let room = ReplyRoom {
            limit: usize::MAX,
            granted: usize::MAX,
        };
        match s.read(&op, now, room, &|_, _| None).unwrap() {
            Reply::Value(v) => v,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn operations_behave_like_a_map() {
        let cfg = BTreeMap::new();
        let mut s = Store::default();
        let mut c = ctx(1000, &cfg);
        assert_eq!(s.apply(&put("c", "a", "1", None, None), &mut c), Ok(Reply::Value(None)));
        assert_eq!(
            s.apply(&put("c", "a", "2", None, None), &mut c),
            Ok(Reply::Value(Some(b"1".to_vec())))
        );
        let cas = |e: &str, v: &str| {
            Change::ReplaceIfEqual(ReplaceIfEqual {
                cache: "c".into(),
                key: b"a".to_vec(),
                expected: e.into(),
                value: v.into(),
            })
        };
        assert_eq!(s.apply(&cas("1", "three"), &mut c), Ok(Reply::Bool(false)));
        assert_eq!(s.apply(&cas("2", "three"), &mut c), Ok(Reply::Bool(true)));
        let inc = |k: &str| {
            Change::Increment(Increment {
                cache: "c".into(),
                key: k.into(),
                delta: 5,
            })
        };
        assert_eq!(s.apply(&inc("n"), &mut c), Ok(Reply::Counter(5)));
        assert_eq!(s.apply(&inc("n"), &mut c), Ok(Reply::Counter(10)));
        assert_eq!(s.apply(&inc("a"), &mut c), Err(ErrorReply::NotACounter));
    }

    #[test]
    fn ttl_and_tti_expire_by_the_entry_time_and_touches_extend_tti() {
        let cfg = BTreeMap::new();
        let mut s = Store::default();
        s.apply(&put("c", "t", "v", Some(100), None), &mut ctx(1000, &cfg))
            .unwrap();
        s.apply(&put("c", "i", "v", None, Some(100)), &mut ctx(1000, &cfg))
            .unwrap();
        assert!(get(&s, "t", 1099).is_some());
        assert!(get(&s, "t", 1100).is_none(), "ttl reached");
        s.touch(&[("c".into(), b"i".to_vec(), 1090)], &ctx(1095, &cfg));
        assert!(get(&s, "i", 1150).is_some(), "the touch moved tti forward");
        assert!(get(&s, "i", 1190).is_none());
        assert_eq!(s.expired_candidates(1200, 10).len(), 2);
        assert_eq!(s.expire(&s.expired_candidates(1200, 10), 1200), 2);
        assert!(s.caches.is_empty());
        assert!(s.expiry.is_empty());
    }

    #[test]
    fn max_entries_evicts_the_least_recently_used() {
        let mut cfg = BTreeMap::new();
        cfg.insert(
            "c".to_string(),
            CacheSettings {
                max_entries: Some(2),
                ..Default::default()
            },
        );
        let mut s = Store::default();
        s.apply(&put("c", "a", "1", None, None), &mut ctx(1, &cfg)).unwrap();
        s.apply(&put("c", "b", "1", None, None), &mut ctx(2, &cfg)).unwrap();
        s.touch(&[("c".into(), b"a".to_vec(), 3)], &ctx(3, &cfg));
        s.apply(&put("c", "x", "1", None, None), &mut ctx(4, &cfg)).unwrap();
        assert!(get(&s, "a", 5).is_some(), "recently used stays");
        assert!(get(&s, "b", 5).is_none(), "least recently used is evicted");
        assert!(get(&s, "x", 5).is_some());
    }

    #[test]
    fn indexes_survive_a_snapshot_round_trip() {
        let cfg = BTreeMap::new();
        let mut s = Store::default();
        s.apply(&put("c", "t", "v", Some(100), None), &mut ctx(1000, &cfg))
            .unwrap();
        let mut copy: Store = postcard::from_bytes(&postcard::to_allocvec(&s).unwrap()).unwrap();
        copy.rebuild_indexes();
        assert_eq!(copy, s);
        assert_eq!(copy.expiry, s.expiry);
    }
}
