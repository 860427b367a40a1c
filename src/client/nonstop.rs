//! Nonstop caches (SPEC 3.3): every operation answers within its cache's timeout, whatever the
//! array does, in the way the cache's `timeout_behavior` says.
//!
//! | behaviour | reads (get, contains, keys, size) | writes (put, remove, CAS, clear) |
//! |---|---|---|
//! | `exception` (default) | error `NonstopTimeout` | error `NonstopTimeout` |
//! | `noop` | empty result (None, false, empty, 0) | ignored, `WriteOutcome::NotApplied` |
//! | `local_reads` | last value this client saw or wrote | ignored, `WriteOutcome::NotApplied` |
//! | `local_reads_and_exception_on_write` | last value this client saw or wrote | error `NonstopTimeout` |
//!
//! Defaults are Ehcache's: `timeout` 30 s, `immediate_timeout_when_disconnected` false,
//! `bulk_ops_timeout_multiply_factor` 10 (bulk operations: `get_all`, `put_all`, `keys`, `size`,
//! `clear`). With `immediate_timeout_when_disconnected`, a client that knows it is disconnected
//! applies the behaviour at once instead of waiting. Lock operations raise on timeout whatever the
//! behaviour (see [`ArrayClient::lock`]).
//!
//! A write that times out under `noop` or `local_reads` is reported `NotApplied`; if the connection
//! broke after the request left, the array may still apply it (the client cannot know).
//!
//! Local copies (for the `local_reads` behaviours) are kept per cache, at most
//! [`LOCAL_COPIES_MAX`] keys, oldest dropped first, and are cleared on rejoin.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::{ArrayClient, ClientError, Entry};
use crate::protocol::PutOptions;

/// Keys a cache keeps local copies of, at most.
pub const LOCAL_COPIES_MAX: usize = 10_000;

/// What a nonstop cache does when its timeout passes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimeoutBehavior {
    /// Raise `NonstopTimeout`.
    #[default]
    Exception,
    /// Reads return empty results; writes are ignored.
    Noop,
    /// Reads return the local copy; writes are ignored.
    LocalReads,
    /// Reads return the local copy; writes raise `NonstopTimeout`.
    LocalReadsAndExceptionOnWrite,
}

/// Nonstop settings of a cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NonstopSettings {
    /// Longest an operation may take.
    #[serde(with = "humantime_serde_compat")]
    pub timeout: Duration,
    /// Apply the behaviour at once while the client knows it is disconnected.
    pub immediate_timeout_when_disconnected: bool,
    /// Bulk operations get `timeout` times this.
    pub bulk_ops_timeout_multiply_factor: u32,
    /// What happens on timeout.
    pub timeout_behavior: TimeoutBehavior,
}

impl Default for NonstopSettings {
    fn default() -> Self {
        NonstopSettings {
            timeout: Duration::from_secs(30),
            immediate_timeout_when_disconnected: false,
            bulk_ops_timeout_multiply_factor: 10,
            timeout_behavior: TimeoutBehavior::Exception,
        }
    }
}

/// Durations as `"30s"` in config files.
mod humantime_serde_compat {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = <String as serde::Deserialize>::deserialize(d)?;
        humantime::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

/// The outcome of a write on a nonstop cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOutcome<T> {
    /// The array applied it; its answer.
    Applied(T),
    /// The timeout passed and the behaviour ignores writes.
    NotApplied,
}

/// Local copies of every cache.
#[derive(Debug, Default)]
pub(super) struct LocalCopies {
    caches: Mutex<HashMap<String, Copies>>,
}

#[derive(Debug, Default)]
struct Copies {
    /// Last value seen or written (`None`: seen absent).
    values: HashMap<Vec<u8>, Option<Vec<u8>>>,
    /// Insertion order, for dropping the oldest.
    order: VecDeque<Vec<u8>>,
}

impl LocalCopies {
    fn remember(&self, cache: &str, key: &[u8], value: Option<Vec<u8>>) {
        let mut caches = self.caches.lock().expect("local copies lock");
        let c = caches.entry(cache.to_string()).or_default();
        if c.values.insert(key.to_vec(), value).is_none() {
            c.order.push_back(key.to_vec());
            while c.order.len() > LOCAL_COPIES_MAX {
                if let Some(old) = c.order.pop_front() {
                    c.values.remove(&old);
                }
            }
        }
    }

