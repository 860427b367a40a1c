//! Changing a stripe's servers while it runs: add, remove, hand over (docs/operations.md
//! "Changing the array's servers").
//!
//! Every step is done by the stripe's active and is one replicated change, so at no point can two
//! majorities exist:
//! - **add**: the server goes into the roster (one `SetRoster` entry, so every member knows its
//!   address and lets it in), then openraft adds it as a learner: it catches up from a snapshot
//!   and the log and does not vote. The active's [`Changes::run`] loop promotes it to voter (one
//!   membership change) once it is within [`CLOSE_BEHIND`] entries, then takes it off the
//!   roster's `joining` list. The loop runs on whichever server is the active, so a failover
//!   in the middle only delays the promotion.
//! - **remove**: openraft's membership change first (the server stops counting), then the roster
//!   drops it and keeps its name as retired. Removing the active hands over first
//!   ([`Changes::hand_over`]): it stops taking requests and heartbeats and asks the most
//!   up-to-date voter to campaign; the removal is then the new active's to do.
//! - a membership left joint by a failover is completed by the loop.
//!
//! Requests reach a server that is not the active as [`ChangeError::NotActive`], which names the
//! active; `ferrocotta array` follows it.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use ferrocotta::config::{ClusterConfig, ServerConfig};
use ferrocotta::handshake::ClientIdentity;
use ferrocotta::protocol::ErrorReply;
use openraft::{ChangeMembers, EmptyNode, ServerState};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::command::{CommandKind, CommandResult};
use crate::elections::Elections;
use crate::roster::Roster;
use crate::stripe::Stripe;
use crate::types::NodeId;

/// A learner this close to the active's log is promoted to voter.
pub const CLOSE_BEHIND: u64 = 100;

/// How often the active looks at joining servers and unfinished changes.
const LOOP_EVERY: Duration = Duration::from_millis(250);

/// How long a hand-over may take before the active takes requests again.
const HAND_OVER_MAX: Duration = Duration::from_secs(3);

/// Longest a hand-over waits for the writes in flight to commit and reach the successor.
const HAND_OVER_DRAIN_MAX: Duration = Duration::from_secs(1);

/// How often the hand-over looks again whether the writes in flight have settled.
const HAND_OVER_DRAIN_POLL: Duration = Duration::from_millis(5);

/// Longest a roster entry may take to commit.
const PROPOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a change was not made.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    /// This server is not the stripe's active (`active` names the one it knows of).
    #[error("this server is not the active of its stripe (active: {})", active.as_deref().unwrap_or("unknown"))]
    NotActive { active: Option<String> },
    /// The request is wrong (a name in use, a clashing port, ...).
    #[error("{0}")]
    Invalid(String),
    /// The change could not be made now (no quorum, a change in progress); the same request may
    /// be repeated.
    #[error("{0}")]
    Unavailable(String),
}

/// What an add or remove did.
#[derive(Debug, Clone, Serialize)]
pub struct ChangeOutcome {
    /// The server concerned.
    pub server: String,
    /// Its node id.
    pub id: NodeId,
    /// The roster's generation after the change.
    pub generation: u64,
    /// What happened, for the operator.
    pub message: String,
}

/// The membership changes of one server's stripe.
pub struct Changes {
    /// The stripe.
    pub stripe: Arc<Stripe>,
    /// Its elections (for the hand-over).
    pub elections: Arc<Elections>,
    /// How this server dials its peers (to ask one to campaign).
    pub peer_identity: ClientIdentity,
    /// cluster.toml, to check a new server against the whole array.
    pub seed: Arc<ClusterConfig>,
    /// One change at a time on this server.
    pub lock: tokio::sync::Mutex<()>,
}

impl Changes {
    pub(crate) fn check_active(&self) -> Result<(), ChangeError> {
        let m = self.stripe.raft().metrics().borrow().clone();
        if m.state == ServerState::Leader {
            Ok(())
        } else {
            Err(ChangeError::NotActive {
                active: m.current_leader.and_then(|id| self.stripe.name_of(id)),
            })
        }
    }

