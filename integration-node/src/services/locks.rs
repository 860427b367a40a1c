//! `pub.cache.lock` and `pub.storage` (SPEC 4.4).
//!
//! `pub.cache.lock:acquireLock` takes an array lock for this node's array session (so a node that
//! dies loses its locks when its session expires); `lockWaitTime` is in milliseconds (<0 forever,
//! 0 at once). The node remembers the handles so a later request can release them, and counts
//! holds as the array does (locks are reentrant): acquiring twice needs two releases. It holds at
//! most `locks_held_max` locks, and never one on a cache of its own (`ferrocotta.`).
//!
//! `pub.storage` keeps named stores of JSON values in the array, and locks on their keys as lock
//! records written with compare-and-swap: `{owner, acquired_ms}`. A lock held longer than
//! `lock_max_duration` (default 180 s) is broken by the next requester, as the seed's repository
//! locks are; `waitLength` (ms) bounds how long a requester waits. A store's values and its lock
//! records live in caches of different prefixes, so no store name reaches another store's locks.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use ferrocotta::client::{LockHandle, LockWait};
use ferrocotta::protocol::LockMode;
use ferrocotta::{ArrayClient, ClientError};
use serde_json::{json, Value};

use super::{Registry, ServiceError};
use crate::backend::Backend;
use crate::node::{now_ms, Node};

/// Locks held through `pub.cache.lock` by (cache, key): the array's handle and the holds taken.
type HeldLocks = Mutex<HashMap<(String, Vec<u8>), (LockHandle, u32)>>;

/// How often a waiting `pub.storage:lock` looks again.
const STORAGE_LOCK_POLL: Duration = Duration::from_millis(50);

fn field<'a>(input: &'a Value, name: &str) -> Result<&'a str, ServiceError> {
    input
        .get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| ServiceError::bad_request(format!("the input needs a string `{name}`")))
}

fn lock_timeout(what: &str) -> ServiceError {
    ServiceError::new(
        StatusCode::CONFLICT,
        "lock_timeout",
        format!("{what} was not granted within the wait time"),
    )
}

/// Registers the lock and storage services.
pub fn register(r: &mut Registry) {
    // The locks this node holds belong to these two services alone.
    let held = Arc::new(HeldLocks::default());
    let table = held.clone();
    r.register("pub.cache.lock:acquireLock", move |node, _, input| {
        Box::pin(acquire(node, table.clone(), input))
    });
    r.register("pub.cache.lock:releaseLock", move |node, _, input| {
        Box::pin(release(node, held.clone(), input))
    });
    r.register("pub.storage:put", |node, _, input| Box::pin(storage_put(node, input)));
    r.register("pub.storage:get", |node, _, input| Box::pin(storage_get(node, input)));
    r.register("pub.storage:remove", |node, _, input| {
        Box::pin(storage_remove(node, input))
    });
    r.register("pub.storage:keys", |node, _, input| Box::pin(storage_keys(node, input)));
    r.register("pub.storage:deleteStore", |node, _, input| {
        Box::pin(storage_delete(node, input))
    });
    r.register("pub.storage:lock", |node, _, input| Box::pin(storage_lock(node, input)));
    r.register("pub.storage:unlock", |node, _, input| {
        Box::pin(storage_unlock(node, input))
    });
    r.register("pub.storage:listLocks", |node, _, input| {
        Box::pin(storage_list_locks(node, input))
    });
    r.register("pub.storage:releaseLocks", |node, _, input| {
        Box::pin(storage_release_locks(node, input))
    });
}

/// The array client; array locks have no stand-alone form.
fn array_of(node: &Node) -> Result<&ArrayClient, ServiceError> {
    match &node.backend {
        Backend::Array(client) => Ok(client),
        Backend::Local(_) => Err(ServiceError::new(
            StatusCode::NOT_IMPLEMENTED,
            "standalone",
            "locks need the array",
        )),
    }
}

