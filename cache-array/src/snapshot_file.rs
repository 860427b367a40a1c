//! Snapshot files: the layout, checksums, and how a file is replaced atomically and only by a newer
//! one.
//!
//! Snapshot file layout: `FCSNAP01` magic, CRC-32 of the payload (4 bytes, big endian), payload length
//! (8 bytes, big endian), then the postcard payload, whose first fields are the snapshot's meta. The
//! same bytes travel to mirrors that need a snapshot, so a mirror verifies the checksum before
//! installing. A corrupt file is reported with its path and never loaded.
//!
//! The payload is the store as the state machine holds it ([`crate::store::Store`]) behind the
//! snapshot's meta; `format_fixture` keeps a file of format 1 readable.

use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::store::Store;
use crate::types::{LogId, SnapshotMeta, StoredMembership};

const SNAPSHOT_MAGIC: &[u8; 8] = b"FCSNAP01";
const SNAPSHOT_HEADER_BYTES: usize = 8 + 4 + 8;
pub(crate) const SNAPSHOT_FILE: &str = "snapshot.bin";
/// Where a snapshot sent by the active is received before it is verified and installed.
pub(crate) const RECEIVING_FILE: &str = "snapshot.bin.receiving";
/// Where this server writes a snapshot it builds, before it replaces `SNAPSHOT_FILE`.
pub(crate) const BUILDING_FILE: &str = "snapshot.bin.building";
/// Where a verified snapshot from the active is written before it replaces `SNAPSHOT_FILE`.
pub(crate) const INSTALLING_FILE: &str = "snapshot.bin.installing";
/// Bytes of payload read to find a snapshot's meta (its first fields) without reading it all.
const SNAPSHOT_META_PREFIX_MAX: usize = 1024 * 1024;

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
    pub(crate) fn meta(&self) -> SnapshotMeta {
        SnapshotMeta {
            last_log_id: self.last_applied,
            last_membership: self.last_membership.clone(),
            snapshot_id: self.snapshot_id.clone(),
        }
    }
}

/// Why the bytes of a snapshot file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Not a snapshot of ours, or cut short before the end of the header.
    #[error("not a ferrocotta snapshot (bad magic or truncated header)")]
    NotASnapshot,
    /// The file is shorter or longer than its header says.
    #[error("length mismatch: header says {header} bytes, file has {file}")]
    Length { header: u64, file: usize },
    /// The payload's bytes changed since they were written.
    #[error("checksum mismatch: the snapshot is corrupt")]
    Checksum,
    /// The checksum holds but the payload is not a snapshot this build reads.
    #[error("undecodable snapshot: {0}")]
    Undecodable(#[from] postcard::Error),
}

/// Why the snapshot file of a folder could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file or its folder could not be read or made (permissions, disk).
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// The file is damaged: the server must not start from it.
    #[error("snapshot {path}: {source}")]
    Damaged { path: PathBuf, source: SnapshotError },
}

/// Checks a file's header; returns the payload's CRC-32 and length.
fn parse_header(header: &[u8]) -> Result<(u32, u64), SnapshotError> {
    if header.len() < SNAPSHOT_HEADER_BYTES || &header[..8] != SNAPSHOT_MAGIC {
        return Err(SnapshotError::NotASnapshot);
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
pub(crate) fn replace_snapshot_file(
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
pub(crate) fn read_snapshot_meta(f: &mut std::fs::File, path: &Path) -> std::io::Result<SnapshotMeta> {
    let invalid =
        |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {what}", path.display()));
    let mut header = [0u8; SNAPSHOT_HEADER_BYTES];
    f.read_exact(&mut header)?;
    let (_, len) = parse_header(&header).map_err(|e| invalid(e.to_string()))?;
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
pub(crate) fn decode_snapshot(bytes: &[u8]) -> Result<SnapshotPayload, SnapshotError> {
    let (crc, len) = parse_header(bytes)?;
    let body = &bytes[SNAPSHOT_HEADER_BYTES..];
    if body.len() as u64 != len {
        return Err(SnapshotError::Length {
            header: len,
            file: body.len(),
        });
    }
    if crc32fast::hash(body) != crc {
        return Err(SnapshotError::Checksum);
    }
    // The store's last fields came later: a snapshot of an earlier build ends before them.
    postcard::from_bytes(body).or_else(|e| {
        postcard::from_bytes::<SnapshotPayloadV1>(body)
            .map(SnapshotPayloadV1::into_current)
            .map_err(|_| e.into())
    })
}

/// A snapshot written before the store had [`Store::session_clients`] (format 1).
#[derive(Deserialize)]
struct SnapshotPayloadV1 {
    head: SnapshotHead,
    caches: std::collections::BTreeMap<String, crate::store::Cache>,
    sessions: std::collections::BTreeMap<u64, crate::store::Session>,
    locks: std::collections::BTreeMap<(String, Vec<u8>), crate::store::LockState>,
}

impl SnapshotPayloadV1 {
    fn into_current(self) -> SnapshotPayload {
        SnapshotPayload {
            head: self.head,
            store: Store {
                caches: self.caches,
                sessions: self.sessions,
                locks: self.locks,
                ..Store::default()
            },
        }
    }
}

/// Loads the snapshot file at `path`, verified.
pub(crate) fn load_snapshot(path: &Path) -> Result<SnapshotPayload, LoadError> {
    let bytes = std::fs::read(path).map_err(|source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    decode_snapshot(&bytes).map_err(|source| LoadError::Damaged {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(matches!(decode_snapshot(&bytes), Err(SnapshotError::Checksum)));
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
}
