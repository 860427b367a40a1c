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
    cli_with_urls(array, array.urls())
}

/// [`cli_for`] with the URL list `urls` (the same array's servers, in another order).
fn cli_with_urls(array: &TestArray, urls: String) -> impl Fn(&[&str]) -> Command + '_ {
    move |args| {
        let mut c = ferrocotta();
        c.args(args)
            .env("FERROCOTTA_ARRAY_URLS", &urls)
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
fn start_up(flags: &[&str], dir: &std::path::Path) -> (Up, String) {
    start_up_with(flags, dir, Stdio::inherit())
}

/// [`start_up`] with up's standard error (where it reports exits and restarts) kept in a file;
/// asserts that it came up.
fn start_up_logged(flags: &[&str], dir: &std::path::Path) -> (Up, UpLog) {
    let folder = tempfile::tempdir().unwrap();
    let log = UpLog {
        path: folder.path().join("up.stderr"),
        _folder: folder,
    };
    let stderr = Stdio::from(std::fs::File::create(&log.path).unwrap());
    let (up, printed) = start_up_with(flags, dir, stderr);
    assert!(printed.contains("is up"), "{printed}\n{}", log.read());
    (up, log)
}

/// What a [`start_up_logged`] `up` wrote to its standard error.
struct UpLog {
    path: std::path::PathBuf,
    _folder: tempfile::TempDir,
}

impl UpLog {
    /// Everything written so far.
    fn read(&self) -> String {
        std::fs::read_to_string(&self.path).unwrap_or_default()
    }
}

/// [`start_up`] with up's standard error sent to `stderr`.
fn start_up_with(flags: &[&str], dir: &std::path::Path, stderr: Stdio) -> (Up, String) {
    let mut up = ferrocotta()
        .arg("up")
        .args(flags)
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(stderr)
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
    (Up(up), printed.join("\n"))
}

/// A running `ferrocotta up`, stopped (SIGTERM, which stops everything it started) when a test
/// ends early, so a failed test leaves no cluster behind.
struct Up(std::process::Child);

impl std::ops::Deref for Up {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for Up {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let _ = self.0.wait();
        }
    }
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
    let _https = common::trust_for_http(std::path::Path::new(&ca));
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

fn read_endpoints(dir: &std::path::Path) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join("endpoints.json")).expect("endpoints.json");
    serde_json::from_str(&text).expect("endpoints.json parses")
}

/// The entry `name` of endpoints.json.
fn process<'a>(endpoints: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    endpoints["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {endpoints}"))
}

fn pid_of(endpoints: &serde_json::Value, name: &str) -> i32 {
    process(endpoints, name)["pid"].as_i64().unwrap() as i32
}

fn signal(pid: i32, signal: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).unwrap();
}

fn is_alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "))
}

/// Polls `check` every 100 ms until it gives a value; fails the test after `timeout`.
fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `state` of member `name` in the member list that the node at `admin` serves.
fn member_state(admin: &str, token: &str, name: &str) -> Option<String> {
    let auth = format!("Bearer {token}");
    let (code, _, body) = common::http(admin, "GET", "/admin/cluster", &[("Authorization", &auth)], "");
    if code != 200 {
        return None;
    }
    let cluster: serde_json::Value = serde_json::from_str(&body).ok()?;
    let entries: Vec<&serde_json::Value> = cluster["members"]
        .as_array()?
        .iter()
        .filter(|m| m["logical_name"] == name)
        .collect();
    assert!(entries.len() <= 1, "{name} is listed once: {body}");
    entries.first().and_then(|m| m["state"].as_str().map(str::to_string))
}

/// A foreign program on one of the ports: `up` refuses at once, naming the port and whose it is
/// (it used to wait 60 s and blame the configuration download).
#[test]
fn up_names_a_port_in_use_at_once() {
    let _cache_array = binary("cache-array");
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    // The second server's client port is the base port + 1.
    let (code, _, err) = run(ferrocotta()
        .args(["up", "--nodes", "0", "--ready-timeout", "120s", "--base-port"])
        .arg((port - 1).to_string())
        .arg("--dir")
        .arg(dir.path()));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&format!("127.0.0.1:{port} (client port of array server a2)")),
        "{err}"
    );
    assert!(!err.contains("did not start within"), "{err}");
    assert!(!dir.path().join("endpoints.json").exists());
}

