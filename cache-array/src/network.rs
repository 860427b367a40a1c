//! Raft traffic between the servers of a stripe, on the group port.
//!
//! Outgoing: openraft asks [`PeerNetworkFactory`] for a client per target; every client for the
//! same target shares one pipelined, authenticated connection (the root crate's
//! [`Connection`]), re-dialled when it breaks. Incoming: [`serve_peers`] accepts authenticated
//! peers and hands each call to the local Raft node.
//!
//! openraft's messages travel as postcard bytes inside the protocol's `PeerCall`/`PeerReply`
//! frames, so the protocol module stays free of openraft.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferrocotta::client::{CallError, Connection};
use ferrocotta::handshake::{self, ClientIdentity, ServerIdentity};
use ferrocotta::protocol::{decode, encode, ClientMessage, PeerRpc, ServerMessage};
use futures::StreamExt;
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::types::{NodeId, Raft, TypeConfig};

/// Longest a dial to a peer may take before the call is reported unreachable.
pub const PEER_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Raft calls one peer connection may have in flight on the receiving side; beyond it the
/// receiver stops reading that connection until calls finish.
pub const PEER_CALLS_IN_FLIGHT_MAX: usize = 256;

/// Replies queued for the writer of one incoming peer connection.
pub const PEER_REPLY_QUEUE_MAX: usize = 1024;

/// Largest frame between peers: large enough for a snapshot chunk plus a batch of entries.
pub const PEER_MAX_FRAME_BYTES: usize = 64 * 1024 * 1024;

/// One target server and its shared connection.
struct PeerLink {
    /// Group address of the target.
    addr: String,
    /// The live connection, if any.
    conn: tokio::sync::Mutex<Option<Arc<Connection>>>,
}

/// Builds openraft network clients for the other servers of this stripe.
#[derive(Clone)]
pub struct PeerNetworkFactory {
    /// How this server introduces itself to peers.
    identity: ClientIdentity,
    /// Links by target node id; one per peer for the life of the server.
    links: Arc<Mutex<HashMap<NodeId, Arc<PeerLink>>>>,
    /// Group addresses of the stripe's servers by node id.
    addrs: Arc<HashMap<NodeId, String>>,
}

