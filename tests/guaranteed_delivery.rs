//! Guaranteed delivery (`pub.remote.gd:*`, issue 13's first part) on real nodes and a real array:
//! a transaction's service runs once and only once across nodes, its effects commit with its
//! result, a dead runner's transaction is taken over as the service's setting says, and expiry,
//! restart, end, followtid and bad input answer as documented.

mod common;

use std::time::{Duration, Instant};

use common::{http, phase, TestArray, TestNode};
use ferrocotta::config::ConfigDuration;
use serde_json::{json, Value};

const NODE_TOML: &str = "member_refresh_interval = \"500ms\"\nclient_keepalive_interval = \"250ms\"\n";

fn call(node: &TestNode, service: &str, input: Value) -> (u16, Value) {
    let (code, _, out) = node.invoke(service, None, &input.to_string());
    (code, out)
}

fn start(node: &TestNode, input: Value) -> String {
    let (code, out) = call(node, "pub.remote.gd:start", input);
    assert_eq!(code, 200, "{out}");
    out["tid"].as_str().unwrap().to_string()
}

fn deposit(node: &TestNode, tid: &str, account: &str, amount: i64) -> (u16, Value) {
    call(
        node,
        "pub.remote.gd:invoke",
        json!({"tid": tid, "service": "demo:deposit", "input": {"account": account, "amount": amount}}),
    )
}

fn balance(node: &TestNode, account: &str) -> i64 {
    let (code, out) = call(
        node,
        "pub.cache:get",
        json!({"cacheName": "demo.accounts", "key": format!("{{{account}}}")}),
    );
    assert_eq!(code, 200, "{out}");
    out["value"].as_str().map_or(0, |v| v.parse().unwrap())
}

fn runs_started(nodes: &[&TestNode], tid: &str) -> usize {
    nodes
        .iter()
        .map(|n| {
            n.log_text()
                .lines()
                .filter(|l| l.contains("gd.run_started") && l.contains(tid))
                .count()
        })
        .sum()
}

fn array() -> TestArray {
    TestArray::start_with(1, 3, |c| {
        c.timing.client_reconnect_window = ConfigDuration(Duration::from_secs(3))
    })
}

#[test]
fn a_transaction_runs_once_across_nodes_and_answers_its_stored_result() {
    let array = array();
    let mut a = TestNode::spawn(&array, "a", "gd", &["--logical-name", "a"], NODE_TOML);
    let mut b = TestNode::spawn(&array, "b", "gd", &["--logical-name", "b"], NODE_TOML);
    a.wait_ready(Duration::from_secs(30));
    b.wait_ready(Duration::from_secs(30));

    phase("one tid invoked on two nodes at once runs once");
    let tid = start(&a, json!({"tag": "acct-1"}));
    assert!(tid.starts_with("{acct-1}."), "{tid}");
    let answers: Vec<(u16, Value)> = std::thread::scope(|s| {
        let ha = s.spawn(|| deposit(&a, &tid, "acct-1", 10));
        let hb = s.spawn(|| deposit(&b, &tid, "acct-1", 10));
        vec![ha.join().unwrap(), hb.join().unwrap()]
    });
    for (code, out) in &answers {
        assert_eq!(*code, 200, "{out}");
        assert_eq!(out["result"]["balance"], 10, "{out}");
    }
    assert_eq!(balance(&a, "acct-1"), 10);
    assert_eq!(runs_started(&[&a, &b], &tid), 1, "the service ran once");

    phase("invoked again after completion: the stored result, the balance untouched");
    let (code, out) = deposit(&b, &tid, "acct-1", 10);
    assert_eq!((code, out["result"]["balance"].as_i64()), (200, Some(10)), "{out}");
    assert_eq!(balance(&b, "acct-1"), 10);
    assert_eq!(runs_started(&[&a, &b], &tid), 1);

    phase("twenty transactions on one account from two nodes at once: every deposit once");
    let tids: Vec<String> = (0..20).map(|_| start(&a, json!({"tag": "acct-2"}))).collect();
    std::thread::scope(|s| {
        for (i, tid) in tids.iter().enumerate() {
            let node = if i % 2 == 0 { &a } else { &b };
            s.spawn(move || {
                let (code, out) = deposit(node, tid, "acct-2", 1);
                assert_eq!(code, 200, "{out}");
            });
        }
    });
    assert_eq!(balance(&a, "acct-2"), 20);
    for tid in &tids {
        let (code, out) = deposit(&a, tid, "acct-2", 1);
        assert_eq!(code, 200, "{out}");
    }
    assert_eq!(balance(&a, "acct-2"), 20, "repeats answer the stored results");

    phase("figures: guaranteed-delivery transactions through one node, 8 clients");
    let started = Instant::now();
    let per_client = 25;
    std::thread::scope(|s| {
        for c in 0..8 {
            let a = &a;
            s.spawn(move || {
                for i in 0..per_client {
                    let account = format!("load-{c}");
                    let tid = start(a, json!({"tag": account}));
                    let (code, out) = deposit(a, &tid, &account, i + 1);
                    assert_eq!(code, 200, "{out}");
                }
            });
        }
    });
    let took = started.elapsed();
    eprintln!(
        "FIGURES gd: {} transactions (start + invoke) through one node in {took:?}: {:.0} per second",
        8 * per_client,
        (8 * per_client) as f64 / took.as_secs_f64()
    );

    phase("admin: transactions by state, one transaction, end");
    let (code, list) = a.admin_get("/admin/gd?state=done");
    assert_eq!(code, 200, "{list}");
    assert_eq!(list["transactions"].as_array().map(Vec::len), Some(221), "{list}");
    let path = format!("/admin/gd/{}", tid.replace('{', "%7B").replace('}', "%7D"));
    let (code, one) = a.admin_get(&path);
    assert_eq!((code, one["state"].as_str()), (200, Some("done")), "{one}");
    let (code, ended) = a.admin_post(&format!("{path}/end"));
    assert_eq!((code, ended["state"].as_str()), (200, Some("ended")), "{ended}");
    let (code, out) = deposit(&a, &tid, "acct-1", 10);
    assert_eq!((code, out["error"]["code"].as_str()), (409, Some("ended")), "{out}");
    let (_, metrics, text) = http(&a.admin, "GET", "/metrics", &[], "");
    let _ = metrics;
    assert!(text.contains("ferrocotta_node_gd_done_total"), "{text}");
}

