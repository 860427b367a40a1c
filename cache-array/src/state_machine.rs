//! The caches: an in-memory state machine fed by the Raft log, with checksummed snapshots on disk.
//!
//! Architecture invariant: applying an entry is deterministic. It reads no clock, no random source
//! and no network; time enters only as [`Command::at_ms`], chosen by the active.
//!
//! Reads are served from the same memory through [`SharedState`]; the server decides beforehand
//! whether a read may be served (read index for linearizable reads).
//!
//! Snapshot file layout: `FCSNAP01` magic, CRC-32 of the payload (4 bytes, big endian), payload length
//! (8 bytes, big endian), then the postcard payload, whose first fields are the snapshot's meta. The
//! same bytes travel to mirrors that need a snapshot, so a mirror verifies the checksum before
//! installing. A corrupt file is reported with its path and never loaded.
//!
//! A snapshot is built from a clone of the store taken under the read lock (values are shared
//! `Bytes`, so the clone copies keys and map nodes, not values) and streamed to the file; it is
//! sent and received as that file. No snapshot is ever held whole in memory, except while it is
//! loaded at start or installed from the active.

use std::collections::BTreeMap;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use std::collections::HashMap;
use std::sync::Mutex;

use ferrocotta::protocol::{CacheSettings, ErrorReply, ReadOp, Reply};
use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use openraft::{EntryPayload, StorageIOError};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::command::{Command, CommandKind, CommandResult};
use crate::store::{ApplyContext, Grant, ReadError, ReplyRoom, Store};
use crate::types::{Entry, LogId, Snapshot, SnapshotMeta, StorageError, StoredMembership, TypeConfig};

const SNAPSHOT_MAGIC: &[u8; 8] = b"FCSNAP01";
const SNAPSHOT_HEADER_BYTES: usize = 8 + 4 + 8;
const SNAPSHOT_FILE: &str = "snapshot.bin";
/// Where a snapshot sent by the active is received before it is verified and installed.
const RECEIVING_FILE: &str = "snapshot.bin.receiving";
/// Where this server writes a snapshot it builds, before it replaces `SNAPSHOT_FILE`.
const BUILDING_FILE: &str = "snapshot.bin.building";
/// Where a verified snapshot from the active is written before it replaces `SNAPSHOT_FILE`.
const INSTALLING_FILE: &str = "snapshot.bin.installing";
/// Bytes of payload read to find a snapshot's meta (its first fields) without reading it all.
const SNAPSHOT_META_PREFIX_MAX: usize = 1024 * 1024;

/// Everything the state machine holds, behind one lock.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct StateData {
    /// Last log id applied.
    pub last_applied: Option<LogId>,
    /// Last membership applied.
    pub last_membership: StoredMembership,
    /// Caches, sessions and locks.
    pub store: Store,
}

/// Requests waiting for a lock grant, by (cache, key, session). Applying an entry that grants a
/// lock wakes them; every server applies the same grants, so whichever server holds the waiting
/// request wakes it.
type LockWaiters = HashMap<(String, Vec<u8>, u64), Vec<oneshot::Sender<()>>>;

/// Lock waiters one server may hold before new waits are refused.
pub const LOCK_WAITERS_MAX: usize = 100_000;

/// The state shared between the Raft state machine (writer) and the request path (readers).
///
/// A `std::sync::RwLock`, not a Tokio one: no `.await` happens while it is held, and reads are
/// short, so blocking briefly is cheaper than an async lock's bookkeeping.
#[derive(Debug, Default)]
pub struct SharedState {
    data: RwLock<StateData>,
    /// Requests waiting for lock grants.
    lock_waiters: Mutex<LockWaiters>,
}

impl SharedState {
    /// Runs `f` with read access.
    pub fn read<T>(&self, f: impl FnOnce(&StateData) -> T) -> T {
        f(&self.data.read().expect("state lock poisoned"))
    }

    /// Serves a read operation at `now_ms`; see [`Store::read_op`].
    pub fn serve_read(
        &self,
        op: &ReadOp,
        now_ms: u64,
        room: ReplyRoom,
        pending_access: &dyn Fn(&str, &[u8]) -> Option<u64>,
    ) -> Result<Reply, ReadError> {
        self.read(|d| d.store.read(op, now_ms, room, pending_access))
    }

