//! The log's own payload: what a log entry asks the state machine to do, and what applying it
//! produced. The wire's requests ([`ferrocotta::protocol::Op`]) are converted where the client
//! port hands them to the stripe (`Change::of_write` a write, `Change::try_from` a session operation),
//! so the protocol can change shape without changing how existing
//! logs decode.
//!
//! The encoding is the log format (postcard; `crate::log_store::STORE_FORMAT_VERSION`). postcard is
//! not self-describing: a change's kind is written as its tag, and the tags below are fixed numbers,
//! never an enum's order. They are the numbers format 1 wrote (then the protocol's request
//! numbers), so logs of earlier builds still read; `format_fixture` checks it. A new kind takes a
//! new tag; a tag is never reused.

use ferrocotta::protocol::{CacheSettings, ErrorReply, LockMode, Reply, SessionOp, WriteOp};

pub use crate::txn::TxnChange;
use serde::de::{self, SeqAccess, Visitor};
use serde::ser::SerializeTuple;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A log entry's payload: what to do, and when the active said it happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Command {
    /// Wall-clock milliseconds since the Unix epoch on the active when it proposed the entry. Apply
    /// uses this, never its own clock, so every replica judges time the same way.
    pub at_ms: u64,
    /// The change.
    pub kind: CommandKind,
}

/// The changes the log carries. The order of the variants is the log format: append only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CommandKind {
    /// A change a client asked for.
    Client(Change),
    /// Accesses the active served since its last batch: (cache, key, access time).
    Touch(Vec<(String, Vec<u8>, u64)>),
    /// Entries the active found expired; each is removed only if it is still expired at `at_ms`.
    Expire(Vec<(String, Vec<u8>)>),
    /// Sessions the active has not heard from within the reconnect window.
    ExpireSessions(Vec<u64>),
    /// A lock waiter whose wait ran out gives up its place (unless it was granted meanwhile).
    LockWaitCancel { cache: String, key: Vec<u8>, session: u64 },
    /// Client changes the active gathered while earlier entries were on their way: applied in
    /// order, each with its own result, all made durable by one append (group commit). Never holds
    /// an `OpenSession` (a session's id is its entry's index).
    Batch(Vec<Change>),
    /// A new roster of the stripe's servers (`crate::roster`), stored only if the stored one is
    /// still at generation `expected`; the result says which.
    SetRoster {
        expected: u64,
        #[serde(with = "serde_bytes")]
        roster: Vec<u8>,
    },
    /// Entries of slots the stripe is importing from another (`crate::slot_moves`): all applied,
    /// or none when a key is of a slot not being imported.
    ImportSlots(crate::slot_moves::SlotImport),
}

/// A change a client asked for, as the log keeps it.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Put(Put),
    PutAll(PutAll),
    PutIfAbsent(Put),
    Replace(Replace),
    ReplaceIfEqual(ReplaceIfEqual),
    Remove(KeyOf),
    RemoveIfEqual(RemoveIfEqual),
    Clear(CacheOf),
    Increment(Increment),
    CreateCache(CreateCache),
    OpenSession(OpenSession),
    CloseSession(SessionOf),
    Lock(Lock),
    Unlock(Unlock),
    Txn(TxnChange),
}

/// Sets a key (also the body of a put-if-absent).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Put {
    pub cache: String,
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    /// Time to live of this entry (overrides the cache's), in milliseconds.
    pub ttl_ms: Option<u64>,
    /// Time to idle of this entry (overrides the cache's), in milliseconds.
    pub tti_ms: Option<u64>,
    /// The session the entry belongs to (removed when it ends).
    pub session: Option<u64>,
}

/// Sets many keys atomically.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PutAll {
    pub cache: String,
    #[serde(with = "ferrocotta::byte_lists::pairs")]
    pub entries: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Sets a key only if present.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Replace {
    pub cache: String,
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
}

/// Sets a key to `value` only if it holds `expected`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplaceIfEqual {
    pub cache: String,
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub expected: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
}

