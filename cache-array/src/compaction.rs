//! When a server snapshots its state and compacts its log.
//!
//! openraft 0.9 snapshots after a number of entries (`storage.snapshot_every_entries`), but an
//! entry may carry one small write or a batch of hundreds of kilobytes, and the log held by sled
//! costs about its own size in memory. So a server also snapshots once the log written since its
//! last snapshot holds `storage.snapshot_every_log_bytes` or a quarter of the last snapshot's
//! size, whichever is more: the log stays small next to the data, and a snapshot, which writes the
//! whole state, costs at most about four times the bytes written since the one before.
//!
//! The servers of a stripe apply the same entries at about the same moment, and a snapshot of a
//! large state is seconds of CPU: each server's thresholds are stretched by an eighth per position
//! in the stripe ([`stagger`]), so they take their snapshots one after another, not together.

use std::path::PathBuf;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::log_store::LogStore;
use crate::types::Raft;

/// How often the log size is compared with the threshold.
const CHECK_EVERY: Duration = Duration::from_millis(500);

/// `value` stretched by an eighth per position of the server in its stripe (0-based).
pub fn stagger(value: u64, index_in_stripe: usize) -> u64 {
    value.saturating_add(value / 8 * index_in_stripe as u64)
}

/// Bytes of log since the last snapshot that call for the next one.
fn threshold(min_bytes: u64, last_snapshot_bytes: u64) -> u64 {
    min_bytes.max(last_snapshot_bytes / 4)
}

/// Triggers snapshots by log size until `shutdown`. `min_bytes` is already staggered.
pub async fn run(raft: Raft, log: LogStore, snapshot_dir: PathBuf, min_bytes: u64, shutdown: CancellationToken) {
    let mut last_snapshot = raft.metrics().borrow().snapshot;
    let mut base = log.appended_bytes();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(CHECK_EVERY) => {}
        }
        let appended = log.appended_bytes();
        let snapshot = raft.metrics().borrow().snapshot;
        if snapshot != last_snapshot {
            // A snapshot was taken (by this task, by openraft's entry count, or installed from
            // the active): count from here.
            last_snapshot = snapshot;
            base = appended;
            continue;
        }
        let since = appended.saturating_sub(base);
        if since < min_bytes {
            // Below every threshold whatever the last snapshot's size: no need to look at it.
            continue;
        }
        let last_bytes = crate::state_machine::snapshot_file_len(&snapshot_dir);
        let limit = threshold(min_bytes, last_bytes);
        if since < limit {
            continue;
        }
        tracing::info!(
            event = "compaction.snapshot_triggered",
            log_bytes = since,
            threshold = limit,
            last_snapshot_bytes = last_bytes
        );
        // Ignored by openraft while a snapshot is being built; counting restarts either way, so a
        // slow snapshot is not asked for again at every check.
        if let Err(e) = raft.trigger().snapshot().await {
            tracing::warn!(event = "compaction.trigger_failed", error = %e);
        }
        base = appended;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_of_a_stripe_get_different_thresholds() {
        assert_eq!(stagger(64, 0), 64);
        assert_eq!(stagger(64, 1), 72);
        assert_eq!(stagger(64, 2), 80);
        assert_eq!(stagger(u64::MAX, 2), u64::MAX);
    }

    #[test]
    fn the_threshold_grows_with_the_data() {
        let mib = 1024 * 1024;
        assert_eq!(threshold(64 * mib, 0), 64 * mib);
        assert_eq!(threshold(64 * mib, 100 * mib), 64 * mib);
        assert_eq!(threshold(64 * mib, 1024 * mib), 256 * mib);
    }
}
