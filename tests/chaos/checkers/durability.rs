//! Lost writes: after the faults are healed and every server restarted, the test reads each key
//! once more. An acknowledged write must still be there, unless a write that followed it replaced
//! it. Linearizability cannot see this on its own, since a write lost at the very end of a run is
//! never read again within the history.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::describe;
use crate::history::{KvEntry, KvOp, KvResult};

/// Checks the final value of every key against the writes of `history`; returns one line per
/// anomaly:
///
/// - "phantom value": the final value was not written by any put or cas of the key (acknowledged
///   or of unknown outcome);
/// - "acknowledged write lost": an acknowledged write was invoked after the write of the final value
///   had completed, so it must have taken effect after it; or the key is absent at the end although
///   writes to it were acknowledged (nothing in the workload removes a key);
/// - "no final value": the key has acknowledged writes but is missing from `final_values`, which
///   would otherwise leave them unchecked.
///
/// When the final value was written by an operation of unknown outcome, that write may have taken
/// effect at any time after its invoke, so no other write can be shown to have followed it.
pub fn check_durability(history: &[KvEntry], final_values: &HashMap<String, Option<String>>) -> Vec<String> {
    let mut by_key: BTreeMap<&str, Vec<&KvEntry>> = BTreeMap::new();
    for entry in history {
        by_key.entry(entry.key.as_str()).or_default().push(entry);
    }
    let keys: BTreeSet<&str> = by_key
        .keys()
        .copied()
        .chain(final_values.keys().map(String::as_str))
        .collect();
    let mut anomalies = Vec::new();
    for key in keys {
        let entries = by_key.get(key).map_or(&[][..], Vec::as_slice);
        let acknowledged: Vec<(&KvEntry, &str)> = entries
            .iter()
            .filter_map(|&entry| acknowledged_write(entry).map(|value| (entry, value)))
            .collect();
        let Some(final_value) = final_values.get(key) else {
            if !acknowledged.is_empty() {
                anomalies.push(format!(
                    "key {key}: no final value was read; its {} acknowledged writes are unchecked",
                    acknowledged.len()
                ));
            }
            continue;
        };
        let Some(final_value) = final_value else {
            for (entry, value) in acknowledged {
                anomalies.push(format!(
                    "key {key}: acknowledged write lost: {value:?} ({}); the final read found the key absent",
                    describe(entry)
                ));
            }
            continue;
        };
        let Some(writer) = entries.iter().copied().find(|&entry| write(entry) == Some(final_value)) else {
            let refused = entries.iter().any(|entry| refused_value(entry) == Some(final_value));
            anomalies.push(format!(
                "key {key}: phantom value: the final read returned {final_value:?}, which {}",
                if refused {
                    "only a refused cas of this key would have written"
                } else {
                    "no put or cas of this key wrote"
                }
            ));
            continue;
        };
        // A writer of unknown outcome has no completion: nothing is known to have followed it.
        let Some(written_by) = completion(writer) else { continue };
        for (entry, value) in acknowledged {
            if entry.invoke > written_by {
                anomalies.push(format!(
                    "key {key}: acknowledged write lost: {value:?} ({}) was invoked after the write of the \
                     final value {final_value:?} had completed ({})",
                    describe(entry),
                    describe(writer)
                ));
            }
        }
    }
    anomalies
}

/// The value an operation wrote if it was acknowledged.
fn acknowledged_write(entry: &KvEntry) -> Option<&str> {
    match (&entry.op, &entry.result) {
        (KvOp::Put { value }, KvResult::PutOk) => Some(value),
        (KvOp::Cas { new, .. }, KvResult::CasOk(true)) => Some(new),
        _ => None,
    }
}

/// The value an operation may have written: acknowledged or of unknown outcome.
fn write(entry: &KvEntry) -> Option<&String> {
    match (&entry.op, &entry.result) {
        (KvOp::Put { value }, KvResult::PutOk | KvResult::Unknown) => Some(value),
        (KvOp::Cas { new, .. }, KvResult::CasOk(true) | KvResult::Unknown) => Some(new),
        _ => None,
    }
}

/// The value a refused cas would have written.
fn refused_value(entry: &KvEntry) -> Option<&String> {
    match (&entry.op, &entry.result) {
        (KvOp::Cas { new, .. }, KvResult::CasOk(false)) => Some(new),
        _ => None,
    }
}

