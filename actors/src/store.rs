//! Where room definitions live: the [`DefinitionStore`] the room directory reads them
//! from and writes new ones to (in the node: the cluster's Raft metadata).

use crate::room::RoomDefinition;

/// Errors of the durable store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A stored value does not decode (corruption or an incompatible version).
    #[error("stored room {room_id:?} does not decode: {reason}")]
    Decode {
        /// The key.
        room_id: String,
        /// The decoder's message.
        reason: String,
    },
    /// Encoding failed (a bug).
    #[error("cannot encode room definition: {0}")]
    Encode(String),
    /// The replicated store refused or could not reach a quorum.
    #[error("replicated store: {0}")]
    Replication(String),
}

/// Where room definitions live (in the node: the cluster's Raft metadata). Reads are
/// local; writes may wait for replication.
pub trait DefinitionStore: Send + Sync + 'static {
    /// The stored definition of `room_id`, if any.
    fn get(&self, room_id: &str) -> Result<Option<RoomDefinition>, StoreError>;
    /// Stores (replaces) a definition; resolves once it is durable.
    fn put<'a>(
        &'a self,
        definition: &'a RoomDefinition,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), StoreError>> + Send + 'a>>;
}
