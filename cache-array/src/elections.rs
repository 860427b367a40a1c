//! When a mirror campaigns to become its stripe's active.
//!
//! openraft's own election timer is switched off (`enable_elect(false)` from the start); this
//! driver decides instead, for three reasons:
//!
//! - **A crashed active is seen at once.** The active holds a connection to each mirror; when it
//!   closes and the active's group port then refuses connections, its process is gone. The
//!   mirrors campaign at once (one after another by node id, so their first votes do not split)
//!   instead of waiting out a whole election timeout of silence.
//! - **A silent active** (paused, cut off) is suspected after `timing.election_timeout` (plus up
//!   to 25% at random) without an AppendEntries, as before.
//! - **No campaign without a majority** (Raft's pre-vote, thesis 9.6, which openraft 0.9 lacks):
//!   before campaigning, a mirror probes its peers and campaigns only when a majority of the
//!   stripe, itself included, hears no active and holds no longer log than its own (the two
//!   checks a vote makes). A mirror cut off from the others would otherwise raise its term at
//!   every timeout and, once healed, depose the healthy active: it stays in its term and rejoins
//!   without an election. A mirror whose log is behind could never win, yet each of its
//!   campaigns would raise the term past the mirrors that could, and their campaigns then end on
//!   its refusal (an answer that needs no disk write, so it comes before their grants): it stays
//!   out, and one of them wins.
//!
//! Safety does not depend on any of this: votes and terms are still Raft's (openraft's), and a
//! server that is joining after losing its data neither votes nor campaigns
//! ([`crate::formation::VoteGate`]). openraft's leader lease (its `election_timeout_max`) still
//! makes a mirror refuse votes for that long after it last heard the active; the server sets it
//! to twice the heartbeat interval, so the lease costs little after a crash.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use ferrocotta::config::Timing;

use crate::formation::{ProbeReply, Prober, VoteGate};
use crate::log_store::LogStore;
use crate::roster::LiveRoster;
use crate::types::{LogId, NodeId, Raft};

/// Longest a reachability probe of one peer may take before a campaign.
pub const REACH_PROBE_TIMEOUT: Duration = Duration::from_millis(250);

/// A server that heard the active within this many heartbeats says it hears it: refuses, in
/// effect, a peer's campaign (Raft's pre-vote). Three heartbeats: a missed one or two under load
/// do not count, and after a crashed active the lease (two heartbeats) has about run out too.
const HEARS_ACTIVE_HEARTBEATS: u32 = 3;

/// Longest the dial that tells a crashed active (refused) from a silent one may take.
const CRASH_DIAL_TIMEOUT: Duration = Duration::from_millis(200);

/// After a crashed active, how long mirrors keep campaigning at short intervals (the first
/// attempts meet the others' leader lease) before they fall back to the silence timer.
const CRASH_CAMPAIGN_WINDOW: Duration = Duration::from_secs(2);

/// Shared between the group port (which sees the active's traffic and connections) and the
/// driver task.
pub struct Elections {
    /// When this server last heard an active (or granted a vote): the silence timer's start.
    heard: Mutex<Instant>,
    /// Set when the active's connection closed and its port refused a dial: that active.
    active_crashed: Mutex<Option<NodeId>>,
    /// When this server last saw its active crash; until it hears an active again, it answers
    /// probes that it hears none (so a peer's campaign need not wait out the silence).
    crash_seen: Mutex<Option<Instant>>,
    /// Wakes the driver for a crashed active.
    wake: Notify,
    /// The stripe's servers (group addresses by node id).
    roster: Arc<LiveRoster>,
    /// Set while this server, the active, hands over: its probe answers say it hears no active.
    handing_over: AtomicBool,
    /// Set when the active asked this server to campaign: no stagger behind other mirrors.
    asked: AtomicBool,
    /// This server.
    me: NodeId,
    /// Silence after which a mirror suspects the active (`timing.election_timeout`).
    election_timeout: Duration,
    /// The active's heartbeat interval (`timing.heartbeat_interval`).
    heartbeat: Duration,
}

impl Elections {
    /// State for server `me`, whose stripe's servers have these group addresses.
    pub fn new(me: NodeId, roster: Arc<LiveRoster>, timing: &Timing) -> Arc<Elections> {
        Arc::new(Elections {
            heard: Mutex::new(Instant::now()),
            active_crashed: Mutex::new(None),
            crash_seen: Mutex::new(None),
            wake: Notify::new(),
            roster,
            handing_over: AtomicBool::new(false),
            asked: AtomicBool::new(false),
            me,
            election_timeout: timing.election_timeout.0,
            heartbeat: timing.heartbeat_interval.0,
        })
    }

