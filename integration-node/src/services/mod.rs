//! Services invoked as `POST /invoke/{folder}:{service}` with a JSON body (SPEC 4.4), and the
//! registry an embedding application adds its own to.
//!
//! Built in, one module each, each owning its state: `session` (`demo:counter`,
//! `pub.session:get|put|remove`, the `ssnid` cookie), `cache`
//! (`pub.cache:get|put|putIfAbsent|replace|remove|containsKey|getKeys|removeAll`), `locks`
//! (`pub.cache.lock:acquireLock|releaseLock` with the locks this node holds, and `pub.storage:*`),
//! `checkpoint` (`demo:checkpointed`), `remote` (`pub.remote:invoke` through node.toml's aliases),
//! `cluster` (`wm.server.cluster:getMembers|
//! clearClusterMemberList`); `demo:echo` is here. The modules below use the node and the shared
//! types here, never each other's state, and nothing below `services` knows them (settings ->
//! backend -> node -> services -> http).

mod cache;
mod checkpoint;
mod cluster;
mod locks;
pub mod remote;
mod session;

pub use cluster::clear_members;
pub use session::{load_session, new_session_id, save_session, with_session_cookie, Session, SessionCookie};

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use axum::http::StatusCode;
use ferrocotta::ClientError;
use serde_json::{json, Value};

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
        session::register(&mut r);
        cache::register(&mut r);
        cluster::register(&mut r);
        locks::register(&mut r);
        checkpoint::register(&mut r);
        remote::register(&mut r);
        crate::gd::register(&mut r);
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

    /// Whether a service of this name exists.
    pub fn has(&self, name: &str) -> bool {
        self.services.contains_key(name)
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

pub(crate) fn field<'a>(input: &'a Value, name: &str) -> Result<&'a str, ServiceError> {
    input
        .get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| ServiceError::bad_request(format!("the input needs a string `{name}`")))
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
