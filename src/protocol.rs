//! The wire protocol: every type that crosses a process boundary is defined here.
//!
//! Framing: a 4-byte big-endian length, then a postcard-encoded [`ClientMessage`] or
//! [`ServerMessage`]. Frames are bounded ([`HANDSHAKE_FRAME_BYTES_MAX`] until the handshake is
//! done, the config's `limits.max_frame_bytes` after). Requests carry ids, so a connection carries
//! many requests at once (pipelining) and replies may come back in any order.
//!
//! Handshake, the same on the client port and the group port:
//! 1. the server speaks first: [`ServerMessage::Challenge`] with a fresh nonce;
//! 2. the client answers [`ClientMessage::Hello`]: versions, the array name it expects, its own nonce
//!    and an HMAC-SHA256 over both nonces keyed by the shared secret (the secret itself never
//!    travels);
//! 3. the server answers [`ServerMessage::Welcome`] (its own HMAC, proving it knows the secret too,
//!    and the configuration document) or [`ServerMessage::Refused`] with the reason, then closes.
//!
//! Raft traffic between servers uses the same frames: after the handshake a peer sends
//! [`ClientMessage::PeerCall`] whose payload is an openraft message encoded by the array server.
//! Keeping the payload opaque here keeps openraft out of this crate (and so out of every client).

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

mod txn;
pub use txn::{parse_counter, EntryInfo, Expiry, Guard, Step, StepReply, Txn};

/// Version of this protocol; a server refuses a client with another one.
///
/// 5 (2026-12-04): transactions and entry reads, hash tags in the key-to-slot rule (keys with
/// `{...}` moved stripes), and the stripe's time. A client or server of 4 is refused.
///
/// 6 (2026-12-04): every response names the stripe's configuration generation; peers ask each
/// other for the roster and hand over; a removed server is refused as such; hash slots move
/// between stripes (`WrongStripe`, `SlotMoving`) and a session names its client's id.
pub const PROTOCOL_VERSION: u32 = 6;

/// The software version of this build.
pub const SOFTWARE_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Largest frame accepted before the handshake is done: a hello is small, and an unauthenticated
/// peer must not make the server buffer megabytes.
pub const HANDSHAKE_FRAME_BYTES_MAX: usize = 64 * 1024;

/// Length of the nonces in the handshake.
pub const NONCE_BYTES: usize = 32;

/// Largest cache name.
pub const CACHE_NAME_BYTES_MAX: usize = 256;

/// Whether a cache name is acceptable: 1 to [`CACHE_NAME_BYTES_MAX`] bytes and no control
/// characters (names appear in logs, metrics labels and pages, where a newline would forge a line).
pub fn check_cache_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > CACHE_NAME_BYTES_MAX {
        return Err(format!("cache names are 1 to {CACHE_NAME_BYTES_MAX} bytes"));
    }
    if name.chars().any(char::is_control) {
        return Err("cache names may not hold control characters".into());
    }
    Ok(())
}

/// Largest number of keys in one `get_all` or `put_all` request.
pub const BATCH_KEYS_MAX: usize = 10_000;

/// Largest page of `keys`.
pub const KEYS_PAGE_MAX: u32 = 10_000;

/// Whether a client and a server of these software versions may talk: the same major and minor
/// version (patch releases are compatible, as in Terracotta's same-version rule relaxed to patches).
pub fn versions_compatible(client: &str, server: &str) -> bool {
    fn major_minor(v: &str) -> Option<(&str, &str)> {
        let mut parts = v.split('.');
        Some((parts.next()?, parts.next()?))
    }
    match (major_minor(client), major_minor(server)) {
        (Some(a), Some(b)) => a == b,
        _ => client == server,
    }
}

/// The exact message of a version mismatch (SPEC 3.1; Integration Server prints the same words).
pub fn version_mismatch_message(client: &str, server: &str) -> String {
    format!("Client/Server Version Mismatch Error: Client Version: {client}, Server Version: {server}")
}

/// What a connection is for; the client port takes clients, the group port takes peers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConnectionRole {
    /// An application client (ArrayClient).
    Client,
    /// Another server of the array, sending Raft traffic; proves the peer secret.
    Peer {
        /// Name of the connecting server.
        from: String,
    },
    /// An application client with a named credential of the credentials file (less than full
    /// access); proves that credential's secret.
    Credential {
        /// Name of the credential.
        name: String,
    },
}

/// First message of the client.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    /// [`PROTOCOL_VERSION`] of the client.
    pub protocol_version: u32,
    /// Software version of the client.
    pub software_version: String,
    /// The array the client expects to reach.
    pub array_name: String,
    /// What the connection is for.
    pub role: ConnectionRole,
    /// Fresh random bytes of the client.
    pub client_nonce: [u8; NONCE_BYTES],
    /// HMAC over the handshake, see [`client_proof`].
    pub proof: [u8; 32],
}

