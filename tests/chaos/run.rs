//! One chaos run: the network, the processes, the workloads, the faults a scenario injects, and
//! the checks at the end. Every run prints its seed, operation counts, faults, anomalies and the
//! unavailability clients saw, straight to stderr (so `cargo test` shows it for passing tests).

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferrocotta::ArrayClient;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::checkers;
use crate::cluster::Cluster;
use crate::history::{KvEntry, KvResult, SessionEntry};
use crate::netns::{self, Net};
use crate::proxy::{LinkFault, LinkProxy};
use crate::splitbrain;
use crate::workload::{self, Clock, KvLoad, KvRun, SessionRun};

/// Search budget of the linearizability checker per key.
const LIN_STEP_BUDGET: u64 = 20_000_000;

/// Anomalies printed in full in a report (the count is always given).
const ANOMALIES_SHOWN: usize = 30;

/// Prints a line to the real stderr, past the test harness's capture.
pub fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// What a scenario starts.
pub struct Setup {
    /// Array servers (one stripe).
    pub servers: &'static [&'static str],
    /// Integration nodes started with the array (session workload through them).
    pub nodes: &'static [&'static str],
    /// Extra hosts on the network (started later by the scenario).
    pub spare: &'static [&'static str],
    /// Key-value workload.
    pub kv: KvLoad,
    /// Sessions driven through the nodes.
    pub sessions: usize,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            servers: &["a1", "a2", "a3"],
            nodes: &[],
            spare: &[],
            kv: KvLoad {
                clients: 6,
                keys: 4,
                pause: Duration::from_millis(15),
                prefix: String::new(),
            },
            sessions: 12,
        }
    }
}

/// A fault as the run records it: its kind and when it began.
#[derive(Debug, Clone)]
pub struct FaultMark {
    /// Kind, e.g. `isolate-active`.
    pub kind: String,
    /// When it began (ns on the run's clock).
    pub at: u64,
    /// Whether it took the active away (its write unavailability is measured).
    pub loses_active: bool,
}

/// The state of a run that scenarios drive.
pub struct Ctx {
    /// The processes (dropped before the network).
    pub cluster: Cluster,
    /// The network.
    pub net: Net,
    /// Seeded randomness of the scenario.
    pub rng: StdRng,
    /// The seed.
    pub seed: u64,
    /// The run's clock.
    pub clock: Clock,
    /// A direct client for the scenario's own probing.
    pub control: Arc<ArrayClient>,
    /// Proxies the workload clients dial through (one per server).
    pub proxies: Vec<LinkProxy>,
    /// Faults injected.
    pub faults: Vec<FaultMark>,
    name: String,
    kv: Option<KvRun>,
    kv_history: Vec<KvEntry>,
    kv_keys: Vec<String>,
    sessions: Option<SessionRun>,
    session_history: Vec<SessionEntry>,
    session_count: usize,
    kv_load: KvLoad,
    node_names: Vec<String>,
    started: Instant,
    /// Further lines for the report.
    pub notes: Vec<String>,
    /// What a scenario's own check found wrong (reported as anomalies, after the figures).
    pub failures: Vec<String>,
}

/// Whether namespaces are usable; says loudly why not. In CI (`CI=true`) that is a failure.
pub fn namespaces_or_skip(test: &str) -> bool {
    match netns::unavailable_reason() {
        None => true,
        Some(why) => {
            if std::env::var("CI").map(|v| v == "true").unwrap_or(false) {
                panic!("chaos test {test} cannot run in CI: {why}");
            }
            say(&format!(
                "!!! SKIPPED chaos test {test}: {why}. These tests cut real network links; run them as root."
            ));
            false
        }
    }
}

/// The seed of a scenario: `FERROCOTTA_CHAOS_SEED` when set, else a fresh one.
pub fn seed() -> u64 {
    match std::env::var("FERROCOTTA_CHAOS_SEED") {
        Ok(s) => s
            .trim_start_matches("0x")
            .parse::<u64>()
            .or_else(|_| u64::from_str_radix(s.trim_start_matches("0x"), 16))
            .expect("FERROCOTTA_CHAOS_SEED is a number"),
        Err(_) => rand::random::<u32>() as u64,
    }
}

