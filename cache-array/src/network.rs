//! Raft traffic between the servers of a stripe, on the group port.
//!
//! Outgoing: openraft asks [`PeerNetworkFactory`] for a client per target; every client for the
//! same target shares one pipelined, authenticated connection (the root crate's
//! [`Connection`]), re-dialled when it breaks. Incoming: [`PeerService::serve`] accepts
//! authenticated peers and hands each call to the local Raft node.
//!
//! Who may talk here: a peer proves the **peer secret**, which no client holds (a client
//! credential is refused on this port whatever its secret), names itself, and must be another
//! server of this stripe; with TLS its certificate must name it too. Every Raft message it then
//! sends must come from the node it authenticated as: an AppendEntries, Vote or InstallSnapshot
//! whose vote names another node is a forgery, logged, and ends the connection. Votes also pass
//! the [`VoteGate`]: a server that is joining after losing its data does not vote.
//!
//! openraft's messages travel as postcard bytes inside the protocol's `PeerCall`/`PeerReply`
//! frames, so the protocol module stays free of openraft.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferrocotta::handshake::{self, ClientIdentity, FrameDeadlines, FramedConn};
use ferrocotta::log_throttle::LogThrottle;
use ferrocotta::pipelined::{CallError, Connection};
use ferrocotta::protocol::{decode, encode, ClientMessage, ConnectionRole, Hello, PeerRpc, Refusal, ServerMessage};
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::elections::Elections;
use crate::formation::{ProbeError, ProbeReply, VoteGate};
use crate::listener::{self, HandshakeFailed, Listening, Port};
use crate::log_store::LogStore;
use crate::mark::Standing;
use crate::roster::LiveRoster;
use crate::types::{NodeId, Raft, TypeConfig};

/// Longest a dial to a peer may take before the call is reported unreachable.
pub const PEER_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Raft calls one peer connection may have in flight on the receiving side; beyond it the
/// receiver stops reading that connection until calls finish.
pub const PEER_CALLS_IN_FLIGHT_MAX: usize = 256;

/// Replies queued for the writer of one incoming peer connection.
pub const PEER_REPLY_QUEUE_MAX: usize = 1024;

/// How often a dead peer is dialled again: fast enough that a restarted server catches up at once,
/// slow enough not to spin.
pub const PEER_REDIAL_INTERVAL: Duration = Duration::from_millis(200);

/// A peer connection that has answered no call for this long is dropped at the next timeout and
/// dialled again.
pub const PEER_STALE_AFTER: Duration = Duration::from_secs(1);

/// Largest frame between peers: large enough for a snapshot chunk plus a batch of entries.
pub const PEER_FRAME_BYTES_MAX: usize = 64 * 1024 * 1024;

/// One target server and its shared connection.
struct PeerLink {
    /// Group address of the target.
    addr: String,
    /// The live connection, if any.
    conn: tokio::sync::Mutex<Option<Arc<Connection>>>,
    /// When a call on this link last got an answer (or its connection was made).
    answered: Mutex<Instant>,
    /// The outage being reported, if any.
    outage: Mutex<Outage>,
}

/// A peer that stopped answering, as logged.
#[derive(Default)]
struct Outage {
    /// Since when it answered nothing, once reported.
    since: Option<Instant>,
    /// Calls that failed since its last answer.
    failed_calls: u64,
}

/// Builds openraft network clients for the other servers of this stripe.
#[derive(Clone)]
pub struct PeerNetworkFactory {
    /// How this server introduces itself to peers.
    identity: ClientIdentity,
    /// Links by target node id; one per peer for the life of the server.
    links: Arc<Mutex<HashMap<NodeId, Arc<PeerLink>>>>,
    /// The stripe's servers, whose group addresses it dials.
    roster: Arc<LiveRoster>,
}

