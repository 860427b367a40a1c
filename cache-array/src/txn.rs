//! Transactions in the replicated store: guards, then the steps of the chosen branch, all or
//! nothing (see `ferrocotta::protocol::Txn`).
//!
//! The steps run against a private overlay of the keys they touch, on top of the live entries; only
//! when every step succeeded is the overlay written into the store. So a failing step leaves the
//! store as it was, on every server alike (the outcome depends only on the log).
//!
//! Expiry follows the store's model (an entry expires at `written + ttl` or `accessed + tti`): a
//! step that keeps an entry's expiry while rewriting it keeps the moment its ttl ends, and its tti
//! (a write is an access).

use std::collections::BTreeMap;

use bytes::Bytes;
use ferrocotta::protocol::{parse_counter, EntryInfo, ErrorReply, Expiry, Guard, Reply, Step, StepReply, Txn};

use crate::store::{ApplyContext, CacheEntry, Lifetime, Store};

/// A transaction as the log keeps it: the client's transaction and the value size limit of the
/// active that proposed it (so every server judges an `Append` against the same limit).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TxnChange {
    pub txn: Txn,
    pub max_value_bytes: u64,
}

/// What a step does to its key in the overlay.
enum Effect {
    Unchanged,
    Set(Option<CacheEntry>),
}

fn info(e: &CacheEntry) -> EntryInfo {
    EntryInfo {
        value: e.value.to_vec(),
        expires_at_ms: e.expires_at(),
    }
}

impl Store {
    /// Applies a transaction entry.
    pub fn apply_txn(&mut self, change: &TxnChange, ctx: &ApplyContext) -> Result<Reply, ErrorReply> {
        let TxnChange { txn, max_value_bytes } = change;
        let now = ctx.now_ms;
        let succeeded = txn.guards.iter().all(|g| {
            let (cache, key) = g.target();
            let found = self.live(cache, key, now);
            match g {
                Guard::Present { .. } => found.is_some(),
                Guard::Absent { .. } => found.is_none(),
                Guard::ValueIs { value, .. } => found.is_some_and(|e| e.value == *value),
            }
        });
        let steps = if succeeded { &txn.then } else { &txn.otherwise };
        let mut overlay: BTreeMap<(String, Vec<u8>), Option<CacheEntry>> = BTreeMap::new();
        let mut results = Vec::with_capacity(steps.len());
        for step in steps {
            let (cache, key) = step.target();
            let at = (cache.to_string(), key.to_vec());
            let current = match overlay.get(&at) {
                Some(e) => e.clone(),
                None => self.live(cache, key, now).cloned(),
            };
            let (reply, effect) = match step {
                Step::Get { .. } => (StepReply::Entry(current.as_ref().map(info)), Effect::Unchanged),
                Step::Put { value, expiry, .. } => {
                    let next = self.written(cache, Bytes::copy_from_slice(value), current.as_ref(), *expiry, ctx);
                    (StepReply::Entry(current.as_ref().map(info)), Effect::Set(next))
                }
                Step::Remove { .. } => (StepReply::Entry(current.as_ref().map(info)), Effect::Set(None)),
                Step::SetExpiry { expiry, .. } => match current {
                    None => (StepReply::Bool(false), Effect::Unchanged),
                    Some(e) => (StepReply::Bool(true), Effect::Set(with_expiry(e, *expiry, now))),
                },
                Step::Append { value, .. } => {
                    let old = current.as_ref().map_or(&[][..], |e| &e.value[..]);
                    let length = old.len() + value.len();
                    if length as u64 > *max_value_bytes {
                        return Err(ErrorReply::Invalid(format!(
                            "the value would grow to {length} bytes, beyond the limit of {max_value_bytes}"
                        )));
                    }
                    let joined = Bytes::from([old, &value[..]].concat());
                    let next = self.written(cache, joined, current.as_ref(), Expiry::Keep, ctx);
                    (StepReply::Length(length as u64), Effect::Set(next))
                }
                Step::Increment { delta, .. } => {
                    let old = match &current {
                        None => 0,
                        Some(e) => parse_counter(&e.value).ok_or(ErrorReply::NotACounter)?,
                    };
                    let sum = old
                        .checked_add(*delta)
                        .ok_or_else(|| ErrorReply::Invalid("increment or decrement would overflow".into()))?;
                    let text = Bytes::from(sum.to_string());
                    let next = self.written(cache, text, current.as_ref(), Expiry::Keep, ctx);
                    (StepReply::Counter(sum), Effect::Set(next))
                }
            };
            if let Effect::Set(next) = effect {
                overlay.insert(at, next);
            }
            results.push(reply);
        }
        for ((cache, key), entry) in overlay {
            match entry {
                Some(e) => self.insert_entry(&cache, key, e, ctx),
                None => {
                    self.remove_entry(&cache, &key);
                }
            }
        }
        Ok(Reply::Txn { succeeded, results })
    }