/// Runs a scenario: sets up, runs `body` with the workloads going, heals, checks, reports.
/// Returns without doing anything (after saying so) when namespaces are not available.
pub fn scenario<F>(name: &str, setup: Setup, body: F)
where
    F: for<'a> FnOnce(&'a mut Ctx) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + 'a>>,
{
    if !namespaces_or_skip(name) {
        return;
    }
    let _lock = crate::common::cluster_lock();
    let seed = seed();
    say(&format!(
        "=== chaos {name}: seed {seed} (replay: FERROCOTTA_CHAOS_SEED={seed} cargo test --test chaos {name})"
    ));
    let mut hosts: Vec<&str> = vec!["client"];
    hosts.extend(setup.servers);
    hosts.extend(setup.nodes);
    hosts.extend(setup.spare);
    let mut net = Net::create(&hosts);
    net.enter("client");
    // Built after entering: the runtime's threads live in the client namespace.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let cluster = Cluster::start(&net, setup.servers);
    let mut ctx = rt.block_on(async {
        let control = Arc::new(
            ArrayClient::connect(cluster.settings())
                .await
                .expect("control client connects"),
        );
        let took = cluster.wait_serving(&control, Duration::from_secs(30)).await;
        say(&format!("    array serving after {took:?}"));
        let mut proxies = Vec::new();
        for (_, s) in cluster.config.servers() {
            proxies.push(LinkProxy::start(&net.ip("client"), s.client_addr()).await);
        }
        Ctx {
            cluster,
            net,
            rng: StdRng::seed_from_u64(seed),
            seed,
            clock: Clock::start(),
            control,
            proxies,
            faults: Vec::new(),
            name: name.to_string(),
            kv: None,
            kv_history: Vec::new(),
            kv_keys: Vec::new(),
            sessions: None,
            session_history: Vec::new(),
            session_count: setup.sessions,
            kv_load: setup.kv.clone(),
            node_names: setup.nodes.iter().map(|n| n.to_string()).collect(),
            started: Instant::now(),
            notes: Vec::new(),
            failures: Vec::new(),
        }
    });
    rt.block_on(async {
        let urls = ctx.cluster.urls();
        for n in setup.nodes {
            ctx.cluster.start_node(&ctx.net, n, &urls);
        }
        for n in setup.nodes {
            ctx.wait_node(n, Duration::from_secs(30)).await;
        }
        ctx.start_load().await;
        body(&mut ctx).await;
        ctx.finish().await;
    });
    drop(ctx);
    rt.shutdown_timeout(Duration::from_secs(5));
}

impl Ctx {
    /// Starts the key-value workload (through the proxies) and the session workload.
    pub async fn start_load(&mut self) {
        self.start_kv().await;
        if !self.node_names.is_empty() && self.session_count > 0 {
            let addrs = self
                .node_names
                .iter()
                .map(|n| self.cluster.node_addr(&self.net, n))
                .collect();
            self.sessions = Some(SessionRun::start(
                addrs,
                self.session_count,
                Duration::from_millis(50),
                self.clock,
                self.seed,
            ));
        }
    }

    /// Starts the key-value clients, dialing the servers through the proxies.
    async fn start_kv(&mut self) {
        let mut arrays = Vec::new();
        for _ in 0..2 {
            let mut settings = self.cluster.settings();
            for (p, (_, s)) in self.proxies.iter().zip(self.cluster.config.servers()) {
                settings.address_map.insert(s.client_addr(), p.addr.clone());
            }
            arrays.push(Arc::new(
                ArrayClient::connect(settings).await.expect("workload client connects"),
            ));
        }
        let seed = self.seed ^ self.kv_keys.len() as u64;
        self.kv = Some(KvRun::start(&arrays, &self.kv_load, self.clock, seed));
    }

