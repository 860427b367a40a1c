//! ferrocotta: clustered shared state for application servers.
//!
//! This crate is what every other part of ferrocotta builds on; it depends on neither the array
//! server nor the integration node.
//!
//! - [`protocol`]: every type that crosses a process boundary, the framing and the handshake proofs.
//! - [`handshake`]: both sides of the connection handshake.
//! - [`config`]: the cluster configuration document, its loading and validation.
//! - [`slots`]: hash slots, how keys are spread over stripes.
//! - [`client`]: `ArrayClient`, bootstrap from a URL list, routing and failover.
//! - [`loadgen`]: the load generator of `ferrocotta bench` and the peer comparison.

pub mod client;
pub mod config;
pub mod handshake;
pub mod loadgen;
pub mod protocol;
pub mod slots;

pub use client::{ArrayClient, ClientError, ClientSettings};
