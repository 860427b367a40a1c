//! `ferrocotta invoke`: a service of a cluster of integration nodes through the failover client
//! (`node_client`), optionally under guaranteed delivery.
//!
//! Prints one JSON document: `{"node", "result"}`, with `--gd` `{"tid", "node", "state",
//! "attempts", "result"}`. Exit codes: 0 served; 1 the service answered an error (printed as
//! `{"error": {"node", "status", "code", "message"}}`); 3 no node nor the retry server could
//! serve it (each address and why on stderr); 4 the guaranteed-delivery transaction expired,
//! ended or is in doubt.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use ferrocotta::node_client::{NodeClient, NodeClientError, NodeClientSettings};
use serde_json::{json, Value};

/// Exit code: no node could serve the request.
pub const EXIT_NO_NODE: u8 = 3;
/// Exit code: the guaranteed-delivery transaction expired, ended or is in doubt.
pub const EXIT_GD_OVER: u8 = 4;

/// `ferrocotta invoke`.
#[derive(Debug, Args)]
pub struct InvokeArgs {
    /// Service addresses of nodes of the cluster (`host:port,host:port`), tried in order; the
    /// members the first node names are added after them.
    #[arg(long, env = "FERROCOTTA_NODES")]
    pub nodes: String,
    /// Tried when every node of the cluster failed.
    #[arg(long)]
    pub retry_server: Option<String>,
    /// Run under guaranteed delivery: start a transaction (or continue `--tid`) and resubmit it
    /// until it is done or its ttl or retries run out.
    #[arg(long)]
    pub gd: bool,
    /// Continue this transaction (with --gd).
    #[arg(long, requires = "gd")]
    pub tid: Option<String>,
    /// The transaction's ttl (with --gd) [default: the node's gd_ttl].
    #[arg(long, requires = "gd")]
    pub ttl: Option<String>,
    /// Attempts allowed (with --gd; 0: no limit).
    #[arg(long, requires = "gd")]
    pub retries: Option<u32>,
    /// The transaction's hash tag (with --gd): the tag every effect key carries.
    #[arg(long, requires = "gd")]
    pub tag: Option<String>,
    /// Deadline of one request to one node.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// How long to go on resubmitting (with --gd) or waiting for a node.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub deadline: Duration,
    /// Use only the given nodes; do not learn the other members.
    #[arg(long)]
    pub no_discover: bool,
    /// The CA that signed the nodes' certificates: speak https.
    #[arg(long, env = "FERROCOTTA_TLS_CA_FILE")]
    pub tls_ca_file: Option<PathBuf>,
    /// The service (`folder:service`).
    pub service: String,
    /// Its input, a JSON object [default: {}].
    pub input: Option<String>,
}

/// Runs `ferrocotta invoke`; the exit code.
pub async fn run(a: InvokeArgs) -> anyhow::Result<u8> {
    let input: Value = match &a.input {
        Some(text) => serde_json::from_str(text).context("the input is not JSON")?,
        None => json!({}),
    };
    let mut settings = NodeClientSettings::new(&a.nodes)?;
    settings.retry_server = a.retry_server.clone();
    settings.request_timeout = a.timeout;
    settings.discover = !a.no_discover;
    if let Some(ca_file) = &a.tls_ca_file {
        settings.tls = Some(ferrocotta::tls::ClientTls::load(
            "ferrocotta invoke",
            ferrocotta::tls::TlsFiles {
                cert_file: None,
                key_file: None,
                ca_file: ca_file.clone(),
            },
        )?);
    }
    let client = NodeClient::connect(settings).await;
    let result = if a.gd {
        let mut start = json!({});
        if let Some(t) = &a.ttl {
            start["ttl"] = json!(t);
        }
        if let Some(r) = a.retries {
            start["retries"] = json!(r);
        }
        if let Some(t) = &a.tag {
            start["tag"] = json!(t);
        }
        client
            .invoke_gd(&a.service, &input, a.tid.clone(), &start, a.deadline)
            .await
            .map(|(tid, answer)| {
                json!({"tid": tid, "node": answer.node, "state": answer.value["state"],
                       "attempts": answer.value["attempts"], "result": answer.value["result"]})
            })
    } else {
        client
            .invoke(&a.service, &input)
            .await
            .map(|answer| json!({"node": answer.node, "result": answer.value}))
    };
    match result {
        Ok(v) => {
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(0)
        }
        Err(NodeClientError::NoNode(failures)) => {
            for (addr, why) in &failures {
                eprintln!("{addr}: {why}");
            }
            eprintln!("no node could serve {} ({} tried)", a.service, failures.len());
            Ok(EXIT_NO_NODE)
        }
        Err(NodeClientError::Service {
            node,
            status,
            code,
            message,
        }) => {
            println!(
                "{}",
                serde_json::to_string_pretty(
                    &json!({"error": {"node": node, "status": status, "code": code, "message": message}})
                )?
            );
            Ok(if a.gd && matches!(code.as_str(), "expired" | "ended" | "in_doubt") {
                EXIT_GD_OVER
            } else {
                1
            })
        }
        Err(e @ NodeClientError::Usage(_)) => Err(e.into()),
    }
}
