//! Services invoked as `POST /invoke/{folder}:{service}` with a JSON body (SPEC 4.4), and the
//! registry an embedding application adds its own to.
//!
//! Built in: `demo:echo` (stateless), `demo:counter` (a counter in the session),
//! `demo:checkpointed` ([`crate::jobs`]), `pub.session:get|put|remove`,
//! `pub.cache:get|put|putIfAbsent|replace|remove|containsKey|getKeys|removeAll`,
//! `pub.cache.lock:acquireLock|releaseLock` and `pub.storage:*` ([`crate::locks`]),
//! `wm.server.cluster:getMembers|clearClusterMemberList`.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use axum::http::StatusCode;
use ferrocotta::ClientError;
use serde_json::{json, Map, Value};

use crate::backend::BackendError;
use crate::node::Node;

/// A failed service call, rendered as `{"error": {"code", "message"}}`.
#[derive(Debug, Clone)]
pub struct ServiceError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable code.
    pub code: String,
    /// What happened.
    pub message: String,
}

impl From<BackendError> for ServiceError {
    fn from(e: BackendError) -> ServiceError {
        match e {
            BackendError::Array(e) => ServiceError::from_array(e),
            BackendError::NotApplied => ServiceError::unavailable(),
        }
    }
}

impl ServiceError {
    /// An error with a status, code and message.
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> ServiceError {
        ServiceError {
            status,
            code: code.into(),
            message: message.into(),
        }
    }

    /// Bad input.
    pub fn bad_request(message: impl Into<String>) -> ServiceError {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// The array did not answer in time (the seed's ISS.0033.0154E).
    pub fn unavailable() -> ServiceError {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "ISS.0033.0154E",
            "the cluster's shared state (cache array) is not reachable: the session cannot be read or saved; stateless services keep working",
        )
    }

    /// Maps an array client error: the caller's bad input is 400, what the node's credential
    /// may not do is 403, an array that does not answer is 503, anything else 500.
    pub fn from_array(e: ClientError) -> ServiceError {
        use ferrocotta::protocol::ErrorReply;
        if e.is_unavailability() {
            tracing::warn!(event = "node.array_unavailable", error = %e);
            return Self::unavailable();
        }
        match &e {
            ClientError::Invalid(_) | ClientError::Server(ErrorReply::Invalid(_)) => Self::bad_request(e.to_string()),
            ClientError::Server(ErrorReply::Forbidden(_)) => {
                Self::new(StatusCode::FORBIDDEN, "forbidden", e.to_string())
            }
            ClientError::Server(ErrorReply::Busy(_)) => {
                tracing::warn!(event = "node.array_busy", error = %e);
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "array_busy", e.to_string())
            }
            _ => {
                tracing::warn!(event = "node.array_error", error = %e);
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "array_error", e.to_string())
            }
        }
    }
}

type ServiceFuture<'a> = Pin<Box<dyn Future<Output = Result<Value, ServiceError>> + Send + 'a>>;

/// A service: gets the node, the caller's session id and the input; returns the output.
pub type Service = Arc<dyn for<'a> Fn(&'a Node, &'a str, Value) -> ServiceFuture<'a> + Send + Sync>;

/// Longest service name (`folder:service`).
pub const SERVICE_NAME_BYTES_MAX: usize = 128;

/// Whether a service name is acceptable: 1 to [`SERVICE_NAME_BYTES_MAX`] of ASCII letters, digits
/// and `.`, `:`, `_`, `-`.
pub fn check_service_name(name: &str) -> Result<(), ServiceError> {
    if name.is_empty() || name.len() > SERVICE_NAME_BYTES_MAX {
        return Err(ServiceError::bad_request(format!(
            "service names are 1 to {SERVICE_NAME_BYTES_MAX} characters"
        )));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '_' | '-'))
    {
        return Err(ServiceError::bad_request(
            "service names hold only ASCII letters, digits, `.`, `:`, `_` and `-`",
        ));
    }
    Ok(())
}

/// Services by `folder:service`.
#[derive(Clone, Default)]
pub struct Registry {
    services: HashMap<String, Service>,
    /// Services that change the cluster (administrative): callers need the admin token.
    administrative: std::collections::HashSet<String>,
}

impl Registry {
    /// A registry with the built-in services.
    pub fn with_builtins() -> Registry {
        let mut r = Registry::default();
        r.register("demo:echo", |node, _, input| {
            Box::pin(async move { Ok(json!({"input": input, "node": node.logical_name})) })
        });
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
        r.register("pub.cache:get", |node, _, input| Box::pin(cache_get(node, input)));
        r.register("pub.cache:containsKey", |node, _, input| {
            Box::pin(cache_contains(node, input))
        });
        r.register("pub.cache:put", |node, _, input| Box::pin(cache_put(node, input)));
        r.register("pub.cache:remove", |node, _, input| Box::pin(cache_remove(node, input)));
        // Public: the members without their admin addresses or instance ids.
        r.register("wm.server.cluster:getMembers", |node, _, _| {
            Box::pin(async move { Ok(json!({"members": node.public_members().await})) })
        });
        r.register_admin("wm.server.cluster:clearClusterMemberList", |node, _, _| {
            Box::pin(clear_members(node))
        });
        r.register("pub.cache:putIfAbsent", |node, _, input| {
            Box::pin(cache_put_if_absent(node, input))
        });
        r.register("pub.cache:replace", |node, _, input| {
            Box::pin(cache_replace(node, input))
        });
        r.register("pub.cache:getKeys", |node, _, input| Box::pin(cache_keys(node, input)));
        r.register("pub.cache:removeAll", |node, _, input| {
            Box::pin(cache_remove_all(node, input))
        });
        crate::locks::register(&mut r);
        crate::jobs::register(&mut r);
        r
    }