/// Why a server refused a hello.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    /// Client and server versions may not talk.
    VersionMismatch {
        /// The client's software version.
        client: String,
        /// The server's software version.
        server: String,
        /// The client's protocol version.
        client_protocol: u32,
        /// The server's protocol version.
        server_protocol: u32,
    },
    /// The client expected another array.
    WrongArrayName {
        /// What the client asked for.
        expected: String,
        /// What this server serves.
        actual: String,
    },
    /// The proof did not match the shared secret.
    AuthenticationFailed,
    /// The role is not served on this port.
    WrongPort(String),
    /// The server holds as many connections as it may; try again later or elsewhere.
    Busy(String),
    /// The dialling server is no longer a member of the stripe (it was removed); the message says
    /// what to do.
    NotAMember(String),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::VersionMismatch { client, server, .. } => f.write_str(&version_mismatch_message(client, server)),
            Refusal::WrongArrayName { expected, actual } => {
                write!(
                    f,
                    "wrong array name: the client expects `{expected}`, the server belongs to `{actual}`"
                )
            }
            Refusal::AuthenticationFailed => {
                f.write_str("authentication failed: the secret (or credential) does not match")
            }
            Refusal::WrongPort(why) => write!(f, "wrong port: {why}"),
            Refusal::Busy(why) => write!(f, "the server is busy: {why}"),
            Refusal::NotAMember(why) => f.write_str(why),
        }
    }
}

/// Reply to an accepted hello.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Welcome {
    /// Software version of the server.
    pub software_version: String,
    /// Name of the server.
    pub server_name: String,
    /// HMAC proving the server knows the secret, see [`server_proof`].
    pub proof: [u8; 32],
    /// The cluster configuration document (TOML), the "config download".
    pub config_toml: String,
}

/// Consistency asked of a read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReadConsistency {
    /// Read index through the active: sees every write acknowledged before the read started.
    #[default]
    Linearizable,
    /// Served by any server of the stripe from what it has applied; possibly stale.
    Eventual,
}

/// A request with its id and deadline.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    /// Chosen by the client, echoed in the reply; unique among the requests in flight on one
    /// connection.
    pub id: u64,
    /// How long the client will wait; the server gives up on the request after this.
    pub timeout_ms: u32,
    /// What to do.
    pub op: Op,
}

/// The operations of the array, by kind, so that a read cannot reach the log and a change cannot be
/// served as a read. Every key belongs to the stripe of its slot; a request for a key of another
/// stripe is refused with [`ErrorReply::WrongStripe`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Op {
    /// Liveness and role of the server (served by any server, like an eventual read).
    Ping,
    /// A read of the stripe's data, with the consistency it asks for.
    Read(ReadOp, ReadConsistency),
    /// A change of cache data: through the log, on the active.
    Write(WriteOp),
    /// Client sessions and their locks.
    Session(SessionOp),
}

