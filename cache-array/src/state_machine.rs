//! The caches: an in-memory state machine fed by the Raft log, with checksummed snapshots on disk.
//!
//! Architecture invariant: applying an entry is deterministic. It reads no clock, no random source
//! and no network; time enters only as [`Command::at_ms`], chosen by the active.
//!
//! Reads are served from the same memory through [`SharedState`]; the server decides beforehand
//! whether a read may be served (read index for linearizable reads).
//!
//! Snapshot files (layout, checksums, atomic replacement) are [`crate::snapshot_file`]'s.
//!
//! A snapshot is built from a clone of the store taken under the read lock (values are shared
//! `Bytes`, so the clone copies keys and map nodes, not values) and streamed to the file; it is
//! sent and received as that file. No snapshot is ever held whole in memory, except while it is
//! loaded at start or installed from the active.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom, Write};
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
use crate::snapshot_file::{
    decode_snapshot, encode_snapshot_to, load_snapshot, read_snapshot_meta, replace_snapshot_file, LoadError,
    SnapshotHead, SnapshotPayload, BUILDING_FILE, INSTALLING_FILE, RECEIVING_FILE, SNAPSHOT_FILE,
};
use crate::store::{ApplyContext, Grant, ReadError, ReplyRoom, Store};
use crate::types::{Entry, LogId, Snapshot, SnapshotMeta, StorageError, StoredMembership, TypeConfig};

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
    /// Told when the stored roster may have changed (a `SetRoster` entry applied, a snapshot
    /// installed): `crate::roster::follow` waits on it. One waiter, so a notification given
    /// while it is busy is kept for its next wait.
    roster_changed: tokio::sync::Notify,
}

impl SharedState {
    /// Waits until the stored roster may have changed since the last call returned.
    pub async fn roster_changed(&self) {
        self.roster_changed.notified().await
    }

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
            return Err(ErrorReply::Busy(format!(
                "{LOCK_WAITERS_MAX} lock waits on this server already (LOCK_WAITERS_MAX)"
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
    pub fn open(
        snapshot_dir: &Path,
        configured: BTreeMap<String, CacheSettings>,
    ) -> Result<StateMachineStore, LoadError> {
        std::fs::create_dir_all(snapshot_dir).map_err(|source| LoadError::Io {
            path: snapshot_dir.to_path_buf(),
            source,
        })?;
        let shared = Arc::new(SharedState::default());
        let path = snapshot_dir.join(SNAPSHOT_FILE);
        if path.exists() {
            let payload = load_snapshot(&path)?;
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
        let mut roster_changed = false;
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
                        roster_changed |= matches!(kind, CommandKind::SetRoster { .. });
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
        if roster_changed {
            self.shared.roster_changed.notify_one();
        }
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
        drop(d);
        self.shared.roster_changed.notify_one();
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
        CommandKind::SetRoster { expected, roster } => CommandResult::Client(
            crate::roster::Roster::apply(store, expected, &roster, ctx.now_ms)
                .map(|()| Reply::Done)
                .map_err(ErrorReply::Invalid),
        ),
        CommandKind::ImportSlots(import) => {
            CommandResult::Client(crate::slot_moves::apply_import(store, &import, ctx).map(|()| Reply::Done))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::Change;

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