    /// Adds (or replaces) a service.
    pub fn register<F>(&mut self, name: &str, f: F)
    where
        F: for<'a> Fn(&'a Node, &'a str, Value) -> ServiceFuture<'a> + Send + Sync + 'static,
    {
        self.services.insert(name.to_string(), Arc::new(f));
    }

    /// Adds (or replaces) an administrative service: one that changes the cluster, which callers
    /// of the service port may invoke only with the admin token.
    pub fn register_admin<F>(&mut self, name: &str, f: F)
    where
        F: for<'a> Fn(&'a Node, &'a str, Value) -> ServiceFuture<'a> + Send + Sync + 'static,
    {
        self.register(name, f);
        self.administrative.insert(name.to_string());
    }

    /// Whether a service is administrative.
    pub fn is_administrative(&self, name: &str) -> bool {
        self.administrative.contains(name)
    }

    /// Calls a service.
    pub async fn call(&self, node: &Node, name: &str, ssnid: &str, input: Value) -> Result<Value, ServiceError> {
        let Some(service) = self.services.get(name) else {
            return Err(ServiceError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no service `{name}`"),
            ));
        };
        service(node, ssnid, input).await
    }
}

fn field<'a>(input: &'a Value, name: &str) -> Result<&'a str, ServiceError> {
    input
        .get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| ServiceError::bad_request(format!("the input needs a string `{name}`")))
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

/// The cache a public service names: never one of the node's own (`ferrocotta.`: sessions,
/// members, stores, checkpoints), and a valid cache name.
pub fn user_cache(input: &Value) -> Result<String, ServiceError> {
    let name = field(input, "cacheName")?;
    if name.starts_with("ferrocotta.") {
        return Err(ServiceError::new(
            StatusCode::FORBIDDEN,
            "reserved_cache",
            "caches under `ferrocotta.` belong to the node and the array themselves",
        ));
    }
    ferrocotta::protocol::check_cache_name(name).map_err(ServiceError::bad_request)?;
    Ok(name.to_string())
}

async fn cache_get(node: &Node, input: Value) -> Result<Value, ServiceError> {
    let cache = user_cache(&input)?;
    let v = node.backend.get(&cache, field(&input, "key")?.as_bytes()).await?;
    Ok(json!({"value": v.map(|b| String::from_utf8_lossy(&b).into_owned())}))
}

async fn cache_contains(node: &Node, input: Value) -> Result<Value, ServiceError> {
    let cache = user_cache(&input)?;
    let v = node.backend.get(&cache, field(&input, "key")?.as_bytes()).await?;
    Ok(json!({"exists": v.is_some()}))
}

async fn cache_put(node: &Node, input: Value) -> Result<Value, ServiceError> {
    let cache = user_cache(&input)?;
    let value = field(&input, "value")?;
    node.backend
        .put(&cache, field(&input, "key")?.as_bytes(), value.as_bytes(), None)
        .await?;
    Ok(json!({"ok": true}))
}

async fn cache_remove(node: &Node, input: Value) -> Result<Value, ServiceError> {
    let cache = user_cache(&input)?;
    let removed = node.backend.remove(&cache, field(&input, "key")?.as_bytes()).await?;
    Ok(json!({"removed": removed}))
}

async fn cache_put_if_absent(node: &Node, input: Value) -> Result<Value, ServiceError> {
    let cache = user_cache(&input)?;
    let prev = node
        .backend
        .put_if_absent(
            &cache,
            field(&input, "key")?.as_bytes(),
            field(&input, "value")?.as_bytes(),
        )
        .await?;
    Ok(json!({"written": prev.is_none(), "existing": prev.map(|b| String::from_utf8_lossy(&b).into_owned())}))
}

async fn cache_replace(node: &Node, input: Value) -> Result<Value, ServiceError> {
    let cache = user_cache(&input)?;
    let key = field(&input, "key")?.as_bytes().to_vec();
    let value = field(&input, "value")?;
    match input.get("oldValue").and_then(Value::as_str) {
        Some(old) => Ok(
            json!({"replaced": node.backend.replace_if_equal(&cache, &key, old.as_bytes(), value.as_bytes()).await?}),
        ),
        None => {
            let present = node.backend.get(&cache, &key).await?.is_some();
            if present {
                node.backend.put(&cache, &key, value.as_bytes(), None).await?;
            }
            Ok(json!({"replaced": present}))
        }
    }
}

async fn cache_keys(node: &Node, input: Value) -> Result<Value, ServiceError> {
    node.keys_json(&user_cache(&input)?).await
}

async fn cache_remove_all(node: &Node, input: Value) -> Result<Value, ServiceError> {
    Ok(json!({"removed": node.backend.remove_all(&user_cache(&input)?).await?}))
}

/// `clearClusterMemberList`: empties the member list; live members re-register within one
/// refresh interval.
pub async fn clear_members(node: &Node) -> Result<Value, ServiceError> {
    let removed = node.backend.remove_all(&node.settings.members_cache()).await?;
    tracing::info!(event = "node.members_cleared", removed);
    Ok(json!({"removed": removed}))
}