    /// The entry a write of `value` leaves, given the live entry before it and the expiry asked
    /// for; `None` when it expires at once (a time already past).
    fn written(
        &self,
        cache: &str,
        value: Bytes,
        current: Option<&CacheEntry>,
        expiry: Expiry,
        ctx: &ApplyContext,
    ) -> Option<CacheEntry> {
        let now = ctx.now_ms;
        let fresh = |ttl_ms: Option<u64>| {
            let mut e = self.new_entry(
                cache,
                &[],
                Lifetime {
                    ttl_ms,
                    ..Lifetime::default()
                },
                ctx,
            );
            e.value = value.clone();
            e
        };
        match (expiry, current) {
            (Expiry::Default, _) | (Expiry::Keep, None) => Some(fresh(None)),
            (Expiry::Keep, Some(old)) => Some(CacheEntry {
                value,
                written_ms: now,
                accessed_ms: now,
                ttl_ms: old.ttl_ms.map(|t| old.written_ms.saturating_add(t).saturating_sub(now)),
                ..old.clone()
            }),
            (Expiry::Never, _) => {
                let mut e = fresh(None);
                e.ttl_ms = None;
                e.tti_ms = None;
                Some(e)
            }
            (Expiry::AfterMs(ms), _) => Some(fresh(Some(ms))),
            (Expiry::AtMs(at), _) if at <= now => None,
            (Expiry::AtMs(at), _) => Some(fresh(Some(at - now))),
        }
    }
}

