//! Client connections: WebSocket and QUIC transports, read budgets, the connection's request handler.

pub mod budget;
pub mod connection;
pub mod quic;
pub mod service;
pub mod ws;
