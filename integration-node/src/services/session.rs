//! Clustered sessions: the `ssnid` cookie of a request, session objects kept in the array (the
//! session timeout is their tti), `pub.session:*` and `demo:counter`.

use axum::http::StatusCode;
use serde_json::{json, Map, Value};

use super::{field, Registry, ServiceError};
use crate::node::Node;

/// Registers `pub.session:*` and `demo:counter`.
pub fn register(r: &mut Registry) {
    r.register("demo:counter", |node, ssnid, _| Box::pin(counter(node, ssnid)));
    r.register("pub.session:get", |node, ssnid, input| {
        Box::pin(session_get(node, ssnid, input))
    });
    r.register("pub.session:put", |node, ssnid, input| {
        Box::pin(session_put(node, ssnid, input))
    });
    r.register("pub.session:remove", |node, ssnid, input| {
        Box::pin(session_remove(node, ssnid, input))
    });
}

tokio::task_local! {
    /// The session cookie of the request being served (set by the service port around each call).
    static COOKIE: std::cell::RefCell<SessionCookie>;
}

/// The session id of one request: what the client sent, and whether the node issued a new one.
#[derive(Debug, Clone)]
pub struct SessionCookie {
    /// The id in use.
    pub id: String,
    /// Whether the node issued `id` (the client must be sent a cookie).
    pub issued: bool,
}

/// A fresh session id: 128 bits from the operating system's CSPRNG, as hex.
pub fn new_session_id() -> String {
    let id: [u8; 16] = rand::random();
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs `f` with `cookie` as the request's session cookie; returns what it returned and the cookie
/// as it ended (a new one when the client's id was unknown to the array).
pub async fn with_session_cookie<T>(
    cookie: SessionCookie,
    f: impl std::future::Future<Output = T>,
) -> (T, SessionCookie) {
    let cell = std::cell::RefCell::new(cookie);
    COOKIE
        .scope(cell, async move {
            let out = f.await;
            (out, COOKIE.with(|c| c.borrow().clone()))
        })
        .await
}

/// A session object as a service sees it: its fields (the object derefs to them), its id, and
/// what the array held when it was loaded, so that saving it never overwrites a newer version.
#[derive(Debug, Default)]
pub struct Session {
    id: String,
    data: Map<String, Value>,
    loaded: Option<Vec<u8>>,
}

impl Session {
    /// The session's id (the client's cookie, or a new one when the array did not know it).
    pub fn id(&self) -> &str {
        &self.id
    }
}

impl std::ops::Deref for Session {
    type Target = Map<String, Value>;
    fn deref(&self) -> &Map<String, Value> {
        &self.data
    }
}

impl std::ops::DerefMut for Session {
    fn deref_mut(&mut self) -> &mut Map<String, Value> {
        &mut self.data
    }
}

/// Loads the session object (empty when new or expired). A session id the client chose that the
/// array does not know is never taken over: the request gets a fresh id (and the client a new
/// cookie), so nobody can plant a session id on someone else (session fixation).
pub async fn load_session(node: &Node, ssnid: &str) -> Result<Session, ServiceError> {
    let current = COOKIE.try_with(|c| c.borrow().clone()).ok();
    let id = current.as_ref().map_or(ssnid.to_string(), |c| c.id.clone());
    let loaded = node.backend.get(&node.settings.sessions_cache(), id.as_bytes()).await?;
    let id = match (&loaded, &current) {
        (None, Some(c)) if !c.issued => {
            let fresh = new_session_id();
            let _ = COOKIE.try_with(|c| {
                *c.borrow_mut() = SessionCookie {
                    id: fresh.clone(),
                    issued: true,
                }
            });
            tracing::debug!(
                event = "node.session_reissued",
                "a session id unknown to the array was replaced"
            );
            fresh
        }
        _ => id,
    };
    let data = loaded
        .as_deref()
        .map(|b| serde_json::from_slice(b).unwrap_or_default())
        .unwrap_or_default();
    Ok(Session { id, data, loaded })
}

/// Saves the session object with tti = session timeout; 413 beyond the size limit; 409 when the
/// session changed since it was loaded (another request of the same session saved first, or an
/// earlier write of this one that timed out was applied late): nothing is saved then, so a late
/// write can never take a session back to an older state.
pub async fn save_session(node: &Node, session: &Session) -> Result<(), ServiceError> {
    let bytes = serde_json::to_vec(&session.data).expect("json");
    if bytes.len() > node.settings.session_max_bytes {
        return Err(ServiceError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "session_too_large",
            format!(
                "the session would hold {} bytes; the limit is {}",
                bytes.len(),
                node.settings.session_max_bytes
            ),
        ));
    }
    let saved = node
        .backend
        .put_if_unchanged(
            &node.settings.sessions_cache(),
            session.id.as_bytes(),
            session.loaded.as_deref(),
            &bytes,
            Some(node.settings.session_timeout),
        )
        .await?;
    if saved {
        Ok(())
    } else {
        Err(ServiceError::new(
            StatusCode::CONFLICT,
            "session_conflict",
            "the session changed while this request ran; nothing was saved, retry the request",
        ))
    }
}

async fn counter(node: &Node, ssnid: &str) -> Result<Value, ServiceError> {
    let mut session = load_session(node, ssnid).await?;
    let count = session.get("counter").and_then(Value::as_i64).unwrap_or(0) + 1;
    session.insert("counter".into(), json!(count));
    save_session(node, &session).await?;
    Ok(json!({"counter": count, "node": node.logical_name}))
}

async fn session_get(node: &Node, ssnid: &str, input: Value) -> Result<Value, ServiceError> {
    let session = load_session(node, ssnid).await?;
    match input.get("key").and_then(Value::as_str) {
        Some(k) => Ok(json!({"value": session.get(k).cloned().unwrap_or(Value::Null)})),
        None => Ok(json!({"session": *session})),
    }
}

async fn session_put(node: &Node, ssnid: &str, input: Value) -> Result<Value, ServiceError> {
    let key = field(&input, "key")?.to_string();
    let value = input.get("value").cloned().unwrap_or(Value::Null);
    let mut session = load_session(node, ssnid).await?;
    session.insert(key, value);
    save_session(node, &session).await?;
    Ok(json!({"ok": true}))
}

async fn session_remove(node: &Node, ssnid: &str, input: Value) -> Result<Value, ServiceError> {
    let key = field(&input, "key")?;
    let mut session = load_session(node, ssnid).await?;
    let removed = session.remove(key).is_some();
    save_session(node, &session).await?;
    Ok(json!({"removed": removed}))
}