    /// Registers interest in a lock grant. Register first, then check whether the lock is already
    /// held: a grant applied in between is then seen one way or the other.
    pub fn wait_for_grant(&self, cache: &str, key: &[u8], session: u64) -> Result<oneshot::Receiver<()>, ErrorReply> {
        let mut w = self.lock_waiters.lock().expect("lock waiters poisoned");
        if w.len() >= LOCK_WAITERS_MAX {
            return Err(ErrorReply::Invalid(format!(
                "more than {LOCK_WAITERS_MAX} lock waits on this server"
            )));
        }
        let (tx, rx) = oneshot::channel();
        w.entry((cache.to_string(), key.to_vec(), session))
            .or_default()
            .push(tx);
        Ok(rx)
    }

    /// Forgets the waiters of a lock wait that ended without a grant.
    pub fn forget_waiters(&self, cache: &str, key: &[u8], session: u64) {
        let mut w = self.lock_waiters.lock().expect("lock waiters poisoned");
        let id = (cache.to_string(), key.to_vec(), session);
        if let Some(list) = w.get_mut(&id) {
            list.retain(|tx| !tx.is_closed());
            if list.is_empty() {
                w.remove(&id);
            }
        }
    }

    fn notify(&self, grants: Vec<Grant>) {
        if grants.is_empty() {
            return;
        }
        let mut w = self.lock_waiters.lock().expect("lock waiters poisoned");
        for g in grants {
            if let Some(list) = w.remove(&(g.cache, g.key, g.session)) {
                for tx in list {
                    let _ = tx.send(());
                }
            }
        }
    }
}

/// What a snapshot file holds. postcard writes a nested struct's fields in place, so the payload's
/// bytes start with the head's: the meta is read from a file's first bytes alone.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct SnapshotPayload {
    pub(crate) head: SnapshotHead,
    pub(crate) store: Store,
}

/// A snapshot's meta, in the order the file has always stored it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SnapshotHead {
    pub(crate) snapshot_id: String,
    pub(crate) last_applied: Option<LogId>,
    pub(crate) last_membership: StoredMembership,
}

impl SnapshotHead {
    fn meta(&self) -> SnapshotMeta {
        SnapshotMeta {
            last_log_id: self.last_applied,
            last_membership: self.last_membership.clone(),
            snapshot_id: self.snapshot_id.clone(),
        }
    }
}

/// Checks a file's header; returns the payload's CRC-32 and length.
fn parse_header(header: &[u8]) -> Result<(u32, u64), String> {
    if header.len() < SNAPSHOT_HEADER_BYTES || &header[..8] != SNAPSHOT_MAGIC {
        return Err("not a ferrocotta snapshot (bad magic or truncated header)".into());
    }
    let crc = u32::from_be_bytes(header[8..12].try_into().expect("4 bytes"));
    let len = u64::from_be_bytes(header[12..20].try_into().expect("8 bytes"));
    Ok((crc, len))
}

/// Counts and checksums what goes through to the inner writer.
struct Checksummed<W> {
    inner: W,
    crc: crc32fast::Hasher,
    len: u64,
}

impl<W: Write> Write for Checksummed<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Streams a snapshot into `out` (at its start): a header left blank, the payload, then the header
/// filled in. Returns the bytes written.
pub(crate) fn encode_snapshot_to<W: Write + Seek>(out: W, payload: &SnapshotPayload) -> std::io::Result<u64> {
    let mut out = BufWriter::with_capacity(1024 * 1024, out);
    out.write_all(&[0u8; SNAPSHOT_HEADER_BYTES])?;
    let mut body = Checksummed {
        inner: out,
        crc: crc32fast::Hasher::new(),
        len: 0,
    };
    postcard::to_io(payload, &mut body).map_err(std::io::Error::other)?;
    let Checksummed {
        inner: mut out,
        crc,
        len,
    } = body;
    out.seek(SeekFrom::Start(0))?;
    out.write_all(SNAPSHOT_MAGIC)?;
    out.write_all(&crc.finalize().to_be_bytes())?;
    out.write_all(&len.to_be_bytes())?;
    out.flush()?;
    Ok(SNAPSHOT_HEADER_BYTES as u64 + len)
}

