//! The on-disk formats kept readable: a log and a snapshot written by an earlier build, kept as a
//! fixture (`tests/fixtures/format-1/`), must decode to what that build wrote and apply to the
//! state its snapshot holds. A rolling upgrade depends on it: a new server replays the log and
//! loads the snapshot an old one left, and receives entries an old active sends.
//!
//! When a change of the log or snapshot types makes this fail, the format changed: either make the
//! new types read the old bytes, or raise `STORE_FORMAT_VERSION` (and the snapshot magic), keep
//! this fixture for the upgrade path and write a new one with `cargo test -p cache-array
//! format_fixture::write -- --ignored`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use openraft::{CommittedLeaderId, EntryPayload, Membership};

use crate::command::{Change, Command, CommandKind, Lock, OpenSession, SessionOf, Unlock};
use crate::log_store::LogStore;
use crate::snapshot_file::decode_snapshot;
use crate::state_machine::StateMachineStore;
use crate::types::{Entry, LogId};
use ferrocotta::protocol::{CacheSettings, LockMode, PutOptions, WriteOp};

/// The fixture this build must read.
const FIXTURE: &str = "tests/fixtures/format-1";
/// One entry's bytes as the log store keeps them, by index.
const LOG_FILE: &str = "log.bin";
/// The snapshot file after every entry of the log was applied.
const SNAPSHOT_FILE: &str = "snapshot.bin";

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(FIXTURE)
}

fn log_id(index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(2, 1), index)
}

/// Every kind of entry the log holds, each change kind at least once, in an order that applies
/// cleanly. A session's id is the index of the entry that opened it: node1 4, node2 15, node3 23.
fn sample_entries() -> Vec<Entry> {
    let c = || "orders".to_string();
    let k = |s: &str| s.as_bytes().to_vec();
    let changes: Vec<CommandKind> = vec![
        CommandKind::Client(write_change(WriteOp::CreateCache {
            cache: c(),
            settings: CacheSettings {
                max_entries: Some(100),
                ttl_ms: Some(60_000),
                tti_ms: None,
            },
        })),
        CommandKind::Client(Change::OpenSession(OpenSession {
            client_name: "node1".into(),
            client_id: None,
        })),
        CommandKind::Client(write_change(WriteOp::Put {
            cache: c(),
            key: k("a"),
            value: k("1"),
            opts: PutOptions {
                ttl_ms: Some(90_000),
                tti_ms: Some(30_000),
                session: None,
            },
        })),
        CommandKind::Client(write_change(WriteOp::PutAll {
            cache: c(),
            entries: vec![(k("b"), k("2")), (k("c"), k("3"))],
        })),
        CommandKind::Client(write_change(WriteOp::PutIfAbsent {
            cache: c(),
            key: k("d"),
            value: k("4"),
            opts: PutOptions {
                ttl_ms: None,
                tti_ms: None,
                session: Some(4),
            },
        })),
        CommandKind::Client(write_change(WriteOp::Replace {
            cache: c(),
            key: k("a"),
            value: k("5"),
        })),
        CommandKind::Client(write_change(WriteOp::ReplaceIfEqual {
            cache: c(),
            key: k("b"),
            expected: k("2"),
            value: k("6"),
        })),
        CommandKind::Client(write_change(WriteOp::Remove {
            cache: c(),
            key: k("c"),
        })),
        CommandKind::Client(write_change(WriteOp::RemoveIfEqual {
            cache: c(),
            key: k("b"),
            expected: k("6"),
        })),
        CommandKind::Client(write_change(WriteOp::Increment {
            cache: "counters".into(),
            key: k("n"),
            delta: -7,
        })),
        CommandKind::Client(Change::Lock(Lock {
            cache: c(),
            key: k("l"),
            mode: LockMode::Shared,
            session: 4,
            wait_ms: -1,
        })),
        CommandKind::Client(Change::Lock(Lock {
            cache: c(),
            key: k("l"),
            mode: LockMode::Shared,
            session: 4,
            wait_ms: 0,
        })),
        CommandKind::Client(Change::OpenSession(OpenSession {
            client_name: "node2".into(),
            client_id: None,
        })),
        CommandKind::Client(Change::Lock(Lock {
            cache: c(),
            key: k("x"),
            mode: LockMode::Exclusive,
            session: 15,
            wait_ms: 500,
        })),
        CommandKind::Client(Change::Lock(Lock {
            cache: c(),
            key: k("l"),
            mode: LockMode::Exclusive,
            session: 15,
            wait_ms: 500,
        })),
        CommandKind::LockWaitCancel {
            cache: c(),
            key: k("l"),
            session: 15,
        },
        CommandKind::Client(Change::Unlock(Unlock {
            cache: c(),
            key: k("l"),
            session: 4,
        })),
        CommandKind::Touch(vec![(c(), k("a"), 1_700_000_000_500)]),
        CommandKind::Batch(vec![
            write_change(WriteOp::Put {
                cache: "scratch".into(),
                key: k("s"),
                value: vec![0, 255, 7],
                opts: PutOptions::default(),
            }),
            write_change(WriteOp::Clear {
                cache: "scratch".into(),
            }),
            write_change(WriteOp::Increment {
                cache: "counters".into(),
                key: k("n"),
                delta: 10,
            }),
        ]),
        CommandKind::Expire(vec![(c(), k("a")), ("counters".into(), k("gone"))]),
        CommandKind::Client(Change::OpenSession(OpenSession {
            client_name: "node3".into(),
            client_id: None,
        })),
        CommandKind::Client(Change::CloseSession(SessionOf { session: 23 })),
        CommandKind::ExpireSessions(vec![15, 99]),
    ];
    let mut entries = vec![
        Entry {
            log_id: log_id(1),
            payload: EntryPayload::Blank,
        },
        Entry {
            log_id: log_id(2),
            payload: EntryPayload::Membership(Membership::new(vec![BTreeSet::from([1, 2, 3])], None)),
        },
    ];
    for (i, kind) in changes.into_iter().enumerate() {
        let index = entries.len() as u64 + 1;
        entries.push(Entry {
            log_id: log_id(index),
            payload: EntryPayload::Normal(Command {
                at_ms: 1_700_000_000_000 + 1_000 * i as u64,
                kind,
            }),
        });
    }
    entries
}

