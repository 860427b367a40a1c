//! What only the active does: track client keep-alives and reads in memory, and turn them into log
//! entries in batches.
//!
//! - **Sessions.** Keep-alives are answered from memory (they never touch the log). Every tick the
//!   active proposes `ExpireSessions` for sessions silent longer than `client_reconnect_window`.
//!   A server that becomes active has no record of who was alive, so it starts every live session's
//!   window afresh: a failover never ejects clients, and a silent session expires one full window
//!   after the new active took over.
//! - **Access times (tti, LRU).** Reads served by the active are recorded in memory and proposed as
//!   one `Touch` entry at most every [`TOUCH_FLUSH_INTERVAL`]. If the active dies, the accesses of the
//!   last interval are lost with it, so after a failover an idle entry can expire up to
//!   `TOUCH_FLUSH_INTERVAL` (plus one tick) earlier than its last read implied. That is the bound
//!   on early expiry, documented in `docs/operations.md`.
//! - **Expiry sweep.** Every [`SWEEP_INTERVAL`] the active proposes `Expire` with the entries whose
//!   replicated expiry has passed and that no pending read keeps alive; applying re-checks each.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::command::{CommandKind, CommandResult};
use crate::console::Recorder;
use crate::stripe::{now_ms, Stripe};

/// How often the active's upkeep runs.
pub const UPKEEP_TICK: Duration = Duration::from_millis(100);

/// Largest interval between two batches of access times.
pub const TOUCH_FLUSH_INTERVAL: Duration = Duration::from_secs(1);

/// How often the active sweeps expired entries.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Entries one sweep removes at most.
pub const SWEEP_BATCH_MAX: usize = 10_000;

/// Sessions an expiry event names at most (the rest are counted).
const EXPIRED_NAMED_MAX: usize = 5;

/// Deadline of the active's own proposals.
const PROPOSAL_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs the active's duties until `shutdown`; idle while this server is a mirror.
pub async fn run(stripe: std::sync::Arc<Stripe>, recorder: std::sync::Arc<Recorder>, shutdown: CancellationToken) {
    let window = stripe.config().timing.client_reconnect_window.0;
    let mut tick = tokio::time::interval(UPKEEP_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut active_term: Option<u64> = None;
    let mut last_touch_flush = Instant::now();
    let mut last_sweep = Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some(term) = stripe.active_term() else {
            if active_term.take().is_some() {
                stripe.active().clear();
            }
            continue;
        };
        if active_term != Some(term) {
            // A new active: every live session gets a fresh window. (Access times recorded since
            // this server became active are kept: it recorded none before.)
            let ids: Vec<u64> = stripe.shared().read(|d| d.store.sessions.keys().copied().collect());
            stripe.active().renew_windows(&ids);
            tracing::info!(event = "session.windows_renewed", term, sessions = ids.len(), window = ?window);
            active_term = Some(term);
        }
        expire_silent_sessions(&stripe, &recorder, window).await;
        if last_touch_flush.elapsed() >= TOUCH_FLUSH_INTERVAL {
            flush_touches(&stripe).await;
            last_touch_flush = Instant::now();
        }
        if last_sweep.elapsed() >= SWEEP_INTERVAL {
            sweep(&stripe).await;
            last_sweep = Instant::now();
        }
    }
}

async fn expire_silent_sessions(stripe: &Stripe, recorder: &Recorder, window: Duration) {
    let live: Vec<u64> = stripe.shared().read(|d| d.store.sessions.keys().copied().collect());
    let silent = stripe.active().silent_sessions(&live, window);
    if silent.is_empty() {
        return;
    }
    let clients: Vec<String> = stripe.shared().read(|d| {
        silent
            .iter()
            .take(EXPIRED_NAMED_MAX)
            .filter_map(|id| {
                d.store
                    .sessions
                    .get(id)
                    .map(|s| format!("{} (session {id})", s.client_name))
            })
            .collect()
    });
    let more = silent.len().saturating_sub(EXPIRED_NAMED_MAX);
    match stripe
        .propose(CommandKind::ExpireSessions(silent.clone()), PROPOSAL_TIMEOUT)
        .await
    {
        Ok(result) => {
            let ended = match result {
                CommandResult::SessionsEnded { sessions } => sessions,
                _ => 0,
            };
            tracing::info!(event = "session.expired", sessions = ?silent, ended, window = ?window);
            recorder.event(
                "session_expired",
                format!(
                    "silent for {window:?}, expired: {}{}",
                    clients.join(", "),
                    if more > 0 {
                        format!(" and {more} more")
                    } else {
                        String::new()
                    }
                ),
            );
            stripe.active().forget_sessions(&silent);
        }
        Err(e) => tracing::warn!(event = "session.expire_failed", error = %e),
    }
}

async fn flush_touches(stripe: &Stripe) {
    let batch = stripe.active().take_accesses();
    if batch.is_empty() {
        return;
    }
    let n = batch.len();
    if let Err(e) = stripe.propose(CommandKind::Touch(batch), PROPOSAL_TIMEOUT).await {
        tracing::warn!(event = "expiry.touch_failed", accesses = n, error = %e);
    }
}

async fn sweep(stripe: &Stripe) {
    let now = now_ms();
    let candidates = stripe
        .shared()
        .read(|d| d.store.expired_candidates(now, SWEEP_BATCH_MAX));
    let due: Vec<(String, Vec<u8>)> = candidates
        .into_iter()
        .filter(|(c, k)| {
            // An entry read since the last batch may still be alive by its tti.
            let Some(pending) = stripe.active().pending_access(c, k) else {
                return true;
            };
            stripe.shared().read(|d| {
                d.store
                    .caches
                    .get(c)
                    .and_then(|cache| cache.entries.get(k))
                    .and_then(|e| e.expires_at_with(pending.max(e.accessed_ms)))
                    .is_none_or(|at| at <= now)
            })
        })
        .collect();
    if due.is_empty() {
        return;
    }
    match stripe.propose(CommandKind::Expire(due.clone()), PROPOSAL_TIMEOUT).await {
        Ok(result) => {
            let removed = match result {
                CommandResult::Expired { entries } => entries,
                _ => 0,
            };
            tracing::debug!(event = "expiry.swept", candidates = due.len(), removed);
        }
        Err(e) => tracing::warn!(event = "expiry.sweep_failed", error = %e),
    }
}
