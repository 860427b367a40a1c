//! `pub.remote:invoke`: a service of another cluster, through the aliases of node.toml
//! (`[remote."alias"]`), as the seed's remote server aliases work. With `$clusterRetry` true the
//! call goes to the alias's nodes (and the members they name), then to its retry server; false
//! goes straight to the retry server. `pub.remote.gd:*` with an `alias` runs on that cluster too.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use ferrocotta::node_client::{NodeClient, NodeClientError, NodeClientSettings};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{field, Registry, ServiceError};
use crate::node::Node;

/// A `[remote."alias"]` section of node.toml.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteAlias {
    /// Service addresses of nodes of the remote cluster (`host:port,host:port`).
    pub urls: String,
    /// Tried after the cluster's nodes (or alone, with `$clusterRetry` false).
    #[serde(default)]
    pub retry_server: Option<String>,
    /// Deadline of one request to one remote node [default: the node's request_timeout].
    #[serde(default)]
    pub timeout: Option<String>,
    /// The CA of the remote nodes' certificates: speak https.
    #[serde(default)]
    pub tls_ca_file: Option<std::path::PathBuf>,
}

/// Registers `pub.remote:invoke`.
pub fn register(r: &mut Registry) {
    r.register("pub.remote:invoke", |node, _, input| {
        Box::pin(async move {
            let alias = field(&input, "alias")?;
            let service = field(&input, "service")?;
            super::check_service_name(service)?;
            let inner = input.get("input").cloned().unwrap_or_else(|| json!({}));
            let cluster_retry = match input.get("$clusterRetry") {
                None | Some(Value::Null) => true,
                Some(Value::Bool(b)) => *b,
                Some(Value::String(s)) => s != "false",
                Some(_) => return Err(ServiceError::bad_request("`$clusterRetry` is true or false")),
            };
            let client = client_for(node, alias, cluster_retry).await?;
            let answer = client.invoke(service, &inner).await.map_err(remote_error)?;
            Ok(json!({"alias": alias, "node": answer.node, "output": answer.value}))
        })
    });
}

/// A remote cluster's error as this node answers it.
pub fn remote_error(e: NodeClientError) -> ServiceError {
    match e {
        NodeClientError::Service {
            node,
            status,
            code,
            message,
        } => ServiceError::new(
            StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
            &code,
            format!("remote node {node}: {message}"),
        ),
        NodeClientError::NoNode(_) => ServiceError::new(StatusCode::BAD_GATEWAY, "remote_unavailable", e.to_string()),
        NodeClientError::Usage(m) => ServiceError::bad_request(m),
    }
}

/// The failover client of an alias (kept per alias and mode: it learns the remote members once).
pub async fn client_for(node: &Node, alias: &str, cluster_retry: bool) -> Result<Arc<NodeClient>, ServiceError> {
    let key = (alias.to_string(), cluster_retry);
    if let Some(c) = node.remote_clients.lock().await.get(&key) {
        return Ok(c.clone());
    }
    let Some(conf) = node.settings.remote.get(alias) else {
        let known: Vec<&str> = node.settings.remote.keys().map(String::as_str).collect();
        return Err(ServiceError::bad_request(format!(
            "no remote alias `{alias}` in node.toml (aliases: {})",
            known.join(", ")
        )));
    };
    let mut settings = if cluster_retry {
        let mut s = NodeClientSettings::new(&conf.urls).map_err(remote_error)?;
        s.retry_server = conf.retry_server.clone();
        s
    } else {
        let Some(retry) = &conf.retry_server else {
            return Err(ServiceError::bad_request(format!(
                "`$clusterRetry` false goes to the alias's retry server, and `{alias}` has none"
            )));
        };
        let mut s = NodeClientSettings::new(retry).map_err(remote_error)?;
        s.discover = false;
        s
    };
    // Shared by every caller of the alias: no session of its own.
    settings.keep_session = false;
    settings.request_timeout = match &conf.timeout {
        Some(t) => humantime::parse_duration(t)
            .map_err(|e| ServiceError::bad_request(format!("remote `{alias}` timeout `{t}`: {e}")))?,
        None => node.settings.request_timeout,
    }
    .max(Duration::from_millis(1));
    if let Some(ca_file) = &conf.tls_ca_file {
        settings.tls = Some(
            ferrocotta::tls::ClientTls::load(
                "remote alias",
                ferrocotta::tls::TlsFiles {
                    cert_file: None,
                    key_file: None,
                    ca_file: ca_file.clone(),
                },
            )
            .map_err(|e| ServiceError::new(StatusCode::INTERNAL_SERVER_ERROR, "tls", e.to_string()))?,
        );
    }
    let client = Arc::new(NodeClient::connect(settings).await);
    node.remote_clients.lock().await.insert(key, client.clone());
    Ok(client)
}
