//! `demo:checkpointed`: a multi-step job that checkpoints after each step in the array and, run
//! again on any node after a crash, resumes from its last checkpoint (the seed's checkpoint
//! restart).
//!
//! Input: `{"jobId": "...", "steps": N, "stepMillis": M, "checkpoint": true}`; with `"checkpoint":
//! false` it keeps no checkpoint and starts at the beginning every time (the seed's "other
//! services"). The checkpoint (`{"completed", "nodes"}`)
//! lives in `ferrocotta.node.checkpoints.<cluster>` under the job id.

use std::time::Duration;

use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{Registry, ServiceError};
use crate::node::Node;

/// Steps a job may ask for.
pub const STEPS_MAX: u64 = 10_000;

/// Longest a step may take.
pub const STEP_MILLIS_MAX: u64 = 60_000;

/// A job's progress as stored in the array.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Checkpoint {
    /// Steps done.
    completed: u64,
    /// Nodes that ran a step, in the order they first did.
    nodes: Vec<String>,
}

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
        .min(STEP_MILLIS_MAX);
    let keep = input.get("checkpoint").and_then(Value::as_bool).unwrap_or(true);
    let cache = node.settings.checkpoints_cache();
    let stored = if keep {
        node.backend.get(&cache, job.as_bytes()).await?
    } else {
        None
    };
    let mut checkpoint = match stored {
        // A document that is not a checkpoint is someone else's data: never overwrite it, and
        // never restart a job from zero because its progress could not be read.
        Some(b) => serde_json::from_slice::<Checkpoint>(&b).map_err(|e| {
            tracing::warn!(event = "node.job_checkpoint_unreadable", job, error = %e);
            ServiceError::new(
                StatusCode::CONFLICT,
                "bad_checkpoint",
                format!("the array holds a document for job `{job}` that is not a checkpoint ({e}); remove it or use another jobId"),
            )
        })?,
        None => Checkpoint::default(),
    };
    let resumed_from = checkpoint.completed;
    if resumed_from > 0 && resumed_from < steps {
        tracing::info!(event = "node.job_resumed", job, resumed_from);
    }
    for step in resumed_from..steps {
        // The work of one step.
        tokio::time::sleep(Duration::from_millis(step_ms)).await;
        checkpoint.completed = step + 1;
        if !checkpoint.nodes.contains(&node.logical_name) {
            checkpoint.nodes.push(node.logical_name.clone());
        }
        if keep {
            let bytes = serde_json::to_vec(&checkpoint).expect("a checkpoint always encodes");
            node.backend.put(&cache, job.as_bytes(), &bytes, None).await?;
        }
    }
    Ok(json!({
        "jobId": job,
        "completed": checkpoint.completed,
        "resumedFrom": resumed_from,
        "nodes": checkpoint.nodes,
        "node": node.logical_name,
    }))
}
