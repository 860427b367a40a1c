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

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
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
    stats: Arc<FlushStats>,
}

fn io_err(subject: ErrorSubject<u64>, verb: ErrorVerb, e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::new(subject, verb, openraft::AnyError::new(&e)).into()
}

fn corrupt(what: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what)
}

impl LogStore {
    /// Opens (or creates) the log under `dir` and starts its flusher thread.
    pub fn open(dir: &Path) -> Result<LogStore, sled::Error> {
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
        Ok(LogStore {
            db,
            log,
            meta,
            flusher: tx,
            stats,
        })
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
        self.log
            .last()
            .transpose()
            .map(|item| Self::decode_item(item).map(|(_, e)| e.log_id))
            .transpose()
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
        let result = db.flush().map(|_| ()).map_err(|e| e.to_string());
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
        };
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
        let last = self.last_entry_log_id()?.or(last_purged);
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
        for entry in entries {
            batch.insert(&entry.log_id.index.to_be_bytes(), Self::encode_entry(&entry));
        }
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
        // Record the purge point first: a crash in between leaves extra entries, never a gap.
        self.put_meta(KEY_LAST_PURGED, &log_id)?;
        self.flush().await?;
        let mut batch = sled::Batch::default();
        for item in self.log.range(..=log_id.index.to_be_bytes()) {
            let (k, _) = item.map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Write, e))?;
            batch.remove(k);
        }
        self.log
            .apply_batch(batch)
            .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Write, e))?;
        Ok(())
    }
}

impl LogStore {
    /// Size of the database on disk, for status.
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }
}
