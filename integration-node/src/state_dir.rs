//! The node's state folder (`--state-dir`, `state_dir` in node.toml): its instance identity, kept
//! across restarts, and a lock held for the life of the process.
//!
//! The lock is what lets a restarted node take over the member entry its dead predecessor left
//! behind (the entry stays until that process's array session expires): holding the folder's lock
//! proves that no other live process on this machine uses the folder, and the entry carrying the
//! folder's identity proves it was written from here. Without a state folder a node has a new
//! identity per process and must wait for a stale entry of its name to expire.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use nix::fcntl::{Flock, FlockArg};

/// Name of the lock file in the folder.
const LOCK_FILE: &str = "node.lock";
/// Name of the file holding the instance identity.
const INSTANCE_FILE: &str = "instance";
/// Length of a new identity, in random bytes (written as hex).
const INSTANCE_BYTES: usize = 16;

/// An open, locked state folder.
#[derive(Debug)]
pub struct StateDir {
    path: PathBuf,
    instance: String,
    /// Held until the process ends (the kernel drops it then, also on kill -9).
    _lock: Flock<File>,
}

impl StateDir {
    /// Opens (creating it 0700 if absent) and locks the folder; reads its identity or makes one.
    /// Refused while another live process holds the folder.
    pub fn open(path: &Path) -> anyhow::Result<StateDir> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .with_context(|| format!("state folder {}: cannot create it", path.display()))?;
        let lock_path = path.join(LOCK_FILE);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("state folder {}: cannot open {LOCK_FILE}", path.display()))?;
        let lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => bail!(
                "state folder {} is in use by another running integration-node; each node needs its own",
                path.display()
            ),
            Err((_, e)) => bail!("state folder {}: cannot lock {LOCK_FILE}: {e}", path.display()),
        };
        let instance_path = path.join(INSTANCE_FILE);
        let instance = match std::fs::read_to_string(&instance_path) {
            Ok(text) => {
                let id = text.trim().to_string();
                if id.len() != INSTANCE_BYTES * 2 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
                    bail!(
                        "state folder {}: `{INSTANCE_FILE}` does not hold an identity ({} hex digits); remove the file to make a new one",
                        path.display(),
                        INSTANCE_BYTES * 2
                    );
                }
                id
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let bytes: [u8; INSTANCE_BYTES] = rand::random();
                let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
                let tmp = path.join(format!("{INSTANCE_FILE}.tmp"));
                let mut f = File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
                f.write_all(format!("{id}\n").as_bytes())?;
                f.sync_all()?;
                std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
                std::fs::rename(&tmp, &instance_path)
                    .with_context(|| format!("cannot write {}", instance_path.display()))?;
                id
            }
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", instance_path.display())),
        };
        Ok(StateDir {
            path: path.to_path_buf(),
            instance,
            _lock: lock,
        })
    }

    /// The folder's identity, kept across restarts of the node.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_identity_survives_a_reopen_and_a_second_holder_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let first = StateDir::open(&dir.path().join("n1")).unwrap();
        let id = first.instance().to_string();
        assert_eq!(id.len(), INSTANCE_BYTES * 2);
        let err = StateDir::open(&dir.path().join("n1")).unwrap_err();
        assert!(err.to_string().contains("in use"), "{err}");
        drop(first);
        let again = StateDir::open(&dir.path().join("n1")).unwrap();
        assert_eq!(again.instance(), id, "the identity is kept");
        let other = StateDir::open(&dir.path().join("n2")).unwrap();
        assert_ne!(other.instance(), id);
    }

    #[test]
    fn a_damaged_identity_is_refused_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path()).unwrap();
        std::fs::write(dir.path().join(INSTANCE_FILE), "not hex\n").unwrap();
        let err = StateDir::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains("identity"), "{err}");
    }
}
