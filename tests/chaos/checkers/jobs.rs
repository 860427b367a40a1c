//! Scheduled jobs: every-interval jobs judged from two witnesses, the run records the array keeps
//! and the `job.run_started` lines each node logs right before it runs a firing.
//!
//! - No firing of a lane is decided twice (records) or started twice (logs, across all nodes and
//!   all their lives).
//! - Every firing of a lane from its first to its last record is decided: ran, in doubt (its node
//!   died running it), skipped for overlap, or missed; a missed firing only where the caller says
//!   it may be (for `any`: while no node was connected).
//! - Every started firing has its record, naming the node that started it; a record that says a
//!   firing ran (`ok`, `error`) has a start line of its node; none is left `running` at the end.

use std::collections::{BTreeMap, BTreeSet};

/// One run record as `GET /admin/jobs/{id}/runs` gives it.
#[derive(Debug, Clone)]
pub struct JobRecord {
    pub lane: String,
    pub firing_ms: u64,
    pub missed_before: u64,
    pub outcome: String,
    pub owner: String,
}

/// One `job.run_started` line of a node's log.
#[derive(Debug, Clone)]
pub struct StartLine {
    pub node: String,
    pub lane: String,
    pub firing_ms: u64,
}

/// What [`check_jobs`] found.
#[derive(Debug, Default)]
pub struct JobReport {
    /// Firings decided, over all lanes.
    pub firings: usize,
    /// Runs started (log lines).
    pub started: usize,
    /// Records in doubt.
    pub in_doubt: usize,
    /// Firings recorded missed.
    pub missed: u64,
    /// One line per anomaly.
    pub anomalies: Vec<String>,
}

/// Checks the records and start lines of one job with a fixed `interval_ms`; `missed_allowed(lane,
/// firing)` says where a missed firing is no anomaly.
pub fn check_jobs(
    records: &[JobRecord],
    starts: &[StartLine],
    interval_ms: u64,
    missed_allowed: &dyn Fn(&str, u64) -> bool,
) -> JobReport {
    let mut report = JobReport {
        started: starts.len(),
        ..JobReport::default()
    };
    let mut decided: BTreeMap<(&str, u64), &JobRecord> = BTreeMap::new();
    for r in records {
        if r.outcome == "in_doubt" {
            report.in_doubt += 1;
        }
        if r.outcome == "running" {
            report.anomalies.push(format!(
                "lane {}: firing {} still running at the end ({})",
                r.lane, r.firing_ms, r.owner
            ));
        }
        for k in 0..=r.missed_before {
            let firing = r.firing_ms - (r.missed_before - k) * interval_ms;
            let missed = r.outcome == "missed" || k < r.missed_before;
            if missed {
                report.missed += 1;
                if !missed_allowed(&r.lane, firing) {
                    report.anomalies.push(format!(
                        "lane {}: firing {firing} missed where it should have run (recorded by {})",
                        r.lane, r.owner
                    ));
                }
            }
            if let Some(first) = decided.insert((r.lane.as_str(), firing), r) {
                report.anomalies.push(format!(
                    "lane {}: firing {firing} decided twice: {} by {} and {} by {}",
                    r.lane, first.outcome, first.owner, r.outcome, r.owner
                ));
            }
        }
    }
    report.firings = decided.len();
    let lanes: BTreeSet<&str> = decided.keys().map(|(lane, _)| *lane).collect();
    for lane in lanes {
        let firings: Vec<u64> = decided
            .range((lane, 0)..=(lane, u64::MAX))
            .map(|((_, f), _)| *f)
            .collect();
        for pair in firings.windows(2) {
            if pair[1] - pair[0] != interval_ms {
                report.anomalies.push(format!(
                    "lane {lane}: no record of the firings between {} and {} (every firing must be decided)",
                    pair[0], pair[1]
                ));
            }
        }
    }
    let mut started: BTreeMap<(&str, u64), &str> = BTreeMap::new();
    for s in starts {
        if let Some(first) = started.insert((s.lane.as_str(), s.firing_ms), s.node.as_str()) {
            report.anomalies.push(format!(
                "lane {}: firing {} ran twice: started by {first} and by {}",
                s.lane, s.firing_ms, s.node
            ));
        }
        match decided.get(&(s.lane.as_str(), s.firing_ms)) {
            None => report.anomalies.push(format!(
                "lane {}: {} started firing {} that no record holds",
                s.lane, s.node, s.firing_ms
            )),
            Some(r) if r.owner != s.node => report.anomalies.push(format!(
                "lane {}: {} started firing {} but the record says {} decided it ({})",
                s.lane, s.node, s.firing_ms, r.owner, r.outcome
            )),
            Some(_) => {}
        }
    }
    for ((lane, firing), r) in &decided {
        let witnessed = started.get(&(*lane, *firing)) == Some(&r.owner.as_str());
        if matches!(r.outcome.as_str(), "ok" | "error") && r.firing_ms == *firing && !witnessed {
            report.anomalies.push(format!(
                "lane {lane}: the record says {} ran firing {firing} ({}), but no node's log shows it started",
                r.owner, r.outcome
            ));
        }
    }
    report
}

