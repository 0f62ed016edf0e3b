//! The node server: HTTP (WebSocket `/ws`, `/ws/echo`, `/healthz`, `/readyz`, `/metrics`) and QUIC
//! edges, the session registry and the room directory, and orderly shutdown.
//!
//! Shutdown order: drain (hand the rooms to other members), stop accepting and close client
//! connections (`unavailable`, they resume elsewhere), stop room actors, stop Raft, flush
//! sled, close the QUIC endpoints; each step bounded, and all of them together by the drain
//! deadline, after which (or at a second signal) only sled is flushed
//! ([`RunningNode::shutdown`]).

pub mod admin;
pub mod common;
pub mod context;
pub mod edge;
pub mod http;
pub mod node;
pub mod quiz;
pub mod rain;
pub mod rooms;
pub mod sessions;

pub use node::{start, Node, RunningNode, ServeError, StopOutcome, STOP_NOW_FLUSH_TIMEOUT_MS};
