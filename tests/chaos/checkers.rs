//! Checkers: read a recorded history after a chaos run and list what the array got wrong. They are
//! pure functions of the history, so a failing run can be checked again from its dump.
//!
//! - `linearizable`: every key behaves like one register, each operation taking effect at one instant
//!   between its invoke and its return (Wing & Gong / Lowe search, memoized as in Porcupine).
//! - `durability`: after heal and restart, no acknowledged write is missing from the final values.
//! - `sessions`: a session's counter never goes back and skips only what unanswered requests explain.
//! - `deposits`: guaranteed-delivery deposits applied exactly once (client view, records, balances).
//! - `jobs`: scheduled firings run at most once, and every firing is decided (run, in doubt, skipped,
//!   or missed only where allowed).

// Each scenario uses its own part of the checkers.
#![allow(dead_code)]

mod deposits;
mod durability;
mod jobs;
mod linearizable;
mod sessions;

// The report types are named only by scenarios that keep a report around.
#[allow(unused_imports)]
pub use {
    deposits::{check_deposits, Deposit, DepositReport},
    durability::check_durability,
    jobs::{check_jobs, start_lines, JobRecord, JobReport, StartLine},
    linearizable::{check_linearizable, LinReport},
    sessions::{check_sessions, SessionReport},
};

use crate::history::{KvEntry, KvOp, KvResult};

/// One line that lets a reader find an operation in the history dump: who, what, when, with what result.
fn describe(entry: &KvEntry) -> String {
    let op = match &entry.op {
        KvOp::Put { value } => format!("put {value:?}"),
        KvOp::Get => "get".to_string(),
        KvOp::Cas { expected, new } => format!("cas {expected:?}->{new:?}"),
    };
    let result = match &entry.result {
        KvResult::PutOk => "ok".to_string(),
        KvResult::GetOk(Some(value)) => format!("{value:?}"),
        KvResult::GetOk(None) => "absent".to_string(),
        KvResult::CasOk(applied) => applied.to_string(),
        KvResult::Unknown => "unknown".to_string(),
    };
    let complete = entry.complete.map_or_else(|| "?".to_string(), seconds);
    format!(
        "client {} {op} [{} .. {complete}] -> {result}",
        entry.client,
        seconds(entry.invoke)
    )
}

/// A time of the run (ns since its start) as seconds, every digit kept: anomalies often hinge on
/// which of two close times came first.
fn seconds(ns: u64) -> String {
    format!("{}.{:09}s", ns / 1_000_000_000, ns % 1_000_000_000)
}

/// Builders for the checkers' own tests: single operations with explicit times, client 0.
#[cfg(test)]
mod fixtures {
    use crate::history::{KvEntry, KvOp, KvResult};

    fn entry(key: &str, op: KvOp, invoke: u64, complete: Option<u64>, result: KvResult) -> KvEntry {
        KvEntry {
            client: 0,
            key: key.to_string(),
            op,
            invoke,
            complete,
            result,
        }
    }

    pub fn put(key: &str, value: &str, invoke: u64, complete: u64) -> KvEntry {
        entry(
            key,
            KvOp::Put {
                value: value.to_string(),
            },
            invoke,
            Some(complete),
            KvResult::PutOk,
        )
    }

    pub fn put_unknown(key: &str, value: &str, invoke: u64) -> KvEntry {
        entry(
            key,
            KvOp::Put {
                value: value.to_string(),
            },
            invoke,
            None,
            KvResult::Unknown,
        )
    }

    pub fn get(key: &str, value: Option<&str>, invoke: u64, complete: u64) -> KvEntry {
        let result = KvResult::GetOk(value.map(str::to_string));
        entry(key, KvOp::Get, invoke, Some(complete), result)
    }

    pub fn cas(key: &str, expected: &str, new: &str, applied: bool, invoke: u64, complete: u64) -> KvEntry {
        let op = KvOp::Cas {
            expected: expected.to_string(),
            new: new.to_string(),
        };
        entry(key, op, invoke, Some(complete), KvResult::CasOk(applied))
    }

    pub fn cas_unknown(key: &str, expected: &str, new: &str, invoke: u64) -> KvEntry {
        let op = KvOp::Cas {
            expected: expected.to_string(),
            new: new.to_string(),
        };
        entry(key, op, invoke, None, KvResult::Unknown)
    }
}
