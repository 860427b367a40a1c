//! The cache operations of [`ArrayClient`]: one key goes to its stripe, many keys are split by
//! stripe and sent at once, whole-cache operations go to every stripe.

use std::collections::HashMap;

use crate::protocol::{ErrorReply, Op, PutOptions, ReadConsistency, ReadOp, Reply, StepReply, Txn, WriteOp};

use super::{ArrayClient, ClientError, Entry, KeysCursor, KeysPage, ALL_KEYS_PAGE};

impl ArrayClient {
    /// The stripe that owns a key.
    pub fn stripe_of(&self, key: &[u8]) -> usize {
        self.routing().config.stripe_of_key(key)
    }

    pub(super) fn check_key(&self, key: &[u8]) -> Result<(), ClientError> {
        let max = self.routing().config.limits.max_key_bytes as usize;
        if key.is_empty() || key.len() > max {
            return Err(ClientError::Invalid(format!("keys must be 1 to {max} bytes")));
        }
        Ok(())
    }

    pub(super) async fn keyed(&self, key: &[u8], op: Op) -> Result<Reply, ClientError> {
        self.check_key(key)?;
        self.follow_moves(|| self.execute(self.stripe_of(key), op.clone(), self.inner.settings.request_timeout))
            .await
    }

    /// The value of a key (linearizable).
    pub async fn get(&self, cache: &str, key: &[u8]) -> Result<Option<Vec<u8>>, ClientError> {
        self.get_with(cache, key, ReadConsistency::Linearizable).await
    }

    /// The value of a key with the given consistency.
    pub async fn get_with(
        &self,
        cache: &str,
        key: &[u8],
        read: ReadConsistency,
    ) -> Result<Option<Vec<u8>>, ClientError> {
        let op = Op::Read(
            ReadOp::Get {
                cache: cache.into(),
                key: key.to_vec(),
            },
            read,
        );
        expect_value(self.keyed(key, op).await?)
    }

