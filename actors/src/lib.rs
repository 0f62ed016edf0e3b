//! Chorus domain cores and their actor shells.
//!
//! Cores are sans-IO (see `../shared/STYLE.md`): plain structs with `handle_*(&mut self,
//! now_ms, …)` methods that return results and queue effects; they never read the clock,
//! touch sockets or disks. Start with [`room`].

pub mod rate;
pub mod room;
