//! Scheduled jobs on real integration nodes and a real array (issue 14, docs/operations.md): `any`
//! firings run once across the cluster and survive a node kill, `all` firings run once per live
//! node, `node` jobs' missed firings follow their policy, a node with a wrong clock fires on the
//! array's time, an array failover loses and doubles nothing, and bad jobs are refused.
//!
//! Two witnesses are checked: the run records in the array, and each node's own log line
//! `job.run_started` (written before the service runs), so a firing run twice shows even if the
//! records were wrong.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{binary, http, phase, TestArray, TestNode};
use ferrocotta::config::ConfigDuration;
use serde_json::{json, Value};

const NODE_TOML: &str = "member_refresh_interval = \"500ms\"\nclient_keepalive_interval = \"250ms\"\n";

fn wall_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

fn sleep(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

/// An admin request with the token and a JSON body; (status, JSON answer).
fn admin(node: &TestNode, method: &str, path: &str, body: &Value) -> (u16, Value) {
    let auth = format!("Bearer {}", node.token);
    let text = if body.is_null() {
        String::new()
    } else {
        body.to_string()
    };
    let (status, _, answer) = http(&node.admin, method, path, &[("Authorization", &auth)], &text);
    (status, serde_json::from_str(&answer).unwrap_or(Value::Null))
}

fn create(node: &TestNode, job: Value) {
    let (code, answer) = admin(node, "POST", "/admin/jobs", &job);
    assert_eq!(code, 201, "creating {job}: {answer}");
}

/// The run records of a job, oldest firing first.
fn runs(node: &TestNode, job: &str) -> Vec<Value> {
    let (code, answer) = admin(node, "GET", &format!("/admin/jobs/{job}/runs"), &Value::Null);
    assert_eq!(code, 200, "{answer}");
    answer["runs"].as_array().cloned().unwrap_or_default()
}

fn suspend(node: &TestNode, job: &str) {
    let (code, answer) = admin(node, "POST", &format!("/admin/jobs/{job}/suspend"), &Value::Null);
    assert_eq!(code, 200, "{answer}");
}

fn u(v: &Value, field: &str) -> u64 {
    v[field].as_u64().unwrap_or_else(|| panic!("no {field} in {v}"))
}

fn outcome(v: &Value) -> &str {
    v["outcome"].as_str().unwrap_or("")
}

fn owner(v: &Value) -> &str {
    v["owner"]["node"].as_str().unwrap_or("")
}

/// The firings of `job` a node's log says it started: (lane, firing_ms) per line.
fn started_in_log(log: &Path, job: &str) -> Vec<(String, u64)> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let field = |line: &str, name: &str| -> Option<String> {
        let at = line.find(&format!(" {name}="))? + name.len() + 2;
        let rest = &line[at..];
        let end = rest.find(' ').unwrap_or(rest.len());
        Some(rest[..end].trim_matches('"').to_string())
    };
    text.lines()
        .filter(|l| l.contains("job.run_started") && field(l, "job").as_deref() == Some(job))
        .filter_map(|l| Some((field(l, "lane")?, field(l, "firing_ms")?.parse().ok()?)))
        .collect()
}

/// Asserts that no (lane, firing) shows twice among the logs of these nodes; returns how many
/// each node started.
fn no_firing_started_twice(nodes: &[(&str, &Path)], job: &str) -> BTreeMap<String, usize> {
    let mut seen: BTreeMap<(String, u64), String> = BTreeMap::new();
    let mut per_node = BTreeMap::new();
    for (name, log) in nodes {
        let started = started_in_log(log, job);
        per_node.insert(name.to_string(), started.len());
        for (lane, firing) in started {
            if let Some(first) = seen.insert((lane.clone(), firing), name.to_string()) {
                panic!("firing {firing} of job {job} (lane {lane}) was started by {first} and again by {name}");
            }
        }
    }
    per_node
}