/// Reads, served from a server's applied state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ReadOp {
    /// Value of a key.
    Get {
        cache: String,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    /// Values of many keys (all of this stripe).
    GetAll {
        cache: String,
        #[serde(with = "crate::byte_lists::list")]
        keys: Vec<Vec<u8>>,
    },
    /// Whether a key is present.
    Contains {
        cache: String,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    /// A page of keys in byte order, with a prefix, after a cursor key.
    Keys {
        cache: String,
        #[serde(with = "serde_bytes")]
        prefix: Vec<u8>,
        #[serde(with = "serde_bytes")]
        after: Option<Vec<u8>>,
        limit: u32,
    },
    /// Number of entries of a cache on this stripe.
    Size { cache: String },
    /// Locks held or waited for, optionally in one cache.
    ListLocks { cache: Option<String> },
    /// Entries (value and expiry) of many keys (all of this stripe).
    Entries {
        cache: String,
        #[serde(with = "crate::byte_lists::list")]
        keys: Vec<Vec<u8>>,
    },
    /// The stripe's time: the clock the active stamps log entries with (expiry, scheduled jobs).
    /// With `Linearizable` it is the active's own clock, read after it confirmed it still leads.
    Time,
}

/// Changes of cache data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum WriteOp {
    /// Sets a key; replies with the previous value.
    Put {
        cache: String,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        opts: PutOptions,
    },
    /// Sets many keys (all of this stripe) atomically.
    PutAll {
        cache: String,
        #[serde(with = "crate::byte_lists::pairs")]
        entries: Vec<(Vec<u8>, Vec<u8>)>,
    },
    /// Sets a key if absent; replies with the value already there, if any.
    PutIfAbsent {
        cache: String,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        opts: PutOptions,
    },
    /// Sets a key only if present; replies with the previous value.
    Replace {
        cache: String,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
    /// Compare-and-swap: sets a key to `value` only if it holds `expected`.
    ReplaceIfEqual {
        cache: String,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        expected: Vec<u8>,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
    /// Removes a key; replies with the previous value.
    Remove {
        cache: String,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    /// Removes a key only if it holds `expected`.
    RemoveIfEqual {
        cache: String,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        expected: Vec<u8>,
    },
    /// Removes every entry of a cache on this stripe.
    Clear { cache: String },
    /// Adds `delta` to a decimal counter (absent counts as 0); replies with the new value.
    Increment {
        cache: String,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        delta: i64,
    },
    /// Creates a cache with these settings unless it exists (on this stripe); replies whether it
    /// was created.
    CreateCache { cache: String, settings: CacheSettings },
    /// Guards, then steps, on keys of this stripe, all or nothing; replies [`Reply::Txn`].
    Txn(Txn),
}

/// Client sessions and the locks they hold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum SessionOp {
    /// Opens a client session on this stripe; replies [`Reply::Session`]. `client_id` is the
    /// client's own random id, the same for its sessions on every stripe: when a hash slot moves
    /// to another stripe, its ephemeral entries and locks go to the client's session there.
    Open { client_name: String, client_id: u64 },
    /// Renews a session's lease (served by the active from memory, not logged).
    KeepAlive { session: u64 },
    /// Ends a session: releases its locks and removes its ephemeral entries.
    Close { session: u64 },
    /// Takes a lock on a key for a session. `wait_ms` < 0 waits forever, 0 fails at once when the
    /// lock is taken, > 0 waits that long. Replies `Done` when granted, `LockTimeout` otherwise.
    Lock {
        cache: String,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        mode: LockMode,
        session: u64,
        wait_ms: i64,
    },
    /// Releases one hold of a lock.
    Unlock {
        cache: String,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        session: u64,
    },
}

/// Options of a put.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutOptions {
    /// Time to live of this entry (overrides the cache's), in milliseconds.
    pub ttl_ms: Option<u64>,
    /// Time to idle of this entry (overrides the cache's), in milliseconds.
    pub tti_ms: Option<u64>,
    /// Ties the entry to a client session: it is removed when the session ends (ephemeral).
    pub session: Option<u64>,
}

/// Settings of a cache, from the config or given at creation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheSettings {
    /// Beyond this many entries (per stripe), the least recently used is evicted.
    pub max_entries: Option<u64>,
    /// Entries expire this long after their last write, in milliseconds.
    pub ttl_ms: Option<u64>,
    /// Entries expire this long after their last access, in milliseconds.
    pub tti_ms: Option<u64>,
}

/// Kind of lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LockMode {
    /// One holder at a time.
    Exclusive,
    /// Any number of holders, none exclusive.
    Shared,
}

/// A lock as listed by `ListLocks`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockInfo {
    /// Cache of the locked key.
    pub cache: String,
    /// The locked key.
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    /// Mode of the current holders.
    pub mode: LockMode,
    /// Holding sessions with their client names and hold counts.
    pub holders: Vec<(u64, String, u32)>,
    /// Waiting sessions in order, with the mode they want.
    pub waiters: Vec<(u64, LockMode)>,
}

/// Every kind of operation, for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpKind {
    Ping,
    Get,
    GetAll,
    Contains,
    Keys,
    Size,
    ListLocks,
    Put,
    PutAll,
    PutIfAbsent,
    Replace,
    ReplaceIfEqual,
    Remove,
    RemoveIfEqual,
    Clear,
    Increment,
    CreateCache,
    OpenSession,
    KeepAlive,
    CloseSession,
    Lock,
    Unlock,
    Entries,
    Txn,
    Time,
}

impl OpKind {
    /// Every kind, in declaration order (`ALL[k as usize] == k`).
    pub const ALL: [OpKind; 25] = [
        OpKind::Ping,
        OpKind::Get,
        OpKind::GetAll,
        OpKind::Contains,
        OpKind::Keys,
        OpKind::Size,
        OpKind::ListLocks,
        OpKind::Put,
        OpKind::PutAll,
        OpKind::PutIfAbsent,
        OpKind::Replace,
        OpKind::ReplaceIfEqual,
        OpKind::Remove,
        OpKind::RemoveIfEqual,
        OpKind::Clear,
        OpKind::Increment,
        OpKind::CreateCache,
        OpKind::OpenSession,
        OpKind::KeepAlive,
        OpKind::CloseSession,
        OpKind::Lock,
        OpKind::Unlock,
        OpKind::Entries,
        OpKind::Txn,
        OpKind::Time,
    ];