/// Replaces the snapshot file with one `write` produces, atomically (its own temporary file
/// `tmp_name`, fsync, rename, fsync of the directory), unless the current file is at least as new
/// as `last_applied`: the snapshot file only moves forward. A build and an install may run at once
/// (a mirror building its own snapshot while it receives the active's); each has its own temporary
/// file and the check and rename happen under `file_lock`, so neither can put an older state in
/// front of a log already purged past it. Returns the size and a handle on the data written (still
/// readable when it did not replace the current file).
fn replace_snapshot_file(
    dir: &Path,
    tmp_name: &str,
    last_applied: Option<LogId>,
    file_lock: &Mutex<()>,
    write: impl FnOnce(&mut std::fs::File) -> std::io::Result<u64>,
) -> std::io::Result<(u64, std::fs::File)> {
    let tmp = dir.join(tmp_name);
    let len = {
        let mut f = std::fs::File::create(&tmp)?;
        let len = write(&mut f)?;
        f.sync_all()?;
        len
    };
    let _guard = file_lock.lock().unwrap_or_else(|e| e.into_inner());
    let current = dir.join(SNAPSHOT_FILE);
    let superseded = std::fs::File::open(&current)
        .and_then(|mut f| read_snapshot_meta(&mut f, &current))
        .is_ok_and(|m| m.last_log_id >= last_applied);
    if superseded {
        // Open, then unlink: the caller still gets the data it wrote.
        let f = std::fs::File::open(&tmp)?;
        std::fs::remove_file(&tmp)?;
        tracing::info!(event = "state_machine.snapshot_superseded", last_log_id = ?last_applied);
        return Ok((len, f));
    }
    std::fs::rename(&tmp, &current)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok((len, std::fs::File::open(&current)?))
}

/// The meta of the snapshot file `f` (at `path`), from its first bytes; leaves `f` at its start.
/// The payload's checksum is verified by whoever installs it.
fn read_snapshot_meta(f: &mut std::fs::File, path: &Path) -> std::io::Result<SnapshotMeta> {
    let invalid =
        |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {what}", path.display()));
    let mut header = [0u8; SNAPSHOT_HEADER_BYTES];
    f.read_exact(&mut header)?;
    let (_, len) = parse_header(&header).map_err(invalid)?;
    let mut prefix = Vec::new();
    Read::by_ref(f)
        .take(len.min(SNAPSHOT_META_PREFIX_MAX as u64))
        .read_to_end(&mut prefix)?;
    f.seek(SeekFrom::Start(0))?;
    let (head, _) = postcard::take_from_bytes::<SnapshotHead>(&prefix)
        .map_err(|e| invalid(format!("undecodable snapshot meta: {e}")))?;
    Ok(head.meta())
}

/// Decodes and verifies a snapshot file.
pub(crate) fn decode_snapshot(bytes: &[u8]) -> Result<SnapshotPayload, String> {
    let (crc, len) = parse_header(bytes)?;
    let len = len as usize;
    let body = &bytes[SNAPSHOT_HEADER_BYTES..];
    if body.len() != len {
        return Err(format!(
            "length mismatch: header says {len} bytes, file has {}",
            body.len()
        ));
    }
    if crc32fast::hash(body) != crc {
        return Err("checksum mismatch: the snapshot is corrupt".into());
    }
    postcard::from_bytes(body).map_err(|e| format!("undecodable snapshot: {e}"))
}

/// The Raft state machine of a stripe member.
pub struct StateMachineStore {
    /// The data, shared with the request path.
    shared: Arc<SharedState>,
    /// Directory of the snapshot file.
    snapshot_dir: PathBuf,
    /// Snapshots built so far, to give each a unique id.
    snapshots_built: u64,
    /// Held while the snapshot file is replaced, by a build or an install.
    file_lock: Arc<Mutex<()>>,
    /// Settings of caches named in the config (identical on every server).
    configured: BTreeMap<String, CacheSettings>,
}

