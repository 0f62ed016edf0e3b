//! What every layer of the node uses: the inter-node encoding, keys, HTTP responses, group commit, per-key locks, the analytics sink, client TLS.

pub mod analytics;
pub mod client_tls;
pub mod codec;
pub mod group_commit;
pub mod http;
pub mod keyed;
pub mod keys;
