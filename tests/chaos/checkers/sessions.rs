//! Client sessions through integration nodes: each request increments the session's counter by one
//! and answers the new value, so the answers of a session, in the order it sent them, climb one by
//! one. A request whose outcome is unknown may have incremented the counter or not, so it allows
//! the next answer to climb one step further; no answer may ever go back.

use std::collections::BTreeMap;

use super::seconds;
use crate::history::SessionEntry;

/// What [`check_sessions`] found.
#[derive(Debug, Default)]
pub struct SessionReport {
    /// Sessions in the history.
    pub sessions: usize,
    /// Requests in the history, answered or not.
    pub requests: usize,
    /// One line per answer out of order.
    pub anomalies: Vec<String>,
}

/// Checks every session's answers: an answer `c` after the last known counter `last` and `u`
/// requests of unknown outcome must satisfy `last + 1 <= c <= last + 1 + u`. After an anomaly the
/// check goes on from `c`, so one lost or repeated increment is reported once, not at every
/// request after it.
pub fn check_sessions(entries: &[SessionEntry]) -> SessionReport {
    let mut by_session: BTreeMap<&str, Vec<&SessionEntry>> = BTreeMap::new();
    for entry in entries {
        by_session.entry(entry.session.as_str()).or_default().push(entry);
    }
    let mut report = SessionReport {
        sessions: by_session.len(),
        requests: entries.len(),
        anomalies: Vec::new(),
    };
    for (session, mut requests) in by_session {
        // One request at a time per session: invoke order is the order the node saw them in.
        requests.sort_by_key(|request| request.invoke);
        let mut last: i64 = 0;
        let mut unknown_since: i64 = 0;
        for request in requests {
            let Some(counter) = request.counter else {
                unknown_since += 1;
                continue;
            };
            let at = seconds(request.invoke);
            if counter <= last {
                report.anomalies.push(format!(
                    "session {session}: went back: the request sent at {at} got {counter} after the counter \
                     had reached {last}"
                ));
            } else if counter > last + 1 + unknown_since {
                report.anomalies.push(format!(
                    "session {session}: skipped: the request sent at {at} got {counter}, expected at most {} \
                     (last known {last}, {unknown_since} requests of unknown outcome since)",
                    last + 1 + unknown_since
                ));
            }
            last = counter;
            unknown_since = 0;
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::check_sessions;
    use crate::history::SessionEntry;

    /// A session's requests, one per 10 ns, with these answers.
    fn session(id: &str, counters: &[Option<i64>]) -> Vec<SessionEntry> {
        counters
            .iter()
            .enumerate()
            .map(|(i, &counter)| SessionEntry {
                session: id.to_string(),
                invoke: 10 * i as u64,
                counter,
            })
            .collect()
    }

    #[test]
    fn clean_sequence() {
        let mut entries = session("a", &[Some(1), Some(2), Some(3)]);
        entries.extend(session("b", &[Some(1), Some(2)]));
        entries.reverse(); // the checker orders by invoke itself
        let report = check_sessions(&entries);
        assert!(report.anomalies.is_empty(), "{report:#?}");
        assert_eq!((report.sessions, report.requests), (2, 5));
    }

    #[test]
    fn skip_covered_by_unknown() {
        // Two unknown requests: the next answer may be 3 (neither applied), 4 or 5.
        for next in [3, 4, 5] {
            let report = check_sessions(&session(
                "a",
                &[Some(1), Some(2), None, None, Some(next), Some(next + 1)],
            ));
            assert!(report.anomalies.is_empty(), "next {next}: {report:#?}");
        }
        // An unknown first request: the first answer may be 1 or 2.
        let report = check_sessions(&session("a", &[None, Some(2)]));
        assert!(report.anomalies.is_empty(), "{report:#?}");
    }

    #[test]
    fn went_back() {
        let report = check_sessions(&session("a", &[Some(1), Some(2), Some(3), Some(2), Some(3)]));
        assert_eq!(report.anomalies.len(), 1, "{report:#?}");
        assert!(report.anomalies[0].contains("went back"), "{report:#?}");
        // The same answer twice goes back too, and an unknown request in between does not excuse it.
        let report = check_sessions(&session("a", &[Some(1), None, Some(1)]));
        assert!(
            report.anomalies.len() == 1 && report.anomalies[0].contains("went back"),
            "{report:#?}"
        );
    }

    #[test]
    fn skipped_without_unknown() {
        let report = check_sessions(&session("a", &[Some(1), Some(3), Some(4)]));
        assert_eq!(report.anomalies.len(), 1, "{report:#?}");
        assert!(report.anomalies[0].contains("skipped"), "{report:#?}");
        // One unknown request covers one step, not two.
        let report = check_sessions(&session("a", &[Some(1), None, Some(4)]));
        assert!(
            report.anomalies.len() == 1 && report.anomalies[0].contains("skipped"),
            "{report:#?}"
        );
    }
}
