//! A fake peer on the group port, on real processes (the probe's critical finding): a process
//! holding the client secret, or the peer secret under a name that is not a member of the stripe,
//! cannot complete the peer handshake; one that authenticated as a member cannot send Raft
//! messages in another node's name. It cannot vote, append or install a snapshot: no term moves, no
//! entry appears, the active stays.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::time::Duration;

use cache_array::command::{Change, Command, CommandKind};
use cache_array::types::{Entry, TypeConfig};
use common::{phase, TestArray, PEER_SECRET};
use ferrocotta::handshake::{self, ClientIdentity, HandshakeError};
use ferrocotta::pipelined::{CallError, Connection};
use ferrocotta::protocol::{ConnectionRole, PeerRpc, PutOptions, Refusal, WriteOp};
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use openraft::{CommittedLeaderId, EntryPayload, LogId, SnapshotMeta, StoredMembership, Vote};

const CACHE: &str = "c";

fn group_addr(array: &TestArray, name: &str) -> String {
    array.config.find_server(name).unwrap().1.group_addr()
}

async fn dial(
    array: &TestArray,
    target: &str,
    id: &ClientIdentity,
) -> Result<std::sync::Arc<Connection>, HandshakeError> {
    let (framed, welcome) = handshake::connect(&group_addr(array, target), id, Duration::from_secs(5), 1 << 24).await?;
    Ok(Connection::start(framed, welcome, None))
}

/// Terms and leaders as every server reports them in `/v1/status`.
fn terms_and_leaders(array: &TestArray) -> Vec<(u64, Option<String>)> {
    array
        .config
        .servers()
        .map(|(_, s)| {
            let (_, body) = common::http_get(&s.admin_addr(), "/v1/status");
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            (v["term"].as_u64().unwrap(), v["leader"].as_str().map(str::to_string))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fake_peer_can_neither_vote_append_nor_install_a_snapshot() {
    let array = TestArray::start(1, 3);
    let client = array.client().await;
    let active = array.wait_active(&client, 0, Duration::from_secs(20)).await;
    common::put_retrying(&client, CACHE, b"real", b"1").await;
    let mirror = array
        .stripe_servers(0)
        .into_iter()
        .find(|s| *s != active)
        .expect("a mirror");
    let before = terms_and_leaders(&array);
    let term = before[0].0;

    phase("the client secret does not open the group port, in any role");
    for role in [ConnectionRole::Peer { from: active.clone() }, ConnectionRole::Client] {
        match dial(&array, &mirror, &array.identity(&array.secret, role.clone())).await {
            Err(HandshakeError::Refused(r)) => {
                assert!(
                    matches!(r, Refusal::AuthenticationFailed | Refusal::WrongPort(_)),
                    "{role:?}: {r:?}"
                )
            }
            other => panic!("{role:?} with the client secret: {:?}", other.map(|_| ())),
        }
    }

    phase("the peer secret under a name that is not a member of the stripe is refused");
    match dial(
        &array,
        &mirror,
        &array.identity(PEER_SECRET, ConnectionRole::Peer { from: "a99".into() }),
    )
    .await
    {
        Err(HandshakeError::Refused(Refusal::AuthenticationFailed)) => {}
        other => panic!("an unknown peer name: {:?}", other.map(|_| ())),
    }

    phase("authenticated as a member, Raft messages in another node's name are refused and end the connection");
    let as_active = array.identity(PEER_SECRET, ConnectionRole::Peer { from: active.clone() });
    let forged_term = term + 1000;
    let forged_vote = Vote::new_committed(forged_term, 99);
    let entry = Entry {
        log_id: LogId::new(CommittedLeaderId::new(forged_term, 99), 1_000_000),
        payload: EntryPayload::Normal(Command {
            at_ms: 0,
            kind: CommandKind::Client(Change::of_write(
                WriteOp::Put {
                    cache: CACHE.into(),
                    key: b"forged".to_vec(),
                    value: b"by a fake peer".to_vec(),
                    opts: PutOptions::default(),
                },
                u64::MAX,
            )),
        }),
    };
    let append = AppendEntriesRequest::<TypeConfig> {
        vote: forged_vote,
        prev_log_id: None,
        entries: vec![entry],
        leader_commit: None,
    };
    let vote = VoteRequest::new(Vote::new(forged_term, 99), None);
    let install = InstallSnapshotRequest::<TypeConfig> {
        vote: forged_vote,
        meta: SnapshotMeta {
            last_log_id: Some(LogId::new(CommittedLeaderId::new(forged_term, 99), 1_000_000)),
            last_membership: StoredMembership::default(),
            snapshot_id: "forged".into(),
        },
        offset: 0,
        data: vec![0; 64],
        done: true,
    };
    let calls: [(PeerRpc, Vec<u8>); 3] = [
        (PeerRpc::AppendEntries, postcard::to_allocvec(&append).unwrap()),
        (PeerRpc::Vote, postcard::to_allocvec(&vote).unwrap()),
        (PeerRpc::InstallSnapshot, postcard::to_allocvec(&install).unwrap()),
    ];
    for (rpc, payload) in calls {
        let conn = dial(&array, &mirror, &as_active).await.expect("a member's handshake");
        match conn.call_peer(rpc, payload, Duration::from_secs(5)).await {
            Err(CallError::Lost(why)) => eprintln!("{rpc:?} in node 99's name: refused ({why})"),
            other => panic!(
                "{rpc:?} in another node's name was answered: {:?}",
                other.map(|b| b.len())
            ),
        }
        assert!(conn.is_closed(), "the connection of a forger is closed");
    }

    phase("nothing moved: same terms, same active, no forged entry; the mirror logged each forgery");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = terms_and_leaders(&array);
    assert_eq!(after, before, "a forged message changed a term or a leader");
    assert_eq!(client.get(CACHE, b"forged").await.unwrap(), None);
    assert_eq!(client.get(CACHE, b"real").await.unwrap(), Some(b"1".to_vec()));
    let log = array.log_text(&mirror);
    assert!(log.matches("peer.rejected_call").count() >= 3, "{log}");
}
