//! Rooms: routing to owners, activation and recovery, replication, relays and mirrors, upkeep, reactions, bullets, voice, event logs, the room list.

pub mod activation;
pub mod batches;
pub mod bullets;
pub mod catalog;
pub mod control;
pub mod definitions;
pub mod event_log;
pub mod list;
pub mod messages;
pub mod peer;
pub mod reactions;
pub mod relay;
pub mod replica;
pub mod replicate;
pub mod route;
pub mod service;
pub mod upkeep;
pub mod voice;
