//! The caches: an in-memory state machine fed by the Raft log, with checksummed snapshots on disk.
//!
//! Architecture invariant: applying an entry is deterministic. It reads no clock, no random source
//! and no network; time enters only as [`Command::at_ms`], chosen by the active.
//!
//! Reads are served from the same memory through [`SharedState`]; the server decides beforehand
//! whether a read may be served (read index for linearizable reads).
//!
//! Snapshot file layout: `FCSNAP01` magic, CRC-32 of the payload (4 bytes, big endian), payload length
//! (8 bytes, big endian), then the postcard payload. The same bytes travel to mirrors that need a
//! snapshot, so a mirror verifies the checksum before installing. A corrupt file is reported with
//! its path and never loaded.

use std::collections::BTreeMap;
use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use ferrocotta::protocol::{ErrorReply, Op, ReadConsistency, Reply, MAX_KEYS_PAGE};
use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use openraft::{EntryPayload, StorageIOError};
use serde::{Deserialize, Serialize};

use crate::types::{
    Command, CommandKind, CommandResult, Entry, LogId, Snapshot, SnapshotMeta, StorageError, StoredMembership,
    TypeConfig,
};

const SNAPSHOT_MAGIC: &[u8; 8] = b"FCSNAP01";
const SNAPSHOT_HEADER_BYTES: usize = 8 + 4 + 8;
const SNAPSHOT_FILE: &str = "snapshot.bin";

/// One cache entry. (Expiry and access times join here.)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheEntry {
    /// The value, opaque bytes.
    pub value: Vec<u8>,
}

/// One named cache.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Cache {
    /// Entries in key order (so `keys` pages are stable).
    pub entries: BTreeMap<Vec<u8>, CacheEntry>,
}

/// Every cache of the stripe.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Caches {
    /// Caches by name; a cache exists once something was written to it.
    pub caches: BTreeMap<String, Cache>,
}