/// Asserts that the records hold each firing of a lane at most once and every firing from the
/// first to the last (an `every 1s` job), and returns the firing times.
fn contiguous_once(records: &[Value], lane: &str, interval: u64) -> Vec<u64> {
    let mut firings: Vec<u64> = records
        .iter()
        .filter(|r| r["lane"] == lane)
        .flat_map(|r| {
            // A missed stretch stands for its firing and the `missed_before` ones before it.
            let last = u(r, "firing_ms");
            let before = r["missed_before"].as_u64().unwrap_or(0);
            (0..=before).map(move |k| last - (before - k) * interval)
        })
        .collect();
    firings.sort_unstable();
    let unique: BTreeSet<u64> = firings.iter().copied().collect();
    assert_eq!(
        unique.len(),
        firings.len(),
        "a firing recorded twice in lane {lane}: {firings:?}"
    );
    for pair in firings.windows(2) {
        assert_eq!(
            pair[1] - pair[0],
            interval,
            "a gap in lane {lane}'s firings: {firings:?}"
        );
    }
    firings
}

/// p50, p99 and max of a list of values.
fn percentiles(mut v: Vec<u64>) -> (u64, u64, u64) {
    if v.is_empty() {
        return (0, 0, 0);
    }
    v.sort_unstable();
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99), v[v.len() - 1])
}

fn short_window_array() -> TestArray {
    TestArray::start_with(1, 3, |c| {
        c.timing.client_reconnect_window = ConfigDuration(Duration::from_secs(3))
    })
}

