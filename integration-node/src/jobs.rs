//! `demo:checkpointed`: a multi-step job that checkpoints after each step in the array and, run
//! again on any node after a crash, resumes from its last checkpoint (the seed's checkpoint
//! restart).
//!
//! Input: `{"jobId": "...", "steps": N, "stepMillis": M}`. The checkpoint (`{"completed", "nodes"}`)
//! lives in `ferrocotta.node.checkpoints.<cluster>` under the job id.

use std::time::Duration;

use serde_json::{json, Value};

use crate::node::Node;
use crate::services::{Registry, ServiceError};

/// Steps a job may ask for.
pub const STEPS_MAX: u64 = 10_000;

/// Registers `demo:checkpointed`.
pub fn register(r: &mut Registry) {
    r.register("demo:checkpointed", |node, _, input| Box::pin(run(node, input)));
}

async fn run(node: &Node, input: Value) -> Result<Value, ServiceError> {
    let job = input
        .get("jobId")
        .and_then(Value::as_str)
        .ok_or_else(|| ServiceError::bad_request("the input needs a string `jobId`"))?;
    let steps = input.get("steps").and_then(Value::as_u64).unwrap_or(5).min(STEPS_MAX);
    let step_ms = input
        .get("stepMillis")
        .and_then(Value::as_u64)
        .unwrap_or(100)
        .min(60_000);
    let cache = node.settings.checkpoints_cache();
    let mut checkpoint: Value = match node.get(&cache, job.as_bytes()).await? {
        Some(b) => serde_json::from_slice(&b).unwrap_or_else(|_| json!({"completed": 0, "nodes": []})),
        None => json!({"completed": 0, "nodes": []}),
    };
    let resumed_from = checkpoint["completed"].as_u64().unwrap_or(0);
    if resumed_from > 0 && resumed_from < steps {
        tracing::info!(event = "node.job_resumed", job, resumed_from);
    }
    for step in resumed_from..steps {
        // The work of one step.
        tokio::time::sleep(Duration::from_millis(step_ms)).await;
        checkpoint["completed"] = json!(step + 1);
        let nodes = checkpoint["nodes"].as_array_mut().expect("nodes is an array");
        if !nodes.iter().any(|n| n == node.logical_name.as_str()) {
            nodes.push(json!(node.logical_name));
        }
        let bytes = serde_json::to_vec(&checkpoint).expect("json");
        node.put(&cache, job.as_bytes(), &bytes, None).await?;
    }
    Ok(json!({
        "jobId": job,
        "completed": checkpoint["completed"],
        "resumedFrom": resumed_from,
        "nodes": checkpoint["nodes"],
        "node": node.logical_name,
    }))
}
