//! The `chorus` binary's library: everything that does I/O at the edge.
//!
//! - [`server`]: the node (HTTP/WebSocket and QUIC edges, sessions, rooms, shutdown).
//! - [`config`]: node configuration and its defaults.
//! - [`client`]: the Rust client library (WebSocket and QUIC, reconnect with jittered
//!   backoff, resume). Used by `chorus client`, the load generator and the tests.
//! - [`token`]: JWT (HS256) minting and verification.
//! - [`cli`]: the command line (`chorus serve | token | client | loadgen`).

pub mod cli;
pub mod client;
pub mod config;
pub mod server;
pub mod token;