#[test]
fn any_runs_each_firing_once_and_carries_on_after_a_node_kill() {
    let array = short_window_array();
    let mut nodes: Vec<TestNode> = ["n1", "n2", "n3"]
        .iter()
        .map(|n| TestNode::spawn(&array, n, "jobs", &["--logical-name", n], NODE_TOML))
        .collect();
    for n in &mut nodes {
        n.wait_ready(Duration::from_secs(30));
    }

    phase("an every-second job on any node, for 10 s");
    create(
        &nodes[0],
        json!({"id": "tick", "service": "demo:echo", "schedule": {"every": "1s"}, "overlap": "allow"}),
    );
    sleep(10_000);
    let logs: Vec<(String, std::path::PathBuf)> = ["n1", "n2", "n3"]
        .iter()
        .zip(&nodes)
        .map(|(n, t)| (n.to_string(), t.log.clone()))
        .collect();
    let refs: Vec<(&str, &Path)> = logs.iter().map(|(n, p)| (n.as_str(), p.as_path())).collect();
    let per_node = no_firing_started_twice(&refs, "tick");
    eprintln!("firings started per node so far: {per_node:?}");
    let (busiest, _) = per_node.iter().max_by_key(|(_, c)| **c).unwrap();
    let busiest = busiest.clone();

    phase(&format!(
        "kill -9 of {busiest}, the node that ran most firings; 10 s more"
    ));
    let index = ["n1", "n2", "n3"].iter().position(|n| *n == busiest).unwrap();
    let killed_at = wall_ms();
    nodes[index].kill9();
    sleep(10_000);
    let survivor_i = (index + 1) % 3;
    suspend(&nodes[survivor_i], "tick");
    // The dead node's array session ends after the reconnect window (3 s); a sweep (every 2 s)
    // then declares its unfinished run, if it had one, in doubt.
    sleep(6_000);

    phase("every firing once: in the records and in the logs");
    no_firing_started_twice(&refs, "tick");
    let records = runs(&nodes[survivor_i], "tick");
    let firings = contiguous_once(&records, "*", 1000);
    assert!(firings.len() >= 18, "too few firings: {firings:?}");
    for r in &records {
        assert!(
            matches!(outcome(r), "ok" | "in_doubt"),
            "every firing ran (or its node died running it): {r}"
        );
    }
    let after: Vec<&Value> = records
        .iter()
        .filter(|r| u(r, "firing_ms") > killed_at && outcome(r) == "ok")
        .collect();
    assert!(after.len() >= 5, "the others carried on after the kill: {records:?}");
    assert!(after.iter().all(|r| owner(r) != busiest), "{after:?}");
    let takeover = u(after[0], "claimed_ms").saturating_sub(killed_at);
    let (p50, p99, max) = percentiles(records.iter().map(|r| u(r, "claimed_ms") - u(r, "firing_ms")).collect());
    eprintln!(
        "FIGURES any: {} firings; lateness p50 {p50} ms, p99 {p99} ms, max {max} ms; first firing run by another node {takeover} ms after the kill; in doubt: {}",
        records.len(),
        records.iter().filter(|r| outcome(r) == "in_doubt").count()
    );

    phase("a node killed while it runs a firing: the firing is in doubt, and nobody reruns it");
    let victim = (index + 2) % 3;
    let victim_name = ["n1", "n2", "n3"][victim];
    create(
        &nodes[survivor_i],
        json!({"id": "slow", "service": "demo:checkpointed", "input": {"jobId": "slow-job", "steps": 40, "stepMillis": 100},
               "schedule": {"once": wall_ms() + 1500}, "target": {"node": victim_name}}),
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while started_in_log(&nodes[victim].log, "slow").is_empty() {
        assert!(Instant::now() < deadline, "the slow job never started on {victim_name}");
        sleep(50);
    }
    nodes[victim].kill9();
    // Its array session ends after the reconnect window (3 s); a sweep follows within 2 s.
    let deadline = Instant::now() + Duration::from_secs(30);
    let records = loop {
        let records = runs(&nodes[survivor_i], "slow");
        if records.iter().any(|r| outcome(r) == "in_doubt") || Instant::now() > deadline {
            break records;
        }
        sleep(250);
    };
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(
        (outcome(&records[0]), owner(&records[0])),
        ("in_doubt", victim_name),
        "{records:?}"
    );
    let started: usize = nodes.iter().map(|n| started_in_log(&n.log, "slow").len()).sum();
    assert_eq!(started, 1, "an in-doubt firing is never run again");
}

#[test]
fn all_runs_once_on_every_live_node_and_not_on_an_offline_one() {
    let array = short_window_array();
    // The job is declared in a's node.toml: created when a starts.
    let declared = format!(
        "{NODE_TOML}\n[[jobs]]\nid = \"everywhere\"\nservice = \"demo:echo\"\ntarget = \"all\"\nschedule = {{ every = \"1s\" }}\n"
    );
    let mut a = TestNode::spawn(&array, "a", "jobs", &["--logical-name", "a"], &declared);
    let mut b = TestNode::spawn(&array, "b", "jobs", &["--logical-name", "b"], NODE_TOML);
    a.wait_ready(Duration::from_secs(30));
    b.wait_ready(Duration::from_secs(30));
    sleep(3_000);

    phase("c joins later: it gets the firings from its join on");
    let c_started = wall_ms();
    let mut c = TestNode::spawn(&array, "c", "jobs", &["--logical-name", "c"], NODE_TOML);
    c.wait_ready(Duration::from_secs(30));
    sleep(3_000);

    phase("b goes offline for 4 s");
    let (code, _) = b.admin_post("/admin/offline");
    assert_eq!(code, 200);
    let offline_at = wall_ms();
    sleep(4_000);
    let online_at = wall_ms();
    let (code, _) = b.admin_post("/admin/online");
    assert_eq!(code, 200);
    sleep(3_000);
    suspend(&a, "everywhere");
    sleep(1_500);

    let refs = [("a", a.log.as_path()), ("b", b.log.as_path()), ("c", c.log.as_path())];
    let per_node = no_firing_started_twice(&refs, "everywhere");
    let records = runs(&c, "everywhere");
    let lanes: BTreeSet<&str> = records.iter().filter_map(|r| r["lane"].as_str()).collect();
    assert_eq!(lanes, BTreeSet::from(["a", "b", "c"]), "{records:?}");
    for lane in ["a", "b", "c"] {
        contiguous_once(&records, lane, 1000);
    }
    let ran = |lane: &str| -> Vec<&Value> {
        records
            .iter()
            .filter(|r| r["lane"] == lane && outcome(r) == "ok")
            .collect()
    };
    assert!(ran("a").len() >= 10 && ran("c").len() >= 5, "{per_node:?}");
    let first_c = ran("c").iter().map(|r| u(r, "firing_ms")).min().unwrap();
    assert!(
        first_c >= c_started,
        "c ran a firing from before it started: {first_c} < {c_started}"
    );
    // Margins of a second: the node's pass may have claimed just as it went offline.
    let during: Vec<&Value> = ran("b")
        .into_iter()
        .filter(|r| u(r, "claimed_ms") > offline_at + 1000 && u(r, "claimed_ms") < online_at)
        .collect();
    assert!(during.is_empty(), "b ran firings while offline: {during:?}");
    assert!(
        records
            .iter()
            .any(|r| r["lane"] == "b" && outcome(r) == "missed" && u(r, "firing_ms") > offline_at),
        "b's firings while offline are recorded as missed: {records:?}"
    );
    assert!(
        ran("b").iter().any(|r| u(r, "firing_ms") > online_at),
        "b fires again once online"
    );
    let (code, show) = admin(&a, "GET", "/admin/jobs/everywhere", &Value::Null);
    assert_eq!(code, 200);
    assert_eq!(
        show["children"].as_array().map(Vec::len),
        Some(3),
        "one child status per node: {show}"
    );
    assert_eq!(show["status"], "suspended", "{show}");
}

#[test]
fn node_jobs_follow_their_missed_policy_and_a_wrong_clock_fires_on_time() {
    let array = short_window_array();
    let state = array.path().join("n2-state");
    let n2_args = ["--logical-name", "n2", "--state-dir", state.to_str().unwrap()];
    let mut n1 = TestNode::spawn(&array, "n1", "jobs", &["--logical-name", "n1"], NODE_TOML);
    let skewed = format!("{NODE_TOML}clock_skew_ms = 30000\n");
    let mut n3 = TestNode::spawn(&array, "n3", "jobs", &["--logical-name", "n3"], &skewed);
    let mut n2 = TestNode::spawn(&array, "n2", "jobs", &n2_args, NODE_TOML);
    for n in [&mut n1, &mut n2, &mut n3] {
        n.wait_ready(Duration::from_secs(30));
    }
    for (id, missed) in [("skip", "skip"), ("once", "run_once")] {
        create(
            &n1,
            json!({"id": id, "service": "demo:echo", "schedule": {"every": "1s"}, "target": {"node": "n2"}, "missed": missed}),
        );
    }
    create(
        &n1,
        json!({"id": "clock", "service": "demo:echo", "schedule": {"every": "1s"}, "target": "all"}),
    );
    sleep(3_000);

    phase("n2 is down for 5 s");
    let down_at = wall_ms();
    n2.kill9();
    sleep(5_000);
    let up_at = wall_ms();
    let mut n2 = TestNode::spawn(&array, "n2-again", "jobs", &n2_args, NODE_TOML);
    n2.wait_ready(Duration::from_secs(30));
    sleep(3_000);
    for id in ["skip", "once", "clock"] {
        suspend(&n1, id);
    }
    sleep(1_500);

    phase("skip: the firings while n2 was down are recorded missed, none ran");
    let skip = runs(&n1, "skip");
    contiguous_once(&skip, "*", 1000);
    let ran_down = |records: &[Value]| -> usize {
        records
            .iter()
            .filter(|r| outcome(r) == "ok" && u(r, "claimed_ms") > down_at + 1000 && u(r, "claimed_ms") < up_at)
            .count()
    };
    assert_eq!(ran_down(&skip), 0, "{skip:?}");
    let missed: Vec<&Value> = skip.iter().filter(|r| outcome(r) == "missed").collect();
    assert!(
        missed.iter().map(|r| u(r, "missed_before") + 1).sum::<u64>() >= 3,
        "{skip:?}"
    );
    assert!(
        skip.iter().all(|r| owner(r) == "n2"),
        "only n2 decides n2's firings: {skip:?}"
    );

    phase("run_once: the latest missed firing ran once when n2 came back");
    let once = runs(&n1, "once");
    contiguous_once(&once, "*", 1000);
    assert_eq!(ran_down(&once), 0, "{once:?}");
    let caught_up: Vec<&Value> = once
        .iter()
        .filter(|r| outcome(r) == "ok" && r["missed_before"].as_u64().unwrap_or(0) >= 2)
        .collect();
    assert_eq!(caught_up.len(), 1, "one run stands for the missed stretch: {once:?}");
    assert!(once.iter().all(|r| outcome(r) != "missed"), "{once:?}");

    phase("a node whose clock is 30 s ahead fires at the same times as the others, never early");
    let clock = runs(&n1, "clock");
    let times = |lane: &str| -> BTreeSet<u64> {
        clock
            .iter()
            .filter(|r| r["lane"] == lane && outcome(r) == "ok")
            .map(|r| u(r, "firing_ms"))
            .collect()
    };
    let (t1, t3) = (times("n1"), times("n3"));
    assert!(t3.len() >= 8, "{clock:?}");
    // Each lane starts at its node's first sight of the job and stops at its last look before
    // the suspend: compare the window both lanes ran in.
    let from = *t1.first().unwrap().max(t3.first().unwrap());
    let to = *t1.last().unwrap().min(t3.last().unwrap());
    let window = |t: &BTreeSet<u64>| -> Vec<u64> { t.range(from..=to).copied().collect() };
    assert!(window(&t3).len() >= 8, "{clock:?}");
    assert_eq!(window(&t1), window(&t3), "n1 and the skewed n3 ran the same firings");
    for r in &clock {
        assert!(
            u(r, "claimed_ms") >= u(r, "firing_ms"),
            "a firing claimed before its time: {r}"
        );
    }
    let (p50, p99, max) = percentiles(
        clock
            .iter()
            .filter(|r| r["lane"] == "n3" && outcome(r) == "ok")
            .map(|r| u(r, "claimed_ms") - u(r, "firing_ms"))
            .collect(),
    );
    eprintln!("FIGURES skewed node (+30 s): lateness p50 {p50} ms, p99 {p99} ms, max {max} ms");
}

#[test]
fn a_failover_of_the_array_loses_and_doubles_no_firing() {
    let mut array = short_window_array();
    let mut a = TestNode::spawn(&array, "a", "jobs", &["--logical-name", "a"], NODE_TOML);
    let mut b = TestNode::spawn(&array, "b", "jobs", &["--logical-name", "b"], NODE_TOML);
    a.wait_ready(Duration::from_secs(30));
    b.wait_ready(Duration::from_secs(30));
    create(
        &a,
        json!({"id": "steady", "service": "demo:echo", "schedule": {"every": "1s"}}),
    );
    sleep(3_000);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let active = runtime.block_on(async {
        let client = array.client().await;
        array.wait_active(&client, 0, Duration::from_secs(10)).await
    });
    phase(&format!("kill -9 of the active {active}, back after 6 s"));
    let killed_at = wall_ms();
    array.kill9(&active);
    sleep(6_000);
    array.spawn(&active);
    sleep(4_000);
    suspend(&b, "steady");
    sleep(1_500);
    let refs = [("a", a.log.as_path()), ("b", b.log.as_path())];
    no_firing_started_twice(&refs, "steady");
    let records = runs(&a, "steady");
    let firings = contiguous_once(&records, "*", 1000);
    assert!(
        firings.iter().any(|f| *f > killed_at + 6_000),
        "firings went on: {firings:?}"
    );
    let missed: u64 = records
        .iter()
        .filter(|r| outcome(r) == "missed")
        .map(|r| u(r, "missed_before") + 1)
        .sum();
    let (p50, p99, max) = percentiles(records.iter().map(|r| u(r, "claimed_ms") - u(r, "firing_ms")).collect());
    eprintln!(
        "FIGURES failover: {} firings, {missed} missed (jobs_missed_after 10 s); lateness p50 {p50} ms, p99 {p99} ms, max {max} ms",
        firings.len()
    );
    assert_eq!(
        missed, 0,
        "a failover is far shorter than jobs_missed_after: {records:?}"
    );
}

#[test]
fn bad_jobs_are_refused_and_the_cli_manages_jobs() {
    let array = short_window_array();
    let mut n = TestNode::spawn(&array, "n", "jobs", &["--logical-name", "n"], NODE_TOML);
    n.wait_ready(Duration::from_secs(30));
    let future = wall_ms() + 3_600_000;

    phase("bad input: each a clear error, nothing stored");
    let cases = [
        (
            json!({"service": "demo:echo", "schedule": {"cron": "61 * * * * *"}}),
            "cron",
        ),
        (
            json!({"service": "demo:nope", "schedule": {"every": "1s"}}),
            "no service",
        ),
        (
            json!({"service": "demo:echo", "schedule": {"every": "1s"}, "target": {"node": "ghost"}}),
            "no node `ghost`",
        ),
        (
            json!({"service": "demo:echo", "schedule": {"every": "1s"}, "start": future + 10, "end": future}),
            "before",
        ),
        (
            json!({"service": "demo:echo", "schedule": {"every": "1ms"}}),
            "at least",
        ),
        (
            json!({"service": "demo:echo", "schedule": {"every": "1s"}, "id": "a b"}),
            "only ASCII",
        ),
        (json!({"service": "demo:echo"}), "schedule"),
        (
            json!({"service": "demo:echo", "schedule": {"every": "1s"}, "input": "x"}),
            "object",
        ),
    ];
    for (job, why) in cases {
        let (code, answer) = admin(&n, "POST", "/admin/jobs", &job);
        let message = answer["error"]["message"].as_str().unwrap_or("");
        assert_eq!(code, 400, "{job}: {answer}");
        assert!(message.contains(why), "{job}: `{message}` should say {why}");
    }
    let (code, answer) = admin(&n, "GET", "/admin/jobs", &Value::Null);
    assert_eq!(
        (code, answer["jobs"].as_array().map(Vec::len)),
        (200, Some(0)),
        "{answer}"
    );
    let (code, _, _) = http(&n.admin, "GET", "/admin/jobs", &[], "");
    assert_eq!(code, 401, "the jobs API needs the token");

    phase("the CLI: add, list, suspend, resume, runs, delete");
    let token_file = array.path().join("jobs-token");
    std::fs::write(&token_file, &n.token).unwrap();
    let cli = |args: &[&str]| -> (i32, String) {
        let out = std::process::Command::new(binary("ferrocotta"))
            .arg("jobs")
            .args(args)
            .arg("--node-admin")
            .arg(&n.admin)
            .arg("--admin-token-file")
            .arg(&token_file)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code().unwrap_or(-1), text)
    };
    let (code, out) = cli(&[
        "add",
        "--id",
        "from-cli",
        "--service",
        "demo:echo",
        "--every",
        "1s",
        "--input",
        r#"{"x":1}"#,
    ]);
    assert_eq!(code, 0, "{out}");
    let (code, out) = cli(&["list"]);
    assert!(code == 0 && out.contains("from-cli") && out.contains("active"), "{out}");
    sleep(2_500);
    let (code, out) = cli(&["suspend", "from-cli"]);
    assert!(code == 0 && out.contains("suspended"), "{out}");
    let (code, out) = cli(&["runs", "from-cli"]);
    assert!(code == 0 && out.contains(" ok "), "{out}");
    let (code, out) = cli(&["resume", "from-cli"]);
    assert!(code == 0 && out.contains("active"), "{out}");
    let (code, out) = cli(&["add", "--service", "demo:echo", "--cron", "not cron"]);
    assert!(code != 0 && out.contains("cron"), "{out}");
    let (code, out) = cli(&["delete", "from-cli"]);
    assert_eq!(code, 0, "{out}");
    let (code, out) = cli(&["show", "from-cli"]);
    assert!(code != 0 && out.contains("no job"), "{out}");

    phase("too many jobs: the one past JOBS_MAX is refused");
    let started = Instant::now();
    for i in 0..256 {
        create(
            &n,
            json!({"id": format!("j{i}"), "service": "demo:echo", "schedule": {"every": "1h"}, "suspended": true}),
        );
    }
    eprintln!("256 jobs created in {:?}", started.elapsed());
    let (code, answer) = admin(
        &n,
        "POST",
        "/admin/jobs",
        &json!({"id": "one-too-many", "service": "demo:echo", "schedule": {"every": "1h"}}),
    );
    assert_eq!(code, 409, "{answer}");
    assert!(
        answer["error"]["message"].as_str().unwrap_or("").contains("JOBS_MAX"),
        "{answer}"
    );
    let (_, answer) = admin(&n, "GET", "/admin/jobs", &Value::Null);
    assert_eq!(answer["jobs"].as_array().map(Vec::len), Some(256));
    let (code, page) = common::http_get(&n.admin, "/");
    assert!(
        code == 200 && page.contains("scheduled jobs") && page.contains("j0") && page.contains("206 more"),
        "{page}"
    );
}
