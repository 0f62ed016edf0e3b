//! The Chorus cluster layer: what makes several nodes one system.
//!
//! Start with [`metadata`] (the sans-IO state machine Raft replicates: members, ring
//! epoch, ownership with fencing epochs, durable definitions), then [`raft`] (openraft on
//! sled behind our own `MetadataRaft`; the transport is a seam), [`ring`] (placement:
//! rendezvous hashing over the `Up` members), [`link`] (inter-node QUIC with mutual TLS),
//! [`mesh`] (ractor_cluster actor messages over those links), [`tls`] (the cluster CA and
//! node certificates) and [`service`] (one node's membership: join, removal, addresses,
//! the failure detector, cut-off; the node talks to the cluster through it). The node
//! wires them together; see `ARCHITECTURE.md`.
//!
//! **Boundary:** this crate knows neither rooms, sessions nor the client protocol: the
//! node plugs in through `service::AppHandler` and opaque bytes.

pub mod link;
pub mod mesh;
pub mod metadata;
pub mod raft;
pub mod ring;
pub mod service;
pub mod tls;
