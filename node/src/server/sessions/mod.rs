//! Client sessions and per-user bounds.

pub mod session;
pub mod users;