    /// A short stable name, for metrics and logs.
    pub fn name(self) -> &'static str {
        match self {
            OpKind::Ping => "ping",
            OpKind::Get => "get",
            OpKind::GetAll => "get_all",
            OpKind::Contains => "contains",
            OpKind::Keys => "keys",
            OpKind::Size => "size",
            OpKind::ListLocks => "list_locks",
            OpKind::Put => "put",
            OpKind::PutAll => "put_all",
            OpKind::PutIfAbsent => "put_if_absent",
            OpKind::Replace => "replace",
            OpKind::ReplaceIfEqual => "replace_if_equal",
            OpKind::Remove => "remove",
            OpKind::RemoveIfEqual => "remove_if_equal",
            OpKind::Clear => "clear",
            OpKind::Increment => "increment",
            OpKind::CreateCache => "create_cache",
            OpKind::OpenSession => "open_session",
            OpKind::KeepAlive => "keep_alive",
            OpKind::CloseSession => "close_session",
            OpKind::Lock => "lock",
            OpKind::Unlock => "unlock",
            OpKind::Entries => "entries",
            OpKind::Txn => "txn",
            OpKind::Time => "time",
        }
    }
}

impl Op {
    /// Its kind.
    pub fn kind(&self) -> OpKind {
        match self {
            Op::Ping => OpKind::Ping,
            Op::Read(op, _) => op.kind(),
            Op::Write(op) => op.kind(),
            Op::Session(op) => op.kind(),
        }
    }

    /// Every cache the operation names, each with whether it may change it (a lock changes its
    /// cache; a transaction's guards and gets only read theirs).
    pub fn caches(&self) -> Vec<(&str, bool)> {
        match self {
            Op::Ping => Vec::new(),
            Op::Read(op, _) => op.cache().map(|c| (c, false)).into_iter().collect(),
            Op::Write(WriteOp::Txn(txn)) => {
                let mut uses: Vec<(&str, bool)> = Vec::new();
                for (cache, _, write) in txn.targets() {
                    match uses.iter_mut().find(|(c, _)| *c == cache) {
                        Some(u) => u.1 |= write,
                        None => uses.push((cache, write)),
                    }
                }
                uses
            }
            Op::Write(op) => vec![(op.cache(), true)],
            Op::Session(op) => op.cache().map(|c| (c, true)).into_iter().collect(),
        }
    }

    /// Every key the operation addresses (for slot checks).
    pub fn keys(&self) -> Vec<&[u8]> {
        match self {
            Op::Ping => Vec::new(),
            Op::Read(op, _) => op.keys(),
            Op::Write(op) => op.keys(),
            Op::Session(op) => op.key().into_iter().collect(),
        }
    }
}

impl ReadOp {
    /// Its kind.
    pub fn kind(&self) -> OpKind {
        match self {
            ReadOp::Get { .. } => OpKind::Get,
            ReadOp::GetAll { .. } => OpKind::GetAll,
            ReadOp::Contains { .. } => OpKind::Contains,
            ReadOp::Keys { .. } => OpKind::Keys,
            ReadOp::Size { .. } => OpKind::Size,
            ReadOp::ListLocks { .. } => OpKind::ListLocks,
            ReadOp::Entries { .. } => OpKind::Entries,
            ReadOp::Time => OpKind::Time,
        }
    }

    /// The cache it reads (all caches for a `ListLocks` without one).
    pub fn cache(&self) -> Option<&str> {
        match self {
            ReadOp::Get { cache, .. }
            | ReadOp::GetAll { cache, .. }
            | ReadOp::Contains { cache, .. }
            | ReadOp::Keys { cache, .. }
            | ReadOp::Entries { cache, .. }
            | ReadOp::Size { cache } => Some(cache),
            ReadOp::ListLocks { cache } => cache.as_deref(),
            ReadOp::Time => None,
        }
    }

    /// The keys it names.
    pub fn keys(&self) -> Vec<&[u8]> {
        match self {
            ReadOp::Get { key, .. } | ReadOp::Contains { key, .. } => vec![key.as_slice()],
            ReadOp::GetAll { keys, .. } | ReadOp::Entries { keys, .. } => keys.iter().map(Vec::as_slice).collect(),
            ReadOp::Keys { .. } | ReadOp::Size { .. } | ReadOp::ListLocks { .. } | ReadOp::Time => Vec::new(),
        }
    }
}

impl WriteOp {
    /// Its kind.
    pub fn kind(&self) -> OpKind {
        match self {
            WriteOp::Put { .. } => OpKind::Put,
            WriteOp::PutAll { .. } => OpKind::PutAll,
            WriteOp::PutIfAbsent { .. } => OpKind::PutIfAbsent,
            WriteOp::Replace { .. } => OpKind::Replace,
            WriteOp::ReplaceIfEqual { .. } => OpKind::ReplaceIfEqual,
            WriteOp::Remove { .. } => OpKind::Remove,
            WriteOp::RemoveIfEqual { .. } => OpKind::RemoveIfEqual,
            WriteOp::Clear { .. } => OpKind::Clear,
            WriteOp::Increment { .. } => OpKind::Increment,
            WriteOp::CreateCache { .. } => OpKind::CreateCache,
            WriteOp::Txn(_) => OpKind::Txn,
        }
    }