/// A live entry with its expiry changed (`Never`, `AfterMs`, `AtMs`; the others leave it); `None`
/// when the new time is already past.
fn with_expiry(mut e: CacheEntry, expiry: Expiry, now: u64) -> Option<CacheEntry> {
    let at = match expiry {
        Expiry::Default | Expiry::Keep => return Some(e),
        Expiry::Never => {
            e.ttl_ms = None;
            e.tti_ms = None;
            return Some(e);
        }
        Expiry::AfterMs(ms) => now.saturating_add(ms),
        Expiry::AtMs(at) => at,
    };
    if at <= now {
        return None;
    }
    e.ttl_ms = Some(at.saturating_sub(e.written_ms));
    Some(e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrocotta::protocol::CacheSettings;

    fn ctx(now_ms: u64, configured: &BTreeMap<String, CacheSettings>) -> ApplyContext<'_> {
        ApplyContext {
            now_ms,
            index: 1,
            configured,
            grants: Vec::new(),
        }
    }

    fn key(k: &str) -> (String, Vec<u8>) {
        ("c".to_string(), k.as_bytes().to_vec())
    }

    fn put(k: &str, v: &str, expiry: Expiry) -> Step {
        let (cache, key) = key(k);
        Step::Put {
            cache,
            key,
            value: v.as_bytes().to_vec(),
            expiry,
        }
    }

    fn get(k: &str) -> Step {
        let (cache, key) = key(k);
        Step::Get { cache, key }
    }

    fn run(store: &mut Store, now: u64, txn: Txn) -> Result<Reply, ErrorReply> {
        let configured = BTreeMap::new();
        store.apply_txn(
            &TxnChange {
                txn,
                max_value_bytes: 16,
            },
            &ctx(now, &configured),
        )
    }

    fn entry(store: &mut Store, now: u64, k: &str) -> Option<EntryInfo> {
        match run(
            store,
            now,
            Txn {
                then: vec![get(k)],
                ..Txn::default()
            },
        )
        .unwrap()
        {
            Reply::Txn { results, .. } => match &results[..] {
                [StepReply::Entry(e)] => e.clone(),
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn guards_choose_the_branch_and_steps_see_each_other() {
        let mut s = Store::default();
        let (cache, k) = key("a");
        let absent = Guard::Absent {
            cache: cache.clone(),
            key: k.clone(),
        };
        let txn = Txn {
            guards: vec![absent.clone()],
            then: vec![put("a", "1", Expiry::Default), get("a")],
            otherwise: vec![get("a")],
        };
        let Reply::Txn { succeeded, results } = run(&mut s, 10, txn.clone()).unwrap() else {
            panic!()
        };
        assert!(succeeded);
        assert_eq!(results[0], StepReply::Entry(None));
        assert!(matches!(&results[1], StepReply::Entry(Some(e)) if e.value == b"1"));
        let Reply::Txn { succeeded, results } = run(&mut s, 11, txn).unwrap() else {
            panic!()
        };
        assert!(!succeeded);
        assert!(matches!(&results[0], StepReply::Entry(Some(e)) if e.value == b"1"));
    }

    #[test]
    fn a_failing_step_leaves_nothing_written() {
        let mut s = Store::default();
        run(
            &mut s,
            10,
            Txn {
                then: vec![put("n", "x", Expiry::Default)],
                ..Txn::default()
            },
        )
        .unwrap();
        let (cache, k) = key("n");
        let txn = Txn {
            then: vec![
                put("other", "written?", Expiry::Default),
                Step::Increment {
                    cache,
                    key: k,
                    delta: 1,
                },
            ],
            ..Txn::default()
        };
        assert_eq!(run(&mut s, 11, txn), Err(ErrorReply::NotACounter));
        assert_eq!(entry(&mut s, 12, "other"), None);
        let (cache, k) = key("n");
        let too_long = Txn {
            then: vec![Step::Append {
                cache,
                key: k,
                value: vec![b'y'; 16],
            }],
            ..Txn::default()
        };
        assert!(matches!(run(&mut s, 13, too_long), Err(ErrorReply::Invalid(_))));
        assert_eq!(entry(&mut s, 14, "n").unwrap().value, b"x");
    }

    #[test]
    fn expiry_is_kept_set_and_removed() {
        let mut s = Store::default();
        run(
            &mut s,
            1_000,
            Txn {
                then: vec![put("k", "1", Expiry::AfterMs(500))],
                ..Txn::default()
            },
        )
        .unwrap();
        assert_eq!(entry(&mut s, 1_100, "k").unwrap().expires_at_ms, Some(1_500));
        // A rewrite keeping the expiry keeps the moment.
        let (cache, k) = key("k");
        let incr = Step::Increment {
            cache: cache.clone(),
            key: k.clone(),
            delta: 41,
        };
        run(
            &mut s,
            1_200,
            Txn {
                then: vec![incr],
                ..Txn::default()
            },
        )
        .unwrap();
        let e = entry(&mut s, 1_300, "k").unwrap();
        assert_eq!((e.value.as_slice(), e.expires_at_ms), (&b"42"[..], Some(1_500)));
        let set = |expiry| Txn {
            then: vec![Step::SetExpiry {
                cache: cache.clone(),
                key: k.clone(),
                expiry,
            }],
            ..Txn::default()
        };
        run(&mut s, 1_300, set(Expiry::Never)).unwrap();
        assert_eq!(entry(&mut s, 9_000, "k").unwrap().expires_at_ms, None);
        run(&mut s, 9_000, set(Expiry::AtMs(10_000))).unwrap();
        assert_eq!(entry(&mut s, 9_500, "k").unwrap().expires_at_ms, Some(10_000));
        assert_eq!(entry(&mut s, 10_000, "k"), None);
        run(
            &mut s,
            11_000,
            Txn {
                then: vec![put("k", "v", Expiry::Default)],
                ..Txn::default()
            },
        )
        .unwrap();
        // A time already past removes the entry.
        let Reply::Txn { results, .. } = run(&mut s, 11_001, set(Expiry::AtMs(5))).unwrap() else {
            panic!()
        };
        assert_eq!(results, vec![StepReply::Bool(true)]);
        assert_eq!(entry(&mut s, 11_002, "k"), None);
        assert!(s.expiry.is_empty(), "the expiry index follows: {:?}", s.expiry);
    }
}
