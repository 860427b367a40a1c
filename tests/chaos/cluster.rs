//! Array servers and integration nodes as real processes, each in its own namespace of a
//! [`Net`], with kill -9, restart on the same data folder, SIGSTOP and SIGCONT.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use ferrocotta::config::{local_array, ClusterConfig, ConfigDuration, Security, ServerPorts};
use ferrocotta::{ArrayClient, ClientSettings};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::common::{binary, try_http_get};
use crate::netns::Net;

/// Ports every server uses on its own address.
const CLIENT_PORT: u16 = 7000;
/// Service and admin ports of every node on its own address.
const NODE_PORT: u16 = 8080;

/// The window after which the array ends a silent client's session, in the chaos config.
pub const RECONNECT_WINDOW: Duration = Duration::from_secs(4);
/// The nodes' request timeout (nonstop timeout of session reads and writes).
pub const NODE_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// One process and how to start it again.
struct Proc {
    child: Option<Child>,
    stopped: bool,
}

/// The processes of a scenario. Drop kills them all (before the network goes).
pub struct Cluster {
    /// Config, secret, data folders and logs.
    pub dir: tempfile::TempDir,
    /// The array's config (hosts are the servers' namespace addresses).
    pub config: ClusterConfig,
    /// Server names in config order.
    pub servers: Vec<String>,
    /// Node names.
    pub nodes: Vec<String>,
    /// Servers that start from another config file than the array's cluster.toml (the servers
    /// of a stripe added while the array runs).
    pub config_files: HashMap<String, std::path::PathBuf>,
    procs: HashMap<String, Proc>,
}