    /// The cache it changes (a transaction's first; `Op::caches` names them all).
    pub fn cache(&self) -> &str {
        match self {
            WriteOp::Put { cache, .. }
            | WriteOp::PutAll { cache, .. }
            | WriteOp::PutIfAbsent { cache, .. }
            | WriteOp::Replace { cache, .. }
            | WriteOp::ReplaceIfEqual { cache, .. }
            | WriteOp::Remove { cache, .. }
            | WriteOp::RemoveIfEqual { cache, .. }
            | WriteOp::Clear { cache }
            | WriteOp::Increment { cache, .. }
            | WriteOp::CreateCache { cache, .. } => cache,
            WriteOp::Txn(txn) => txn.targets().next().map_or("", |(c, _, _)| c),
        }
    }

    /// The keys it names.
    pub fn keys(&self) -> Vec<&[u8]> {
        match self {
            WriteOp::Put { key, .. }
            | WriteOp::PutIfAbsent { key, .. }
            | WriteOp::Replace { key, .. }
            | WriteOp::ReplaceIfEqual { key, .. }
            | WriteOp::Remove { key, .. }
            | WriteOp::RemoveIfEqual { key, .. }
            | WriteOp::Increment { key, .. } => vec![key.as_slice()],
            WriteOp::PutAll { entries, .. } => entries.iter().map(|(k, _)| k.as_slice()).collect(),
            WriteOp::Txn(txn) => txn.targets().map(|(_, k, _)| k).collect(),
            WriteOp::Clear { .. } | WriteOp::CreateCache { .. } => Vec::new(),
        }
    }

    /// Length of the largest value it carries, compared ones included (for the value size limit;
    /// checked on every write, so it allocates nothing).
    pub fn largest_value(&self) -> usize {
        match self {
            WriteOp::Put { value, .. } | WriteOp::PutIfAbsent { value, .. } | WriteOp::Replace { value, .. } => {
                value.len()
            }
            WriteOp::ReplaceIfEqual { expected, value, .. } => expected.len().max(value.len()),
            WriteOp::RemoveIfEqual { expected, .. } => expected.len(),
            WriteOp::PutAll { entries, .. } => entries.iter().map(|(_, v)| v.len()).max().unwrap_or(0),
            WriteOp::Txn(txn) => txn.largest_value(),
            WriteOp::Remove { .. }
            | WriteOp::Clear { .. }
            | WriteOp::Increment { .. }
            | WriteOp::CreateCache { .. } => 0,
        }
    }

    /// The session an entry it writes belongs to, if any.
    pub fn session(&self) -> Option<u64> {
        match self {
            WriteOp::Put { opts, .. } | WriteOp::PutIfAbsent { opts, .. } => opts.session,
            _ => None,
        }
    }
}

impl SessionOp {
    /// Its kind.
    pub fn kind(&self) -> OpKind {
        match self {
            SessionOp::Open { .. } => OpKind::OpenSession,
            SessionOp::KeepAlive { .. } => OpKind::KeepAlive,
            SessionOp::Close { .. } => OpKind::CloseSession,
            SessionOp::Lock { .. } => OpKind::Lock,
            SessionOp::Unlock { .. } => OpKind::Unlock,
        }
    }

    /// The cache of the lock it takes or releases.
    pub fn cache(&self) -> Option<&str> {
        match self {
            SessionOp::Lock { cache, .. } | SessionOp::Unlock { cache, .. } => Some(cache),
            SessionOp::Open { .. } | SessionOp::KeepAlive { .. } | SessionOp::Close { .. } => None,
        }
    }

    /// The key of the lock it takes or releases.
    pub fn key(&self) -> Option<&[u8]> {
        match self {
            SessionOp::Lock { key, .. } | SessionOp::Unlock { key, .. } => Some(key),
            SessionOp::Open { .. } | SessionOp::KeepAlive { .. } | SessionOp::Close { .. } => None,
        }
    }

    /// The session it acts for (none yet when it opens one).
    pub fn session(&self) -> Option<u64> {
        match self {
            SessionOp::KeepAlive { session }
            | SessionOp::Close { session }
            | SessionOp::Lock { session, .. }
            | SessionOp::Unlock { session, .. } => Some(*session),
            SessionOp::Open { .. } => None,
        }
    }
}

/// Role of a server in its stripe, as reported to clients and in status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// The Raft leader: takes writes and strong reads.
    Active,
    /// A follower (or a candidate while an election runs).
    Mirror,
}

