//! What a scheduled job is: its definition as the admin API takes it ([`JobSpec`]) and as the
//! array keeps it ([`Job`]), its schedule's firing times, and the records of its firings
//! ([`Cursor`], [`Run`]). Pure: no I/O, no clock; times are ms since the Unix epoch on the array's
//! clock.

use std::str::FromStr;

use chrono::{DateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use crate::owner::Owner;

/// Jobs a cluster keeps at most (a create beyond is refused).
pub const JOBS_MAX: usize = 256;
/// Longest job id.
pub const JOB_ID_BYTES_MAX: usize = 64;
/// Largest job input (its JSON text).
pub const JOB_INPUT_BYTES_MAX: usize = 16 * 1024;
/// Shortest interval of an `every` schedule.
pub const INTERVAL_MIN_MS: u64 = 100;
/// Longest cron expression.
pub const CRON_BYTES_MAX: usize = 256;
/// Run records kept per job and lane (the node for `all` jobs, one lane otherwise): a ring, the
/// oldest overwritten.
pub const RUNS_KEPT: u64 = 200;
/// Runs of one job and lane that may be in flight at once (`overlap = "allow"`); a firing beyond
/// is recorded as skipped.
pub const RUNNING_MAX: usize = 8;
/// Longest error text kept in a run record.
pub const RUN_ERROR_BYTES_MAX: usize = 1024;
/// Firings a schedule is walked through at most to count missed ones (cron expressions are walked
/// firing by firing; intervals are counted by arithmetic).
pub const FIRINGS_WALKED_MAX: u64 = 100_000;

/// Which nodes run a job's firings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// Exactly one node, whichever claims the firing first.
    #[default]
    Any,
    /// Every live member, each once.
    All,
    /// Only the node with this logical name.
    Node(String),
}

/// What happens to firings that could not run in time (no node could claim them within the
/// node's `jobs_missed_after`): the cluster or the target node was down, the job suspended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum MissedPolicy {
    /// They are recorded as missed and do not run.
    #[default]
    Skip,
    /// The latest of them runs once when a node can; the others are recorded as missed.
    RunOnce,
}

/// What happens to a firing while the previous run of the same job (and lane) still runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OverlapPolicy {
    /// The firing is recorded as skipped.
    #[default]
    Skip,
    /// It runs too (at most [`RUNNING_MAX`] at once).
    Allow,
}

/// Whether a job fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// It fires.
    Active,
    /// It does not fire until resumed; firings meanwhile are missed ones when it resumes.
    Suspended,
    /// Its schedule has no firing left.
    Expired,
}

/// A time as the API takes it: ms since the Unix epoch, or RFC 3339 text (`2026-12-04T10:00:00Z`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum TimeArg {
    /// Milliseconds since the epoch.
    Ms(u64),
    /// RFC 3339.
    Text(String),
}

impl TimeArg {
    /// Milliseconds since the epoch.
    pub fn to_ms(&self, field: &str) -> Result<u64, String> {
        match self {
            TimeArg::Ms(ms) => Ok(*ms),
            TimeArg::Text(text) => DateTime::parse_from_rfc3339(text)
                .map_err(|e| format!("`{field}`: `{text}` is not an RFC 3339 time ({e}); e.g. 2026-12-04T10:00:00Z"))
                .and_then(|t| {
                    u64::try_from(t.timestamp_millis()).map_err(|_| format!("`{field}`: `{text}` is before 1970"))
                }),
        }
    }
}

/// A schedule as the API takes it: exactly one of `once`, `every` and `cron`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ScheduleSpec {
    /// Once at this time.
    Once(TimeArg),
    /// Every interval (`"1s"`, `"5m"`, humantime), from `start` (else from its creation).
    Every(String),
    /// A cron expression in UTC: `sec min hour day-of-month month day-of-week [year]`, or the five
    /// fields of crontab (`min hour dom month dow`, second 0).
    Cron(String),
}

/// A schedule as the array keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// Once at this time.
    Once(u64),
    /// Every this many ms, counted from the job's anchor.
    EveryMs(u64),
    /// A cron expression (six or seven fields) in UTC.
    Cron(String),
}

