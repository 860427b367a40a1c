//! The node's HTTP: the service port (`POST /invoke/{folder}:{service}`, the `ssnid` cookie) and
//! the admin port (status, member list, offline/online, metrics, the page), both behind the admin
//! token where they must be.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde_json::{json, Value};

use crate::node::Node;
use crate::services::{new_session_id, with_session_cookie, Registry, ServiceError, SessionCookie};

/// Largest request body the service port reads.
pub const REQUEST_BODY_BYTES_MAX: usize = 1024 * 1024;

/// Largest request body the admin port reads (its endpoints take none).
pub const ADMIN_BODY_BYTES_MAX: usize = 4096;

/// Longest session id taken from a cookie (anything else, or other characters than ASCII letters
/// and digits, counts as no cookie).
pub const SESSION_ID_BYTES_MAX: usize = 64;

pub(crate) fn error_response(e: ServiceError) -> Response {
    (e.status, Json(json!({"error": {"code": e.code, "message": e.message}}))).into_response()
}

/// The service port router.
pub fn service_router(node: Arc<Node>, registry: Arc<Registry>) -> Router {
    Router::new()
        .route("/invoke/:service", post(invoke))
        .layer(axum::extract::DefaultBodyLimit::max(REQUEST_BODY_BYTES_MAX))
        .with_state(ServicePort { node, registry })
}

/// What the service port's handlers reach: the node and its services.
#[derive(Clone)]
struct ServicePort {
    node: Arc<Node>,
    registry: Arc<Registry>,
}

fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == "ssnid")
        .map(|(_, v)| v.to_string())
        .filter(|v| !v.is_empty() && v.len() <= SESSION_ID_BYTES_MAX && v.chars().all(|c| c.is_ascii_alphanumeric()))
}

async fn invoke(
    State(ServicePort { node, registry }): State<ServicePort>,
    Path(service): Path<String>,
    headers: HeaderMap,
    body: String,
) -> Response {
    node.requests.fetch_add(1, Ordering::Relaxed);
    if !node.online.load(Ordering::Relaxed) {
        return error_response(ServiceError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "offline",
            "the node is offline",
        ));
    }
    if let Err(e) = crate::services::check_service_name(&service) {
        return error_response(e);
    }
    if registry.is_administrative(&service) && !authorized(&node, &headers) {
        return error_response(ServiceError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "an administrative service: the admin token is missing or wrong",
        ));
    }
    let input: Value = if body.trim().is_empty() {
        json!({})
    } else {
        match serde_json::from_str(&body) {
            Ok(v) => v,
            Err(e) => return error_response(ServiceError::bad_request(format!("the body is not JSON: {e}"))),
        }
    };
    let cookie = match session_cookie(&headers) {
        Some(id) => SessionCookie { id, issued: false },
        None => SessionCookie {
            id: new_session_id(),
            issued: true,
        },
    };
    let ssnid = cookie.id.clone();
    let (result, cookie) = with_session_cookie(cookie, registry.call(&node, &service, &ssnid, input)).await;
    let mut response = match result {
        Ok(v) => Json(v).into_response(),
        Err(e) => error_response(e),
    };
    if cookie.issued {
        let secure = if node.tls.is_some() { "; Secure" } else { "" };
        if let Ok(v) = format!("ssnid={}; Path=/; HttpOnly; SameSite=Lax{secure}", cookie.id).parse() {
            response.headers_mut().insert(header::SET_COOKIE, v);
        }
    }
    response
}

fn authorized(node: &Node, headers: &HeaderMap) -> bool {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| headers.get("x-admin-token").and_then(|v| v.to_str().ok()));
    given.is_some_and(|g| ferrocotta::security::constant_time_eq(g.as_bytes(), node.settings.admin_token.as_bytes()))
}

fn unauthorized() -> Response {
    error_response(ServiceError::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "the admin token is missing or wrong",
    ))
}

/// Refuses a request to a protected admin route without the right token.
async fn require_token(
    State(node): State<Arc<Node>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if !authorized(&node, request.headers()) {
        return unauthorized();
    }
    next.run(request).await
}