    fn recall(&self, cache: &str, key: &[u8]) -> Option<Vec<u8>> {
        let caches = self.caches.lock().expect("local copies lock");
        caches.get(cache).and_then(|c| c.values.get(key).cloned()).flatten()
    }

    fn keys(&self, cache: &str, prefix: &[u8]) -> Vec<Vec<u8>> {
        let caches = self.caches.lock().expect("local copies lock");
        let mut keys: Vec<Vec<u8>> = caches
            .get(cache)
            .map(|c| {
                c.values
                    .iter()
                    .filter(|(k, v)| v.is_some() && k.starts_with(prefix))
                    .map(|(k, _)| k.clone())
                    .collect()
            })
            .unwrap_or_default();
        keys.sort();
        keys
    }

    fn forget_cache(&self, cache: &str) {
        self.caches.lock().expect("local copies lock").remove(cache);
    }

    pub(super) fn clear(&self) {
        self.caches.lock().expect("local copies lock").clear();
    }

    /// Keys held locally across every cache.
    pub(super) fn len(&self) -> usize {
        self.caches
            .lock()
            .expect("local copies lock")
            .values()
            .map(|c| c.values.len())
            .sum()
    }
}

impl ArrayClient {
    /// The nonstop settings of a cache.
    pub fn nonstop_settings(&self, cache: &str) -> NonstopSettings {
        self.inner
            .settings
            .nonstop
            .get(cache)
            .copied()
            .unwrap_or(self.inner.settings.default_nonstop)
    }

    /// A nonstop handle on a cache.
    pub fn cache(&self, name: &str) -> CacheHandle {
        CacheHandle {
            client: self.clone(),
            name: name.to_string(),
            settings: self.nonstop_settings(name),
        }
    }

    /// Keys held as local copies (for tests and metrics).
    pub fn local_copies(&self) -> usize {
        self.inner.local.len()
    }
}

/// A cache seen through its nonstop settings.
#[derive(Clone)]
pub struct CacheHandle {
    client: ArrayClient,
    name: String,
    settings: NonstopSettings,
}

impl CacheHandle {
    /// The cache name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The settings in force.
    pub fn settings(&self) -> NonstopSettings {
        self.settings
    }

    fn uses_local(&self) -> bool {
        matches!(
            self.settings.timeout_behavior,
            TimeoutBehavior::LocalReads | TimeoutBehavior::LocalReadsAndExceptionOnWrite
        )
    }

    /// Runs `f` within the nonstop timeout (`bulk`: multiplied). `Ok(Ok(v))` answered;
    /// `Ok(Err(()))` the timeout applies; `Err(e)` a definite error to pass on.
    async fn bounded<T, F>(&self, bulk: bool, f: F) -> Result<Result<T, ()>, ClientError>
    where
        F: std::future::Future<Output = Result<T, ClientError>>,
    {
        let timeout = if bulk {
            self.settings.timeout * self.settings.bulk_ops_timeout_multiply_factor.max(1)
        } else {
            self.settings.timeout
        };
        let timed_out = || {
            self.client
                .inner
                .nonstop_timeouts
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(Err(()))
        };
        if self.settings.immediate_timeout_when_disconnected
            && self.client.connection_state() == super::ConnectionState::Disconnected
        {
            return timed_out();
        }
        let started = Instant::now();
        match tokio::time::timeout(timeout, f).await {
            Ok(Ok(v)) => Ok(Ok(v)),
            Ok(Err(e)) if e.is_unavailability() => {
                tracing::debug!(event = "client.nonstop_timeout", cache = %self.name, error = %e, after = ?started.elapsed());
                timed_out()
            }
            Ok(Err(e)) => Err(e),
            Err(_) => {
                self.client.mark_disconnected();
                timed_out()
            }
        }
    }

