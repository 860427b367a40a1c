//! The mark: a small file beside the log database recording what the log is known to hold.
//!
//! Why it exists: sled reads its own files back after a crash by replaying its log up to the
//! first record whose checksum fails, which it takes for a torn write, and silently drops the
//! rest. So bytes damaged in the middle of its file, or a truncated file, make sled open a log
//! that ends early: acknowledged entries gone, no error. A probe did exactly that to two of three
//! servers and the stripe served reads missing 103 of 1000 acknowledged keys. Checksums inside
//! the entries cannot see entries that are simply not there.
//!
//! The mark is written after every fsync of the log and before any append it covers is reported
//! durable: it holds the last log id, the vote and the purge point as they were when that fsync
//! started. At start the log must hold at least what the mark says (a crash between the two
//! writes leaves the log ahead of the mark, never behind); if it does not, the log was damaged and
//! the server refuses to start. It also records the store's format version and this server's
//! standing in its stripe (a member, or joining after its data was lost).
//!
//! Layout: two slots of [`SLOT_BYTES`] at offsets 0 and [`SLOT_BYTES`], written alternately, each
//! `FCMARK01`, CRC-32 of the body, body length, postcard body with a sequence number. A torn
//! write spoils at most the slot being written; the valid slot with the highest sequence wins.
//! Each write is one `pwrite` of one slot and an `fdatasync`.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::types::{LogId, Vote};

const MAGIC: &[u8; 8] = b"FCMARK01";
/// Bytes of one slot (a page, so the two slots never share a disk sector).
pub const SLOT_BYTES: usize = 4096;
const HEADER_BYTES: usize = 8 + 4 + 4;

/// This server's standing in its stripe.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Standing {
    /// A member with its state (or a pristine server that has not joined anything yet).
    #[default]
    Member,
    /// Its data was lost (wiped, or set aside by `cache-array repair --wipe`) while its stripe
    /// exists: it waits to be caught up by the active and neither votes nor campaigns until then,
    /// because a vote it cast before the loss may be forgotten. `may_vote`: an operator said
    /// otherwise (`repair --allow-vote`), knowing that whatever only this server held is gone.
    Joining {
        /// Whether it may vote while it catches up.
        may_vote: bool,
    },
}

/// What the log is known to hold.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Mark {
    /// Raised at every write; the slot with the higher one is the current mark.
    pub seq: u64,
    /// Format version of the log store.
    pub format: u32,
    /// The vote as last made durable.
    pub vote: Option<Vote>,
    /// Every entry up to this one was durable in the log when the mark was written.
    pub last_log_id: Option<LogId>,
    /// The durable purge point.
    pub purged: Option<LogId>,
    /// This server's standing in its stripe.
    pub standing: Standing,
}

/// The mark file, open.
#[derive(Debug)]
pub struct MarkFile {
    path: PathBuf,
    file: File,
    /// Sequence number of the last mark written.
    seq: u64,
}

/// Why a mark file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum MarkError {
    /// Reading or writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Neither slot holds a valid mark.
    #[error("{0}: neither copy of the mark is readable (damaged file)")]
    Unreadable(PathBuf),
}

pub(crate) fn encode_slot(mark: &Mark) -> Vec<u8> {
    let body = postcard::to_allocvec(mark).expect("marks always encode");
    assert!(HEADER_BYTES + body.len() <= SLOT_BYTES, "a mark fits its slot");
    let mut slot = Vec::with_capacity(SLOT_BYTES);
    slot.extend_from_slice(MAGIC);
    slot.extend_from_slice(&crc32fast::hash(&body).to_be_bytes());
    slot.extend_from_slice(&(body.len() as u32).to_be_bytes());
    slot.extend_from_slice(&body);
    slot.resize(SLOT_BYTES, 0);
    slot
}

