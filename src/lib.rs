//! ferrocotta: clustered shared state for application servers.
//!
//! This crate is what every other part of ferrocotta builds on; it depends on neither the array
//! server nor the integration node.
//!
//! - [`protocol`]: every type that crosses a process boundary, the framing and the handshake proofs.
//! - [`handshake`]: both sides of the connection handshake.
//! - [`security`]: secrets, credentials and what a connection may do.
//! - [`tls`]: TLS for every port (rustls), certificate rotation, a local CA for `up --tls`.
//! - [`admission`]: bounds on the connections a listener takes.
//! - [`http`]: serving an HTTP router with those bounds, plain or TLS, and a small bounded client.
//! - [`log_throttle`]: rate-limited logging of events strangers can cause.
//! - [`config`]: the cluster configuration document, its loading and validation.
//! - [`console`]: the cluster console's documents, shared by the array servers and `ferrocotta top`.
//! - [`slots`]: hash slots, how keys are spread over stripes.
//! - [`pipelined`]: one connection with many requests in flight, the client's and the peers' transport.
//! - [`client`]: `ArrayClient`, bootstrap from a URL list, routing and failover.
//! - [`node_client`]: `NodeClient`, a client of integration nodes that fails over between them
//!   and resubmits guaranteed-delivery transactions (the seed's `Context`).
//! - `loadgen` (feature `loadgen`, on by default): the load generator of `ferrocotta bench` and the
//!   peer comparison; a program that embeds only the client builds without it.

pub mod admission;
pub mod byte_lists;
pub mod client;
pub mod config;
pub mod console;
pub mod handshake;
pub mod http;
pub mod json_bytes;
#[cfg(feature = "loadgen")]
pub mod loadgen;
pub mod log_throttle;
pub mod node_client;
pub mod pipelined;
pub mod protocol;
pub mod security;
pub mod slots;
pub mod tls;

pub use client::{ArrayClient, ClientError, ClientSettings};
