//! One ferrocotta array server: a member of a stripe, replicated with openraft, durable in sled.
//!
//! - [`types`]: the openraft type configuration.
//! - [`command`]: the log's own payload (client changes converted from the wire at the stripe),
//!   with fixed tags, and what applying it produced.
//! - [`log_store`]: the Raft log and vote in sled, with group commit, verified at open.
//! - [`mark`]: the small file that tells a log that lost entries from a healthy one.
//! - [`data_folder`]: a server's data folder opened verified, and `cache-array repair`.
//! - [`formation`]: founding a stripe once, joining after lost data, when a server may vote.
//! - [`store`]: the replicated data: caches with expiry and eviction, sessions, locks.
//! - [`sessions`]: client sessions in the store: open, end, what ending releases.
//! - [`locks`]: exclusive and shared locks with ordered waiters.
//! - [`txn`]: transactions: guards, then steps, all or nothing.
//! - [`state_machine`]: the store behind openraft's state machine.
//! - [`snapshot_file`]: checksummed snapshot files, replaced atomically and only by newer ones.
//! - [`compaction`]: snapshots by log size, staggered over the servers of a stripe.
//! - [`active`]: what the active knows only in memory: keep-alives, reads to turn into access times.
//! - [`upkeep`]: the active's duties: keep-alives, access-time batches, expiry sweeps.
//! - [`listener`]: serving a framed port: admission, TLS, the handshake, one task a connection.
//! - [`network`]: Raft traffic between servers on the group port, peers authenticated as themselves.
//! - [`roster`]: the stripe's servers as a replicated, versioned document (the live config).
//! - [`membership`]: adding and removing servers while the stripe runs; handing over the active.
//! - [`stripe`]: the Raft node of this server, stripe formation, safe writes and read-index reads.
//! - [`service`]: the client port.
//! - [`admin`]: admin HTTP.
//! - [`resp`]: the Redis-protocol front end.
//! - [`metrics`]: request counters.
//! - [`server`]: wiring and shutdown.

pub mod active;
pub mod admin;
pub mod command;
pub mod compaction;
pub mod console;
pub mod data_folder;
pub mod elections;
#[cfg(test)]
mod format_fixture;
pub mod formation;
#[cfg(test)]
mod fuzz;
pub mod listener;
pub mod locks;
pub mod log_store;
pub mod mark;
pub mod membership;
pub mod metrics;
pub mod network;
pub mod resp;
pub mod roster;
pub mod server;
pub mod service;
pub mod sessions;
pub mod slot_moves;
pub mod snapshot_file;
pub mod state_machine;
pub mod store;
pub mod stripe;
pub mod txn;
pub mod types;
pub mod upkeep;
