//! Where a node's shared state lives: the array, or this process alone (stand-alone mode). The
//! storage operations the services build on, with a typed error; nothing here knows HTTP.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use ferrocotta::client::ConnectionState;
use ferrocotta::protocol::PutOptions;
use ferrocotta::{ArrayClient, ClientError};

/// Keys one listing of a cache returns at most.
pub const KEYS_LISTED_MAX: usize = 100_000;

/// Stand-alone state: values by (cache, key).
pub type LocalState = Mutex<HashMap<(String, Vec<u8>), Vec<u8>>>;

/// Where shared state lives.
pub enum Backend {
    /// The array.
    Array(ArrayClient),
    /// This process only (stand-alone mode).
    Local(LocalState),
}

/// Why a storage operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The array refused the operation or did not answer in time.
    #[error(transparent)]
    Array(#[from] ClientError),
    /// The array is away and the cache's nonstop behaviour left a write undone that the caller
    /// needs done.
    #[error("the array is unavailable and the write was not applied")]
    NotApplied,
}

impl Backend {
    /// `connected`, `disconnected` (or `standalone`).
    pub fn array_state(&self) -> &'static str {
        match self {
            Backend::Local(_) => "standalone",
            Backend::Array(c) => match c.connection_state() {
                ConnectionState::Connected => "connected",
                ConnectionState::Disconnected => "disconnected",
            },
        }
    }

    /// Reads a value of a cache.
    pub async fn get(&self, cache: &str, key: &[u8]) -> Result<Option<Vec<u8>>, BackendError> {
        match self {
            Backend::Array(c) => c.cache(cache).get(key).await.map_err(BackendError::from),
            Backend::Local(m) => Ok(m
                .lock()
                .expect("local lock")
                .get(&(cache.to_string(), key.to_vec()))
                .cloned()),
        }
    }

    /// Writes a value (with a tti, if given).
    pub async fn put(&self, cache: &str, key: &[u8], value: &[u8], tti: Option<Duration>) -> Result<(), BackendError> {
        match self {
            Backend::Array(c) => {
                let opts = PutOptions {
                    tti_ms: tti.map(|d| d.as_millis() as u64),
                    ..Default::default()
                };
                match c.cache(cache).put_with(key, value, opts).await? {
                    ferrocotta::client::WriteOutcome::Applied(_) => Ok(()),
                    // The cache's nonstop behaviour ignores writes while the array is away.
                    ferrocotta::client::WriteOutcome::NotApplied => {
                        tracing::debug!(event = "node.write_not_applied", cache);
                        Ok(())
                    }
                }
            }
            Backend::Local(m) => {
                m.lock()
                    .expect("local lock")
                    .insert((cache.to_string(), key.to_vec()), value.to_vec());
                Ok(())
            }
        }
    }

    /// Writes `value` only if the key still holds `loaded` (`None`: only if it is absent; a new
    /// entry gets `tti`); whether it did. A write that fails to answer in time and is applied later
    /// can then never overwrite what a later request wrote (it finds the value changed).
    pub async fn put_if_unchanged(
        &self,
        cache: &str,
        key: &[u8],
        loaded: Option<&[u8]>,
        value: &[u8],
        tti: Option<Duration>,
    ) -> Result<bool, BackendError> {
        use ferrocotta::client::WriteOutcome;
        match self {
            Backend::Array(c) => {
                let handle = c.cache(cache);
                let outcome = match loaded {
                    None => {
                        let opts = PutOptions {
                            tti_ms: tti.map(|d| d.as_millis() as u64),
                            ..Default::default()
                        };
                        match handle.put_if_absent_with(key, value, opts).await {
                            Ok(WriteOutcome::Applied(existing)) => WriteOutcome::Applied(existing.is_none()),
                            Ok(WriteOutcome::NotApplied) => WriteOutcome::NotApplied,
                            Err(e) => return Err(e.into()),
                        }
                    }
                    Some(old) => handle.replace_if_equal(key, old, value).await?,
                };
                match outcome {
                    WriteOutcome::Applied(done) => Ok(done),
                    // The cache's nonstop behaviour ignores writes while the array is away.
                    WriteOutcome::NotApplied => {
                        tracing::debug!(event = "node.write_not_applied", cache);
                        Ok(true)
                    }
                }
            }
            Backend::Local(m) => {
                let mut m = m.lock().expect("local lock");
                let slot = (cache.to_string(), key.to_vec());
                if m.get(&slot).map(Vec::as_slice) != loaded {
                    return Ok(false);
                }
                m.insert(slot, value.to_vec());
                Ok(true)
            }
        }
    }

    /// Removes a key; whether it was there.
    pub async fn remove(&self, cache: &str, key: &[u8]) -> Result<bool, BackendError> {
        match self {
            Backend::Array(c) => match c.cache(cache).remove(key).await? {
                ferrocotta::client::WriteOutcome::Applied(prev) => Ok(prev.is_some()),
                ferrocotta::client::WriteOutcome::NotApplied => Err(BackendError::NotApplied),
            },
            Backend::Local(m) => Ok(m
                .lock()
                .expect("local lock")
                .remove(&(cache.to_string(), key.to_vec()))
                .is_some()),
        }
    }

    /// Sets a key only if absent; `None` when written, else the value already there.
    pub async fn put_if_absent(&self, cache: &str, key: &[u8], value: &[u8]) -> Result<Option<Vec<u8>>, BackendError> {
        match self {
            Backend::Array(c) => match c.cache(cache).put_if_absent(key, value).await? {
                ferrocotta::client::WriteOutcome::Applied(v) => Ok(v),
                ferrocotta::client::WriteOutcome::NotApplied => Err(BackendError::NotApplied),
            },
            Backend::Local(m) => {
                let mut m = m.lock().expect("local lock");
                let k = (cache.to_string(), key.to_vec());
                if let Some(v) = m.get(&k) {
                    return Ok(Some(v.clone()));
                }
                m.insert(k, value.to_vec());
                Ok(None)
            }
        }
    }

    /// Compare-and-swap; whether it was swapped.
    pub async fn replace_if_equal(
        &self,
        cache: &str,
        key: &[u8],
        expected: &[u8],
        value: &[u8],
    ) -> Result<bool, BackendError> {
        match self {
            Backend::Array(c) => match c.cache(cache).replace_if_equal(key, expected, value).await? {
                ferrocotta::client::WriteOutcome::Applied(b) => Ok(b),
                ferrocotta::client::WriteOutcome::NotApplied => Err(BackendError::NotApplied),
            },
            Backend::Local(m) => {
                let mut m = m.lock().expect("local lock");
                let k = (cache.to_string(), key.to_vec());
                if m.get(&k).is_some_and(|v| v == expected) {
                    m.insert(k, value.to_vec());
                    return Ok(true);
                }
                Ok(false)
            }
        }
    }

    /// Removes a key only if it holds `expected`.
    pub async fn remove_if_equal(&self, cache: &str, key: &[u8], expected: &[u8]) -> Result<bool, BackendError> {
        match self {
            Backend::Array(c) => c
                .remove_if_equal(cache, key, expected)
                .await
                .map_err(BackendError::from),
            Backend::Local(m) => {
                let mut m = m.lock().expect("local lock");
                let k = (cache.to_string(), key.to_vec());
                if m.get(&k).is_some_and(|v| v == expected) {
                    m.remove(&k);
                    return Ok(true);
                }
                Ok(false)
            }
        }
    }

    /// Every key of a cache.
    pub async fn keys(&self, cache: &str) -> Result<Vec<Vec<u8>>, BackendError> {
        match self {
            Backend::Array(c) => c
                .cache(cache)
                .keys(b"", KEYS_LISTED_MAX)
                .await
                .map_err(BackendError::from),
            Backend::Local(m) => Ok(m
                .lock()
                .expect("local lock")
                .keys()
                .filter(|(c, _)| c == cache)
                .map(|(_, k)| k.clone())
                .collect()),
        }
    }

    /// Removes every key of a cache, one by one; how many were removed.
    pub async fn remove_all(&self, cache: &str) -> Result<u64, BackendError> {
        let mut removed = 0u64;
        for k in self.keys(cache).await? {
            removed += self.remove(cache, &k).await? as u64;
        }
        Ok(removed)
    }
}