impl Caches {
    /// Applies one client write. Never fails as a whole: a bad request yields an error reply,
    /// identically on every replica.
    pub fn apply_op(&mut self, op: &Op) -> Result<Reply, ErrorReply> {
        match op {
            Op::Put { cache, key, value } => {
                let prev = self.cache_mut(cache).entries.insert(key.clone(), entry(value));
                Ok(Reply::Value(prev.map(|e| e.value)))
            }
            Op::PutAll { cache, entries } => {
                let c = self.cache_mut(cache);
                for (k, v) in entries {
                    c.entries.insert(k.clone(), entry(v));
                }
                Ok(Reply::Done)
            }
            Op::PutIfAbsent { cache, key, value } => {
                let c = self.cache_mut(cache);
                match c.entries.get(key) {
                    Some(e) => Ok(Reply::Value(Some(e.value.clone()))),
                    None => {
                        c.entries.insert(key.clone(), entry(value));
                        Ok(Reply::Value(None))
                    }
                }
            }
            Op::Replace { cache, key, value } => {
                let Some(c) = self.caches.get_mut(cache) else {
                    return Ok(Reply::Value(None));
                };
                match c.entries.get_mut(key) {
                    Some(e) => Ok(Reply::Value(Some(std::mem::replace(&mut e.value, value.clone())))),
                    None => Ok(Reply::Value(None)),
                }
            }
            Op::ReplaceIfEqual {
                cache,
                key,
                expected,
                value,
            } => {
                let Some(e) = self.caches.get_mut(cache).and_then(|c| c.entries.get_mut(key)) else {
                    return Ok(Reply::Bool(false));
                };
                if e.value == *expected {
                    e.value = value.clone();
                    Ok(Reply::Bool(true))
                } else {
                    Ok(Reply::Bool(false))
                }
            }
            Op::Remove { cache, key } => {
                let prev = self.caches.get_mut(cache).and_then(|c| c.entries.remove(key));
                self.drop_if_empty(cache);
                Ok(Reply::Value(prev.map(|e| e.value)))
            }
            Op::RemoveIfEqual { cache, key, expected } => {
                let Some(c) = self.caches.get_mut(cache) else {
                    return Ok(Reply::Bool(false));
                };
                let equal = c.entries.get(key).map(|e| e.value == *expected).unwrap_or(false);
                if equal {
                    c.entries.remove(key);
                    self.drop_if_empty(cache);
                }
                Ok(Reply::Bool(equal))
            }
            Op::Clear { cache } => {
                self.caches.remove(cache);
                Ok(Reply::Done)
            }
            Op::Increment { cache, key, delta } => {
                let c = self.cache_mut(cache);
                let current = match c.entries.get(key) {
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
                c.entries.insert(key.clone(), entry(next.to_string().as_bytes()));
                Ok(Reply::Counter(next))
            }
            read => Err(ErrorReply::Internal(format!("`{}` is not a write", read.kind()))),
        }
    }

    /// Serves a read from what has been applied.
    pub fn read_op(&self, op: &Op) -> Result<Reply, ErrorReply> {
        match op {
            Op::Get { cache, key, .. } => Ok(Reply::Value(self.get(cache, key).map(|e| e.value.clone()))),
            Op::GetAll { cache, keys, .. } => Ok(Reply::Values(
                keys.iter()
                    .map(|k| self.get(cache, k).map(|e| e.value.clone()))
                    .collect(),
            )),
            Op::Contains { cache, key, .. } => Ok(Reply::Bool(self.get(cache, key).is_some())),
            Op::Keys {
                cache,
                prefix,
                after,
                limit,
                ..
            } => {
                let Some(c) = self.caches.get(cache) else {
                    return Ok(Reply::Keys {
                        keys: Vec::new(),
                        more: false,
                    });
                };
                let limit = (*limit).clamp(1, MAX_KEYS_PAGE) as usize;
                let start = match after {
                    Some(a) if a.as_slice() >= prefix.as_slice() => std::ops::Bound::Excluded(a.clone()),
                    _ => std::ops::Bound::Included(prefix.clone()),
                };
                let mut keys = Vec::with_capacity(limit.min(1024));
                let mut more = false;
                for (k, _) in c.entries.range((start, std::ops::Bound::Unbounded)) {
                    if !k.starts_with(prefix) {
                        break;
                    }
                    if keys.len() == limit {
                        more = true;
                        break;
                    }
                    keys.push(k.clone());
                }
                Ok(Reply::Keys { keys, more })
            }
            Op::Size { cache, .. } => Ok(Reply::Size(
                self.caches.get(cache).map(|c| c.entries.len() as u64).unwrap_or(0),
            )),
            write => Err(ErrorReply::Internal(format!("`{}` is not a read", write.kind()))),
        }
    }

    fn get(&self, cache: &str, key: &[u8]) -> Option<&CacheEntry> {
        self.caches.get(cache).and_then(|c| c.entries.get(key))
    }

    fn cache_mut(&mut self, name: &str) -> &mut Cache {
        self.caches.entry(name.to_string()).or_default()
    }

    fn drop_if_empty(&mut self, name: &str) {
        if self.caches.get(name).map(|c| c.entries.is_empty()).unwrap_or(false) {
            self.caches.remove(name);
        }
    }

    /// Entry counts by cache, for status.
    pub fn entry_counts(&self) -> BTreeMap<String, u64> {
        self.caches
            .iter()
            .map(|(n, c)| (n.clone(), c.entries.len() as u64))
            .collect()
    }
}

fn entry(value: &[u8]) -> CacheEntry {
    CacheEntry { value: value.to_vec() }
}

/// Everything the state machine holds, behind one lock.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct StateData {
    /// Last log id applied.
    pub last_applied: Option<LogId>,
    /// Last membership applied.
    pub last_membership: StoredMembership,
    /// The caches.
    pub caches: Caches,
}

/// The state shared between the Raft state machine (writer) and the request path (readers).
///
/// A `std::sync::RwLock`, not a Tokio one: no `.await` happens while it is held, and reads are
/// short, so blocking briefly is cheaper than an async lock's bookkeeping.
#[derive(Debug, Default)]
pub struct SharedState {
    data: RwLock<StateData>,
}

impl SharedState {
    /// Runs `f` with read access.
    pub fn read<T>(&self, f: impl FnOnce(&StateData) -> T) -> T {
        f(&self.data.read().expect("state lock poisoned"))
    }