/// When an operation of known outcome completed.
fn completion(entry: &KvEntry) -> Option<u64> {
    match entry.result {
        KvResult::Unknown => None,
        _ => entry.complete,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::check_durability;
    use crate::checkers::fixtures::{cas, cas_unknown, get, put, put_unknown};

    fn finals(pairs: &[(&str, Option<&str>)]) -> HashMap<String, Option<String>> {
        pairs
            .iter()
            .map(|(key, value)| (key.to_string(), value.map(str::to_string)))
            .collect()
    }

    #[test]
    fn last_acknowledged_write_present() {
        let history = [put("k", "a", 0, 10), put("k", "b", 20, 30), get("k", Some("b"), 40, 50)];
        let anomalies = check_durability(&history, &finals(&[("k", Some("b"))]));
        assert!(anomalies.is_empty(), "{anomalies:#?}");
    }

    #[test]
    fn write_replaced_by_later_acknowledged_write() {
        // "a" is gone, but "b" followed it; the cas that followed "b" replaced it in turn.
        let history = [
            put("k", "a", 0, 10),
            put("k", "b", 20, 30),
            cas("k", "b", "c", true, 40, 50),
        ];
        let anomalies = check_durability(&history, &finals(&[("k", Some("c"))]));
        assert!(anomalies.is_empty(), "{anomalies:#?}");
    }

    #[test]
    fn concurrent_writes_either_may_win() {
        // Overlapping writes: whichever took effect last is a valid final value.
        let history = [put("k", "a", 0, 20), put("k", "b", 10, 30)];
        assert!(check_durability(&history, &finals(&[("k", Some("a"))])).is_empty());
        assert!(check_durability(&history, &finals(&[("k", Some("b"))])).is_empty());
    }

    #[test]
    fn unknown_writer_may_be_last() {
        // The unknown put may have taken effect after "b": nothing is lost.
        let history = [
            put_unknown("k", "a", 0),
            put("k", "b", 20, 30),
            cas_unknown("k", "z", "y", 40),
        ];
        let anomalies = check_durability(&history, &finals(&[("k", Some("a"))]));
        assert!(anomalies.is_empty(), "{anomalies:#?}");
    }

    #[test]
    fn acknowledged_write_missing() {
        let history = [put("k", "a", 0, 10), put("k", "b", 20, 30), put("other", "x", 0, 5)];
        let anomalies = check_durability(&history, &finals(&[("k", Some("a")), ("other", Some("x"))]));
        assert_eq!(anomalies.len(), 1, "{anomalies:#?}");
        assert!(
            anomalies[0].contains("acknowledged write lost") && anomalies[0].contains("\"b\""),
            "{anomalies:#?}"
        );
    }

    #[test]
    fn phantom_value() {
        let history = [put("k", "a", 0, 10), cas("k", "z", "c", false, 20, 30)];
        let anomalies = check_durability(&history, &finals(&[("k", Some("never-written"))]));
        assert_eq!(anomalies.len(), 1, "{anomalies:#?}");
        assert!(anomalies[0].contains("phantom value"), "{anomalies:#?}");
        let anomalies = check_durability(&history, &finals(&[("k", Some("c"))]));
        assert!(
            anomalies.len() == 1 && anomalies[0].contains("refused cas"),
            "{anomalies:#?}"
        );
    }

    #[test]
    fn final_absent_with_acknowledged_writes() {
        let history = [
            put("k", "a", 0, 10),
            cas("k", "a", "b", true, 20, 30),
            put_unknown("j", "x", 0),
        ];
        let anomalies = check_durability(&history, &finals(&[("k", None), ("j", None)]));
        assert_eq!(anomalies.len(), 2, "{anomalies:#?}");
        assert!(
            anomalies
                .iter()
                .all(|a| a.starts_with("key k: acknowledged write lost")),
            "{anomalies:#?}"
        );
    }

    #[test]
    fn key_without_final_read() {
        let history = [put("k", "a", 0, 10)];
        let anomalies = check_durability(&history, &HashMap::new());
        assert!(
            anomalies.len() == 1 && anomalies[0].contains("no final value"),
            "{anomalies:#?}"
        );
    }
}