impl PeerNetworkFactory {
    /// A factory for the stripe of this roster.
    pub fn new(identity: ClientIdentity, roster: Arc<LiveRoster>) -> Self {
        PeerNetworkFactory {
            identity,
            links: Arc::new(Mutex::new(HashMap::new())),
            roster,
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for PeerNetworkFactory {
    type Network = PeerNetwork;

    async fn new_client(&mut self, target: NodeId, _node: &openraft::EmptyNode) -> PeerNetwork {
        let addr = self.roster.group_addr(target).unwrap_or_default();
        let link = self
            .links
            .lock()
            .expect("links lock")
            .entry(target)
            .or_insert_with(|| {
                Arc::new(PeerLink {
                    addr,
                    conn: tokio::sync::Mutex::new(None),
                    answered: Mutex::new(Instant::now()),
                    outage: Mutex::new(Outage::default()),
                })
            })
            .clone();
        PeerNetwork {
            target,
            link,
            identity: self.identity.clone(),
        }
    }
}

/// An openraft network client for one target.
pub struct PeerNetwork {
    target: NodeId,
    link: Arc<PeerLink>,
    identity: ClientIdentity,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct LinkError(String);

impl PeerNetwork {
    async fn connection(&self) -> Result<Arc<Connection>, LinkError> {
        let mut slot = self.link.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            if !c.is_closed() {
                return Ok(c.clone());
            }
        }
        *slot = None;
        if self.link.addr.is_empty() {
            return Err(LinkError(format!("node {} is not in the config", self.target)));
        }
        let (framed, welcome) = handshake::connect(
            &self.link.addr,
            &self.identity,
            PEER_CONNECT_TIMEOUT,
            PEER_FRAME_BYTES_MAX,
        )
        .await
        .map_err(|e| LinkError(format!("dial {}: {e}", self.link.addr)))?;
        let conn = Connection::start(framed, welcome, None);
        *slot = Some(conn.clone());
        *self.link.answered.lock().expect("answered lock") = Instant::now();
        Ok(conn)
    }

    /// One Raft call. openraft logs every failed call (about every 300 ms to a dead peer; the
    /// server's log filter drops those lines); this logs once when a peer has answered nothing
    /// for [`PEER_STALE_AFTER`] (`peer.unreachable`) and once when it answers again
    /// (`peer.reachable`, with the calls that failed meanwhile).
    async fn call<Req: Serialize, Resp: DeserializeOwned, E>(
        &self,
        rpc: PeerRpc,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, openraft::EmptyNode, RaftError<NodeId, E>>>
    where
        E: std::error::Error + DeserializeOwned,
    {
        let result = self.call_once(rpc, req, option).await;
        let mut outage = self.link.outage.lock().expect("outage lock");
        match &result {
            Err(RPCError::Unreachable(e)) => {
                outage.failed_calls += 1;
                let silent = self.link.answered.lock().expect("answered lock").elapsed();
                if outage.since.is_none() && silent >= PEER_STALE_AFTER {
                    outage.since = Some(Instant::now() - silent);
                    tracing::warn!(
                        event = "peer.unreachable",
                        peer = self.target,
                        addr = %self.link.addr,
                        error = %e,
                        "no answer from this peer for {silent:.1?}; dialling it again every {PEER_REDIAL_INTERVAL:?}"
                    );
                }
            }
            Err(_) => {}
            Ok(_) => {
                if let Some(since) = outage.since.take() {
                    tracing::info!(
                        event = "peer.reachable",
                        peer = self.target,
                        down_for = ?since.elapsed(),
                        failed_calls = outage.failed_calls,
                        "the peer answers again"
                    );
                }
                outage.failed_calls = 0;
            }
        }
        result
    }

    async fn call_once<Req: Serialize, Resp: DeserializeOwned, E>(
        &self,
        rpc: PeerRpc,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, openraft::EmptyNode, RaftError<NodeId, E>>>
    where
        E: std::error::Error + DeserializeOwned,
    {
        let payload = postcard::to_allocvec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let conn = self
            .connection()
            .await
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
        let bytes = match conn.call_peer(rpc, payload, option.hard_ttl()).await {
            Ok(b) => {
                *self.link.answered.lock().expect("answered lock") = Instant::now();
                b
            }
            Err(CallError::TimedOut) => {
                // A connection that has answered nothing for a while is likely dead without a
                // reset (a link that went down and came back leaves TCP retransmitting with
                // growing pauses): dial afresh instead of waiting for it.
                if self.link.answered.lock().expect("answered lock").elapsed() >= PEER_STALE_AFTER {
                    let mut slot = self.link.conn.lock().await;
                    if slot.as_ref().is_some_and(|c| Arc::ptr_eq(c, &conn)) {
                        tracing::debug!(event = "peer.connection_stale", target = self.target);
                        *slot = None;
                    }
                }
                return Err(RPCError::Unreachable(Unreachable::new(&LinkError(format!(
                    "no reply from node {} within {:?}",
                    self.target,
                    option.hard_ttl()
                )))));
            }
            Err(e) => return Err(RPCError::Unreachable(Unreachable::new(&LinkError(format!("{e:?}"))))),
        };
        let result: Result<Resp, RaftError<NodeId, E>> =
            postcard::from_bytes(&bytes).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerNetwork {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, openraft::EmptyNode, RaftError<NodeId>>> {
        self.call(PeerRpc::AppendEntries, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, openraft::EmptyNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call(PeerRpc::InstallSnapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, openraft::EmptyNode, RaftError<NodeId>>> {
        self.call(PeerRpc::Vote, &rpc, &option).await
    }

    fn backoff(&self) -> openraft::network::Backoff {
        openraft::network::Backoff::new(std::iter::repeat(PEER_REDIAL_INTERVAL))
    }
}

/// One call without payload to a peer, over a connection of its own (each of handshake and call
/// within `timeout`); the reply's bytes.
async fn one_call(
    addr: &str,
    identity: &ClientIdentity,
    rpc: PeerRpc,
    timeout: Duration,
) -> Result<Vec<u8>, ProbeError> {
    let (framed, welcome) = handshake::connect(addr, identity, timeout, PEER_FRAME_BYTES_MAX).await?;
    let conn = Connection::start(framed, welcome, None);
    conn.call_peer(rpc, Vec::new(), timeout).await.map_err(ProbeError::Call)
}

/// Asks a peer what it holds (stripe formation).
pub async fn probe_peer(addr: &str, identity: &ClientIdentity, timeout: Duration) -> Result<ProbeReply, ProbeError> {
    Ok(ProbeReply::decode(
        &one_call(addr, identity, PeerRpc::Probe, timeout).await?,
    )?)
}

/// Which secret proves which role on the group port: only the peer secret, only for the other
/// servers of this stripe's roster. A removed server is told so.
pub struct PeerAuthority {
    /// The peer secret.
    pub peer_secret: Vec<u8>,
    /// The stripe's servers.
    pub roster: Arc<LiveRoster>,
}

impl handshake::Authority for PeerAuthority {
    fn secret_for(&self, role: &ConnectionRole) -> Result<Option<Vec<u8>>, Refusal> {
        match role {
            ConnectionRole::Peer { from } => {
                if let Some(why) = self.roster.retired_message(from) {
                    return Err(Refusal::NotAMember(why));
                }
                Ok(self.roster.peer_id(from).map(|_| self.peer_secret.clone()))
            }
            ConnectionRole::Client | ConnectionRole::Credential { .. } => Err(Refusal::WrongPort(
                "this is a group port; clients use the client port".into(),
            )),
        }
    }
}

/// The group port.
pub struct PeerService {
    /// The local Raft node.
    pub raft: Raft,
    /// The port: handshake identity (group flavour, with a [`PeerAuthority`]), TLS (with it, a
    /// peer's certificate must name the server it claims to be), bounds.
    pub listening: Listening,
    /// The stripe's servers.
    pub roster: Arc<LiveRoster>,
    /// Frame deadlines after it.
    pub deadlines: FrameDeadlines,
    /// Whether this server may vote.
    pub gate: Arc<VoteGate>,
    /// Index of this server's stripe (told to a server that asks for the roster).
    pub stripe: usize,
    /// The log, for the standing a probe reports.
    pub log: LogStore,
    /// When this server campaigns: told when an active is heard and when a peer's connection
    /// closes.
    pub elections: Arc<Elections>,
}

static HANDSHAKE_FAILED: LogThrottle = LogThrottle::new();
static REFUSED: LogThrottle = LogThrottle::new();

impl Port for PeerService {
    fn listening(&self) -> &Listening {
        &self.listening
    }

    async fn refused(&self, _tcp: TcpStream, remote: SocketAddr, why: String) {
        if let Some(suppressed) = REFUSED.allow() {
            tracing::warn!(event = "peer.connection_refused", remote = %remote, reason = %why, suppressed);
        }
    }

    fn handshake_failed(&self, remote: SocketAddr, error: HandshakeFailed) {
        if error.is_disconnect() {
            tracing::debug!(event = "peer.left_before_handshake", remote = %remote, error = %error);
            return;
        }
        if let Some(suppressed) = HANDSHAKE_FAILED.allow() {
            tracing::warn!(event = "peer.handshake_failed", remote = %remote, error = %error, suppressed);
        }
    }

    /// Only the servers of this stripe, each as itself: with TLS its certificate must name it.
    async fn serve_connection(
        self: Arc<Self>,
        framed: FramedConn,
        hello: Hello,
        remote: SocketAddr,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) {
        let ConnectionRole::Peer { from } = &hello.role else {
            return;
        };
        let Some(node) = self.roster.peer_id(from) else {
            return;
        };
        if self.listening.tls.is_some() && !framed.get_ref().peer_certificate_names(from) {
            tracing::error!(
                event = "peer.certificate_mismatch",
                remote = %remote,
                claimed = %from,
                "a peer proved the peer secret but its certificate does not name the server it claims to be"
            );
            return;
        }
        tracing::debug!(event = "peer.connected", remote = %remote, peer = %from);
        self.calls(framed, node, from.clone(), shutdown, tracker).await;
    }
}

impl PeerService {
    /// Serves the Raft calls of one authenticated peer.
    async fn calls(
        self: &Arc<Self>,
        framed: FramedConn,
        node: NodeId,
        name: String,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) {
        let (mut reader, writer) = handshake::split_framed(framed, self.deadlines);
        let (tx, rx) = mpsc::channel::<bytes::Bytes>(PEER_REPLY_QUEUE_MAX);
        let writer = tokio::spawn(handshake::write_frames(writer, rx, None));
        let in_flight = Arc::new(Semaphore::new(PEER_CALLS_IN_FLIGHT_MAX));
        let forged = CancellationToken::new();
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = forged.cancelled() => break,
                n = reader.next() => n,
            };
            let bytes = match next {
                Ok(None) => break,
                Err(e) if e.is_disconnect() => {
                    tracing::debug!(event = "peer.disconnected", peer = %name, error = %e);
                    break;
                }
                Err(e) => {
                    tracing::warn!(event = "peer.bad_frame", peer = %name, error = %e);
                    let _ = tx.send(listener::fatal(e.to_string())).await;
                    break;
                }
                Ok(Some(b)) => b,
            };
            let (id, rpc, payload) = match decode::<ClientMessage>(&bytes) {
                Ok(ClientMessage::PeerCall { id, rpc, payload }) => (id, rpc, payload),
                Ok(_) => {
                    let _ = tx.send(listener::fatal("only Raft calls are served here")).await;
                    break;
                }
                Err(e) => {
                    tracing::warn!(event = "peer.malformed_frame", peer = %name, error = %e);
                    let _ = tx.send(listener::fatal(format!("malformed frame: {e}"))).await;
                    break;
                }
            };
            let Ok(permit) = in_flight.clone().acquire_owned().await else {
                break;
            };
            let this = self.clone();
            let tx = tx.clone();
            let forged = forged.clone();
            let name = name.clone();
            tracker.spawn(async move {
                match this.handle_call(node, rpc, &payload).await {
                    Ok(payload) => {
                        let _ = tx.send(encode(&ServerMessage::PeerReply { id, payload })).await;
                    }
                    Err(e) => {
                        tracing::error!(event = "peer.rejected_call", peer = %name, rpc = ?rpc, error = %e);
                        let _ = tx.send(listener::fatal(e.to_string())).await;
                        forged.cancel();
                    }
                }
                drop(permit);
            });
        }
        drop(tx);
        let _ = writer.await;
        if !shutdown.is_cancelled() {
            self.elections.connection_closed(&self.raft, node);
        }
    }

    /// Serves one Raft call from the peer authenticated as `node`.
    async fn handle_call(&self, node: NodeId, rpc: PeerRpc, payload: &[u8]) -> Result<Vec<u8>, CallRefused> {
        let from_peer = |claimed: Option<NodeId>, what: &'static str| {
            if claimed == Some(node) {
                Ok(())
            } else {
                Err(CallRefused::Forged {
                    what,
                    authenticated: node,
                    claimed,
                })
            }
        };
        Ok(match rpc {
            PeerRpc::AppendEntries => {
                let req: AppendEntriesRequest<TypeConfig> = decode_payload(payload)?;
                from_peer(req.vote.leader_id().voted_for(), "AppendEntries")?;
                let commit = req.leader_commit.map(|c| c.index);
                let resp = self.raft.append_entries(req).await;
                if let Ok(r) = &resp {
                    if !matches!(r, AppendEntriesResponse::HigherVote(_)) {
                        self.elections.heard_active();
                        if let Some(c) = commit {
                            self.gate.note_leader_commit(c);
                        }
                    }
                }
                encode_payload(&resp)
            }
            PeerRpc::Vote => {
                let req: VoteRequest<NodeId> = decode_payload(payload)?;
                from_peer(req.vote.leader_id().voted_for(), "vote request")?;
                if !self.gate.may_vote() {
                    let mine = self.raft.metrics().borrow().vote;
                    tracing::info!(
                        event = "stripe.vote_withheld",
                        candidate = node,
                        term = req.vote.leader_id().term,
                        "not voting: this server is joining (or still deciding) and may have lost a vote it made"
                    );
                    let refused: Result<VoteResponse<NodeId>, RaftError<NodeId>> =
                        Ok(VoteResponse::new(mine, None, false));
                    encode_payload(&refused)
                } else {
                    let resp = self.raft.vote(req).await;
                    if resp.as_ref().is_ok_and(|r| r.vote_granted) {
                        // Give the candidate its time, as Raft's election timer does.
                        self.elections.heard_active();
                    }
                    encode_payload(&resp)
                }
            }
            PeerRpc::InstallSnapshot => {
                let req: InstallSnapshotRequest<TypeConfig> = decode_payload(payload)?;
                from_peer(req.vote.leader_id().voted_for(), "InstallSnapshot")?;
                let resp = self.raft.install_snapshot(req).await;
                if resp.is_ok() {
                    self.elections.heard_active();
                }
                encode_payload(&resp)
            }
            PeerRpc::Probe => {
                let m = self.raft.metrics().borrow().clone();
                // One source for both forms of the log's end (the purge point when later).
                let last_log = self.log.last_log_id();
                let reply = ProbeReply {
                    initialized: self.raft.is_initialized().await.unwrap_or(false),
                    last_log_index: last_log.map(|l| l.index),
                    joining: matches!(self.log.standing(), Standing::Joining { .. }),
                    hears_active: (m.current_leader == Some(m.id) && !self.elections.handing_over())
                        || self.elections.hears_active(),
                    last_log,
                };
                encode_payload(&reply)
            }
            PeerRpc::Roster => encode_payload(&RosterReply {
                stripe: self.stripe as u32,
                roster: self.roster.get().encode(),
            }),
            PeerRpc::CampaignNow => {
                // Only the active hands over, and only to a voter.
                let m = self.raft.metrics().borrow().clone();
                let voter = m.membership_config.membership().voter_ids().any(|v| v == m.id);
                let granted = m.current_leader == Some(node) && voter && self.gate.may_vote();
                if granted {
                    tracing::info!(
                        event = "stripe.handover_asked",
                        active = node,
                        "the active hands over to this server: campaigning"
                    );
                    self.elections.campaign_now(node);
                }
                encode_payload(&granted)
            }
        })
    }
}

/// A server's answer to [`PeerRpc::Roster`]: its stripe and the roster it goes by.
#[derive(Debug, Serialize, Deserialize)]
pub struct RosterReply {
    /// Index of its stripe in cluster.toml.
    pub stripe: u32,
    /// [`crate::roster::Roster::encode`]'s bytes.
    pub roster: Vec<u8>,
}

/// Asks a server of the array for its stripe's roster, as the server `identity` names (which
/// must be in that roster, or the handshake is refused).
pub async fn fetch_roster(
    addr: &str,
    identity: &ClientIdentity,
    timeout: Duration,
) -> Result<(usize, crate::roster::Roster), ProbeError> {
    let reply: RosterReply = postcard::from_bytes(&one_call(addr, identity, PeerRpc::Roster, timeout).await?)?;
    let roster = serde_json::from_slice(&reply.roster).map_err(|e| ProbeError::Roster(e.to_string()))?;
    Ok((reply.stripe as usize, roster))
}

/// Asks a mirror to campaign now (the active hands over to it); whether it agreed.
pub async fn ask_to_campaign(addr: &str, identity: &ClientIdentity, timeout: Duration) -> Result<bool, ProbeError> {
    Ok(postcard::from_bytes(
        &one_call(addr, identity, PeerRpc::CampaignNow, timeout).await?,
    )?)
}

fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, CallRefused> {
    Ok(postcard::from_bytes(payload)?)
}

/// Why a peer's Raft call was refused (the connection is closed after it).
#[derive(Debug, thiserror::Error)]
enum CallRefused {
    /// The payload is not the message the call names.
    #[error("undecodable Raft call: {0}")]
    Undecodable(#[from] postcard::Error),
    /// A message in another server's name than the one the peer authenticated as.
    #[error("forged {what}: the peer authenticated as node {authenticated} sent one in the name of {claimed:?}")]
    Forged {
        what: &'static str,
        authenticated: NodeId,
        claimed: Option<NodeId>,
    },
}

fn encode_payload<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_allocvec(value).expect("Raft replies always encode")
}
