//! The Chorus cluster layer.
//!
//! Today: [`tls`], the cluster CA and node certificates used by client-facing QUIC (and,
//! next, by mutual TLS between nodes). Raft metadata, placement and inter-node links
//! arrive with the cluster issue; see `ARCHITECTURE.md`.

pub mod link;
pub mod metadata;
pub mod raft;
pub mod ring;
pub mod tls;
