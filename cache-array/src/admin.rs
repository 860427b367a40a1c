//! Admin HTTP (axum): config, status, health, metrics, and the cluster console (the page `/` and
//! its documents, docs/operations.md "The console").
//!
//! Every endpoint here only reads and none needs a token; nothing here shows a secret (the config
//! document names the files that hold them, never their content). The one that changes state,
//! `POST /v1/nodes/{cluster}/{name}/{action}`, changes nothing here: it passes the operator's
//! node admin token on to that node, which checks it. Served by [`ferrocotta::http::serve`] with
//! its bounds, plain or TLS.

use std::fmt::Write;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use axum::extract::Path;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;

use ferrocotta::tls::ClientTls;

use crate::console::{NodeAction, NodeActionError, Recorder};
use crate::log_store::FlushStats;
use crate::metrics::Metrics;
use crate::stripe::Stripe;

/// Largest request body the admin port reads (its endpoints take none).
pub const ADMIN_BODY_BYTES_MAX: usize = 4096;

/// What the admin endpoints read.
pub struct AdminState {
    /// This server's stripe membership.
    pub stripe: Arc<Stripe>,
    /// Request counters.
    pub metrics: Arc<Metrics>,
    /// Group-commit counters.
    pub flush_stats: Arc<FlushStats>,
    /// The config document as served to clients.
    pub config_toml: String,
    /// Its digest, shown by the console.
    pub config_digest: String,
    /// The console's samples and events.
    pub recorder: Arc<Recorder>,
    /// TLS towards the other servers' admin ports and the nodes' (None: plain HTTP).
    pub peer_tls: Option<Arc<ClientTls>>,
    /// The last gathered view of the array and when it was gathered: however many pages ask,
    /// a server gathers at most once per [`GATHERED_FRESH_FOR`] (callers wait for the one in
    /// progress rather than start their own).
    pub gathered: tokio::sync::Mutex<Option<(std::time::Instant, ferrocotta::console::ArrayView)>>,
}

/// How long a gathered view is served again.
pub const GATHERED_FRESH_FOR: std::time::Duration = std::time::Duration::from_secs(1);

/// `GET /v1/status`.
#[derive(Debug, Serialize)]
pub struct Status {
    /// Server name.
    pub name: String,
    /// Stripe index.
    pub stripe: usize,
    /// Stripe name.
    pub stripe_name: String,
    /// `active` or `mirror`.
    pub role: String,
    /// openraft's state (Leader, Follower, Candidate).
    pub raft_state: String,
    /// Current term.
    pub term: u64,
    /// Name of the active known to this server.
    pub leader: Option<String>,
    /// Last log index.
    pub last_log_index: u64,
    /// Last applied index.
    pub applied_index: u64,
    /// Index covered by the last snapshot.
    pub snapshot_index: Option<u64>,
    /// Last purged log index.
    pub purged_index: Option<u64>,
    /// Client connections open now.
    pub client_connections: u64,
    /// Entry count by cache (expired entries count until the sweep removes them).
    pub caches: std::collections::BTreeMap<String, u64>,
    /// Live client sessions on this stripe.
    pub client_sessions: u64,
    /// Locks held or waited for on this stripe.
    pub locks: u64,
    /// fsyncs of the log so far.
    pub log_flushes: u64,
    /// Appends and votes those fsyncs covered.
    pub log_flush_waiters: u64,
}

/// The admin router.
pub fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/", get(console_page))
        .route("/healthz", get(healthz))
        .route("/livez", get(|| async { "ok\n" }))
        .route("/v1/console", get(console))
        .route("/v1/console/local", get(console_local))
        .route("/v1/nodes/:cluster/:name/:action", post(node_action))
        .route("/metrics", get(metrics))
        .route("/v1/config", get(config))
        .route("/v1/status", get(status))
        // Nothing here takes a body.
        .layer(axum::extract::DefaultBodyLimit::max(ADMIN_BODY_BYTES_MAX))
        .with_state(state)
}