    pub(crate) async fn set_roster(&self, current: &Roster, next: Roster) -> Result<(), ChangeError> {
        let kind = CommandKind::SetRoster {
            expected: current.generation,
            roster: next.encode(),
        };
        match self.stripe.propose(kind, PROPOSE_TIMEOUT).await {
            Ok(CommandResult::Client(Ok(_))) => {
                self.stripe.roster().refresh(self.stripe.shared());
                Ok(())
            }
            Ok(CommandResult::Client(Err(e))) => Err(ChangeError::Unavailable(e.to_string())),
            Ok(other) => Err(ChangeError::Unavailable(format!("unexpected result {other:?}"))),
            Err(ErrorReply::NotLeader { leader }) => Err(ChangeError::NotActive { active: leader }),
            Err(e) => Err(ChangeError::Unavailable(format!(
                "the roster change did not commit: {e}"
            ))),
        }
    }

    /// Adds `server` to the stripe as a learner; [`Changes::run`] promotes it once caught up.
    /// Repeating the request for a server already added is answered with where it stands.
    pub async fn add(&self, mut server: ServerConfig) -> Result<ChangeOutcome, ChangeError> {
        self.check_active()?;
        let _one = self.lock.lock().await;
        let roster = self.stripe.roster().get();
        if roster.retired.contains(&server.name) {
            return Err(ChangeError::Invalid(format!(
                "`{}` is the name of a removed server; names are never reused (a stale server of that name \
                 could come back): pick a new one",
                server.name
            )));
        }
        if let Some(existing) = roster.server(&server.name) {
            let same = ServerConfig {
                id: existing.id,
                ..server.clone()
            } == *existing;
            if !same {
                return Err(ChangeError::Invalid(format!(
                    "a server named `{}` is in the stripe already, with other settings",
                    server.name
                )));
            }
            let id = existing.id.unwrap_or_default();
            let joining = roster.joining.contains(&server.name);
            return Ok(ChangeOutcome {
                server: server.name,
                id,
                generation: roster.generation,
                message: if joining {
                    "added already; it becomes a voter once it has caught up".into()
                } else {
                    "a voting member already".into()
                },
            });
        }
        server.id = Some(roster.next_id);
        let mut next = (*roster).clone();
        next.generation += 1;
        next.next_id += 1;
        next.servers.push(server.clone());
        next.joining.push(server.name.clone());
        // The whole array's document must stay valid: names unique across stripes, no port used
        // twice, at most 7 servers in a stripe.
        let stripe = self.stripe.position().stripe;
        ClusterConfig::parse(&crate::roster::document(&self.seed, stripe, &next).to_toml())
            .map_err(|e| ChangeError::Invalid(format!("the array with this server would be invalid: {e}")))?;
        for other in self.seed.servers().filter(|(p, _)| p.stripe != stripe) {
            if other.1.name == server.name {
                return Err(ChangeError::Invalid(format!(
                    "`{}` is a server of another stripe",
                    server.name
                )));
            }
        }
        self.set_roster(&roster, next.clone()).await?;
        let id = server.id.expect("set above");
        tracing::info!(event = "membership.server_added", server = %server.name, id, generation = next.generation);
        if let Err(e) = self.stripe.raft().add_learner(id, EmptyNode {}, false).await {
            // The loop adds it again.
            tracing::warn!(event = "membership.add_learner_failed", server = %server.name, error = %e);
        }
        Ok(ChangeOutcome {
            server: server.name,
            id,
            generation: next.generation,
            message: "added as a learner: start it now; it becomes a voter once it has caught up".into(),
        })
    }

    /// Removes a server from the stripe. The active itself hands over first and answers
    /// `NotActive` naming its successor, which does the removal.
    pub async fn remove(&self, name: &str) -> Result<ChangeOutcome, ChangeError> {
        self.check_active()?;
        let _one = self.lock.lock().await;
        let roster = self.stripe.roster().get();
        let Some(server) = roster.server(name).cloned() else {
            if roster.retired.iter().any(|n| n == name) {
                return Ok(ChangeOutcome {
                    server: name.to_string(),
                    id: 0,
                    generation: roster.generation,
                    message: "removed already".into(),
                });
            }
            return Err(ChangeError::Invalid(format!("no server named `{name}` in this stripe")));
        };
        let id = server.id.unwrap_or_default();
        if id == self.stripe.position().node_id() {
            let successor = self.hand_over().await?;
            return Err(ChangeError::NotActive {
                active: Some(successor),
            });
        }
        let m = self.stripe.raft().metrics().borrow().clone();
        let membership = m.membership_config.membership().clone();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        if voters.contains(&id) {
            if voters.len() <= 1 {
                return Err(ChangeError::Invalid("the stripe's last voter cannot be removed".into()));
            }
            self.change(ChangeMembers::RemoveVoters(BTreeSet::from([id]))).await?;
        } else if membership.learner_ids().any(|l| l == id) {
            self.change(ChangeMembers::RemoveNodes(BTreeSet::from([id]))).await?;
        }
        let mut next = (*roster).clone();
        next.generation += 1;
        next.servers.retain(|s| s.name != name);
        next.joining.retain(|n| n != name);
        next.retired.push(name.to_string());
        self.set_roster(&roster, next.clone()).await?;
        tracing::info!(event = "membership.server_removed", server = %name, id, generation = next.generation);
        Ok(ChangeOutcome {
            server: name.to_string(),
            id,
            generation: next.generation,
            message: "removed: it no longer counts and its peers refuse it; stop it and delete its data".into(),
        })
    }

