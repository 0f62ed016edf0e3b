//! The `chorus` binary's library: everything that does I/O at the edge.
//!
//! - [`client`]: the Rust client library (WebSocket and QUIC, reconnect with jittered
//!   backoff, resume) and `chorus client` ([`client::cli`]). Used by the load generator
//!   and the tests.
//! - [`loadgen`]: `chorus loadgen`, many virtual clients measuring delivery latency.
//! - [`token`]: JWT (HS256) minting and verification.

pub mod client;
pub mod loadgen;
pub mod token;
