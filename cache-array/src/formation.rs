//! How a server takes its place in its stripe: founding a new stripe, joining one that exists
//! after its own data was lost, and when it may vote.
//!
//! **A stripe is founded once.** A server with a pristine store (no vote, no log) cannot tell by
//! itself whether its stripe is new or whether it lost its data: two wiped servers of three, with
//! the third down, once founded a second, empty stripe and served its empty data. So a pristine
//! server asks its peers ([`ProbeReply`]) and decides:
//! - a peer holds entries beyond the founding one, or is itself joining: the stripe exists, and
//!   this server **joins**: it waits to be caught up by the active;
//! - every peer answers and none holds anything: the stripe is new and is **founded**: the first
//!   server of the stripe initializes it (the one membership entry), the others take it from
//!   there. Only one server initializes, so the first election is never split;
//! - some peer does not answer and none holds anything: it waits and asks again. A stripe whose
//!   servers are not all present is never founded, because the missing one may hold the stripe's
//!   only data.
//!
//! **Votes.** Raft's safety rests on servers remembering their votes. A server that lost its data
//! may have voted in the current term already, and its empty log would make it vote for a
//! candidate that lacks committed entries. So a joining server neither votes nor campaigns until
//! it has applied everything the active had committed when it first heard from it; its standing
//! is durable ([`crate::mark::Standing`]) so a restart does not forget it. Until a pristine server
//! has decided, it does not vote either. When most of a stripe lost its data, no active can be
//! elected without an operator's word: `cache-array repair --allow-vote` (docs/security.md).

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{InitializeError, RaftError};
use serde::{Deserialize, Serialize};

use crate::log_store::{LogStore, OpenedLog};
use crate::mark::Standing;
use crate::types::{LogId, NodeId, Raft};

/// How often an undecided or joining server looks again.
const FORMATION_POLL: Duration = Duration::from_millis(300);

/// How often a server still waiting says so in its log.
const WAITING_LOG_EVERY: Duration = Duration::from_secs(10);

/// Why a peer could not be asked; it counts as unreachable.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// It did not take the connection or the handshake.
    #[error("no handshake: {0}")]
    Handshake(#[from] ferrocotta::handshake::HandshakeError),
    /// The connection broke or the answer did not come in time.
    #[error("no answer: {0:?}")]
    Call(ferrocotta::pipelined::CallError),
    /// It answered something that is not a probe reply.
    #[error("undecodable reply: {0}")]
    Undecodable(#[from] postcard::Error),
    /// Its roster does not decode.
    #[error("undecodable roster: {0}")]
    Roster(String),
}

/// What a server answers a peer's probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeReply {
    /// Whether its Raft group is initialized (it holds the membership).
    pub initialized: bool,
    /// Index of its last log entry (or purge point).
    pub last_log_index: Option<u64>,
    /// Whether it is joining after losing its data (so the stripe exists).
    pub joining: bool,
    /// Whether it is the active or heard one lately (`crate::elections`: a mirror campaigns only
    /// when a majority does not).
    pub hears_active: bool,
    /// Its last log id (or purge point), which Raft compares with a candidate's before it votes:
    /// a mirror campaigns only when a majority holds no longer log than its own.
    pub last_log: Option<LogId>,
}

/// The fields of a probe answer that every version has; the ones added later follow it in
/// order, and a server that predates one ends its answer before it ([`ProbeReply::decode`]).
#[derive(Deserialize)]
struct ProbeReplyV1 {
    initialized: bool,
    last_log_index: Option<u64>,
    joining: bool,
}

impl ProbeReply {
    /// Decodes a peer's answer, from this version or an earlier one: a field a server did not
    /// send yet reads as "no answer" (`hears_active` false, `last_log` none), as before it
    /// existed.
    pub fn decode(bytes: &[u8]) -> Result<ProbeReply, postcard::Error> {
        let (v1, rest) = postcard::take_from_bytes::<ProbeReplyV1>(bytes)?;
        let (hears_active, rest) = match rest {
            [] => (false, rest),
            _ => postcard::take_from_bytes::<bool>(rest)?,
        };
        let last_log = match rest {
            [] => None,
            _ => postcard::take_from_bytes::<Option<LogId>>(rest)?.0,
        };
        Ok(ProbeReply {
            initialized: v1.initialized,
            last_log_index: v1.last_log_index,
            joining: v1.joining,
            hears_active,
            last_log,
        })
    }
}

