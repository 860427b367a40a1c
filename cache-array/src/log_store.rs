//! The Raft log, vote and committed index, durable in sled.
//!
//! Layout: under the server's data folder, `raft/` is the sled database and `raft.mark` the mark
//! ([`crate::mark`]). Tree `log` maps the big-endian index to `crc32 || postcard(entry)`; tree
//! `meta` holds the format version, the vote, the committed log id and the last purged log id.
//! Every read of an entry verifies its checksum, so a corrupt entry is reported, never served.
//!
//! Damage: opening the store verifies every entry (checksum, decoding, no gap) and that the log
//! holds at least what the mark says: the vote, the purge point and the last durable entry. sled
//! drops whatever follows a damaged record in its own files without an error, so only the mark
//! can tell a log that lost acknowledged entries from a healthy one. A damaged store is refused
//! with [`StoreDamage`], naming the folder and what is wrong; the server does not start.
//!
//! Group commit: appends write into sled without syncing and hand their completion callback to
//! one flusher thread. The flusher takes every callback that is waiting, copies the mark as it
//! stands, runs one `flush` (fsync), writes that mark (a second, small fsync), then completes them
//! all; so under load two fsyncs cover many appends. The vote goes through the same flusher and
//! is durable before `save_vote` returns. openraft is told an append is complete only after both.
//!
//! Purging: `purge` makes the new purge point durable and returns; one background thread deletes
//! the entries below it in small batches. Deleting tens of thousands of sled keys in one batch took
//! seconds and held openraft's core that long: under load the mirrors started an election after
//! every snapshot. Entries at or below the purge point are never served again: readers skip them
//! (a lower bound shared by all clones), and opening the log deletes any that a crash left behind.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, StorageIOError};
use tokio::sync::oneshot;

use crate::mark::{Mark, MarkError, MarkFile, Standing};
use crate::types::{Entry, LogId, StorageError, TypeConfig, Vote};

const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_LAST_PURGED: &[u8] = b"last_purged";
const KEY_FORMAT: &[u8] = b"format";

/// Format version of the log store this build writes: the layout above, entries encoded as
/// `crate::types::Entry`, and the mark. A store of a newer format is refused at start.
pub const STORE_FORMAT_VERSION: u32 = 1;

/// The sled database's folder inside a server's data folder.
pub const LOG_DIR: &str = "raft";
/// The mark's file inside a server's data folder.
pub const MARK_FILE: &str = "raft.mark";

/// A log store that must not be used, and why.
#[derive(Debug, thiserror::Error)]
#[error("the Raft log in {dir} is damaged: {what}")]
pub struct StoreDamage {
    /// The server's data folder.
    pub dir: PathBuf,
    /// What is wrong.
    pub what: Damage,
}

