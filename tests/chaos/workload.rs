//! Workloads that record a history while faults happen: concurrent clients doing put, get and
//! compare-and-swap on a few keys with unique values, and session counters through integration
//! nodes. A timeout or a broken connection is recorded as "may or may not have happened".

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferrocotta::ArrayClient;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::history::{KvEntry, KvOp, KvResult, SessionEntry};

/// The cache every key-value workload uses.
pub const CACHE: &str = "chaos";

/// One clock for every client of a run.
#[derive(Clone, Copy)]
pub struct Clock(Instant);

impl Clock {
    /// A clock starting now.
    pub fn start() -> Clock {
        Clock(Instant::now())
    }

    /// Nanoseconds since the start.
    pub fn now(&self) -> u64 {
        self.0.elapsed().as_nanos() as u64
    }
}

/// Shape of the key-value workload.
#[derive(Debug, Clone)]
pub struct KvLoad {
    /// Concurrent clients (each one operation at a time).
    pub clients: usize,
    /// Keys shared by all clients.
    pub keys: usize,
    /// Pause between two operations of a client.
    pub pause: Duration,
    /// Prefix of the key names (distinct per round of a soak).
    pub prefix: String,
}

/// A running key-value workload.
pub struct KvRun {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Vec<KvEntry>>>,
    /// Key names.
    pub keys: Vec<String>,
}

impl KvRun {
    /// Starts the clients; they share the `array` clients round-robin.
    pub fn start(arrays: &[Arc<ArrayClient>], load: &KvLoad, clock: Clock, seed: u64) -> KvRun {
        let stop = Arc::new(AtomicBool::new(false));
        let keys: Vec<String> = (0..load.keys).map(|k| format!("{}k{k}", load.prefix)).collect();
        let tasks = (0..load.clients)
            .map(|c| {
                let client = arrays[c % arrays.len()].clone();
                let stop = stop.clone();
                let keys = keys.clone();
                let pause = load.pause;
                let rng = StdRng::seed_from_u64(seed.wrapping_add(c as u64 * 7919));
                tokio::spawn(kv_client(c, client, keys, pause, clock, rng, stop))
            })
            .collect();
        KvRun { stop, tasks, keys }
    }

    /// Stops the clients and returns the history, ordered by invoke time.
    pub async fn finish(self) -> Vec<KvEntry> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for t in self.tasks {
            all.extend(t.await.expect("workload client panicked"));
        }
        all.sort_by_key(|e| e.invoke);
        all
    }
}

async fn kv_client(
    id: usize,
    client: Arc<ArrayClient>,
    keys: Vec<String>,
    pause: Duration,
    clock: Clock,
    mut rng: StdRng,
    stop: Arc<AtomicBool>,
) -> Vec<KvEntry> {
    let mut history = Vec::new();
    let mut seq = 0u64;
    // The last value this client saw per key: what its compare-and-swaps expect.
    let mut seen: Vec<Option<String>> = vec![None; keys.len()];
    while !stop.load(Ordering::Relaxed) {
        let k = rng.gen_range(0..keys.len());
        let key = &keys[k];
        seq += 1;
        let unique = format!("c{id}-{seq}");
        let roll = rng.gen_range(0..100);
        let invoke = clock.now();
        let (op, result) = if roll < 50 {
            let r = client.get(CACHE, key.as_bytes()).await;
            let result = match r {
                Ok(v) => {
                    let v = v.map(|b| String::from_utf8_lossy(&b).into_owned());
                    seen[k] = v.clone();
                    KvResult::GetOk(v)
                }
                Err(_) => KvResult::Unknown,
            };
            (KvOp::Get, result)
        } else if roll < 75 || seen[k].is_none() {
            let r = client.put(CACHE, key.as_bytes(), unique.as_bytes()).await;
            let result = match r {
                Ok(_) => {
                    seen[k] = Some(unique.clone());
                    KvResult::PutOk
                }
                Err(_) => KvResult::Unknown,
            };
            (KvOp::Put { value: unique }, result)
        } else {
            let expected = seen[k].clone().unwrap_or_default();
            let r = client
                .replace_if_equal(CACHE, key.as_bytes(), expected.as_bytes(), unique.as_bytes())
                .await;
            let result = match r {
                Ok(true) => {
                    seen[k] = Some(unique.clone());
                    KvResult::CasOk(true)
                }
                Ok(false) => KvResult::CasOk(false),
                Err(_) => KvResult::Unknown,
            };
            (KvOp::Cas { expected, new: unique }, result)
        };
        let complete = (result != KvResult::Unknown).then(|| clock.now());
        history.push(KvEntry {
            client: id,
            key: key.clone(),
            op,
            invoke,
            complete,
            result,
        });
        tokio::time::sleep(pause).await;
    }
    history
}

