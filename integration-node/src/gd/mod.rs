//! Guaranteed delivery (the seed's `pub.remote.gd`): transactions whose service runs once and only
//! once across the cluster, kept in the array so that any node continues any transaction.
//!
//! A transaction's record lives in `ferrocotta.node.gd.<cluster>` under its tid, which holds a
//! hash tag (`{account-7}.3f2a...`): the record and every effect the service writes through its
//! invocation handle ([`handle`]) share one stripe, so the service's effects and the
//! transaction's result commit in one array transaction, guarded by the record still naming this
//! process as the runner. A crash leaves both or neither.
//!
//! States: `started` -> `running` (an owner process, an attempt counted) -> `done` (the result
//! kept: any later invoke answers it) or `failed` (the next invoke tries again, until `retries`) ;
//! `expired` past the ttl or the retries (`restart` revives it), `in_doubt` when the runner died
//! with the service's takeover setting `in_doubt`, `ended` by `end`. Every write sets the record
//! to expire `gd_retention` after its deadline (or after `end`), so records do not pile up.

pub mod admin;
pub mod handle;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use ferrocotta::protocol::{Expiry, Guard, Step, Txn};
use ferrocotta::ArrayClient;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::backend::Backend;
use crate::node::Node;
use crate::owner::Owner;
use crate::services::{field, Registry, ServiceError};

/// Longest tid.
pub const TID_BYTES_MAX: usize = 160;
/// Longest hash tag a client may give a transaction.
pub const TAG_BYTES_MAX: usize = 128;
/// Largest input of a guaranteed-delivery invoke (its JSON text).
pub const INPUT_BYTES_MAX: usize = 64 * 1024;
/// Largest result kept (its JSON text); a larger one fails the attempt.
pub const RESULT_BYTES_MAX: usize = 64 * 1024;
/// Longest ttl a transaction may have.
pub const TTL_MAX: Duration = Duration::from_secs(30 * 24 * 3600);
/// How often a waiting invoke looks at a transaction another process runs.
const WAIT_POLL: Duration = Duration::from_millis(100);
/// Attempts of one invoke whose commit lost a race on the service's own reads (the service runs
/// again on fresh values; nothing of the lost attempt was written).
const CONFLICT_RERUNS_MAX: usize = 16;

/// What a taken-over transaction does when its runner died: run the service again, or report
/// `in_doubt` (the safe default: the service may have had effects outside the array).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Takeover {
    /// Report `in_doubt`; nothing reruns it unless `restart`.
    #[default]
    InDoubt,
    /// Run it again (right for services whose every effect goes through the invocation handle,
    /// such as `demo:deposit`: a dead runner's effects were never committed).
    Rerun,
}

/// A transaction's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Started,
    Running,
    Done,
    Failed,
    InDoubt,
    Expired,
    Ended,
}

/// A transaction as the array keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GdTxn {
    pub tid: String,
    pub state: State,
    /// The service it runs (set by its first invoke; later invokes must name the same).
    pub service: Option<String>,
    /// Who runs it (while `running`) or ran it last.
    pub owner: Option<Owner>,
    /// Attempts so far.
    pub attempts: u32,
    /// Attempts allowed (0: no limit).
    pub retries: u32,
    pub ttl_ms: u64,
    pub created_ms: u64,
    /// Past it (the array's time) the transaction expires.
    pub deadline_ms: u64,
    pub result: Option<Value>,
    pub error: Option<String>,
    /// Runs only once this transaction is done.
    pub followtid: Option<String>,
    pub changed_ms: u64,
    /// Times a dead runner's transaction was taken over.
    #[serde(default)]
    pub takeovers: u32,
}

/// Counters for `/metrics`.
#[derive(Default)]
pub struct GdMetrics {
    pub started: AtomicU64,
    pub done: AtomicU64,
    pub failed: AtomicU64,
    pub in_doubt: AtomicU64,
    pub expired: AtomicU64,
    pub takeovers: AtomicU64,
    pub stored_answers: AtomicU64,
}

