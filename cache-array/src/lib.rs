//! One ferrocotta array server: a member of a stripe, replicated with openraft, durable in sled.
//!
//! - [`types`]: the openraft type configuration and the log entry payload.
//! - [`log_store`]: the Raft log and vote in sled, with group commit.
//! - [`state_machine`]: the caches in memory, checksummed snapshots on disk.
//! - [`network`]: Raft traffic between servers on the group port.
//! - [`stripe`]: the Raft node of this server, stripe formation, safe writes and read-index reads.
//! - [`service`]: the client port.
//! - [`admin`]: admin HTTP.
//! - [`metrics`]: request counters.
//! - [`server`]: wiring and shutdown.

pub mod admin;
pub mod log_store;
pub mod metrics;
pub mod network;
pub mod server;
pub mod service;
pub mod state_machine;
pub mod stripe;
pub mod types;
