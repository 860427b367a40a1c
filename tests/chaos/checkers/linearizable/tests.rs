//! The linearizability checker on small hand-written histories, each valid or wrong for one reason,
//! and on a long history of a simulated register, valid and then with one stale read planted.

use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::checkers::fixtures::{cas, cas_unknown, get, put, put_unknown};
use crate::checkers::{check_linearizable, LinReport};
use crate::history::{KvEntry, KvOp, KvResult};

/// Far more than any history here needs; the large test prints how long it took.
const STEP_BUDGET: u64 = 5_000_000;

fn check(history: &[KvEntry]) -> LinReport {
    check_linearizable(history, STEP_BUDGET)
}

fn assert_valid(history: &[KvEntry]) {
    let report = check(history);
    assert!(
        report.anomalies.is_empty() && report.undecided.is_empty(),
        "{report:#?}"
    );
}

/// Asserts exactly one anomaly, on `key`, and returns it.
fn assert_anomaly(history: &[KvEntry], key: &str) -> String {
    let report = check(history);
    assert!(report.undecided.is_empty(), "{report:#?}");
    assert_eq!(report.anomalies.len(), 1, "{report:#?}");
    assert!(report.anomalies[0].starts_with(&format!("key {key}: ")), "{report:#?}");
    report.anomalies.into_iter().next().expect("one anomaly")
}

#[test]
fn sequential_valid() {
    let history = [
        get("k", None, 0, 5),
        put("k", "a", 10, 20),
        get("k", Some("a"), 30, 40),
        cas("k", "a", "b", true, 50, 60),
        cas("k", "a", "c", false, 70, 80),
        get("k", Some("b"), 90, 100),
        put("k", "d", 110, 120),
        get("k", Some("d"), 130, 140),
    ];
    let report = check(&history);
    assert!(
        report.anomalies.is_empty() && report.undecided.is_empty(),
        "{report:#?}"
    );
    assert_eq!((report.keys, report.ops_checked), (1, 8));
}

#[test]
fn concurrent_valid_needs_reordering() {
    // "a" is invoked first but must take effect after "b": the search has to undo its first guess.
    let history = [
        put("k", "a", 0, 100),
        put("k", "b", 10, 50),
        get("k", Some("b"), 20, 30),
        get("k", Some("a"), 60, 70),
        // Two cas racing from "a": only one may apply, and here only one does.
        cas("k", "a", "c", true, 80, 120),
        cas("k", "a", "d", false, 85, 110),
        get("k", Some("c"), 130, 140),
    ];
    assert_valid(&history);
}

#[test]
fn stale_read_is_caught() {
    let history = [put("k", "a", 0, 10), put("k", "b", 20, 30), get("k", Some("a"), 40, 50)];
    let anomaly = assert_anomaly(&history, "k");
    eprintln!("{anomaly}");
    assert!(anomaly.contains("places 2 of 3"), "{anomaly}");
}

#[test]
fn lost_update_is_caught() {
    // Two cas from the same expected value both applied: one update overwrote the other unseen.
    let history = [
        put("k", "a", 0, 10),
        cas("k", "a", "b", true, 20, 30),
        cas("k", "a", "c", true, 25, 35),
    ];
    assert_anomaly(&history, "k");
}

#[test]
fn read_of_never_written_value_is_caught() {
    let history = [put("k", "a", 0, 10), get("k", Some("z"), 20, 30)];
    assert_anomaly(&history, "k");
    // Absent again after a completed put is as wrong.
    let history = [put("k", "a", 0, 10), get("k", None, 20, 30)];
    assert_anomaly(&history, "k");
}

#[test]
fn equal_times_are_concurrent() {
    // A read invoked at the very nanosecond a put returned may take effect before it.
    assert_valid(&[put("k", "a", 0, 10), get("k", None, 10, 20)]);
    assert_anomaly(&[put("k", "a", 0, 10), get("k", None, 11, 20)], "k");
}

#[test]
fn unknown_put_later_observed_is_valid() {
    let history = [
        put("k", "a", 0, 10),
        put_unknown("k", "b", 20),
        get("k", Some("a"), 30, 40),
        get("k", Some("b"), 50, 60),
        get("k", Some("b"), 70, 80),
    ];
    assert_valid(&history);
    // But it cannot take effect before its invoke.
    let history = [
        put("k", "a", 0, 10),
        get("k", Some("b"), 12, 18),
        put_unknown("k", "b", 20),
    ];
    assert_anomaly(&history, "k");
}