impl GdMetrics {
    /// Prometheus text.
    pub fn prometheus(&self) -> String {
        let mut out = String::new();
        for (name, v) in [
            ("started", &self.started),
            ("done", &self.done),
            ("failed", &self.failed),
            ("in_doubt", &self.in_doubt),
            ("expired", &self.expired),
            ("takeovers", &self.takeovers),
            ("stored_answers", &self.stored_answers),
        ] {
            out.push_str(&format!(
                "# TYPE ferrocotta_node_gd_{name}_total counter\nferrocotta_node_gd_{name}_total {}\n",
                v.load(Ordering::Relaxed)
            ));
        }
        out
    }
}

fn gd_error(status: StatusCode, code: &str, message: impl Into<String>) -> ServiceError {
    ServiceError::new(status, code, message)
}

/// The array client; guaranteed delivery needs the array.
pub fn client(node: &Node) -> Result<&ArrayClient, ServiceError> {
    match &node.backend {
        Backend::Array(c) => Ok(c),
        Backend::Local(_) => Err(gd_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "standalone",
            "guaranteed delivery keeps its transactions in the cache array; this node runs stand-alone",
        )),
    }
}

/// Whether a tid is acceptable: printable ASCII without spaces, at most [`TID_BYTES_MAX`].
pub fn check_tid(tid: &str) -> Result<(), ServiceError> {
    if tid.is_empty() || tid.len() > TID_BYTES_MAX || !tid.chars().all(|c| c.is_ascii_graphic()) {
        return Err(ServiceError::bad_request(format!(
            "a tid is 1 to {TID_BYTES_MAX} printable ASCII characters"
        )));
    }
    Ok(())
}

fn random_hex(bytes: usize) -> String {
    (0..bytes).map(|_| format!("{:02x}", rand::random::<u8>())).collect()
}

fn duration_ms(input: &Value, name: &str, default: Duration) -> Result<u64, ServiceError> {
    match input.get(name) {
        None | Some(Value::Null) => Ok(default.as_millis() as u64),
        Some(Value::Number(n)) => n
            .as_u64()
            .ok_or_else(|| ServiceError::bad_request(format!("`{name}` is a whole number of ms or a duration text"))),
        Some(Value::String(s)) => humantime::parse_duration(s)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .map_err(|e| ServiceError::bad_request(format!("`{name}`: `{s}` is not a duration ({e})"))),
        Some(_) => Err(ServiceError::bad_request(format!("`{name}` is ms or a duration text"))),
    }
}

/// The node's guaranteed-delivery engine.
pub struct Gd<'a> {
    node: &'a Node,
    client: &'a ArrayClient,
    cache: String,
}