/// A server that exits while starting is reported at once, with the end of its log, and the
/// others are stopped.
#[test]
fn up_reports_a_child_that_exits_while_starting() {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("fake-cache-array");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho starting\necho 'error: disk on fire' >&2\nexit 3\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let up_dir = dir.path().join("cluster");
    let (code, _, err) = run(ferrocotta()
        .args(["up", "--nodes", "0", "--base-port", "0", "--ready-timeout", "120s"])
        .arg("--cache-array-bin")
        .arg(&fake)
        .arg("--dir")
        .arg(&up_dir));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("exited (exit status: 3)"), "{err}");
    assert!(err.contains("  | error: disk on fire"), "the log's last lines: {err}");
    assert!(!err.contains("did not start within"), "{err}");
}

/// `up` watches what it started: a node or server killed with -9 is reported and started again
/// (the node takes over its own member entry), endpoints.json and `status --dir` follow the new
/// pids, another `up` on the same ports is refused, and stopping names every process by its role.
#[test]
fn up_restarts_a_killed_node_and_server() {
    let _lock = common::cluster_lock();
    let _cache_array = binary("cache-array");
    let _node = binary("integration-node");
    let dir = tempfile::tempdir().unwrap();
    let (mut up, log) = start_up_logged(&["--base-port", "0"], dir.path());
    let up_log = || log.read();
    let endpoints = read_endpoints(dir.path());
    let token = endpoints["admin_token"].as_str().unwrap().to_string();
    let node2_admin = process(&endpoints, "node2")["admin"].as_str().unwrap().to_string();
    assert_eq!(member_state(&node2_admin, &token, "node1").as_deref(), Some("online"));

    phase("kill -9 node1: reported, started again, and it takes over its own member entry");
    let old = pid_of(&endpoints, "node1");
    signal(old, nix::sys::signal::Signal::SIGKILL);
    let new = wait_for(
        "node1 restarted, endpoints.json updated",
        Duration::from_secs(30),
        || {
            let pid = pid_of(&read_endpoints(dir.path()), "node1");
            (pid != old && pid != 0).then_some(pid)
        },
    );
    assert!(is_alive(new));
    let node1_admin = process(&endpoints, "node1")["admin"].as_str().unwrap().to_string();
    wait_for("node1 serves again", Duration::from_secs(30), || {
        common::try_http_get(&node1_admin, "/healthz")
            .ok()
            .filter(|(code, _)| *code == 200)
    });
    wait_for("node2 lists node1 online", Duration::from_secs(30), || {
        (member_state(&node2_admin, &token, "node1").as_deref() == Some("online")).then_some(())
    });
    let log = up_log();
    assert!(log.contains("integration node node1 exited"), "{log}");
    assert!(
        log.contains(&format!("restarted integration node node1 (pid {new})")),
        "{log}"
    );

    phase("kill -9 an array server: started again; status --dir shows its new pid");
    let old = pid_of(&endpoints, "a1");
    signal(old, nix::sys::signal::Signal::SIGKILL);
    let new = wait_for("a1 restarted", Duration::from_secs(30), || {
        let pid = pid_of(&read_endpoints(dir.path()), "a1");
        (pid != old && pid != 0).then_some(pid)
    });
    let (code, out, err) = wait_for("status sees a1 serving again", Duration::from_secs(30), || {
        let (code, out, err) = run(ferrocotta().arg("status").env("FERROCOTTA_DIR", dir.path()));
        (code == 0).then_some((code, out, err))
    });
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("PID"), "{out}");
    assert!(out.contains(&new.to_string()), "status shows a1's new pid {new}: {out}");

    phase("another up on this array's ports is refused at once, naming the port");
    let a1_client = process(&endpoints, "a1")["client"].as_str().unwrap().to_string();
    let a1_port = a1_client.rsplit(':').next().unwrap();
    let other = tempfile::tempdir().unwrap();
    let (code, _, err) = run(ferrocotta()
        .args(["up", "--nodes", "0", "--base-port", a1_port, "--dir"])
        .arg(other.path()));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&format!("{a1_client} (client port of array server a1)")),
        "{err}"
    );

    phase("SIGTERM: everything stops, each named by its role");
    let pids: Vec<i32> = read_endpoints(dir.path())["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["pid"].as_i64().unwrap() as i32)
        .collect();
    signal(up.id() as i32, nix::sys::signal::Signal::SIGTERM);
    assert!(up.wait().unwrap().success());
    for pid in pids {
        assert!(!is_alive(pid), "{pid} still runs after up stopped");
    }
    let log = up_log();
    for line in [
        "stopped integration node node1",
        "stopped integration node node2",
        "stopped array server a1",
    ] {
        assert!(log.contains(line), "{line}: {log}");
    }
    assert!(!log.contains("array server node"), "{log}");
}

