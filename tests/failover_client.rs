//! The failover client (`ferrocotta invoke`, `node_client::NodeClient`, the seed's `Context`) and
//! remote invoke (`pub.remote:invoke`, `pub.remote.gd:*` with an alias) against real nodes.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{binary, phase, TestArray, TestNode};
use ferrocotta::config::ConfigDuration;
use ferrocotta::node_client::{NodeClient, NodeClientSettings};
use serde_json::{json, Value};

const NODE_TOML: &str = "member_refresh_interval = \"500ms\"\nclient_keepalive_interval = \"250ms\"\n";

fn array() -> TestArray {
    TestArray::start_with(1, 3, |c| {
        c.timing.client_reconnect_window = ConfigDuration(Duration::from_secs(3))
    })
}

/// `ferrocotta invoke ARGS`: (exit code, stdout as JSON, stderr).
fn cli(args: &[&str]) -> (i32, Value, String) {
    let out = Command::new(binary("ferrocotta"))
        .arg("invoke")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_client_fails_over_to_the_next_node_then_to_the_retry_server() {
    let array = array();
    let mut a = TestNode::spawn(&array, "a", "c1", &["--logical-name", "a"], NODE_TOML);
    let mut b = TestNode::spawn(&array, "b", "c1", &["--logical-name", "b"], NODE_TOML);
    let mut c = TestNode::spawn(&array, "c", "c1", &["--logical-name", "c"], NODE_TOML);
    let mut retry = TestNode::spawn(&array, "rs", "other", &["--logical-name", "rs"], NODE_TOML);
    for n in [&mut a, &mut b, &mut c, &mut retry] {
        n.wait_ready(Duration::from_secs(30));
    }
    let nodes = format!("{},{},{}", a.service, b.service, c.service);

    phase("a node tells the client the other members");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let client = runtime.block_on(NodeClient::connect(NodeClientSettings::new(&a.service).unwrap()));
    // A node whose array reads fail for a moment (a young array may still be electing) lists no
    // members; the client keeps the list it was given, and may ask again.
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.nodes().len() < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        runtime.block_on(client.discover());
    }
    let known = client.nodes();
    for n in [&a, &b, &c] {
        assert!(known.contains(&n.service), "{known:?} lacks {}", n.service);
    }

    phase("first node down, second offline, third answers; the session goes along");
    a.kill9();
    let (code, _) = b.admin_post("/admin/offline");
    assert_eq!(code, 200);
    let mut settings = NodeClientSettings::new(&nodes).unwrap();
    settings.discover = false;
    settings.request_timeout = Duration::from_secs(3);
    let client = runtime.block_on(NodeClient::connect(settings));
    let first = runtime.block_on(client.invoke("demo:counter", &json!({}))).unwrap();
    assert_eq!(
        (first.node.as_str(), first.value["counter"].as_i64()),
        (c.service.as_str(), Some(1))
    );
    let (code, _) = b.admin_post("/admin/online");
    assert_eq!(code, 200);
    let (code, _) = c.admin_post("/admin/offline");
    assert_eq!(code, 200);
    let second = runtime.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match client.invoke("demo:counter", &json!({})).await {
                Ok(a) => return a,
                Err(e) if Instant::now() < deadline => eprintln!("retrying: {e}"),
                Err(e) => panic!("{e}"),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    assert_eq!(
        (second.node.as_str(), second.value["counter"].as_i64()),
        (b.service.as_str(), Some(2)),
        "the conversation continued on b with its ssnid"
    );

    phase("the CLI: every node down or offline, the retry server answers");
    let (code, _) = b.admin_post("/admin/offline");
    assert_eq!(code, 200);
    let (code, out, err) = cli(&[
        "--nodes",
        &nodes,
        "--retry-server",
        &retry.service,
        "--timeout",
        "3s",
        "demo:echo",
        r#"{"x":1}"#,
    ]);
    assert_eq!(code, 0, "{out} {err}");
    assert_eq!(
        (out["node"].as_str(), out["result"]["node"].as_str()),
        (Some(retry.service.as_str()), Some("rs"))
    );

    phase("the CLI: all down, a clear error naming each address, within the timeout");
    let started = Instant::now();
    let (code, out, err) = cli(&["--nodes", &nodes, "--timeout", "2s", "--no-discover", "demo:echo"]);
    assert_eq!(code, 3, "{out} {err}");
    for n in [&a, &b, &c] {
        assert!(err.contains(&n.service), "{err}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
    eprintln!("FIGURES all three nodes refused in {:?}", started.elapsed());
    let (code, out, _) = cli(&["--nodes", &retry.service, "demo:nothing"]);
    assert_eq!((code, out["error"]["code"].as_str()), (1, Some("not_found")), "{out}");
}

#[test]
fn guaranteed_delivery_through_the_client_survives_a_node_killed_after_its_commit() {
    let array = array();
    // a answers 3 s after it committed: the test kills it in between.
    let slow_answer = format!("{NODE_TOML}gd_answer_delay = \"3s\"\n");
    let mut a = TestNode::spawn(&array, "a", "gd", &["--logical-name", "a"], &slow_answer);
    let mut b = TestNode::spawn(&array, "b", "gd", &["--logical-name", "b"], NODE_TOML);
    a.wait_ready(Duration::from_secs(30));
    b.wait_ready(Duration::from_secs(30));
    let nodes = format!("{},{}", a.service, b.service);
    let args = [
        "--nodes",
        &nodes,
        "--no-discover",
        "--gd",
        "--tag",
        "acct-9",
        "--timeout",
        "10s",
        "demo:deposit",
        r#"{"account":"acct-9","amount":25}"#,
    ];
    let started = Instant::now();
    let child = Command::new(binary("ferrocotta"))
        .arg("invoke")
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !a.log_text().contains("gd.done") {
        assert!(Instant::now() < deadline, "a never committed: {}", a.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    a.kill9();
    let killed = Instant::now();
    let out = child.wait_with_output().unwrap();
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{answer} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(answer["node"].as_str(), Some(b.service.as_str()), "{answer}");
    assert_eq!(
        (answer["state"].as_str(), answer["result"]["balance"].as_i64()),
        (Some("done"), Some(25))
    );
    assert_eq!(answer["attempts"], 1, "the service ran once: {answer}");
    eprintln!(
        "FIGURES the client had the stored result from b {:?} after the kill ({:?} in all)",
        killed.elapsed(),
        started.elapsed()
    );
    let (code, _, out) = b.invoke(
        "pub.cache:get",
        None,
        &json!({"cacheName": "demo.accounts", "key": "{acct-9}"}).to_string(),
    );
    assert_eq!(
        (code, out["value"].as_str()),
        (200, Some("25")),
        "the balance moved once"
    );
}

#[test]
fn remote_invoke_tries_the_remote_cluster_then_its_retry_server() {
    let array = array();
    let mut far1 = TestNode::spawn(&array, "far1", "far", &["--logical-name", "far1"], NODE_TOML);
    let mut far2 = TestNode::spawn(&array, "far2", "far", &["--logical-name", "far2"], NODE_TOML);
    let mut rs = TestNode::spawn(&array, "rs", "retry", &["--logical-name", "rs"], NODE_TOML);
    for n in [&mut far1, &mut far2, &mut rs] {
        n.wait_ready(Duration::from_secs(30));
    }
    let local_toml = format!(
        "{NODE_TOML}\n[remote.far]\nurls = \"{},{}\"\nretry_server = \"{}\"\ntimeout = \"3s\"\n",
        far1.service, far2.service, rs.service
    );
    let mut local = TestNode::spawn(&array, "local", "near", &["--logical-name", "local"], &local_toml);
    local.wait_ready(Duration::from_secs(30));
    let remote = |input: Value| {
        let (code, _, out) = local.invoke("pub.remote:invoke", None, &input.to_string());
        (code, out)
    };

    phase("$clusterRetry true: the remote cluster's nodes");
    let (code, out) = remote(json!({"alias": "far", "service": "demo:echo", "input": {"hi": 1}}));
    assert_eq!((code, out["output"]["node"].as_str()), (200, Some("far1")), "{out}");
    far1.kill9();
    let (code, out) = remote(json!({"alias": "far", "service": "demo:echo", "$clusterRetry": true}));
    assert_eq!((code, out["output"]["node"].as_str()), (200, Some("far2")), "{out}");

    phase("$clusterRetry false: straight to the retry server");
    let (code, out) = remote(json!({"alias": "far", "service": "demo:echo", "$clusterRetry": false}));
    assert_eq!((code, out["output"]["node"].as_str()), (200, Some("rs")), "{out}");
    far2.kill9();
    let (code, out) = remote(json!({"alias": "far", "service": "demo:echo"}));
    assert_eq!(
        (code, out["output"]["node"].as_str()),
        (200, Some("rs")),
        "the whole cluster down: {out}"
    );
    let (code, out) = remote(json!({"alias": "nowhere", "service": "demo:echo"}));
    assert_eq!(
        (code, out["error"]["code"].as_str()),
        (400, Some("bad_request")),
        "{out}"
    );

    phase("guaranteed delivery on the remote cluster through its alias");
    let (code, _, out) = local.invoke(
        "pub.remote.gd:start",
        None,
        &json!({"alias": "far", "tag": "r1"}).to_string(),
    );
    assert_eq!(code, 200, "{out}");
    let tid = out["tid"].as_str().unwrap().to_string();
    let body = json!({"alias": "far", "tid": tid, "service": "demo:deposit", "input": {"account": "r1", "amount": 7}});
    let (code, _, out) = local.invoke("pub.remote.gd:invoke", None, &body.to_string());
    assert_eq!(
        (code, out["state"].as_str(), out["result"]["balance"].as_i64()),
        (200, Some("done"), Some(7)),
        "{out}"
    );
    let (code, _, out) = local.invoke("pub.remote.gd:invoke", None, &body.to_string());
    assert_eq!(
        (code, out["result"]["balance"].as_i64()),
        (200, Some(7)),
        "the stored result: {out}"
    );
}