/// One key of a cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyOf {
    pub cache: String,
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
}

/// Removes a key only if it holds `expected`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RemoveIfEqual {
    pub cache: String,
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub expected: Vec<u8>,
}

/// A whole cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheOf {
    pub cache: String,
}

/// Adds `delta` to a decimal counter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Increment {
    pub cache: String,
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    pub delta: i64,
}

/// Creates a cache unless it exists. `CacheSettings` is also the store's own (in snapshots).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreateCache {
    pub cache: String,
    pub settings: CacheSettings,
}

/// Opens a session; its id is the entry's index.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenSession {
    pub client_name: String,
    /// Who the client is across stripes: a slot move hands its ephemeral entries and locks to
    /// its session on the other stripe (`crate::slot_moves`). `None` from clients before it;
    /// such an entry keeps the log's first form (`tag::OPEN_SESSION`, the name alone).
    pub client_id: Option<u64>,
}

/// [`OpenSession`] as `tag::OPEN_SESSION` writes it.
#[derive(Serialize, Deserialize)]
struct NamedSession {
    client_name: String,
}

/// [`OpenSession`] as `tag::OPEN_CLIENT_SESSION` writes it.
#[derive(Serialize, Deserialize)]
struct IdentifiedSession {
    client_name: String,
    client_id: u64,
}

/// One session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionOf {
    pub session: u64,
}

/// Takes a lock for a session, or queues for it. `LockMode` is also the store's own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lock {
    pub cache: String,
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    pub mode: LockMode,
    pub session: u64,
    /// < 0 waits forever, 0 fails at once when taken, > 0 waits that long (the active's part).
    pub wait_ms: i64,
}

/// Releases one hold of a lock.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Unlock {
    pub cache: String,
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    pub session: u64,
}

/// Tags of the change kinds, fixed (see the module's documentation).
mod tag {
    pub const PUT: u32 = 4;
    pub const PUT_ALL: u32 = 5;
    pub const PUT_IF_ABSENT: u32 = 6;
    pub const REPLACE: u32 = 7;
    pub const REPLACE_IF_EQUAL: u32 = 8;
    pub const REMOVE: u32 = 9;
    pub const REMOVE_IF_EQUAL: u32 = 10;
    pub const CLEAR: u32 = 13;
    pub const INCREMENT: u32 = 14;
    pub const CREATE_CACHE: u32 = 15;
    pub const OPEN_SESSION: u32 = 16;
    pub const CLOSE_SESSION: u32 = 18;
    pub const LOCK: u32 = 19;
    pub const UNLOCK: u32 = 20;
    /// A transaction: `ferrocotta::protocol::Txn` (whose variants are append only for this
    /// reason) and the proposing active's value size limit.
    pub const TXN: u32 = 21;
    /// An `OpenSession` that names its client's id.
    pub const OPEN_CLIENT_SESSION: u32 = 22;
}

impl Serialize for Change {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Change::Put(b) => tagged(s, tag::PUT, b),
            Change::PutAll(b) => tagged(s, tag::PUT_ALL, b),
            Change::PutIfAbsent(b) => tagged(s, tag::PUT_IF_ABSENT, b),
            Change::Replace(b) => tagged(s, tag::REPLACE, b),
            Change::ReplaceIfEqual(b) => tagged(s, tag::REPLACE_IF_EQUAL, b),
            Change::Remove(b) => tagged(s, tag::REMOVE, b),
            Change::RemoveIfEqual(b) => tagged(s, tag::REMOVE_IF_EQUAL, b),
            Change::Clear(b) => tagged(s, tag::CLEAR, b),
            Change::Increment(b) => tagged(s, tag::INCREMENT, b),
            Change::CreateCache(b) => tagged(s, tag::CREATE_CACHE, b),
            Change::OpenSession(OpenSession {
                client_name,
                client_id: None,
            }) => tagged(
                s,
                tag::OPEN_SESSION,
                &NamedSession {
                    client_name: client_name.clone(),
                },
            ),
            Change::OpenSession(OpenSession {
                client_name,
                client_id: Some(id),
            }) => tagged(
                s,
                tag::OPEN_CLIENT_SESSION,
                &IdentifiedSession {
                    client_name: client_name.clone(),
                    client_id: *id,
                },
            ),
            Change::CloseSession(b) => tagged(s, tag::CLOSE_SESSION, b),
            Change::Lock(b) => tagged(s, tag::LOCK, b),
            Change::Unlock(b) => tagged(s, tag::UNLOCK, b),
            Change::Txn(b) => tagged(s, tag::TXN, b),
        }
    }
}