/// A job as the admin API, the CLI and node.toml give it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// Its id (letters, digits, `.`, `_`, `-`); a random one if absent.
    #[serde(default)]
    pub id: Option<String>,
    /// The service each firing invokes.
    pub service: String,
    /// The service's input (an object; `{}` if absent).
    #[serde(default)]
    pub input: Option<Value>,
    /// When it fires.
    pub schedule: ScheduleSpec,
    /// No firing before this time.
    #[serde(default)]
    pub start: Option<TimeArg>,
    /// No firing after this time.
    #[serde(default)]
    pub end: Option<TimeArg>,
    /// Which nodes run it [default: any].
    #[serde(default)]
    pub target: Target,
    /// Firings that could not run in time [default: skip].
    #[serde(default)]
    pub missed: MissedPolicy,
    /// A firing while the previous run still runs [default: skip].
    #[serde(default)]
    pub overlap: OverlapPolicy,
    /// Created suspended.
    #[serde(default)]
    pub suspended: bool,
}

/// A job as the array keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// Its id.
    pub id: String,
    /// Random per creation: the keys of its cursors and runs carry it, so that a job deleted and
    /// created again under the same id starts afresh whatever the delete left behind.
    pub uid: String,
    /// The service each firing invokes.
    pub service: String,
    /// The service's input.
    pub input: Value,
    /// When it fires.
    pub schedule: Schedule,
    /// No firing before this time.
    pub start_ms: Option<u64>,
    /// No firing after this time.
    pub end_ms: Option<u64>,
    /// Which nodes run it.
    pub target: Target,
    /// Firings that could not run in time.
    pub missed: MissedPolicy,
    /// A firing while the previous run still runs.
    pub overlap: OverlapPolicy,
    /// Whether it fires.
    pub state: JobState,
    /// When it was created (the array's time): firings before do not count as missed.
    pub created_ms: u64,
    /// When it was last changed (the array's time).
    pub changed_ms: u64,
}

/// The position of one lane of a job: the last firing decided (run, skipped or missed) and the
/// runs in flight. Claiming a firing replaces it in one transaction with the new run record, so
/// two nodes can never both claim the same firing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    /// The lane: `*` for `any` and `node` jobs, the node's logical name for `all` jobs.
    pub lane: String,
    /// The last firing decided.
    pub last_ms: u64,
    /// Run records written so far in this lane (the next one goes into slot `seq % RUNS_KEPT`).
    pub seq: u64,
    /// Runs in flight.
    pub running: Vec<RunRef>,
}

/// A run in flight, as its cursor lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRef {
    /// Its record's sequence number.
    pub seq: u64,
    /// Its firing.
    pub firing_ms: u64,
    /// Who runs it.
    pub owner: Owner,
}

/// How a firing ended up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Claimed and running.
    Running,
    /// The service returned.
    Ok,
    /// The service failed.
    Error,
    /// The node that ran it died or lost the array (its array session ended) before it said how
    /// the run ended: it may or may not have run. Never rerun by itself.
    InDoubt,
    /// Not run in time (missed-firing policy `skip`, or the earlier ones under `run_once`).
    Missed,
    /// Not run: the previous run still ran (overlap policy `skip`).
    SkippedOverlap,
}

/// The record of one firing (or of a stretch of missed ones).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Run {
    /// The job.
    pub job: String,
    /// Its lane.
    pub lane: String,
    /// Its sequence number in the lane.
    pub seq: u64,
    /// The firing time (the last of a stretch of missed firings).
    pub firing_ms: u64,
    /// Firings this record stands for that did not run (a missed stretch), besides its own.
    #[serde(default)]
    pub missed_before: u64,
    /// Who decided it (and runs it, if it runs).
    pub owner: Owner,
    /// The array's time when it was claimed.
    pub claimed_ms: u64,
    /// When it ended (claimed_ms plus the run's duration), if it did.
    pub ended_ms: Option<u64>,
    /// How it ended up.
    pub outcome: Outcome,
    /// The service's error, shortened to [`RUN_ERROR_BYTES_MAX`].
    pub error: Option<String>,
    /// For a run declared in doubt: how it ended after all, if its node could still say so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub late_outcome: Option<Outcome>,
}