impl<'a> Gd<'a> {
    /// The engine of this node.
    pub fn of(node: &'a Node) -> Result<Gd<'a>, ServiceError> {
        Ok(Gd {
            node,
            client: client(node)?,
            cache: node.settings.gd_cache(),
        })
    }

    fn metrics(&self) -> &GdMetrics {
        &self.node.gd_metrics
    }

    async fn now(&self, tid: &str) -> Result<u64, ServiceError> {
        self.client
            .time_of(tid.as_bytes())
            .await
            .map_err(ServiceError::from_array)
    }

    /// A transaction and its record as stored.
    pub async fn read(&self, tid: &str) -> Result<(GdTxn, Vec<u8>), ServiceError> {
        check_tid(tid)?;
        let raw = self
            .client
            .get(&self.cache, tid.as_bytes())
            .await
            .map_err(ServiceError::from_array)?
            .ok_or_else(|| {
                gd_error(
                    StatusCode::NOT_FOUND,
                    "unknown_tid",
                    format!("no transaction `{tid}` (never started, or removed after its retention)"),
                )
            })?;
        let txn = serde_json::from_slice(&raw)
            .map_err(|e| gd_error(StatusCode::INTERNAL_SERVER_ERROR, "bad_record", e.to_string()))?;
        Ok((txn, raw))
    }

    /// When a record written now expires: its retention after its deadline, or after it ended.
    fn expiry_of(&self, txn: &GdTxn, now: u64) -> Expiry {
        let retention = self.node.settings.gd_retention.as_millis() as u64;
        match txn.state {
            State::Ended => Expiry::AtMs(now.saturating_add(retention)),
            _ => Expiry::AtMs(txn.deadline_ms.max(now).saturating_add(retention)),
        }
    }

    fn put_step(&self, txn: &GdTxn, now: u64) -> Step {
        Step::Put {
            cache: self.cache.clone(),
            key: txn.tid.clone().into_bytes(),
            value: serde_json::to_vec(txn).expect("a transaction always encodes"),
            expiry: self.expiry_of(txn, now),
        }
    }

    /// Replaces a record if it still holds `raw`; whether it did.
    async fn replace(
        &self,
        raw: &[u8],
        txn: &GdTxn,
        now: u64,
        extra: (Vec<Guard>, Vec<Step>),
    ) -> Result<bool, ServiceError> {
        let (mut guards, mut steps) = extra;
        guards.push(Guard::ValueIs {
            cache: self.cache.clone(),
            key: txn.tid.clone().into_bytes(),
            value: raw.to_vec(),
        });
        steps.push(self.put_step(txn, now));
        let t = Txn {
            guards,
            then: steps,
            otherwise: Vec::new(),
        };
        Ok(self.client.txn(t).await.map_err(ServiceError::from_array)?.0)
    }

    /// `start`: a new transaction.
    pub async fn start(&self, input: &Value) -> Result<GdTxn, ServiceError> {
        let ttl_ms = duration_ms(input, "ttl", self.node.settings.gd_ttl)?;
        if ttl_ms == 0 || ttl_ms > TTL_MAX.as_millis() as u64 {
            return Err(ServiceError::bad_request(format!(
                "`ttl` is more than 0 and at most {}",
                humantime::format_duration(TTL_MAX)
            )));
        }
        let retries = match input.get("retries") {
            None | Some(Value::Null) => 0,
            Some(v) => v
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| ServiceError::bad_request("`retries` is a whole number (0: no limit)"))?,
        };
        let followtid = match input.get("followtid") {
            None | Some(Value::Null) => None,
            Some(Value::String(f)) => {
                self.read(f).await?;
                Some(f.clone())
            }
            Some(_) => return Err(ServiceError::bad_request("`followtid` is a tid")),
        };
        let tag = match input.get("tag") {
            None | Some(Value::Null) => random_hex(8),
            Some(Value::String(t)) if !t.is_empty() && t.len() <= TAG_BYTES_MAX && !t.contains(['{', '}']) => t.clone(),
            Some(_) => {
                return Err(ServiceError::bad_request(format!(
                    "`tag` is 1 to {TAG_BYTES_MAX} characters without braces"
                )))
            }
        };
        let tid = format!("{{{tag}}}.{}", random_hex(12));
        check_tid(&tid)?;
        let now = self.now(&tid).await?;
        let txn = GdTxn {
            tid: tid.clone(),
            state: State::Started,
            service: None,
            owner: None,
            attempts: 0,
            retries,
            ttl_ms,
            created_ms: now,
            deadline_ms: now.saturating_add(ttl_ms),
            result: None,
            error: None,
            followtid,
            changed_ms: now,
            takeovers: 0,
        };
        let t = Txn {
            guards: vec![Guard::Absent {
                cache: self.cache.clone(),
                key: tid.clone().into_bytes(),
            }],
            then: vec![self.put_step(&txn, now)],
            otherwise: Vec::new(),
        };
        if !self.client.txn(t).await.map_err(ServiceError::from_array)?.0 {
            return Err(gd_error(StatusCode::CONFLICT, "conflict", "tid collision; start again"));
        }
        self.metrics().started.fetch_add(1, Ordering::Relaxed);
        tracing::info!(event = "gd.started", tid = %tid);
        Ok(txn)
    }