fn status_of(s: &AdminState) -> Status {
    let m = s.stripe.snapshot_metrics();
    let pos = s.stripe.position();
    Status {
        name: s.stripe.name().to_string(),
        stripe: pos.stripe,
        stripe_name: s.stripe.config().stripes[pos.stripe].name.clone(),
        role: match m.role {
            ferrocotta::protocol::Role::Active => "active".into(),
            ferrocotta::protocol::Role::Mirror => "mirror".into(),
        },
        raft_state: m.state,
        term: m.term,
        leader: m.leader,
        last_log_index: m.last_log_index,
        applied_index: m.applied_index,
        snapshot_index: m.snapshot_index,
        purged_index: m.purged_index,
        client_connections: s.metrics.client_connections.load(Relaxed),
        caches: s.stripe.shared().read(|d| d.store.entry_counts()),
        client_sessions: s.stripe.shared().read(|d| d.store.sessions.len() as u64),
        locks: s.stripe.shared().read(|d| d.store.locks.len() as u64),
        log_flushes: s.flush_stats.flushes.load(Relaxed),
        log_flush_waiters: s.flush_stats.waiters.load(Relaxed),
    }
}

async fn status(State(s): State<Arc<AdminState>>) -> Json<Status> {
    Json(status_of(&s))
}

async fn config(State(s): State<Arc<AdminState>>) -> Response {
    ([(header::CONTENT_TYPE, "application/toml")], s.config_toml.clone()).into_response()
}

/// Ready: this server's Raft runs and its stripe has an active it knows (itself or a peer). A
/// mirror catching up is ready as soon as it knows the active; `/livez` only says the process
/// answers (for a liveness probe that must not restart a mirror in a long catch-up).
async fn healthz(State(s): State<Arc<AdminState>>) -> Response {
    let (running, leader, term) = {
        let m = s.stripe.raft().metrics();
        let m = m.borrow();
        (m.running_state.is_ok(), m.current_leader, m.current_term)
    };
    match (running, leader.and_then(|id| s.stripe.name_of(id))) {
        (false, _) => (StatusCode::SERVICE_UNAVAILABLE, "raft stopped\n").into_response(),
        (true, None) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("no active known in term {term}\n"),
        )
            .into_response(),
        (true, Some(active)) => (StatusCode::OK, format!("ok: active {active}, term {term}\n")).into_response(),
    }
}

fn local(s: &AdminState) -> ferrocotta::console::ServerView {
    crate::console::local_view(&s.stripe, &s.recorder, &s.metrics, &s.config_digest)
}

async fn console_local(State(s): State<Arc<AdminState>>) -> Response {
    Json(local(&s)).into_response()
}

/// Every server's view, gathered at most once per [`GATHERED_FRESH_FOR`].
async fn gathered(s: &AdminState) -> ferrocotta::console::ArrayView {
    let mut last = s.gathered.lock().await;
    if let Some((at, view)) = last.as_ref() {
        if at.elapsed() < GATHERED_FRESH_FOR {
            return view.clone();
        }
    }
    let view = crate::console::gather(&s.stripe, local(s), s.peer_tls.clone()).await;
    *last = Some((std::time::Instant::now(), view.clone()));
    view
}

async fn console(State(s): State<Arc<AdminState>>) -> Response {
    Json(gathered(&s).await).into_response()
}