/// The `job.run_started` lines of `job` in a node's log text.
pub fn start_lines(node: &str, log: &str, job: &str) -> Vec<StartLine> {
    let field = |line: &str, name: &str| -> Option<String> {
        let at = line.find(&format!(" {name}="))? + name.len() + 2;
        let rest = &line[at..];
        let end = rest.find(' ').unwrap_or(rest.len());
        Some(rest[..end].trim_matches('"').to_string())
    };
    log.lines()
        .filter(|l| l.contains("job.run_started") && field(l, "job").as_deref() == Some(job))
        .filter_map(|l| {
            Some(StartLine {
                node: node.to_string(),
                lane: field(l, "lane")?,
                firing_ms: field(l, "firing_ms")?.parse().ok()?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(lane: &str, firing_ms: u64, outcome: &str, owner: &str) -> JobRecord {
        JobRecord {
            lane: lane.into(),
            firing_ms,
            missed_before: 0,
            outcome: outcome.into(),
            owner: owner.into(),
        }
    }

    fn start(node: &str, lane: &str, firing_ms: u64) -> StartLine {
        StartLine {
            node: node.into(),
            lane: lane.into(),
            firing_ms,
        }
    }

    /// Five firings of an `any` job run by two nodes, the fourth in doubt (its node died).
    fn clean() -> (Vec<JobRecord>, Vec<StartLine>) {
        let records = vec![
            record("*", 1000, "ok", "n1"),
            record("*", 2000, "ok", "n2"),
            record("*", 3000, "ok", "n1"),
            record("*", 4000, "in_doubt", "n1"),
            record("*", 5000, "ok", "n2"),
        ];
        let starts = vec![
            start("n1", "*", 1000),
            start("n2", "*", 2000),
            start("n1", "*", 3000),
            start("n1", "*", 4000),
            start("n2", "*", 5000),
        ];
        (records, starts)
    }

    fn never(_: &str, _: u64) -> bool {
        false
    }

    #[test]
    fn a_clean_history_passes() {
        let (records, starts) = clean();
        let report = check_jobs(&records, &starts, 1000, &never);
        assert!(report.anomalies.is_empty(), "{report:#?}");
        assert_eq!((report.firings, report.in_doubt, report.started), (5, 1, 5));
        // A node that died between its claim and its log line: in doubt, no start line.
        let report = check_jobs(
            &records,
            &starts[..3].iter().chain(&starts[4..]).cloned().collect::<Vec<_>>(),
            1000,
            &never,
        );
        assert!(report.anomalies.is_empty(), "{report:#?}");
    }

    #[test]
    fn a_planted_double_run_is_caught() {
        let (records, mut starts) = clean();
        starts.push(start("n3", "*", 3000));
        let report = check_jobs(&records, &starts, 1000, &never);
        assert!(report.anomalies.iter().any(|a| a.contains("ran twice")), "{report:#?}");
        // In the records too.
        let (mut records, starts) = clean();
        records.push(record("*", 2000, "ok", "n3"));
        let report = check_jobs(&records, &starts, 1000, &never);
        assert!(
            report.anomalies.iter().any(|a| a.contains("decided twice")),
            "{report:#?}"
        );
    }

    #[test]
    fn a_lost_firing_is_caught() {
        let (mut records, mut starts) = clean();
        records.remove(2);
        starts.remove(2);
        let report = check_jobs(&records, &starts, 1000, &never);
        assert!(report.anomalies.iter().any(|a| a.contains("no record")), "{report:#?}");
        // Missed where it should have run, unless the caller allows it there.
        let (mut records, mut starts) = clean();
        records[2] = JobRecord {
            missed_before: 1,
            ..record("*", 3000, "missed", "n1")
        };
        records.remove(1);
        starts.retain(|s| s.firing_ms != 2000 && s.firing_ms != 3000);
        let report = check_jobs(&records, &starts, 1000, &never);
        assert_eq!(report.missed, 2);
        assert_eq!(
            report.anomalies.iter().filter(|a| a.contains("missed")).count(),
            2,
            "{report:#?}"
        );
        let report = check_jobs(&records, &starts, 1000, &|_, f| (2000..=3000).contains(&f));
        assert!(report.anomalies.is_empty(), "{report:#?}");
    }

    #[test]
    fn a_run_without_its_witness_or_by_another_node_is_caught() {
        let (records, mut starts) = clean();
        starts[1].node = "n3".into();
        let report = check_jobs(&records, &starts, 1000, &never);
        assert!(
            report.anomalies.iter().any(|a| a.contains("the record says n2")),
            "{report:#?}"
        );
        assert!(
            report.anomalies.iter().any(|a| a.contains("no node's log")),
            "{report:#?}"
        );
        let (mut records, starts) = clean();
        records[4].outcome = "running".into();
        let report = check_jobs(&records, &starts, 1000, &never);
        assert!(
            report.anomalies.iter().any(|a| a.contains("still running")),
            "{report:#?}"
        );
    }

    #[test]
    fn start_lines_are_read_from_the_log_format() {
        let log = "2026-12-04T10:00:00.123Z  INFO integration_node::jobs::scheduler: event=\"job.run_started\" job=tick lane=\"*\" firing_ms=1796378400000 seq=3 lateness_ms=2 missed_before=0 node=n1\n\
                   2026-12-04T10:00:00.200Z  INFO x: event=\"job.run_started\" job=other lane=\"*\" firing_ms=5 seq=0\n";
        let lines = start_lines("n1", log, "tick");
        assert_eq!(lines.len(), 1);
        assert_eq!((lines[0].lane.as_str(), lines[0].firing_ms), ("*", 1_796_378_400_000));
    }
}