    /// Stops the workloads (their histories are kept for the checks).
    pub async fn stop_load(&mut self) {
        self.stop_kv().await;
        if let Some(s) = self.sessions.take() {
            self.session_history.extend(s.finish().await);
        }
    }

    /// Stops the key-value clients, keeping their keys and history for the checks.
    async fn stop_kv(&mut self) {
        if let Some(kv) = self.kv.take() {
            self.kv_keys.extend(kv.keys.clone());
            self.kv_history.extend(kv.finish().await);
        }
    }

    /// Moves the key-value workload to fresh keys (a soak's history stays checkable per key).
    pub async fn rotate_keys(&mut self, prefix: &str) {
        self.stop_kv().await;
        self.kv_load.prefix = prefix.to_string();
        self.start_kv().await;
    }

    /// Records a fault.
    pub fn mark(&mut self, kind: &str, loses_active: bool) {
        let at = self.clock.now();
        say(&format!("    {:>6.1}s fault {kind}", at as f64 / 1e9));
        self.faults.push(FaultMark {
            kind: kind.to_string(),
            at,
            loses_active,
        });
    }

    /// Sleeps.
    pub async fn sleep(&self, d: Duration) {
        tokio::time::sleep(d).await;
    }

    /// A random duration in [lo, hi) milliseconds.
    pub fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(self.rng.gen_range(lo..hi))
    }

    /// The active now; waits for one (up to 30 s).
    pub async fn active(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(a) = self.cluster.active(&self.control).await {
                return a;
            }
            assert!(
                Instant::now() < deadline,
                "no active for 30 s\n{}",
                self.cluster.log_tails()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A random server.
    pub fn any_server(&mut self) -> String {
        let i = self.rng.gen_range(0..self.cluster.servers.len());
        self.cluster.servers[i].clone()
    }

    /// The servers other than `name`.
    pub fn others(&self, name: &str) -> Vec<String> {
        self.cluster.servers.iter().filter(|s| *s != name).cloned().collect()
    }

    /// Heals the network and the proxies, resumes paused processes, restarts dead servers.
    pub async fn heal_all(&mut self) {
        self.net.heal();
        for p in &self.proxies {
            p.set(LinkFault::default());
        }
        self.cluster.resume_all();
        for s in self.cluster.dead_servers() {
            self.cluster.start_server(&self.net, &s);
        }
    }

    /// Waits until a node serves: its `/readyz` answers 200 (online, connected to its array, and
    /// so registered in the member list). Its admin port accepts connections earlier, while it
    /// still downloads the array's configuration: a fault injected then would hit its start-up,
    /// not the running cluster the scenario means to test.
    pub async fn wait_node(&self, name: &str, timeout: Duration) {
        let addr = self.cluster.node_admin(&self.net, name);
        let deadline = Instant::now() + timeout;
        let ready = || async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(&addr).await.ok()?;
            let req = format!("GET /readyz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
            s.write_all(req.as_bytes()).await.ok()?;
            let mut raw = Vec::new();
            s.read_to_end(&mut raw).await.ok()?;
            Some(raw.starts_with(b"HTTP/1.1 200"))
        };
        while tokio::time::timeout(Duration::from_secs(2), ready())
            .await
            .ok()
            .flatten()
            != Some(true)
        {
            assert!(
                Instant::now() < deadline,
                "node {name} did not start serving\n{}",
                self.cluster.log_tails()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A node's admin JSON (`/admin/status` or `/admin/cluster`).
    pub async fn node_admin(&self, name: &str, path: &str) -> serde_json::Value {
        self.node_admin_call(name, "GET", path, "").await
    }

    /// An admin request to a node with the token and a JSON body; its JSON answer (`Null` when
    /// none came within 5 s).
    pub async fn node_admin_call(&self, name: &str, method: &str, path: &str, body: &str) -> serde_json::Value {
        let addr = self.cluster.node_admin(&self.net, name);
        let token = self.cluster.node_token(name);
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let text = async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(&addr).await.ok()?;
            s.write_all(req.as_bytes()).await.ok()?;
            let mut raw = Vec::new();
            s.read_to_end(&mut raw).await.ok()?;
            Some(String::from_utf8_lossy(&raw).into_owned())
        };
        let text = tokio::time::timeout(Duration::from_secs(5), text)
            .await
            .ok()
            .flatten()
            .unwrap_or_default();
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null)
    }

    /// Logical names in a node's member list.
    pub async fn members(&self, name: &str) -> Vec<String> {
        crate::common::member_names(&self.node_admin(name, "/admin/cluster").await)
    }

    /// Heals everything, lets the workloads run on a healed cluster, stops them, reads every key
    /// once more, stops the processes and runs every checker. Panics on any anomaly.
    async fn finish(&mut self) {
        self.heal_all().await;
        let took = self.cluster.wait_serving(&self.control, Duration::from_secs(60)).await;
        self.notes.push(format!("serving again {took:?} after the final heal"));
        self.sleep(Duration::from_secs(2)).await;
        self.stop_load().await;
        let finals = workload::final_values(&self.control, &self.kv_keys, Duration::from_secs(30)).await;
        // A second look after a restart of every server: acknowledged writes must survive it.
        for s in self.cluster.servers.clone() {
            self.cluster.kill9(&s);
        }
        for s in self.cluster.servers.clone() {
            self.cluster.start_server(&self.net, &s);
        }
        self.cluster.wait_serving(&self.control, Duration::from_secs(60)).await;
        let after_restart = workload::final_values(&self.control, &self.kv_keys, Duration::from_secs(30)).await;
        let logs: Vec<(String, String)> = self
            .cluster
            .servers
            .iter()
            .map(|s| {
                (
                    s.clone(),
                    std::fs::read_to_string(self.cluster.log_path(s)).unwrap_or_default(),
                )
            })
            .collect();
        for p in self.cluster.servers.clone().iter().chain(&self.cluster.nodes.clone()) {
            self.cluster.kill9(p);
        }
        self.report(&finals, &after_restart, &logs);
    }

    fn report(
        &self,
        finals: &std::collections::HashMap<String, Option<String>>,
        after_restart: &std::collections::HashMap<String, Option<String>>,
        logs: &[(String, String)],
    ) {
        let h = &self.kv_history;
        let count = |f: &dyn Fn(&KvEntry) -> bool| h.iter().filter(|e| f(e)).count();
        let unknown = count(&|e| e.result == KvResult::Unknown);
        let checked_started = Instant::now();
        let lin = checkers::check_linearizable(h, LIN_STEP_BUDGET);
        let lin_took = checked_started.elapsed();
        let mut durability = checkers::check_durability(h, finals);
        for a in checkers::check_durability(h, after_restart) {
            durability.push(format!("after restarting every server: {a}"));
        }
        for (k, v) in finals {
            if after_restart.get(k) != Some(v) {
                durability.push(format!(
                    "{k}: read {v:?} before restarting every server, {:?} after",
                    after_restart.get(k)
                ));
            }
        }
        let split = splitbrain::check(logs);
        let sessions = checkers::check_sessions(&self.session_history);
        let session_unknown = self.session_history.iter().filter(|e| e.counter.is_none()).count();

        let mut faults: BTreeMap<&str, usize> = BTreeMap::new();
        for f in &self.faults {
            *faults.entry(f.kind.as_str()).or_default() += 1;
        }
        let mut lines = vec![
            format!("--- chaos {} report (seed {})", self.name, self.seed),
            format!("    ran {:.1?}", self.started.elapsed()),
            format!(
                "    kv operations: {} ({} acknowledged writes, {} reads answered, {} outcome unknown) on {} keys",
                h.len(),
                count(&|e| matches!(e.result, KvResult::PutOk | KvResult::CasOk(true))),
                count(&|e| matches!(e.result, KvResult::GetOk(_))),
                unknown,
                self.kv_keys.len()
            ),
            format!(
                "    session requests: {} on {} sessions ({} outcome unknown)",
                self.session_history.len(),
                sessions.sessions,
                session_unknown
            ),
            format!("    faults: {faults:?}"),
        ];
        for (kind, gaps) in self.unavailability() {
            let max = gaps.iter().max().copied().unwrap_or_default();
            let mut sorted = gaps.clone();
            sorted.sort();
            let median = sorted.get(sorted.len() / 2).copied().unwrap_or_default();
            lines.push(format!(
                "    write unavailability after {kind}: max {max:.2?}, median {median:.2?} over {} faults",
                gaps.len()
            ));
        }
        lines.push(format!(
            "    linearizability: {} keys, {} operations checked in {lin_took:.1?}: {} anomalies, {} undecided",
            lin.keys,
            lin.ops_checked,
            lin.anomalies.len(),
            lin.undecided.len()
        ));
        lines.push(format!(
            "    durability: {} keys read after heal and after a restart of every server: {} anomalies",
            finals.len(),
            durability.len()
        ));
        lines.push(format!(
            "    split brain: {} terms with acknowledged writes: {} anomalies",
            split.terms,
            split.anomalies.len()
        ));
        lines.push(format!(
            "    session continuity: {} sessions, {} requests: {} anomalies",
            sessions.sessions,
            sessions.requests,
            sessions.anomalies.len()
        ));
        for n in &self.notes {
            lines.push(format!("    {n}"));
        }
        let anomalies: Vec<String> = lin
            .anomalies
            .iter()
            .map(|a| format!("linearizability: {a}"))
            .chain(durability.iter().map(|a| format!("durability: {a}")))
            .chain(split.anomalies.iter().map(|a| format!("split brain: {a}")))
            .chain(sessions.anomalies.iter().map(|a| format!("session: {a}")))
            .chain(self.failures.iter().map(|a| format!("{}: {a}", self.name)))
            .chain(
                lin.undecided
                    .iter()
                    .map(|k| format!("linearizability undecided (budget) for key {k}")),
            )
            .collect();
        for a in anomalies.iter().take(ANOMALIES_SHOWN) {
            lines.push(format!("    ANOMALY {a}"));
        }
        if anomalies.len() > ANOMALIES_SHOWN {
            lines.push(format!(
                "    ... and {} more anomalies",
                anomalies.len() - ANOMALIES_SHOWN
            ));
        }
        say(&lines.join("\n"));
        assert!(
            anomalies.is_empty(),
            "chaos {} (seed {}) found {} anomalies; logs kept in {}",
            self.name,
            self.seed,
            anomalies.len(),
            self.keep_logs()
        );
    }

    /// For each fault kind that took the active away: the time from the fault to the completion of
    /// the first write invoked after it that got a definite answer.
    pub fn unavailability(&self) -> BTreeMap<String, Vec<Duration>> {
        let mut out: BTreeMap<String, Vec<Duration>> = BTreeMap::new();
        for f in self.faults.iter().filter(|f| f.loses_active) {
            let first = self
                .kv_history
                .iter()
                .filter(|e| e.invoke >= f.at && matches!(e.result, KvResult::PutOk | KvResult::CasOk(_)))
                .filter_map(|e| e.complete)
                .min();
            if let Some(done) = first {
                out.entry(f.kind.clone())
                    .or_default()
                    .push(Duration::from_nanos(done - f.at));
            }
        }
        out
    }

    /// Copies the logs out of the temporary folder (for a failed run); where they went.
    fn keep_logs(&self) -> String {
        let dest = std::env::temp_dir().join(format!("ferrocotta-chaos-{}-{}", self.name, self.seed));
        let _ = std::fs::create_dir_all(&dest);
        if let Ok(entries) = std::fs::read_dir(self.cluster.dir.path().join("logs")) {
            for e in entries.flatten() {
                let _ = std::fs::copy(e.path(), dest.join(e.file_name()));
            }
        }
        dest.display().to_string()
    }
}
