//! What the fuzz tests of every crate share: running a property for a number of cases, and
//! damaging valid encodings. Included by `tests/fuzz_decoders.rs` and by cache-array's
//! `src/fuzz.rs` (`#[path]`), so both crates fuzz the same way.

#![allow(dead_code)] // each includer uses its own part

use ferrocotta::protocol::{
    CacheSettings, Expiry, Guard, LockMode, Op, PutOptions, ReadConsistency, ReadOp, SessionOp, Step, Txn, WriteOp,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

/// Cases of each property in the normal suite.
pub const SUITE_CASES: u32 = 512;

/// Cases of each property in a `fuzz_*` run, unless FERROCOTTA_FUZZ_CASES says otherwise.
pub const FUZZ_CASES_DEFAULT: u32 = 50_000;

/// Cases of a `fuzz_*` run.
pub fn fuzz_cases() -> u32 {
    std::env::var("FERROCOTTA_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(FUZZ_CASES_DEFAULT)
}

/// Runs a property for `cases` cases; panics with the minimized failing input.
pub fn run<S: Strategy>(cases: u32, strategy: S, property: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S::Value: std::fmt::Debug,
{
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    if let Err(e) = runner.run(&strategy, property) {
        panic!("{e}");
    }
    eprintln!("{cases} cases passed");
}

/// Random bytes, fewer than `max`.
pub fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> + Clone {
    prop::collection::vec(any::<u8>(), 0..max)
}

/// Random text of any characters, fewer than `max`.
pub fn text(max: usize) -> impl Strategy<Value = String> + Clone {
    prop::collection::vec(any::<char>(), 0..max).prop_map(|c| c.into_iter().collect())
}

/// How to damage an encoding: bytes to flip, where to cut it, bytes to put in.
pub type Mutation = (Vec<(usize, u8)>, Option<usize>, Vec<u8>);

/// Damages to apply to a valid encoding.
pub fn mutations() -> impl Strategy<Value = Mutation> {
    (
        prop::collection::vec((any::<usize>(), 1..=255u8), 0..6),
        any::<Option<usize>>(),
        bytes(8),
    )
}

/// A valid encoding damaged: bytes flipped, cut short, or random bytes put in.
pub fn mutated(valid: Vec<u8>, (flips, cut, insert): &Mutation) -> Vec<u8> {
    let mut out = valid;
    for &(at, x) in flips {
        if !out.is_empty() {
            let i = at % out.len();
            out[i] ^= x;
        }
    }
    if let Some(c) = cut {
        out.truncate(c % (out.len() + 1));
    }
    if !insert.is_empty() {
        let at = insert[0] as usize % (out.len() + 1);
        out.splice(at..at, insert.iter().copied());
    }
    out
}

/// Either consistency.
pub fn read() -> impl Strategy<Value = ReadConsistency> {
    prop_oneof![Just(ReadConsistency::Linearizable), Just(ReadConsistency::Eventual)]
}

/// Operations of every kind, with small random fields.
pub fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        Just(Op::Ping),
        (read_op(), read()).prop_map(|(op, read)| Op::Read(op, read)),
        write_op().prop_map(Op::Write),
        session_op().prop_map(Op::Session),
    ]
}

/// Reads of every kind.
pub fn read_op() -> impl Strategy<Value = ReadOp> {
    let cache = text(12);
    prop_oneof![
        (cache.clone(), bytes(16)).prop_map(|(cache, key)| ReadOp::Get { cache, key }),
        (cache.clone(), prop::collection::vec(bytes(8), 0..5)).prop_map(|(cache, keys)| ReadOp::GetAll { cache, keys }),
        (cache.clone(), bytes(16)).prop_map(|(cache, key)| ReadOp::Contains { cache, key }),
        (cache.clone(), bytes(8), any::<Option<Vec<u8>>>(), any::<u32>()).prop_map(|(cache, prefix, after, limit)| {
            ReadOp::Keys {
                cache,
                prefix,
                after,
                limit,
            }
        }),
        cache.clone().prop_map(|cache| ReadOp::Size { cache }),
        any::<Option<String>>().prop_map(|cache| ReadOp::ListLocks { cache }),
        (cache.clone(), prop::collection::vec(bytes(8), 0..5))
            .prop_map(|(cache, keys)| ReadOp::Entries { cache, keys }),
        Just(ReadOp::Time),
    ]
}

/// Changes of cache data of every kind.
pub fn write_op() -> impl Strategy<Value = WriteOp> {
    let cache = text(12);
    prop_oneof![
        (
            cache.clone(),
            bytes(16),
            bytes(64),
            any::<Option<u64>>(),
            any::<Option<u64>>(),
            any::<bool>()
        )
            .prop_map(|(cache, key, value, ttl_ms, session, absent)| {
                let opts = PutOptions {
                    ttl_ms,
                    tti_ms: None,
                    session,
                };
                if absent {
                    WriteOp::PutIfAbsent {
                        cache,
                        key,
                        value,
                        opts,
                    }
                } else {
                    WriteOp::Put {
                        cache,
                        key,
                        value,
                        opts,
                    }
                }
            }),
        (cache.clone(), prop::collection::vec((bytes(8), bytes(16)), 0..5))
            .prop_map(|(cache, entries)| WriteOp::PutAll { cache, entries }),
        (cache.clone(), bytes(8), bytes(8)).prop_map(|(cache, key, value)| WriteOp::Replace { cache, key, value }),
        (cache.clone(), bytes(8), bytes(8), bytes(8)).prop_map(|(cache, key, expected, value)| {
            WriteOp::ReplaceIfEqual {
                cache,
                key,
                expected,
                value,
            }
        }),
        (cache.clone(), bytes(8)).prop_map(|(cache, key)| WriteOp::Remove { cache, key }),
        (cache.clone(), bytes(8), bytes(8)).prop_map(|(cache, key, expected)| WriteOp::RemoveIfEqual {
            cache,
            key,
            expected
        }),
        cache.clone().prop_map(|cache| WriteOp::Clear { cache }),
        (cache.clone(), bytes(8), any::<i64>()).prop_map(|(cache, key, delta)| WriteOp::Increment {
            cache,
            key,
            delta
        }),
        (cache.clone(), any::<Option<u64>>(), any::<Option<u64>>()).prop_map(|(cache, max_entries, ttl_ms)| {
            WriteOp::CreateCache {
                cache,
                settings: CacheSettings {
                    max_entries,
                    ttl_ms,
                    tti_ms: None,
                },
            }
        }),
        (
            prop::collection::vec(guard(), 0..3),
            prop::collection::vec(step(), 0..4),
            prop::collection::vec(step(), 0..3)
        )
            .prop_map(|(guards, then, otherwise)| WriteOp::Txn(Txn {
                guards,
                then,
                otherwise
            })),
    ]
}

/// A transaction's guard on one of a few keys (so guards and steps meet).
fn guard() -> impl Strategy<Value = Guard> {
    (0..3u8, bytes(3), bytes(8)).prop_map(|(kind, key, value)| {
        let cache = "t".to_string();
        match kind {
            0 => Guard::Present { cache, key },
            1 => Guard::Absent { cache, key },
            _ => Guard::ValueIs { cache, key, value },
        }
    })
}

fn expiry() -> impl Strategy<Value = Expiry> {
    prop_oneof![
        Just(Expiry::Default),
        Just(Expiry::Keep),
        Just(Expiry::Never),
        any::<u64>().prop_map(Expiry::AfterMs),
        any::<u64>().prop_map(Expiry::AtMs),
    ]
}

/// A transaction's step on one of a few keys.
fn step() -> impl Strategy<Value = Step> {
    (0..6u8, bytes(3), bytes(8), expiry(), any::<i64>()).prop_map(|(kind, key, value, expiry, delta)| {
        let cache = "t".to_string();
        match kind {
            0 => Step::Get { cache, key },
            1 => Step::Put {
                cache,
                key,
                value,
                expiry,
            },
            2 => Step::Remove { cache, key },
            3 => Step::SetExpiry { cache, key, expiry },
            4 => Step::Append { cache, key, value },
            _ => Step::Increment { cache, key, delta },
        }
    })
}

/// Session operations of every kind.
pub fn session_op() -> impl Strategy<Value = SessionOp> {
    let cache = text(12);
    prop_oneof![
        (text(16), any::<u64>()).prop_map(|(client_name, client_id)| SessionOp::Open { client_name, client_id }),
        any::<u64>().prop_map(|session| SessionOp::KeepAlive { session }),
        any::<u64>().prop_map(|session| SessionOp::Close { session }),
        (cache.clone(), bytes(8), any::<bool>(), any::<u64>(), any::<i64>()).prop_map(
            |(cache, key, shared, session, wait_ms)| SessionOp::Lock {
                cache,
                key,
                mode: if shared { LockMode::Shared } else { LockMode::Exclusive },
                session,
                wait_ms
            }
        ),
        (cache, bytes(8), any::<u64>()).prop_map(|(cache, key, session)| SessionOp::Unlock { cache, key, session }),
    ]
}
