//! What the workloads record and the checkers read: one entry per operation, with the times it was
//! invoked and returned (nanoseconds since the start of the run, one clock for all clients).
//!
//! An operation whose outcome the client could not learn (a timeout, a broken connection, a
//! refusal that does not prove the write was not applied) has `complete: None` and result
//! [`KvResult::Unknown`]: it may or may not have taken effect, at any time after its invoke.

/// An operation on one key of a register-per-key store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvOp {
    /// Set the key to a value that no other operation of the run writes.
    Put { value: String },
    /// Linearizable read.
    Get,
    /// Set the key to `new` only if it holds `expected` (`new` is unique in the run).
    Cas { expected: String, new: String },
}

/// What the client learned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvResult {
    /// The put was acknowledged.
    PutOk,
    /// The read returned this value (`None`: the key was absent).
    GetOk(Option<String>),
    /// The compare-and-swap was applied (`true`) or refused because the value differed (`false`).
    CasOk(bool),
    /// The outcome is unknown: the operation may or may not have taken effect.
    Unknown,
}

/// One operation of a history.
#[derive(Debug, Clone)]
pub struct KvEntry {
    /// Which client ran it (a client runs one operation at a time).
    pub client: usize,
    /// The key.
    pub key: String,
    /// The operation.
    pub op: KvOp,
    /// When it was invoked (ns since the start of the run).
    pub invoke: u64,
    /// When it returned, if its outcome is known (ns since the start of the run).
    pub complete: Option<u64>,
    /// The outcome.
    pub result: KvResult,
}

/// One request of the session workload: a client increments the counter of one session through an
/// integration node, one request at a time per session.
#[derive(Debug, Clone)]
pub struct SessionEntry {
    /// The session id (cookie value).
    pub session: String,
    /// When it was sent (ns since the start of the run).
    pub invoke: u64,
    /// The counter the node answered, or `None` when the outcome is unknown (timeout, 503, broken
    /// connection: the increment may or may not have been stored).
    pub counter: Option<i64>,
}
