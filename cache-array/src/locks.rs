//! Locks on keys, held by client sessions, in the replicated store.
//!
//! Exclusive or shared; reentrant per session (a session may take a lock it holds again and must
//! release it as many times). Waiters are served strictly in arrival order: a request is granted at
//! once only when nobody waits before it and the current holders allow it. Waiting happens in the
//! server that received the request (it is woken by the [`Grant`]s an applied entry yields); the
//! queue itself is replicated, so a failover keeps everyone's place.

use std::collections::{BTreeMap, VecDeque};

use ferrocotta::protocol::{ErrorReply, LockInfo, LockMode, Reply};

use crate::store::{ApplyContext, Grant, LockState, Store};

impl Store {
    /// A `Lock` entry: grant, queue (wait != 0) or refuse (wait == 0).
    pub fn lock(
        &mut self,
        cache: &str,
        key: &[u8],
        mode: LockMode,
        session: u64,
        wait_ms: i64,
        ctx: &mut ApplyContext,
    ) -> Result<Reply, ErrorReply> {
        let Some(s) = self.sessions.get_mut(&session) else {
            return Err(ErrorReply::SessionExpired);
        };
        let id = (cache.to_string(), key.to_vec());
        let lock = self.locks.entry(id.clone()).or_insert_with(|| LockState {
            mode,
            holders: BTreeMap::new(),
            waiters: VecDeque::new(),
        });
        let sole_holder = lock.holders.len() == 1;
        if let Some(count) = lock.holders.get_mut(&session) {
            let upgrade = mode == LockMode::Exclusive && lock.mode == LockMode::Shared;
            if !upgrade || sole_holder {
                *count += 1;
                lock.mode = if upgrade { LockMode::Exclusive } else { lock.mode };
                return Ok(Reply::Done);
            }
        }
        if lock.waiters.iter().any(|(w, _)| *w == session) {
            // A retry of a request already queued keeps its place.
            return Ok(Reply::Bool(false));
        }
        let free = lock.holders.is_empty()
            || (lock.mode == LockMode::Shared && mode == LockMode::Shared && lock.waiters.is_empty());
        if free && lock.waiters.is_empty() {
            if lock.holders.is_empty() {
                lock.mode = mode;
            }
            lock.holders.insert(session, 1);
            s.locks.insert(id);
            return Ok(Reply::Done);
        }
        if wait_ms == 0 {
            if lock.holders.is_empty() && lock.waiters.is_empty() {
                self.locks.remove(&id);
            }
            return Err(ErrorReply::LockTimeout);
        }
        lock.waiters.push_back((session, mode));
        s.locks.insert(id);
        let _ = ctx;
        // Queued: the server waits for the grant.
        Ok(Reply::Bool(false))
    }

    /// An `Unlock` entry: one hold fewer; the last release lets the queue move.
    pub fn unlock(
        &mut self,
        cache: &str,
        key: &[u8],
        session: u64,
        ctx: &mut ApplyContext,
    ) -> Result<Reply, ErrorReply> {
        let id = (cache.to_string(), key.to_vec());
        let Some(lock) = self.locks.get_mut(&id) else {
            return Err(ErrorReply::NotLockHolder);
        };
        let Some(count) = lock.holders.get_mut(&session) else {
            return Err(ErrorReply::NotLockHolder);
        };
        *count -= 1;
        if *count == 0 {
            lock.holders.remove(&session);
            if let Some(s) = self.sessions.get_mut(&session) {
                s.locks.remove(&id);
            }
            self.promote(&id, ctx);
        }
        Ok(Reply::Done)
    }

    /// Drops a session from a lock entirely: every hold and its queue place (session end, or a
    /// waiter that gave up).
    pub fn release_all(&mut self, cache: &str, key: &[u8], session: u64, ctx: &mut ApplyContext) {
        let id = (cache.to_string(), key.to_vec());
        if let Some(lock) = self.locks.get_mut(&id) {
            lock.holders.remove(&session);
            lock.waiters.retain(|(w, _)| *w != session);
        }
        if let Some(s) = self.sessions.get_mut(&session) {
            s.locks.remove(&id);
        }
        self.promote(&id, ctx);
    }

    /// A waiter gives up (`LockWaitCancel` entry). Replies `Done` if it was granted meanwhile (it
    /// keeps the lock), `LockTimeout` if its place was dropped.
    pub fn cancel_wait(
        &mut self,
        cache: &str,
        key: &[u8],
        session: u64,
        ctx: &mut ApplyContext,
    ) -> Result<Reply, ErrorReply> {
        let id = (cache.to_string(), key.to_vec());
        let held = self.locks.get(&id).is_some_and(|l| l.holders.contains_key(&session));
        if held {
            return Ok(Reply::Done);
        }
        let waiting = self
            .locks
            .get(&id)
            .is_some_and(|l| l.waiters.iter().any(|(w, _)| *w == session));
        if waiting {
            self.release_all(cache, key, session, ctx);
        }
        Err(ErrorReply::LockTimeout)
    }