#[test]
fn a_dead_runners_transaction_is_taken_over_as_its_service_says() {
    let array = array();
    let rerun = format!("{NODE_TOML}\n[gd_takeover]\n\"demo:checkpointed\" = \"rerun\"\n");
    let mut runner = TestNode::spawn(&array, "runner", "gd", &["--logical-name", "runner"], NODE_TOML);
    let mut b = TestNode::spawn(&array, "b", "gd", &["--logical-name", "b"], &rerun);
    let mut c = TestNode::spawn(&array, "c", "gd", &["--logical-name", "c"], NODE_TOML);
    for n in [&mut runner, &mut b, &mut c] {
        n.wait_ready(Duration::from_secs(30));
    }
    let slow = |job: &str| json!({"jobId": job, "steps": 30, "stepMillis": 100});

    for (case, taker, job) in [("rerun", &b, "job-rerun"), ("in_doubt", &c, "job-doubt")] {
        phase(&format!(
            "the runner dies mid-run; the next invoke on another node: {case}"
        ));
        if case == "in_doubt" {
            runner = TestNode::spawn(&array, "runner2", "gd", &["--logical-name", "runner2"], NODE_TOML);
            runner.wait_ready(Duration::from_secs(30));
        }
        let tid = start(taker, json!({}));
        let invoke = json!({"tid": tid, "service": "demo:checkpointed", "input": slow(job), "timeout": "20s"});
        let (service, addr) = (runner.service.clone(), invoke.to_string());
        let background = std::thread::spawn(move || {
            let _ = std::panic::catch_unwind(|| http(&service, "POST", "/invoke/pub.remote.gd:invoke", &[], &addr));
        });
        let deadline = Instant::now() + Duration::from_secs(15);
        while runs_started(&[&runner], &tid) == 0 {
            assert!(Instant::now() < deadline, "the run never started");
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(500));
        runner.kill9();
        let _ = background.join();
        let taken = Instant::now();
        let (code, out) = call(taker, "pub.remote.gd:invoke", invoke.clone());
        eprintln!(
            "FIGURES takeover ({case}): answered {:?} after the kill: {code} {out}",
            taken.elapsed()
        );
        if case == "rerun" {
            assert_eq!(code, 200, "{out}");
            assert_eq!(out["attempts"], 2, "{out}");
            assert!(
                out["result"]["resumedFrom"].as_u64().unwrap() > 0,
                "it resumed from its checkpoint: {out}"
            );
        } else {
            assert_eq!((code, out["error"]["code"].as_str()), (409, Some("in_doubt")), "{out}");
            let (code, out) = call(taker, "pub.remote.gd:restart", json!({"tid": tid}));
            assert_eq!(code, 200, "{out}");
            let (code, out) = call(taker, "pub.remote.gd:invoke", invoke);
            assert_eq!((code, out["state"].as_str()), (200, Some("done")), "{out}");
        }
    }
}