    /// `invoke`: runs the transaction's service once and only once, or answers its stored result.
    pub async fn invoke(
        &self,
        registry: &Registry,
        tid: &str,
        service: &str,
        input: Value,
        wait: Duration,
    ) -> Result<GdTxn, ServiceError> {
        precheck(registry, service, &input)?;
        let waited_from = Instant::now();
        let me = Owner::of(self.node);
        loop {
            let (txn, raw) = self.read(tid).await?;
            if txn.service.as_deref().is_some_and(|s| s != service) {
                return Err(gd_error(
                    StatusCode::CONFLICT,
                    "other_service",
                    format!(
                        "transaction `{tid}` runs `{}`, not `{service}`",
                        txn.service.unwrap_or_default()
                    ),
                ));
            }
            match txn.state {
                State::Done => {
                    self.metrics().stored_answers.fetch_add(1, Ordering::Relaxed);
                    return Ok(txn);
                }
                State::Ended | State::Expired | State::InDoubt => {
                    return Err(gd_error(
                        StatusCode::CONFLICT,
                        match txn.state {
                            State::Ended => "ended",
                            State::Expired => "expired",
                            _ => "in_doubt",
                        },
                        format!(
                            "transaction `{tid}` is {:?}{}",
                            txn.state,
                            if txn.state == State::Ended {
                                ""
                            } else {
                                "; `restart` runs it again"
                            }
                        ),
                    ))
                }
                _ => {}
            }
            let now = self.now(tid).await?;
            // A run whose runner is alive is never expired nor taken over from under it: wait for
            // its result. This process knows its own runs; another's is alive while listed.
            let runner = txn.owner.clone().unwrap_or_else(|| me.clone());
            if txn.state == State::Running {
                let alive = if runner == me {
                    self.node.gd_in_flight.lock().expect("in-flight lock").contains(tid)
                } else {
                    let members = crate::members::read_all(self.client, &self.node.settings.members_cache())
                        .await
                        .map_err(ServiceError::from_array)?;
                    runner.listed(&members)
                };
                if alive {
                    if waited_from.elapsed() < wait {
                        tokio::time::sleep(WAIT_POLL).await;
                        continue;
                    }
                    return Err(gd_error(
                        StatusCode::CONFLICT,
                        "running",
                        format!(
                            "transaction `{tid}` runs on node {}; invoke again or retrieve later",
                            runner.node
                        ),
                    ));
                }
            }
            let out_of_retries = txn.retries > 0 && txn.attempts >= txn.retries;
            if now > txn.deadline_ms || out_of_retries {
                let mut expired = txn.clone();
                expired.state = State::Expired;
                expired.changed_ms = now;
                if self.replace(&raw, &expired, now, Default::default()).await? {
                    self.metrics().expired.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(event = "gd.expired", tid, attempts = txn.attempts);
                }
                continue;
            }
            if let Some(f) = &txn.followtid {
                let (first, _) = self.read(f).await?;
                // Done, or done and then ended by its client.
                let completed = first.state == State::Done || (first.state == State::Ended && first.result.is_some());
                if !completed {
                    if waited_from.elapsed() < wait {
                        tokio::time::sleep(WAIT_POLL).await;
                        continue;
                    }
                    return Err(gd_error(
                        StatusCode::CONFLICT,
                        "waiting_for_followtid",
                        format!(
                            "transaction `{tid}` runs only after `{f}` is done (it is {:?})",
                            first.state
                        ),
                    ));
                }
            }
            let mut claimed = txn.clone();
            if txn.state == State::Running {
                let owner = runner.clone();
                // Its runner died or lost the array: take it over as the service says.
                claimed.takeovers += 1;
                if self.node.settings.gd_takeover.get(service).copied().unwrap_or_default() == Takeover::InDoubt {
                    claimed.state = State::InDoubt;
                    claimed.changed_ms = now;
                    claimed.error = Some(format!("its runner {} died or lost the array while it ran", owner.node));
                    if self.replace(&raw, &claimed, now, Default::default()).await? {
                        self.metrics().in_doubt.fetch_add(1, Ordering::Relaxed);
                        self.metrics().takeovers.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(event = "gd.in_doubt", tid, runner = %owner.node);
                    }
                    continue;
                }
                self.metrics().takeovers.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(event = "gd.taken_over", tid, runner = %owner.node);
            }
            claimed.state = State::Running;
            claimed.owner = Some(me.clone());
            claimed.service = Some(service.to_string());
            claimed.attempts = claimed.attempts.saturating_add(1);
            claimed.changed_ms = now;
            // Marked in flight before the claim can apply, so this process never takes its own
            // live run for a dead one.
            self.node
                .gd_in_flight
                .lock()
                .expect("in-flight lock")
                .insert(tid.to_string());
            match self.replace(&raw, &claimed, now, Default::default()).await {
                Ok(true) => {}
                other => {
                    self.node.gd_in_flight.lock().expect("in-flight lock").remove(tid);
                    other?;
                    continue;
                }
            }
            let claimed_raw = serde_json::to_vec(&claimed).expect("a transaction always encodes");
            // The run goes on in its own task: a caller that goes away (its connection closed)
            // does not cut it short and leave the record `running`.
            let node = self.node.self_arc();
            let registry = self.node.registry();
            let task = tokio::spawn(async move {
                let tid = claimed.tid.clone();
                let result = match Gd::of(&node) {
                    Ok(gd) => gd.run(&registry, claimed, claimed_raw, input).await,
                    Err(e) => Err(e),
                };
                node.gd_in_flight.lock().expect("in-flight lock").remove(&tid);
                result
            });
            return task.await.map_err(|e| {
                gd_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "run_failed",
                    format!("the run ended abnormally: {e}"),
                )
            })?;
        }
    }

    /// Runs a claimed transaction's service and commits its effects with its result; if the array
    /// fails it on the way, writes `failed` back (if it still can) so the next invoke runs it.
    async fn run(
        &self,
        registry: &Registry,
        claimed: GdTxn,
        claimed_raw: Vec<u8>,
        input: Value,
    ) -> Result<GdTxn, ServiceError> {
        let result = self
            .attempt(registry, claimed.clone(), claimed_raw.clone(), input)
            .await;
        if let Err(e) = &result {
            if !matches!(e.code.as_str(), "failed" | "lost") {
                let mut failed = claimed;
                failed.state = State::Failed;
                failed.error = Some(format!("{}: {}", e.code, e.message));
                if let Ok(now) = self.now(&failed.tid).await {
                    if let Err(w) = self.replace(&claimed_raw, &failed, now, Default::default()).await {
                        tracing::warn!(event = "gd.fail_unrecorded", tid = %failed.tid, error = %w.message);
                    }
                }
            }
        }
        result
    }

    /// One run of the service, rerun while what it read changed under it.
    async fn attempt(
        &self,
        registry: &Registry,
        claimed: GdTxn,
        claimed_raw: Vec<u8>,
        input: Value,
    ) -> Result<GdTxn, ServiceError> {
        let tid = claimed.tid.clone();
        let service = claimed.service.clone().unwrap_or_default();
        tracing::info!(event = "gd.run_started", tid = %tid, service = %service, attempt = claimed.attempts, node = %self.node.logical_name);
        for _ in 0..CONFLICT_RERUNS_MAX {
            let scope = handle::Invocation::new(self.client.stripe_of(tid.as_bytes()));
            let ssnid = crate::services::new_session_id();
            let result = handle::INVOCATION
                .scope(scope.clone(), registry.call(self.node, &service, &ssnid, input.clone()))
                .await;
            let now = self.now(&tid).await?;
            let mut finished = claimed.clone();
            finished.changed_ms = now;
            let (guards, steps) = match result {
                Ok(value) => {
                    let len = serde_json::to_vec(&value).map(|v| v.len()).unwrap_or(usize::MAX);
                    if len > RESULT_BYTES_MAX {
                        finished.state = State::Failed;
                        finished.error = Some(format!(
                            "the result is {len} bytes; at most {RESULT_BYTES_MAX} are kept"
                        ));
                        (Vec::new(), Vec::new())
                    } else {
                        finished.state = State::Done;
                        finished.result = Some(value);
                        finished.error = None;
                        scope.take()
                    }
                }
                Err(e) => {
                    finished.state = State::Failed;
                    finished.error = Some(format!("{}: {}", e.code, e.message));
                    (Vec::new(), Vec::new())
                }
            };
            if self.replace(&claimed_raw, &finished, now, (guards, steps)).await? {
                match finished.state {
                    State::Done => {
                        self.metrics().done.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(event = "gd.done", tid = %tid, attempt = finished.attempts);
                        return Ok(finished);
                    }
                    _ => {
                        self.metrics().failed.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(event = "gd.failed", tid = %tid, error = finished.error.as_deref().unwrap_or(""));
                        return Err(gd_error(
                            StatusCode::UNPROCESSABLE_ENTITY,
                            "failed",
                            finished.error.unwrap_or_default(),
                        ));
                    }
                }
            }
            // The commit did not apply: either a value the service read changed (run it again on
            // fresh values; nothing was written), or the record is no longer ours.
            let (now_txn, _) = self.read(&tid).await?;
            let still_ours = serde_json::to_vec(&now_txn).map(|v| v == claimed_raw).unwrap_or(false);
            if !still_ours {
                tracing::warn!(event = "gd.lost_ownership", tid = %tid, state = ?now_txn.state);
                return Err(gd_error(
                    StatusCode::CONFLICT,
                    "lost",
                    format!(
                        "transaction `{tid}` was taken from this node while it ran (now {:?}); nothing it did was kept",
                        now_txn.state
                    ),
                ));
            }
            tracing::info!(event = "gd.rerun_after_conflict", tid = %tid);
        }
        Err(gd_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            format!("transaction `{tid}`: what its service read kept changing; invoke again"),
        ))
    }

    /// `end`: the client is done with the transaction; its record goes after the retention.
    pub async fn end(&self, tid: &str) -> Result<GdTxn, ServiceError> {
        self.change(tid, |txn| {
            if txn.state == State::Running {
                return Err(gd_error(
                    StatusCode::CONFLICT,
                    "running",
                    format!("transaction `{tid}` is running"),
                ));
            }
            txn.state = State::Ended;
            Ok(())
        })
        .await
    }

    /// `restart`: an expired, failed or in-doubt transaction may run again, with a new deadline.
    pub async fn restart(&self, tid: &str) -> Result<GdTxn, ServiceError> {
        self.change(tid, |txn| {
            if !matches!(txn.state, State::Expired | State::Failed | State::InDoubt) {
                return Err(gd_error(
                    StatusCode::CONFLICT,
                    "not_restartable",
                    format!(
                        "transaction `{tid}` is {:?}; only expired, failed or in-doubt ones restart",
                        txn.state
                    ),
                ));
            }
            txn.state = State::Started;
            txn.attempts = 0;
            txn.owner = None;
            Ok(())
        })
        .await
    }

    async fn change(
        &self,
        tid: &str,
        f: impl Fn(&mut GdTxn) -> Result<(), ServiceError>,
    ) -> Result<GdTxn, ServiceError> {
        for _ in 0..16 {
            let (mut txn, raw) = self.read(tid).await?;
            let now = self.now(tid).await?;
            f(&mut txn)?;
            txn.changed_ms = now;
            if txn.state == State::Started {
                txn.deadline_ms = now.saturating_add(txn.ttl_ms);
            }
            if self.replace(&raw, &txn, now, Default::default()).await? {
                tracing::info!(event = "gd.changed", tid, state = ?txn.state);
                return Ok(txn);
            }
        }
        Err(gd_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            format!("transaction `{tid}` kept changing"),
        ))
    }

    /// Every transaction, optionally in one state (at most `max`).
    pub async fn list(&self, state: Option<State>, max: usize) -> Result<Vec<GdTxn>, ServiceError> {
        let keys = self
            .client
            .all_keys(&self.cache, b"", max)
            .await
            .map_err(ServiceError::from_array)?;
        let values = self
            .client
            .get_all(&self.cache, &keys)
            .await
            .map_err(ServiceError::from_array)?;
        Ok(values
            .into_iter()
            .flatten()
            .filter_map(|v| serde_json::from_slice::<GdTxn>(&v).ok())
            .filter(|t| state.is_none_or(|s| t.state == s))
            .collect())
    }
}