impl ProbeReply {
    /// Whether this peer proves that the stripe exists already: it holds more than the founding
    /// membership entry (index 0), or it knows it lost its data.
    pub fn shows_a_stripe(&self) -> bool {
        self.joining || self.last_log_index.is_some_and(|i| i > 0)
    }
}

const UNDECIDED: u8 = 0;
const MAY_VOTE: u8 = 1;
const JOINING: u8 = 2;

/// Whether this server may vote now, shared by formation and the group port.
#[derive(Debug)]
pub struct VoteGate {
    state: AtomicU8,
    /// While joining: the commit index the active announced in the first AppendEntries heard,
    /// plus one (0: none heard yet).
    catch_up_to: AtomicU64,
}

impl VoteGate {
    /// The gate of a server that opened this log.
    pub fn new(opened: &OpenedLog) -> VoteGate {
        let state = match opened.standing {
            Standing::Joining { may_vote: false } => JOINING,
            Standing::Joining { may_vote: true } => MAY_VOTE,
            Standing::Member if opened.pristine => UNDECIDED,
            Standing::Member => MAY_VOTE,
        };
        VoteGate {
            state: AtomicU8::new(state),
            catch_up_to: AtomicU64::new(0),
        }
    }

    /// Whether a vote request may be granted (openraft still applies Raft's own rules).
    pub fn may_vote(&self) -> bool {
        self.state.load(Ordering::Acquire) == MAY_VOTE
    }

    fn set(&self, state: u8) {
        self.state.store(state, Ordering::Release);
    }

    /// Records the commit index an active announced (called for every accepted AppendEntries);
    /// only the first one heard while catching up counts.
    pub fn note_leader_commit(&self, index: u64) {
        let _ = self
            .catch_up_to
            .compare_exchange(0, index + 1, Ordering::AcqRel, Ordering::Acquire);
    }

    fn catch_up_target(&self) -> Option<u64> {
        self.catch_up_to.load(Ordering::Acquire).checked_sub(1)
    }
}

/// What formation needs of the server.
pub struct Formation {
    /// The Raft node.
    pub raft: Raft,
    /// The log (for the durable standing).
    pub log: LogStore,
    /// The vote gate shared with the group port.
    pub gate: Arc<VoteGate>,
    /// This server's node id.
    pub me: NodeId,
    /// The stripe's servers by node id, with their names.
    pub members: HashMap<NodeId, String>,
}

/// Asks one peer what it holds.
pub type Prober = Arc<
    dyn Fn(NodeId) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<ProbeReply, ProbeError>> + Send>>
        + Send
        + Sync,
>;

impl Formation {
    /// Takes this server's place in its stripe (see the module doc); returns once it is a voting
    /// member, or runs until `shutdown`.
    pub async fn run(self, opened: OpenedLog, probe: Prober, shutdown: tokio_util::sync::CancellationToken) {
        let standing = opened.standing;
        if let Standing::Joining { may_vote } = standing {
            if may_vote {
                tracing::warn!(
                    event = "stripe.joining_may_vote",
                    "joining with votes allowed by an operator (repair --allow-vote)"
                );
            }
            self.catch_up(shutdown).await;
            return;
        }
        if !opened.pristine {
            tracing::info!(event = "stripe.rejoin", "store holds a log: rejoining the stripe");
            return;
        }
        let mut last_said = tokio::time::Instant::now();
        loop {
            let replies = self.probe_all(&probe).await;
            let mut unreachable = Vec::new();
            let mut shows = None;
            let mut founding_underway = false;
            for (id, reply) in &replies {
                match reply {
                    Ok(r) if r.shows_a_stripe() => shows = Some(self.members[id].clone()),
                    Ok(r) => founding_underway |= r.initialized,
                    Err(why) => unreachable.push(format!("{} ({why})", self.members[id])),
                }
            }
            if let Some(peer) = shows {
                tracing::warn!(
                    event = "stripe.joining",
                    peer = %peer,
                    "this server holds nothing but its stripe exists ({peer} holds data): joining it; \
                     no vote and no election until the active has caught this server up"
                );
                if let Err(e) = self.log.set_standing(Standing::Joining { may_vote: false }).await {
                    tracing::error!(event = "stripe.standing_failed", error = %e);
                }
                self.gate.set(JOINING);
                self.catch_up(shutdown).await;
                return;
            }
            if unreachable.is_empty() || founding_underway {
                self.gate.set(MAY_VOTE);
                let first = self.members.keys().min().copied();
                if first == Some(self.me) {
                    self.found().await;
                } else {
                    tracing::info!(
                        event = "stripe.founding",
                        founder = %first.and_then(|f| self.members.get(&f).cloned()).unwrap_or_default(),
                        "every server of the stripe is new: the first one founds it"
                    );
                }
                return;
            }
            if last_said.elapsed() >= WAITING_LOG_EVERY {
                tracing::warn!(
                    event = "stripe.waiting_to_found",
                    unreachable = %unreachable.join(", "),
                    "this server holds nothing; a stripe is founded only when all of its servers are present and \
                     empty (an absent one may hold the stripe's data)"
                );
                last_said = tokio::time::Instant::now();
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(FORMATION_POLL) => {}
            }
        }
    }