    /// Serves a read operation.
    pub fn serve_read(&self, op: &Op) -> Result<Reply, ErrorReply> {
        self.read(|d| d.caches.read_op(op))
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct SnapshotPayload {
    snapshot_id: String,
    last_applied: Option<LogId>,
    last_membership: StoredMembership,
    caches: Caches,
}

/// Encodes a snapshot file.
fn encode_snapshot(payload: &SnapshotPayload) -> Vec<u8> {
    let body = postcard::to_allocvec(payload).expect("snapshots always encode");
    let mut out = Vec::with_capacity(SNAPSHOT_HEADER_BYTES + body.len());
    out.extend_from_slice(SNAPSHOT_MAGIC);
    out.extend_from_slice(&crc32fast::hash(&body).to_be_bytes());
    out.extend_from_slice(&(body.len() as u64).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// Decodes and verifies a snapshot file.
fn decode_snapshot(bytes: &[u8]) -> Result<SnapshotPayload, String> {
    if bytes.len() < SNAPSHOT_HEADER_BYTES || &bytes[..8] != SNAPSHOT_MAGIC {
        return Err("not a ferrocotta snapshot (bad magic or truncated header)".into());
    }
    let crc = u32::from_be_bytes(bytes[8..12].try_into().expect("4 bytes"));
    let len = u64::from_be_bytes(bytes[12..20].try_into().expect("8 bytes")) as usize;
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

/// Writes a file atomically: temporary file, fsync, rename, fsync of the directory.
fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, dir.join(name))?;
    std::fs::File::open(dir)?.sync_all()
}

/// The Raft state machine of a stripe member.
pub struct StateMachineStore {
    /// The data, shared with the request path.
    shared: Arc<SharedState>,
    /// Directory of the snapshot file.
    snapshot_dir: PathBuf,
    /// Snapshots built so far, to give each a unique id.
    snapshots_built: u64,
}

impl StateMachineStore {
    /// Opens the state machine, loading the snapshot in `snapshot_dir` if there is one. A corrupt
    /// snapshot is an error naming the file: the server must not start from it.
    pub fn open(snapshot_dir: &Path) -> Result<StateMachineStore, String> {
        std::fs::create_dir_all(snapshot_dir).map_err(|e| format!("cannot create {}: {e}", snapshot_dir.display()))?;
        let shared = Arc::new(SharedState::default());
        let path = snapshot_dir.join(SNAPSHOT_FILE);
        if path.exists() {
            let bytes = std::fs::read(&path).map_err(|e| format!("cannot read snapshot {}: {e}", path.display()))?;
            let payload = decode_snapshot(&bytes).map_err(|e| format!("snapshot {}: {e}", path.display()))?;
            let mut d = shared.data.write().expect("state lock poisoned");
            d.last_applied = payload.last_applied;
            d.last_membership = payload.last_membership;
            d.caches = payload.caches;
            tracing::info!(
                event = "state_machine.snapshot_loaded",
                path = %path.display(),
                last_applied = ?d.last_applied,
                caches = d.caches.caches.len()
            );
        }
        Ok(StateMachineStore {
            shared,
            snapshot_dir: snapshot_dir.to_path_buf(),
            snapshots_built: 0,
        })
    }

    /// The shared state, for the request path.
    pub fn shared(&self) -> Arc<SharedState> {
        self.shared.clone()
    }

    fn read_snapshot_file(&self) -> Result<Option<(SnapshotPayload, Vec<u8>)>, StorageError> {
        let path = self.snapshot_dir.join(SNAPSHOT_FILE);
        if !path.exists() {
            return Ok(None);
        }
        let bytes = std::fs::read(&path).map_err(|e| StorageIOError::read_snapshot(None, &e))?;
        let payload = decode_snapshot(&bytes).map_err(|e| {
            StorageIOError::read_snapshot(None, &std::io::Error::new(std::io::ErrorKind::InvalidData, e))
        })?;
        Ok(Some((payload, bytes)))
    }
}

/// Builds snapshots from the shared state.
pub struct SnapshotBuilder {
    shared: Arc<SharedState>,
    snapshot_dir: PathBuf,
    seq: u64,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let shared = self.shared.clone();
        let dir = self.snapshot_dir.clone();
        let seq = self.seq;
        // Encoding and fsync are blocking work: keep them off the runtime's workers.
        let built = tokio::task::spawn_blocking(move || -> Result<(SnapshotMeta, Vec<u8>), StorageError> {
            let (meta, bytes) = shared.read(|d| {
                let snapshot_id = match &d.last_applied {
                    Some(l) => format!("{}-{}-{seq}", l.leader_id.term, l.index),
                    None => format!("none-{seq}"),
                };
                let payload = SnapshotPayload {
                    snapshot_id: snapshot_id.clone(),
                    last_applied: d.last_applied,
                    last_membership: d.last_membership.clone(),
                    caches: d.caches.clone(),
                };
                let meta = SnapshotMeta {
                    last_log_id: d.last_applied,
                    last_membership: d.last_membership.clone(),
                    snapshot_id,
                };
                (meta, payload)
            });
            let bytes = encode_snapshot(&bytes);
            write_atomically(&dir, SNAPSHOT_FILE, &bytes).map_err(|e| StorageIOError::write_snapshot(None, &e))?;
            Ok((meta, bytes))
        })
        .await
        .map_err(|e| StorageIOError::write_snapshot(None, &e))??;
        tracing::info!(event = "state_machine.snapshot_built", last_log_id = ?built.0.last_log_id, bytes = built.1.len());
        Ok(Snapshot {
            meta: built.0,
            snapshot: Box::new(Cursor::new(built.1)),
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
        let mut d = self.shared.data.write().expect("state lock poisoned");
        for entry in entries {
            d.last_applied = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => out.push(CommandResult(Ok(Reply::Done))),
                EntryPayload::Normal(Command { kind, .. }) => match kind {
                    CommandKind::Client(op) => out.push(CommandResult(d.caches.apply_op(&op))),
                },
                EntryPayload::Membership(m) => {
                    d.last_membership = StoredMembership::new(Some(entry.log_id), m);
                    out.push(CommandResult(Ok(Reply::Done)));
                }
            }
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        self.snapshots_built += 1;
        SnapshotBuilder {
            shared: self.shared.clone(),
            snapshot_dir: self.snapshot_dir.clone(),
            seq: self.snapshots_built,
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let bytes = snapshot.into_inner();
        let payload = decode_snapshot(&bytes).map_err(|e| {
            StorageIOError::read_snapshot(
                Some(meta.signature()),
                &std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            )
        })?;
        let dir = self.snapshot_dir.clone();
        let to_write = bytes.clone();
        tokio::task::spawn_blocking(move || write_atomically(&dir, SNAPSHOT_FILE, &to_write))
            .await
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        let mut d = self.shared.data.write().expect("state lock poisoned");
        d.last_applied = meta.last_log_id;
        d.last_membership = meta.last_membership.clone();
        d.caches = payload.caches;
        tracing::info!(event = "state_machine.snapshot_installed", last_log_id = ?meta.last_log_id, bytes = bytes.len());
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        let Some((payload, bytes)) = self.read_snapshot_file()? else {
            return Ok(None);
        };
        Ok(Some(Snapshot {
            meta: SnapshotMeta {
                last_log_id: payload.last_applied,
                last_membership: payload.last_membership,
                snapshot_id: payload.snapshot_id,
            },
            snapshot: Box::new(Cursor::new(bytes)),
        }))
    }
}

/// Whether a read must go through the read index.
pub fn is_linearizable(op: &Op) -> bool {
    match op {
        Op::Get { read, .. }
        | Op::GetAll { read, .. }
        | Op::Contains { read, .. }
        | Op::Keys { read, .. }
        | Op::Size { read, .. } => *read == ReadConsistency::Linearizable,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(c: &str, k: &str, v: &str) -> Op {
        Op::Put {
            cache: c.into(),
            key: k.into(),
            value: v.into(),
        }
    }

    #[test]
    fn operations_behave_like_a_map() {
        let mut s = Caches::default();
        assert_eq!(s.apply_op(&put("c", "a", "1")), Ok(Reply::Value(None)));
        assert_eq!(s.apply_op(&put("c", "a", "2")), Ok(Reply::Value(Some(b"1".to_vec()))));
        let cas = |e: &str, v: &str| Op::ReplaceIfEqual {
            cache: "c".into(),
            key: b"a".to_vec(),
            expected: e.into(),
            value: v.into(),
        };
        assert_eq!(s.apply_op(&cas("1", "three")), Ok(Reply::Bool(false)));
        assert_eq!(s.apply_op(&cas("2", "three")), Ok(Reply::Bool(true)));
        let inc = Op::Increment {
            cache: "c".into(),
            key: b"n".to_vec(),
            delta: 5,
        };
        assert_eq!(s.apply_op(&inc), Ok(Reply::Counter(5)));
        assert_eq!(s.apply_op(&inc), Ok(Reply::Counter(10)));
        let inc_a = Op::Increment {
            cache: "c".into(),
            key: b"a".to_vec(),
            delta: 1,
        };
        assert_eq!(s.apply_op(&inc_a), Err(ErrorReply::NotACounter));
        let keys = Op::Keys {
            cache: "c".into(),
            prefix: Vec::new(),
            after: None,
            limit: 1,
            read: ReadConsistency::Linearizable,
        };
        assert_eq!(
            s.read_op(&keys),
            Ok(Reply::Keys {
                keys: vec![b"a".to_vec()],
                more: true
            })
        );
    }

    #[test]
    fn corrupt_snapshots_are_refused() {
        let payload = SnapshotPayload {
            snapshot_id: "x".into(),
            last_applied: None,
            last_membership: StoredMembership::default(),
            caches: Caches::default(),
        };
        let mut bytes = encode_snapshot(&payload);
        assert!(decode_snapshot(&bytes).is_ok());
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        assert!(decode_snapshot(&bytes).unwrap_err().contains("checksum"));
    }
}