/// What every guaranteed-delivery run of `service` must satisfy: it exists, it is not
/// administrative (those need the admin token, which a transaction does not carry), its input is
/// within bounds.
fn precheck(registry: &Registry, service: &str, input: &Value) -> Result<(), ServiceError> {
    crate::services::check_service_name(service)?;
    if !registry.has(service) {
        return Err(gd_error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no service `{service}`"),
        ));
    }
    if registry.is_administrative(service) {
        return Err(gd_error(
            StatusCode::FORBIDDEN,
            "administrative",
            format!("`{service}` is administrative: it needs the admin token and is not run under guaranteed delivery"),
        ));
    }
    let input_len = serde_json::to_vec(input).map(|v| v.len()).unwrap_or(usize::MAX);
    if input_len > INPUT_BYTES_MAX {
        return Err(ServiceError::bad_request(format!(
            "the input is {input_len} bytes; at most {INPUT_BYTES_MAX}"
        )));
    }
    Ok(())
}

/// What a finished invoke answers.
pub fn answer(txn: &GdTxn) -> Value {
    json!({"tid": txn.tid, "state": txn.state, "result": txn.result, "attempts": txn.attempts})
}

/// With an `alias`, a `pub.remote.gd` call runs on that remote cluster (its nodes, then its retry
/// server): `invoke` resubmits the tid there until it is done, as the failover client does.
async fn on_alias(node: &Node, op: &str, input: &Value) -> Option<Result<Value, ServiceError>> {
    let alias = match input.get("alias")? {
        Value::String(a) => a.clone(),
        _ => {
            return Some(Err(ServiceError::bad_request(
                "`alias` is the name of a [remote] alias",
            )))
        }
    };
    let mut forwarded = input.clone();
    forwarded.as_object_mut()?.remove("alias");
    Some(
        async {
            use crate::services::remote::{client_for, remote_error};
            let client = client_for(node, &alias, true).await?;
            if op == "invoke" {
                let (tid, service, inner, wait) = invoke_args(node, &forwarded)?;
                let deadline = wait.max(node.settings.request_timeout) * 3;
                let (_, answer) = client
                    .invoke_gd(&service, &inner, Some(tid), &json!({}), deadline)
                    .await
                    .map_err(remote_error)?;
                return Ok(answer.value);
            }
            let answer = client
                .invoke(&format!("pub.remote.gd:{op}"), &forwarded)
                .await
                .map_err(remote_error)?;
            Ok(answer.value)
        }
        .await,
    )
}

