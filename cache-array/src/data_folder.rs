//! A server's data folder: opening it verified (the log against its mark, the snapshot against its
//! checksum and against the log's purge point), and `cache-array repair`, which checks a folder,
//! sets a damaged one aside so the server rejoins its stripe, or lets a joining server vote.
//!
//! Nothing here ever "fixes" data in place: a damaged folder is never served, and the way back is
//! to be caught up by the peers that hold the stripe's data.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use ferrocotta::config::ClusterConfig;
use ferrocotta::protocol::CacheSettings;

use crate::log_store::{Damage, LogStore, OpenedLog, StoreDamage};
use crate::mark::Standing;
use crate::snapshot_file::LoadError;
use crate::state_machine::StateMachineStore;

/// The snapshots' folder inside a data folder.
pub const SNAPSHOT_DIR: &str = "snapshots";

/// A data folder, opened and verified.
pub struct OpenedFolder {
    /// The log store.
    pub log: LogStore,
    /// What the log holds.
    pub opened: OpenedLog,
    /// The state machine, loaded from the snapshot.
    pub state_machine: StateMachineStore,
    /// Where the snapshots are.
    pub snapshot_dir: PathBuf,
}

/// Why a folder could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum FolderError {
    /// It is damaged: the server must not use it.
    #[error(transparent)]
    Damaged(Box<StoreDamage>),
    /// Anything else (in use by another process, permissions).
    #[error("{0:#}")]
    Other(anyhow::Error),
}

/// Opens and verifies a data folder (creating it when absent).
pub fn open(data_dir: &Path, configured: BTreeMap<String, CacheSettings>) -> Result<OpenedFolder, FolderError> {
    let (log, opened) = match LogStore::open(data_dir) {
        Ok(ok) => ok,
        Err(e) => {
            return Err(match e.downcast::<StoreDamage>() {
                Ok(d) => FolderError::Damaged(Box::new(d)),
                Err(e) => FolderError::Other(e),
            })
        }
    };
    let snapshot_dir = data_dir.join(SNAPSHOT_DIR);
    let damage = |what: Damage| {
        FolderError::Damaged(Box::new(StoreDamage {
            dir: data_dir.to_path_buf(),
            what,
        }))
    };
    let state_machine = StateMachineStore::open(&snapshot_dir, configured).map_err(|e| match e {
        LoadError::Damaged { .. } => damage(Damage::Snapshot(e)),
        LoadError::Io { .. } => FolderError::Other(e.into()),
    })?;
    let snapshot_last = state_machine.shared().read(|d| d.last_applied);
    if opened.purged > snapshot_last {
        return Err(damage(Damage::SnapshotBehind {
            purged: opened.purged.map(|p| p.index).unwrap_or(0),
            snapshot: snapshot_last.map(|l| l.index),
            dir: snapshot_dir.clone(),
        }));
    }
    Ok(OpenedFolder {
        log,
        opened,
        state_machine,
        snapshot_dir,
    })
}

/// The advice given with a damaged data folder.
pub fn repair_advice(config_path: &Path, name: &str) -> String {
    let c = config_path.display();
    format!(
        "this server refuses to start so that it never votes or serves with damaged data. \
         Check the folder with `cache-array repair --config {c} --name {name}`; to let the server rejoin its \
         stripe and be caught up by its peers, set the damaged folder aside with \
         `cache-array repair --config {c} --name {name} --wipe` (docs/security.md)"
    )
}

/// What `cache-array repair` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepairAction {
    /// Verify the folder and report (exit 0 healthy, 1 damaged).
    Check,
    /// Set the folder aside (renamed, kept) and start an empty one that joins its stripe.
    Wipe,
    /// Let a joining server vote before it is caught up.
    AllowVote,
}

/// Runs `cache-array repair` for the server `name`; returns the exit code.
pub async fn repair(config_path: &Path, name: &str, action: RepairAction) -> anyhow::Result<u8> {
    let config = ClusterConfig::load(config_path)?;
    let (_, me) = config
        .find_server(name)
        .with_context(|| format!("--name {name}: no server of that name in {}", config_path.display()))?;
    let data_dir = ClusterConfig::resolve_path(config_path, &me.data_dir);
    let configured = config.caches.iter().map(|(n, c)| (n.clone(), c.settings())).collect();
    match action {
        RepairAction::Check => match open(&data_dir, configured) {
            Ok(f) => {
                let o = &f.opened;
                println!(
                    "{name}: {} is healthy: {} entries verified, last log id {}, purged up to {}, vote {}, standing {:?}",
                    data_dir.display(),
                    o.entries,
                    o.last_log_id.map(|l| l.to_string()).unwrap_or_else(|| "none".into()),
                    o.purged.map(|l| l.index.to_string()).unwrap_or_else(|| "nothing".into()),
                    o.vote.map(|v| v.to_string()).unwrap_or_else(|| "none".into()),
                    o.standing
                );
                Ok(0)
            }
            Err(FolderError::Damaged(d)) => {
                println!("{name}: {d}");
                println!(
                    "to let {name} rejoin its stripe and be caught up by its peers: cache-array repair --config {} --name {name} --wipe",
                    config_path.display()
                );
                Ok(1)
            }
            Err(FolderError::Other(e)) => Err(e),
        },
        RepairAction::Wipe => {
            let aside = set_aside(&data_dir)?;
            let f = open(&data_dir, configured).map_err(|e| anyhow::anyhow!("{e}"))?;
            f.log
                .set_standing(Standing::Joining { may_vote: false })
                .await
                .map_err(|e| anyhow::anyhow!("cannot record the standing: {e}"))?;
            if let Some(aside) = aside {
                println!(
                    "{name}: the data folder was set aside as {} (kept, delete it when you no longer need it)",
                    aside.display()
                );
            }
            println!(
                "{name}: starts empty and joins its stripe: the active catches it up; it neither votes nor campaigns until then"
            );
            Ok(0)
        }
        RepairAction::AllowVote => {
            let f = open(&data_dir, configured).map_err(|e| anyhow::anyhow!("{e}"))?;
            match f.log.standing() {
                Standing::Member => {
                    println!("{name}: a member of its stripe already; nothing to do");
                    Ok(0)
                }
                Standing::Joining { .. } => {
                    f.log
                        .set_standing(Standing::Joining { may_vote: true })
                        .await
                        .map_err(|e| anyhow::anyhow!("cannot record the standing: {e}"))?;
                    println!(
                        "{name}: may now vote while it joins. Only do this when most of the stripe lost its data and the \
                         servers that kept theirs must be elected: entries that only the lost folders held are gone."
                    );
                    Ok(0)
                }
            }
        }
    }
}

/// Renames a data folder to `<folder>.damaged-<unix seconds>`; `None` when there was none.
fn set_aside(data_dir: &Path) -> anyhow::Result<Option<PathBuf>> {
    if !data_dir.exists() {
        return Ok(None);
    }
    // A folder in use by a running server must not be moved under it.
    if let Err(e) = LogStore::open(data_dir) {
        if e.downcast_ref::<StoreDamage>().is_none() && e.to_string().contains("in use") {
            bail!("{e:#}: stop the server first");
        }
    }
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let name = data_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "data".into());
    let aside = data_dir.with_file_name(format!("{name}.damaged-{secs}"));
    std::fs::rename(data_dir, &aside)
        .with_context(|| format!("cannot rename {} to {}", data_dir.display(), aside.display()))?;
    Ok(Some(aside))
}
