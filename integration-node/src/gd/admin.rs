//! `/admin/gd` on the node's admin port (token required): transactions by state, one
//! transaction, and `end` and `restart` by an operator.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use super::{Gd, State as TxnState};
use crate::node::Node;
use crate::services::ServiceError;

/// Transactions listed at most.
pub const LISTED_MAX: usize = 10_000;

fn answer(result: Result<serde_json::Value, ServiceError>) -> Response {
    match result {
        Ok(v) => Json(v).into_response(),
        Err(e) => crate::http::error_response(e),
    }
}

/// The routes; the caller puts them behind the admin token.
pub fn router(node: Arc<Node>) -> Router {
    Router::new()
        .route("/admin/gd", get(list))
        .route("/admin/gd/:tid", get(show))
        .route("/admin/gd/:tid/end", post(end))
        .route("/admin/gd/:tid/restart", post(restart))
        .with_state(node)
}

#[derive(serde::Deserialize)]
struct ListQuery {
    state: Option<String>,
}

async fn list(State(node): State<Arc<Node>>, Query(q): Query<ListQuery>) -> Response {
    answer(
        async {
            let state = match q.state {
                None => None,
                Some(s) => Some(
                    serde_json::from_value::<TxnState>(json!(s))
                        .map_err(|_| ServiceError::bad_request(format!("no state `{s}`")))?,
                ),
            };
            let list = Gd::of(&node)?.list(state, LISTED_MAX).await?;
            Ok(json!({ "transactions": list }))
        }
        .await,
    )
}

async fn show(State(node): State<Arc<Node>>, Path(tid): Path<String>) -> Response {
    answer(
        async {
            let (txn, _) = Gd::of(&node)?.read(&tid).await?;
            Ok(serde_json::to_value(txn).unwrap_or_default())
        }
        .await,
    )
}

async fn end(State(node): State<Arc<Node>>, Path(tid): Path<String>) -> Response {
    answer(async { Ok(super::answer(&Gd::of(&node)?.end(&tid).await?)) }.await)
}

async fn restart(State(node): State<Arc<Node>>, Path(tid): Path<String>) -> Response {
    answer(async { Ok(super::answer(&Gd::of(&node)?.restart(&tid).await?)) }.await)
}