/// The admin port router. The rule of every admin port (the array's too): what only reads
/// counts and what public services already show (`/healthz`, `/metrics`, the page `/`, whose
/// member list is `wm.server.cluster:getMembers`' without admin addresses) needs no token, so a
/// browser and a Prometheus scraper can open them; the JSON admin API and every action need it.
pub fn admin_router(node: Arc<Node>, jobs: Arc<crate::jobs::Jobs>) -> Router {
    let jobs_routes = crate::jobs::admin::router(jobs.clone())
        .merge(crate::gd::admin::router(node.clone()))
        .route_layer(axum::middleware::from_fn_with_state(node.clone(), require_token));
    Router::new()
        .route("/admin/status", get(status))
        .route("/admin/cluster", get(cluster))
        .route("/admin/cluster/clear", post(clear))
        .route("/admin/offline", post(offline))
        .route("/admin/online", post(online))
        .route_layer(axum::middleware::from_fn_with_state(node.clone(), require_token))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/", get(page))
        .layer(axum::extract::DefaultBodyLimit::max(ADMIN_BODY_BYTES_MAX))
        .layer(axum::Extension(jobs))
        .with_state(node)
        .merge(jobs_routes)
}

fn status_of(node: &Node) -> Value {
    json!({
        "logical_name": node.logical_name,
        "cluster_name": node.settings.cluster_name,
        "effective_cluster_name": node.settings.effective_cluster_name,
        "state": node.backend.array_state(),
        "online": node.online.load(Ordering::Relaxed),
        "rejoins": node.rejoins.load(Ordering::Relaxed),
        "service": node.service_addr,
        "admin": node.admin_addr,
        "array_urls": node.settings.array_urls,
        "requests": node.requests.load(Ordering::Relaxed),
    })
}

/// Ready: online and with the array (or stand-alone); 503 with the reason otherwise. `/healthz`
/// only says the process answers.
async fn readyz(State(node): State<Arc<Node>>) -> Response {
    if node.ready() {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        let why = if node.online.load(Ordering::Relaxed) {
            format!("array {}\n", node.backend.array_state())
        } else {
            "offline\n".to_string()
        };
        (StatusCode::SERVICE_UNAVAILABLE, why).into_response()
    }
}

async fn status(State(node): State<Arc<Node>>) -> Response {
    Json(status_of(&node)).into_response()
}

async fn cluster(State(node): State<Arc<Node>>) -> Response {
    Json(json!({ "members": node.members().await })).into_response()
}

async fn clear(State(node): State<Arc<Node>>) -> Response {
    match crate::services::clear_members(&node).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => error_response(e),
    }
}

async fn offline(State(node): State<Arc<Node>>) -> Response {
    set_online(&node, false).await;
    Json(status_of(&node)).into_response()
}

async fn online(State(node): State<Arc<Node>>) -> Response {
    set_online(&node, true).await;
    Json(status_of(&node)).into_response()
}

/// Opens or closes the service port (the service loop follows `online`), and says so in the
/// member list at once (if the array cannot be told now, the member refresh tells it later).
async fn set_online(node: &Node, online: bool) {
    node.online.store(online, Ordering::Relaxed);
    node.online_changed.notify_waiters();
    node.event(
        if online { "online" } else { "offline" },
        format!(
            "service port {} by the admin",
            if online { "reopened" } else { "closed" }
        ),
    );
    tracing::info!(
        event = if online { "node.online" } else { "node.offline" },
        "service port {} by the admin",
        if online { "reopened" } else { "closed" }
    );
    if let Err(e) = node.register().await {
        tracing::warn!(event = "node.member_register_failed", error = %e);
    }
}