impl StateMachineStore {
    /// Opens the state machine, loading the snapshot in `snapshot_dir` if there is one. A corrupt
    /// snapshot is an error naming the file: the server must not start from it.
    pub fn open(snapshot_dir: &Path, configured: BTreeMap<String, CacheSettings>) -> Result<StateMachineStore, String> {
        std::fs::create_dir_all(snapshot_dir).map_err(|e| format!("cannot create {}: {e}", snapshot_dir.display()))?;
        let shared = Arc::new(SharedState::default());
        let path = snapshot_dir.join(SNAPSHOT_FILE);
        if path.exists() {
            let bytes = std::fs::read(&path).map_err(|e| format!("cannot read snapshot {}: {e}", path.display()))?;
            let payload = decode_snapshot(&bytes).map_err(|e| format!("snapshot {}: {e}", path.display()))?;
            let mut d = shared.data.write().expect("state lock poisoned");
            d.last_applied = payload.head.last_applied;
            d.last_membership = payload.head.last_membership;
            d.store = payload.store;
            d.store.rebuild_indexes();
            tracing::info!(
                event = "state_machine.snapshot_loaded",
                path = %path.display(),
                last_applied = ?d.last_applied,
                caches = d.store.caches.len()
            );
        }
        Ok(StateMachineStore {
            shared,
            snapshot_dir: snapshot_dir.to_path_buf(),
            snapshots_built: 0,
            file_lock: Arc::default(),
            configured,
        })
    }

    /// The shared state, for the request path.
    pub fn shared(&self) -> Arc<SharedState> {
        self.shared.clone()
    }
}

/// Size of the snapshot file in `snapshot_dir` (0 when there is none).
pub fn snapshot_file_len(snapshot_dir: &Path) -> u64 {
    std::fs::metadata(snapshot_dir.join(SNAPSHOT_FILE))
        .map(|m| m.len())
        .unwrap_or(0)
}