    /// An active was heard (an accepted AppendEntries or snapshot), or a vote was granted:
    /// restart the silence timer.
    pub fn heard_active(&self) {
        *self.heard.lock().expect("heard lock") = Instant::now();
    }

    /// Whether this server heard an active within the last three heartbeats (what it answers a
    /// peer's probe; a mirror campaigns only when a majority answers no).
    pub fn hears_active(&self) -> bool {
        let heard = *self.heard.lock().expect("heard lock");
        let crashed_since = self.crash_seen.lock().expect("crash lock").is_some_and(|at| at > heard);
        heard.elapsed() < self.heartbeat * HEARS_ACTIVE_HEARTBEATS && !crashed_since
    }

    fn silent_for(&self) -> Duration {
        self.heard.lock().expect("heard lock").elapsed()
    }

    /// A peer's incoming connection closed. If the peer is the active this server follows, dial
    /// its group port: a refused connection means its process is gone, and the driver
    /// campaigns without waiting out the silence timer.
    pub fn connection_closed(self: &Arc<Self>, raft: &Raft, peer: NodeId) {
        if raft.metrics().borrow().current_leader != Some(peer) {
            return;
        }
        let Some(addr) = self.roster.group_addr(peer) else {
            return;
        };
        let this = self.clone();
        tokio::spawn(async move {
            let refused = matches!(
                tokio::time::timeout(CRASH_DIAL_TIMEOUT, tokio::net::TcpStream::connect(&addr)).await,
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused
            );
            if refused {
                tracing::info!(
                    event = "stripe.active_crashed",
                    active = peer,
                    "the active's connection closed and its group port refuses connections: campaigning at once"
                );
                *this.crash_seen.lock().expect("crash lock") = Some(Instant::now());
                *this.active_crashed.lock().expect("crashed lock") = Some(peer);
                this.wake.notify_one();
            }
        });
    }

    /// The active asked this server to campaign now ([`ferrocotta::protocol::PeerRpc::CampaignNow`]):
    /// it does, as after a crash of the active, without waiting behind other mirrors.
    pub fn campaign_now(&self, active: NodeId) {
        self.asked.store(true, Ordering::Release);
        *self.crash_seen.lock().expect("crash lock") = Some(Instant::now());
        *self.active_crashed.lock().expect("crashed lock") = Some(active);
        self.wake.notify_one();
    }

    /// Whether this server, the active, is handing over.
    pub fn handing_over(&self) -> bool {
        self.handing_over.load(Ordering::Acquire)
    }

    /// Marks the start and end of a hand-over by this server.
    pub fn set_handing_over(&self, on: bool) {
        self.handing_over.store(on, Ordering::Release);
    }

