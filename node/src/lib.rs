//! The `chorus` binary's library: everything that does I/O at the edge.
//!
//! - [`server`]: the node (HTTP/WebSocket and QUIC edges, sessions, rooms, shutdown).
//! - [`config`]: node configuration and its defaults.
//! - [`client`]: the Rust client library (WebSocket and QUIC, reconnect with jittered
//!   backoff, resume) and `chorus client` ([`client::cli`]). Used by the load generator
//!   and the tests.
//! - [`loadgen`]: `chorus loadgen`, many virtual clients measuring delivery latency.
//! - [`token`]: JWT (HS256) minting and verification.
//! - [`cli`]: the command line (`chorus serve | token | client | loadgen`).

pub mod admin_cli;
pub mod cli;
pub mod client;
pub mod config;
pub mod loadgen;
pub mod server;
pub mod token;
