//! `/admin/jobs` on the node's admin port (token required): list, create, show, change, suspend,
//! resume and delete jobs, and read their runs. Any node serves every job of its cluster.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use super::model::{JobSpec, JobState};
use super::Jobs;
use crate::services::ServiceError;

/// Largest body of a job's create or change (its input is at most
/// [`super::model::JOB_INPUT_BYTES_MAX`]).
pub const JOB_BODY_BYTES_MAX: usize = 64 * 1024;

fn answer(result: Result<serde_json::Value, ServiceError>) -> Response {
    match result {
        Ok(v) => Json(v).into_response(),
        Err(e) => crate::http::error_response(e),
    }
}

fn parse(body: &str) -> Result<JobSpec, ServiceError> {
    serde_json::from_str(body).map_err(|e| ServiceError::bad_request(format!("not a job: {e}")))
}

/// The routes; the caller puts them behind the admin token.
pub fn router(jobs: Arc<Jobs>) -> Router {
    Router::new()
        .route("/admin/jobs", get(list).post(create))
        .route("/admin/jobs/:id", get(show).put(change).delete(delete))
        .route("/admin/jobs/:id/suspend", post(suspend))
        .route("/admin/jobs/:id/resume", post(resume))
        .route("/admin/jobs/:id/runs", get(runs))
        .layer(axum::extract::DefaultBodyLimit::max(JOB_BODY_BYTES_MAX))
        .with_state(jobs)
}

async fn list(State(jobs): State<Arc<Jobs>>) -> Response {
    answer(jobs.list().await.map(|l| json!({ "jobs": l })))
}

async fn create(State(jobs): State<Arc<Jobs>>, body: String) -> Response {
    let result = async {
        let job = jobs.create(parse(&body)?, true).await?;
        Ok::<_, ServiceError>(json!({ "job": job }))
    }
    .await;
    match result {
        Ok(v) => (StatusCode::CREATED, Json(v)).into_response(),
        Err(e) => crate::http::error_response(e),
    }
}

async fn show(State(jobs): State<Arc<Jobs>>, Path(id): Path<String>) -> Response {
    answer(jobs.status(&id).await)
}

async fn change(State(jobs): State<Arc<Jobs>>, Path(id): Path<String>, body: String) -> Response {
    answer(
        async {
            let job = jobs.update(&id, parse(&body)?).await?;
            Ok(json!({ "job": job }))
        }
        .await,
    )
}

async fn delete(State(jobs): State<Arc<Jobs>>, Path(id): Path<String>) -> Response {
    answer(jobs.delete(&id).await.map(|()| json!({ "deleted": id })))
}

async fn suspend(State(jobs): State<Arc<Jobs>>, Path(id): Path<String>) -> Response {
    answer(
        jobs.set_state(&id, JobState::Suspended)
            .await
            .map(|j| json!({ "job": j })),
    )
}

async fn resume(State(jobs): State<Arc<Jobs>>, Path(id): Path<String>) -> Response {
    answer(jobs.set_state(&id, JobState::Active).await.map(|j| json!({ "job": j })))
}

async fn runs(State(jobs): State<Arc<Jobs>>, Path(id): Path<String>) -> Response {
    answer(jobs.runs(&id).await.map(|r| json!({ "runs": r })))
}
