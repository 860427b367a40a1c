//! Transactions: guards on keys, then steps, applied as one log entry (etcd's `Txn` is the model).
//!
//! A transaction names keys of one stripe (hash tags put related keys on one: see `slots`), in any
//! caches. When its entry applies, every guard is judged against the stripe's state at that point
//! of the log; if all hold, the `then` steps run in order, else the `otherwise` steps. Each step sees
//! what the steps before it did. Either every step of the chosen branch takes effect or none does:
//! a step that fails (a value that is not a counter, a value grown past the limit) fails the whole
//! transaction and nothing is written.

use serde::{Deserialize, Serialize};

/// A condition on one key, judged when the transaction applies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Guard {
    /// The key has a live entry.
    Present {
        cache: String,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    /// The key has no live entry.
    Absent {
        cache: String,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    /// The key's live entry holds exactly this value.
    ValueIs {
        cache: String,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
}

/// When an entry written or changed by a step expires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Expiry {
    /// As the cache's settings say (what a plain put does).
    Default,
    /// The entry keeps the moment it expires at (Redis' `KEEPTTL`); a new entry gets the default.
    Keep,
    /// Never: the entry's ttl and tti are removed.
    Never,
    /// This many milliseconds after the transaction applies.
    AfterMs(u64),
    /// At this time (ms since the Unix epoch, the active's clock). A time already past removes the
    /// entry.
    AtMs(u64),
}

/// One step of a transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Step {
    /// Replies the entry as it is at this step.
    Get {
        cache: String,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    /// Sets the key; replies the entry it replaced.
    Put {
        cache: String,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        expiry: Expiry,
    },
    /// Removes the key; replies the entry it removed.
    Remove {
        cache: String,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    /// Changes when a live entry expires (`Never`, `AfterMs` or `AtMs`); replies whether there was
    /// one.
    SetExpiry {
        cache: String,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        expiry: Expiry,
    },
    /// Appends bytes to the value (absent counts as empty), keeping its expiry; replies the new
    /// length.
    Append {
        cache: String,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
    /// Adds `delta` to a decimal counter (absent counts as 0; strictly an optional `-` and digits,
    /// no sign, spaces or leading zeros), keeping its expiry; replies the new value.
    Increment {
        cache: String,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        delta: i64,
    },
}

/// Guards, then the steps of the branch they choose.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Txn {
    /// All must hold for `then` to run.
    pub guards: Vec<Guard>,
    /// Run when every guard holds (an empty list of guards always holds).
    pub then: Vec<Step>,
    /// Run when a guard does not hold.
    pub otherwise: Vec<Step>,
}

/// An entry as a read or a step saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryInfo {
    /// Its value.
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    /// When it expires by its ttl and tti (ms since the Unix epoch), if it does.
    pub expires_at_ms: Option<u64>,
}

/// What one step of a transaction produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StepReply {
    /// `Get`, `Put`, `Remove`: the entry before the step.
    Entry(Option<EntryInfo>),
    /// `SetExpiry`: whether a live entry was there.
    Bool(bool),
    /// `Append`: the new length of the value.
    Length(u64),
    /// `Increment`: the new value.
    Counter(i64),
}

impl Guard {
    /// The cache and key it judges.
    pub fn target(&self) -> (&str, &[u8]) {
        match self {
            Guard::Present { cache, key } | Guard::Absent { cache, key } | Guard::ValueIs { cache, key, .. } => {
                (cache, key)
            }
        }
    }
}

impl Step {
    /// The cache and key it acts on.
    pub fn target(&self) -> (&str, &[u8]) {
        match self {
            Step::Get { cache, key }
            | Step::Put { cache, key, .. }
            | Step::Remove { cache, key }
            | Step::SetExpiry { cache, key, .. }
            | Step::Append { cache, key, .. }
            | Step::Increment { cache, key, .. } => (cache, key),
        }
    }

    /// Whether it changes data (a `Get` does not).
    pub fn writes(&self) -> bool {
        !matches!(self, Step::Get { .. })
    }

    /// Length of the value it carries.
    pub fn value_len(&self) -> usize {
        match self {
            Step::Put { value, .. } | Step::Append { value, .. } => value.len(),
            _ => 0,
        }
    }
}

impl Txn {
    /// Every step of both branches.
    pub fn steps(&self) -> impl Iterator<Item = &Step> {
        self.then.iter().chain(&self.otherwise)
    }

    /// Every (cache, key, whether it may be written) the transaction names, guards first.
    pub fn targets(&self) -> impl Iterator<Item = (&str, &[u8], bool)> {
        let guards = self.guards.iter().map(|g| {
            let (c, k) = g.target();
            (c, k, false)
        });
        guards.chain(self.steps().map(|s| {
            let (c, k) = s.target();
            (c, k, s.writes())
        }))
    }

    /// Length of the largest value it carries, compared ones included.
    pub fn largest_value(&self) -> usize {
        let guards = self.guards.iter().map(|g| match g {
            Guard::ValueIs { value, .. } => value.len(),
            _ => 0,
        });
        guards.chain(self.steps().map(Step::value_len)).max().unwrap_or(0)
    }

    /// Checks what the shape alone can tell: something to do, expiries that make sense. (Limits
    /// and slots are the server's.)
    pub fn check(&self) -> Result<(), String> {
        if self.then.is_empty() && self.otherwise.is_empty() {
            return Err("a transaction needs at least one step".into());
        }
        for step in self.steps() {
            if let Step::SetExpiry { expiry, .. } = step {
                if matches!(expiry, Expiry::Default | Expiry::Keep) {
                    return Err("set_expiry takes never, after or at".into());
                }
            }
        }
        Ok(())
    }
}

/// Parses a counter strictly as Redis does: an optional `-`, then digits without leading zeros
/// (`0` alone is fine), fitting an i64.
pub fn parse_counter(bytes: &[u8]) -> Option<i64> {
    let text = std::str::from_utf8(bytes).ok()?;
    let digits = text.strip_prefix('-').unwrap_or(text);
    let canonical = !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'))
        && text != "-0";
    if !canonical {
        return None;
    }
    text.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_parse_strictly() {
        assert_eq!(parse_counter(b"0"), Some(0));
        assert_eq!(parse_counter(b"-12"), Some(-12));
        assert_eq!(parse_counter(b"9223372036854775807"), Some(i64::MAX));
        for bad in [
            &b""[..],
            b" 1",
            b"1 ",
            b"+1",
            b"01",
            b"-0",
            b"-",
            b"1.5",
            b"9223372036854775808",
            b"x",
        ] {
            assert_eq!(parse_counter(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