    async fn probe_all(&self, probe: &Prober) -> Vec<(NodeId, Result<ProbeReply, ProbeError>)> {
        let peers: Vec<NodeId> = self.members.keys().copied().filter(|id| *id != self.me).collect();
        let calls = peers.iter().map(|id| {
            let p = probe.clone();
            let id = *id;
            async move { (id, p(id).await) }
        });
        futures::future::join_all(calls).await
    }

    async fn found(&self) {
        let members: BTreeSet<NodeId> = self.members.keys().copied().collect();
        match self.raft.initialize(members).await {
            Ok(()) => tracing::info!(
                event = "stripe.initialized",
                "every server of the stripe is new: founded the stripe"
            ),
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {
                tracing::info!(event = "stripe.rejoin", "already initialized")
            }
            Err(e) => tracing::error!(event = "stripe.initialize_failed", error = %e),
        }
    }

    /// Waits until the active has caught this joining server up: it has applied the commit index
    /// the active announced when first heard. Then it votes and campaigns like any member.
    async fn catch_up(&self, shutdown: tokio_util::sync::CancellationToken) {
        let mut last_said = tokio::time::Instant::now();
        loop {
            let applied = self.raft.metrics().borrow().last_applied.map(|l| l.index);
            if let Some(target) = self.gate.catch_up_target() {
                if applied.is_some_and(|a| a >= target) {
                    if let Err(e) = self.log.set_standing(Standing::Member).await {
                        tracing::error!(event = "stripe.standing_failed", error = %e);
                        return;
                    }
                    // From here on it votes, and `crate::elections` lets it campaign.
                    self.gate.set(MAY_VOTE);
                    tracing::info!(
                        event = "stripe.joined",
                        applied = target,
                        "caught up by the active: voting again"
                    );
                    return;
                }
            }
            if last_said.elapsed() >= WAITING_LOG_EVERY {
                tracing::warn!(
                    event = "stripe.catching_up",
                    applied = ?applied,
                    target = ?self.gate.catch_up_target(),
                    "joining: waiting for the active to catch this server up (no vote until then)"
                );
                last_said = tokio::time::Instant::now();
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(FORMATION_POLL) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(hears_active: bool, last_log: Option<LogId>) -> ProbeReply {
        ProbeReply {
            initialized: true,
            last_log_index: Some(7),
            joining: false,
            hears_active,
            last_log,
        }
    }

    #[test]
    fn a_probe_answer_decodes_from_every_version() {
        let now = reply(true, Some(LogId::new(openraft::CommittedLeaderId::new(3, 2), 7)));
        assert_eq!(ProbeReply::decode(&postcard::to_allocvec(&now).unwrap()).unwrap(), now);

        #[derive(Serialize)]
        struct V2 {
            initialized: bool,
            last_log_index: Option<u64>,
            joining: bool,
            hears_active: bool,
        }
        let v2 = V2 {
            initialized: true,
            last_log_index: Some(7),
            joining: false,
            hears_active: true,
        };
        let decoded = ProbeReply::decode(&postcard::to_allocvec(&v2).unwrap()).unwrap();
        assert_eq!(
            decoded,
            reply(true, None),
            "a server before last_log: no log to compare"
        );

        let v1 = postcard::to_allocvec(&(true, Some(7u64), false)).unwrap();
        assert_eq!(ProbeReply::decode(&v1).unwrap(), reply(false, None));
    }

    #[test]
    fn a_damaged_probe_answer_is_an_error_not_a_default() {
        let mut bytes = postcard::to_allocvec(&reply(true, None)).unwrap();
        // An Option's tag other than 0 or 1.
        *bytes.last_mut().unwrap() = 7;
        assert!(ProbeReply::decode(&bytes).is_err());
        assert!(ProbeReply::decode(&[1]).is_err(), "cut short inside the first fields");
    }
}