/// What is wrong with a damaged data folder.
#[derive(Debug, thiserror::Error)]
pub enum Damage {
    /// The mark cannot be read or written.
    #[error(transparent)]
    Mark(#[from] MarkError),
    /// sled refuses to open the database.
    #[error("the database cannot be opened: {0}")]
    Open(sled::Error),
    /// A stored value of the meta tree cannot be read.
    #[error("cannot read `{key}`: {source}")]
    MetaUnreadable { key: String, source: sled::Error },
    /// A stored value of the meta tree does not decode.
    #[error("the stored `{key}` is undecodable: {source}")]
    MetaUndecodable { key: String, source: postcard::Error },
    /// The log tree cannot be read.
    #[error("the log cannot be read: {0}")]
    LogUnreadable(sled::Error),
    /// A key of the log tree is not an index.
    #[error("a log key is not an index")]
    BadKey,
    /// An entry is missing between two others.
    #[error("entry {expected} is missing (the next one is {found}): the log has a gap")]
    Gap { expected: u64, found: u64 },
    /// An entry fails its checksum or does not decode.
    #[error("{0}")]
    Entry(StorageError),
    /// An entry is stored under another index than its own.
    #[error("entry {index} holds the entry of index {holds}")]
    Misplaced { index: u64, holds: u64 },
    /// A newer build wrote the store.
    #[error(
        "it was written in store format {format}, and this build reads formats up to {STORE_FORMAT_VERSION}: \
         run the newer ferrocotta that wrote it"
    )]
    NewerFormat { format: u32 },
    /// The database holds an older vote than the mark recorded.
    #[error("its vote went back: the mark says {mark}, the database {}", shown(.database))]
    VoteWentBack { mark: Vote, database: Option<Vote> },
    /// The database holds an older purge point than the mark recorded.
    #[error("its purge point went back: the mark says {mark:?}, the database {database:?}")]
    PurgeWentBack { mark: Option<u64>, database: Option<u64> },
    /// The entry the mark names was replaced by one of another term.
    #[error("entry {index} is from term {term}, but the mark says term {mark_term}: the log was rewritten")]
    Rewritten { index: u64, term: u64, mark_term: u64 },
    /// The log ends before the last entry the mark says was durable.
    #[error(
        "it ends at entry {}, but the mark says entries up to {durable} were durable: acknowledged entries are lost",
        shown(.ends_at)
    )]
    Lost { ends_at: Option<u64>, durable: u64 },
    /// The database holds a log but its mark is gone.
    #[error("its mark ({}) is missing, so lost entries cannot be ruled out", .0.display())]
    MarkMissing(PathBuf),
    /// The mark says there was a log but the database is empty.
    #[error("the database in {} is empty or was replaced, but the mark says it held a log", .0.display())]
    DatabaseMissing(PathBuf),
    /// The snapshot file is damaged.
    #[error(transparent)]
    Snapshot(crate::snapshot_file::LoadError),
    /// The log was compacted past what the snapshot holds.
    #[error(
        "the log was compacted up to entry {purged} but the snapshot that holds those entries (in {}) is {}",
        .dir.display(),
        .snapshot.map_or("missing".to_string(), |l| format!("older (entry {l})"))
    )]
    SnapshotBehind {
        purged: u64,
        snapshot: Option<u64>,
        dir: PathBuf,
    },
}

/// An optional value as a damage report shows it.
fn shown<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref().map_or_else(|| "none".to_string(), T::to_string)
}

/// What opening a store found.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenedLog {
    /// No vote, no entry, nothing purged: this server has never been part of a stripe (or its
    /// data is gone).
    pub pristine: bool,
    /// Its standing in the stripe.
    pub standing: Standing,
    /// The last entry's log id (or the purge point when every entry was purged).
    pub last_log_id: Option<LogId>,
    /// The purge point.
    pub purged: Option<LogId>,
    /// The vote.
    pub vote: Option<Vote>,
    /// Entries verified.
    pub entries: u64,
}

/// Encoded log bytes one AppendEntries call carries at most (a single larger entry goes alone).
pub const REPLICATION_BATCH_BYTES_MAX: usize = 1024 * 1024;

/// Flush requests that may wait for the flusher before appenders block.
pub const FLUSH_QUEUE_MAX: usize = 65_536;

/// A flush slower than this is logged: every append of the server waited for it.
const SLOW_FLUSH: std::time::Duration = std::time::Duration::from_millis(500);

/// Log entries the purger deletes per sled batch.
const PURGE_CHUNK: usize = 1024;

/// The mark file and what the next mark will say.
struct Marker {
    /// The file (written by the flusher thread only, and at open).
    file: Mutex<MarkFile>,
    /// The next mark: appends, votes, purges and truncations update it before they ask for a
    /// flush; the flusher copies it before its fsync and writes the copy after.
    next: Mutex<Mark>,
}

/// Who waits for a flush.
enum FlushWaiter {
    /// openraft's callback for an append.
    Append(LogFlushed<TypeConfig>),
    /// An async caller (vote).
    Notify(oneshot::Sender<Result<(), FlushError>>),
}

/// Why the log could not be made durable. One flush answers many waiters, so the sources are
/// shared.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FlushError {
    /// sled's fsync failed: nothing since the last good flush is known to be durable.
    #[error("syncing the log failed: {0}")]
    Sync(Arc<sled::Error>),
    /// The log is durable, the mark that records it is not.
    #[error("writing the mark failed: {0}")]
    Mark(Arc<MarkError>),
    /// A thread of the store is gone (the store is shutting down or one of them panicked).
    #[error("the {0} thread of the log store stopped")]
    Stopped(&'static str),
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
    /// The mark.
    marker: Arc<Marker>,
}

fn io_err(subject: ErrorSubject<u64>, verb: ErrorVerb, e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::new(subject, verb, openraft::AnyError::new(&e)).into()
}

