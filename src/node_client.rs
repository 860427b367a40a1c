//! A client of integration nodes that fails over between them: the seed's `Context`.
//!
//! It is given a list of nodes (and optionally a retry server). On connect it asks the first node
//! that answers for the cluster's members (`wm.server.cluster:getMembers`, the seed's "the server
//! returns information about the other servers in the cluster") and adds their service addresses
//! to its list. A request that fails because its node is down (no connection, no answer in time),
//! offline, or cut from the array (503) goes to the next node, then to the retry server; any other
//! answer (a result, or the service's own error) is final. The session cookie (`ssnid`) goes with
//! every request, so a conversation continues on the next node.
//!
//! Without guaranteed delivery that is the seed's "clustering" row: a request whose node failed
//! while it ran (or whose answer was lost) runs again on the next node, so it may run twice. With
//! it, the tid makes the second run answer the first one's result.
//!
//! With guaranteed delivery ([`NodeClient::invoke_gd`]) the client starts a transaction and invokes
//! it with the same tid on whichever node answers until it is done, or its ttl or retries run out.
//!
//! Shared by the CLI (`ferrocotta invoke`) and the nodes (`pub.remote:invoke`); it knows HTTP and
//! JSON, nothing of the array.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::http::{request_with_headers, Call};
use crate::tls::ClientTls;

/// Largest answer a node may send.
pub const ANSWER_BYTES_MAX: usize = 16 << 20;

/// How a [`NodeClient`] reaches its nodes.
#[derive(Clone)]
pub struct NodeClientSettings {
    /// Service addresses (`host:port`) of nodes of the cluster, tried in order.
    pub nodes: Vec<String>,
    /// Tried after every node of the cluster failed.
    pub retry_server: Option<String>,
    /// Deadline of one request to one node.
    pub request_timeout: Duration,
    /// Whether to learn the other members from the first node that answers.
    pub discover: bool,
    /// TLS of the nodes' ports.
    pub tls: Option<Arc<ClientTls>>,
    /// Whether to keep the session cookie a node gives (a client of its own); a client that
    /// serves many callers (a node's remote alias) keeps none, so callers never share a session.
    pub keep_session: bool,
}

impl NodeClientSettings {
    /// Settings for a comma-separated list of nodes.
    pub fn new(nodes: &str) -> Result<NodeClientSettings, NodeClientError> {
        let nodes: Vec<String> = nodes
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(strip_scheme)
            .collect();
        if nodes.is_empty() {
            return Err(NodeClientError::Usage("no node address given".into()));
        }
        Ok(NodeClientSettings {
            nodes,
            retry_server: None,
            request_timeout: Duration::from_secs(10),
            discover: true,
            tls: None,
            keep_session: true,
        })
    }
}

