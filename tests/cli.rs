//! The `ferrocotta` CLI against real processes: `up`, `status`, `cache`, `bench`, with the script
//! interfaces of SPEC 9 (endpoints.json, JSON fields, exit codes).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{binary, phase, TestArray, TestNode};

fn ferrocotta() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ferrocotta"))
}

/// `ferrocotta ARGS` pointed at an array through the environment, as a script would.
fn cli_for(array: &TestArray) -> impl Fn(&[&str]) -> Command + '_ {
    move |args| {
        let mut c = ferrocotta();
        c.args(args)
            .env("FERROCOTTA_ARRAY_URLS", array.urls())
            .env("FERROCOTTA_SECRET_FILE", array.path().join("secret"));
        c
    }
}

fn run(cmd: &mut Command) -> (i32, String, String) {
    let out = cmd.output().expect("run ferrocotta");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Starts `ferrocotta up` with `flags` in `dir`; the process and what it printed once everything
/// serves (up to its "press Ctrl-C" line).
fn start_up(flags: &[&str], dir: &std::path::Path) -> (std::process::Child, String) {
    let mut up = ferrocotta()
        .arg("up")
        .args(flags)
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(up.stdout.take().unwrap());
    let mut printed = Vec::new();
    for line in stdout.lines() {
        let line = line.unwrap();
        let done = line.contains("Ctrl-C");
        printed.push(line);
        if done {
            break;
        }
    }
    (up, printed.join("\n"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_and_status_commands_follow_the_script_interface() {
    let array = TestArray::start(1, 3);
    let client = array.client().await;
    array.wait_active(&client, 0, Duration::from_secs(20)).await;
    let with_array = cli_for(&array);

    phase("put, get, keys, remove with their exit codes");
    let (code, _, err) = run(&mut with_array(&[
        "cache",
        "put",
        "--cache",
        "cli",
        "greeting",
        "hello world",
    ]));
    assert_eq!(code, 0, "{err}");
    let (code, out, _) = run(&mut with_array(&["cache", "get", "--cache", "cli", "greeting"]));
    assert_eq!((code, out.as_str()), (0, "hello world\n"));
    let (code, out, _) = run(&mut with_array(&["cache", "get", "--cache", "cli", "absent"]));
    assert_eq!((code, out.as_str()), (1, ""), "absent key: exit 1, nothing printed");
    run(&mut with_array(&["cache", "put", "--cache", "cli", "greeting2", "x"]));
    let (code, out, _) = run(&mut with_array(&[
        "cache", "keys", "--cache", "cli", "--prefix", "greet",
    ]));
    assert_eq!((code, out.as_str()), (0, "greeting\ngreeting2\n"));
    let (code, _, _) = run(&mut with_array(&["cache", "remove", "--cache", "cli", "greeting"]));
    assert_eq!(code, 0);
    let (code, _, _) = run(&mut with_array(&["cache", "remove", "--cache", "cli", "greeting"]));
    assert_eq!(code, 1, "removing an absent key exits 1");
    assert_eq!(
        client.get("cli", b"greeting2").await.unwrap(),
        Some(b"x".to_vec()),
        "the CLI wrote through the array"
    );

    phase("status as a table and as JSON");
    let (code, out, err) = run(&mut with_array(&["status"]));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("active") && out.contains("mirror"), "{out}");
    let (code, out, _) = run(&mut with_array(&["status", "--json"]));
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let servers = v["servers"].as_array().unwrap();
    assert_eq!(servers.len(), 3);
    for s in servers {
        for field in [
            "name",
            "stripe",
            "role",
            "term",
            "last_log_index",
            "applied_index",
            "leader",
        ] {
            assert!(s.get(field).is_some(), "status --json lacks `{field}`: {s}");
        }
    }
    assert_eq!(servers.iter().filter(|s| s["role"] == "active").count(), 1);

    phase("errors exit 2 with the reason on stderr");
    let (code, _, err) = run(ferrocotta()
        .args(["cache", "get", "--cache", "cli", "k", "--connect-timeout", "1s"])
        .env(
            "FERROCOTTA_ARRAY_URLS",
            format!("127.0.0.1:{}", common::free_ports(1)[0]),
        ));
    assert_eq!(code, 2);
    assert!(err.contains("could not download"), "{err}");
    let (code, _, err) = run(&mut with_array(&[
        "cache",
        "get",
        "--cache",
        "cli",
        "k",
        "--array-name",
        "other",
    ]));
    assert_eq!(code, 2);
    assert!(err.contains("wrong array name"), "{err}");
}

#[test]
fn up_starts_an_array_writes_endpoints_and_stops_everything() {
    let _lock = common::cluster_lock();
    let _cache_array = binary("cache-array");
    let _node = binary("integration-node");
    let dir = tempfile::tempdir().unwrap();
    phase("ferrocotta up --base-port 0 in a fresh folder");
    let (mut up, printed) = start_up(&["--base-port", "0"], dir.path());
    assert!(printed.contains("is up"), "{printed}");

    phase("endpoints.json lists every process with its addresses");
    let endpoints: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("endpoints.json")).unwrap()).unwrap();
    let procs = endpoints["processes"].as_array().unwrap();
    assert_eq!(procs.len(), 5, "3 array servers and 2 nodes: {endpoints}");
    let arrays: Vec<&serde_json::Value> = procs.iter().filter(|p| p["role"] == "array").collect();
    let nodes: Vec<&serde_json::Value> = procs.iter().filter(|p| p["role"] == "node").collect();
    assert_eq!((arrays.len(), nodes.len()), (3, 2));
    for p in &arrays {
        for field in ["name", "pid", "client", "group", "admin"] {
            assert!(p.get(field).is_some(), "endpoints.json lacks `{field}` for {p}");
        }
        assert!(printed.contains(p["client"].as_str().unwrap()), "the table shows {p}");
    }
    for p in &nodes {
        for field in ["name", "pid", "service", "admin"] {
            assert!(p.get(field).is_some(), "endpoints.json lacks `{field}` for {p}");
        }
        assert!(printed.contains(p["service"].as_str().unwrap()), "the table shows {p}");
    }
    assert!(endpoints["admin_token"].as_str().is_some_and(|t| t.len() >= 16));
    assert!(dir.path().join("cluster.toml").exists());

    phase("only the owner may read the folder, the secrets, the token and endpoints.json");
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(dir.path()), 0o700);
    for f in [
        "secret",
        "peer-secret",
        "credentials.toml",
        "node-credential",
        "admin-token",
        "endpoints.json",
    ] {
        assert_eq!(mode(&dir.path().join(f)), 0o600, "{f}");
    }

    phase("a session moves between the two nodes (the README's curl sequence)");
    let (n1, n2) = (
        nodes[0]["service"].as_str().unwrap(),
        nodes[1]["service"].as_str().unwrap(),
    );
    let (code, headers, body) = common::http(n1, "POST", "/invoke/demo:counter", &[], "");
    assert_eq!(code, 200, "{body}");
    let cookie = headers
        .iter()
        .find(|(k, _)| k == "set-cookie")
        .map(|(_, v)| v.split(';').next().unwrap().to_string())
        .expect("ssnid cookie");
    let (_, _, body) = common::http(n2, "POST", "/invoke/demo:counter", &[("Cookie", &cookie)], "");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!((v["counter"].as_i64(), v["node"].as_str()), (Some(2), Some("node2")));

    phase("the array answers through the CLI");
    let urls = endpoints["array_urls"].as_str().unwrap().to_string();
    let secret = endpoints["secret_file"].as_str().unwrap().to_string();
    let (code, _, err) = run(ferrocotta()
        .args(["cache", "put", "--cache", "up", "k", "v"])
        .env("FERROCOTTA_ARRAY_URLS", &urls)
        .env("FERROCOTTA_SECRET_FILE", &secret));
    assert_eq!(code, 0, "{err}");

    phase("SIGTERM (like Ctrl-C) stops every process it started");
    let pids: Vec<i32> = procs.iter().map(|p| p["pid"].as_i64().unwrap() as i32).collect();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(up.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = up.wait().unwrap();
    assert!(status.success(), "up exits 0 on Ctrl-C/SIGTERM: {status}");
    let deadline = Instant::now() + Duration::from_secs(5);
    for pid in pids {
        while nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok() {
            assert!(
                Instant::now() < deadline,
                "array server {pid} still runs after up stopped"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
fn up_refuses_ports_past_65535() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, err) = run(ferrocotta()
        .args(["up", "--base-port", "65530", "--nodes", "0", "--dir"])
        .arg(dir.path()));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("65535"), "{err}");
}

/// `ferrocotta up --tls`: an encrypted cluster in one command (a local CA and a certificate per
/// process), used the way the README says.
#[test]
fn up_tls_gives_an_encrypted_cluster_in_one_command() {
    let _lock = common::cluster_lock();
    let _cache_array = binary("cache-array");
    let _node = binary("integration-node");
    let dir = tempfile::tempdir().unwrap();
    phase("ferrocotta up --tls");
    let (mut up, printed) = start_up(&["--tls", "--base-port", "0"], dir.path());
    assert!(
        printed.contains("https://") && printed.contains("--cacert"),
        "{printed}"
    );
    let endpoints: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("endpoints.json")).unwrap()).unwrap();
    let ca = endpoints["tls_ca_file"]
        .as_str()
        .expect("endpoints.json names the CA")
        .to_string();
    let urls = endpoints["array_urls"].as_str().unwrap().to_string();
    let secret = endpoints["secret_file"].as_str().unwrap().to_string();

    phase("the CLI with the CA works; without it, it is refused with a hint");
    let (code, _, err) = run(ferrocotta()
        .args(["cache", "put", "--cache", "up", "k", "v"])
        .env("FERROCOTTA_ARRAY_URLS", &urls)
        .env("FERROCOTTA_SECRET_FILE", &secret)
        .env("FERROCOTTA_TLS_CA_FILE", &ca));
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = run(ferrocotta()
        .args(["cache", "get", "--cache", "up", "k", "--connect-timeout", "3s"])
        .env("FERROCOTTA_ARRAY_URLS", &urls)
        .env("FERROCOTTA_SECRET_FILE", &secret));
    assert_eq!(code, 2);
    assert!(err.contains("--tls-ca-file"), "{err}");

    phase("a session moves between the two nodes over HTTPS");
    common::trust_for_http(std::path::Path::new(&ca));
    let nodes: Vec<String> = endpoints["processes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["service"].as_str().map(str::to_string))
        .collect();
    let (code, headers, body) = common::http(&nodes[0], "POST", "/invoke/demo:counter", &[], "");
    assert_eq!(code, 200, "{body}");
    let cookie = headers
        .iter()
        .find(|(k, _)| k == "set-cookie")
        .map(|(_, v)| v.split(';').next().unwrap().to_string())
        .expect("ssnid cookie");
    let (_, _, body) = common::http(&nodes[1], "POST", "/invoke/demo:counter", &[("Cookie", &cookie)], "");
    assert!(body.contains("\"counter\":2"), "{body}");

    phase("stopped with SIGINT, as Ctrl-C does (the other test stops up with SIGTERM)");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(up.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    assert!(up.wait().unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_put_ttl_and_lock_unlock_from_the_shell() {
    let array = TestArray::start(1, 3);
    let client = array.client().await;
    array.wait_active(&client, 0, Duration::from_secs(20)).await;
    let with_array = cli_for(&array);

    phase("put --ttl: present, then gone once the ttl passes");
    let (code, _, err) = run(&mut with_array(&[
        "cache", "put", "--cache", "cli", "short", "lived", "--ttl", "1s",
    ]));
    assert_eq!(code, 0, "{err}");
    let (code, out, _) = run(&mut with_array(&["cache", "get", "--cache", "cli", "short"]));
    assert_eq!((code, out.as_str()), (0, "lived\n"));
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let (code, _, _) = run(&mut with_array(&["cache", "get", "--cache", "cli", "short"]));
    assert_eq!(code, 1, "expired after its ttl");
    let (code, _, err) = run(&mut with_array(&[
        "cache", "put", "--cache", "cli", "idle", "x", "--tti", "10m",
    ]));
    assert_eq!(code, 0, "{err}");

    phase("lock prints the holding session; a second lock fails; unlock --session frees it");
    let (code, out, err) = run(&mut with_array(&["cache", "lock", "--cache", "cli", "res"]));
    assert_eq!(code, 0, "{err}");
    let session = out.trim().to_string();
    assert!(session.parse::<u64>().is_ok(), "lock prints a session id: {out}");
    let (code, _, _) = run(&mut with_array(&[
        "cache",
        "lock",
        "--cache",
        "cli",
        "res",
        "--wait-ms",
        "200",
    ]));
    assert_eq!(code, 1, "the lock is taken");
    let (code, _, _) = run(&mut with_array(&[
        "cache",
        "unlock",
        "--cache",
        "cli",
        "res",
        "--session",
        "1",
    ]));
    assert_eq!(code, 1, "a session that does not hold it cannot unlock");
    let (code, _, err) = run(&mut with_array(&[
        "cache",
        "unlock",
        "--cache",
        "cli",
        "res",
        "--session",
        &session,
    ]));
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = run(&mut with_array(&[
        "cache", "lock", "--cache", "cli", "res", "--hold", "100ms",
    ]));
    assert_eq!(code, 0, "free again: {err}");
    assert!(
        client.list_locks(Some("cli")).await.unwrap().is_empty(),
        "--hold released it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_runs_every_workload_and_reports_json() {
    let array = TestArray::start(1, 3);
    let client = array.client().await;
    array.wait_active(&client, 0, Duration::from_secs(20)).await;
    let mut node = TestNode::spawn(&array, "bench-node", "benchCluster", &[], "");
    node.wait_ready(Duration::from_secs(30));
    let with_array = cli_for(&array);
    for workload in ["put", "get", "get --eventual", "cas", "ycsb-a", "session"] {
        phase(&format!("ferrocotta bench --workload {workload}"));
        let mut args = vec!["bench", "--workload"];
        args.extend(workload.split(' '));
        args.extend([
            "--concurrency",
            "4",
            "--connections",
            "2",
            "--keys",
            "40",
            "--duration",
            "500ms",
            "--warmup",
            "100ms",
            "--json",
        ]);
        if workload == "session" {
            args.extend(["--nodes", node.service.as_str()]);
        }
        let (code, out, err) = run(&mut with_array(&args));
        assert_eq!(code, 0, "{workload}: {out}{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
        assert!(v["ops"].as_u64().unwrap() > 0, "{workload}: {out}");
        assert_eq!(v["errors"], serde_json::json!({}), "{workload}: {out}");
        assert!(v["latency_us_p999"].as_u64().unwrap() >= v["latency_us_p50"].as_u64().unwrap());
        let expected_size = if workload == "ycsb-a" { 1024 } else { 100 };
        assert_eq!(v["value_size"], expected_size, "{out}");
    }
    phase("bad input is refused with the flag's name");
    let (code, _, err) = run(&mut with_array(&["bench", "--workload", "session", "--duration", "1s"]));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--nodes"), "{err}");
    let (code, _, err) = run(&mut with_array(&[
        "bench",
        "--workload",
        "cas",
        "--keys",
        "2",
        "--concurrency",
        "4",
    ]));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--keys"), "{err}");
}
