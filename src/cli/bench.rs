//! `ferrocotta bench`: a load generator against a running array or its integration nodes, on
//! [`ferrocotta::loadgen`] (the engine the peer comparison uses too).
//!
//! `--connections` clients, each with its own pipelined connection per server, share
//! `--concurrency` requests in flight; `--workload session` drives integration nodes over HTTP
//! (`--node-urls`, or the nodes of `--dir`). Bounded: it stops after `--duration` (plus warm-up) by itself.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use clap::{Args, ValueEnum};
use ferrocotta::client::Entry;
use ferrocotta::loadgen::{self, LoadArgs, OpError, Target, Workload};
use ferrocotta::protocol::ReadConsistency;
use ferrocotta::tls::NetStream;
use ferrocotta::{ArrayClient, ClientError};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use super::ArrayArgs;

/// The cache the array workloads use.
const CACHE: &str = "ferrocotta.bench";

/// Idle HTTP connections kept per node for the session workload.
const NODE_CONNECTIONS_MAX: usize = 1024;

/// Session cookies the session workload remembers (one per session key).
const SESSION_COOKIES_MAX: usize = 1_000_000;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum WorkloadArg {
    /// Puts of uniformly chosen keys.
    Put,
    /// Linearizable gets (`--eventual`: from any server).
    Get,
    /// Compare-and-swap; each in-flight slot owns its keys.
    Cas,
    /// 50% reads, 50% updates, zipfian keys, 1 KiB values (YCSB workload A).
    YcsbA,
    /// Read and update a session per request through integration nodes (`--node-urls`).
    Session,
}

/// Flags of `ferrocotta bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    array: ArrayArgs,
    /// What to run.
    #[arg(long, value_enum, default_value = "put")]
    workload: WorkloadArg,
    #[command(flatten)]
    load: LoadArgs,
    /// Read with eventual consistency (any server) instead of linearizable.
    #[arg(long)]
    eventual: bool,
    /// Integration nodes for `--workload session`, as `host:port,host:port` (default: the nodes
    /// of `--dir`). `--nodes` is an older name: in `up` it is a count.
    #[arg(long, alias = "nodes")]
    node_urls: Option<String>,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<u8> {
    let workload = match (args.workload, args.eventual) {
        (WorkloadArg::Get, true) => Workload::GetEventual,
        (_, true) => anyhow::bail!("--eventual applies to --workload get only"),
        (WorkloadArg::Put, _) => Workload::Put,
        (WorkloadArg::Get, _) => Workload::Get,
        (WorkloadArg::Cas, _) => Workload::Cas,
        (WorkloadArg::YcsbA, _) => Workload::YcsbA,
        (WorkloadArg::Session, _) => Workload::Session,
    };
    let options = args.load.options(workload).map_err(anyhow::Error::msg)?;
    let report = if workload == Workload::Session {
        let from_dir = || -> anyhow::Result<Option<String>> {
            let Some(endpoints) = args.array.local_endpoints()? else {
                return Ok(None);
            };
            let services: Vec<String> = endpoints.processes.iter().filter_map(|p| p.service.clone()).collect();
            Ok((!services.is_empty()).then(|| services.join(",")))
        };
        let nodes = match args.node_urls.clone() {
            Some(urls) => urls,
            None => from_dir()?.context(
                "--workload session needs --node-urls host:port,... (the integration nodes), or --dir of an `up` with nodes",
            )?,
        };
        // Nodes that speak HTTPS are verified against the same CA as the array (`up --tls` makes one).
        let tls = args.array.tls()?;
        let target = Arc::new(NodeTarget::new(&nodes, tls)?);
        loadgen::run(target, "ferrocotta", options).await
    } else {
        let mut clients = Vec::new();
        for _ in 0..args.load.connections {
            clients.push(args.array.connect().await?);
        }
        let target = Arc::new(ArrayTarget {
            clients,
            next: AtomicUsize::new(0),
        });
        loadgen::run(target, "ferrocotta", options).await
    }
    .map_err(|e| anyhow::anyhow!("bench failed: {}", e.kind))?;
    args.load.print(&report);
    Ok(if report.error_count() == 0 { 0 } else { 1 })
}

/// The array through `ArrayClient`s, used round-robin.
struct ArrayTarget {
    clients: Vec<ArrayClient>,
    next: AtomicUsize,
}

impl ArrayTarget {
    fn client(&self) -> &ArrayClient {
        &self.clients[self.next.fetch_add(1, Ordering::Relaxed) % self.clients.len()]
    }
}

/// The stable name of a client error in the error table.
fn error_kind(e: &ClientError) -> OpError {
    OpError::new(match e {
        ClientError::Timeout(_) | ClientError::NonstopTimeout { .. } => "timeout",
        ClientError::Indeterminate(_) => "indeterminate",
        ClientError::NoQuorum { .. } => "no_quorum",
        ClientError::Unavailable { .. } => "unavailable",
        ClientError::Server(_) => "server_error",
        _ => "other",
    })
}

impl Target for ArrayTarget {
    async fn put(&self, key: &[u8], value: &[u8]) -> Result<(), OpError> {
        self.client()
            .put(CACHE, key, value)
            .await
            .map(drop)
            .map_err(|e| error_kind(&e))
    }

    async fn get(&self, key: &[u8], linearizable: bool) -> Result<Option<Vec<u8>>, OpError> {
        let read = if linearizable {
            ReadConsistency::Linearizable
        } else {
            ReadConsistency::Eventual
        };
        self.client()
            .get_with(CACHE, key, read)
            .await
            .map_err(|e| error_kind(&e))
    }

