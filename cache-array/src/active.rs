//! What the active knows only in memory: client keep-alives and the reads whose access times
//! matter (tti, LRU). The request path records them, `upkeep` turns them into log entries; neither
//! decides anything by them alone (see ARCHITECTURE.md). A leaf: it depends on nothing of the
//! server's.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Accesses one batch carries at most; the active records no more until the batch is flushed.
pub const TOUCH_BATCH_MAX: usize = 50_000;

/// In-memory bookkeeping of the active.
#[derive(Debug, Default)]
pub struct ActiveState {
    /// Pending access times by (cache, key), milliseconds since the epoch.
    touches: Mutex<HashMap<(String, Vec<u8>), u64>>,
    /// Last sign of life of each session.
    seen: Mutex<HashMap<u64, Instant>>,
}

impl ActiveState {
    /// Records a read of an entry whose access time matters.
    pub fn record_access(&self, cache: &str, key: &[u8], at_ms: u64) {
        let mut t = self.touches.lock().expect("touches poisoned");
        if t.len() < TOUCH_BATCH_MAX || t.contains_key(&(cache.to_string(), key.to_vec())) {
            t.insert((cache.to_string(), key.to_vec()), at_ms);
        }
    }

    /// The pending access time of an entry, if any.
    pub fn pending_access(&self, cache: &str, key: &[u8]) -> Option<u64> {
        let t = self.touches.lock().expect("touches poisoned");
        if t.is_empty() {
            return None;
        }
        t.get(&(cache.to_string(), key.to_vec())).copied()
    }

    /// Records a sign of life of a session.
    pub fn saw_session(&self, id: u64) {
        self.seen.lock().expect("seen poisoned").insert(id, Instant::now());
    }

    /// Forgets everything (this server is no longer the active).
    pub fn clear(&self) {
        self.touches.lock().expect("touches poisoned").clear();
        self.seen.lock().expect("seen poisoned").clear();
    }

    /// A new active: every live session's window starts now (this server had no record of who
    /// was alive).
    pub fn renew_windows(&self, live: &[u64]) {
        let mut seen = self.seen.lock().expect("seen poisoned");
        seen.clear();
        let now = Instant::now();
        seen.extend(live.iter().map(|id| (*id, now)));
    }

    /// The live sessions silent longer than `window` (forgetting sessions that are no longer live).
    pub fn silent_sessions(&self, live: &[u64], window: Duration) -> Vec<u64> {
        let mut seen = self.seen.lock().expect("seen poisoned");
        seen.retain(|id, _| live.binary_search(id).is_ok());
        let now = Instant::now();
        live.iter()
            .copied()
            .filter(|id| now.duration_since(*seen.entry(*id).or_insert(now)) > window)
            .collect()
    }

    /// Forgets sessions that ended.
    pub fn forget_sessions(&self, ids: &[u64]) {
        let mut seen = self.seen.lock().expect("seen poisoned");
        for id in ids {
            seen.remove(id);
        }
    }

    /// Takes the access times recorded since the last batch.
    pub fn take_accesses(&self) -> Vec<(String, Vec<u8>, u64)> {
        let mut t = self.touches.lock().expect("touches poisoned");
        t.drain().map(|((c, k), at)| (c, k, at)).collect()
    }
}
