//! Integration nodes on a real array: sessions that move between nodes, the member list, start-up
//! rules and the admin port.

mod common;

use std::time::{Duration, Instant};

use common::{http, phase, TestArray, TestNode};
use ferrocotta::config::ConfigDuration;

const NODE_TOML: &str =
    "member_refresh_interval = \"500ms\"\nsession_max_bytes = 4096\nclient_keepalive_interval = \"250ms\"\n";

#[test]
fn two_nodes_share_sessions_and_a_member_list() {
    let array = TestArray::start_with(1, 3, |c| {
        c.timing.client_reconnect_window = ConfigDuration(Duration::from_secs(3))
    });
    let cluster = "com.example.integration.production.cluster.eu-west";
    let mut a = TestNode::spawn(&array, "a", cluster, &["--logical-name", "node-a"], NODE_TOML);
    let mut b = TestNode::spawn(&array, "b", cluster, &["--logical-name", "node-b"], NODE_TOML);
    a.wait_ready(Duration::from_secs(30));
    b.wait_ready(Duration::from_secs(30));

    phase("the effective cluster name of a long dotted name");
    let (code, status) = a.admin_get("/admin/status");
    assert_eq!(code, 200);
    let eff = status["effective_cluster_name"].as_str().unwrap();
    assert!(eff.starts_with("com_example_integrat") && eff.len() == 32, "{eff}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.admin_get("/admin/status").1["state"] != "connected" {
        assert!(Instant::now() < deadline, "node A never reported connected");
        std::thread::sleep(Duration::from_millis(100));
    }

    phase("a session started on A continues on B; demo:counter counts across nodes");
    let (code, cookie, out) = a.invoke("demo:counter", None, "");
    assert_eq!(code, 200, "{out}");
    let cookie = cookie.expect("a new session gets an ssnid cookie");
    assert_eq!(out["counter"], 1);
    let (_, _, out) = b.invoke("demo:counter", Some(&cookie), "");
    assert_eq!(
        (out["counter"].as_i64(), out["node"].as_str()),
        (Some(2), Some("node-b"))
    );
    let (_, _, out) = a.invoke("demo:counter", Some(&cookie), "");
    assert_eq!(out["counter"], 3);
    let (code, _, _) = a.invoke("pub.session:put", Some(&cookie), r#"{"key":"cart","value":["book"]}"#);
    assert_eq!(code, 200);
    let (_, _, out) = b.invoke("pub.session:get", Some(&cookie), r#"{"key":"cart"}"#);
    assert_eq!(out["value"], serde_json::json!(["book"]));

    phase("a session over its size limit is refused with 413");
    let big = format!(r#"{{"key":"blob","value":"{}"}}"#, "x".repeat(5000));
    let (code, _, out) = b.invoke("pub.session:put", Some(&cookie), &big);
    assert_eq!(code, 413, "{out}");
    assert!(out["error"]["message"].as_str().unwrap().contains("limit"));
    let (code, _, out) = a.invoke("nope:missing", None, "");
    assert_eq!(code, 404, "{out}");
    assert!(out["error"]["code"].is_string());

    phase("the admin port refuses requests without the token");
    let (code, _, _) = http(&a.admin, "GET", "/admin/status", &[], "");
    assert_eq!(code, 401);
    let (code, _, _) = http(
        &a.admin,
        "GET",
        "/admin/cluster",
        &[("Authorization", "Bearer wrong-token")],
        "",
    );
    assert_eq!(code, 401);
    let (code, _, _) = http(&a.admin, "POST", "/admin/offline", &[], "");
    assert_eq!(code, 401, "actions need the token");
    // Read-only counts and the page (what public services show) open in a browser and a scraper.
    for path in ["/healthz", "/metrics", "/"] {
        let (code, _, body) = http(&a.admin, "GET", path, &[], "");
        assert_eq!(code, 200, "{path} needs no token");
        assert!(!body.contains(&a.token), "{path} never shows the token");
    }
    let (_, _, page) = http(&a.admin, "GET", "/", &[], "");
    assert!(page.contains("node-b"), "the page lists the members: {page}");
    assert!(!page.contains(&b.admin), "but not their admin addresses: {page}");

    phase("offline closes the service port, the admin port stays; online reopens it");
    let (code, _) = a.admin_post("/admin/offline");
    assert_eq!(code, 200);
    common::wait_port(&a.service, false, Duration::from_secs(5));
    assert_eq!(a.admin_get("/admin/status").1["online"], false);
    let state_of_a = |seen_by: &TestNode| {
        seen_by.admin_get("/admin/cluster").1["members"]
            .as_array()
            .and_then(|m| m.iter().find(|x| x["logical_name"] == "node-a").cloned())
            .map(|m| m["state"].clone())
    };
    // The member list says so at once, to the node itself and to the others.
    assert_eq!(state_of_a(&a), Some(serde_json::json!("offline")));
    assert_eq!(state_of_a(&b), Some(serde_json::json!("offline")));
    let (code, _) = a.admin_post("/admin/online");
    assert_eq!(code, 200);
    common::wait_port(&a.service, true, Duration::from_secs(5));
    assert_eq!(state_of_a(&b), Some(serde_json::json!("online")));
    let (_, _, out) = a.invoke("demo:counter", Some(&cookie), "");
    assert_eq!(out["counter"], 4, "serving again, same session");

    phase("both nodes are in the member list");
    assert_eq!(a.member_names(), vec!["node-a", "node-b"]);
    assert_eq!(b.member_names(), vec!["node-a", "node-b"]);

    phase("kill -9 of node B: it disappears within the reconnect window");
    b.kill9();
    let killed = Instant::now();
    while a.member_names().contains(&"node-b".to_string()) {
        assert!(
            killed.elapsed() < Duration::from_secs(3 + 5),
            "B never left the member list"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "B left the member list {:?} after kill -9 (window 3 s)",
        killed.elapsed()
    );

    phase("clearing the list: live members come back within one refresh interval");
    let (code, out) = a.admin_post("/admin/cluster/clear");
    assert_eq!(code, 200, "{out}");
    let cleared = Instant::now();
    while a.member_names() != vec!["node-a"] {
        assert!(cleared.elapsed() < Duration::from_secs(3), "A did not re-register");
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "A re-registered {:?} after the clear (refresh 500 ms)",
        cleared.elapsed()
    );

    phase("a stateless service answers; SIGTERM leaves the member list at once");
    let (code, _, out) = a.invoke("demo:echo", None, r#"{"x":1}"#);
    assert_eq!((code, out["input"]["x"].as_i64()), (200, Some(1)));
    let observer = tokio::runtime::Runtime::new().unwrap();
    let members_cache = format!("ferrocotta.node.members.{eff}");
    let pid = a.child.as_ref().unwrap().id() as i32;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM).unwrap();
    assert_eq!(a.wait_exit(Duration::from_secs(15)), Some(0), "{}", a.log_text());
    observer.block_on(async {
        let client = array.client().await;
        assert_eq!(
            client.get(&members_cache, b"node-a").await.unwrap(),
            None,
            "A left the list on SIGTERM"
        );
    });
}

#[test]
fn startup_rules_no_array_standalone_and_name_clash() {
    let array = TestArray::start(1, 3);
    let dead = format!("127.0.0.1:{}", common::free_ports(1)[0]);

    phase("no array reachable: exit non-zero within connect_timeout, naming the URLs");
    // Built (if need be) before the clock starts.
    let node_bin = common::binary("integration-node");
    let started = Instant::now();
    let out = std::process::Command::new(&node_bin)
        .args([
            "--array-urls",
            &dead,
            "--cluster-name",
            "c1",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .args(["--connect-timeout", "1s"])
        .output()
        .unwrap();
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains(&dead), "the error names the URL: {stderr}");
    assert!(took < Duration::from_secs(5), "took {took:?} with connect_timeout 1s");
    eprintln!("no array: exit {:?} after {took:?}", out.status.code());

    phase("standalone: starts with local state");
    let out = std::process::Command::new(common::binary("integration-node"))
        .args([
            "--array-urls",
            &dead,
            "--cluster-name",
            "c1",
            "--connect-timeout",
            "1s",
            "--on-startup-error",
            "standalone",
        ])
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(array.node_tls_args("standalone"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut child = out;
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
    assert!(line.contains("standalone"), "{line}");
    let service = line.split_whitespace().nth(4).unwrap().to_string();
    let (code, _, body) = http(&service, "POST", "/invoke/demo:counter", &[], "");
    assert_eq!(code, 200, "{body}");
    let _ = child.kill();
    let _ = child.wait();

    phase("a logical name taken by a live member is refused, naming the holder");
    let mut first = TestNode::spawn(&array, "first", "c2", &["--logical-name", "same"], "");
    first.wait_ready(Duration::from_secs(30));
    let mut second = TestNode::spawn(&array, "second", "c2", &["--logical-name", "same"], "");
    let code = second.wait_exit(Duration::from_secs(30));
    assert_eq!(code, Some(5), "{}", second.log_text());
    assert!(
        second.log_text().contains(&first.service),
        "names the holder: {}",
        second.log_text()
    );
    assert_eq!(first.member_names(), vec!["same"]);

    phase("two nodes started at once with one name: exactly one serves, its entry stays its own");
    let mut racers = [
        TestNode::spawn(&array, "racer-a", "c3", &["--logical-name", "twin"], ""),
        TestNode::spawn(&array, "racer-b", "c3", &["--logical-name", "twin"], ""),
    ];
    let deadline = Instant::now() + Duration::from_secs(30);
    let loser = loop {
        if let Some(i) = racers
            .iter_mut()
            .position(|r| r.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(Some(_)))))
        {
            break i;
        }
        assert!(Instant::now() < deadline, "neither node refused the shared name");
        std::thread::sleep(Duration::from_millis(50));
    };
    let code = racers[loser].wait_exit(Duration::from_secs(1));
    assert_eq!(code, Some(5), "{}", racers[loser].log_text());
    let winner = &mut racers[1 - loser];
    winner.wait_ready(Duration::from_secs(30));
    // Three refresh turns (2 s each): an entry that flipped between two writers would show here.
    for _ in 0..3 {
        std::thread::sleep(Duration::from_secs(2));
        let (code, members) = winner.admin_get("/admin/cluster");
        assert_eq!(code, 200, "{members}");
        let services: Vec<&str> = members["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["service"].as_str().unwrap())
            .collect();
        assert_eq!(services, vec![winner.service.as_str()], "{members}");
    }

    phase("a bad logical name is refused");
    let out = std::process::Command::new(common::binary("integration-node"))
        .args([
            "--array-urls",
            &array.urls(),
            "--cluster-name",
            "c3",
            "--logical-name",
            "a;b",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains(';'));
}

#[test]
fn a_node_cut_from_the_array_degrades_then_reconnects_and_rejoins() {
    let window = Duration::from_secs(2);
    let mut array = TestArray::start_with(1, 3, |c| c.timing.client_reconnect_window = ConfigDuration(window));
    let toml = "member_refresh_interval = \"300ms\"\nclient_keepalive_interval = \"250ms\"\nrequest_timeout = \"1s\"\n";
    let mut node = TestNode::spawn(&array, "n", "cut", &["--logical-name", "n1"], toml);
    node.wait_ready(Duration::from_secs(30));
    let (_, cookie, out) = node.invoke("demo:counter", None, "");
    let cookie = cookie.unwrap();
    assert_eq!(out["counter"], 1);

    phase("every array server stopped: the node degrades but answers within its timeout");
    for n in array.stripe_servers(0) {
        array.kill9(&n);
    }
    let started = Instant::now();
    let (code, _, out) = node.invoke("demo:counter", Some(&cookie), "");
    let took = started.elapsed();
    assert_eq!(code, 503, "{out}");
    assert_eq!(out["error"]["code"], "ISS.0033.0154E");
    assert!(
        took < Duration::from_millis(1000 + 1500),
        "answered after {took:?} (timeout 1 s)"
    );
    eprintln!("session write without the array: 503 after {took:?}");
    let (code, _, _) = node.invoke("demo:echo", None, r#"{"still":"here"}"#);
    assert_eq!(code, 200, "a stateless service keeps working");
    let deadline = Instant::now() + Duration::from_secs(5);
    while node.admin_get("/admin/status").1["state"] != "disconnected" {
        assert!(Instant::now() < deadline, "the node never reported disconnected");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        node.member_names().is_empty(),
        "a node cut from the array shows an empty member list"
    );

    phase("the array comes back: same session, the counter goes on");
    for n in array.stripe_servers(0) {
        array.spawn(&n);
    }
    let back = Instant::now();
    let out = loop {
        let (code, _, out) = node.invoke("demo:counter", Some(&cookie), "");
        if code == 200 {
            break out;
        }
        assert!(
            back.elapsed() < Duration::from_secs(20),
            "the node never reconnected: {out}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!(
        "node served the session again {:?} after the array restarted",
        back.elapsed()
    );
    assert_eq!(out["counter"], 2);

    phase("frozen (SIGSTOP) longer than the reconnect window, several times: it rejoins by itself");
    let pid = nix::unistd::Pid::from_raw(node.child.as_ref().unwrap().id() as i32);
    for round in 1..=3u64 {
        while node.member_names() != vec!["n1"] {
            std::thread::sleep(Duration::from_millis(100));
        }
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
        std::thread::sleep(window + Duration::from_secs(2));
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
        let resumed = Instant::now();
        loop {
            let (_, s) = node.admin_get("/admin/status");
            if s["rejoins"].as_u64() == Some(round) && node.member_names() == vec!["n1"] {
                break;
            }
            assert!(
                resumed.elapsed() < Duration::from_secs(15),
                "round {round}: no rejoin: {s}\n{}",
                node.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!(
            "round {round}: rejoined and re-registered {:?} after SIGCONT",
            resumed.elapsed()
        );
    }
    let (_, _, out) = node.invoke("demo:counter", Some(&cookie), "");
    assert_eq!(
        out["counter"], 3,
        "the session (array data) survived the node's rejoins"
    );

    phase("the cluster console shows the node's rejoins and nonstop timeouts, with their events");
    let admin = array.admin_addr(&array.stripe_servers(0)[0]);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, body) = common::http_get(&admin, "/v1/console");
        let view: ferrocotta::console::ArrayView = serde_json::from_str(&body).unwrap();
        let entry = view.member("cut", "n1");
        let shown = entry.as_ref().is_some_and(|m| {
            let kinds: Vec<&str> = m.events.iter().map(|e| e.kind.as_str()).collect();
            m.rejoins == 3
                && m.nonstop_timeouts >= 1
                && kinds.contains(&"rejoined")
                && kinds.contains(&"nonstop_timeout")
        });
        if shown {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the console does not show n1's rejoins and nonstop timeouts: {entry:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn cache_and_storage_locks_and_a_checkpointed_job_across_nodes() {
    let array = TestArray::start(1, 3);
    let toml = "lock_max_duration = \"1500ms\"\n";
    let mut a = TestNode::spawn(&array, "a", "jobs", &["--logical-name", "a"], toml);
    let mut b = TestNode::spawn(&array, "b", "jobs", &["--logical-name", "b"], toml);
    a.wait_ready(Duration::from_secs(30));
    b.wait_ready(Duration::from_secs(30));

    phase("pub.cache.lock: a second holder waits lockWaitTime, then fails; free after release");
    let lock = r#"{"cacheName":"orders","key":"o-1","lockWaitTime":0}"#;
    let (code, _, out) = a.invoke("pub.cache.lock:acquireLock", None, lock);
    assert_eq!(code, 200, "{out}");
    let started = Instant::now();
    let (code, _, out) = b.invoke(
        "pub.cache.lock:acquireLock",
        None,
        r#"{"cacheName":"orders","key":"o-1","lockWaitTime":500}"#,
    );
    let waited = started.elapsed();
    assert_eq!(
        (code, out["error"]["code"].as_str()),
        (409, Some("lock_timeout")),
        "{out}"
    );
    assert!(waited >= Duration::from_millis(450), "gave up after {waited:?}");
    let (code, _, _) = a.invoke("pub.cache.lock:releaseLock", None, lock);
    assert_eq!(code, 200);
    let (code, _, out) = b.invoke("pub.cache.lock:acquireLock", None, lock);
    assert_eq!(code, 200, "{out}");

    phase("pub.storage: put/get/keys; a lock held past lock_max_duration is broken");
    let (code, _, _) = a.invoke(
        "pub.storage:put",
        None,
        r#"{"storeName":"s","key":"k","value":{"n":1}}"#,
    );
    assert_eq!(code, 200);
    let (_, _, out) = b.invoke("pub.storage:get", None, r#"{"storeName":"s","key":"k"}"#);
    assert_eq!(out["value"]["n"], 1);
    let (code, _, out) = a.invoke(
        "pub.storage:lock",
        None,
        r#"{"storeName":"s","key":"k","waitLength":0}"#,
    );
    assert_eq!(code, 200, "{out}");
    let locked_at = Instant::now();
    let (code, _, out) = b.invoke(
        "pub.storage:lock",
        None,
        r#"{"storeName":"s","key":"k","waitLength":300}"#,
    );
    assert_eq!(code, 409, "held by a, not yet breakable: {out}");
    let (_, _, out) = b.invoke("pub.storage:listLocks", None, r#"{"storeName":"s"}"#);
    assert_eq!(out["locks"][0]["owner"], "a");
    let (code, _, out) = b.invoke(
        "pub.storage:lock",
        None,
        r#"{"storeName":"s","key":"k","waitLength":5000}"#,
    );
    assert_eq!((code, out["broken"].as_bool()), (200, Some(true)), "{out}");
    assert!(
        locked_at.elapsed() >= Duration::from_millis(1500),
        "broken before lock_max_duration"
    );
    let (code, _, _) = a.invoke("pub.storage:unlock", None, r#"{"storeName":"s","key":"k"}"#);
    assert_eq!(code, 409, "a no longer holds it");
    let (code, _, _) = b.invoke("pub.storage:unlock", None, r#"{"storeName":"s","key":"k"}"#);
    assert_eq!(code, 200);

    phase("demo:checkpointed killed mid-run on A finishes on B from its last checkpoint");
    let job = r#"{"jobId":"job-1","steps":10,"stepMillis":300}"#;
    let a_service = a.service.clone();
    let runner = std::thread::spawn(move || common::http(&a_service, "POST", "/invoke/demo:checkpointed", &[], job));
    std::thread::sleep(Duration::from_millis(1200));
    a.kill9();
    let _ = runner.join();
    let (code, _, out) = b.invoke("demo:checkpointed", None, job);
    assert_eq!(code, 200, "{out}");
    let resumed = out["resumedFrom"].as_u64().unwrap();
    assert!((2..10).contains(&resumed), "resumed from step {resumed}: {out}");
    assert_eq!(out["completed"], 10);
    assert_eq!(out["nodes"], serde_json::json!(["a", "b"]));
    eprintln!("checkpointed job resumed on B from step {resumed}");

    phase("a document that is not a checkpoint is refused, not overwritten or restarted from zero");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let garbage = br#"{"note":"not a checkpoint"}"#;
    rt.block_on(async {
        let client = array.client().await;
        client
            .put("ferrocotta.node.checkpoints.jobs", b"job-2", garbage)
            .await
            .unwrap();
    });
    let (code, _, out) = b.invoke(
        "demo:checkpointed",
        None,
        r#"{"jobId":"job-2","steps":2,"stepMillis":1}"#,
    );
    assert_eq!(
        (code, out["error"]["code"].as_str()),
        (409, Some("bad_checkpoint")),
        "{out}"
    );
    let kept = rt.block_on(async {
        let client = array.client().await;
        client.get("ferrocotta.node.checkpoints.jobs", b"job-2").await.unwrap()
    });
    assert_eq!(kept.as_deref(), Some(&garbage[..]), "the document was overwritten");
}

#[test]
fn each_nonstop_behaviour_of_the_sessions_cache_through_the_node() {
    let mut array = TestArray::start(1, 3);
    let nodes: Vec<(&str, TestNode)> = ["noop", "local_reads", "local_reads_and_exception_on_write"]
        .into_iter()
        .map(|behavior| {
            let toml = format!(
                "client_keepalive_interval = \"250ms\"\nrequest_timeout = \"1s\"\n[sessions_nonstop]\ntimeout = \"1s\"\ntimeout_behavior = \"{behavior}\"\n"
            );
            let mut n = TestNode::spawn(&array, behavior, "ns", &["--logical-name", behavior], &toml);
            n.wait_ready(Duration::from_secs(30));
            (behavior, n)
        })
        .collect();
    let mut cookies = Vec::new();
    for (_, n) in &nodes {
        let (_, c, _) = n.invoke("demo:counter", None, "");
        let c = c.unwrap();
        let (_, _, out) = n.invoke("demo:counter", Some(&c), "");
        assert_eq!(out["counter"], 2);
        cookies.push(c);
    }

    phase("every array server stopped");
    for s in array.stripe_servers(0) {
        array.kill9(&s);
    }
    let answer = |i: usize| {
        let started = Instant::now();
        let r = nodes[i].1.invoke("demo:counter", Some(&cookies[i]), "");
        let took = started.elapsed();
        assert!(
            took < Duration::from_millis(2 * 1000 + 1500),
            "{}: answered after {took:?}",
            nodes[i].0
        );
        eprintln!("{}: {} {} after {took:?}", nodes[i].0, r.0, r.2);
        r
    };
    let (code, _, out) = answer(0);
    assert_eq!(
        (code, out["counter"].as_i64()),
        (200, Some(1)),
        "noop: the session reads empty, the write is ignored"
    );
    let (code, _, out) = answer(1);
    assert_eq!(
        (code, out["counter"].as_i64()),
        (200, Some(3)),
        "local_reads: the last session this node saw"
    );
    let (code, _, out) = answer(2);
    assert_eq!(
        (code, out["error"]["code"].as_str()),
        (503, Some("ISS.0033.0154E")),
        "local reads, but writes raise"
    );
}

/// A fake array server that refuses every hello as a newer version would.
fn fake_server_of_another_version() -> String {
    use ferrocotta::protocol::{codec, decode, encode, nonce, ClientMessage, Refusal, ServerMessage, SOFTWARE_VERSION};
    use futures::{SinkExt, StreamExt};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            // Bounded: a handful of connections, then the thread ends with the test.
            for _ in 0..20 {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let mut framed = tokio_util::codec::Framed::new(stream, codec(64 * 1024));
                let _ = framed
                    .send(encode(&ServerMessage::Challenge { server_nonce: nonce() }))
                    .await;
                if let Some(Ok(bytes)) = framed.next().await {
                    if let Ok(ClientMessage::Hello(h)) = decode::<ClientMessage>(&bytes) {
                        let refusal = Refusal::VersionMismatch {
                            client: h.software_version,
                            server: "9.9.0".into(),
                            client_protocol: h.protocol_version,
                            server_protocol: h.protocol_version,
                        };
                        assert_ne!(SOFTWARE_VERSION, "9.9.0");
                        let _ = framed.send(encode(&ServerMessage::Refused(refusal))).await;
                    }
                }
            }
        });
    });
    addr
}

#[test]
fn a_version_mismatch_is_reported_with_the_exact_message_and_a_non_zero_exit() {
    let addr = fake_server_of_another_version();
    let out = std::process::Command::new(common::binary("integration-node"))
        .args([
            "--array-urls",
            &addr,
            "--cluster-name",
            "v",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .args(["--on-startup-error", "standalone"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(3),
        "even with standalone, a mismatch stops the node: {stderr}"
    );
    let expected = format!(
        "Client/Server Version Mismatch Error: Client Version: {}, Server Version: 9.9.0",
        ferrocotta::protocol::SOFTWARE_VERSION
    );
    assert!(stderr.contains(&expected), "{stderr}");
}