    async fn change(&self, change: ChangeMembers<NodeId, EmptyNode>) -> Result<(), ChangeError> {
        match self.stripe.raft().change_membership(change, false).await {
            Ok(_) => Ok(()),
            Err(e) => {
                if let Some(f) = e.forward_to_leader() {
                    return Err(ChangeError::NotActive {
                        active: f.leader_id.and_then(|id| self.stripe.name_of(id)),
                    });
                }
                Err(ChangeError::Unavailable(format!(
                    "the membership change did not complete: {e}"
                )))
            }
        }
    }

    /// [`Changes::hand_over`], for a server that must be the active.
    pub async fn hand_over_if_active(&self) -> Result<String, ChangeError> {
        self.check_active()?;
        let _one = self.lock.lock().await;
        self.hand_over().await
    }

    /// Hands this server's activity over to the most up-to-date other voter: takes no new
    /// request, lets the ones in flight commit and reach that voter (at most
    /// [`HAND_OVER_DRAIN_MAX`], or it gives up), stops heartbeats, asks that voter to campaign,
    /// and waits for a new active (at most [`HAND_OVER_MAX`]); returns its name. Whatever happens, this server takes requests again
    /// afterwards (as a mirror, or as the active if no one took over).
    pub async fn hand_over(&self) -> Result<String, ChangeError> {
        let raft = self.stripe.raft();
        let me = self.stripe.position().node_id();
        let m = raft.metrics().borrow().clone();
        let voters: Vec<NodeId> = m
            .membership_config
            .membership()
            .voter_ids()
            .filter(|v| *v != me)
            .collect();
        let progress = m.replication.clone().unwrap_or_default();
        let Some(target) = voters
            .iter()
            .copied()
            .max_by_key(|v| progress.get(v).cloned().flatten().map(|l| l.index))
        else {
            return Err(ChangeError::Invalid("no other voter to hand over to".into()));
        };
        let target_name = self.stripe.name_of(target).unwrap_or_default();
        let Some(addr) = self.stripe.roster().group_addr(target) else {
            return Err(ChangeError::Unavailable(format!("no address for node {target}")));
        };
        tracing::info!(event = "membership.hand_over", to = %target_name, "handing over the active's role");
        let started = tokio::time::Instant::now();
        self.stripe.set_handing_over(true);
        // What is in flight commits and reaches the successor before it is asked (heartbeats
        // still on; the write batcher proposes nothing new): no write is left in doubt, and its
        // log is complete when it campaigns. A mirror behind would not win the vote.
        let settled = tokio::time::timeout(HAND_OVER_DRAIN_MAX, async {
            let mut rx = raft.metrics();
            loop {
                let settled = {
                    let m = rx.borrow_and_update();
                    let last = m.last_log_index;
                    let applied = m.last_applied.map(|l| l.index);
                    let matched = m
                        .replication
                        .as_ref()
                        .and_then(|r| r.get(&target).cloned().flatten())
                        .map(|l| l.index);
                    last.is_some() && applied == last && matched == last
                } && self.stripe.writes_settled();
                if settled {
                    return;
                }
                // The batcher's last batch may be answered just after the metrics last changed.
                tokio::select! {
                    changed = rx.changed() => if changed.is_err() { return },
                    _ = tokio::time::sleep(HAND_OVER_DRAIN_POLL) => {}
                }
            }
        })
        .await
        .is_ok();
        let outcome = async {
            if !settled {
                return Err(ChangeError::Unavailable(format!(
                    "the writes in flight did not reach {target_name} within {HAND_OVER_DRAIN_MAX:?}: this server stays the active"
                )));
            }
            self.elections.set_handing_over(true);
            raft.runtime_config().heartbeat(false);
            let agreed = crate::network::ask_to_campaign(&addr, &self.peer_identity, Duration::from_secs(1))
                .await
                .map_err(|e| ChangeError::Unavailable(format!("{target_name} could not be asked to take over: {e}")))?;
            if !agreed {
                return Err(ChangeError::Unavailable(format!(
                    "{target_name} declined to take over (not a voter, or catching up)"
                )));
            }
            let mut rx = raft.metrics();
            let waited = tokio::time::timeout(HAND_OVER_MAX, async {
                loop {
                    let leader = rx.borrow_and_update().current_leader;
                    if let Some(l) = leader.filter(|l| *l != me) {
                        return l;
                    }
                    if rx.changed().await.is_err() {
                        return me;
                    }
                }
            })
            .await;
            match waited {
                Ok(l) if l != me => Ok(self.stripe.name_of(l).unwrap_or_default()),
                _ => Err(ChangeError::Unavailable(format!(
                    "no new active within {HAND_OVER_MAX:?}: this server stays the active"
                ))),
            }
        }
        .await;
        raft.runtime_config().heartbeat(true);
        self.elections.set_handing_over(false);
        self.stripe.set_handing_over(false);
        match &outcome {
            Ok(to) => {
                tracing::info!(event = "membership.handed_over", to = %to, millis = started.elapsed().as_millis() as u64)
            }
            Err(e) => tracing::warn!(event = "membership.hand_over_failed", error = %e),
        }
        outcome
    }

