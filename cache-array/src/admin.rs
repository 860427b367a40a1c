//! Admin HTTP (axum): config, status, health, metrics, and the cluster console (the page `/` and
//! its documents, docs/operations.md "The console").
//!
//! The endpoints that read need no token; nothing here shows a secret (the config document names
//! the files that hold them, never their content). `POST /v1/nodes/{cluster}/{name}/{action}`
//! changes nothing here: it passes the operator's node admin token on to that node, which checks
//! it. The membership changes (`/v1/roster/...`, [`crate::membership`]) need a proof made with the
//! peer secret ([`ferrocotta::protocol::admin_change_proof`]): a server-level act, which no client
//! credential may do. Served by [`ferrocotta::http::serve`] with its bounds, plain or TLS.

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
    /// The digest of this server's cluster.toml, shown by the console.
    pub config_digest: String,
    /// Membership changes of this server's stripe.
    pub changes: Arc<crate::membership::Changes>,
    /// The peer secret, which proves a membership change.
    pub peer_secret: Vec<u8>,
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
    /// The configuration generation of its stripe this server goes by.
    pub generation: u64,
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
        .route("/v1/roster", get(roster))
        .route("/v1/roster/servers", post(add_server))
        .route("/v1/roster/servers/:name", axum::routing::delete(remove_server))
        .route("/v1/roster/hand-over", post(hand_over))
        .route("/v1/slots/:step", post(slot_step))
        // Nothing here takes a large body (a new server's settings at most)...
        .layer(axum::extract::DefaultBodyLimit::max(ADMIN_BODY_BYTES_MAX))
        // ...but a batch of entries of moving slots.
        .route(
            "/v1/slots/import",
            post(slot_import).layer(axum::extract::DefaultBodyLimit::max(SLOT_IMPORT_BODY_MAX)),
        )
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
        generation: s.stripe.roster().generation(),
    }
}

async fn status(State(s): State<Arc<AdminState>>) -> Json<Status> {
    Json(status_of(&s))
}

/// The live configuration document: cluster.toml with this stripe's servers and generation as
/// its roster has them.
async fn config(State(s): State<Arc<AdminState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/toml")],
        s.stripe.roster().document().to_string(),
    )
        .into_response()
}

/// `GET /v1/roster`: the stripe's roster and openraft's view of who votes.
#[derive(Debug, Serialize)]
pub struct RosterView {
    /// Stripe index.
    pub stripe: usize,
    /// The roster's generation as this server has applied it.
    pub generation: u64,
    /// The stripe's servers.
    pub servers: Vec<ferrocotta::config::ServerConfig>,
    /// Servers added and not yet voters.
    pub joining: Vec<String>,
    /// Names of removed servers.
    pub retired: Vec<String>,
    /// Node ids that vote (both sets while a change is joint).
    pub voters: Vec<u64>,
    /// Node ids that only learn.
    pub learners: Vec<u64>,
    /// Whether the membership is joint (a change in progress).
    pub joint: bool,
    /// The slots the stripe owns (frozen ones included).
    pub slots: ferrocotta::slots::SlotSet,
    /// Slots frozen for a move to another stripe.
    pub moving: Vec<crate::roster::SlotMove>,
    /// Slots being imported from another stripe.
    pub importing: Vec<crate::roster::SlotMove>,
    /// The array's layout version as this stripe knows it.
    pub layout: u64,
    /// The active this server knows of.
    pub active: Option<String>,
    /// On the active: the last log index each other server has acknowledged.
    pub matched: std::collections::BTreeMap<String, Option<u64>>,
}

async fn roster(State(s): State<Arc<AdminState>>) -> Json<RosterView> {
    let r = s.stripe.roster().get();
    let m = s.stripe.raft().metrics().borrow().clone();
    let membership = m.membership_config.membership();
    Json(RosterView {
        stripe: s.stripe.position().stripe,
        generation: r.generation,
        servers: r.servers.clone(),
        joining: r.joining.clone(),
        retired: r.retired.clone(),
        voters: membership.voter_ids().collect(),
        learners: membership.learner_ids().collect(),
        joint: membership.get_joint_config().len() > 1,
        slots: r.owned_slots(s.stripe.roster().seed(), s.stripe.position().stripe),
        moving: r.moving.clone(),
        importing: r.importing.clone(),
        layout: r.layout.as_ref().map_or(0, |l| l.version),
        active: m.current_leader.and_then(|id| s.stripe.name_of(id)),
        matched: m
            .replication
            .iter()
            .flatten()
            .map(|(id, l)| {
                (
                    s.stripe.name_of(*id).unwrap_or_else(|| id.to_string()),
                    l.map(|l| l.index),
                )
            })
            .collect(),
    })
}

/// Checks a change's proof (made with the peer secret); the refusal to send otherwise.
fn authorize(s: &AdminState, headers: &HeaderMap, method: &str, path: &str, body: &[u8]) -> Result<(), Response> {
    let header = headers
        .get(ferrocotta::protocol::ADMIN_PROOF_HEADER)
        .and_then(|v| v.to_str().ok());
    ferrocotta::protocol::check_admin_proof(&s.peer_secret, header, method, path, body).map_err(|why| {
        tracing::warn!(event = "admin.change_refused", path, reason = %why);
        error_reply(StatusCode::UNAUTHORIZED, "unauthorized", why)
    })
}