#[test]
fn unknown_cas_later_observed_is_valid() {
    let history = [
        put("k", "a", 0, 10),
        cas_unknown("k", "a", "b", 20),
        get("k", Some("b"), 30, 40),
    ];
    assert_valid(&history);
    // A cas whose expected value was never there cannot have applied.
    let history = [
        put("k", "a", 0, 10),
        cas_unknown("k", "z", "b", 20),
        get("k", Some("b"), 30, 40),
    ];
    assert_anomaly(&history, "k");
}

#[test]
fn unknown_put_never_observed_is_valid() {
    let history = [
        put("k", "a", 0, 10),
        put_unknown("k", "b", 20),
        get("k", Some("a"), 30, 40),
        get("k", Some("a"), 50, 60),
        get("k", Some("a"), 70, 80),
    ];
    let report = check(&history);
    assert!(
        report.anomalies.is_empty() && report.undecided.is_empty(),
        "{report:#?}"
    );
    assert_eq!(report.ops_checked, 4, "the unseen unknown put is pruned: {report:#?}");
    // Pruning it does not hide an anomaly around it.
    let history = [
        put("k", "a", 0, 10),
        put_unknown("k", "x", 5),
        put("k", "b", 20, 30),
        get("k", Some("a"), 40, 50),
    ];
    assert_anomaly(&history, "k");
}

#[test]
fn unknown_put_explains_refused_cas() {
    // Only the unknown put of "b", never read, explains why the cas from "a" was refused: pruning
    // must keep it.
    let history = [
        put("k", "a", 0, 10),
        put_unknown("k", "b", 20),
        cas("k", "a", "c", false, 30, 40),
    ];
    assert_valid(&history);
    let without_it = [put("k", "a", 0, 10), cas("k", "a", "c", false, 30, 40)];
    assert_anomaly(&without_it, "k");
    // A refusal returned at the very nanosecond of the put's invoke is concurrent with it.
    let tie = [
        put("k", "a", 0, 10),
        cas("k", "a", "c", false, 20, 30),
        put_unknown("k", "b", 30),
    ];
    assert_valid(&tie);
}

#[test]
fn keys_are_checked_separately() {
    let history = [
        put("x", "a", 0, 10),
        put("y", "a", 0, 10),
        put("x", "b", 20, 30),
        get("y", Some("a"), 40, 50),
        get("x", Some("a"), 40, 50),
    ];
    let report = check(&history);
    assert_eq!(report.keys, 2, "{report:#?}");
    assert_anomaly(&history, "x");
}

#[test]
fn out_of_budget_is_undecided() {
    let history = [
        put("k", "a", 0, 100),
        put("k", "b", 10, 50),
        get("k", Some("a"), 60, 70),
    ];
    let report = check_linearizable(&history, 2);
    assert!(
        report.anomalies.is_empty() && report.undecided.len() == 1,
        "{report:#?}"
    );
}

#[test]
fn malformed_entries_are_reported() {
    let mut wrong_result = put("k", "a", 0, 10);
    wrong_result.result = KvResult::GetOk(None);
    assert!(assert_anomaly(&[wrong_result], "k").contains("malformed"));
    let backwards = put("k", "a", 10, 5);
    assert!(assert_anomaly(&[backwards], "k").contains("malformed"));
}

