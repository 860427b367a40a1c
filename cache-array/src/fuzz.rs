//! Structured fuzzing of what an array server reads from its disk and its peers (proptest,
//! stable Rust): log entries, snapshot files, the mark, and the Raft calls of the group port.
//! Every input gives a value or an error, never a panic; a valid encoding damaged is refused
//! (checksums), never read as something else.
//!
//! The plain tests run a bounded number of cases in the normal suite; the `fuzz_*` ones run them
//! for longer: `FERROCOTTA_FUZZ_CASES=200000 cargo test --release -p cache-array --lib -- --ignored
//! fuzz_`.

#[path = "../../tests/fuzz_support/mod.rs"]
mod fuzz_support;

use std::collections::BTreeMap;

use fuzz_support::{bytes, fuzz_cases, mutated, mutations, run, session_op, text, write_op, SUITE_CASES};
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use openraft::{CommittedLeaderId, EntryPayload, LogId, Membership, StoredMembership, Vote};
use proptest::prelude::*;

use crate::command::{Change, Command, CommandKind};
use crate::formation::ProbeReply;
use crate::log_store::LogStore;
use crate::mark::{decode_slot, Mark, Standing};
use crate::snapshot_file::{decode_snapshot, encode_snapshot_to, SnapshotHead, SnapshotPayload};
use crate::store::{ApplyContext, Store};
use crate::types::{Entry, TypeConfig};

fn log_id() -> impl Strategy<Value = LogId<u64>> {
    (any::<u64>(), 1..8u64, any::<u64>())
        .prop_map(|(term, node, index)| LogId::new(CommittedLeaderId::new(term, node), index))
}

/// Changes of every kind, as the client port makes them from requests.
fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        (write_op(), any::<u64>()).prop_map(|(op, max_value_bytes)| Change::of_write(op, max_value_bytes)),
        session_op().prop_filter_map("a keep-alive is not logged", |op| Change::try_from(op).ok()),
    ]
}

fn command() -> impl Strategy<Value = CommandKind> {
    prop_oneof![
        change().prop_map(CommandKind::Client),
        prop::collection::vec(change(), 0..4).prop_map(CommandKind::Batch),
        prop::collection::vec((text(6), bytes(6), any::<u64>()), 0..4).prop_map(CommandKind::Touch),
        prop::collection::vec((text(6), bytes(6)), 0..4).prop_map(CommandKind::Expire),
        prop::collection::vec(any::<u64>(), 0..4).prop_map(CommandKind::ExpireSessions),
        (text(6), bytes(6), any::<u64>()).prop_map(|(cache, key, session)| CommandKind::LockWaitCancel {
            cache,
            key,
            session
        }),
    ]
}

fn entry() -> impl Strategy<Value = Entry> {
    let payload = prop_oneof![
        Just(EntryPayload::Blank),
        (any::<u64>(), command()).prop_map(|(at_ms, kind)| EntryPayload::Normal(Command { at_ms, kind })),
        prop::collection::btree_set(1..8u64, 1..4)
            .prop_map(|ids| EntryPayload::Membership(Membership::new(vec![ids], None))),
    ];
    (log_id(), payload).prop_map(|(log_id, payload)| Entry { log_id, payload })
}

/// A store as a stream of random writes leaves it.
fn store() -> impl Strategy<Value = Store> {
    prop::collection::vec(change(), 0..12).prop_map(|changes| {
        let configured = BTreeMap::new();
        let mut store = Store::default();
        for (i, change) in changes.iter().enumerate() {
            let mut ctx = ApplyContext {
                now_ms: 1_000 + i as u64,
                index: i as u64,
                configured: &configured,
                grants: Vec::new(),
            };
            let _ = store.apply(change, &mut ctx);
        }
        store
    })
}

fn log_entry_property(cases: u32) {
    run(cases, (entry(), mutations()), |(entry, damage)| {
        let index = entry.log_id.index;
        let valid = LogStore::encode_entry(&entry);
        let decoded = LogStore::decode_entry(index, &valid).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(decoded.log_id, entry.log_id);
        let damaged = mutated(valid.clone(), &damage);
        if damaged != valid {
            // A damaged entry is refused by its checksum, never read as another entry.
            prop_assert!(LogStore::decode_entry(index, &damaged).is_err());
        }
        // The body alone, without the checksum in front, must not panic either.
        let _ = postcard::from_bytes::<Entry>(&mutated(valid[4..].to_vec(), &damage));
        Ok(())
    });
    run(cases, bytes(512), |raw| {
        let _ = LogStore::decode_entry(7, &raw);
        let _ = postcard::from_bytes::<Entry>(&raw);
        Ok(())
    });
}