    fn timeout_error(&self, op: &'static str, bulk: bool) -> ClientError {
        let t = if bulk {
            self.settings.timeout * self.settings.bulk_ops_timeout_multiply_factor.max(1)
        } else {
            self.settings.timeout
        };
        ClientError::NonstopTimeout {
            op,
            cache: self.name.clone(),
            timeout: t,
        }
    }

    /// The timed-out outcome of a write.
    fn write_timed_out<T>(&self, op: &'static str, bulk: bool) -> Result<WriteOutcome<T>, ClientError> {
        match self.settings.timeout_behavior {
            TimeoutBehavior::Exception | TimeoutBehavior::LocalReadsAndExceptionOnWrite => {
                Err(self.timeout_error(op, bulk))
            }
            TimeoutBehavior::Noop | TimeoutBehavior::LocalReads => Ok(WriteOutcome::NotApplied),
        }
    }

    fn read_timed_out(&self, op: &'static str, bulk: bool) -> Result<(), ClientError> {
        match self.settings.timeout_behavior {
            TimeoutBehavior::Exception => Err(self.timeout_error(op, bulk)),
            _ => Ok(()),
        }
    }

    /// The value of a key.
    pub async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, ClientError> {
        match self.bounded(false, self.client.get(&self.name, key)).await? {
            Ok(v) => {
                if self.uses_local() {
                    self.client.inner.local.remember(&self.name, key, v.clone());
                }
                Ok(v)
            }
            Err(()) => {
                self.read_timed_out("get", false)?;
                Ok(if self.uses_local() {
                    self.client.inner.local.recall(&self.name, key)
                } else {
                    None
                })
            }
        }
    }

    /// Whether a key is present.
    pub async fn contains(&self, key: &[u8]) -> Result<bool, ClientError> {
        match self.bounded(false, self.client.contains(&self.name, key)).await? {
            Ok(b) => Ok(b),
            Err(()) => {
                self.read_timed_out("contains", false)?;
                Ok(self.uses_local() && self.client.inner.local.recall(&self.name, key).is_some())
            }
        }
    }

    /// Every key with a prefix (bulk).
    pub async fn keys(&self, prefix: &[u8], max: usize) -> Result<Vec<Vec<u8>>, ClientError> {
        match self
            .bounded(true, self.client.all_keys(&self.name, prefix, max))
            .await?
        {
            Ok(k) => Ok(k),
            Err(()) => {
                self.read_timed_out("keys", true)?;
                Ok(if self.uses_local() {
                    self.client.inner.local.keys(&self.name, prefix)
                } else {
                    Vec::new()
                })
            }
        }
    }

    /// Number of entries (bulk).
    pub async fn size(&self) -> Result<u64, ClientError> {
        match self.bounded(true, self.client.size(&self.name)).await? {
            Ok(n) => Ok(n),
            Err(()) => {
                self.read_timed_out("size", true)?;
                Ok(if self.uses_local() {
                    self.client.inner.local.keys(&self.name, b"").len() as u64
                } else {
                    0
                })
            }
        }
    }