/// Reads every key once more after the faults are healed (retrying until an answer comes).
pub async fn final_values(
    client: &ArrayClient,
    keys: &[String],
    timeout: Duration,
) -> std::collections::HashMap<String, Option<String>> {
    let deadline = Instant::now() + timeout;
    let mut out = std::collections::HashMap::new();
    for key in keys {
        loop {
            match client.get(CACHE, key.as_bytes()).await {
                Ok(v) => {
                    out.insert(key.clone(), v.map(|b| String::from_utf8_lossy(&b).into_owned()));
                    break;
                }
                Err(e) => {
                    assert!(Instant::now() < deadline, "final read of {key} failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    out
}

/// A running session workload: each session is driven by one task, one request at a time, sent
/// to a node chosen at random for every request (so sessions move between nodes).
pub struct SessionRun {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Vec<SessionEntry>>>,
}

impl SessionRun {
    /// Starts `sessions` session drivers against the node service addresses.
    pub fn start(nodes: Vec<String>, sessions: usize, pause: Duration, clock: Clock, seed: u64) -> SessionRun {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..sessions)
            .map(|s| {
                let nodes = nodes.clone();
                let stop = stop.clone();
                let rng = StdRng::seed_from_u64(seed ^ (s as u64 * 104_729));
                // The checker's name of the session; the cookie is the one the node issues.
                let id = format!("chaos{seed:x}s{s}");
                tokio::spawn(session_driver(id, nodes, pause, clock, rng, stop))
            })
            .collect();
        SessionRun { stop, tasks }
    }

    /// Stops the drivers and returns every request.
    pub async fn finish(self) -> Vec<SessionEntry> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for t in self.tasks {
            all.extend(t.await.expect("session driver panicked"));
        }
        all
    }
}

/// How long a session request may take before the client gives up on it (longer than the node's
/// own request timeout, so the node's answer normally arrives first).
const SESSION_CLIENT_TIMEOUT: Duration = Duration::from_secs(8);

async fn session_driver(
    id: String,
    nodes: Vec<String>,
    pause: Duration,
    clock: Clock,
    mut rng: StdRng,
    stop: Arc<AtomicBool>,
) -> Vec<SessionEntry> {
    let mut out = Vec::new();
    // As a browser does: no cookie at first, then whatever the nodes set. A node sets a new one
    // when the array does not know the session, so a lost session shows as its counter going back.
    let mut cookie: Option<String> = None;
    while !stop.load(Ordering::Relaxed) {
        let node = &nodes[rng.gen_range(0..nodes.len())];
        let invoke = clock.now();
        let counter = match invoke_counter(node, cookie.as_deref()).await {
            Ok((counter, set)) => {
                if set.is_some() {
                    cookie = set;
                }
                Some(counter)
            }
            Err(_) => None,
        };
        out.push(SessionEntry {
            session: id.clone(),
            invoke,
            counter,
        });
        tokio::time::sleep(pause).await;
    }
    out
}

/// POST /invoke/demo:counter for a session (`None`: a new one); the counter it answered and the
/// session cookie the node set, if it set one.
pub async fn invoke_counter(node: &str, ssnid: Option<&str>) -> Result<(i64, Option<String>), String> {
    let (status, set_cookie, body) = http_post(node, "/invoke/demo:counter", ssnid, SESSION_CLIENT_TIMEOUT).await?;
    if status != 200 {
        return Err(format!("status {status}: {body}"));
    }
    let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
    let counter = v["counter"].as_i64().ok_or_else(|| format!("no counter in {body}"))?;
    Ok((counter, set_cookie))
}

/// One HTTP/1.1 POST with a session cookie (if any) and `Connection: close`; (status, the ssnid
/// the answer set, body).
pub async fn http_post(
    addr: &str,
    path: &str,
    ssnid: Option<&str>,
    timeout: Duration,
) -> Result<(u16, Option<String>, String), String> {
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let cookie = ssnid.map(|c| format!("Cookie: ssnid={c}\r\n")).unwrap_or_default();
        let req =
            format!("POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{cookie}Content-Length: 0\r\n\r\n");
        s.write_all(req.as_bytes()).await.map_err(|e| e.to_string())?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(String::from_utf8_lossy(&raw).into_owned())
    };
    let text = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))??;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let set_cookie = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| k.trim().eq_ignore_ascii_case("set-cookie"))
        .filter_map(|(_, v)| v.trim().split(';').next()?.strip_prefix("ssnid=").map(str::to_string))
        .next();
    Ok((status, set_cookie, body.to_string()))
}
