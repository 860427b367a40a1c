//! Admin HTTP (axum): config, status, health, metrics and a small dashboard.
//!
//! Every endpoint here only reads and none needs a token; nothing here shows a secret (the config
//! document names the files that hold them, never their content). Served by
//! [`ferrocotta::http::serve`] with its bounds, plain or TLS.

use std::fmt::Write;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

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
}

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
        .route("/", get(dashboard))
        .route("/healthz", get(healthz))
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

async fn healthz(State(s): State<Arc<AdminState>>) -> Response {
    let running = s.stripe.raft().metrics().borrow().running_state.is_ok();
    if running {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "raft stopped\n").into_response()
    }
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

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

async fn dashboard(State(s): State<Arc<AdminState>>) -> Html<String> {
    let st = status_of(&s);
    let mut rows = String::new();
    for (cache, n) in &st.caches {
        let _ = write!(rows, "<tr><td>{}</td><td>{n}</td></tr>", escape(cache));
    }
    Html(format!(
        "<!doctype html><html><head><meta charset=utf-8><title>ferrocotta {name}</title>\
         <meta http-equiv=refresh content=2>\
         <style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:2px 12px;text-align:left}}</style></head><body>\
         <h1>array server {name}</h1>\
         <table><tr><th>stripe</th><td>{stripe} ({stripe_name})</td></tr>\
         <tr><th>role</th><td>{role}</td></tr><tr><th>term</th><td>{term}</td></tr>\
         <tr><th>active</th><td>{leader}</td></tr>\
         <tr><th>last log index</th><td>{last}</td></tr><tr><th>applied index</th><td>{applied}</td></tr>\
         <tr><th>client connections</th><td>{conns}</td></tr></table>\
         <h2>caches</h2><table><tr><th>cache</th><th>entries</th></tr>{rows}</table>\
         <p><a href=/v1/status>status</a> · <a href=/v1/config>config</a> · <a href=/metrics>metrics</a></p>\
         </body></html>",
        name = escape(&st.name),
        stripe = st.stripe,
        stripe_name = escape(&st.stripe_name),
        role = st.role,
        term = st.term,
        leader = escape(st.leader.as_deref().unwrap_or("none")),
        last = st.last_log_index,
        applied = st.applied_index,
        conns = st.client_connections,
    ))
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