    /// Grants waiters in order while the holders allow; forgets locks nobody holds or wants.
    fn promote(&mut self, id: &(String, Vec<u8>), ctx: &mut ApplyContext) {
        let Some(lock) = self.locks.get_mut(id) else { return };
        while let Some(&(session, mode)) = lock.waiters.front() {
            let grantable = lock.holders.is_empty() || (lock.mode == LockMode::Shared && mode == LockMode::Shared);
            if !grantable {
                break;
            }
            lock.waiters.pop_front();
            if lock.holders.is_empty() {
                lock.mode = mode;
            }
            lock.holders.insert(session, 1);
            ctx.grants.push(Grant {
                cache: id.0.clone(),
                key: id.1.clone(),
                session,
            });
        }
        if lock.holders.is_empty() && lock.waiters.is_empty() {
            self.locks.remove(id);
        }
    }

    /// Whether a session holds a lock.
    pub fn holds(&self, cache: &str, key: &[u8], session: u64) -> bool {
        self.locks
            .get(&(cache.to_string(), key.to_vec()))
            .is_some_and(|l| l.holders.contains_key(&session))
    }

    /// Every lock (of one cache, if given).
    pub fn list_locks(&self, cache: Option<&str>) -> Vec<LockInfo> {
        self.locks
            .iter()
            .filter(|((c, _), _)| cache.is_none_or(|want| want == c))
            .map(|((c, k), l)| LockInfo {
                cache: c.clone(),
                key: k.clone(),
                mode: l.mode,
                holders: l
                    .holders
                    .iter()
                    .map(|(s, n)| {
                        let name = self.sessions.get(s).map(|x| x.client_name.clone()).unwrap_or_default();
                        (*s, name, *n)
                    })
                    .collect(),
                waiters: l.waiters.iter().copied().collect(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrocotta::protocol::CacheSettings;

    fn ctx(index: u64, configured: &BTreeMap<String, CacheSettings>) -> ApplyContext<'_> {
        ApplyContext {
            now_ms: index,
            index,
            configured,
            grants: Vec::new(),
        }
    }

    #[test]
    fn waiters_are_served_in_order_and_session_end_releases() {
        let cfg = BTreeMap::new();
        let mut s = Store::default();
        let (a, b, c) = (1, 2, 3);
        for id in [a, b, c] {
            s.open_session("t", None, &ctx(id, &cfg));
        }
        let x = LockMode::Exclusive;
        assert_eq!(s.lock("l", b"k", x, a, 0, &mut ctx(10, &cfg)), Ok(Reply::Done));
        assert_eq!(
            s.lock("l", b"k", x, b, 0, &mut ctx(11, &cfg)),
            Err(ErrorReply::LockTimeout)
        );
        assert_eq!(
            s.lock("l", b"k", x, b, 1000, &mut ctx(12, &cfg)),
            Ok(Reply::Bool(false))
        );
        assert_eq!(s.lock("l", b"k", x, c, -1, &mut ctx(13, &cfg)), Ok(Reply::Bool(false)));
        let mut cx = ctx(14, &cfg);
        s.unlock("l", b"k", a, &mut cx).unwrap();
        assert_eq!(cx.grants.len(), 1);
        assert_eq!(cx.grants[0].session, b, "first waiter first");
        let mut cx = ctx(15, &cfg);
        assert!(s.end_session(b, &mut cx));
        assert_eq!(cx.grants[0].session, c, "the ended session's lock passes on");
        assert!(s.holds("l", b"k", c));
        assert_eq!(
            s.unlock("l", b"k", a, &mut ctx(16, &cfg)),
            Err(ErrorReply::NotLockHolder)
        );
    }

    #[test]
    fn shared_holders_coexist_and_block_exclusive() {
        let cfg = BTreeMap::new();
        let mut s = Store::default();
        for id in [1, 2, 3] {
            s.open_session("t", None, &ctx(id, &cfg));
        }
        let sh = LockMode::Shared;
        assert_eq!(s.lock("l", b"k", sh, 1, 0, &mut ctx(10, &cfg)), Ok(Reply::Done));
        assert_eq!(s.lock("l", b"k", sh, 2, 0, &mut ctx(11, &cfg)), Ok(Reply::Done));
        assert_eq!(
            s.lock("l", b"k", LockMode::Exclusive, 3, 0, &mut ctx(12, &cfg)),
            Err(ErrorReply::LockTimeout)
        );
        assert_eq!(s.list_locks(None)[0].holders.len(), 2);
    }
}