/// A change as the log writes it: its tag, then its body.
fn tagged<S: Serializer, T: Serialize>(s: S, tag: u32, body: &T) -> Result<S::Ok, S::Error> {
    let mut t = s.serialize_tuple(2)?;
    t.serialize_element(&tag)?;
    t.serialize_element(body)?;
    t.end()
}

impl<'de> Deserialize<'de> for Change {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Tagged;

        fn body<'de, A: SeqAccess<'de>, T: Deserialize<'de>>(seq: &mut A) -> Result<T, A::Error> {
            seq.next_element()?
                .ok_or_else(|| de::Error::custom("a change without its body"))
        }

        impl<'de> Visitor<'de> for Tagged {
            type Value = Change;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a change: its tag, then its body")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Change, A::Error> {
                let tag: u32 = body(&mut seq)?;
                Ok(match tag {
                    tag::PUT => Change::Put(body(&mut seq)?),
                    tag::PUT_ALL => Change::PutAll(body(&mut seq)?),
                    tag::PUT_IF_ABSENT => Change::PutIfAbsent(body(&mut seq)?),
                    tag::REPLACE => Change::Replace(body(&mut seq)?),
                    tag::REPLACE_IF_EQUAL => Change::ReplaceIfEqual(body(&mut seq)?),
                    tag::REMOVE => Change::Remove(body(&mut seq)?),
                    tag::REMOVE_IF_EQUAL => Change::RemoveIfEqual(body(&mut seq)?),
                    tag::CLEAR => Change::Clear(body(&mut seq)?),
                    tag::INCREMENT => Change::Increment(body(&mut seq)?),
                    tag::CREATE_CACHE => Change::CreateCache(body(&mut seq)?),
                    tag::OPEN_SESSION => {
                        let NamedSession { client_name } = body(&mut seq)?;
                        Change::OpenSession(OpenSession {
                            client_name,
                            client_id: None,
                        })
                    }
                    tag::OPEN_CLIENT_SESSION => {
                        let IdentifiedSession { client_name, client_id } = body(&mut seq)?;
                        Change::OpenSession(OpenSession {
                            client_name,
                            client_id: Some(client_id),
                        })
                    }
                    tag::CLOSE_SESSION => Change::CloseSession(body(&mut seq)?),
                    tag::LOCK => Change::Lock(body(&mut seq)?),
                    tag::UNLOCK => Change::Unlock(body(&mut seq)?),
                    tag::TXN => Change::Txn(body(&mut seq)?),
                    other => {
                        return Err(de::Error::custom(format_args!(
                            "unknown change tag {other} (written by a newer build?)"
                        )))
                    }
                })
            }
        }

        d.deserialize_tuple(2, Tagged)
    }
}