async fn acquire(node: &Node, held_locks: Arc<HeldLocks>, input: Value) -> Result<Value, ServiceError> {
    let client = array_of(node)?;
    let cache = super::user_cache(&input)?;
    let key = field(&input, "key")?.to_string();
    let wait = LockWait::from_millis(input.get("lockWaitTime").and_then(Value::as_i64).unwrap_or(0));
    let id = (cache.clone(), key.clone().into_bytes());
    {
        let held = held_locks.lock().expect("held locks");
        if !held.contains_key(&id) && held.len() >= node.settings.locks_held_max {
            return Err(ServiceError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_locks",
                format!(
                    "this node holds {} locks, its limit (locks_held_max); release some first",
                    held.len()
                ),
            ));
        }
    }
    match client.lock(&cache, key.as_bytes(), LockMode::Exclusive, wait).await {
        Ok(handle) => {
            let mut held = held_locks.lock().expect("held locks");
            let entry = held.entry(id).or_insert((handle.clone(), 0));
            // A hold taken under a newer session (after a rejoin) replaces the voided one.
            if entry.0 != handle {
                *entry = (handle, 0);
            }
            entry.1 += 1;
            Ok(json!({"acquired": true, "holds": entry.1}))
        }
        Err(ClientError::LockTimeout) => Err(lock_timeout("the lock")),
        Err(e) => Err(ServiceError::from_array(e)),
    }
}

async fn release(node: &Node, held_locks: Arc<HeldLocks>, input: Value) -> Result<Value, ServiceError> {
    let client = array_of(node)?;
    let id = (super::user_cache(&input)?, field(&input, "key")?.as_bytes().to_vec());
    // One hold is given back per release; the handle stays while holds remain.
    let handle: Option<(LockHandle, u32)> = {
        let mut held = held_locks.lock().expect("held locks");
        match held.get_mut(&id) {
            None => None,
            Some((handle, holds)) => {
                *holds -= 1;
                let left = *holds;
                let handle = handle.clone();
                if left == 0 {
                    held.remove(&id);
                }
                Some((handle, left))
            }
        }
    };
    let Some((handle, left)) = handle else {
        return Err(ServiceError::new(
            StatusCode::CONFLICT,
            "not_held",
            "this node does not hold that lock",
        ));
    };
    match client.unlock(&handle).await {
        Ok(()) => Ok(json!({"released": true, "holds": left})),
        Err(ClientError::InvalidLockAfterRejoin) => {
            held_locks.lock().expect("held locks").remove(&id);
            Err(ServiceError::new(
                StatusCode::CONFLICT,
                "invalid_lock_after_rejoin",
                "the lock was taken before the node rejoined the array; it is no longer held",
            ))
        }
        Err(e) => Err(ServiceError::from_array(e)),
    }
}

/// Longest store name.
pub const STORE_NAME_BYTES_MAX: usize = 128;

fn store_name(input: &Value) -> Result<&str, ServiceError> {
    let name = field(input, "storeName")?;
    if name.is_empty() || name.len() > STORE_NAME_BYTES_MAX || name.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(ServiceError::bad_request(format!(
            "storeName must be 1 to {STORE_NAME_BYTES_MAX} characters without spaces or control characters"
        )));
    }
    Ok(name)
}

/// The cache of a store's values.
fn store(node: &Node, input: &Value) -> Result<String, ServiceError> {
    Ok(node.settings.storage_cache(store_name(input)?))
}

/// The cache of a store's lock records (another prefix than any store's values).
fn lock_cache(node: &Node, input: &Value) -> Result<String, ServiceError> {
    Ok(node.settings.storage_locks_cache(store_name(input)?))
}

async fn storage_put(node: &Node, input: Value) -> Result<Value, ServiceError> {
    let cache = store(node, &input)?;
    let value = serde_json::to_vec(input.get("value").unwrap_or(&Value::Null)).expect("json");
    node.backend
        .put(&cache, field(&input, "key")?.as_bytes(), &value, None)
        .await?;
    Ok(json!({"ok": true}))
}

async fn storage_get(node: &Node, input: Value) -> Result<Value, ServiceError> {
    let cache = store(node, &input)?;
    let v = node.backend.get(&cache, field(&input, "key")?.as_bytes()).await?;
    Ok(json!({"value": v.and_then(|b| serde_json::from_slice::<Value>(&b).ok())}))
}