impl Cluster {
    /// Writes the config of one stripe of `servers` (host names of `net`) and starts them.
    pub fn start(net: &Net, servers: &[&str]) -> Cluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = local_array(
            "chaos",
            "0.0.0.0",
            1,
            servers.len(),
            Security::secret_files("secret", "peer-secret"),
            |_| ServerPorts {
                port: CLIENT_PORT,
                group_port: CLIENT_PORT + 1,
                admin_port: CLIENT_PORT + 2,
                resp_port: None,
            },
        );
        config.timing.client_reconnect_window = ConfigDuration(RECONNECT_WINDOW);
        for (s, name) in config.stripes[0].servers.iter_mut().zip(servers) {
            s.name = name.to_string();
            s.host = net.ip(name);
            s.data_dir = PathBuf::from(format!("data/{name}"));
        }
        config.validate().expect("chaos config is valid");
        std::fs::write(dir.path().join("cluster.toml"), config.to_toml()).unwrap();
        std::fs::write(dir.path().join("secret"), b"chaos-secret-0123456789abcdef").unwrap();
        std::fs::write(dir.path().join("peer-secret"), b"chaos-peer-secret-0123456789abcdef").unwrap();
        std::fs::create_dir_all(dir.path().join("logs")).unwrap();
        let mut cluster = Cluster {
            dir,
            config,
            servers: servers.iter().map(|s| s.to_string()).collect(),
            nodes: Vec::new(),
            config_files: HashMap::new(),
            procs: HashMap::new(),
        };
        for s in servers {
            cluster.start_server(net, s);
        }
        cluster
    }

    fn log_file(&self, name: &str) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(name))
            .unwrap()
    }

    /// The log of a server or node (all its lives, appended).
    pub fn log_path(&self, name: &str) -> PathBuf {
        self.dir.path().join("logs").join(format!("{name}.log"))
    }

    /// Starts (or restarts, on the same data folder) one server.
    pub fn start_server(&mut self, net: &Net, name: &str) {
        assert!(!self.is_running(name), "{name} is already running");
        let log = self.log_file(name);
        let child = net
            .command(name, &binary("cache-array"))
            .arg("--config")
            .arg(
                self.config_files
                    .get(name)
                    .cloned()
                    .unwrap_or_else(|| self.dir.path().join("cluster.toml")),
            )
            .arg("--name")
            .arg(name)
            .env("RUST_LOG", "info,openraft=warn,sled=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start cache-array");
        self.procs.insert(
            name.to_string(),
            Proc {
                child: Some(child),
                stopped: false,
            },
        );
    }

    /// Starts an integration node in its namespace with `urls` as its URL list.
    pub fn start_node(&mut self, net: &Net, name: &str, urls: &str) {
        let dir = self.dir.path().join(format!("node-{name}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("token"), format!("token-{name}-0123456789")).unwrap();
        std::fs::write(
            dir.join("node.toml"),
            format!(
                "request_timeout = \"{}ms\"\nclient_keepalive_interval = \"250ms\"\nmember_refresh_interval = \"500ms\"\n\
                 [gd_takeover]\n\"demo:deposit\" = \"rerun\"\n",
                NODE_REQUEST_TIMEOUT.as_millis()
            ),
        )
        .unwrap();
        let ip = net.ip(name);
        let log = self.log_file(name);
        let child = net
            .command(name, &binary("integration-node"))
            .args(["--array-urls", urls, "--cluster-name", "chaos", "--logical-name", name])
            .args(["--listen", &format!("{ip}:{NODE_PORT}")])
            .args(["--admin-listen", &format!("{ip}:{}", NODE_PORT + 1)])
            .arg("--secret-file")
            .arg(self.dir.path().join("secret"))
            .arg("--admin-token-file")
            .arg(dir.join("token"))
            .arg("--config")
            .arg(dir.join("node.toml"))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start integration-node");
        self.procs.insert(
            name.to_string(),
            Proc {
                child: Some(child),
                stopped: false,
            },
        );
        if !self.nodes.iter().any(|n| n == name) {
            self.nodes.push(name.to_string());
        }
    }

    /// Service address of a node.
    pub fn node_addr(&self, net: &Net, name: &str) -> String {
        format!("{}:{NODE_PORT}", net.ip(name))
    }

    /// Admin address of a node.
    pub fn node_admin(&self, net: &Net, name: &str) -> String {
        format!("{}:{}", net.ip(name), NODE_PORT + 1)
    }

    /// Admin token of a node.
    pub fn node_token(&self, name: &str) -> String {
        format!("token-{name}-0123456789")
    }

    /// The URL list of every server, in config order.
    pub fn urls(&self) -> String {
        self.config
            .servers()
            .map(|(_, s)| s.client_addr())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Client settings for the test's own clients.
    pub fn settings(&self) -> ClientSettings {
        let mut s = ClientSettings::new(&self.urls()).unwrap();
        s.secret = std::fs::read(self.dir.path().join("secret")).unwrap();
        s.array_name = Some(self.config.array_name.clone());
        s.connect_timeout = Duration::from_secs(30);
        s.request_timeout = Duration::from_secs(2);
        s
    }

    /// Whether a process is running (stopped counts as running).
    pub fn is_running(&mut self, name: &str) -> bool {
        match self.procs.get_mut(name).and_then(|p| p.child.as_mut()) {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    fn pid(&self, name: &str) -> Pid {
        let child = self.procs[name]
            .child
            .as_ref()
            .unwrap_or_else(|| panic!("{name} is not running"));
        Pid::from_raw(child.id() as i32)
    }

    /// kill -9, waiting until the process is gone.
    pub fn kill9(&mut self, name: &str) {
        if let Some(mut child) = self.procs.get_mut(name).and_then(|p| p.child.take()) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits up to `timeout` for a server to exit by itself; its exit code, or `None` if it still
    /// runs (it is left running).
    pub fn wait_exit(&mut self, name: &str, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(c) = self.procs.get_mut(name).and_then(|p| p.child.as_mut()) {
                if let Ok(Some(status)) = c.try_wait() {
                    return Some(status.code().unwrap_or(-1));
                }
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `host:port` of one of a host's server ports (0 client, 1 group, 2 admin): every server
    /// uses the same ports on its own address.
    pub fn server_addr(net: &Net, name: &str, port: u16) -> String {
        format!("{}:{}", net.ip(name), CLIENT_PORT + port)
    }

    /// SIGTERM and wait up to `timeout` for a graceful exit (then kill -9).
    pub fn terminate(&mut self, name: &str, timeout: Duration) {
        let pid = self.pid(name);
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + timeout;
        while self.is_running(name) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill9(name);
    }

    /// SIGSTOP.
    pub fn pause(&mut self, name: &str) {
        let pid = self.pid(name);
        kill(pid, Signal::SIGSTOP).expect("SIGSTOP");
        self.procs.get_mut(name).unwrap().stopped = true;
    }

    /// SIGCONT.
    pub fn resume(&mut self, name: &str) {
        let pid = self.pid(name);
        kill(pid, Signal::SIGCONT).expect("SIGCONT");
        self.procs.get_mut(name).unwrap().stopped = false;
    }

    /// Resumes every paused process.
    pub fn resume_all(&mut self) {
        let paused: Vec<String> = self
            .procs
            .iter()
            .filter(|(_, p)| p.stopped)
            .map(|(n, _)| n.clone())
            .collect();
        for name in paused {
            self.resume(&name);
        }
    }

    /// Names of the servers that are not running.
    pub fn dead_servers(&mut self) -> Vec<String> {
        let servers = self.servers.clone();
        servers.into_iter().filter(|s| !self.is_running(s)).collect()
    }

    /// The server that is the active now according to the servers themselves (a majority must
    /// follow it), if any.
    pub async fn active(&self, client: &ArrayClient) -> Option<String> {
        let probes = client.probe_all(Duration::from_millis(500)).await;
        let actives = crate::common::claimed_actives(&probes, 0);
        // A deposed active that has not heard of its successor still says "active"; pick the one
        // the most servers name as leader.
        if actives.len() == 1 {
            return actives.into_iter().next();
        }
        let mut best: Option<(String, u64)> = None;
        for a in actives {
            let term = self.status_term(&a).unwrap_or(0);
            if best.as_ref().map(|(_, t)| term > *t).unwrap_or(true) {
                best = Some((a, term));
            }
        }
        best.map(|(a, _)| a)
    }

    /// A server's current term from its status page.
    pub fn status_term(&self, name: &str) -> Option<u64> {
        let admin = self.config.find_server(name)?.1.admin_addr();
        let (_, body) = try_http_get(&admin, "/v1/status").ok()?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        find_u64(&v, "term")
    }

    /// Waits until there is an active and a write through it succeeds; the time it took.
    pub async fn wait_serving(&self, client: &ArrayClient, timeout: Duration) -> Duration {
        let started = Instant::now();
        loop {
            if client.put("chaos-probe", b"probe", b"x").await.is_ok() {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < timeout,
                "the array did not serve a write within {timeout:?}\n{}",
                self.log_tails()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The last lines of every log, for failure messages.
    pub fn log_tails(&self) -> String {
        let mut out = String::new();
        for name in self.servers.iter().chain(&self.nodes) {
            let text = std::fs::read_to_string(self.log_path(name)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&format!("=== {name} ===\n"));
            for l in &lines[lines.len().saturating_sub(12)..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }
}

/// The first number named `key` anywhere in a JSON value.
fn find_u64(v: &serde_json::Value, key: &str) -> Option<u64> {
    match v {
        serde_json::Value::Object(m) => m
            .get(key)
            .and_then(|x| x.as_u64())
            .or_else(|| m.values().find_map(|x| find_u64(x, key))),
        serde_json::Value::Array(a) => a.iter().find_map(|x| find_u64(x, key)),
        _ => None,
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, p) in self.procs.iter_mut() {
            if let Some(mut child) = p.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}