/// `POST /v1/nodes/{cluster}/{name}/{offline|online|clear}` with the node's admin token
/// (`Authorization: Bearer ...`): passed on to that node; its answer comes back as it gave it.
async fn node_action(
    State(s): State<Arc<AdminState>>,
    Path((cluster, name, action)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let Some(action) = NodeAction::parse(&action) else {
        return error_reply(
            StatusCode::NOT_FOUND,
            "unknown_action",
            format!("no action `{action}`: offline, online or clear"),
        );
    };
    let Some(token) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .filter(|t| !t.is_empty())
    else {
        return error_reply(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the node's admin token is missing (Authorization: Bearer ...)".into(),
        );
    };
    let view = gathered(&s).await;
    let result = crate::console::node_action(&view, &cluster, &name, action, token, s.peer_tls.as_deref()).await;
    match result {
        Ok(answer) => {
            tracing::info!(event = "console.node_action", cluster = %cluster, node = %name, action = ?action, status = answer.status);
            match (answer.status, answer.error) {
                (200..=299, _) => Json(serde_json::json!({"done": action.name(), "node": name})).into_response(),
                // The node refused (a wrong token, most often): its status and error, nothing more.
                (code @ 400..=499, error) => {
                    let (code_text, message) = error.unwrap_or_default();
                    error_reply(
                        StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST),
                        &format!("node_{code_text}"),
                        format!("node {name} refused: {message}"),
                    )
                }
                (code, _) => error_reply(
                    StatusCode::BAD_GATEWAY,
                    "node_failed",
                    format!("node {name} answered HTTP {code}"),
                ),
            }
        }
        Err(e) => {
            tracing::warn!(event = "console.node_action_failed", cluster = %cluster, node = %name, action = ?action, error = %e);
            let status = match e {
                NodeActionError::UnknownNode { .. } => StatusCode::NOT_FOUND,
                NodeActionError::NoAdminAddress(_) | NodeActionError::Unreachable(_) => StatusCode::BAD_GATEWAY,
            };
            error_reply(status, "node_action_failed", e.to_string())
        }
    }
}

fn error_reply(status: StatusCode, code: &str, message: String) -> Response {
    (
        status,
        Json(serde_json::json!({"error": {"code": code, "message": message}})),
    )
        .into_response()
}

/// The console page: one document with its styles and script, nothing fetched from elsewhere.
const CONSOLE_HTML: &str = include_str!("console.html");

async fn console_page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        CONSOLE_HTML,
    )
        .into_response()
}

async fn metrics(State(s): State<Arc<AdminState>>) -> Response {
    let st = status_of(&s);
    let mut out = String::new();
    s.metrics.render(&mut out);
    let labels = format!("server=\"{}\",stripe=\"{}\"", label_value(&st.name), st.stripe);
    let _ = writeln!(out, "# TYPE ferrocotta_raft_term gauge");
    let _ = writeln!(out, "ferrocotta_raft_term{{{labels}}} {}", st.term);
    let _ = writeln!(out, "# TYPE ferrocotta_raft_is_active gauge");
    let _ = writeln!(
        out,
        "ferrocotta_raft_is_active{{{labels}}} {}",
        (st.role == "active") as u8
    );
    let _ = writeln!(out, "# TYPE ferrocotta_raft_last_log_index gauge");
    let _ = writeln!(out, "ferrocotta_raft_last_log_index{{{labels}}} {}", st.last_log_index);
    let _ = writeln!(out, "# TYPE ferrocotta_raft_applied_index gauge");
    let _ = writeln!(out, "ferrocotta_raft_applied_index{{{labels}}} {}", st.applied_index);
    let _ = writeln!(out, "# TYPE ferrocotta_log_flushes_total counter");
    let _ = writeln!(out, "ferrocotta_log_flushes_total{{{labels}}} {}", st.log_flushes);
    let _ = writeln!(out, "# TYPE ferrocotta_log_flush_waiters_total counter");
    let _ = writeln!(
        out,
        "ferrocotta_log_flush_waiters_total{{{labels}}} {}",
        st.log_flush_waiters
    );
    let _ = writeln!(out, "# TYPE ferrocotta_cache_entries gauge");
    for (cache, n) in &st.caches {
        let _ = writeln!(
            out,
            "ferrocotta_cache_entries{{{labels},cache=\"{}\"}} {n}",
            label_value(cache)
        );
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

/// A label value escaped as the Prometheus text format requires (backslash, double quote and
/// newline), so no name can end a line or forge another metric.
pub fn label_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_cannot_break_a_line() {
        assert_eq!(label_value("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        assert!(!label_value("x\nferrocotta_forged 1").contains('\n'));
    }
}