fn snapshot_property(cases: u32) {
    run(
        cases,
        (store(), prop::option::of(log_id()), mutations()),
        |(store, last, damage)| {
            let payload = SnapshotPayload {
                head: SnapshotHead {
                    snapshot_id: "fuzz".into(),
                    last_applied: last,
                    last_membership: StoredMembership::default(),
                },
                store,
            };
            let mut out = std::io::Cursor::new(Vec::new());
            encode_snapshot_to(&mut out, &payload).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let valid = out.into_inner();
            let mut decoded = decode_snapshot(&valid)
                .map_err(|e| TestCaseError::fail(e.to_string()))?
                .store;
            // The derived indexes are not stored; loading rebuilds them.
            decoded.rebuild_indexes();
            prop_assert_eq!(&decoded, &payload.store);
            let damaged = mutated(valid.clone(), &damage);
            if damaged != valid {
                prop_assert!(decode_snapshot(&damaged).is_err(), "a damaged snapshot was read");
            }
            let _ = postcard::from_bytes::<SnapshotPayload>(&mutated(valid[20..].to_vec(), &damage));
            Ok(())
        },
    );
    run(cases, bytes(1024), |raw| {
        let _ = decode_snapshot(&raw);
        let _ = postcard::from_bytes::<SnapshotPayload>(&raw);
        Ok(())
    });
}

fn mark_property(cases: u32) {
    let mark = (
        any::<u64>(),
        prop::option::of(log_id()),
        prop::option::of(log_id()),
        any::<bool>(),
    )
        .prop_map(|(seq, last_log_id, purged, joining)| Mark {
            seq,
            format: 1,
            vote: last_log_id.map(|l| Vote::new_committed(l.leader_id.term, l.leader_id.node_id)),
            last_log_id,
            purged,
            standing: if joining {
                Standing::Joining { may_vote: false }
            } else {
                Standing::Member
            },
        });
    run(cases, (mark, mutations()), |(mark, damage)| {
        let valid = crate::mark::encode_slot(&mark);
        prop_assert_eq!(decode_slot(&valid), Some(mark));
        // Damage inside the header or body is refused; the padding after it is not read.
        let damaged = mutated(valid.clone(), &damage);
        let _ = decode_slot(&damaged);
        Ok(())
    });
    run(cases, bytes(4200), |raw| {
        let _ = decode_slot(&raw);
        Ok(())
    });
}

fn peer_call_property(cases: u32) {
    run(cases, bytes(512), |raw| {
        let _ = postcard::from_bytes::<AppendEntriesRequest<TypeConfig>>(&raw);
        let _ = postcard::from_bytes::<VoteRequest<u64>>(&raw);
        let _ = postcard::from_bytes::<InstallSnapshotRequest<TypeConfig>>(&raw);
        let _ = ProbeReply::decode(&raw);
        Ok(())
    });
    let append = (
        log_id(),
        prop::collection::vec(entry(), 0..4),
        prop::option::of(log_id()),
    )
        .prop_map(|(prev, entries, commit)| AppendEntriesRequest::<TypeConfig> {
            vote: Vote::new_committed(prev.leader_id.term, prev.leader_id.node_id),
            prev_log_id: Some(prev),
            entries,
            leader_commit: commit,
        });
    run(cases, (append, mutations()), |(req, damage)| {
        let valid = postcard::to_allocvec(&req).expect("encodes");
        let back: AppendEntriesRequest<TypeConfig> =
            postcard::from_bytes(&valid).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(back.entries.len(), req.entries.len());
        let _ = postcard::from_bytes::<AppendEntriesRequest<TypeConfig>>(&mutated(valid, &damage));
        Ok(())
    });
}

#[test]
fn log_entries_decode_or_are_refused() {
    log_entry_property(SUITE_CASES);
}

#[test]
fn snapshots_decode_or_are_refused() {
    snapshot_property(SUITE_CASES / 2);
}

#[test]
fn marks_decode_or_are_refused() {
    mark_property(SUITE_CASES);
}

#[test]
fn peer_calls_decode_or_fail_and_never_panic() {
    peer_call_property(SUITE_CASES);
}

#[test]
#[ignore = "long fuzz run: cargo test --release -p cache-array --lib -- --ignored fuzz_"]
fn fuzz_storage() {
    log_entry_property(fuzz_cases());
    snapshot_property(fuzz_cases());
    mark_property(fuzz_cases());
}

#[test]
#[ignore = "long fuzz run: cargo test --release -p cache-array --lib -- --ignored fuzz_"]
fn fuzz_peer_calls() {
    peer_call_property(fuzz_cases());
}
