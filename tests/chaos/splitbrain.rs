//! No split brain: never two servers of one stripe acknowledging writes as the active of the same
//! term. Read from the servers' own logs: a server logs `stripe.active_ack` with the stripe and the
//! term the first time it acknowledges a write in a term.

use std::collections::BTreeMap;

/// What the logs showed.
#[derive(Debug, Default)]
pub struct SplitBrainReport {
    /// (stripe, term) pairs in which some server acknowledged writes.
    pub terms: usize,
    /// Two servers acknowledging as active in one term.
    pub anomalies: Vec<String>,
}

/// Checks the logs of the servers, given as (server name, log text).
pub fn check(logs: &[(String, String)]) -> SplitBrainReport {
    let mut acks: BTreeMap<(u64, u64), Vec<String>> = BTreeMap::new();
    for (server, text) in logs {
        for line in text.lines().filter(|l| l.contains("stripe.active_ack")) {
            let (Some(stripe), Some(term)) = (field(line, "stripe"), field(line, "term")) else {
                continue;
            };
            let servers = acks.entry((stripe, term)).or_default();
            if !servers.contains(server) {
                servers.push(server.clone());
            }
        }
    }
    let anomalies = acks
        .iter()
        .filter(|(_, servers)| servers.len() > 1)
        .map(|((stripe, term), servers)| {
            format!("stripe {stripe}, term {term}: writes acknowledged as active by {servers:?}")
        })
        .collect();
    SplitBrainReport {
        terms: acks.len(),
        anomalies,
    }
}

/// The number in ` name=N` of a log line.
fn field(line: &str, name: &str) -> Option<u64> {
    let pat = format!(" {name}=");
    let start = line.find(&pat)? + pat.len();
    let digits: String = line[start..].chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

#[test]
fn split_brain_checker_accepts_one_active_per_term() {
    let logs = vec![
        (
            "a1".to_string(),
            "2026 INFO first write acknowledged event=\"stripe.active_ack\" stripe=0 term=3 server=a1\n".to_string(),
        ),
        (
            "a2".to_string(),
            "x INFO first write acknowledged event=\"stripe.active_ack\" stripe=0 term=5 server=a2\n".to_string(),
        ),
    ];
    let r = check(&logs);
    assert_eq!(r.terms, 2);
    assert!(r.anomalies.is_empty(), "{r:?}");
}

#[test]
fn split_brain_checker_catches_two_actives_in_one_term() {
    let line =
        |s: &str| format!("x INFO first write acknowledged event=\"stripe.active_ack\" stripe=0 term=7 server={s}\n");
    let logs = vec![
        ("a1".to_string(), line("a1")),
        ("a2".to_string(), String::new()),
        ("a3".to_string(), line("a3")),
    ];
    let r = check(&logs);
    assert_eq!(r.anomalies.len(), 1, "{r:?}");
    assert!(r.anomalies[0].contains("term 7"), "{r:?}");
    // The same term in another stripe is no conflict.
    let other = "x INFO event=\"stripe.active_ack\" stripe=1 term=7 server=b1\n".to_string();
    let r = check(&[("a1".into(), line("a1")), ("b1".into(), other)]);
    assert!(r.anomalies.is_empty(), "{r:?}");
}
