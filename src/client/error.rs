//! The errors of the client, for callers to match on.

use std::time::Duration;

use crate::protocol::{ErrorReply, Refusal};

/// Errors of the client, for callers to match on.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// No URL of the list yielded the config within `connect_timeout`.
    #[error("could not download the array configuration within {waited:?} from any URL: {}", list_failures(.failures))]
    Bootstrap {
        /// Each URL with the last reason it failed.
        failures: Vec<(String, String)>,
        /// How long was spent.
        waited: Duration,
    },
    /// Client and server versions differ.
    #[error("{}", crate::protocol::version_mismatch_message(.client, .server))]
    VersionMismatch {
        /// Client software version.
        client: String,
        /// Server software version.
        server: String,
    },
    /// The server belongs to another array.
    #[error("wrong array name: expected `{expected}`, the server belongs to `{actual}`")]
    WrongArrayName {
        /// The name the client expected.
        expected: String,
        /// The array the server belongs to.
        actual: String,
    },
    /// The shared secret does not match.
    #[error("authentication failed: {0}")]
    AuthenticationFailed(String),
    /// The servers of the downloaded config stayed unreachable for `max_connect_retries` rounds.
    #[error("could not connect to the array's servers after {retries} retries: {}", list_failures(.failures))]
    ConnectRetriesExhausted {
        /// Rounds tried.
        retries: u32,
        /// Each server with the last reason it failed.
        failures: Vec<(String, String)>,
    },
    /// The stripe has no active that can reach a majority.
    #[error("stripe {stripe} has no quorum: no server could serve the request safely before the deadline")]
    NoQuorum {
        /// The stripe.
        stripe: usize,
    },
    /// No server of the stripe could be reached before the deadline.
    #[error("stripe {stripe} is unreachable: {}", list_failures(.failures))]
    Unavailable {
        /// The stripe.
        stripe: usize,
        /// Each server with the last reason it failed.
        failures: Vec<(String, String)>,
    },
    /// The deadline passed.
    #[error("the request timed out after {0:?}; a write may or may not have been applied")]
    Timeout(Duration),
    /// The connection broke after a write was sent: it may or may not have been applied.
    #[error("the outcome of the write is unknown: {0}")]
    Indeterminate(String),
    /// The server refused the request.
    #[error("{0}")]
    Server(ErrorReply),
    /// Bad input from the caller.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// A nonstop deadline passed (SPEC 3.3): the array did not answer in time.
    #[error("nonstop timeout: `{op}` on cache `{cache}` got no answer within {timeout:?}")]
    NonstopTimeout {
        /// The operation.
        op: &'static str,
        /// The cache.
        cache: String,
        /// The deadline that passed.
        timeout: Duration,
    },
    /// The client's session on a stripe expired; the client has rejoined with a new one.
    #[error("the client session expired; the client rejoined with a new session")]
    SessionExpired,
    /// A lock taken before a rejoin cannot be released: the session that held it is gone, and with
    /// it the lock.
    #[error("the lock was taken before the client rejoined the array; it is no longer held")]
    InvalidLockAfterRejoin,
    /// The lock was not granted within the wait time.
    #[error("the lock was not granted within the wait time")]
    LockTimeout,
    /// The request was meant for a stripe the array's layout no longer has (it was removed, its
    /// slots moved to the others): nothing was sent. A keyed request routes its key again.
    #[error("stripe {stripe} is no longer in the array's layout")]
    StripeRemoved { stripe: usize },
}

pub(super) fn list_failures(failures: &[(String, String)]) -> String {
    failures
        .iter()
        .map(|(who, why)| format!("{who}: {why}"))
        .collect::<Vec<_>>()
        .join("; ")
}

impl ClientError {
    /// Whether the error means "the array did not answer in time" (the case nonstop behaviours
    /// handle) rather than a definite answer.
    pub fn is_unavailability(&self) -> bool {
        matches!(
            self,
            ClientError::Timeout(_)
                | ClientError::NoQuorum { .. }
                | ClientError::Unavailable { .. }
                | ClientError::Indeterminate(_)
                | ClientError::NonstopTimeout { .. }
        )
    }

    pub(super) fn from_refusal(r: Refusal) -> ClientError {
        match r {
            Refusal::VersionMismatch { client, server, .. } => ClientError::VersionMismatch { client, server },
            Refusal::WrongArrayName { expected, actual } => ClientError::WrongArrayName { expected, actual },
            Refusal::AuthenticationFailed => {
                ClientError::AuthenticationFailed("the server refused our proof of the shared secret".into())
            }
            Refusal::WrongPort(why) => ClientError::Invalid(why),
            Refusal::Busy(why) => ClientError::Invalid(format!("the server is busy: {why}")),
            Refusal::NotAMember(why) => ClientError::Invalid(why.clone()),
        }
    }
}