/// The history of a real linearizable register: `clients` clients each run one operation at a time
/// with random gaps and durations; each operation takes effect at a random instant between its
/// invoke and its return. About 1% are slow (stuck behind a fault while the others go on), and
/// about 2% have unknown outcome: they take effect later (up to three times their timeout after
/// their invoke) or never, and their client moves on after the timeout.
fn simulated_register(rng: &mut StdRng, clients: usize, ops_total: usize) -> Vec<KvEntry> {
    const DURATION_NS_MAX: u64 = 200;
    const SLOW_DURATION_NS_MAX: u64 = 5_000;
    let mut clocks: Vec<u64> = (0..clients).map(|_| rng.gen_range(0..50)).collect();
    let mut history = Vec::with_capacity(ops_total);
    let mut effect_at: Vec<Option<u64>> = Vec::with_capacity(ops_total);
    for i in 0..ops_total {
        let client = (0..clients).min_by_key(|&c| clocks[c]).expect("clients > 0");
        let invoke = clocks[client];
        let duration_max = if rng.gen_bool(0.01) {
            SLOW_DURATION_NS_MAX
        } else {
            DURATION_NS_MAX
        };
        let duration = rng.gen_range(1..=duration_max);
        clocks[client] = invoke + duration + rng.gen_range(0..20);
        let op = match rng.gen_range(0..100) {
            0..=39 => KvOp::Get,
            40..=74 => KvOp::Put { value: format!("p{i}") },
            // The expected value is guessed when the cas takes effect, below.
            _ => KvOp::Cas {
                expected: String::new(),
                new: format!("c{i}"),
            },
        };
        let unknown = rng.gen_bool(0.02);
        effect_at.push(match unknown {
            false => Some(invoke + rng.gen_range(0..=duration)),
            true if rng.gen_bool(0.5) => Some(invoke + rng.gen_range(0..=3 * duration)),
            true => None,
        });
        let (complete, result) = if unknown {
            (None, KvResult::Unknown)
        } else {
            (Some(invoke + duration), KvResult::PutOk)
        };
        history.push(KvEntry {
            client,
            key: "k".to_string(),
            op,
            invoke,
            complete,
            result,
        });
    }
    let mut order: Vec<usize> = (0..ops_total).filter(|&i| effect_at[i].is_some()).collect();
    order.sort_by_key(|&i| (effect_at[i], i));
    let mut value: Option<String> = None;
    let mut written: Vec<String> = Vec::new();
    for i in order {
        let entry = &mut history[i];
        let result = match &mut entry.op {
            KvOp::Get => KvResult::GetOk(value.clone()),
            KvOp::Put { value: new } => {
                value = Some(new.clone());
                written.push(new.clone());
                KvResult::PutOk
            }
            KvOp::Cas { expected, new } => {
                // Mostly the value the client would have just read, sometimes an older one.
                *expected = match (&value, written.is_empty()) {
                    (Some(current), _) if rng.gen_bool(0.7) => current.clone(),
                    (_, false) => written[rng.gen_range(0..written.len())].clone(),
                    _ => "nothing".to_string(),
                };
                let applied = value.as_ref() == Some(expected);
                if applied {
                    value = Some(new.clone());
                    written.push(new.clone());
                }
                KvResult::CasOk(applied)
            }
        };
        if entry.result != KvResult::Unknown {
            entry.result = result;
        }
    }
    for entry in &mut history {
        if let KvOp::Cas { expected, .. } = &mut entry.op {
            if expected.is_empty() {
                // An unknown cas that never took effect: any guess will do.
                *expected = written.first().cloned().unwrap_or_default();
            }
        }
    }
    history
}

/// Makes one completed read in the second half of `history` return a stale value: the value of an
/// acknowledged put that a later acknowledged put replaced before the read was invoked. Returns the
/// read's index.
fn plant_stale_read(history: &mut [KvEntry]) -> usize {
    let acknowledged: Vec<(u64, u64, String)> = history
        .iter()
        .filter_map(|entry| match (&entry.op, &entry.result, entry.complete) {
            (KvOp::Put { value }, KvResult::PutOk, Some(complete)) => Some((entry.invoke, complete, value.clone())),
            _ => None,
        })
        .collect();
    let mut reads: Vec<usize> = (0..history.len())
        .filter(|&i| matches!(history[i].result, KvResult::GetOk(_)))
        .collect();
    reads.sort_by_key(|&i| history[i].invoke);
    for &read in &reads[reads.len() / 2..] {
        let invoke = history[read].invoke;
        let newer = acknowledged.iter().filter(|w| w.1 < invoke).max_by_key(|w| w.1);
        let Some(newer) = newer else { continue };
        let Some(older) = acknowledged.iter().filter(|w| w.1 < newer.0).max_by_key(|w| w.1) else {
            continue;
        };
        history[read].result = KvResult::GetOk(Some(older.2.clone()));
        return read;
    }
    panic!("no read to make stale");
}

#[test]
fn large_simulated_history() {
    let seed: u64 = match std::env::var("CHECKERS_SEED") {
        Ok(seed) => seed.parse().expect("CHECKERS_SEED is a u64"),
        Err(_) => 20_251_125,
    };
    eprintln!("--- simulate a linearizable register: 8 clients, 2000 operations, seed {seed} (CHECKERS_SEED)");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut history = simulated_register(&mut rng, 8, 2000);
    let unknown = history.iter().filter(|e| e.result == KvResult::Unknown).count();

    eprintln!("--- the valid history passes within the budget ({unknown} operations of unknown outcome)");
    let started = Instant::now();
    let report = check(&history);
    eprintln!("valid history checked in {:?}: {report:?}", started.elapsed());
    assert!(
        report.anomalies.is_empty() && report.undecided.is_empty(),
        "{report:#?}"
    );

    eprintln!("--- one stale read planted is caught");
    let read = plant_stale_read(&mut history);
    eprintln!("stale read: {:?}", history[read]);
    let started = Instant::now();
    let report = check(&history);
    eprintln!("planted history checked in {:?}: {report:#?}", started.elapsed());
    assert!(
        report.undecided.is_empty() && report.anomalies.len() == 1,
        "{report:#?}"
    );
}