    /// On the active, every [`LOOP_EVERY`]: finishes a membership left joint, adds a joining
    /// server as learner again if a failover lost that step, promotes caught-up learners.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(LOOP_EVERY) => {}
            }
            if self.check_active().is_err() || self.stripe.roster().get().joining.is_empty() && !self.joint() {
                continue;
            }
            let _one = self.lock.lock().await;
            if let Err(e) = self.step().await {
                tracing::warn!(event = "membership.step_failed", error = %e);
            }
        }
    }

    fn joint(&self) -> bool {
        let m = self.stripe.raft().metrics().borrow().clone();
        m.membership_config.membership().get_joint_config().len() > 1
    }

    async fn step(&self) -> Result<(), ChangeError> {
        let raft = self.stripe.raft();
        let m = raft.metrics().borrow().clone();
        let membership = m.membership_config.membership().clone();
        if membership.get_joint_config().len() > 1 {
            let last: BTreeSet<NodeId> = membership.get_joint_config().last().cloned().unwrap_or_default();
            tracing::info!(event = "membership.finishing_joint", voters = ?last);
            return self.change(ChangeMembers::ReplaceAllVoters(last)).await;
        }
        let roster = self.stripe.roster().get();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let learners: BTreeSet<NodeId> = membership.learner_ids().collect();
        let last_log = m.last_log_index.unwrap_or(0);
        let progress = m.replication.clone().unwrap_or_default();
        for name in &roster.joining {
            let Some(id) = roster.server(name).and_then(|s| s.id) else {
                continue;
            };
            if voters.contains(&id) {
                let mut next = (*roster).clone();
                next.generation += 1;
                next.joining.retain(|n| n != name);
                self.set_roster(&roster, next).await?;
                tracing::info!(event = "membership.server_voting", server = %name, id);
                return Ok(());
            }
            if !learners.contains(&id) {
                if let Err(e) = raft.add_learner(id, EmptyNode {}, false).await {
                    tracing::warn!(event = "membership.add_learner_failed", server = %name, error = %e);
                }
                continue;
            }
            // A learner that has acknowledged nothing yet (not started, unreachable) stays one.
            let Some(matched) = progress.get(&id).cloned().flatten().map(|l| l.index) else {
                continue;
            };
            if matched + CLOSE_BEHIND >= last_log {
                tracing::info!(event = "membership.promoting", server = %name, id, matched, last_log);
                return self.change(ChangeMembers::AddVoterIds(BTreeSet::from([id]))).await;
            }
        }
        Ok(())
    }
}
