//! The Raft log, vote and committed index, durable in sled.
//!
//! Layout: tree `log` maps the big-endian index to `crc32 || postcard(entry)`; tree `meta` holds the
//! vote, the committed log id and the last purged log id. Every read of an entry verifies its
//! checksum, so a corrupt log is reported, never served.
//!
//! Group commit: appends write into sled without syncing and hand their completion callback to
//! one flusher thread. The flusher takes every callback that is waiting, runs one `flush` (fsync),
//! then completes them all; so under load one fsync covers many appends. The vote goes through the
//! same flusher and is durable before `save_vote` returns. openraft is told an append is complete
//! only after the fsync that covers it.
//!
//! Purging: `purge` makes the new purge point durable and returns; one background thread deletes
//! the entries below it in small batches. Deleting tens of thousands of sled keys in one batch took
//! seconds and held openraft's core that long: under load the mirrors started an election after
//! every snapshot. Entries at or below the purge point are never served again: readers skip them
//! (a lower bound shared by all clones), and opening the log deletes any that a crash left behind.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, StorageIOError};
use tokio::sync::oneshot;

use crate::types::{Entry, LogId, StorageError, TypeConfig, Vote};

const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_LAST_PURGED: &[u8] = b"last_purged";

/// Encoded log bytes one AppendEntries call carries at most (a single larger entry goes alone).
pub const REPLICATION_BATCH_BYTES_MAX: usize = 1024 * 1024;

/// Flush requests that may wait for the flusher before appenders block.
pub const FLUSH_QUEUE_MAX: usize = 65_536;

/// A flush slower than this is logged: every append of the server waited for it.
const SLOW_FLUSH: std::time::Duration = std::time::Duration::from_millis(500);

/// Log entries the purger deletes per sled batch.
const PURGE_CHUNK: usize = 1024;

/// Who waits for a flush.
enum FlushWaiter {
    /// openraft's callback for an append.
    Append(LogFlushed<TypeConfig>),
    /// An async caller (vote).
    Notify(oneshot::Sender<Result<(), String>>),
}

/// Statistics of group commit, for metrics.
#[derive(Debug, Default)]
pub struct FlushStats {
    /// fsyncs run.
    pub flushes: std::sync::atomic::AtomicU64,
    /// Waiters completed by those fsyncs (appends and votes).
    pub waiters: std::sync::atomic::AtomicU64,
}

/// The sled log store. Clones share the same database.
#[derive(Clone)]
pub struct LogStore {
    db: sled::Db,
    log: sled::Tree,
    meta: sled::Tree,
    flusher: std_mpsc::SyncSender<FlushWaiter>,
    /// Purge points for the purger thread (each one deletes the entries at or below it).
    purger: std_mpsc::Sender<u64>,
    /// The first index that may be served: one past the durable purge point (0: nothing purged).
    first_readable: Arc<AtomicU64>,
    /// Encoded bytes of the entries appended since the store was opened (compaction reads it).
    appended: Arc<AtomicU64>,
    stats: Arc<FlushStats>,
}

fn io_err(subject: ErrorSubject<u64>, verb: ErrorVerb, e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::new(subject, verb, openraft::AnyError::new(&e)).into()
}

fn corrupt(what: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what)
}

impl LogStore {
    /// Opens (or creates) the log under `dir` and starts its flusher and purger threads.
    pub fn open(dir: &Path) -> anyhow::Result<LogStore> {
        let db = sled::Config::new().path(dir).mode(sled::Mode::HighThroughput).open()?;
        let log = db.open_tree("log")?;
        let meta = db.open_tree("meta")?;
        let (tx, rx) = std_mpsc::sync_channel::<FlushWaiter>(FLUSH_QUEUE_MAX);
        let stats = Arc::new(FlushStats::default());
        let flush_db = db.clone();
        let flush_stats = stats.clone();
        std::thread::Builder::new()
            .name("log-flusher".into())
            .spawn(move || flusher(flush_db, rx, flush_stats))
            .expect("spawn the log flusher thread");
        let (purge_tx, purge_rx) = std_mpsc::channel::<u64>();
        let purge_log = log.clone();
        std::thread::Builder::new()
            .name("log-purger".into())
            .spawn(move || purger(purge_log, purge_rx))
            .expect("spawn the log purger thread");
        let store = LogStore {
            db,
            log,
            meta,
            flusher: tx,
            purger: purge_tx,
            first_readable: Arc::new(AtomicU64::new(0)),
            appended: Arc::new(AtomicU64::new(0)),
            stats,
        };
        let last_purged: Option<LogId> = store
            .get_meta(KEY_LAST_PURGED)
            .map_err(|e| anyhow::anyhow!("cannot read the purge point: {e}"))?;
        if let Some(purged) = last_purged {
            // Entries a crash left below the purge point: hidden now, deleted in the background.
            store.first_readable.store(purged.index + 1, Ordering::Release);
            let _ = store.purger.send(purged.index);
        }
        Ok(store)
    }

