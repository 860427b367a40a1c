//! Linearizability of a register-per-key history.
//!
//! A history is linearizable when each operation can be given one instant between its invoke and
//! its return such that, taken in the order of those instants, every result is what a single
//! register would have answered. Linearizability is compositional (Herlihy & Wing's locality), so
//! each key is checked on its own, which keeps every search small.
//!
//! The search is Wing & Gong's, with Lowe's memoization as Porcupine implements it: the calls and
//! returns of the operations form a doubly linked list in time order; an operation can be placed
//! next when its call comes before the first return still in the list; placing it unlinks its call
//! and return, backtracking links them back (dancing links). A configuration (set of placed
//! operations, register value) reached once is never searched again, whatever order reached it.
//!
//! Operations of unknown outcome get their own list, off the time line: they have no return, so
//! they never block another operation, and the search succeeds once every operation of known
//! outcome is placed (an unknown write left unplaced is one that never took effect, the same as one
//! placed after everything else). Left at that, each of them could be placed anywhere after its
//! invoke, and every pending one doubles the configurations to search: a few dozen per key make a
//! refutation hopeless. So the search places an unknown write only where it is needed, see
//! [`Action::justifies`]: it must change the value, and the very next operation placed must need
//! that (read the new value, expect it, or be a cas refused because the old value is gone). This
//! loses no linearization. Take any one and remove its unknown operations that changed nothing
//! (they never took effect). Then, for an unknown write U that is not followed by an operation that
//! needs it, look at the operation Y right after U. Y cannot read or expect U's value (it would need
//! U), so it is a put, after which nobody saw U's value: remove U; or a cas refused for another
//! value than the one U replaced, which is refused as well before U: swap them, U having no return
//! that orders it before Y. U moves later and stops before another unknown write (a put: remove U;
//! a cas that applies: it expects U's value, so it needs U), so the other pairs stay as they are;
//! each step shortens the distance to the end or the number of operations, and the result is a
//! linearization of that form. Known operations are tried before unknown ones at each step, which
//! finds the common linearizations first.
//!
//! One more narrowing, for many overlapping clients: a read of the current value (or a cas refused
//! by it) is placed at once, without trying alternatives ([`search::Search::observer`] says why that is
//! safe).

mod search;

use std::collections::{BTreeMap, HashMap, HashSet};

use super::describe;
use crate::history::{KvEntry, KvOp, KvResult};
use search::{DeadEnd, Outcome, Search};

/// A value of the register, interned per key: [`ABSENT`] or 1 + an index into [`KeyHistory::names`].
/// Comparing small integers instead of strings is what makes a step of the search cheap.
type Value = u32;

/// The value of a key nobody has written (the initial state).
const ABSENT: Value = 0;

/// Return time of an operation that never returned: it may take effect at any time after its invoke.
const NEVER: u64 = u64::MAX;

/// How many operations an anomaly lists on each side of the point where the search got stuck:
/// enough to see the conflict, few enough to read.
const REPORT_OPS_MAX: usize = 6;

/// What [`check_linearizable`] found.
#[derive(Debug, Default)]
pub struct LinReport {
    /// Keys in the history.
    pub keys: usize,
    /// Operations searched: the history less reads of unknown outcome and the unknown writes
    /// pruned because nothing could have seen them.
    pub ops_checked: usize,
    /// One line per key whose history is not linearizable, with where the search got stuck.
    pub anomalies: Vec<String>,
    /// Keys whose search ran out of steps: neither proven linearizable nor refuted.
    pub undecided: Vec<String>,
}

/// Checks that `history` is linearizable, key by key, against a register that starts absent: a put
/// sets the value, a get returns it, a cas(expected, new) applies (and returns true) exactly when
/// the value is `expected`.
///
/// `step_budget` bounds the search of each key, in operations tried (each is one model step and at
/// most one entry in the memo); a key that needs more is reported in `undecided`. Measured on
/// simulated keys of 2,000 operations with 2-3% of unknown outcome: a valid key from 8-10 clients
/// takes 0.05-0.3 million steps, a refutation (every order up to the anomaly is tried) up to 2.5
/// million; with 16 clients, 3 and 13 million. About one step in ten enters the memo, a few machine
/// words each, so the budget also bounds memory.
pub fn check_linearizable(history: &[KvEntry], step_budget: u64) -> LinReport {
    let mut by_key: BTreeMap<&str, Vec<&KvEntry>> = BTreeMap::new();
    for entry in history {
        by_key.entry(entry.key.as_str()).or_default().push(entry);
    }
    let mut report = LinReport {
        keys: by_key.len(),
        ..LinReport::default()
    };
    for (key, entries) in by_key {
        let key_history = match KeyHistory::build(&entries) {
            Ok(key_history) => key_history,
            Err(malformed) => {
                report
                    .anomalies
                    .push(format!("key {key}: malformed history: {malformed}"));
                continue;
            }
        };
        report.ops_checked += key_history.ops.len();
        match Search::new(&key_history).run(step_budget) {
            Outcome::Linearizable => {}
            Outcome::Stuck(dead_end) => {
                report.anomalies.push(format!(
                    "key {key}: not linearizable: {}",
                    key_history.explain(&dead_end)
                ));
            }
            Outcome::OutOfSteps { placed_max } => report.undecided.push(format!(
                "key {key}: search stopped after {step_budget} steps, {} operations ({} of unknown outcome); \
                 the longest linearizable prefix found places {placed_max} of {} completed operations",
                key_history.ops.len(),
                key_history.ops.len() - key_history.known,
                key_history.known,
            )),
        }
    }
    report
}