async fn metrics(State(node): State<Arc<Node>>, Extension(jobs): Extension<Arc<crate::jobs::Jobs>>) -> Response {
    let s = status_of(&node);
    let mut text = format!(
        "# TYPE ferrocotta_node_requests_total counter\nferrocotta_node_requests_total {}\n\
         # TYPE ferrocotta_node_rejoins_total counter\nferrocotta_node_rejoins_total {}\n\
         # TYPE ferrocotta_node_connected gauge\nferrocotta_node_connected {}\n",
        s["requests"],
        s["rejoins"],
        (s["state"] == "connected") as u8
    );
    text.push_str(&jobs.metrics.prometheus());
    text.push_str(&node.gd_metrics.prometheus());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn page(State(node): State<Arc<Node>>, Extension(jobs): Extension<Arc<crate::jobs::Jobs>>) -> Response {
    let s = status_of(&node);
    let job_rows = job_rows(&jobs).await;
    let members = node.members().await;
    let rows: String = members
        .iter()
        .map(|m| {
            format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                html_escape(&m.logical_name),
                html_escape(&m.service),
                html_escape(&m.state)
            )
        })
        .collect();
    // The cluster console is served by every array server's admin port.
    let console: String = match &node.backend {
        crate::backend::Backend::Array(c) => {
            let scheme = if node.settings.array_tls.is_some() {
                "https"
            } else {
                "http"
            };
            c.config()
                .stripes
                .iter()
                .flat_map(|st| st.servers.iter())
                .map(|srv| {
                    format!(
                        " <a href=\"{scheme}://{addr}/\">{name}</a>",
                        addr = html_escape(&srv.admin_addr()),
                        name = html_escape(&srv.name)
                    )
                })
                .collect()
        }
        crate::backend::Backend::Local(_) => " none (stand-alone)".to_string(),
    };
    Html(format!(
        "<!doctype html><html><head><meta charset=utf-8><title>node {name}</title></head><body>\
         <h1>integration node {name}</h1><p>cluster {cluster} ({eff}); array: {state}; online: {online}; rejoins: {rejoins}</p>\
         <p id=console>cluster console:{console}</p>\
         <h2>members</h2><table><tr><th>name</th><th>service</th><th>state</th></tr>{rows}</table>\
         <h2>scheduled jobs</h2><table id=jobs><tr><th>job</th><th>service</th><th>target</th><th>state</th>\
         <th>last runs (firing, node, outcome)</th></tr>{job_rows}</table></body></html>",
        name = html_escape(&node.logical_name),
        cluster = html_escape(&node.settings.cluster_name),
        eff = html_escape(&node.settings.effective_cluster_name),
        state = s["state"].as_str().unwrap_or(""),
        online = s["online"],
        rejoins = s["rejoins"],
    ))
    .into_response()
}

/// The page's rows of jobs: each job and its last runs (a few per lane).
async fn job_rows(jobs: &crate::jobs::Jobs) -> String {
    const LAST_RUNS_SHOWN: usize = 5;
    let Ok(list) = jobs.list().await else {
        return "<tr><td colspan=5>the jobs cannot be read now (array away, or stand-alone)</td></tr>".into();
    };
    const JOBS_SHOWN: usize = 50;
    let mut rows = String::new();
    let more = list.len().saturating_sub(JOBS_SHOWN);
    for job in list.into_iter().take(JOBS_SHOWN) {
        let runs = jobs.runs(&job.id).await.unwrap_or_default();
        let last: Vec<String> = runs
            .iter()
            .rev()
            .take(LAST_RUNS_SHOWN)
            .map(|r| {
                let at = chrono::DateTime::from_timestamp_millis(r.firing_ms as i64)
                    .map(|t| t.format("%H:%M:%S%.3f").to_string())
                    .unwrap_or_default();
                format!("{at} {} {:?}", html_escape(&r.owner.node), r.outcome)
            })
            .collect();
        rows.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{:?}</td><td>{}</td></tr>",
            html_escape(&job.id),
            html_escape(&job.service),
            html_escape(&serde_json::to_string(&job.target).unwrap_or_default()),
            job.state,
            last.join("; ")
        ));
    }
    if more > 0 {
        rows.push_str(&format!(
            "<tr><td colspan=5>and {more} more (GET /admin/jobs)</td></tr>"
        ));
    }
    rows
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}