    async fn cas(&self, key: &[u8], expected: &[u8], new: &[u8]) -> Result<bool, OpError> {
        self.client()
            .replace_if_equal(CACHE, key, expected, new)
            .await
            .map_err(|e| error_kind(&e))
    }

    async fn put_many(&self, entries: &[Entry]) -> Result<(), OpError> {
        // put_all is per stripe: group the entries by the stripe that owns them.
        let client = self.client();
        let mut by_stripe: std::collections::BTreeMap<usize, Vec<Entry>> = Default::default();
        for (k, v) in entries {
            by_stripe
                .entry(client.stripe_of(k))
                .or_default()
                .push((k.clone(), v.clone()));
        }
        for batch in by_stripe.values() {
            client.put_all(CACHE, batch).await.map_err(|e| error_kind(&e))?;
        }
        Ok(())
    }
}

/// Integration nodes over HTTP/1.1 keep-alive: `demo:counter` reads and updates the session.
struct NodeTarget {
    /// Service addresses of the nodes.
    nodes: Vec<String>,
    /// Round-robin position.
    next: AtomicUsize,
    /// Idle keep-alive connections, by node.
    idle: Mutex<Vec<(usize, BufReader<NetStream>)>>,
    /// TLS to the nodes, when they speak HTTPS.
    tls: Option<Arc<ferrocotta::tls::ClientTls>>,
    /// The session cookie the nodes issued for each session key.
    cookies: Mutex<std::collections::HashMap<Vec<u8>, String>>,
}

impl NodeTarget {
    fn new(list: &str, tls: Option<Arc<ferrocotta::tls::ClientTls>>) -> anyhow::Result<NodeTarget> {
        let nodes: Vec<String> = list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
        if nodes.is_empty() {
            anyhow::bail!("--nodes is empty");
        }
        Ok(NodeTarget {
            nodes,
            next: AtomicUsize::new(0),
            idle: Mutex::new(Vec::new()),
            tls,
            cookies: Mutex::new(std::collections::HashMap::new()),
        })
    }

    /// An idle connection to the next node, or a new one.
    async fn connection(&self) -> Result<(usize, BufReader<NetStream>), OpError> {
        let node = self.next.fetch_add(1, Ordering::Relaxed) % self.nodes.len();
        let idle = {
            let mut idle = self.idle.lock().expect("idle lock");
            idle.iter().position(|(n, _)| *n == node).map(|i| idle.swap_remove(i))
        };
        if let Some(c) = idle {
            return Ok(c);
        }
        let addr = &self.nodes[node];
        let tcp = TcpStream::connect(addr).await.map_err(|_| OpError::new("connect"))?;
        let _ = tcp.set_nodelay(true);
        let stream = match &self.tls {
            None => NetStream::Plain(tcp),
            Some(tls) => {
                let host = addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(addr);
                tls.connect(host, tcp).await.map_err(|_| OpError::new("tls"))?
            }
        };
        Ok((node, BufReader::new(stream)))
    }
}

impl Target for NodeTarget {
    async fn put(&self, _: &[u8], _: &[u8]) -> Result<(), OpError> {
        Err(OpError::new("unsupported"))
    }

    async fn get(&self, _: &[u8], _: bool) -> Result<Option<Vec<u8>>, OpError> {
        Err(OpError::new("unsupported"))
    }

    async fn cas(&self, _: &[u8], _: &[u8], _: &[u8]) -> Result<bool, OpError> {
        Err(OpError::new("unsupported"))
    }

    async fn put_many(&self, _: &[Entry]) -> Result<(), OpError> {
        Err(OpError::new("unsupported"))
    }

    async fn session(&self, session: &[u8], _: &[u8]) -> Result<(), OpError> {
        let (node, mut conn) = self.connection().await?;
        // The workload's session keys name sessions; the cookie of each is the one the node issued
        // for it (nodes do not take session ids a client made up).
        let known = self.cookies.lock().expect("cookies lock").get(session).cloned();
        let cookie = known.map(|c| format!("Cookie: ssnid={c}\r\n")).unwrap_or_default();
        let request = format!(
            "POST /invoke/demo:counter HTTP/1.1\r\nHost: {}\r\n{cookie}Content-Length: 0\r\n\r\n",
            self.nodes[node],
        );
        let io = |_| OpError::new("connection");
        conn.get_mut().write_all(request.as_bytes()).await.map_err(io)?;
        let mut status_line = String::new();
        conn.read_line(&mut status_line).await.map_err(io)?;
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            if conn.read_line(&mut line).await.map_err(io)? == 0 {
                return Err(OpError::new("connection"));
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse().unwrap_or(0);
                } else if k.eq_ignore_ascii_case("set-cookie") {
                    if let Some(id) = v.trim().split(';').next().and_then(|c| c.strip_prefix("ssnid=")) {
                        let mut cookies = self.cookies.lock().expect("cookies lock");
                        if cookies.len() < SESSION_COOKIES_MAX || cookies.contains_key(session) {
                            cookies.insert(session.to_vec(), id.to_string());
                        }
                    }
                }
            }
        }
        let mut body = vec![0u8; length];
        conn.read_exact(&mut body).await.map_err(io)?;
        {
            let mut idle = self.idle.lock().expect("idle lock");
            if idle.len() < NODE_CONNECTIONS_MAX {
                idle.push((node, conn));
            }
        }
        match status {
            200 => Ok(()),
            503 => Err(OpError::new("http_503")),
            s => Err(OpError::new(format!("http_{s}"))),
        }
    }
}