/// What an operation does to the register, its outcome folded in.
#[derive(Debug, Clone, Copy)]
enum Action {
    /// A put, acknowledged or of unknown outcome: either way it sets the value when it takes effect.
    Put(Value),
    /// A read that returned this value.
    Get(Value),
    /// A compare-and-swap that applied.
    CasApplied { expected: Value, new: Value },
    /// A compare-and-swap that was refused: the value was not `expected`.
    CasRefused { expected: Value },
    /// A compare-and-swap of unknown outcome. Where it is placed it answers as the register would:
    /// a cas that takes effect and is refused changes nothing, the same as one that never ran.
    CasUnknown { expected: Value, new: Value },
}

impl Action {
    /// The value after this action on `value`, or `None` when the recorded result is impossible there.
    fn apply(self, value: Value) -> Option<Value> {
        match self {
            Action::Put(new) => Some(new),
            Action::Get(read) => (read == value).then_some(value),
            Action::CasApplied { expected, new } => (expected == value).then_some(new),
            Action::CasRefused { expected } => (expected != value).then_some(value),
            Action::CasUnknown { expected, new } => Some(if expected == value { new } else { value }),
        }
    }

    /// Whether this action, placed right after a write of unknown outcome that changed the value
    /// from `before` to `written`, needs that write: it reads or expects the new value, or it is a cas
    /// refused because the value is no longer `before`. Anything else could have been placed before
    /// the write, or the write left out (see the module doc).
    fn justifies(self, before: Value, written: Value) -> bool {
        match self {
            Action::Get(read) => read == written,
            Action::CasApplied { expected, .. } | Action::CasUnknown { expected, .. } => expected == written,
            Action::CasRefused { expected } => expected == before,
            Action::Put(_) => false,
        }
    }

    /// The value this action writes if it takes effect.
    fn written(self) -> Option<Value> {
        match self {
            Action::Put(new) | Action::CasApplied { new, .. } | Action::CasUnknown { new, .. } => Some(new),
            Action::Get(_) | Action::CasRefused { .. } => None,
        }
    }
}

/// One operation of a key's history.
struct Op<'h> {
    /// The recorded entry, for reports.
    entry: &'h KvEntry,
    /// What it does to the register.
    action: Action,
    /// When it was invoked.
    invoke: u64,
    /// When it returned; [`NEVER`] if it did not.
    ret: u64,
    /// The outcome is unknown: it may have taken effect or not.
    unknown: bool,
}

/// The history of one key, ready for the search.
struct KeyHistory<'h> {
    /// Operations of known outcome first (each must be placed), sorted by invoke; then those of
    /// unknown outcome (each may be placed), sorted by invoke.
    ops: Vec<Op<'h>>,
    /// How many operations have a known outcome: `ops[..known]`.
    known: usize,
    /// The values, by [`Value`] - 1.
    names: Vec<&'h str>,
}