    /// Values of many keys, in the order asked.
    pub async fn get_all(&self, cache: &str, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>, ClientError> {
        self.follow_moves(|| self.get_all_once(cache, keys)).await
    }

    async fn get_all_once(&self, cache: &str, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>, ClientError> {
        let mut by_stripe: HashMap<usize, Vec<usize>> = HashMap::new();
        for (i, k) in keys.iter().enumerate() {
            self.check_key(k)?;
            by_stripe.entry(self.stripe_of(k)).or_default().push(i);
        }
        let mut out = vec![None; keys.len()];
        let (indexes, requests): (Vec<Vec<usize>>, Vec<(usize, Op)>) = by_stripe
            .into_iter()
            .map(|(stripe, idx)| {
                let keys = idx.iter().map(|&i| keys[i].clone()).collect();
                let op = Op::Read(
                    ReadOp::GetAll {
                        cache: cache.into(),
                        keys,
                    },
                    ReadConsistency::Linearizable,
                );
                (idx, (stripe, op))
            })
            .unzip();
        for (idx, result) in indexes.into_iter().zip(self.per_stripe(requests).await) {
            match result? {
                Reply::Values(vals) if vals.len() == idx.len() => {
                    for (i, v) in idx.into_iter().zip(vals) {
                        out[i] = v;
                    }
                }
                other => return Err(unexpected(other)),
            }
        }
        Ok(out)
    }

    /// Whether a key is present.
    pub async fn contains(&self, cache: &str, key: &[u8]) -> Result<bool, ClientError> {
        let op = Op::Read(
            ReadOp::Contains {
                cache: cache.into(),
                key: key.to_vec(),
            },
            ReadConsistency::Linearizable,
        );
        expect_bool(self.keyed(key, op).await?)
    }

    /// Sets a key; returns the previous value.
    pub async fn put(&self, cache: &str, key: &[u8], value: &[u8]) -> Result<Option<Vec<u8>>, ClientError> {
        self.put_with(cache, key, value, PutOptions::default()).await
    }

    /// Sets a key with a time to live or to idle of its own; returns the previous value.
    pub async fn put_with(
        &self,
        cache: &str,
        key: &[u8],
        value: &[u8],
        opts: PutOptions,
    ) -> Result<Option<Vec<u8>>, ClientError> {
        let op = Op::Write(WriteOp::Put {
            cache: cache.into(),
            key: key.to_vec(),
            value: value.to_vec(),
            opts,
        });
        expect_value(self.keyed(key, op).await?)
    }

    /// Sets a key tied to this client's session: the array removes it when the session ends
    /// (the client is gone longer than the reconnect window, or closes). Returns the previous value.
    pub async fn put_ephemeral(&self, cache: &str, key: &[u8], value: &[u8]) -> Result<Option<Vec<u8>>, ClientError> {
        self.in_session(key, |opts| WriteOp::Put {
            cache: cache.into(),
            key: key.to_vec(),
            value: value.to_vec(),
            opts,
        })
        .await
    }

    /// Like [`ArrayClient::put_ephemeral`], only if the key is absent: one replicated step, so of
    /// clients racing for a key exactly one gets `None`; the others get the value already there.
    pub async fn put_ephemeral_if_absent(
        &self,
        cache: &str,
        key: &[u8],
        value: &[u8],
    ) -> Result<Option<Vec<u8>>, ClientError> {
        self.in_session(key, |opts| WriteOp::PutIfAbsent {
            cache: cache.into(),
            key: key.to_vec(),
            value: value.to_vec(),
            opts,
        })
        .await
    }

    /// A write of `key` tied to this client's session on the key's stripe: `op` gets the options
    /// naming the session. A session the stripe no longer knows is rejoined once, then retried.
    async fn in_session(&self, key: &[u8], op: impl Fn(PutOptions) -> WriteOp) -> Result<Option<Vec<u8>>, ClientError> {
        self.check_key(key)?;
        self.follow_moves(|| self.in_session_once(key, &op)).await
    }

    async fn in_session_once(
        &self,
        key: &[u8],
        op: &impl Fn(PutOptions) -> WriteOp,
    ) -> Result<Option<Vec<u8>>, ClientError> {
        let stripe = self.stripe_of(key);
        let mut retried = false;
        loop {
            let session = self.session_for(stripe).await?;
            let opts = PutOptions {
                session: Some(session),
                ..PutOptions::default()
            };
            match self
                .execute(stripe, Op::Write(op(opts)), self.inner.settings.request_timeout)
                .await
            {
                Err(ClientError::Server(ErrorReply::SessionExpired)) if !retried => {
                    self.rejoin(stripe, session).await?;
                    retried = true;
                }
                other => return expect_value(other?),
            }
        }
    }

    /// Sets many keys; atomic per stripe.
    pub async fn put_all(&self, cache: &str, entries: &[Entry]) -> Result<(), ClientError> {
        self.follow_moves(|| self.put_all_once(cache, entries)).await
    }

    async fn put_all_once(&self, cache: &str, entries: &[Entry]) -> Result<(), ClientError> {
        let mut by_stripe: HashMap<usize, Vec<Entry>> = HashMap::new();
        for (k, v) in entries {
            self.check_key(k)?;
            by_stripe
                .entry(self.stripe_of(k))
                .or_default()
                .push((k.clone(), v.clone()));
        }
        let requests = by_stripe.into_iter().map(|(stripe, entries)| {
            let op = Op::Write(WriteOp::PutAll {
                cache: cache.into(),
                entries,
            });
            (stripe, op)
        });
        for r in self.per_stripe(requests.collect()).await {
            r?;
        }
        Ok(())
    }

    /// Sets a key if it is absent; returns the value already there, if any.
    pub async fn put_if_absent(&self, cache: &str, key: &[u8], value: &[u8]) -> Result<Option<Vec<u8>>, ClientError> {
        self.put_if_absent_with(cache, key, value, PutOptions::default()).await
    }

    /// Like [`ArrayClient::put_if_absent`], with the new entry's own ttl/tti/session.
    pub async fn put_if_absent_with(
        &self,
        cache: &str,
        key: &[u8],
        value: &[u8],
        opts: PutOptions,
    ) -> Result<Option<Vec<u8>>, ClientError> {
        let op = Op::Write(WriteOp::PutIfAbsent {
            cache: cache.into(),
            key: key.to_vec(),
            value: value.to_vec(),
            opts,
        });
        expect_value(self.keyed(key, op).await?)
    }

    /// Sets a key only if present; returns the previous value (`None`: nothing was replaced).
    pub async fn replace(&self, cache: &str, key: &[u8], value: &[u8]) -> Result<Option<Vec<u8>>, ClientError> {
        let op = Op::Write(WriteOp::Replace {
            cache: cache.into(),
            key: key.to_vec(),
            value: value.to_vec(),
        });
        expect_value(self.keyed(key, op).await?)
    }

    /// Compare-and-swap: sets `key` to `value` only if it holds `expected`.
    pub async fn replace_if_equal(
        &self,
        cache: &str,
        key: &[u8],
        expected: &[u8],
        value: &[u8],
    ) -> Result<bool, ClientError> {
        let op = Op::Write(WriteOp::ReplaceIfEqual {
            cache: cache.into(),
            key: key.to_vec(),
            expected: expected.to_vec(),
            value: value.to_vec(),
        });
        expect_bool(self.keyed(key, op).await?)
    }

    /// Removes a key; returns the previous value.
    pub async fn remove(&self, cache: &str, key: &[u8]) -> Result<Option<Vec<u8>>, ClientError> {
        let op = Op::Write(WriteOp::Remove {
            cache: cache.into(),
            key: key.to_vec(),
        });
        expect_value(self.keyed(key, op).await?)
    }

    /// Removes a key only if it holds `expected`.
    pub async fn remove_if_equal(&self, cache: &str, key: &[u8], expected: &[u8]) -> Result<bool, ClientError> {
        let op = Op::Write(WriteOp::RemoveIfEqual {
            cache: cache.into(),
            key: key.to_vec(),
            expected: expected.to_vec(),
        });
        expect_bool(self.keyed(key, op).await?)
    }

    /// Adds `delta` to a counter; returns the new value.
    pub async fn increment(&self, cache: &str, key: &[u8], delta: i64) -> Result<i64, ClientError> {
        let op = Op::Write(WriteOp::Increment {
            cache: cache.into(),
            key: key.to_vec(),
            delta,
        });
        match self.keyed(key, op).await? {
            Reply::Counter(n) => Ok(n),
            other => Err(unexpected(other)),
        }
    }

    /// Runs a transaction (guards, then the steps of the branch they choose, all or nothing) on
    /// the one stripe its keys belong to: give related keys one hash tag (`{order42}.lines`,
    /// `{order42}.total`). Returns whether the guards held and each step's result.
    pub async fn txn(&self, txn: Txn) -> Result<(bool, Vec<StepReply>), ClientError> {
        self.follow_moves(|| self.txn_once(txn.clone())).await
    }

    async fn txn_once(&self, txn: Txn) -> Result<(bool, Vec<StepReply>), ClientError> {
        txn.check().map_err(ClientError::Invalid)?;
        let mut stripes = std::collections::BTreeSet::new();
        for (_, key, _) in txn.targets() {
            self.check_key(key)?;
            stripes.insert(self.stripe_of(key));
        }
        let stripe = match stripes.len() {
            1 => stripes.into_iter().next().unwrap_or_default(),
            0 => return Err(ClientError::Invalid("a transaction needs at least one key".into())),
            _ => return Err(ClientError::Invalid(
                "a transaction's keys must all be on one stripe: give them one hash tag, as in `{tag}.a` and `{tag}.b`"
                    .into(),
            )),
        };
        let op = Op::Write(WriteOp::Txn(txn));
        match self.execute(stripe, op, self.inner.settings.request_timeout).await? {
            Reply::Txn { succeeded, results } => Ok((succeeded, results)),
            other => Err(unexpected(other)),
        }
    }

    /// The time of the stripe that holds `key`, ms since the Unix epoch: its active's clock, the
    /// one that stamps that stripe's log entries (and so judges expiry). Integration nodes judge
    /// scheduled firings by it instead of their own wall clocks.
    pub async fn time_of(&self, key: &[u8]) -> Result<u64, ClientError> {
        let op = Op::Read(ReadOp::Time, ReadConsistency::Linearizable);
        match self.keyed(key, op).await? {
            Reply::Time(ms) => Ok(ms),
            other => Err(unexpected(other)),
        }
    }

    /// One page of keys with `prefix`, starting at `cursor` (`None`: the beginning).
    pub async fn keys(
        &self,
        cache: &str,
        prefix: &[u8],
        cursor: Option<KeysCursor>,
        limit: u32,
    ) -> Result<KeysPage, ClientError> {
        let cursor = cursor.unwrap_or_default();
        let stripes = self.routing().config.stripes.len();
        if cursor.stripe >= stripes {
            return Ok(KeysPage {
                keys: Vec::new(),
                next: None,
            });
        }
        let op = Op::Read(
            ReadOp::Keys {
                cache: cache.into(),
                prefix: prefix.to_vec(),
                after: cursor.after.clone(),
                limit: limit.clamp(1, crate::protocol::KEYS_PAGE_MAX),
            },
            ReadConsistency::Linearizable,
        );
        match self
            .execute(cursor.stripe, op, self.inner.settings.request_timeout)
            .await?
        {
            Reply::Keys { keys, more } => {
                let next = if more {
                    Some(KeysCursor {
                        stripe: cursor.stripe,
                        after: keys.last().cloned(),
                    })
                } else if cursor.stripe + 1 < stripes {
                    Some(KeysCursor {
                        stripe: cursor.stripe + 1,
                        after: None,
                    })
                } else {
                    None
                };
                Ok(KeysPage { keys, next })
            }
            other => Err(unexpected(other)),
        }
    }

    /// Every key with `prefix`, following pages to the end (at most `max` keys).
    pub async fn all_keys(&self, cache: &str, prefix: &[u8], max: usize) -> Result<Vec<Vec<u8>>, ClientError> {
        let mut out = Vec::new();
        let mut cursor = None;
        loop {
            let page = self.keys(cache, prefix, cursor, ALL_KEYS_PAGE).await?;
            out.extend(page.keys);
            if out.len() >= max {
                out.truncate(max);
                return Ok(out);
            }
            match page.next {
                Some(c) => cursor = Some(c),
                None => return Ok(out),
            }
        }
    }

    /// Number of entries of a cache across all stripes.
    pub async fn size(&self, cache: &str) -> Result<u64, ClientError> {
        let op = Op::Read(ReadOp::Size { cache: cache.into() }, ReadConsistency::Linearizable);
        let mut total = 0;
        for r in self.every_stripe(op).await {
            match r? {
                Reply::Size(n) => total += n,
                other => return Err(unexpected(other)),
            }
        }
        Ok(total)
    }

    /// Creates a cache with these settings on every stripe, unless it exists there (settings are
    /// fixed at creation). Returns whether any stripe created it.
    pub async fn create_cache(
        &self,
        cache: &str,
        settings: crate::protocol::CacheSettings,
    ) -> Result<bool, ClientError> {
        let op = Op::Write(WriteOp::CreateCache {
            cache: cache.into(),
            settings,
        });
        let mut created = false;
        for r in self.every_stripe(op).await {
            created |= expect_bool(r?)?;
        }
        Ok(created)
    }

    /// Removes every entry of a cache on every stripe.
    pub async fn clear(&self, cache: &str) -> Result<(), ClientError> {
        for r in self
            .every_stripe(Op::Write(WriteOp::Clear { cache: cache.into() }))
            .await
        {
            r?;
        }
        Ok(())
    }

    /// Runs requests on their stripes at once, each with the request timeout; replies in the order
    /// given.
    async fn per_stripe(&self, requests: Vec<(usize, Op)>) -> Vec<Result<Reply, ClientError>> {
        let timeout = self.inner.settings.request_timeout;
        let calls = requests
            .into_iter()
            .map(|(stripe, op)| self.execute(stripe, op, timeout));
        futures::future::join_all(calls).await
    }

    /// Runs one request on every stripe at once; replies in stripe order.
    async fn every_stripe(&self, op: Op) -> Vec<Result<Reply, ClientError>> {
        let stripes = self.routing().config.stripes.len();
        self.per_stripe((0..stripes).map(|s| (s, op.clone())).collect()).await
    }
}

pub(super) fn unexpected(reply: Reply) -> ClientError {
    ClientError::Invalid(format!("unexpected reply from the server: {reply:?}"))
}

fn expect_value(reply: Reply) -> Result<Option<Vec<u8>>, ClientError> {
    match reply {
        Reply::Value(v) => Ok(v),
        other => Err(unexpected(other)),
    }
}

fn expect_bool(reply: Reply) -> Result<bool, ClientError> {
    match reply {
        Reply::Bool(b) => Ok(b),
        other => Err(unexpected(other)),
    }
}