/// Registers `pub.remote.gd:*` and `demo:deposit`.
pub fn register(r: &mut Registry) {
    r.register("pub.remote.gd:start", |node, _, input| {
        Box::pin(async move {
            if let Some(remote) = on_alias(node, "start", &input).await {
                return remote;
            }
            Ok(json!({"tid": Gd::of(node)?.start(&input).await?.tid}))
        })
    });
    r.register("pub.remote.gd:invoke", |node, _, input| {
        Box::pin(async move {
            if let Some(remote) = on_alias(node, "invoke", &input).await {
                return remote;
            }
            let (tid, service, inner, wait) = invoke_args(node, &input)?;
            let registry = node.registry();
            let txn = Gd::of(node)?.invoke(&registry, &tid, &service, inner, wait).await?;
            tokio::time::sleep(node.settings.gd_answer_delay).await;
            Ok(answer(&txn))
        })
    });
    r.register("pub.remote.gd:submit", |node, _, input| {
        Box::pin(async move {
            if let Some(remote) = on_alias(node, "submit", &input).await {
                return remote;
            }
            let (tid, service, inner, wait) = invoke_args(node, &input)?;
            let gd = Gd::of(node)?;
            let registry = node.registry();
            precheck(&registry, &service, &inner)?;
            let (txn, _) = gd.read(&tid).await?;
            match txn.state {
                State::Done => return Ok(answer(&txn)),
                State::Ended | State::Expired | State::InDoubt => {
                    return Err(gd_error(
                        StatusCode::CONFLICT,
                        "not_runnable",
                        format!("transaction `{tid}` is {:?}", txn.state),
                    ))
                }
                _ => {}
            }
            let node = node.self_arc();
            tokio::spawn(async move {
                let Ok(gd) = Gd::of(&node) else { return };
                if let Err(e) = gd.invoke(&registry, &tid, &service, inner, wait).await {
                    tracing::info!(event = "gd.submit_failed", tid = %tid, code = %e.code, error = %e.message);
                }
            });
            Ok(json!({"tid": txn.tid, "state": "submitted"}))
        })
    });
    r.register("pub.remote.gd:retrieve", |node, _, input| {
        Box::pin(async move {
            if let Some(remote) = on_alias(node, "retrieve", &input).await {
                return remote;
            }
            let tid = field(&input, "tid")?;
            let (txn, _) = Gd::of(node)?.read(tid).await?;
            match txn.state {
                State::Done => Ok(answer(&txn)),
                State::Failed | State::Expired | State::InDoubt | State::Ended => Err(gd_error(
                    StatusCode::CONFLICT,
                    "not_done",
                    format!(
                        "transaction `{tid}` is {:?}: {}",
                        txn.state,
                        txn.error.unwrap_or_default()
                    ),
                )),
                _ => Ok(json!({"tid": txn.tid, "state": txn.state})),
            }
        })
    });
    r.register("pub.remote.gd:end", |node, _, input| {
        Box::pin(async move {
            if let Some(remote) = on_alias(node, "end", &input).await {
                return remote;
            }
            Ok(answer(&Gd::of(node)?.end(field(&input, "tid")?).await?))
        })
    });
    r.register("pub.remote.gd:restart", |node, _, input| {
        Box::pin(async move {
            if let Some(remote) = on_alias(node, "restart", &input).await {
                return remote;
            }
            Ok(answer(&Gd::of(node)?.restart(field(&input, "tid")?).await?))
        })
    });
    r.register("pub.remote.gd:status", |node, _, input| {
        Box::pin(async move {
            if let Some(remote) = on_alias(node, "status", &input).await {
                return remote;
            }
            let (txn, _) = Gd::of(node)?.read(field(&input, "tid")?).await?;
            Ok(serde_json::to_value(txn).unwrap_or_default())
        })
    });
    r.register("demo:deposit", |node, _, input| Box::pin(handle::deposit(node, input)));
}

/// `tid`, `service`, `input` and `timeout` (how long to wait for a transaction another node runs,
/// default the node's request timeout) of an invoke.
fn invoke_args(node: &Node, input: &Value) -> Result<(String, String, Value, Duration), ServiceError> {
    let tid = field(input, "tid")?.to_string();
    check_tid(&tid)?;
    let service = field(input, "service")?.to_string();
    let inner = input.get("input").cloned().unwrap_or_else(|| json!({}));
    let wait = Duration::from_millis(duration_ms(input, "timeout", node.settings.request_timeout)?);
    Ok((tid, service, inner, wait))
}

/// Per-service takeover settings as node.toml gives them (`[gd_takeover]`).
pub type TakeoverSettings = HashMap<String, Takeover>;