impl PeerNetworkFactory {
    /// A factory for a stripe whose servers have these group addresses.
    pub fn new(identity: ClientIdentity, addrs: HashMap<NodeId, String>) -> Self {
        PeerNetworkFactory {
            identity,
            links: Arc::new(Mutex::new(HashMap::new())),
            addrs: Arc::new(addrs),
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for PeerNetworkFactory {
    type Network = PeerNetwork;

    async fn new_client(&mut self, target: NodeId, _node: &openraft::EmptyNode) -> PeerNetwork {
        let addr = self.addrs.get(&target).cloned().unwrap_or_default();
        let link = self
            .links
            .lock()
            .expect("links lock")
            .entry(target)
            .or_insert_with(|| {
                Arc::new(PeerLink {
                    addr,
                    conn: tokio::sync::Mutex::new(None),
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
            PEER_MAX_FRAME_BYTES,
        )
        .await
        .map_err(|e| LinkError(format!("dial {}: {e}", self.link.addr)))?;
        let conn = Connection::start(framed, welcome);
        *slot = Some(conn.clone());
        Ok(conn)
    }

    async fn call<Req: Serialize, Resp: DeserializeOwned, E>(
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
            Ok(b) => b,
            Err(CallError::TimedOut) => {
                return Err(RPCError::Unreachable(Unreachable::new(&LinkError(format!(
                    "no reply from node {} within {:?}",
                    self.target,
                    option.hard_ttl()
                )))))
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
        // A dead peer is re-dialled every 200ms: fast enough that a restarted server catches up at
        // once, slow enough not to spin.
        openraft::network::Backoff::new(std::iter::repeat(Duration::from_millis(200)))
    }
}

/// Accepts peers on the group port until `shutdown`.
pub async fn serve_peers(
    listener: TcpListener,
    raft: Raft,
    identity: Arc<ServerIdentity>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        let (stream, remote) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(event = "peer.accept_failed", error = %e);
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let raft = raft.clone();
        let identity = identity.clone();
        let shutdown = shutdown.clone();
        let inner_tracker = tracker.clone();
        tracker.spawn(async move {
            let (framed, hello) =
                match handshake::accept(stream, &identity, Duration::from_secs(5), PEER_MAX_FRAME_BYTES).await {
                    Ok(ok) => ok,
                    Err(e) => {
                        tracing::warn!(event = "peer.handshake_failed", remote = %remote, error = %e);
                        return;
                    }
                };
            tracing::debug!(event = "peer.connected", remote = %remote, role = ?hello.role);
            serve_peer_connection(framed, raft, shutdown, inner_tracker).await;
        });
    }
}

async fn serve_peer_connection(
    framed: handshake::FramedConn,
    raft: Raft,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let (sink, mut stream) = framed.split();
    let (tx, rx) = mpsc::channel::<bytes::Bytes>(PEER_REPLY_QUEUE_MAX);
    let writer = tokio::spawn(handshake::write_frames(sink, rx));
    let in_flight = Arc::new(Semaphore::new(PEER_CALLS_IN_FLIGHT_MAX));
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => break,
            n = stream.next() => n,
        };
        let bytes = match next {
            None => break,
            Some(Err(e)) => {
                tracing::warn!(event = "peer.bad_frame", error = %e);
                let _ = tx.send(encode(&ServerMessage::Fatal(format!("bad frame: {e}")))).await;
                break;
            }
            Some(Ok(b)) => b,
        };
        let (id, rpc, payload) = match decode::<ClientMessage>(&bytes) {
            Ok(ClientMessage::PeerCall { id, rpc, payload }) => (id, rpc, payload),
            Ok(_) => {
                let _ = tx
                    .send(encode(&ServerMessage::Fatal("only Raft calls are served here".into())))
                    .await;
                break;
            }
            Err(e) => {
                tracing::warn!(event = "peer.malformed_frame", error = %e);
                let _ = tx
                    .send(encode(&ServerMessage::Fatal(format!("malformed frame: {e}"))))
                    .await;
                break;
            }
        };
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break;
        };
        let raft = raft.clone();
        let tx = tx.clone();
        tracker.spawn(async move {
            let reply = handle_call(&raft, rpc, &payload).await;
            match reply {
                Ok(payload) => {
                    let _ = tx.send(encode(&ServerMessage::PeerReply { id, payload })).await;
                }
                Err(e) => {
                    tracing::warn!(event = "peer.undecodable_call", rpc = ?rpc, error = %e);
                    let _ = tx.send(encode(&ServerMessage::Fatal(e))).await;
                }
            }
            drop(permit);
        });
    }
    drop(tx);
    let _ = writer.await;
}

fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, String> {
    postcard::from_bytes(payload).map_err(|e| format!("undecodable Raft call: {e}"))
}

fn encode_payload<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_allocvec(value).expect("Raft replies always encode")
}

async fn handle_call(raft: &Raft, rpc: PeerRpc, payload: &[u8]) -> Result<Vec<u8>, String> {
    Ok(match rpc {
        PeerRpc::AppendEntries => {
            let req: AppendEntriesRequest<TypeConfig> = decode_payload(payload)?;
            encode_payload(&raft.append_entries(req).await)
        }
        PeerRpc::Vote => {
            let req: VoteRequest<NodeId> = decode_payload(payload)?;
            encode_payload(&raft.vote(req).await)
        }
        PeerRpc::InstallSnapshot => {
            let req: InstallSnapshotRequest<TypeConfig> = decode_payload(payload)?;
            encode_payload(&raft.install_snapshot(req).await)
        }
    })
}