/// A change's answer: what it did as JSON, or why not with the status that says so.
fn change_reply(result: Result<impl Serialize, crate::membership::ChangeError>) -> Response {
    match result {
        Ok(outcome) => Json(outcome).into_response(),
        Err(e) => change_error(e),
    }
}

fn change_error(e: crate::membership::ChangeError) -> Response {
    use crate::membership::ChangeError;
    match e {
        ChangeError::NotActive { active } => (
            StatusCode::CONFLICT,
            Json(serde_json::json!({"error": {"code": "not_active", "active": active,
                "message": format!("not the active of the stripe; the active is {}", active.as_deref().unwrap_or("unknown"))}})),
        )
            .into_response(),
        e @ ChangeError::Invalid(_) => error_reply(StatusCode::BAD_REQUEST, "invalid", e.to_string()),
        e @ ChangeError::Unavailable(_) => error_reply(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e.to_string()),
    }
}

async fn add_server(State(s): State<Arc<AdminState>>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    if let Err(r) = authorize(&s, &headers, "POST", "/v1/roster/servers", &body) {
        return r;
    }
    let server: ferrocotta::config::ServerConfig = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return error_reply(
                StatusCode::BAD_REQUEST,
                "invalid",
                format!("not a server's settings: {e}"),
            )
        }
    };
    change_reply(s.changes.add(server).await)
}

async fn remove_server(State(s): State<Arc<AdminState>>, headers: HeaderMap, Path(name): Path<String>) -> Response {
    let path = format!("/v1/roster/servers/{name}");
    if let Err(r) = authorize(&s, &headers, "DELETE", &path, b"") {
        return r;
    }
    change_reply(s.changes.remove(&name).await)
}

async fn hand_over(State(s): State<Arc<AdminState>>, headers: HeaderMap) -> Response {
    if let Err(r) = authorize(&s, &headers, "POST", "/v1/roster/hand-over", b"") {
        return r;
    }
    let me = s.stripe.name().to_string();
    let result = match s.changes.hand_over_if_active().await {
        Ok(to) => Ok(crate::membership::ChangeOutcome {
            server: me,
            id: s.stripe.position().node_id(),
            generation: s.stripe.roster().generation(),
            message: format!("handed over to {to}"),
        }),
        Err(e) => Err(e),
    };
    change_reply(result)
}

/// Largest batch of entries `POST /v1/slots/import` takes (`ferrocotta array rebalance` sends
/// smaller ones).
pub const SLOT_IMPORT_BODY_MAX: usize = 64 << 20;

/// `POST /v1/slots/{freeze|unfreeze|begin-import|abandon-import|own|release|layout|export}`: the
/// steps of a slot move (`crate::slot_moves`), proved with the peer secret. The body is JSON (a
/// `SlotStep`, or a `Layout`); `export` answers the frozen slots' entries, postcard-encoded.
async fn slot_step(
    State(s): State<Arc<AdminState>>,
    Path(step): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let path = format!("/v1/slots/{step}");
    if let Err(r) = authorize(&s, &headers, "POST", &path, &body) {
        return r;
    }
    let bad = |e: serde_json::Error| error_reply(StatusCode::BAD_REQUEST, "invalid", format!("not a slot step: {e}"));
    if step == "layout" {
        return match serde_json::from_slice(&body) {
            Ok(layout) => change_reply(s.changes.set_layout(layout).await),
            Err(e) => bad(e),
        };
    }
    let parsed: crate::slot_moves::SlotStep = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return bad(e),
    };
    let c = &s.changes;
    match step.as_str() {
        "freeze" => change_reply(c.freeze(parsed).await),
        "unfreeze" => change_reply(c.unfreeze(parsed).await),
        "begin-import" => change_reply(c.begin_import(parsed).await),
        "abandon-import" => change_reply(c.abandon_import(parsed).await),
        "own" => change_reply(c.own(parsed).await),
        "release" => change_reply(c.release(parsed).await),
        "export" => match c.export(&parsed.slots) {
            Ok(import) => match postcard::to_allocvec(&import) {
                Ok(bytes) => ([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response(),
                Err(e) => error_reply(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
            },
            Err(e) => change_error(e),
        },
        _ => error_reply(StatusCode::NOT_FOUND, "unknown_step", format!("no slot step `{step}`")),
    }
}

/// `POST /v1/slots/import`: one batch of entries (postcard), proved with the peer secret.
async fn slot_import(State(s): State<Arc<AdminState>>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    if let Err(r) = authorize(&s, &headers, "POST", "/v1/slots/import", &body) {
        return r;
    }
    match postcard::from_bytes::<crate::slot_moves::SlotImport>(&body) {
        Ok(batch) => change_reply(s.changes.import(batch).await),
        Err(e) => error_reply(
            StatusCode::BAD_REQUEST,
            "invalid",
            format!("not a batch of entries: {e}"),
        ),
    }
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