impl Run {
    /// How late after its firing it was claimed.
    pub fn lateness_ms(&self) -> u64 {
        self.claimed_ms.saturating_sub(self.firing_ms)
    }
}

/// Whether a job id is acceptable.
pub fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > JOB_ID_BYTES_MAX {
        return Err(format!("job ids are 1 to {JOB_ID_BYTES_MAX} characters"));
    }
    if !id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(format!(
            "job id `{id}`: only ASCII letters, digits, `.`, `_` and `-` are allowed"
        ));
    }
    Ok(())
}

/// Parses a cron expression: six or seven fields as the `cron` crate takes them, or the five of
/// crontab (second 0 is put in front).
pub fn parse_cron(expr: &str) -> Result<(String, cron::Schedule), String> {
    if expr.len() > CRON_BYTES_MAX {
        return Err(format!("cron expressions are at most {CRON_BYTES_MAX} characters"));
    }
    let fields = expr.split_whitespace().count();
    let full = match fields {
        5 => format!("0 {}", expr.trim()),
        6 | 7 => expr.split_whitespace().collect::<Vec<_>>().join(" "),
        n => {
            return Err(format!(
                "cron expression `{expr}` has {n} fields; it needs 5 (min hour day-of-month month day-of-week), \
                 6 (with seconds first) or 7 (and a year)"
            ))
        }
    };
    let schedule = cron::Schedule::from_str(&full).map_err(|e| format!("cron expression `{expr}`: {e}"))?;
    Ok((full, schedule))
}

impl JobSpec {
    /// The job this spec describes, created at `now_ms` (the array's time). Checks everything that
    /// does not need the cluster (the service and the node name are checked by the caller).
    pub fn into_job(self, id: String, uid: String, now_ms: u64) -> Result<Job, String> {
        check_id(&id)?;
        let input = self.input.unwrap_or_else(|| Value::Object(Default::default()));
        if !input.is_object() {
            return Err("`input` must be a JSON object".into());
        }
        let input_len = serde_json::to_vec(&input).map(|v| v.len()).unwrap_or(usize::MAX);
        if input_len > JOB_INPUT_BYTES_MAX {
            return Err(format!(
                "`input` is {input_len} bytes of JSON; at most {JOB_INPUT_BYTES_MAX} are allowed"
            ));
        }
        let start_ms = self.start.as_ref().map(|t| t.to_ms("start")).transpose()?;
        let end_ms = self.end.as_ref().map(|t| t.to_ms("end")).transpose()?;
        if let (Some(s), Some(e)) = (start_ms, end_ms) {
            if e < s {
                return Err("`end` is before `start`".into());
            }
        }
        let schedule = match self.schedule {
            ScheduleSpec::Once(t) => Schedule::Once(t.to_ms("schedule.once")?),
            ScheduleSpec::Every(text) => {
                let d = humantime::parse_duration(&text)
                    .map_err(|e| format!("`schedule.every`: `{text}` is not a duration ({e}); e.g. 1s, 5m, 1h"))?;
                let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
                if ms < INTERVAL_MIN_MS {
                    return Err(format!("`schedule.every` must be at least {INTERVAL_MIN_MS}ms"));
                }
                Schedule::EveryMs(ms)
            }
            ScheduleSpec::Cron(expr) => Schedule::Cron(parse_cron(&expr)?.0),
        };
        if let Target::Node(name) = &self.target {
            crate::cluster_name::validate_logical_name(name)?;
        }
        let job = Job {
            id,
            uid,
            service: self.service,
            input,
            schedule,
            start_ms,
            end_ms,
            target: self.target,
            missed: self.missed,
            overlap: self.overlap,
            state: if self.suspended {
                JobState::Suspended
            } else {
                JobState::Active
            },
            created_ms: now_ms,
            changed_ms: now_ms,
        };
        if job.next_after(now_ms.saturating_sub(1)).is_none() {
            return Err("the schedule has no firing from now on (a time in the past, or `end` already passed)".into());
        }
        Ok(job)
    }
}

