//! The node server, in layers whose imports run one way (bottom to top; checked by
//! `tests/module_graph.rs`):
//!
//! - [`common`]: the inter-node encoding (a [`common::codec::Domain`] tag per request),
//!   ring and member keys, HTTP responses, group commit, per-key locks, analytics.
//! - [`sessions`]: client sessions (resume, ordered delivery) and per-user bounds.
//! - [`context`]: [`context::NodeContext`], what every part shares (configuration,
//!   cluster, database, sessions, stop signal).
//! - [`rooms`]: [`rooms::service::Rooms`] and everything about rooms: routing to owners,
//!   activation and recovery, replication, relays and mirrors, upkeep, batches, voice.
//! - [`rain`], [`quiz`]: red-packet rains and quiz shows, over the rooms.
//! - [`voicemail`]: voice messages (their store so far).
//! - [`edge`]: client connections (WebSocket, QUIC) and their request handler.
//! - [`admin`]: `/admin/*`, readiness.
//! - [`http`]: the HTTP listeners.
//! - [`node`]: the wiring: [`Node`], [`start`], [`RunningNode`] and its ordered stop.

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
pub mod voicemail;
pub mod web;

pub use node::{start, Node, RunningNode, ServeError, StopOutcome, STOP_NOW_FLUSH_TIMEOUT_MS};