impl<'h> KeyHistory<'h> {
    fn build(entries: &[&'h KvEntry]) -> Result<Self, String> {
        let mut interned: HashMap<&'h str, Value> = HashMap::new();
        let mut names: Vec<&'h str> = Vec::new();
        let mut intern = |name: &'h str| -> Value {
            *interned.entry(name).or_insert_with(|| {
                names.push(name);
                names.len() as Value
            })
        };
        let mut ops = Vec::with_capacity(entries.len());
        for &entry in entries {
            if entry.complete.is_some_and(|complete| complete < entry.invoke) {
                return Err(format!("{} returned before it was invoked", describe(entry)));
            }
            let action = match (&entry.op, &entry.result) {
                // A read of unknown outcome has no effect and tells nothing.
                (KvOp::Get, KvResult::Unknown) => continue,
                (KvOp::Get, KvResult::GetOk(read)) => Action::Get(read.as_deref().map_or(ABSENT, &mut intern)),
                (KvOp::Put { value }, KvResult::PutOk | KvResult::Unknown) => Action::Put(intern(value)),
                (KvOp::Cas { expected, new }, KvResult::CasOk(true)) => Action::CasApplied {
                    expected: intern(expected),
                    new: intern(new),
                },
                (KvOp::Cas { expected, .. }, KvResult::CasOk(false)) => Action::CasRefused {
                    expected: intern(expected),
                },
                (KvOp::Cas { expected, new }, KvResult::Unknown) => Action::CasUnknown {
                    expected: intern(expected),
                    new: intern(new),
                },
                _ => {
                    return Err(format!(
                        "{} has a result that does not fit its operation",
                        describe(entry)
                    ))
                }
            };
            // An ambiguous answer (complete, yet Unknown) does not bound when the write may still
            // take effect, so only a known outcome gets a return time. A known outcome without a
            // return time must still be placed, at any time after its invoke.
            let unknown = entry.result == KvResult::Unknown;
            let ret = if unknown {
                NEVER
            } else {
                entry.complete.unwrap_or(NEVER)
            };
            ops.push(Op {
                entry,
                action,
                invoke: entry.invoke,
                ret,
                unknown,
            });
        }
        prune_unseen_writes(&mut ops);
        ops.sort_by_key(|op| (op.unknown, op.invoke));
        let known = ops.iter().take_while(|op| !op.unknown).count();
        Ok(KeyHistory { ops, known, names })
    }

    fn name(&self, value: Value) -> String {
        match value {
            ABSENT => "absent".to_string(),
            value => format!("{:?}", self.names[value as usize - 1]),
        }
    }

    fn explain(&self, dead_end: &DeadEnd) -> String {
        let list = |ops: &[usize]| -> String {
            ops.iter()
                .map(|&op| describe(self.ops[op].entry))
                .collect::<Vec<_>>()
                .join(" | ")
        };
        let ends_with = if dead_end.last_placed.is_empty() {
            String::new()
        } else {
            format!("; it ends with [{}]", list(&dead_end.last_placed))
        };
        format!(
            "the longest linearizable prefix places {} of {} completed operations and leaves the value {}{ends_with}; \
             none of these can be placed next: [{}]; {} must take effect before it returns",
            dead_end.placed,
            self.known,
            self.name(dead_end.value),
            list(&dead_end.pending),
            describe(self.ops[dead_end.first_return].entry),
        )
    }
}

/// Removes the writes of unknown outcome that no linearization needs, so the search does not try
/// every place they could have taken effect.
///
/// A write U of unknown outcome whose value nobody observed (no read returned it, no cas expected
/// it) and after whose invoke no cas was refused can be dropped: it never happening is a valid
/// choice. Take any linearization L that places U and writes its value u; U's effect lasts until
/// the next write W in L. An operation placed between U and W would see u: a read would return u
/// (none does), an applied cas would expect u (none does), a refused cas would have to return after
/// U's invoke (none does). Only cas of unknown outcome remain there, and they can move to the end of
/// L, where their effect is no longer seen, as they have no return that orders them. Without U,
/// every other operation sees what it saw in L: a linearization without U. The converse is free
/// (U placed at the end), so the key is linearizable with U exactly when it is without it. Dropping
/// one such write changes no observation, so the rule applies to all of them at once.
///
/// A cas of unknown outcome whose expected value no operation writes can never apply: it is dropped
/// too, since it can change nothing.
fn prune_unseen_writes(ops: &mut Vec<Op<'_>>) {
    let mut observed = HashSet::new();
    let mut written = HashSet::new();
    // Returns at the same instant as an invoke count as after it: equal times are concurrent.
    let mut last_refusal: Option<u64> = None;
    for op in ops.iter() {
        match op.action {
            Action::Get(read) => {
                observed.insert(read);
            }
            Action::CasApplied { expected, .. } | Action::CasUnknown { expected, .. } => {
                observed.insert(expected);
            }
            Action::CasRefused { expected } => {
                observed.insert(expected);
                last_refusal = last_refusal.max(Some(op.ret));
            }
            Action::Put(_) => {}
        }
        written.extend(op.action.written());
    }
    ops.retain(|op| {
        if !op.unknown {
            return true;
        }
        if let Action::CasUnknown { expected, .. } = op.action {
            if !written.contains(&expected) {
                return false;
            }
        }
        let seen = op.action.written().is_some_and(|value| observed.contains(&value));
        let refused_after = last_refusal.is_some_and(|refusal| refusal >= op.invoke);
        seen || refused_after
    });
}

#[cfg(test)]
mod tests;