/// Whether `history` (one key) is linearizable, by trying every order: the obvious algorithm, with
/// nothing in common with the checker but the register.
fn brute_force(history: &[KvEntry]) -> bool {
    let ops: Vec<&KvEntry> = history
        .iter()
        .filter(|e| !(e.op == KvOp::Get && e.result == KvResult::Unknown))
        .collect();
    fn search(ops: &[&KvEntry], placed: &mut Vec<bool>, value: Option<String>) -> bool {
        let done = |i: usize| placed[i] || ops[i].result == KvResult::Unknown;
        if (0..ops.len()).all(done) {
            return true;
        }
        for i in 0..ops.len() {
            let must_wait = (0..ops.len()).any(|j| {
                !placed[j] && j != i && ops[j].result != KvResult::Unknown && ops[j].complete.unwrap() < ops[i].invoke
            });
            if placed[i] || must_wait {
                continue;
            }
            let after = match (&ops[i].op, &ops[i].result) {
                (KvOp::Get, KvResult::GetOk(read)) => (read == &value).then(|| value.clone()),
                (KvOp::Put { value: new }, _) => Some(Some(new.clone())),
                (KvOp::Cas { expected, new }, KvResult::CasOk(true)) => {
                    (value.as_ref() == Some(expected)).then(|| Some(new.clone()))
                }
                (KvOp::Cas { expected, .. }, KvResult::CasOk(false)) => {
                    (value.as_ref() != Some(expected)).then(|| value.clone())
                }
                (KvOp::Cas { expected, new }, KvResult::Unknown) => Some(if value.as_ref() == Some(expected) {
                    Some(new.clone())
                } else {
                    value.clone()
                }),
                _ => unreachable!("the generator makes no such entry"),
            };
            let Some(after) = after else { continue };
            placed[i] = true;
            let found = search(ops, placed, after);
            placed[i] = false;
            if found {
                return true;
            }
        }
        false
    }
    search(&ops, &mut vec![false; ops.len()], None)
}

/// A small history of random operations with random results, most of them not linearizable:
/// few values, crowded times (many overlaps and ties), many unknown outcomes.
fn random_small_history(rng: &mut StdRng) -> Vec<KvEntry> {
    let len = rng.gen_range(1..=7);
    let mut history = Vec::with_capacity(len);
    for i in 0..len {
        let pick = |rng: &mut StdRng| format!("v{}", rng.gen_range(0..len + 1));
        let invoke = rng.gen_range(0..20);
        let (op, result) = match rng.gen_range(0..3) {
            0 => (KvOp::Put { value: format!("v{i}") }, KvResult::PutOk),
            1 => {
                let read = if rng.gen_bool(0.2) { None } else { Some(pick(rng)) };
                (KvOp::Get, KvResult::GetOk(read))
            }
            _ => (
                KvOp::Cas {
                    expected: pick(rng),
                    new: format!("v{i}"),
                },
                KvResult::CasOk(rng.gen_bool(0.5)),
            ),
        };
        let (complete, result) = if rng.gen_bool(0.3) {
            (None, KvResult::Unknown)
        } else {
            (Some(invoke + rng.gen_range(0..8)), result)
        };
        history.push(KvEntry {
            client: i,
            key: "k".to_string(),
            op,
            invoke,
            complete,
            result,
        });
    }
    history
}

#[test]
fn agrees_with_brute_force_on_small_histories() {
    const HISTORIES: usize = 20_000;
    let seed: u64 = match std::env::var("CHECKERS_SEED") {
        Ok(seed) => seed.parse().expect("CHECKERS_SEED is a u64"),
        Err(_) => 4_242,
    };
    eprintln!("--- {HISTORIES} small random histories against a brute force, seed {seed} (CHECKERS_SEED)");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut valid = 0;
    for _ in 0..HISTORIES {
        let history = random_small_history(&mut rng);
        let report = check(&history);
        assert!(report.undecided.is_empty(), "{report:#?}");
        let expected = brute_force(&history);
        assert_eq!(
            report.anomalies.is_empty(),
            expected,
            "brute force says {expected} for {history:#?}: {report:#?}"
        );
        valid += usize::from(expected);
    }
    eprintln!("{valid} valid, {} not", HISTORIES - valid);
    assert!(
        valid > HISTORIES / 10 && valid < HISTORIES * 9 / 10,
        "a useful mix: {valid} valid"
    );
}