/// Successful results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Reply {
    /// Answer to `Ping`.
    Pong {
        /// Name of the answering server.
        server: String,
        /// Its stripe index.
        stripe: u32,
        /// Its role.
        role: Role,
        /// Name of the active it knows of.
        leader: Option<String>,
        /// Its Raft term.
        term: u64,
        /// Index of the last entry in its log.
        last_log_index: u64,
        /// Index of the last entry applied to its caches.
        applied_index: u64,
    },
    /// A value or its absence.
    Value(#[serde(with = "serde_bytes")] Option<Vec<u8>>),
    /// Values in request order.
    Values(#[serde(with = "crate::byte_lists::optional_list")] Vec<Option<Vec<u8>>>),
    /// A condition's outcome (contains, compare-and-swap).
    Bool(bool),
    /// Done, nothing to return.
    Done,
    /// A page of keys; `more` says whether another page follows.
    Keys {
        #[serde(with = "crate::byte_lists::list")]
        keys: Vec<Vec<u8>>,
        more: bool,
    },
    /// A count.
    Size(u64),
    /// A counter's new value.
    Counter(i64),
    /// A session was opened.
    Session {
        /// Its id on this stripe.
        id: u64,
        /// How long it survives without keep-alives, in milliseconds.
        reconnect_window_ms: u64,
    },
    /// Locks, for `ListLocks`.
    Locks(Vec<LockInfo>),
    /// Entries in request order, for `Entries`.
    Entries(Vec<Option<EntryInfo>>),
    /// A transaction's outcome: whether its guards held, and what each step of the branch that ran
    /// produced.
    Txn { succeeded: bool, results: Vec<StepReply> },
    /// The stripe's time, ms since the Unix epoch, for `Time`.
    Time(u64),
}

/// Failures a server reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ErrorReply {
    /// This server is not the active; `leader` names the active it knows of.
    #[error("not the active server of the stripe (active: {leader:?})")]
    NotLeader { leader: Option<String> },
    /// The server cannot reach a majority of its stripe, so it cannot serve this safely.
    #[error("no quorum: the server cannot reach a majority of its stripe")]
    NoQuorum,
    /// The key belongs to another stripe (the client's config is stale).
    #[error("the key belongs to stripe {owner}, not to this server's stripe")]
    WrongStripe { owner: u32 },
    /// The request ran past its deadline on the server; a write may or may not have been applied.
    #[error("timed out on the server; the outcome is unknown")]
    Timeout,
    /// The request is malformed or breaks a limit.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The session is unknown or has expired: the client must rejoin with a new session.
    #[error("the client session has expired")]
    SessionExpired,
    /// The lock was not granted within the wait time (or at once, for a wait of 0).
    #[error("the lock was not granted in time")]
    LockTimeout,
    /// The session does not hold the lock it tried to release.
    #[error("the session does not hold this lock")]
    NotLockHolder,
    /// The value of the key is not a decimal counter.
    #[error("the value is not a decimal integer counter")]
    NotACounter,
    /// The server is stopping.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// Anything else; the message says what.
    #[error("server error: {0}")]
    Internal(String),
    /// The connection's credential may not do this (read or write this cache).
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// The server is at one of its own limits (the message names it): nothing was done, and the
    /// same request may succeed later. Not the caller's fault, unlike `Invalid`.
    #[error("the server is busy: {0}")]
    Busy(String),
    /// The key's slot is moving to another stripe (`ferrocotta array rebalance`): nothing was
    /// done; it is served again, by its new stripe, once the move finishes (a moment).
    #[error("slot {slot} is moving to another stripe; try again in a moment")]
    SlotMoving { slot: u16 },
}

/// A reply with the id of its request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    /// Id of the request answered.
    pub id: u64,
    /// The answering server's configuration generation for its stripe: a client whose document
    /// is older downloads it again.
    pub generation: u64,
    /// The outcome.
    pub result: Result<Reply, ErrorReply>,
}

/// Kind of a Raft call between servers; the payload's encoding depends on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerRpc {
    /// openraft AppendEntries.
    AppendEntries,
    /// openraft Vote.
    Vote,
    /// openraft InstallSnapshot (one chunk).
    InstallSnapshot,
    /// What the peer holds, for stripe formation (no payload; answered even before the peer's
    /// Raft group is initialized).
    Probe,
    /// The stripe's roster as the peer has applied it (no payload): how a server added to a
    /// running array learns where it belongs.
    Roster,
    /// From the active to a mirror: campaign now, the active hands over (no payload).
    CampaignNow,
}

/// Messages a client (or peer) sends.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ClientMessage {
    /// Handshake, answering the challenge.
    Hello(Hello),
    /// A request, after the handshake.
    Request(Request),
    /// A Raft call from a peer, after the handshake.
    PeerCall {
        /// Call id, echoed in the reply.
        id: u64,
        /// Which call.
        rpc: PeerRpc,
        /// The openraft request, encoded by the array server.
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
    },
}