/// The newcomer's case: kill -9 a node, stop `up`, run it again in the same folder. The node's
/// entry from before is still live in the array (its session has not expired); the new node1
/// has the same instance identity (its data folder) and takes the entry over instead of exiting
/// with "name already used".
#[test]
fn up_starts_again_after_a_node_was_killed() {
    let _lock = common::cluster_lock();
    let _cache_array = binary("cache-array");
    let _node = binary("integration-node");
    let dir = tempfile::tempdir().unwrap();
    let (mut up, log) = start_up_logged(&["--base-port", "0", "--no-restart"], dir.path());
    let up_log = || log.read();
    let endpoints = read_endpoints(dir.path());
    let token = endpoints["admin_token"].as_str().unwrap().to_string();

    phase("kill -9 node1 under --no-restart: reported, not restarted");
    signal(pid_of(&endpoints, "node1"), nix::sys::signal::Signal::SIGKILL);
    wait_for("up reports node1's exit", Duration::from_secs(30), || {
        up_log().contains("integration node node1 exited").then_some(())
    });
    assert!(up_log().contains("not restarted (--no-restart)"), "{}", up_log());
    signal(up.id() as i32, nix::sys::signal::Signal::SIGTERM);
    assert!(up.wait().unwrap().success());

    phase("up again in the same folder: node1 starts and is listed online once");
    let (mut up, printed) = start_up(&[], dir.path());
    assert!(printed.contains("is up"), "{printed}");
    let again = read_endpoints(dir.path());
    assert_eq!(
        process(&again, "node1")["service"],
        process(&endpoints, "node1")["service"],
        "the nodes keep their ports"
    );
    let node2_admin = process(&again, "node2")["admin"].as_str().unwrap().to_string();
    wait_for("node2 lists node1 online", Duration::from_secs(30), || {
        (member_state(&node2_admin, &token, "node1").as_deref() == Some("online")).then_some(())
    });
    signal(up.id() as i32, nix::sys::signal::Signal::SIGINT);
    assert!(up.wait().unwrap().success());
}