fn stopped(thread: &'static str) -> std::io::Error {
    std::io::Error::other(FlushError::Stopped(thread))
}

fn corrupt(what: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what)
}

/// What a store holds, read and verified at open.
struct Found {
    format: Option<u32>,
    vote: Option<Vote>,
    purged: Option<LogId>,
    /// Log id of the last entry above the purge point.
    last_entry: Option<LogId>,
    /// Entries above the purge point, each verified.
    entries: u64,
    /// The entries' log ids, by index (to check the mark's last entry).
    ids: std::collections::BTreeMap<u64, LogId>,
}

fn read_meta<T: serde::de::DeserializeOwned>(meta: &sled::Tree, key: &[u8]) -> Result<Option<T>, Damage> {
    let name = || String::from_utf8_lossy(key).into_owned();
    match meta
        .get(key)
        .map_err(|source| Damage::MetaUnreadable { key: name(), source })?
    {
        None => Ok(None),
        Some(bytes) => postcard::from_bytes(&bytes)
            .map(Some)
            .map_err(|source| Damage::MetaUndecodable { key: name(), source }),
    }
}

impl Found {
    /// Reads the meta and verifies every entry above the purge point: checksum, decoding, index,
    /// and no gap.
    fn read(log: &sled::Tree, meta: &sled::Tree) -> Result<Found, Damage> {
        let format: Option<u32> = read_meta(meta, KEY_FORMAT)?;
        let vote: Option<Vote> = read_meta(meta, KEY_VOTE)?;
        let purged: Option<LogId> = read_meta(meta, KEY_LAST_PURGED)?;
        let first = purged.map_or(0, |p| p.index + 1);
        let mut ids = std::collections::BTreeMap::new();
        for (expected, item) in (first..).zip(log.range(first.to_be_bytes()..)) {
            let (k, v) = item.map_err(Damage::LogUnreadable)?;
            let index = k
                .as_ref()
                .try_into()
                .map(u64::from_be_bytes)
                .map_err(|_| Damage::BadKey)?;
            if index != expected {
                return Err(Damage::Gap { expected, found: index });
            }
            let entry = LogStore::decode_entry(index, &v).map_err(Damage::Entry)?;
            if entry.log_id.index != index {
                return Err(Damage::Misplaced {
                    index,
                    holds: entry.log_id.index,
                });
            }
            ids.insert(index, entry.log_id);
        }
        Ok(Found {
            format,
            vote,
            purged,
            last_entry: ids.values().next_back().copied(),
            entries: ids.len() as u64,
            ids,
        })
    }

    fn is_pristine(&self) -> bool {
        self.vote.is_none() && self.purged.is_none() && self.ids.is_empty()
    }

    /// Whether the log holds at least what the mark says it held.
    fn check_against(&self, mark: &Mark, format: u32) -> Result<(), Damage> {
        if format > STORE_FORMAT_VERSION || mark.format > STORE_FORMAT_VERSION {
            return Err(Damage::NewerFormat {
                format: format.max(mark.format),
            });
        }
        if let Some(want) = mark.vote {
            let ok = self.vote.is_some_and(|have| {
                matches!(
                    have.partial_cmp(&want),
                    Some(std::cmp::Ordering::Greater | std::cmp::Ordering::Equal)
                )
            });
            if !ok {
                return Err(Damage::VoteWentBack {
                    mark: want,
                    database: self.vote,
                });
            }
        }
        if mark.purged > self.purged {
            return Err(Damage::PurgeWentBack {
                mark: mark.purged.map(|p| p.index),
                database: self.purged.map(|p| p.index),
            });
        }
        if let Some(last) = mark.last_log_id {
            let covered_by_purge = self.purged.is_some_and(|p| p.index >= last.index);
            if !covered_by_purge {
                match self.ids.get(&last.index) {
                    Some(id) if *id == last => {}
                    Some(id) => {
                        return Err(Damage::Rewritten {
                            index: last.index,
                            term: id.leader_id.term,
                            mark_term: last.leader_id.term,
                        })
                    }
                    None => {
                        return Err(Damage::Lost {
                            ends_at: self.last_entry.map(|l| l.index),
                            durable: last.index,
                        })
                    }
                }
            }
        }
        Ok(())
    }
}