    /// Encoded bytes of the entries appended since the store was opened.
    pub fn appended_bytes(&self) -> u64 {
        self.appended.load(Ordering::Relaxed)
    }

    /// The first log index that may be served.
    fn first_readable(&self) -> u64 {
        self.first_readable.load(Ordering::Acquire)
    }

    /// Group-commit statistics.
    pub fn flush_stats(&self) -> Arc<FlushStats> {
        self.stats.clone()
    }

    fn encode_entry(entry: &Entry) -> Vec<u8> {
        let body = postcard::to_allocvec(entry).expect("log entries always encode");
        let mut out = Vec::with_capacity(body.len() + 4);
        out.extend_from_slice(&crc32fast::hash(&body).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    fn decode_entry(index: u64, bytes: &[u8]) -> Result<Entry, StorageError> {
        let fail = |what: String| {
            io_err(
                ErrorSubject::LogIndex(index),
                ErrorVerb::Read,
                corrupt(format!("log entry {index}: {what}")),
            )
        };
        if bytes.len() < 4 {
            return Err(fail("truncated".into()));
        }
        let crc = u32::from_be_bytes(bytes[..4].try_into().expect("4 bytes"));
        if crc32fast::hash(&bytes[4..]) != crc {
            return Err(fail("checksum mismatch: the log is corrupt".into()));
        }
        postcard::from_bytes(&bytes[4..]).map_err(|e| fail(format!("undecodable: {e}")))
    }

    /// Decodes one item of the log tree: the stored length and the verified entry.
    fn decode_item(item: sled::Result<(sled::IVec, sled::IVec)>) -> Result<(usize, Entry), StorageError> {
        let (k, v) = item.map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Read, e))?;
        let index = u64::from_be_bytes(
            k.as_ref()
                .try_into()
                .map_err(|_| io_err(ErrorSubject::Logs, ErrorVerb::Read, corrupt("bad log key".into())))?,
        );
        Ok((v.len(), Self::decode_entry(index, &v)?))
    }

    fn get_meta<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, StorageError> {
        let Some(bytes) = self
            .meta
            .get(key)
            .map_err(|e| io_err(ErrorSubject::Store, ErrorVerb::Read, e))?
        else {
            return Ok(None);
        };
        postcard::from_bytes(&bytes).map(Some).map_err(|e| {
            io_err(
                ErrorSubject::Store,
                ErrorVerb::Read,
                corrupt(format!("meta {key:?}: {e}")),
            )
        })
    }

    fn put_meta<T: serde::Serialize>(&self, key: &[u8], value: &T) -> Result<(), StorageError> {
        let bytes = postcard::to_allocvec(value).expect("meta always encodes");
        self.meta
            .insert(key, bytes)
            .map_err(|e| io_err(ErrorSubject::Store, ErrorVerb::Write, e))?;
        Ok(())
    }

    async fn flush(&self) -> Result<(), StorageError> {
        let (tx, rx) = oneshot::channel();
        self.flusher.send(FlushWaiter::Notify(tx)).map_err(|_| {
            io_err(
                ErrorSubject::Store,
                ErrorVerb::Write,
                corrupt("the flusher stopped".into()),
            )
        })?;
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(io_err(ErrorSubject::Store, ErrorVerb::Write, corrupt(e))),
            Err(_) => Err(io_err(
                ErrorSubject::Store,
                ErrorVerb::Write,
                corrupt("the flusher stopped".into()),
            )),
        }
    }

    fn last_entry_log_id(&self) -> Result<Option<LogId>, StorageError> {
        let last = self
            .log
            .last()
            .transpose()
            .map(|item| Self::decode_item(item).map(|(_, e)| e.log_id))
            .transpose()?;
        // An entry below the purge point is one the purger has not deleted yet: not part of the log.
        Ok(last.filter(|id| id.index >= self.first_readable()))
    }
}

