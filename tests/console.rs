//! The cluster console in a real browser (headless Chromium driven by chromedriver over the
//! WebDriver protocol) against a `ferrocotta up` of one stripe of three servers and two nodes, and
//! `ferrocotta top --once` against a live array.
//!
//! Without Chromium and chromedriver (Debian's `chromium` and `chromium-driver`, which .ci/run
//! installs) the browser test says loudly that it did not run; with `CI=true` it fails instead.
//! Screenshots go to `$CARGO_TARGET_TMPDIR/console-*.png`; the test prints their paths.

mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{binary, phase};
use serde_json::{json, Value};

fn ferrocotta() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ferrocotta"))
}

/// A `ferrocotta up --detach` that is taken down when the test ends, however it ends.
struct Up {
    dir: tempfile::TempDir,
}

impl Up {
    fn start(nodes: usize) -> Up {
        let _ = (binary("cache-array"), binary("integration-node"));
        let dir = tempfile::tempdir().unwrap();
        let out = ferrocotta()
            .args(["up", "--detach", "--no-restart", "--base-port", "0", "--nodes"])
            .arg(nodes.to_string())
            .arg("--dir")
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "up failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Up { dir }
    }

    fn endpoints(&self) -> Value {
        serde_json::from_str(&std::fs::read_to_string(self.dir.path().join("endpoints.json")).unwrap()).unwrap()
    }

    /// (name, pid, admin host:port) of every array server.
    fn servers(&self) -> Vec<(String, i32, String)> {
        self.endpoints()["processes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["role"] == "array")
            .map(|p| {
                (
                    p["name"].as_str().unwrap().to_string(),
                    p["pid"].as_i64().unwrap() as i32,
                    p["admin"].as_str().unwrap().trim_start_matches("http://").to_string(),
                )
            })
            .collect()
    }

    fn put(&self, key: &str) {
        self.put_in("console-demo", key, "value");
    }

    fn put_in(&self, cache: &str, key: &str, value: &str) {
        let out = ferrocotta()
            .args(["cache", "put", "--cache", cache, key, value])
            .env("FERROCOTTA_DIR", self.dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = ferrocotta().arg("down").arg("--dir").arg(self.dir.path()).output();
    }
}

/// Whether Chromium and chromedriver run here; says loudly why not, and in CI fails instead.
fn browser_available() -> bool {
    for tool in ["chromium", "chromedriver"] {
        let ok = Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            assert!(
                std::env::var("CI").map(|v| v != "true").unwrap_or(true),
                "CI=true and `{tool}` does not run: .ci/run installs Debian's chromium and chromium-driver"
            );
            eprintln!("SKIPPED: `{tool}` does not run here; the console was NOT tested in a browser");
            return false;
        }
    }
    true
}

/// A chromedriver process and one browser session, both ended on drop.
struct Browser {
    driver: Child,
    addr: String,
    session: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn start() -> Browser {
        let port = common::free_ports(1)[0];
        let addr = format!("127.0.0.1:{port}");
        // Its own process group: the Chromium it starts goes with it on drop, even when no
        // session was made to close.
        let driver = Command::new("chromedriver")
            .process_group(0)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        common::wait_port(&addr, true, Duration::from_secs(20));
        let profile = tempfile::tempdir().unwrap();
        // Headless as root, and none of Chromium's background connections (this machine has no
        // network beyond loopback; they would only fail).
        let args = [
            "--headless=new".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-quic".into(),
            "--no-first-run".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--disable-dev-shm-usage".into(),
            format!("--user-data-dir={}", profile.path().display()),
        ];
        let mut browser = Browser {
            driver,
            addr,
            session: String::new(),
            _profile: profile,
        };
        let created = browser.call(
            "POST",
            "/session",
            json!({"capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {"binary": "/usr/bin/chromium", "args": args}
            }}}),
        );
        browser.session = created["sessionId"].as_str().expect("a session id").to_string();
        browser
    }

    /// One WebDriver command; its `value`.
    fn call(&self, method: &str, path: &str, body: Value) -> Value {
        let body = if method == "GET" || method == "DELETE" {
            String::new()
        } else {
            body.to_string()
        };
        let (status, text) = exchange(&self.addr, method, path, &body);
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{method} {path}: {e}: {text}"));
        assert_eq!(status, 200, "{method} {path}: {v}");
        v["value"].clone()
    }

    fn session_call(&self, method: &str, path: &str, body: Value) -> Value {
        self.call(method, &format!("/session/{}{path}", self.session), body)
    }

    fn open(&self, url: &str) {
        self.session_call("POST", "/url", json!({ "url": url }));
    }

    fn resize(&self, width: u32, height: u32) {
        self.session_call("POST", "/window/rect", json!({"width": width, "height": height}));
    }

    /// Runs `script` (a function body) in the page; what it returns.
    fn eval(&self, script: &str) -> Value {
        self.session_call("POST", "/execute/sync", json!({"script": script, "args": []}))
    }

    fn element(&self, css: &str) -> String {
        let v = self.session_call("POST", "/element", json!({"using": "css selector", "value": css}));
        v.as_object()
            .and_then(|o| o.values().next())
            .and_then(|id| id.as_str())
            .unwrap_or_else(|| panic!("no element {css}: {v}"))
            .to_string()
    }

    fn click(&self, css: &str) {
        let id = self.element(css);
        self.session_call("POST", &format!("/element/{id}/click"), json!({}));
    }

    fn type_into(&self, css: &str, text: &str) {
        let id = self.element(css);
        self.session_call("POST", &format!("/element/{id}/clear"), json!({}));
        self.session_call("POST", &format!("/element/{id}/value"), json!({ "text": text }));
    }

    /// Saves a screenshot as `$CARGO_TARGET_TMPDIR/console-NAME.png` and prints where.
    fn screenshot(&self, name: &str) -> PathBuf {
        let b64 = self.session_call("GET", "/screenshot", Value::Null);
        let png = base64_decode(b64.as_str().unwrap());
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("console-{name}.png"));
        std::fs::write(&path, png).unwrap();
        eprintln!("screenshot: {}", path.display());
        path
    }

    /// Polls `script` until it returns true; how long that took.
    fn wait_until(&self, what: &str, timeout: Duration, script: &str) -> Duration {
        let started = Instant::now();
        loop {
            if self.eval(script) == Value::Bool(true) {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < timeout,
                "{what}: not within {timeout:?}; the page shows: {}",
                self.eval("return document.body.innerText;")
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = exchange(&self.addr, "DELETE", &format!("/session/{}", self.session), "");
        }
        let group = nix::unistd::Pid::from_raw(self.driver.id() as i32);
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.driver.wait();
    }
}