#[test]
fn expiry_restart_followtid_and_bad_input_answer_clearly() {
    let array = array();
    let toml = format!("{NODE_TOML}gd_retention = \"2s\"\n");
    let mut n = TestNode::spawn(&array, "n", "gd", &["--logical-name", "n"], &toml);
    n.wait_ready(Duration::from_secs(30));

    phase("past its ttl a transaction expires; restart revives it");
    let tid = start(&n, json!({"ttl": "1s", "tag": "e"}));
    std::thread::sleep(Duration::from_millis(1500));
    let (code, out) = deposit(&n, &tid, "e", 5);
    assert_eq!((code, out["error"]["code"].as_str()), (409, Some("expired")), "{out}");
    let (code, out) = call(&n, "pub.remote.gd:restart", json!({"tid": tid}));
    assert_eq!(code, 200, "{out}");
    let (code, out) = deposit(&n, &tid, "e", 5);
    assert_eq!((code, out["result"]["balance"].as_i64()), (200, Some(5)), "{out}");

    phase("out of retries: a failing service's transaction expires");
    let tid = start(&n, json!({"retries": 1, "tag": "r"}));
    let bad = json!({"tid": tid, "service": "demo:deposit", "input": {"account": "r", "amount": "ten"}});
    let (code, out) = call(&n, "pub.remote.gd:invoke", bad.clone());
    assert_eq!((code, out["error"]["code"].as_str()), (422, Some("failed")), "{out}");
    let (code, out) = call(&n, "pub.remote.gd:invoke", bad);
    assert_eq!((code, out["error"]["code"].as_str()), (409, Some("expired")), "{out}");

    phase("followtid: a transaction waits for the one it follows");
    let first = start(&n, json!({"tag": "f"}));
    let second = start(&n, json!({"tag": "f", "followtid": first}));
    let (code, out) = call(
        &n,
        "pub.remote.gd:invoke",
        json!({"tid": second, "service": "demo:deposit", "input": {"account": "f", "amount": 1}, "timeout": 0}),
    );
    assert_eq!(
        (code, out["error"]["code"].as_str()),
        (409, Some("waiting_for_followtid")),
        "{out}"
    );
    assert_eq!(deposit(&n, &first, "f", 1).0, 200);
    assert_eq!(deposit(&n, &second, "f", 1).0, 200);
    assert_eq!(balance(&n, "f"), 2);

    phase("submit, then retrieve");
    let tid = start(&n, json!({"tag": "s"}));
    let (code, out) = call(
        &n,
        "pub.remote.gd:submit",
        json!({"tid": tid, "service": "demo:deposit", "input": {"account": "s", "amount": 3}}),
    );
    assert_eq!((code, out["state"].as_str()), (200, Some("submitted")), "{out}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, out) = call(&n, "pub.remote.gd:retrieve", json!({"tid": tid}));
        assert_eq!(code, 200, "{out}");
        if out["state"] == "done" {
            assert_eq!(out["result"]["balance"], 3);
            break;
        }
        assert!(Instant::now() < deadline, "never done: {out}");
        std::thread::sleep(Duration::from_millis(50));
    }

    phase("an ended transaction's record goes after the retention (2 s here)");
    let (code, out) = call(&n, "pub.remote.gd:end", json!({"tid": tid}));
    assert_eq!((code, out["state"].as_str()), (200, Some("ended")), "{out}");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (code, out) = call(&n, "pub.remote.gd:status", json!({"tid": tid}));
        if code == 404 {
            assert_eq!(out["error"]["code"], "unknown_tid", "{out}");
            break;
        }
        assert!(Instant::now() < deadline, "the ended record stayed: {out}");
        std::thread::sleep(Duration::from_millis(200));
    }

    phase("bad input");
    let tid = start(&n, json!({}));
    for (service, input, code, what) in [
        (
            "pub.remote.gd:invoke",
            json!({"tid": "{nope}.0", "service": "demo:echo"}),
            404,
            "unknown_tid",
        ),
        (
            "pub.remote.gd:invoke",
            json!({"tid": tid, "service": "demo:nothing"}),
            404,
            "not_found",
        ),
        (
            "pub.remote.gd:invoke",
            json!({"service": "demo:echo"}),
            400,
            "bad_request",
        ),
        (
            "pub.remote.gd:invoke",
            json!({"tid": tid, "service": "wm.server.cluster:clearClusterMemberList"}),
            403,
            "administrative",
        ),
        (
            "pub.remote.gd:submit",
            json!({"tid": tid, "service": "wm.server.cluster:clearClusterMemberList"}),
            403,
            "administrative",
        ),
        (
            "pub.remote.gd:submit",
            json!({"tid": tid, "service": "demo:nothing"}),
            404,
            "not_found",
        ),
        ("pub.remote.gd:start", json!({"ttl": "400d"}), 400, "bad_request"),
        (
            "pub.remote.gd:invoke",
            json!({"alias": 5, "tid": tid, "service": "demo:echo"}),
            400,
            "bad_request",
        ),
        ("pub.remote.gd:start", json!({"tag": "a{b}"}), 400, "bad_request"),
        ("pub.remote.gd:start", json!({"ttl": "soon"}), 400, "bad_request"),
        ("pub.remote.gd:start", json!({"followtid": "{x}.1"}), 404, "unknown_tid"),
        (
            "pub.remote.gd:retrieve",
            json!({"tid": "has space"}),
            400,
            "bad_request",
        ),
        (
            "pub.remote.gd:invoke",
            json!({"tid": tid, "service": "demo:echo", "input": {"x": "y".repeat(70_000)}}),
            400,
            "bad_request",
        ),
    ] {
        let (got, out) = call(&n, service, input.clone());
        assert_eq!(
            (got, out["error"]["code"].as_str()),
            (code, Some(what)),
            "{service} {input}: {out}"
        );
    }
    let (code, _, out) = n.invoke("pub.remote.gd:start", None, "{not json");
    assert_eq!(code, 400, "{out}");
}