/// The purger thread: deletes the entries at or below each purge point it is sent, a chunk per
/// sled batch, so no single call holds sled (or waits on it) for long. Not flushed: after a crash
/// the durable purge point hides what is left and `LogStore::open` sends it here again.
fn purger(log: sled::Tree, rx: std_mpsc::Receiver<u64>) {
    while let Ok(mut upto) = rx.recv() {
        while let Ok(later) = rx.try_recv() {
            upto = upto.max(later);
        }
        let started = std::time::Instant::now();
        let mut deleted = 0usize;
        loop {
            let mut batch = sled::Batch::default();
            let mut keys = 0usize;
            for item in log.range(..=upto.to_be_bytes()).take(PURGE_CHUNK) {
                match item {
                    Ok((k, _)) => {
                        batch.remove(k);
                        keys += 1;
                    }
                    Err(e) => {
                        tracing::error!(event = "log_store.purge_failed", upto, error = %e);
                        break;
                    }
                }
            }
            if keys == 0 {
                break;
            }
            if let Err(e) = log.apply_batch(batch) {
                tracing::error!(event = "log_store.purge_failed", upto, error = %e);
                break;
            }
            deleted += keys;
        }
        tracing::info!(
            event = "log_store.purged",
            upto,
            deleted,
            ms = started.elapsed().as_millis() as u64
        );
    }
}

/// The flusher thread: one fsync per batch of waiters.
fn flusher(db: sled::Db, rx: std_mpsc::Receiver<FlushWaiter>, stats: Arc<FlushStats>) {
    use std::sync::atomic::Ordering::Relaxed;
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
        }
        let started = std::time::Instant::now();
        let result = db.flush().map(|_| ()).map_err(|e| e.to_string());
        let took = started.elapsed();
        if took > SLOW_FLUSH {
            tracing::warn!(
                event = "log_store.slow_flush",
                ms = took.as_millis() as u64,
                waiters = batch.len()
            );
        }
        if let Err(e) = &result {
            tracing::error!(event = "log_store.flush_failed", error = %e);
        }
        stats.flushes.fetch_add(1, Relaxed);
        stats.waiters.fetch_add(batch.len() as u64, Relaxed);
        for w in batch {
            match w {
                FlushWaiter::Append(cb) => cb.log_io_completed(result.clone().map_err(std::io::Error::other)),
                FlushWaiter::Notify(tx) => {
                    let _ = tx.send(result.clone());
                }
            }
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    /// Entries for one AppendEntries call: at most [`REPLICATION_BATCH_BYTES_MAX`] of them (at least
    /// one). openraft gives each call one heartbeat interval; a budget in bytes rather than in
    /// entries keeps calls of large entries (put_all batches, big values) within it, so a lagging
    /// mirror catches up in steps instead of timing out on the same oversized call forever.
    async fn limited_get_log_entries(&mut self, start: u64, end: u64) -> Result<Vec<Entry>, StorageError> {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let start = start.max(self.first_readable());
        if start >= end {
            return Ok(out);
        }
        for item in self.log.range(start.to_be_bytes()..end.to_be_bytes()) {
            let (len, entry) = Self::decode_item(item)?;
            if !out.is_empty() && bytes + len > REPLICATION_BATCH_BYTES_MAX {
                break;
            }
            bytes += len;
            out.push(entry);
        }
        Ok(out)
    }

    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(&i) => i,
            Bound::Excluded(&i) => i + 1,
            Bound::Unbounded => 0,
        }
        .max(self.first_readable());
        let end = match range.end_bound() {
            Bound::Included(&i) => Bound::Included(i.to_be_bytes()),
            Bound::Excluded(&i) => Bound::Excluded(i.to_be_bytes()),
            Bound::Unbounded => Bound::Unbounded,
        };
        let mut out = Vec::new();
        for item in self.log.range((Bound::Included(start.to_be_bytes()), end)) {
            out.push(Self::decode_item(item)?.1);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged: Option<LogId> = self.get_meta(KEY_LAST_PURGED)?;
        let last = self.last_entry_log_id()?.max(last_purged);
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> LogStore {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        self.put_meta(KEY_VOTE, vote)?;
        self.flush().await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        // A restarted server gets its vote back as *uncommitted*. openraft 0.9 would otherwise
        // resume as active in its old term at once, with a commit index read from disk that may be
        // behind what it acknowledged before the crash, and serve linearizable reads from that
        // stale point. Uncommitted, the vote still forbids voting for anyone else in the term, and
        // the server follows a live active of that term; if there is none, a fresh election in a
        // new term commits a blank entry first, which makes every acknowledged write visible.
        Ok(self
            .get_meta::<Vote>(KEY_VOTE)?
            .map(|v| Vote::new(v.leader_id.term, v.leader_id.node_id)))
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Not flushed on its own: losing it on a crash only means re-learning it from the active.
        // It lets a restarted server apply its committed log at once, before any active is known.
        self.put_meta(KEY_COMMITTED, &committed)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.get_meta::<Option<LogId>>(KEY_COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut batch = sled::Batch::default();
        let mut bytes = 0u64;
        for entry in entries {
            let encoded = Self::encode_entry(&entry);
            bytes += encoded.len() as u64;
            batch.insert(&entry.log_id.index.to_be_bytes(), encoded);
        }
        self.appended.fetch_add(bytes, Ordering::Relaxed);
        self.log
            .apply_batch(batch)
            .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Write, e))?;
        self.flusher.send(FlushWaiter::Append(callback)).map_err(|_| {
            io_err(
                ErrorSubject::Logs,
                ErrorVerb::Write,
                corrupt("the flusher stopped".into()),
            )
        })?;
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut batch = sled::Batch::default();
        for item in self.log.range(log_id.index.to_be_bytes()..) {
            let (k, _) = item.map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Write, e))?;
            batch.remove(k);
        }
        self.log
            .apply_batch(batch)
            .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Write, e))?;
        // Durable before openraft appends the replacing entries, so a crash can never leave the
        // old suffix behind new entries.
        self.flush().await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // The purge point is durable before any entry goes: a crash in between leaves extra
        // entries below it (hidden, deleted at the next open), never a gap.
        self.put_meta(KEY_LAST_PURGED, &log_id)?;
        self.flush().await?;
        self.first_readable.fetch_max(log_id.index + 1, Ordering::AcqRel);
        self.purger.send(log_id.index).map_err(|_| {
            io_err(
                ErrorSubject::Logs,
                ErrorVerb::Write,
                corrupt("the purger stopped".into()),
            )
        })
    }
}