impl Change {
    /// The cache and key it changes first (a put_all's first entry), if it names a key.
    pub fn first_key(&self) -> Option<(&str, &[u8])> {
        match self {
            Change::Put(Put { cache, key, .. })
            | Change::PutIfAbsent(Put { cache, key, .. })
            | Change::Replace(Replace { cache, key, .. })
            | Change::ReplaceIfEqual(ReplaceIfEqual { cache, key, .. })
            | Change::Remove(KeyOf { cache, key })
            | Change::RemoveIfEqual(RemoveIfEqual { cache, key, .. })
            | Change::Increment(Increment { cache, key, .. })
            | Change::Lock(Lock { cache, key, .. })
            | Change::Unlock(Unlock { cache, key, .. }) => Some((cache, key)),
            Change::PutAll(PutAll { cache, entries }) => entries.first().map(|(k, _)| (cache.as_str(), k.as_slice())),
            // A transaction judges each key it meets as it goes.
            Change::Txn(_) => None,
            Change::Clear(_) | Change::CreateCache(_) | Change::OpenSession(_) | Change::CloseSession(_) => None,
        }
    }

    /// Key and value bytes the change carries (what dominates its size in the log).
    pub fn payload_bytes(&self) -> usize {
        match self {
            Change::Put(p) | Change::PutIfAbsent(p) => p.key.len() + p.value.len(),
            Change::Replace(r) => r.key.len() + r.value.len(),
            Change::ReplaceIfEqual(r) => r.key.len() + r.expected.len() + r.value.len(),
            Change::PutAll(p) => p.entries.iter().map(|(k, v)| k.len() + v.len()).sum(),
            Change::RemoveIfEqual(r) => r.key.len() + r.expected.len(),
            Change::Remove(KeyOf { key, .. })
            | Change::Increment(Increment { key, .. })
            | Change::Lock(Lock { key, .. })
            | Change::Unlock(Unlock { key, .. }) => key.len(),
            Change::Txn(t) => t
                .txn
                .targets()
                .map(|(_, k, _)| k.len())
                .sum::<usize>()
                .saturating_add(t.txn.steps().map(|s| s.value_len()).sum::<usize>()),
            Change::Clear(_) | Change::CreateCache(_) | Change::OpenSession(_) | Change::CloseSession(_) => 0,
        }
    }
}

impl Change {
    /// The log's form of a client's write; a transaction carries the proposing active's value
    /// size limit.
    pub fn of_write(op: WriteOp, max_value_bytes: u64) -> Change {
        let put = |cache, key, value, opts: ferrocotta::protocol::PutOptions| Put {
            cache,
            key,
            value,
            ttl_ms: opts.ttl_ms,
            tti_ms: opts.tti_ms,
            session: opts.session,
        };
        match op {
            WriteOp::Put {
                cache,
                key,
                value,
                opts,
            } => Change::Put(put(cache, key, value, opts)),
            WriteOp::PutIfAbsent {
                cache,
                key,
                value,
                opts,
            } => Change::PutIfAbsent(put(cache, key, value, opts)),
            WriteOp::PutAll { cache, entries } => Change::PutAll(PutAll { cache, entries }),
            WriteOp::Replace { cache, key, value } => Change::Replace(Replace { cache, key, value }),
            WriteOp::ReplaceIfEqual {
                cache,
                key,
                expected,
                value,
            } => Change::ReplaceIfEqual(ReplaceIfEqual {
                cache,
                key,
                expected,
                value,
            }),
            WriteOp::Remove { cache, key } => Change::Remove(KeyOf { cache, key }),
            WriteOp::RemoveIfEqual { cache, key, expected } => {
                Change::RemoveIfEqual(RemoveIfEqual { cache, key, expected })
            }
            WriteOp::Clear { cache } => Change::Clear(CacheOf { cache }),
            WriteOp::Increment { cache, key, delta } => Change::Increment(Increment { cache, key, delta }),
            WriteOp::CreateCache { cache, settings } => Change::CreateCache(CreateCache { cache, settings }),
            WriteOp::Txn(txn) => Change::Txn(TxnChange { txn, max_value_bytes }),
        }
    }
}

/// A keep-alive: served from the active's memory, never logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepAlive(pub u64);

/// The session operations that go through the log; a keep-alive does not.
impl TryFrom<SessionOp> for Change {
    type Error = KeepAlive;