/// One HTTP/1.1 request to chromedriver and its answer, read by its Content-Length
/// (chromedriver keeps the connection open whatever the request asks).
fn exchange(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    use std::io::{BufRead, BufReader, Read, Write};
    let mut tcp = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("chromedriver at {addr}: {e}"));
    tcp.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    write!(
        tcp,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut reader = BufReader::new(tcp);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let status = line.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let mut length = None;
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((k, v)) = header.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse::<usize>().ok();
            }
        }
    }
    let mut out = Vec::new();
    match length {
        Some(n) => {
            out.resize(n, 0);
            reader.read_exact(&mut out).unwrap();
        }
        None => {
            reader.read_to_end(&mut out).unwrap();
        }
    }
    (status, String::from_utf8_lossy(&out).into_owned())
}

fn base64_decode(s: &str) -> Vec<u8> {
    let value = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => (c - b'A') as u32,
            b'a'..=b'z' => (c - b'a' + 26) as u32,
            b'0'..=b'9' => (c - b'0' + 52) as u32,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c}"),
        }
    };
    let clean: Vec<u8> = s.bytes().filter(|c| !c.is_ascii_whitespace() && *c != b'=').collect();
    let mut out = Vec::with_capacity(clean.len() * 3 / 4);
    for chunk in clean.chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= value(*c) << (18 - 6 * i);
        }
        out.push((n >> 16) as u8);
        if chunk.len() > 2 {
            out.push((n >> 8) as u8);
        }
        if chunk.len() > 3 {
            out.push(n as u8);
        }
    }
    out
}

/// The role the page shows for `server`.
fn role_script(server: &str, role: &str) -> String {
    format!(
        "const r = document.querySelector('tr[data-server=\"{server}\"]'); return !!r && r.dataset.role === '{role}';"
    )
}