fn utc(ms: u64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(i64::try_from(ms).unwrap_or(i64::MAX))
        .single()
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

impl Job {
    /// The first firing strictly after `t`, within `start` and `end`.
    pub fn next_after(&self, t: u64) -> Option<u64> {
        let floor = match self.start_ms {
            Some(s) if s > 0 => t.max(s - 1),
            _ => t,
        };
        let next = match &self.schedule {
            Schedule::Once(at) => (*at > floor).then_some(*at),
            Schedule::EveryMs(iv) => {
                let anchor = self.start_ms.unwrap_or(self.created_ms);
                if floor < anchor {
                    Some(anchor)
                } else {
                    ((floor - anchor) / iv)
                        .checked_add(1)
                        .and_then(|k| k.checked_mul(*iv))
                        .and_then(|d| anchor.checked_add(d))
                }
            }
            Schedule::Cron(expr) => {
                let schedule = parse_cron(expr).ok()?.1;
                let next = schedule.after(&utc(floor)).next()?;
                u64::try_from(next.timestamp_millis()).ok()
            }
        }?;
        match self.end_ms {
            Some(end) if next > end => None,
            _ => Some(next),
        }
    }

    /// The firings in `(after, upto]`: how many, and the latest (counting stops at
    /// [`FIRINGS_WALKED_MAX`] for cron schedules).
    pub fn due(&self, after: u64, upto: u64) -> Option<(u64, u64)> {
        let first = self.next_after(after).filter(|f| *f <= upto)?;
        match &self.schedule {
            Schedule::EveryMs(iv) => {
                let mut last = upto.min(self.end_ms.unwrap_or(u64::MAX));
                last -= (last - first) % iv;
                Some(((last - first) / iv + 1, last))
            }
            _ => {
                let (mut count, mut last) = (1, first);
                while count < FIRINGS_WALKED_MAX {
                    match self.next_after(last) {
                        Some(f) if f <= upto => {
                            count += 1;
                            last = f;
                        }
                        _ => break,
                    }
                }
                Some((count, last))
            }
        }
    }

    /// The lane a node runs this job's firings in, if it runs them at all.
    pub fn lane_for(&self, node: &str) -> Option<String> {
        match &self.target {
            Target::Any => Some("*".into()),
            Target::All => Some(node.to_string()),
            Target::Node(n) if n == node => Some("*".into()),
            Target::Node(_) => None,
        }
    }
}

/// Shortens an error text to [`RUN_ERROR_BYTES_MAX`] on a character boundary.
pub fn short_error(text: &str) -> String {
    if text.len() <= RUN_ERROR_BYTES_MAX {
        return text.to_string();
    }
    let mut end = RUN_ERROR_BYTES_MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> JobSpec {
        serde_json::from_str(json).unwrap()
    }

    fn job(json: &str, now: u64) -> Job {
        spec(json).into_job("j".into(), "u".into(), now).unwrap()
    }

    #[test]
    fn an_interval_counts_from_its_start_or_creation() {
        let j = job(r#"{"service":"demo:echo","schedule":{"every":"1s"}}"#, 10_500);
        assert_eq!(j.next_after(10_500), Some(11_500));
        assert_eq!(j.next_after(11_499), Some(11_500));
        assert_eq!(j.next_after(11_500), Some(12_500));
        let j = job(
            r#"{"service":"demo:echo","schedule":{"every":"1s"},"start":20000,"end":22000}"#,
            10_500,
        );
        assert_eq!(j.next_after(0), Some(20_000));
        assert_eq!(j.next_after(20_000), Some(21_000));
        assert_eq!(j.next_after(21_000), Some(22_000));
        assert_eq!(j.next_after(22_000), None);
        assert_eq!(j.due(0, 30_000), Some((3, 22_000)));
        assert_eq!(j.due(20_000, 21_999), Some((1, 21_000)));
        assert_eq!(j.due(22_000, 30_000), None);
    }

    #[test]
    fn cron_takes_five_six_or_seven_fields_in_utc() {
        // 2026-12-04T10:00:00Z
        let t = 1_796_378_400_000;
        let j = job(r#"{"service":"demo:echo","schedule":{"cron":"*/5 * * * *"}}"#, t);
        assert_eq!(j.next_after(t), Some(t + 5 * 60_000));
        let j = job(r#"{"service":"demo:echo","schedule":{"cron":"*/2 * * * * *"}}"#, t);
        assert_eq!(j.next_after(t), Some(t + 2_000));
        assert_eq!(j.due(t, t + 10_000), Some((5, t + 10_000)));
        assert!(parse_cron("0 0 12 * * * 2030").is_ok());
        for bad in ["* * *", "61 * * * * *", "* * * * * * * *", "every minute please"] {
            assert!(parse_cron(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_specs_are_refused_with_the_reason() {
        let now = 1_000_000;
        let cases = [
            (r#"{"service":"s:x","schedule":{"cron":"nope"}}"#, "cron"),
            (r#"{"service":"s:x","schedule":{"every":"10ms"}}"#, "at least"),
            (r#"{"service":"s:x","schedule":{"every":"soon"}}"#, "not a duration"),
            (r#"{"service":"s:x","schedule":{"once":5}}"#, "no firing"),
            (r#"{"service":"s:x","schedule":{"once":"yesterday"}}"#, "RFC 3339"),
            (
                r#"{"service":"s:x","schedule":{"every":"1s"},"start":5000000,"end":2000000}"#,
                "before",
            ),
            (r#"{"service":"s:x","schedule":{"every":"1s"},"input":[1]}"#, "object"),
        ];
        for (json, why) in cases {
            let e = spec(json).into_job("j".into(), "u".into(), now).unwrap_err();
            assert!(e.contains(why), "{json}: {e}");
        }
        let e = spec(r#"{"service":"s:x","schedule":{"every":"1s"}}"#)
            .into_job("a/b".into(), "u".into(), now)
            .unwrap_err();
        assert!(e.contains("only ASCII"), "{e}");
        assert!(serde_json::from_str::<JobSpec>(r#"{"service":"s:x","schedule":{"every":"1s","cron":"x"}}"#).is_err());
        assert!(serde_json::from_str::<JobSpec>(r#"{"service":"s:x","schedule":{"every":"1s"},"extra":1}"#).is_err());
        let big = format!(
            r#"{{"service":"s:x","schedule":{{"every":"1s"}},"input":{{"a":"{}"}}}}"#,
            "x".repeat(20_000)
        );
        assert!(spec(&big)
            .into_job("j".into(), "u".into(), now)
            .unwrap_err()
            .contains("bytes"));
    }

    #[test]
    fn targets_read_as_the_api_writes_them() {
        let j = job(
            r#"{"service":"s:x","schedule":{"every":"1s"},"target":{"node":"n2"}}"#,
            0,
        );
        assert_eq!(j.target, Target::Node("n2".into()));
        assert_eq!((j.lane_for("n2"), j.lane_for("n1")), (Some("*".into()), None));
        let j = job(r#"{"service":"s:x","schedule":{"every":"1s"},"target":"all"}"#, 0);
        assert_eq!(j.lane_for("n1"), Some("n1".into()));
        let j = job(r#"{"service":"s:x","schedule":{"every":"1s"}}"#, 0);
        assert_eq!(
            (j.target, j.missed, j.overlap),
            (Target::Any, MissedPolicy::Skip, OverlapPolicy::Skip)
        );
    }

    #[test]
    fn errors_are_shortened_on_a_character_boundary() {
        let long = "é".repeat(RUN_ERROR_BYTES_MAX);
        let s = short_error(&long);
        assert!(s.len() <= RUN_ERROR_BYTES_MAX + 3 && s.ends_with("..."));
    }
}
