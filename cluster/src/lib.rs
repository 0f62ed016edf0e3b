//! The Chorus cluster layer: what makes several nodes one system.
//!
//! Start with [`metadata`] (the sans-IO state machine Raft replicates: members, ring
//! epoch, ownership with fencing epochs, durable definitions), then [`raft`] (openraft on
//! sled behind our own `MetadataRaft`; the transport is a seam), [`ring`] (placement:
//! rendezvous hashing over the `Up` members), [`link`] (inter-node QUIC with mutual TLS),
//! [`mesh`] (ractor_cluster actor messages over those links)
//! and [`tls`] (the cluster CA and node certificates). The node wires them together; see
//! `ARCHITECTURE.md`.

pub mod link;
pub mod mesh;
pub mod metadata;
pub mod raft;
pub mod ring;
pub mod service;
pub mod tls;