fn strip_scheme(addr: &str) -> String {
    addr.trim_start_matches("http://")
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .to_string()
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum NodeClientError {
    /// Bad settings.
    #[error("{0}")]
    Usage(String),
    /// No node (nor the retry server) could serve it: each address with why.
    #[error("no node could serve the request: {}", .0.iter().map(|(a, why)| format!("{a}: {why}")).collect::<Vec<_>>().join("; "))]
    NoNode(Vec<(String, String)>),
    /// A node answered with the service's error.
    #[error("{node} answered {status}: {code}: {message}")]
    Service {
        node: String,
        status: u16,
        code: String,
        message: String,
    },
}

impl NodeClientError {
    /// The error code a node answered, if one did.
    pub fn code(&self) -> Option<&str> {
        match self {
            NodeClientError::Service { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// One answer: which node gave it, and the JSON.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The node that answered.
    pub node: String,
    /// Its JSON answer.
    pub value: Value,
}

/// A client that fails over between the nodes of a cluster.
pub struct NodeClient {
    settings: NodeClientSettings,
    /// The nodes, in the order tried: the given ones, then members learned.
    nodes: Mutex<Vec<String>>,
    /// The node that answered last (tried first).
    current: Mutex<usize>,
    /// The session cookie, once a node issued one.
    ssnid: Mutex<Option<String>>,
}

/// Whether an answer says "this node cannot serve now; another may": offline, or its array away.
fn node_unavailable(status: u16, code: &str) -> bool {
    status == 503 && matches!(code, "offline" | "ISS.0033.0154E" | "array_busy" | "standalone")
}

impl NodeClient {
    /// A client; learns the members from the first node that answers (when `discover` is set).
    pub async fn connect(settings: NodeClientSettings) -> NodeClient {
        let client = NodeClient {
            nodes: Mutex::new(settings.nodes.clone()),
            settings,
            current: Mutex::new(0),
            ssnid: Mutex::new(None),
        };
        if client.settings.discover {
            client.discover().await;
        }
        client
    }

    /// Adds the service addresses of the cluster's members, as the first node that knows them
    /// tells them (a node cut from its array lists none: the next one is asked).
    pub async fn discover(&self) {
        let mut members = Vec::new();
        for addr in self.nodes() {
            if let Ok(value) = self.once(&addr, "wm.server.cluster:getMembers", &json!({})).await {
                members = value["members"].as_array().cloned().unwrap_or_default();
                if !members.is_empty() {
                    break;
                }
            }
        }
        let mut nodes = self.nodes.lock().expect("nodes lock");
        for m in &members {
            if let Some(addr) = m["service"].as_str() {
                if !nodes.iter().any(|n| n == addr) {
                    nodes.push(addr.to_string());
                }
            }
        }
    }

    /// The nodes it knows, in the order it tries them.
    pub fn nodes(&self) -> Vec<String> {
        self.nodes.lock().expect("nodes lock").clone()
    }

    /// The session id the nodes gave this client, if any.
    pub fn session(&self) -> Option<String> {
        self.ssnid.lock().expect("ssnid lock").clone()
    }

    /// Invokes a service: on the node that answered last, then on the others, then on the retry
    /// server, until one serves it.
    pub async fn invoke(&self, service: &str, input: &Value) -> Result<Answer, NodeClientError> {
        let nodes = self.nodes();
        let first = *self.current.lock().expect("current lock") % nodes.len().max(1);
        let mut order: Vec<(Option<usize>, String)> = (0..nodes.len())
            .map(|k| (first + k) % nodes.len())
            .map(|i| (Some(i), nodes[i].clone()))
            .collect();
        if let Some(r) = &self.settings.retry_server {
            order.push((None, strip_scheme(r)));
        }
        let mut failures = Vec::new();
        for (index, addr) in order {
            match self.once(&addr, service, input).await {
                Ok(value) => {
                    if let Some(i) = index {
                        *self.current.lock().expect("current lock") = i;
                    }
                    return Ok(Answer { node: addr, value });
                }
                Err(Failure::Unavailable(why)) => failures.push((addr, why)),
                Err(Failure::Final(e)) => return Err(e),
            }
        }
        Err(NodeClientError::NoNode(failures))
    }

    async fn once(&self, addr: &str, service: &str, input: &Value) -> Result<Value, Failure> {
        let path = format!("/invoke/{service}");
        let mut call = Call::get(&path, self.settings.request_timeout);
        call.method = hyper::Method::POST;
        call.body_max = ANSWER_BYTES_MAX;
        call.body = serde_json::to_vec(input).unwrap_or_default();
        call.headers.push(("content-type", "application/json".into()));
        if let Some(id) = self.session() {
            call.headers.push(("cookie", format!("ssnid={id}")));
        }
        let (status, headers, body) = request_with_headers(addr, self.settings.tls.as_deref(), call)
            .await
            .map_err(|e| Failure::Unavailable(e.to_string()))?;
        if let Some(id) = headers
            .get_all(hyper::header::SET_COOKIE)
            .iter()
            .filter(|_| self.settings.keep_session)
            .filter_map(|v| v.to_str().ok())
            .filter_map(|v| v.split(';').next()?.trim().strip_prefix("ssnid=").map(str::to_string))
            .next()
        {
            *self.ssnid.lock().expect("ssnid lock") = Some(id);
        }
        let value: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        if (200..300).contains(&status) {
            return Ok(value);
        }
        let code = value["error"]["code"].as_str().unwrap_or("").to_string();
        let message = value["error"]["message"].as_str().unwrap_or("").to_string();
        if node_unavailable(status, &code) || status == 502 || status == 504 {
            return Err(Failure::Unavailable(format!("{status} {code}: {message}")));
        }
        Err(Failure::Final(NodeClientError::Service {
            node: addr.to_string(),
            status,
            code,
            message,
        }))
    }

    /// Runs a service under guaranteed delivery: starts a transaction (unless `tid` names one),
    /// then invokes it with the same tid on whichever node serves, until it is done, or it
    /// expires, ends or is in doubt, or `deadline` passes. Returns the tid and the node's answer.
    pub async fn invoke_gd(
        &self,
        service: &str,
        input: &Value,
        tid: Option<String>,
        start: &Value,
        deadline: Duration,
    ) -> Result<(String, Answer), NodeClientError> {
        let until = Instant::now() + deadline;
        let tid = match tid {
            Some(t) => t,
            None => loop {
                match self.invoke("pub.remote.gd:start", start).await {
                    Ok(a) => break a.value["tid"].as_str().unwrap_or_default().to_string(),
                    Err(e @ NodeClientError::NoNode(_)) if Instant::now() >= until => return Err(e),
                    Err(NodeClientError::NoNode(_)) => tokio::time::sleep(Duration::from_millis(200)).await,
                    Err(e) => return Err(e),
                }
            },
        };
        // The node waits for a run elsewhere at most half this client's own deadline, so it
        // answers `running` before the client gives up on it and moves on.
        let wait_ms = (self.settings.request_timeout / 2).as_millis() as u64;
        let body = json!({"tid": tid, "service": service, "input": input, "timeout": wait_ms});
        loop {
            match self.invoke("pub.remote.gd:invoke", &body).await {
                Ok(a) => return Ok((tid, a)),
                // Another node still runs it (or its dead runner's session has not ended yet), its
                // attempt failed (the next one runs until `retries`), or it was taken from a node
                // cut from the array: resubmit the same tid.
                Err(NodeClientError::Service { ref code, .. })
                    if matches!(code.as_str(), "running" | "failed" | "lost" | "busy") && Instant::now() < until => {}
                Err(e @ NodeClientError::NoNode(_)) if Instant::now() >= until => return Err(e),
                Err(NodeClientError::NoNode(_)) => {}
                Err(e) => return Err(e),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

enum Failure {
    /// The node cannot serve now; try another.
    Unavailable(String),
    /// The answer stands.
    Final(NodeClientError),
}