/// The state machine after applying `entries`, and its snapshot file's bytes.
async fn applied(entries: Vec<Entry>) -> (StateMachineStore, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let configured = BTreeMap::from([("counters".to_string(), CacheSettings::default())]);
    let mut sm = StateMachineStore::open(dir.path(), configured).unwrap();
    sm.apply(entries).await.unwrap();
    let mut builder = sm.get_snapshot_builder().await;
    builder.build_snapshot().await.unwrap();
    let bytes = std::fs::read(dir.path().join("snapshot.bin")).unwrap();
    (sm, bytes)
}

/// Writes the fixture of this build's format (run by hand when the format changes).
#[tokio::test]
#[ignore = "writes the fixture; run by hand when the log or snapshot format changes"]
async fn write() {
    let dir = fixture_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let entries = sample_entries();
    let log: Vec<(u64, Vec<u8>)> = entries
        .iter()
        .map(|e| (e.log_id.index, LogStore::encode_entry(e)))
        .collect();
    std::fs::write(dir.join(LOG_FILE), postcard::to_allocvec(&log).unwrap()).unwrap();
    let (_, snapshot) = applied(entries).await;
    std::fs::write(dir.join(SNAPSHOT_FILE), snapshot).unwrap();
}

#[tokio::test]
async fn the_log_and_snapshot_of_the_previous_format_still_read() {
    let dir = fixture_dir();
    let log: Vec<(u64, Vec<u8>)> = postcard::from_bytes(&std::fs::read(dir.join(LOG_FILE)).unwrap()).unwrap();
    let expected = sample_entries();
    assert_eq!(log.len(), expected.len());
    let mut decoded = Vec::new();
    for ((index, bytes), want) in log.iter().zip(&expected) {
        let entry = LogStore::decode_entry(*index, bytes).unwrap();
        assert_eq!(&entry, want, "entry {index} decodes to something else");
        assert_eq!(
            &LogStore::encode_entry(&entry),
            bytes,
            "entry {index} encodes differently now"
        );
        decoded.push(entry);
    }
    let old = decode_snapshot(&std::fs::read(dir.join(SNAPSHOT_FILE)).unwrap()).unwrap();
    let (sm, _) = applied(decoded).await;
    let mut store = old.store;
    store.rebuild_indexes();
    sm.shared().read(|d| {
        assert_eq!(d.last_applied, old.head.last_applied);
        assert_eq!(d.last_applied, Some(log_id(expected.len() as u64)));
        assert_eq!(d.last_membership, old.head.last_membership);
        assert_eq!(
            d.store, store,
            "replaying the old log gives another state than its snapshot"
        );
    });
    // The sample reaches every part of the store.
    assert!(!store.caches.is_empty() && !store.locks.is_empty() && !store.sessions.is_empty());
}

/// The log's form of a write (no transaction here, so the value limit plays no part).
fn write_change(op: WriteOp) -> Change {
    Change::of_write(op, u64::MAX)
}
