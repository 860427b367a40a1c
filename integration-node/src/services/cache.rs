//! `pub.cache`: the caches of applications, in the array (never one of the node's own).

use ferrocotta::json_bytes::to_json;
use serde_json::{json, Value};

use super::{field, user_cache, Registry, ServiceError};
use crate::node::Node;

/// Registers `pub.cache:*`.
pub fn register(r: &mut Registry) {
    r.register("pub.cache:get", |node, _, input| Box::pin(cache_get(node, input)));
    r.register("pub.cache:containsKey", |node, _, input| {
        Box::pin(cache_contains(node, input))
    });
    r.register("pub.cache:put", |node, _, input| Box::pin(cache_put(node, input)));
    r.register("pub.cache:remove", |node, _, input| Box::pin(cache_remove(node, input)));
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
}

/// Every key of a cache as `{"keys": [...]}` (strings, or `{"hex"}` for keys that are not UTF-8).
pub async fn keys_json(node: &Node, cache: &str) -> Result<Value, ServiceError> {
    let keys: Vec<Value> = node.backend.keys(cache).await?.iter().map(|k| to_json(k)).collect();
    Ok(json!({ "keys": keys }))
}

async fn cache_get(node: &Node, input: Value) -> Result<Value, ServiceError> {
    let cache = user_cache(&input)?;
    let v = node.backend.get(&cache, field(&input, "key")?.as_bytes()).await?;
    Ok(json!({"value": v.as_deref().map(to_json)}))
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
    Ok(json!({"written": prev.is_none(), "existing": prev.as_deref().map(to_json)}))
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
    keys_json(node, &user_cache(&input)?).await
}

async fn cache_remove_all(node: &Node, input: Value) -> Result<Value, ServiceError> {
    Ok(json!({"removed": node.backend.remove_all(&user_cache(&input)?).await?}))
}