    /// Runs until `shutdown`: decides when this server campaigns.
    pub async fn run(
        self: Arc<Self>,
        raft: Raft,
        log: LogStore,
        gate: Arc<VoteGate>,
        prober: Prober,
        shutdown: CancellationToken,
    ) {
        let (me, election_timeout, heartbeat) = (self.me, self.election_timeout, self.heartbeat);
        let tick = heartbeat / 2;
        let mut timeout = randomized(election_timeout);
        // No attempt (probe or campaign) before this; set after each one.
        let mut next_try = Instant::now();
        // After a crashed active: which one, and until when to try at short intervals.
        let mut crashed: Option<(NodeId, Instant)> = None;
        let mut held_back = false;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(tick) => {}
            }
            let m = raft.metrics().borrow().clone();
            let voters: Vec<NodeId> = m.membership_config.membership().voter_ids().collect();
            if m.current_leader == Some(me) || !voters.contains(&me) || !gate.may_vote() {
                crashed = None;
                self.active_crashed.lock().expect("crashed lock").take();
                continue;
            }
            if let Some(dead) = self.active_crashed.lock().expect("crashed lock").take() {
                // Mirrors go one after another by node id, so their first campaigns do not split
                // the vote; a later one campaigns only if the earlier one has not won by then.
                let rank = if self.asked.swap(false, Ordering::AcqRel) {
                    0
                } else {
                    voters.iter().filter(|v| **v != dead && **v < me).count() as u32
                };
                next_try = Instant::now() + heartbeat * 2 * rank;
                crashed = Some((dead, Instant::now() + CRASH_CAMPAIGN_WINDOW));
            }
            if let Some((dead, until)) = crashed {
                // The window ends when it runs out or a peer won.
                if Instant::now() >= until || m.current_leader.is_some_and(|l| l != dead) {
                    crashed = None;
                }
            }
            // A stripe of one server has no one to wait for.
            let due =
                Instant::now() >= next_try && (voters.len() == 1 || crashed.is_some() || self.silent_for() >= timeout);
            if !due {
                continue;
            }
            let pace = |crashed: bool| {
                Instant::now()
                    + if crashed {
                        // Short: the first tries may meet the peers' leader lease.
                        heartbeat.mul_f64(rand::thread_rng().gen_range(0.5..1.5))
                    } else {
                        randomized(election_timeout)
                    }
            };
            let (reachable, supporters) = pre_vote(&prober, me, &voters, log.last_log_id()).await;
            if (supporters + 1) * 2 <= voters.len() {
                if !held_back {
                    tracing::info!(
                        event = "stripe.election_held_back",
                        reachable,
                        supporters,
                        voters = voters.len(),
                        "no active heard here, but no majority of the stripe is without one and holds no longer log: not campaigning (the term stays)"
                    );
                    held_back = true;
                }
                next_try = pace(crashed.is_some());
                continue;
            }
            // An active may have been heard during the probes: then it is no longer due.
            let still_due = voters.len() == 1
                || match crashed {
                    Some((dead, _)) => raft.metrics().borrow().current_leader.is_none_or(|l| l == dead),
                    None => self.silent_for() >= timeout,
                };
            if !still_due {
                continue;
            }
            if held_back {
                tracing::info!(
                    event = "stripe.election_allowed",
                    reachable,
                    supporters,
                    "a majority of the stripe hears no active either"
                );
                held_back = false;
            }
            tracing::info!(
                event = "stripe.campaign",
                term = m.current_term + 1,
                reason = if crashed.is_some() {
                    "active crashed"
                } else {
                    "active silent"
                },
                "campaigning to become the active"
            );
            if let Err(e) = raft.trigger().elect().await {
                tracing::error!(event = "stripe.campaign_failed", error = %e);
                return;
            }
            timeout = randomized(election_timeout);
            next_try = pace(crashed.is_some());
        }
    }
}

/// The election timeout plus up to a quarter at random, so mirrors rarely campaign together.
fn randomized(base: Duration) -> Duration {
    base + base.mul_f64(rand::thread_rng().gen_range(0.0..0.25))
}

/// Raft's pre-vote, by probe: how many of the other voters answer now, and how many of those
/// would vote for this server, whose last log id is `mine`.
async fn pre_vote(prober: &Prober, me: NodeId, voters: &[NodeId], mine: Option<LogId>) -> (usize, usize) {
    let calls = voters.iter().filter(|v| **v != me).map(|v| prober(*v));
    let answers: Vec<_> = futures::future::join_all(calls).await.into_iter().flatten().collect();
    let supporters = answers.iter().filter(|a| would_vote(a, mine)).count();
    (answers.len(), supporters)
}

/// Whether a peer that answered a probe so would vote for a candidate whose last log id is
/// `mine`: it hears no active, and its log is no longer (Raft compares the last entries' terms,
/// then their indexes). A server too old to send its log (`None`) is taken at its word.
fn would_vote(answer: &ProbeReply, mine: Option<LogId>) -> bool {
    !answer.hears_active && answer.last_log <= mine
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::CommittedLeaderId;

    fn log(term: u64, index: u64) -> Option<LogId> {
        Some(LogId::new(CommittedLeaderId::new(term, 1), index))
    }

    fn answer(hears_active: bool, last_log: Option<LogId>) -> ProbeReply {
        ProbeReply {
            initialized: true,
            last_log_index: last_log.map(|l| l.index),
            joining: false,
            hears_active,
            last_log,
        }
    }

    #[test]
    fn a_peer_supports_a_campaign_only_as_its_vote_would() {
        // The hand-over that failed in CI: the asked mirror one entry behind the others.
        assert!(!would_vote(&answer(false, log(1, 1410)), log(1, 1409)));
        assert!(would_vote(&answer(false, log(1, 1410)), log(1, 1410)));
        assert!(would_vote(&answer(false, log(1, 1409)), log(1, 1410)));
        // The term of the last entry counts before its index, as in a vote.
        assert!(would_vote(&answer(false, log(4, 12)), log(5, 10)));
        assert!(!would_vote(&answer(false, log(5, 10)), log(4, 12)));
        // A peer that hears an active refuses whatever the logs.
        assert!(!would_vote(&answer(true, log(1, 1)), log(9, 99)));
        // An empty log, or a server too old to say: taken at its word.
        assert!(would_vote(&answer(false, None), None));
        assert!(would_vote(&answer(false, None), log(1, 3)));
    }
}
