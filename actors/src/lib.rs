//! Chorus domain cores and their actor shells.
//!
//! Cores are sans-IO: plain structs with `handle_*(&mut self, now_ms, …)` methods that
//! return results and queue effects; they never read the clock, touch sockets or disks,
//! so the same inputs give the same outputs and tests need neither tokio nor a network.
//! Start with [`room`] (the room core), then [`room_actor`] (its ractor shell and the
//! directory of rooms), [`session`] (resume and per-connection rules), [`replica`] (the
//! replica store's fencing and the recovery copy choice), [`rain_quorum`] (the red-packet
//! pool's quorum), [`quiz_control`] (the quiz controller and judging), [`totals`] (R10's running
//! totals) and [`store`] (the definition store the directory uses).

pub mod bullets;
pub mod polls;
pub mod quiz;
pub mod quiz_control;
pub mod rain;
pub mod rain_quorum;
pub mod rate;
pub mod replica;
pub mod room;
pub mod room_actor;
pub mod session;
pub mod store;
pub mod totals;
pub mod voice;
pub mod voicemail;