impl LogStore {
    /// Opens (or creates) the log in the server's data folder `data_dir`, verifies it against its
    /// mark, and starts its flusher and purger threads. A damaged log is a [`StoreDamage`].
    pub fn open(data_dir: &Path) -> anyhow::Result<(LogStore, OpenedLog)> {
        let damage = |what: Damage| StoreDamage {
            dir: data_dir.to_path_buf(),
            what,
        };
        std::fs::create_dir_all(data_dir)?;
        let mark_path = data_dir.join(MARK_FILE);
        let mark = MarkFile::open(&mark_path).map_err(|e| damage(e.into()))?;
        let db = match sled::Config::new()
            .path(data_dir.join(LOG_DIR))
            .mode(sled::Mode::HighThroughput)
            .open()
        {
            Ok(db) => db,
            // Another process holds the folder: not damage, and nothing to repair.
            Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") => {
                anyhow::bail!(
                    "the data folder {} is in use by another process (is this server already running?): {e}",
                    data_dir.display()
                )
            }
            Err(e) => return Err(damage(Damage::Open(e)).into()),
        };
        let log = db.open_tree("log")?;
        let meta = db.open_tree("meta")?;
        let found = Found::read(&log, &meta).map_err(damage)?;
        let (mark_file, mark) = match (mark, found.format) {
            (Some((file, mark)), Some(format)) => {
                found.check_against(&mark, format).map_err(damage)?;
                (file, mark)
            }
            (None, None) => {
                // Pristine, or a store written before the mark existed: adopt what is there.
                if !found.is_pristine() {
                    tracing::info!(
                        event = "log_store.adopted",
                        entries = found.entries,
                        "a log without a mark: adopting it"
                    );
                }
                meta.insert(KEY_FORMAT, postcard::to_allocvec(&STORE_FORMAT_VERSION)?)?;
                db.flush()?;
                let mark = Mark {
                    format: STORE_FORMAT_VERSION,
                    vote: found.vote,
                    last_log_id: found.last_entry,
                    purged: found.purged,
                    ..Mark::default()
                };
                (MarkFile::create(&mark_path, &mark).map_err(|e| damage(e.into()))?, mark)
            }
            (None, Some(_)) => return Err(damage(Damage::MarkMissing(mark_path)).into()),
            (Some(_), None) => return Err(damage(Damage::DatabaseMissing(data_dir.join(LOG_DIR))).into()),
        };
        let opened = OpenedLog {
            pristine: found.is_pristine(),
            standing: mark.standing,
            last_log_id: found.last_entry.max(found.purged),
            purged: found.purged,
            vote: found.vote,
            entries: found.entries,
        };
        let marker = Arc::new(Marker {
            file: Mutex::new(mark_file),
            next: Mutex::new(Mark {
                format: STORE_FORMAT_VERSION,
                vote: found.vote,
                last_log_id: found.last_entry.max(found.purged),
                purged: found.purged,
                ..mark
            }),
        });
        let (tx, rx) = std_mpsc::sync_channel::<FlushWaiter>(FLUSH_QUEUE_MAX);
        let stats = Arc::new(FlushStats::default());
        let flush_db = db.clone();
        let flush_stats = stats.clone();
        let flush_marker = marker.clone();
        std::thread::Builder::new()
            .name("log-flusher".into())
            .spawn(move || flusher(flush_db, flush_marker, rx, flush_stats))
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
            marker,
        };
        if let Some(purged) = found.purged {
            // Entries a crash left below the purge point: hidden now, deleted in the background.
            store.first_readable.store(purged.index + 1, Ordering::Release);
            let _ = store.purger.send(purged.index);
        }
        Ok((store, opened))
    }

    /// Records this server's standing in its stripe, durably.
    pub async fn set_standing(&self, standing: Standing) -> Result<(), StorageError> {
        self.marker.next.lock().expect("mark lock").standing = standing;
        self.flush().await
    }

    /// This server's standing as last set.
    pub fn standing(&self) -> Standing {
        self.marker.next.lock().expect("mark lock").standing
    }

    /// The last entry's log id (or the purge point, when it is later): what Raft compares with
    /// a candidate's before it votes.
    pub fn last_log_id(&self) -> Option<LogId> {
        self.marker.next.lock().expect("mark lock").last_log_id
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

    pub(crate) fn encode_entry(entry: &Entry) -> Vec<u8> {
        let body = postcard::to_allocvec(entry).expect("log entries always encode");
        let mut out = Vec::with_capacity(body.len() + 4);
        out.extend_from_slice(&crc32fast::hash(&body).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    pub(crate) fn decode_entry(index: u64, bytes: &[u8]) -> Result<Entry, StorageError> {
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
        self.flusher
            .send(FlushWaiter::Notify(tx))
            .map_err(|_| io_err(ErrorSubject::Store, ErrorVerb::Write, stopped("flusher")))?;
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(io_err(ErrorSubject::Store, ErrorVerb::Write, e)),
            Err(_) => Err(io_err(ErrorSubject::Store, ErrorVerb::Write, stopped("flusher"))),
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

/// The flusher thread: per batch of waiters, one fsync of the database and one write of the mark.
fn flusher(db: sled::Db, marker: Arc<Marker>, rx: std_mpsc::Receiver<FlushWaiter>, stats: Arc<FlushStats>) {
    use std::sync::atomic::Ordering::Relaxed;
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
        }
        let started = std::time::Instant::now();
        // Copied before the fsync: everything the copy counts was written to sled before it, so
        // the mark never claims more than the fsync made durable.
        let mark = marker.next.lock().expect("mark lock").clone();
        let result = db.flush().map_err(|e| FlushError::Sync(Arc::new(e))).and_then(|_| {
            marker
                .file
                .lock()
                .expect("mark lock")
                .write(mark)
                .map_err(|e| FlushError::Mark(Arc::new(e)))
        });
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
        self.marker.next.lock().expect("mark lock").vote = Some(*vote);
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
        let mut last = None;
        for entry in entries {
            let encoded = Self::encode_entry(&entry);
            bytes += encoded.len() as u64;
            batch.insert(&entry.log_id.index.to_be_bytes(), encoded);
            last = Some(entry.log_id);
        }
        self.appended.fetch_add(bytes, Ordering::Relaxed);
        self.log
            .apply_batch(batch)
            .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Write, e))?;
        if last.is_some() {
            self.marker.next.lock().expect("mark lock").last_log_id = last;
        }
        self.flusher
            .send(FlushWaiter::Append(callback))
            .map_err(|_| io_err(ErrorSubject::Logs, ErrorVerb::Write, stopped("flusher")))?;
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // The mark moves back first, and durably: a crash before the entries go leaves the log
        // ahead of the mark (allowed), never behind it.
        let new_last = match log_id.index.checked_sub(1) {
            None => None,
            Some(prev) if prev < self.first_readable() => self.get_meta::<LogId>(KEY_LAST_PURGED)?,
            Some(prev) => self.try_get_log_entries(prev..=prev).await?.pop().map(|e| e.log_id),
        };
        self.marker.next.lock().expect("mark lock").last_log_id = new_last;
        self.flush().await?;
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
        {
            let mut next = self.marker.next.lock().expect("mark lock");
            next.purged = Some(log_id);
            next.last_log_id = next.last_log_id.max(Some(log_id));
        }
        self.flush().await?;
        self.first_readable.fetch_max(log_id.index + 1, Ordering::AcqRel);
        self.purger
            .send(log_id.index)
            .map_err(|_| io_err(ErrorSubject::Logs, ErrorVerb::Write, stopped("purger")))
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
    use std::path::Path;

    use super::*;

    fn blank(index: u64) -> Entry {
        Entry {
            log_id: log_id(1, 1, index),
            payload: EntryPayload::Blank,
        }
    }

    /// Opens a store in `dir` again once the threads of a dropped one let go of the database.
    fn reopen(dir: &Path) -> anyhow::Result<(LogStore, OpenedLog)> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match LogStore::open(dir) {
                Err(e) if e.downcast_ref::<StoreDamage>().is_none() && std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                other => return other,
            }
        }
    }

    /// A store in `dir` holding entries 0..=last (blank, term 1), then closed.
    async fn store_with(dir: &Path, last: u64) {
        let (mut log, opened) = LogStore::open(dir).expect("open");
        assert!(opened.pristine);
        log.save_vote(&Vote::new_committed(1, 1)).await.expect("vote");
        log.blocking_append((0..=last).map(blank)).await.expect("append");
    }

    /// Opens the sled database of a closed store directly, as damage would find it.
    fn raw_db(dir: &Path) -> sled::Db {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match sled::open(dir.join(LOG_DIR)) {
                Ok(db) => return db,
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20))
                }
                Err(e) => panic!("open sled: {e}"),
            }
        }
    }

    fn damage_of(result: anyhow::Result<(LogStore, OpenedLog)>) -> String {
        match result {
            Ok(_) => panic!("a damaged log was opened"),
            Err(e) => e
                .downcast::<StoreDamage>()
                .map(|d| d.to_string())
                .unwrap_or_else(|e| panic!("not a damage report: {e:#}")),
        }
    }

    #[tokio::test]
    async fn a_healthy_store_reopens_with_what_it_held() {
        let dir = tempfile::tempdir().unwrap();
        store_with(dir.path(), 50).await;
        let (_, opened) = reopen(dir.path()).expect("reopen");
        assert!(!opened.pristine);
        assert_eq!(opened.entries, 51);
        assert_eq!(opened.last_log_id.map(|l| l.index), Some(50));
        assert_eq!(opened.standing, Standing::Member);
    }

    /// What sled does to a damaged file (replays up to the damage, drops the rest, no error):
    /// entries the mark counts as durable are gone.
    #[tokio::test]
    async fn a_log_that_lost_its_tail_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        store_with(dir.path(), 100).await;
        std::thread::sleep(std::time::Duration::from_millis(100));
        {
            let db = raw_db(dir.path());
            let log = db.open_tree("log").unwrap();
            for i in 60..=100u64 {
                log.remove(i.to_be_bytes()).unwrap();
            }
            db.flush().unwrap();
        }
        let what = damage_of(reopen(dir.path()));
        assert!(
            what.contains("acknowledged entries are lost") && what.contains("100"),
            "{what}"
        );
    }

    #[tokio::test]
    async fn a_damaged_entry_or_a_gap_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        store_with(dir.path(), 20).await;
        std::thread::sleep(std::time::Duration::from_millis(100));
        {
            let db = raw_db(dir.path());
            let log = db.open_tree("log").unwrap();
            let mut bytes = log.get(7u64.to_be_bytes()).unwrap().unwrap().to_vec();
            let at = bytes.len() - 1;
            bytes[at] ^= 0x55;
            log.insert(7u64.to_be_bytes(), bytes).unwrap();
            db.flush().unwrap();
        }
        let what = damage_of(reopen(dir.path()));
        assert!(what.contains("log entry 7") && what.contains("checksum"), "{what}");
        {
            let db = raw_db(dir.path());
            let log = db.open_tree("log").unwrap();
            log.remove(7u64.to_be_bytes()).unwrap();
            db.flush().unwrap();
        }
        let what = damage_of(reopen(dir.path()));
        assert!(what.contains("entry 7 is missing"), "{what}");
    }

    #[tokio::test]
    async fn a_missing_mark_or_a_missing_database_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        store_with(dir.path(), 5).await;
        std::thread::sleep(std::time::Duration::from_millis(100));
        let mark = dir.path().join(MARK_FILE);
        std::fs::rename(&mark, dir.path().join("mark.aside")).unwrap();
        let what = damage_of(reopen(dir.path()));
        assert!(what.contains("mark") && what.contains("missing"), "{what}");
        std::fs::rename(dir.path().join("mark.aside"), &mark).unwrap();
        std::fs::remove_dir_all(dir.path().join(LOG_DIR)).unwrap();
        let what = damage_of(reopen(dir.path()));
        assert!(what.contains("the mark says it held a log"), "{what}");
    }

    #[tokio::test]
    async fn a_vote_that_went_back_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut log, _) = LogStore::open(dir.path()).expect("open");
            log.save_vote(&Vote::new(3, 2)).await.expect("vote");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        {
            let db = raw_db(dir.path());
            let meta = db.open_tree("meta").unwrap();
            meta.insert(KEY_VOTE, postcard::to_allocvec(&Vote::new(2, 2)).unwrap())
                .unwrap();
            db.flush().unwrap();
        }
        let what = damage_of(reopen(dir.path()));
        assert!(what.contains("vote went back"), "{what}");
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
        let mut log = LogStore::open(dir.path()).expect("open").0;
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
            let mut log = LogStore::open(dir.path()).expect("open").0;
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
                Ok((log, _)) => break log,
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