/// Builds snapshots from the shared state.
pub struct SnapshotBuilder {
    shared: Arc<SharedState>,
    snapshot_dir: PathBuf,
    seq: u64,
    file_lock: Arc<Mutex<()>>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let shared = self.shared.clone();
        let dir = self.snapshot_dir.clone();
        let seq = self.seq;
        let file_lock = self.file_lock.clone();
        // Cloning, encoding and fsync are blocking work: keep them off the runtime's workers. The
        // read lock is held only for the clone (values are shared, not copied).
        let built = tokio::task::spawn_blocking(move || -> Result<(SnapshotMeta, u64, std::fs::File), StorageError> {
            let payload = shared.read(|d| SnapshotPayload {
                head: SnapshotHead {
                    snapshot_id: match &d.last_applied {
                        Some(l) => format!("{}-{}-{seq}", l.leader_id.term, l.index),
                        None => format!("none-{seq}"),
                    },
                    last_applied: d.last_applied,
                    last_membership: d.last_membership.clone(),
                },
                store: d.store.clone(),
            });
            let (len, file) = replace_snapshot_file(&dir, BUILDING_FILE, payload.head.last_applied, &file_lock, |f| {
                encode_snapshot_to(f, &payload)
            })
            .map_err(|e| StorageIOError::write_snapshot(None, &e))?;
            Ok((payload.head.meta(), len, file))
        })
        .await
        .map_err(|e| StorageIOError::write_snapshot(None, &e))??;
        let (meta, len, file) = built;
        tracing::info!(event = "state_machine.snapshot_built", last_log_id = ?meta.last_log_id, bytes = len);
        Ok(Snapshot {
            meta,
            snapshot: Box::new(tokio::fs::File::from_std(file)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        Ok(self.shared.read(|d| (d.last_applied, d.last_membership.clone())))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResult>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut out = Vec::new();
        let mut grants = Vec::new();
        {
            let mut d = self.shared.data.write().expect("state lock poisoned");
            for entry in entries {
                d.last_applied = Some(entry.log_id);
                match entry.payload {
                    EntryPayload::Blank => out.push(CommandResult::Nothing),
                    EntryPayload::Normal(Command { at_ms, kind }) => {
                        let mut ctx = ApplyContext {
                            now_ms: at_ms,
                            index: entry.log_id.index,
                            configured: &self.configured,
                            grants: Vec::new(),
                        };
                        out.push(apply_command(&mut d.store, kind, &mut ctx));
                        grants.append(&mut ctx.grants);
                    }
                    EntryPayload::Membership(m) => {
                        d.last_membership = StoredMembership::new(Some(entry.log_id), m);
                        out.push(CommandResult::Nothing);
                    }
                }
            }
        }
        self.shared.notify(grants);
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        self.snapshots_built += 1;
        SnapshotBuilder {
            shared: self.shared.clone(),
            snapshot_dir: self.snapshot_dir.clone(),
            seq: self.snapshots_built,
            file_lock: self.file_lock.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<tokio::fs::File>, StorageError> {
        let path = self.snapshot_dir.join(RECEIVING_FILE);
        let file = tokio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .await
            .map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        Ok(Box::new(file))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<tokio::fs::File>,
    ) -> Result<(), StorageError> {
        let write_err = |e: &std::io::Error| StorageIOError::write_snapshot(Some(meta.signature()), e);
        let mut file = snapshot;
        tokio::io::AsyncWriteExt::flush(&mut file)
            .await
            .map_err(|e| write_err(&e))?;
        let file = file.into_std().await;
        // Verified before it replaces anything: a corrupt transfer leaves the current snapshot and
        // state as they were. Read from the handle openraft gives back (usually the receiving
        // file, but any snapshot data will do), then written as this server's snapshot.
        let dir = self.snapshot_dir.clone();
        let file_lock = self.file_lock.clone();
        let (payload, len) = tokio::task::spawn_blocking(move || -> std::io::Result<(SnapshotPayload, usize)> {
            let mut file = file;
            file.seek(SeekFrom::Start(0))?;
            let mut bytes = Vec::new();
            file.read_to_end(&mut bytes)?;
            drop(file);
            let payload =
                decode_snapshot(&bytes).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
            replace_snapshot_file(&dir, INSTALLING_FILE, payload.head.last_applied, &file_lock, |f| {
                f.write_all(&bytes)?;
                Ok(bytes.len() as u64)
            })?;
            if let Err(e) = std::fs::remove_file(dir.join(RECEIVING_FILE)) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(event = "state_machine.receiving_file_left", error = %e);
                }
            }
            Ok((payload, bytes.len()))
        })
        .await
        .map_err(|e| write_err(&std::io::Error::other(e)))?
        .map_err(|e| write_err(&e))?;
        let mut d = self.shared.data.write().expect("state lock poisoned");
        d.last_applied = meta.last_log_id;
        d.last_membership = meta.last_membership.clone();
        d.store = payload.store;
        d.store.rebuild_indexes();
        tracing::info!(event = "state_machine.snapshot_installed", last_log_id = ?meta.last_log_id, bytes = len);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        let path = self.snapshot_dir.join(SNAPSHOT_FILE);
        // Meta and data come from one open file: a snapshot built meanwhile replaces the path,
        // never what this handle reads.
        let opened = tokio::task::spawn_blocking(move || -> std::io::Result<Option<(SnapshotMeta, std::fs::File)>> {
            let mut f = match std::fs::File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            };
            Ok(Some((read_snapshot_meta(&mut f, &path)?, f)))
        })
        .await
        .map_err(|e| StorageIOError::read_snapshot(None, &std::io::Error::other(e)))?
        .map_err(|e| StorageIOError::read_snapshot(None, &e))?;
        Ok(opened.map(|(meta, f)| Snapshot {
            meta,
            snapshot: Box::new(tokio::fs::File::from_std(f)),
        }))
    }
}

/// Applies one log payload to the store.
fn apply_command(store: &mut Store, kind: CommandKind, ctx: &mut ApplyContext) -> CommandResult {
    match kind {
        CommandKind::Client(change) => CommandResult::Client(store.apply(&change, ctx)),
        CommandKind::Batch(changes) => CommandResult::Batch(changes.iter().map(|c| store.apply(c, ctx)).collect()),
        CommandKind::Touch(accesses) => {
            store.touch(&accesses, ctx);
            CommandResult::Touched
        }
        CommandKind::Expire(keys) => CommandResult::Expired {
            entries: store.expire(&keys, ctx.now_ms) as u64,
        },
        CommandKind::ExpireSessions(ids) => CommandResult::SessionsEnded {
            sessions: ids.into_iter().map(|id| store.end_session(id, ctx) as u64).sum(),
        },
        CommandKind::LockWaitCancel { cache, key, session } => {
            CommandResult::Client(store.cancel_wait(&cache, &key, session, ctx))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::Change;

    #[test]
    fn corrupt_snapshots_are_refused() {
        let payload = SnapshotPayload {
            head: SnapshotHead {
                snapshot_id: "x".into(),
                last_applied: None,
                last_membership: StoredMembership::default(),
            },
            store: Store::default(),
        };
        let mut out = std::io::Cursor::new(Vec::new());
        encode_snapshot_to(&mut out, &payload).unwrap();
        let mut bytes = out.into_inner();
        assert!(decode_snapshot(&bytes).is_ok());
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        assert!(decode_snapshot(&bytes).unwrap_err().contains("checksum"));
    }

    /// The payload nests its head; the bytes are those of the flat payload files were written
    /// with before, so those files still load.
    #[test]
    fn the_nested_payload_reads_files_of_the_flat_layout() {
        #[derive(Serialize)]
        struct Flat {
            snapshot_id: String,
            last_applied: Option<LogId>,
            last_membership: StoredMembership,
            store: Store,
        }
        let last_applied = Some(openraft::LogId::new(openraft::CommittedLeaderId::new(2, 3), 9));
        let bytes = postcard::to_allocvec(&Flat {
            snapshot_id: "2-9-1".into(),
            last_applied,
            last_membership: StoredMembership::default(),
            store: Store::default(),
        })
        .unwrap();
        let payload: SnapshotPayload = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(payload.head.snapshot_id, "2-9-1");
        assert_eq!(payload.head.last_applied, last_applied);
    }

    /// A build's way of writing the snapshot file, as `build_snapshot` does.
    fn build(dir: &Path, payload: &SnapshotPayload, lock: &Mutex<()>) -> std::io::Result<(u64, std::fs::File)> {
        replace_snapshot_file(dir, BUILDING_FILE, payload.head.last_applied, lock, |f| {
            encode_snapshot_to(f, payload)
        })
    }

    /// A snapshot built from an older state never replaces a newer one (one installed from the
    /// active while the build ran).
    #[test]
    fn an_older_build_does_not_replace_a_newer_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let lock = Mutex::new(());
        let at = |index: u64| SnapshotPayload {
            head: SnapshotHead {
                snapshot_id: format!("s{index}"),
                last_applied: Some(openraft::LogId::new(openraft::CommittedLeaderId::new(1, 1), index)),
                last_membership: StoredMembership::default(),
            },
            store: Store::default(),
        };
        let current_index = || {
            let path = dir.path().join(SNAPSHOT_FILE);
            let mut f = std::fs::File::open(&path).unwrap();
            read_snapshot_meta(&mut f, &path).unwrap().last_log_id.unwrap().index
        };
        build(dir.path(), &at(20), &lock).unwrap();
        assert_eq!(current_index(), 20);
        let (_, mut older) = build(dir.path(), &at(15), &lock).unwrap();
        assert_eq!(current_index(), 20, "an older build replaced the snapshot");
        // What the older build returns is still its own, readable data.
        let mut bytes = Vec::new();
        older.read_to_end(&mut bytes).unwrap();
        assert_eq!(decode_snapshot(&bytes).unwrap().head.last_applied.unwrap().index, 15);
        assert!(!dir.path().join(BUILDING_FILE).exists());
        build(dir.path(), &at(30), &lock).unwrap();
        assert_eq!(current_index(), 30);
    }

    #[tokio::test]
    async fn a_batch_applies_in_order_with_one_result_per_write() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = StateMachineStore::open(dir.path(), BTreeMap::new()).unwrap();
        let cas = |expected: &str, value: &str| {
            Change::ReplaceIfEqual(crate::command::ReplaceIfEqual {
                cache: "c".into(),
                key: b"k".to_vec(),
                expected: expected.into(),
                value: value.into(),
            })
        };
        let put = Change::Put(crate::command::Put {
            cache: "c".into(),
            key: b"k".to_vec(),
            value: b"1".to_vec(),
            ttl_ms: None,
            tti_ms: None,
            session: None,
        });
        let entry = Entry {
            log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(1, 1), 1),
            payload: EntryPayload::Normal(Command {
                at_ms: 1,
                kind: CommandKind::Batch(vec![put, cas("1", "2"), cas("1", "3")]),
            }),
        };
        let out = sm.apply([entry]).await.unwrap();
        assert_eq!(
            out,
            vec![CommandResult::Batch(vec![
                Ok(Reply::Value(None)),
                Ok(Reply::Bool(true)),
                Ok(Reply::Bool(false)),
            ])]
        );
        let value = sm
            .shared()
            .read(|d| d.store.caches["c"].entries[b"k".as_slice()].value.clone());
        assert_eq!(value, &b"2"[..]);
    }
}