impl LogStore {
    /// Size of the database on disk, for status.
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use openraft::storage::RaftLogStorageExt;
    use openraft::testing::log_id;
    use openraft::EntryPayload;

    use super::*;

    fn blank(index: u64) -> Entry {
        Entry {
            log_id: log_id(1, 1, index),
            payload: EntryPayload::Blank,
        }
    }

    /// Waits (bounded) until the purger has deleted everything at or below `index`.
    fn wait_deleted(log: &LogStore, index: u64) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while log.log.range(..=index.to_be_bytes()).next().is_some() {
            assert!(
                std::time::Instant::now() < deadline,
                "the purger left entries at or below {index}"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    #[tokio::test]
    async fn purged_entries_are_never_served_and_are_deleted_in_the_background() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut log = LogStore::open(dir.path()).expect("open");
        log.blocking_append((1..=5000).map(blank)).await.expect("append");

        log.purge(log_id(1, 1, 4000)).await.expect("purge");
        // Hidden at once, whatever the purger has done so far.
        let served = log.try_get_log_entries(0..=5000).await.expect("read");
        assert_eq!(served.first().map(|e| e.log_id.index), Some(4001));
        assert_eq!(served.len(), 1000);
        assert!(log.limited_get_log_entries(1, 4001).await.expect("read").is_empty());
        let state = log.get_log_state().await.expect("state");
        assert_eq!(state.last_purged_log_id, Some(log_id(1, 1, 4000)));
        assert_eq!(state.last_log_id, Some(log_id(1, 1, 5000)));
        // Deleted in chunks by the purger thread, not left behind.
        wait_deleted(&log, 4000);
        assert_eq!(log.log.len(), 1000);
    }

    #[tokio::test]
    async fn entries_a_crash_left_below_the_purge_point_are_hidden_and_deleted_at_open() {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let mut log = LogStore::open(dir.path()).expect("open");
            log.blocking_append((1..=100).map(blank)).await.expect("append");
            // What a crash right after the durable purge point leaves: the point, every entry.
            let purge_point: LogId = log_id(1, 1, 100);
            log.put_meta(KEY_LAST_PURGED, &purge_point).expect("meta");
            log.flush().await.expect("flush");
        }
        // The flusher and purger threads of the first store let go of the database when they see
        // its channels close, a moment after the drop.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut log = loop {
            match LogStore::open(dir.path()) {
                Ok(log) => break log,
                Err(e) if std::time::Instant::now() < deadline => {
                    tracing::debug!(error = %e, "the first store still holds the database");
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("reopen: {e}"),
            }
        };
        let state = log.get_log_state().await.expect("state");
        // The last log id is the purge point, not an entry below it.
        assert_eq!(state.last_log_id, Some(log_id(1, 1, 100)));
        assert!(log.try_get_log_entries(..).await.expect("read").is_empty());
        wait_deleted(&log, 100);
    }
}