    fn try_from(op: SessionOp) -> Result<Change, KeepAlive> {
        Ok(match op {
            SessionOp::Open { client_name, client_id } => Change::OpenSession(OpenSession {
                client_name,
                client_id: Some(client_id),
            }),
            SessionOp::Close { session } => Change::CloseSession(SessionOf { session }),
            SessionOp::Lock {
                cache,
                key,
                mode,
                session,
                wait_ms,
            } => Change::Lock(Lock {
                cache,
                key,
                mode,
                session,
                wait_ms,
            }),
            SessionOp::Unlock { cache, key, session } => Change::Unlock(Unlock { cache, key, session }),
            SessionOp::KeepAlive { session } => return Err(KeepAlive(session)),
        })
    }
}

/// The outcome of applying an entry, handed to whoever proposed it (never stored; openraft asks for
/// serde on it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CommandResult {
    /// A blank or membership entry: nobody waits for it.
    Nothing,
    /// What the client that asked for the change (or whose lock wait ended) is told.
    Client(Result<Reply, ErrorReply>),
    /// The results of a [`CommandKind::Batch`], one per change in its order.
    Batch(Vec<Result<Reply, ErrorReply>>),
    /// Accesses recorded.
    Touched,
    /// Entries removed by an expiry sweep (some may have been written again meanwhile).
    Expired { entries: u64 },
    /// Sessions ended for silence (some may have ended already).
    SessionsEnded { sessions: u64 },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_without_a_client_id_keeps_the_first_form_and_one_with_it_round_trips() {
        let named = Change::OpenSession(OpenSession {
            client_name: "node1".into(),
            client_id: None,
        });
        let first_form = postcard::to_allocvec(&(tag::OPEN_SESSION, "node1")).unwrap();
        assert_eq!(postcard::to_allocvec(&named).unwrap(), first_form);
        assert_eq!(postcard::from_bytes::<Change>(&first_form).unwrap(), named);
        let identified = Change::OpenSession(OpenSession {
            client_name: "node1".into(),
            client_id: Some(u64::MAX - 3),
        });
        let bytes = postcard::to_allocvec(&identified).unwrap();
        assert_eq!(postcard::from_bytes::<Change>(&bytes).unwrap(), identified);
    }

    #[test]
    fn a_transaction_encodes_as_it_always_did() {
        use ferrocotta::protocol::{Expiry, Guard, Step, Txn};
        let (cache, key) = ("c".to_string(), b"k".to_vec());
        let change = Change::Txn(TxnChange {
            txn: Txn {
                guards: vec![Guard::Absent {
                    cache: cache.clone(),
                    key: key.clone(),
                }],
                then: vec![
                    Step::Put {
                        cache: cache.clone(),
                        key: key.clone(),
                        value: b"v".to_vec(),
                        expiry: Expiry::AfterMs(5),
                    },
                    Step::Increment { cache, key, delta: -1 },
                ],
                otherwise: Vec::new(),
            },
            max_value_bytes: 9,
        });
        let bytes = postcard::to_allocvec(&change).unwrap();
        // The log keeps these bytes: the protocol's transaction enums are append only.
        assert_eq!(
            bytes,
            [21, 1, 1, 1, b'c', 1, b'k', 2, 1, 1, b'c', 1, b'k', 1, b'v', 3, 5, 5, 1, b'c', 1, b'k', 1, 0, 9]
        );
        assert_eq!(postcard::from_bytes::<Change>(&bytes).unwrap(), change);
    }

    #[test]
    fn a_change_of_an_unknown_kind_is_refused() {
        // postcard keeps only that a custom error happened, not its message.
        let bytes = postcard::to_allocvec(&(99u32, CacheOf { cache: "c".into() })).unwrap();
        assert!(postcard::from_bytes::<Change>(&bytes).is_err());
        let known = postcard::to_allocvec(&(tag::CLEAR, CacheOf { cache: "c".into() })).unwrap();
        assert_eq!(
            postcard::from_bytes::<Change>(&known).unwrap(),
            Change::Clear(CacheOf { cache: "c".into() })
        );
    }
}