/// `up --detach` returns once the cluster serves; `status --dir` and `down` find it by the folder.
#[test]
fn up_detach_then_down() {
    let _lock = common::cluster_lock();
    let _cache_array = binary("cache-array");
    let _node = binary("integration-node");
    let dir = tempfile::tempdir().unwrap();
    let (code, out, err) = run(ferrocotta()
        .args(["up", "--detach", "--base-port", "0", "--nodes", "1", "--dir"])
        .arg(dir.path()));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("is up"), "{out}");
    let endpoints = read_endpoints(dir.path());
    let pids: Vec<i32> = endpoints["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["pid"].as_i64().unwrap() as i32)
        .collect();
    assert_eq!(pids.len(), 4);

    phase("status and cache commands take the folder instead of URLs and a secret file");
    let (code, out, err) = run(ferrocotta().args(["status", "--dir"]).arg(dir.path()));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&pid_of(&endpoints, "a2").to_string()), "{out}");
    let (code, _, err) = run(ferrocotta()
        .args(["cache", "put", "--cache", "d", "k", "v"])
        .env("FERROCOTTA_DIR", dir.path()));
    assert_eq!(code, 0, "{err}");

    phase("a second up in the folder is refused while the first runs");
    let (code, _, err) = run(ferrocotta()
        .args(["up", "--detach", "--nodes", "1", "--dir"])
        .arg(dir.path()));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("another `ferrocotta up`"), "{err}");

    phase("down stops everything; a second down says nothing runs");
    let (code, out, err) = run(ferrocotta().args(["down", "--dir"]).arg(dir.path()));
    assert_eq!(code, 0, "{out}{err}");
    for pid in pids {
        assert!(!is_alive(pid), "{pid} still runs after down");
    }
    let (code, _, err) = run(ferrocotta().args(["down", "--dir"]).arg(dir.path()));
    assert_eq!(code, 1, "{err}");
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

    phase("exists, incr, size, clear and --json, as Redis and etcd users reach for them");
    let (code, out, err) = run(&mut with_array(&["cache", "put", "--cache", "j", "k", "v1", "--json"]));
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap(),
        serde_json::json!({"key": "k", "previous": null})
    );
    let (_, out, _) = run(&mut with_array(&["cache", "put", "--cache", "j", "k", "v2", "--json"]));
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["previous"],
        "v1"
    );
    let (code, out, _) = run(&mut with_array(&["cache", "get", "--cache", "j", "k", "--json"]));
    assert_eq!(code, 0);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap(),
        serde_json::json!({"key": "k", "found": true, "value": "v2"})
    );
    let (code, out, _) = run(&mut with_array(&["cache", "get", "--cache", "j", "nope", "--json"]));
    assert_eq!(code, 1, "absent is still exit 1 with --json");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&out).unwrap()["found"], false);
    assert_eq!(run(&mut with_array(&["cache", "exists", "--cache", "j", "k"])).0, 0);
    assert_eq!(run(&mut with_array(&["cache", "exists", "--cache", "j", "nope"])).0, 1);
    let (code, out, _) = run(&mut with_array(&["cache", "incr", "--cache", "j", "n"]));
    assert_eq!((code, out.as_str()), (0, "1\n"));
    let (code, out, _) = run(&mut with_array(&[
        "cache", "incr", "--cache", "j", "n", "--by", "-5", "--json",
    ]));
    assert_eq!(code, 0);
    assert_eq!(serde_json::from_str::<serde_json::Value>(&out).unwrap()["value"], -4);
    let (code, _, err) = run(&mut with_array(&["cache", "incr", "--cache", "j", "k"]));
    assert_eq!(code, 2, "v2 is not a number: {err}");
    let (code, out, _) = run(&mut with_array(&["cache", "size", "--cache", "j"]));
    assert_eq!((code, out.as_str()), (0, "2\n"));
    let (code, out, _) = run(&mut with_array(&["cache", "keys", "--cache", "j", "--json"]));
    assert_eq!(code, 0);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap(),
        serde_json::json!({"keys": ["k", "n"]})
    );
    let (code, _, err) = run(&mut with_array(&["cache", "clear", "--cache", "j"]));
    assert_eq!(code, 0, "{err}");
    let (_, out, _) = run(&mut with_array(&["cache", "size", "--cache", "j", "--json"]));
    assert_eq!(serde_json::from_str::<serde_json::Value>(&out).unwrap()["entries"], 0);

    phase("lock prints the holding session; a second lock fails; unlock --session frees it");
    let (code, out, err) = run(&mut with_array(&["cache", "lock", "--cache", "cli", "res"]));
    assert_eq!(code, 0, "{err}");
    let session = out.trim().to_string();
    assert!(session.parse::<u64>().is_ok(), "lock prints a session id: {out}");
    let (code, _, _) = run(&mut with_array(&[
        "cache", "lock", "--cache", "cli", "res", "--wait", "200ms",
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

/// A hung server first in the URL list (SIGSTOP: the kernel accepts its connections, nothing
/// answers) costs a client one connection attempt, not its whole deadline: `status` and the cache
/// commands work through the other servers, and `status` shows the hung one as unreachable.
/// Before the fix every command failed after its timeout with "no handshake answer".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_first_server_does_not_block_status_or_cache_commands() {
    let array = TestArray::start(1, 3);
    let client = array.client().await;
    let active = array.wait_active(&client, 0, Duration::from_secs(20)).await;
    let servers = array.stripe_servers(0);
    let hung = servers.iter().find(|s| **s != active).unwrap().clone();
    let urls: Vec<String> = std::iter::once(hung.clone())
        .chain(servers.iter().filter(|s| **s != hung).cloned())
        .map(|s| array.client_addr(&s))
        .collect();
    let with_array = cli_with_urls(&array, urls.join(","));
    let pid = array.pid(&hung) as i32;
    signal(pid, nix::sys::signal::Signal::SIGSTOP);
    // Let it run again however the test ends, so that the array's teardown finds it as it was.
    struct Resume(i32);
    impl Drop for Resume {
        fn drop(&mut self) {
            signal(self.0, nix::sys::signal::Signal::SIGCONT);
        }
    }
    let _resume = Resume(pid);

    phase("status with the hung mirror first: every server listed, the hung one unreachable");
    let (code, out, err) = run(&mut with_array(&["status", "--json"]));
    assert_eq!(code, 0, "the stripe has its active: {err}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    let role_of = |name: &str| {
        status["servers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .map(|s| s["role"].as_str().unwrap().to_string())
    };
    assert_eq!(role_of(&hung).as_deref(), Some("unreachable"), "{out}");
    assert_eq!(role_of(&active).as_deref(), Some("active"), "{out}");

    phase("cache put and get through the others");
    let (code, _, err) = run(&mut with_array(&["cache", "put", "--cache", "h", "k", "v"]));
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = run(&mut with_array(&["cache", "get", "--cache", "h", "k"]));
    assert_eq!((code, out.as_str()), (0, "v\n"), "{err}");
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
            args.extend(["--node-urls", node.service.as_str()]);
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
    assert!(err.contains("--node-urls"), "{err}");
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

/// `array restart --rolling` restarts every server of a 2x3 `up` in turn (mirrors first, the
/// active last, each after the one before caught up) while four clients write: not one client
/// request fails (the clients retry inside their 15 s timeout, as a nonstop cache does), and
/// every acknowledged write is there afterwards.
#[test]
fn array_restart_rolling_fails_no_client_request() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let _lock = common::cluster_lock();
    let _cache_array = binary("cache-array");
    let dir = tempfile::tempdir().unwrap();
    let (_up, _) = start_up(&["--base-port", "0", "--nodes", "0", "--stripes", "2"], dir.path());
    let endpoints = read_endpoints(dir.path());
    let mut settings = ferrocotta::ClientSettings::new(endpoints["array_urls"].as_str().unwrap()).unwrap();
    settings.secret = std::fs::read(endpoints["secret_file"].as_str().unwrap())
        .unwrap()
        .trim_ascii()
        .to_vec();
    settings.request_timeout = Duration::from_secs(15);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = rt.block_on(ferrocotta::ArrayClient::connect(settings)).unwrap();

    phase("four clients write while every server is restarted in turn");
    let stop = Arc::new(AtomicBool::new(false));
    let acknowledged = Arc::new(Mutex::new(Vec::new()));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (client, stop, acknowledged, failures) =
                (client.clone(), stop.clone(), acknowledged.clone(), failures.clone());
            rt.spawn(async move {
                // Bounded: the restart stops it much sooner.
                for i in 0..200_000u32 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let key = format!("w{w}-{i}");
                    match client.put("rolling", key.as_bytes(), b"v").await {
                        Ok(_) => acknowledged.lock().unwrap().push((key, Instant::now())),
                        Err(e) => failures.lock().unwrap().push(format!("{key}: {e}")),
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    let (code, out, err) = run(ferrocotta()
        .args(["array", "restart", "--rolling", "--dir"])
        .arg(dir.path()));
    println!("{out}{err}");
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out.matches("serving again and caught up").count(), 6, "{out}");
    // In a healthy array each active hands over before it stops (no failover to wait out).
    assert_eq!(out.matches(": handed over to ").count(), 2, "{out}");
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        rt.block_on(w).unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    let acknowledged = acknowledged.lock().unwrap().clone();
    let mut times: Vec<Instant> = acknowledged.iter().map(|(_, t)| *t).collect();
    times.sort();
    let longest = times.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default();
    println!(
        "{} writes acknowledged, {} failed; longest pause between acknowledged writes {longest:.2?}",
        acknowledged.len(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "client requests failed during the rolling restart: {failures:?}"
    );
    assert!(
        acknowledged.len() > 100,
        "the writers wrote little: {}",
        acknowledged.len()
    );

    phase("every acknowledged write is there");
    for chunk in acknowledged.chunks(500) {
        let keys: Vec<Vec<u8>> = chunk.iter().map(|(k, _)| k.clone().into_bytes()).collect();
        let values = rt.block_on(client.get_all("rolling", &keys)).unwrap();
        for ((k, _), v) in chunk.iter().zip(values) {
            assert_eq!(v.as_deref(), Some(&b"v"[..]), "acknowledged write {k} is missing");
        }
    }

    phase("without --rolling, or without --dir: a clear refusal");
    let (code, _, err) = run(ferrocotta().args(["array", "restart", "--dir"]).arg(dir.path()));
    assert_ne!(code, 0);
    assert!(err.contains("--rolling"), "{err}");
    let urls = endpoints["array_urls"].as_str().unwrap();
    let (code, _, err) = run(ferrocotta().args(["array", "restart", "--rolling", "--array-urls", urls]));
    assert_ne!(code, 0);
    assert!(err.contains("--dir"), "{err}");
}