/// Messages a server sends.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ServerMessage {
    /// First frame of every connection.
    Challenge {
        /// Fresh random bytes of the server.
        server_nonce: [u8; NONCE_BYTES],
    },
    /// Handshake accepted.
    Welcome(Welcome),
    /// Handshake refused; the connection closes.
    Refused(Refusal),
    /// Reply to a request.
    Response(Response),
    /// Reply to a Raft call.
    PeerReply {
        /// Id of the call.
        id: u64,
        /// The openraft result, encoded by the array server.
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
    },
    /// The connection broke a rule (malformed or oversized frame); it closes after this.
    Fatal(String),
}

type HmacSha256 = Hmac<Sha256>;

fn mac(secret: &[u8], label: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut m = HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length");
    m.update(label);
    for p in parts {
        m.update(&(p.len() as u32).to_be_bytes());
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

/// The client's proof: HMAC(secret, server nonce, client nonce, array name, role). An empty secret
/// is used when none is configured, so a client without the secret fails against a server with one.
pub fn client_proof(
    secret: &[u8],
    server_nonce: &[u8; NONCE_BYTES],
    client_nonce: &[u8; NONCE_BYTES],
    array_name: &str,
    role: &ConnectionRole,
) -> [u8; 32] {
    let role_bytes = postcard::to_allocvec(role).expect("roles always encode");
    mac(
        secret,
        b"ferrocotta-client-v1",
        &[server_nonce, client_nonce, array_name.as_bytes(), &role_bytes],
    )
}

/// The server's proof: HMAC(secret, client nonce, server nonce), under another label so a proof
/// cannot be reflected back.
pub fn server_proof(secret: &[u8], server_nonce: &[u8; NONCE_BYTES], client_nonce: &[u8; NONCE_BYTES]) -> [u8; 32] {
    mac(secret, b"ferrocotta-server-v1", &[client_nonce, server_nonce])
}

/// Header that carries an admin change's proof: `<unix seconds>:<hex HMAC>`.
pub const ADMIN_PROOF_HEADER: &str = "x-ferrocotta-proof";

/// How far an admin change's time may be from the server's clock.
pub const ADMIN_PROOF_WINDOW_SECS: u64 = 60;

/// The proof of an admin change (a membership change on an array server's admin port): HMAC with
/// the peer secret over the method, path, time and body. The secret never crosses the wire, and a
/// proof is good for one request within [`ADMIN_PROOF_WINDOW_SECS`].
pub fn admin_change_proof(peer_secret: &[u8], method: &str, path: &str, at_secs: u64, body: &[u8]) -> [u8; 32] {
    mac(
        peer_secret,
        b"ferrocotta-admin-change-v1",
        &[method.as_bytes(), path.as_bytes(), at_secs.to_string().as_bytes(), body],
    )
}

/// The header value proving an admin change made now.
pub fn admin_proof_header(peer_secret: &[u8], method: &str, path: &str, body: &[u8]) -> String {
    let at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let proof = admin_change_proof(peer_secret, method, path, at, body);
    format!("{at}:{}", proof.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

/// Checks an admin change's proof header against the peer secret and the clock.
pub fn check_admin_proof(
    peer_secret: &[u8],
    header: Option<&str>,
    method: &str,
    path: &str,
    body: &[u8],
) -> Result<(), String> {
    let header = header.ok_or_else(|| {
        format!("a change needs the `{ADMIN_PROOF_HEADER}` header (made with the peer secret by `ferrocotta array`)")
    })?;
    let (at, hex) = header.split_once(':').ok_or("malformed proof header")?;
    let at: u64 = at.parse().map_err(|_| "malformed proof time")?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    if now.abs_diff(at) > ADMIN_PROOF_WINDOW_SECS {
        return Err(format!(
            "the proof was made {}s away from this server's clock (at most {ADMIN_PROOF_WINDOW_SECS}s): check the clocks",
            now.abs_diff(at)
        ));
    }
    let given: Vec<u8> = (0..hex.len() / 2)
        .filter_map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok())
        .collect();
    let want = admin_change_proof(peer_secret, method, path, at, body);
    if given.len() != 32 || !crate::security::constant_time_eq(&given, &want) {
        return Err("the proof does not match: made without this array's peer secret".into());
    }
    Ok(())
}

/// Compares two proofs in constant time.
pub fn proofs_equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    crate::security::constant_time_eq(a, b)
}

/// A fresh nonce.
pub fn nonce() -> [u8; NONCE_BYTES] {
    rand::random()
}

/// Encodes a message as a frame body (without the length prefix, which the codec adds).
pub fn encode<T: Serialize>(msg: &T) -> bytes::Bytes {
    postcard::to_allocvec(msg)
        .expect("protocol messages always encode")
        .into()
}

/// Decodes a frame body.
pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, postcard::Error> {
    postcard::from_bytes(bytes)
}

/// The length-prefixed codec with a frame bound.
pub fn codec(max_frame_bytes: usize) -> tokio_util::codec::LengthDelimitedCodec {
    tokio_util::codec::LengthDelimitedCodec::builder()
        .length_field_length(4)
        .big_endian()
        .max_frame_length(max_frame_bytes)
        .new_codec()
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_admin_proof_holds_only_for_its_secret_request_and_time() {
        let secret = b"peer-secret-0123456789";
        let header = admin_proof_header(secret, "DELETE", "/v1/roster/servers/a1", b"");
        assert_eq!(
            check_admin_proof(secret, Some(&header), "DELETE", "/v1/roster/servers/a1", b""),
            Ok(())
        );
        // Another request, another secret, no header, an old time: refused.
        assert!(check_admin_proof(secret, Some(&header), "DELETE", "/v1/roster/servers/a2", b"").is_err());
        assert!(check_admin_proof(
            b"client-secret-0123456",
            Some(&header),
            "DELETE",
            "/v1/roster/servers/a1",
            b""
        )
        .is_err());
        assert!(check_admin_proof(secret, None, "DELETE", "/v1/roster/servers/a1", b"").is_err());
        let old = admin_change_proof(secret, "DELETE", "/v1/roster/servers/a1", 1_000, b"");
        let old = format!("1000:{}", old.iter().map(|b| format!("{b:02x}")).collect::<String>());
        let err = check_admin_proof(secret, Some(&old), "DELETE", "/v1/roster/servers/a1", b"").unwrap_err();
        assert!(err.contains("clock"), "{err}");
    }

    use super::*;

    /// Byte fields are `serde_bytes`; the wire format is what it was when they were sequences of
    /// u8 (postcard writes both as a length and the bytes), so old and new peers understand each
    /// other.
    #[test]
    fn byte_fields_encode_as_sequences_did() {
        #[derive(Serialize)]
        struct AsSeq {
            key: Vec<u8>,
            value: Option<Vec<u8>>,
        }
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct AsBytes {
            #[serde(with = "serde_bytes")]
            key: Vec<u8>,
            #[serde(with = "serde_bytes")]
            value: Option<Vec<u8>>,
        }
        let key: Vec<u8> = (0..=255u8).collect();
        let value = Some(vec![9u8; 300]);
        let seq = postcard::to_allocvec(&AsSeq {
            key: key.clone(),
            value: value.clone(),
        })
        .unwrap();
        let bytes = AsBytes { key, value };
        assert_eq!(postcard::to_allocvec(&bytes).unwrap(), seq);
        assert_eq!(postcard::from_bytes::<AsBytes>(&seq).unwrap(), bytes);
    }

    #[test]
    fn messages_round_trip() {
        let req = ClientMessage::Request(Request {
            id: 7,
            timeout_ms: 1000,
            op: Op::Write(WriteOp::Put {
                cache: "c".into(),
                key: b"k".to_vec(),
                value: b"v".to_vec(),
                opts: PutOptions::default(),
            }),
        });
        let bytes = encode(&req);
        match decode::<ClientMessage>(&bytes).unwrap() {
            ClientMessage::Request(r) => {
                assert_eq!(r.id, 7);
                assert_eq!(r.op.kind(), OpKind::Put);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for len in 0..64 {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let _ = decode::<ClientMessage>(&bytes);
        }
    }

    #[test]
    fn proofs_depend_on_the_secret() {
        let (s, c) = (nonce(), nonce());
        let a = client_proof(b"one", &s, &c, "arr", &ConnectionRole::Client);
        let b = client_proof(b"two", &s, &c, "arr", &ConnectionRole::Client);
        assert!(!proofs_equal(&a, &b));
        assert!(proofs_equal(
            &a,
            &client_proof(b"one", &s, &c, "arr", &ConnectionRole::Client)
        ));
        assert!(!proofs_equal(&server_proof(b"one", &s, &c), &a));
    }

    #[test]
    fn version_rules() {
        assert!(versions_compatible("0.1.0", "0.1.7"));
        assert!(!versions_compatible("0.2.0", "0.1.0"));
        assert_eq!(
            version_mismatch_message("9.9.0", "0.1.0"),
            "Client/Server Version Mismatch Error: Client Version: 9.9.0, Server Version: 0.1.0"
        );
    }

    #[test]
    fn every_kind_is_listed_once_in_its_place_with_its_own_name() {
        let mut names = std::collections::BTreeSet::new();
        for (i, kind) in OpKind::ALL.iter().enumerate() {
            assert_eq!(*kind as usize, i);
            assert!(names.insert(kind.name()), "{kind:?} shares its name");
        }
    }
}