    /// Values of many keys (bulk).
    pub async fn get_all(&self, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>, ClientError> {
        match self.bounded(true, self.client.get_all(&self.name, keys)).await? {
            Ok(v) => {
                if self.uses_local() {
                    for (k, v) in keys.iter().zip(&v) {
                        self.client.inner.local.remember(&self.name, k, v.clone());
                    }
                }
                Ok(v)
            }
            Err(()) => {
                self.read_timed_out("get_all", true)?;
                Ok(keys
                    .iter()
                    .map(|k| {
                        if self.uses_local() {
                            self.client.inner.local.recall(&self.name, k)
                        } else {
                            None
                        }
                    })
                    .collect())
            }
        }
    }

    async fn write<T>(
        &self,
        op: &'static str,
        bulk: bool,
        f: impl std::future::Future<Output = Result<T, ClientError>>,
    ) -> Result<WriteOutcome<T>, ClientError> {
        match self.bounded(bulk, f).await? {
            Ok(v) => Ok(WriteOutcome::Applied(v)),
            Err(()) => self.write_timed_out(op, bulk),
        }
    }

    /// Sets a key; the previous value when applied.
    pub async fn put(&self, key: &[u8], value: &[u8]) -> Result<WriteOutcome<Option<Vec<u8>>>, ClientError> {
        self.put_with(key, value, PutOptions::default()).await
    }

    /// Sets a key with its own ttl/tti.
    pub async fn put_with(
        &self,
        key: &[u8],
        value: &[u8],
        opts: PutOptions,
    ) -> Result<WriteOutcome<Option<Vec<u8>>>, ClientError> {
        let out = self
            .write("put", false, self.client.put_with(&self.name, key, value, opts))
            .await?;
        if matches!(out, WriteOutcome::Applied(_)) && self.uses_local() {
            self.client.inner.local.remember(&self.name, key, Some(value.to_vec()));
        }
        Ok(out)
    }

    /// Sets many keys (bulk).
    pub async fn put_all(&self, entries: &[Entry]) -> Result<WriteOutcome<()>, ClientError> {
        let out = self
            .write("put_all", true, self.client.put_all(&self.name, entries))
            .await?;
        if matches!(out, WriteOutcome::Applied(_)) && self.uses_local() {
            for (k, v) in entries {
                self.client.inner.local.remember(&self.name, k, Some(v.clone()));
            }
        }
        Ok(out)
    }

    /// Sets a key if absent; the value already there when applied.
    pub async fn put_if_absent(&self, key: &[u8], value: &[u8]) -> Result<WriteOutcome<Option<Vec<u8>>>, ClientError> {
        self.put_if_absent_with(key, value, PutOptions::default()).await
    }

    /// Sets a key if absent, with the new entry's own ttl/tti/session.
    pub async fn put_if_absent_with(
        &self,
        key: &[u8],
        value: &[u8],
        opts: PutOptions,
    ) -> Result<WriteOutcome<Option<Vec<u8>>>, ClientError> {
        let out = self
            .write(
                "put_if_absent",
                false,
                self.client.put_if_absent_with(&self.name, key, value, opts),
            )
            .await?;
        if let WriteOutcome::Applied(existing) = &out {
            if self.uses_local() {
                let now = existing.clone().unwrap_or_else(|| value.to_vec());
                self.client.inner.local.remember(&self.name, key, Some(now));
            }
        }
        Ok(out)
    }

    /// Compare-and-swap.
    pub async fn replace_if_equal(
        &self,
        key: &[u8],
        expected: &[u8],
        value: &[u8],
    ) -> Result<WriteOutcome<bool>, ClientError> {
        let out = self
            .write(
                "replace_if_equal",
                false,
                self.client.replace_if_equal(&self.name, key, expected, value),
            )
            .await?;
        if out == WriteOutcome::Applied(true) && self.uses_local() {
            self.client.inner.local.remember(&self.name, key, Some(value.to_vec()));
        }
        Ok(out)
    }

    /// Removes a key; the previous value when applied.
    pub async fn remove(&self, key: &[u8]) -> Result<WriteOutcome<Option<Vec<u8>>>, ClientError> {
        let out = self.write("remove", false, self.client.remove(&self.name, key)).await?;
        if matches!(out, WriteOutcome::Applied(_)) && self.uses_local() {
            self.client.inner.local.remember(&self.name, key, None);
        }
        Ok(out)
    }

    /// Removes every entry (bulk).
    pub async fn clear(&self) -> Result<WriteOutcome<()>, ClientError> {
        let out = self.write("clear", true, self.client.clear(&self.name)).await?;
        if matches!(out, WriteOutcome::Applied(_)) {
            self.client.inner.local.forget_cache(&self.name);
        }
        Ok(out)
    }

    /// Adds to a counter; the new value when applied.
    pub async fn increment(&self, key: &[u8], delta: i64) -> Result<WriteOutcome<i64>, ClientError> {
        let out = self
            .write("increment", false, self.client.increment(&self.name, key, delta))
            .await?;
        if let WriteOutcome::Applied(n) = &out {
            if self.uses_local() {
                self.client
                    .inner
                    .local
                    .remember(&self.name, key, Some(n.to_string().into_bytes()));
            }
        }
        Ok(out)
    }
}
