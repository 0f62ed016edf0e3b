//! The `chorus` binary's library: everything that does I/O at the edge.
//!
//! - [`client`]: the Rust client library (WebSocket and QUIC, reconnect with jittered
//!   backoff, resume). Used by `chorus client`, the load generator and the tests.
//! - [`token`]: JWT (HS256) minting and verification.

pub mod client;
pub mod token;