/// Decodes one slot; `None` when it is not a valid mark (blank, torn or damaged).
pub fn decode_slot(slot: &[u8]) -> Option<Mark> {
    if slot.len() < HEADER_BYTES || &slot[..8] != MAGIC {
        return None;
    }
    let crc = u32::from_be_bytes(slot[8..12].try_into().ok()?);
    let len = u32::from_be_bytes(slot[12..16].try_into().ok()?) as usize;
    let body = slot.get(HEADER_BYTES..HEADER_BYTES.checked_add(len)?)?;
    if crc32fast::hash(body) != crc {
        return None;
    }
    postcard::from_bytes(body).ok()
}

impl MarkFile {
    /// Opens the mark at `path`: `Ok(None)` when there is no such file.
    pub fn open(path: &Path) -> Result<Option<(MarkFile, Mark)>, MarkError> {
        let io_err = |source| MarkError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = match std::fs::OpenOptions::new().read(true).write(true).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(e)),
        };
        let mut buf = vec![0u8; 2 * SLOT_BYTES];
        let mut read = 0;
        while read < buf.len() {
            match file.read_at(&mut buf[read..], read as u64).map_err(io_err)? {
                0 => break,
                n => read += n,
            }
        }
        let best = [0, SLOT_BYTES]
            .iter()
            .filter_map(|&at| decode_slot(&buf[at..(at + SLOT_BYTES).min(read.max(at))]))
            .max_by_key(|m| m.seq);
        let Some(mark) = best else {
            return Err(MarkError::Unreadable(path.to_path_buf()));
        };
        let seq = mark.seq;
        Ok(Some((
            MarkFile {
                path: path.to_path_buf(),
                file,
                seq,
            },
            mark,
        )))
    }

    /// Creates the mark file with a first mark (fsynced, and its folder too).
    pub fn create(path: &Path, mark: &Mark) -> Result<MarkFile, MarkError> {
        let io_err = |source| MarkError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(io_err)?;
        file.set_len(2 * SLOT_BYTES as u64).map_err(io_err)?;
        let mut f = MarkFile {
            path: path.to_path_buf(),
            file,
            seq: 0,
        };
        f.write(mark.clone())?;
        if let Some(dir) = path.parent() {
            File::open(dir).and_then(|d| d.sync_all()).map_err(io_err)?;
        }
        Ok(f)
    }

    /// Writes `mark` as the next mark and makes it durable.
    pub fn write(&mut self, mut mark: Mark) -> Result<(), MarkError> {
        self.seq += 1;
        mark.seq = self.seq;
        let at = (self.seq % 2) * SLOT_BYTES as u64;
        self.file
            .write_all_at(&encode_slot(&mark), at)
            .and_then(|_| self.file.sync_data())
            .map_err(|source| MarkError::Io {
                path: self.path.clone(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark(index: u64) -> Mark {
        Mark {
            format: 1,
            last_log_id: Some(openraft::LogId::new(openraft::CommittedLeaderId::new(1, 1), index)),
            ..Mark::default()
        }
    }

    #[test]
    fn the_newest_valid_slot_wins_and_a_torn_slot_leaves_the_other() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft.mark");
        assert!(MarkFile::open(&path).unwrap().is_none());
        let mut f = MarkFile::create(&path, &mark(1)).unwrap();
        f.write(mark(2)).unwrap();
        f.write(mark(3)).unwrap();
        let (_, read) = MarkFile::open(&path).unwrap().unwrap();
        assert_eq!(read.last_log_id.unwrap().index, 3);
        // Tear the newest slot (seq 3 is in slot 1): the previous one is read.
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(b"garbage!", SLOT_BYTES as u64 + 20).unwrap();
        let (_, read) = MarkFile::open(&path).unwrap().unwrap();
        assert_eq!(read.last_log_id.unwrap().index, 2);
        // Both torn: unreadable, never a default.
        file.write_all_at(b"garbage!", 20).unwrap();
        assert!(matches!(MarkFile::open(&path), Err(MarkError::Unreadable(_))));
    }
}