async fn storage_remove(node: &Node, input: Value) -> Result<Value, ServiceError> {
    let cache = store(node, &input)?;
    Ok(json!({"removed": node.backend.remove(&cache, field(&input, "key")?.as_bytes()).await?}))
}

async fn storage_keys(node: &Node, input: Value) -> Result<Value, ServiceError> {
    super::cache::keys_json(node, &store(node, &input)?).await
}

async fn storage_delete(node: &Node, input: Value) -> Result<Value, ServiceError> {
    let cache = store(node, &input)?;
    let removed = node.backend.remove_all(&cache).await? + node.backend.remove_all(&lock_cache(node, &input)?).await?;
    Ok(json!({"removed": removed}))
}

fn lock_record(node: &Node) -> Vec<u8> {
    serde_json::to_vec(&json!({"owner": node.logical_name, "instance": node.instance_id, "acquired_ms": now_ms()}))
        .expect("json")
}

fn ours(node: &Node, record: &[u8]) -> bool {
    serde_json::from_slice::<Value>(record).is_ok_and(|v| v["instance"] == node.instance_id.as_str())
}

async fn storage_lock(node: &Node, input: Value) -> Result<Value, ServiceError> {
    let locks = lock_cache(node, &input)?;
    let key = field(&input, "key")?.as_bytes().to_vec();
    let wait = Duration::from_millis(input.get("waitLength").and_then(Value::as_u64).unwrap_or(0));
    let started = Instant::now();
    loop {
        let mine = lock_record(node);
        match node.backend.put_if_absent(&locks, &key, &mine).await? {
            None => return Ok(json!({"locked": true, "broken": false})),
            Some(existing) if ours(node, &existing) => return Ok(json!({"locked": true, "broken": false})),
            Some(existing) => {
                let acquired = serde_json::from_slice::<Value>(&existing)
                    .ok()
                    .and_then(|v| v["acquired_ms"].as_u64())
                    .unwrap_or(0);
                let held_ms = now_ms().saturating_sub(acquired);
                if held_ms > node.settings.lock_max_duration.as_millis() as u64
                    && node.backend.replace_if_equal(&locks, &key, &existing, &mine).await?
                {
                    tracing::warn!(event = "node.storage_lock_broken", key = %String::from_utf8_lossy(&key), held_ms);
                    return Ok(json!({"locked": true, "broken": true}));
                }
            }
        }
        if started.elapsed() >= wait {
            return Err(lock_timeout("the storage lock"));
        }
        tokio::time::sleep(STORAGE_LOCK_POLL.min(wait.saturating_sub(started.elapsed()))).await;
    }
}

async fn storage_unlock(node: &Node, input: Value) -> Result<Value, ServiceError> {
    let locks = lock_cache(node, &input)?;
    let key = field(&input, "key")?.as_bytes().to_vec();
    match node.backend.get(&locks, &key).await? {
        Some(record) if ours(node, &record) => {
            Ok(json!({"unlocked": node.backend.remove_if_equal(&locks, &key, &record).await?}))
        }
        _ => Err(ServiceError::new(
            StatusCode::CONFLICT,
            "not_held",
            "this node does not hold that storage lock",
        )),
    }
}

async fn storage_list_locks(node: &Node, input: Value) -> Result<Value, ServiceError> {
    let locks = lock_cache(node, &input)?;
    let mut out = Vec::new();
    for k in node.backend.keys(&locks).await? {
        if let Some(record) = node.backend.get(&locks, &k).await? {
            let mut v: Value = serde_json::from_slice(&record).unwrap_or_default();
            v["key"] = json!(String::from_utf8_lossy(&k));
            out.push(v);
        }
    }
    Ok(json!({"locks": out}))
}

async fn storage_release_locks(node: &Node, input: Value) -> Result<Value, ServiceError> {
    let locks = lock_cache(node, &input)?;
    let mut released = 0u64;
    for k in node.backend.keys(&locks).await? {
        if let Some(record) = node.backend.get(&locks, &k).await? {
            if ours(node, &record) && node.backend.remove_if_equal(&locks, &k, &record).await? {
                released += 1;
            }
        }
    }
    Ok(json!({"released": released}))
}