#[test]
fn the_console_shows_the_whole_cluster_follows_a_failover_and_takes_a_node_offline() {
    if !browser_available() {
        return;
    }
    let _lock = common::cluster_lock();
    phase("a 1x3 array and two nodes");
    let up = Up::start(2);
    let servers = up.servers();
    assert_eq!(servers.len(), 3);
    let token = up.endpoints()["admin_token"].as_str().unwrap().to_string();
    let (_, body) = common::http_get(&servers[0].2, "/v1/console");
    let view: Value = serde_json::from_str(&body).unwrap();
    let active = view["servers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["view"]["role"] == "active")
        .map(|s| s["name"].as_str().unwrap().to_string())
        .expect("an active");
    let (_, active_pid, _) = servers.iter().find(|s| s.0 == active).unwrap().clone();
    // The page is opened on a mirror: it shows the whole array whichever server serves it, and it
    // stays up when the active is killed.
    let (_, _, mirror_admin) = servers.iter().find(|s| s.0 != active).unwrap().clone();

    phase("some load, and member entries that are not a node's");
    for i in 0..12 {
        up.put(&format!("k{i}"));
    }
    // Anyone who may write the member cache can write anything there: the page shows what reads
    // as a member, as text, and leaves out the rest.
    let html = "<img src=x onerror=window.pwned=1>";
    up.put_in(
        "ferrocotta.node.members.evil",
        html,
        &json!({"logical_name": html, "state": "<b>online</b>", "service": "x"}).to_string(),
    );
    up.put_in("ferrocotta.node.members.evil", "null", "null");
    up.put_in(
        "ferrocotta.node.members.evil",
        "bad-events",
        r#"{"logical_name":"bad-events","events":5}"#,
    );

    phase("the console in Chromium");
    let browser = Browser::start();
    browser.resize(1280, 1300);
    browser.open(&format!("http://{mirror_admin}/"));
    browser.wait_until(
        "every server listed with its role",
        Duration::from_secs(20),
        &format!(
            "return document.querySelectorAll('tr[data-server]').length === 3 \
             && document.querySelectorAll('tr[data-role=\"active\"]').length === 1 \
             && document.querySelector('tr[data-server=\"{active}\"][data-role=\"active\"]') !== null;"
        ),
    );
    for (name, _, _) in &servers {
        let role = if *name == active { "active" } else { "mirror" };
        assert_eq!(
            browser.eval(&role_script(name, role)),
            Value::Bool(true),
            "{name} shown as {role}"
        );
    }
    browser.wait_until(
        "both nodes listed online",
        Duration::from_secs(20),
        "return ['node1','node2'].every(n => { const r = document.querySelector(`tr[data-node=\"${n}\"]`); return r && r.dataset.state === 'online'; });",
    );
    browser.wait_until(
        "a non-empty ops/s chart with the puts in it",
        Duration::from_secs(20),
        "const c = document.getElementById('chart-ops'); return Number(c.dataset.points) > 0 && Number(c.dataset.max) > 0 && document.getElementById('legend-ops').innerText.includes('put');",
    );
    // Entries and bytes are counted every few seconds.
    browser.wait_until(
        "the cache written listed with its entries",
        Duration::from_secs(20),
        "const r = document.querySelector('tr[data-cache=\"console-demo\"]'); return !!r && r.children[1].innerText === '12';",
    );
    assert_eq!(
        browser.eval(
            "const rows = [...document.querySelectorAll('#nodes tr[data-node]')]; \
             return [rows.some(r => r.dataset.cluster === 'evil' && r.innerText.includes('<img src=x')), \
                     rows.some(r => r.dataset.node === 'bad-events'), \
                     document.querySelectorAll('#nodes img, #nodes b').length, \
                     window.pwned === undefined];"
        ),
        json!([true, false, 0, true]),
        "a hostile member entry is shown as text, a malformed one left out, nothing runs"
    );
    browser.screenshot("cluster");

    phase("kill -9 the active; the page shows the new one");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(active_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let took = browser.wait_until(
        "a new active shown, the old one unreachable",
        Duration::from_secs(20),
        &format!(
            "const rows = [...document.querySelectorAll('tr[data-server]')]; \
             const old = rows.find(r => r.dataset.server === '{active}'); \
             const now = rows.filter(r => r.dataset.role === 'active'); \
             return !!old && old.dataset.role === 'unreachable' && now.length === 1 && now[0].dataset.server !== '{active}';"
        ),
    );
    eprintln!("the page showed the new active {took:?} after the kill");
    // The new active notes its election as it learns of it; the page shows it at its next refresh.
    browser.wait_until(
        "the leader change among the recent events",
        Duration::from_secs(10),
        "return document.getElementById('events').innerText.includes('became the active');",
    );
    browser.screenshot("after-failover");

    phase("a wrong token is refused; the right one takes node1 offline and back");
    browser.type_into("#token", "not-the-token");
    browser.click("button[data-action=\"offline\"][data-node=\"node1\"]");
    browser.wait_until(
        "the refusal shown",
        Duration::from_secs(10),
        "const m = document.getElementById('message'); return m.dataset.result === 'error' && m.innerText.includes('401');",
    );
    let node1_admin = up.endpoints()["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "node1")
        .unwrap()["admin"]
        .as_str()
        .unwrap()
        .trim_start_matches("http://")
        .to_string();
    let (code, _) = common::http_get(&node1_admin, "/readyz");
    assert_eq!(code, 200, "the wrong token changed nothing: node1 is still ready");
    browser.type_into("#token", &token);
    browser.click("button[data-action=\"offline\"][data-node=\"node1\"]");
    let took = browser.wait_until(
        "node1 shown offline",
        Duration::from_secs(15),
        "const r = document.querySelector('tr[data-node=\"node1\"]'); return !!r && r.dataset.state === 'offline';",
    );
    eprintln!("node1 shown offline {took:?} after the click");
    let (code, _) = common::http_get(&node1_admin, "/readyz");
    assert_eq!(code, 503, "an offline node is not ready");
    browser.screenshot("node1-offline");
    browser.click("button[data-action=\"online\"][data-node=\"node1\"]");
    browser.wait_until(
        "node1 shown online again",
        Duration::from_secs(15),
        "const r = document.querySelector('tr[data-node=\"node1\"]'); return !!r && r.dataset.state === 'online';",
    );
    let (code, _) = common::http_get(&node1_admin, "/readyz");
    assert_eq!(code, 200, "node1 serves again");

    phase("on a phone-sized screen nothing runs off the side");
    browser.resize(390, 844);
    browser.wait_until(
        "no horizontal scrolling of the page",
        Duration::from_secs(5),
        "return document.documentElement.scrollWidth <= window.innerWidth;",
    );
    browser.screenshot("phone");
    drop(browser);
    drop(up);
}

#[test]
fn top_once_prints_every_server_and_its_role() {
    let _lock = common::cluster_lock();
    let up = Up::start(1);
    let out = ferrocotta()
        .args(["top", "--once", "--dir"])
        .arg(up.dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let servers = up.servers();
    let roles: Vec<&str> = servers
        .iter()
        .map(|(name, _, _)| {
            let line = text
                .lines()
                .find(|l| l.split_whitespace().next() == Some(name))
                .unwrap_or_else(|| panic!("{name} missing from:\n{text}"));
            line.split_whitespace().nth(2).unwrap()
        })
        .collect();
    assert_eq!(roles.iter().filter(|r| **r == "active").count(), 1, "{text}");
    assert_eq!(roles.iter().filter(|r| **r == "mirror").count(), 2, "{text}");
    assert!(text.contains("node1"), "the node is listed:\n{text}");

    // What others wrote reaches the terminal without its control characters.
    let escape = "\u{1b}]0;owned\u{7}\u{1b}[2J";
    up.put_in(
        "ferrocotta.node.members.evil",
        &format!("{escape}n"),
        &json!({"logical_name": format!("{escape}n"), "state": escape}).to_string(),
    );
    // (A server serves the view it gathered for up to a second.)
    let started = Instant::now();
    let text = loop {
        let out = ferrocotta()
            .args(["top", "--once", "--dir"])
            .arg(up.dir.path())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if text.contains("evil") {
            break text;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the entry is not listed:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    assert!(
        !text.contains('\u{1b}') && !text.contains('\u{7}'),
        "control characters reach the terminal:\n{text:?}"
    );

    // Pointed at one admin port alone (no secret), and at a dead one first.
    let dead = format!("127.0.0.1:{}", common::free_ports(1)[0]);
    let out = ferrocotta()
        .args(["top", "--once", "--admin"])
        .arg(format!("{dead},{}", servers[1].2))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&servers[0].0));

    // Nothing answers: exit 2 and why.
    let out = ferrocotta()
        .args(["top", "--once", "--admin"])
        .arg(&dead)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no array admin port answered"));
}
