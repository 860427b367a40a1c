//! The invocation handle of a guaranteed-delivery run: what a service reads through it becomes a
//! guard and what it writes a step of the one array transaction that also records the
//! transaction's result. So the effects commit with the result or not at all, and a concurrent
//! change of what the service read makes the run start again on fresh values instead of
//! overwriting it.
//!
//! Outside a guaranteed-delivery run, [`get`] and [`put`] go to the array directly.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ferrocotta::protocol::{Expiry, Guard, Step};
use serde_json::{json, Value};

use super::client;
use crate::node::Node;
use crate::services::{field, ServiceError};

tokio::task_local! {
    /// The run a service is part of, if any.
    pub static INVOCATION: Arc<Invocation>;
}

/// What one run read and wrote.
pub struct Invocation {
    /// The stripe of the transaction: effects must be there too.
    stripe: usize,
    staged: Mutex<Staged>,
}

#[derive(Default)]
struct Staged {
    /// Values read (or written) so far, by (cache, key).
    seen: HashMap<(String, Vec<u8>), Option<Vec<u8>>>,
    guards: Vec<Guard>,
    steps: Vec<Step>,
}

impl Invocation {
    /// A run of a transaction on `stripe`.
    pub fn new(stripe: usize) -> Arc<Invocation> {
        Arc::new(Invocation {
            stripe,
            staged: Mutex::new(Staged::default()),
        })
    }

    /// The guards and steps the run gathered.
    pub fn take(&self) -> (Vec<Guard>, Vec<Step>) {
        let mut s = self.staged.lock().expect("staged lock");
        (std::mem::take(&mut s.guards), std::mem::take(&mut s.steps))
    }
}

fn current() -> Option<Arc<Invocation>> {
    INVOCATION.try_with(Arc::clone).ok()
}

fn other_stripe(cache: &str) -> ServiceError {
    ServiceError::bad_request(format!(
        "an effect on cache `{cache}` falls on another stripe than the transaction's: give the key the transaction's \
         hash tag (start it with `tag` and use `{{tag}}` in the key)"
    ))
}

/// Reads a value through the handle: in a run, the value as the run sees it (its own writes
/// included), and the run commits only if it is still so.
pub async fn get(node: &Node, cache: &str, key: &[u8]) -> Result<Option<Vec<u8>>, ServiceError> {
    let c = client(node)?;
    let Some(run) = current() else {
        return c.get(cache, key).await.map_err(ServiceError::from_array);
    };
    if c.stripe_of(key) != run.stripe {
        return Err(other_stripe(cache));
    }
    let slot = (cache.to_string(), key.to_vec());
    if let Some(v) = run.staged.lock().expect("staged lock").seen.get(&slot) {
        return Ok(v.clone());
    }
    let value = c.get(cache, key).await.map_err(ServiceError::from_array)?;
    let mut s = run.staged.lock().expect("staged lock");
    s.guards.push(match &value {
        Some(v) => Guard::ValueIs {
            cache: cache.to_string(),
            key: key.to_vec(),
            value: v.clone(),
        },
        None => Guard::Absent {
            cache: cache.to_string(),
            key: key.to_vec(),
        },
    });
    s.seen.insert(slot, value.clone());
    Ok(value)
}

/// Writes a value through the handle: in a run, staged until the run commits with its result.
pub async fn put(node: &Node, cache: &str, key: &[u8], value: &[u8]) -> Result<(), ServiceError> {
    let c = client(node)?;
    let Some(run) = current() else {
        c.put(cache, key, value).await.map_err(ServiceError::from_array)?;
        return Ok(());
    };
    if c.stripe_of(key) != run.stripe {
        return Err(other_stripe(cache));
    }
    let mut s = run.staged.lock().expect("staged lock");
    s.seen.insert((cache.to_string(), key.to_vec()), Some(value.to_vec()));
    s.steps.push(Step::Put {
        cache: cache.to_string(),
        key: key.to_vec(),
        value: value.to_vec(),
        expiry: Expiry::Default,
    });
    Ok(())
}

/// The cache of `demo:deposit`'s balances.
pub const ACCOUNTS_CACHE: &str = "demo.accounts";

/// The key of an account's balance: the account is its hash tag, so a transaction started with
/// `tag` = the account keeps its effect on its own stripe.
pub fn account_key(account: &str) -> String {
    format!("{{{account}}}")
}

/// `demo:deposit {account, amount}`: adds to a balance kept in the array (cache `demo.accounts`,
/// key `{account}`, a decimal number) through the invocation handle; answers the new balance.
pub async fn deposit(node: &Node, input: Value) -> Result<Value, ServiceError> {
    let account = field(&input, "account")?;
    if account.is_empty() || account.len() > super::TAG_BYTES_MAX || account.contains(['{', '}']) {
        return Err(ServiceError::bad_request(format!(
            "`account` is 1 to {} characters without braces",
            super::TAG_BYTES_MAX
        )));
    }
    let amount = input
        .get("amount")
        .and_then(Value::as_i64)
        .ok_or_else(|| ServiceError::bad_request("the input needs a whole number `amount`"))?;
    let key = account_key(account);
    if current().is_none() {
        // A plain invoke: one atomic increment (once per request it reaches; at least once if the
        // caller retries, which is what guaranteed delivery is for).
        let balance = client(node)?
            .increment(ACCOUNTS_CACHE, key.as_bytes(), amount)
            .await
            .map_err(ServiceError::from_array)?;
        return Ok(json!({"account": account, "balance": balance, "node": node.logical_name}));
    }
    let old = match get(node, ACCOUNTS_CACHE, key.as_bytes()).await? {
        None => 0,
        Some(raw) => ferrocotta::protocol::parse_counter(&raw).ok_or_else(|| {
            ServiceError::new(
                axum::http::StatusCode::CONFLICT,
                "not_a_balance",
                format!("account `{account}` holds something that is not a number"),
            )
        })?,
    };
    let balance = old
        .checked_add(amount)
        .ok_or_else(|| ServiceError::bad_request("the balance would overflow"))?;
    put(node, ACCOUNTS_CACHE, key.as_bytes(), balance.to_string().as_bytes()).await?;
    Ok(json!({"account": account, "balance": balance, "node": node.logical_name}))
}
