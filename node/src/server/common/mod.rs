//! What every layer of the node uses: the inter-node encoding, keys, HTTP responses, group commit, per-key locks, the analytics sink.

pub mod analytics;
pub mod codec;
pub mod group_commit;
pub mod http;
pub mod keyed;
pub mod keys;
