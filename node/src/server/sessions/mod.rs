//! Client sessions and per-user bounds.

pub mod outgoing;
pub mod session;
pub mod users;
pub mod wire;
