//! Durable room definitions in sled (one tree in the node's database).
//!
//! This is shell-side I/O: cores emit `Persist` effects, the room actor writes them here.
//! Values are MessagePack-encoded [`RoomDefinition`]s keyed by room id.

use crate::room::RoomDefinition;

/// Name of the sled tree holding room definitions.
pub const ROOMS_TREE: &str = "rooms";

/// Errors of the durable store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled failed.
    #[error("storage: {0}")]
    Sled(#[from] sled::Error),
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

/// Where room definitions live: the node's sled (single node) or the cluster's Raft
/// metadata. Reads are local; writes may wait for replication.
pub trait DefinitionStore: Send + Sync + 'static {
    /// The stored definition of `room_id`, if any.
    fn get(&self, room_id: &str) -> Result<Option<RoomDefinition>, StoreError>;
    /// Stores (replaces) a definition; resolves once it is durable.
    fn put<'a>(
        &'a self,
        definition: &'a RoomDefinition,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), StoreError>> + Send + 'a>>;
}

impl DefinitionStore for RoomStore {
    fn get(&self, room_id: &str) -> Result<Option<RoomDefinition>, StoreError> {
        RoomStore::get(self, room_id)
    }

    fn put<'a>(
        &'a self,
        definition: &'a RoomDefinition,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), StoreError>> + Send + 'a>>
    {
        Box::pin(async move { RoomStore::put(self, definition) })
    }
}

/// Room definitions stored in sled.
#[derive(Debug, Clone)]
pub struct RoomStore {
    db: sled::Db,
    tree: sled::Tree,
}

impl RoomStore {
    /// Opens the rooms tree of `db`.
    pub fn open(db: &sled::Db) -> Result<Self, StoreError> {
        Ok(RoomStore {
            db: db.clone(),
            tree: db.open_tree(ROOMS_TREE)?,
        })
    }

    /// Stores `definition` and flushes. (sled 0.34's flush is not a full fsync on Linux;
    /// replication across nodes is what makes definitions survive a lost disk.)
    pub fn put(&self, definition: &RoomDefinition) -> Result<(), StoreError> {
        let bytes =
            rmp_serde::to_vec_named(definition).map_err(|e| StoreError::Encode(e.to_string()))?;
        self.tree.insert(definition.room_id.as_bytes(), bytes)?;
        self.db.flush()?;
        Ok(())
    }

    /// Loads a definition.
    pub fn get(&self, room_id: &str) -> Result<Option<RoomDefinition>, StoreError> {
        match self.tree.get(room_id.as_bytes())? {
            None => Ok(None),
            Some(bytes) => {
                rmp_serde::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| StoreError::Decode {
                        room_id: room_id.to_string(),
                        reason: e.to_string(),
                    })
            }
        }
    }

    /// Number of stored definitions.
    pub fn len(&self) -> usize {
        self.tree.len()
    }

    /// Whether no definitions are stored.
    pub fn is_empty(&self) -> bool {
        self.tree.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::room::RoomConfig;

    #[test]
    fn definitions_survive_reopening_the_database() {
        let dir = tempfile::tempdir().expect("tempdir");
        let def = RoomDefinition::new(
            "r-1".into(),
            "Morning show",
            "alice".into(),
            None,
            1_000,
            &RoomConfig::default(),
        )
        .expect("valid");
        {
            let db = sled::open(dir.path()).expect("open");
            RoomStore::open(&db).expect("tree").put(&def).expect("put");
        }
        // sled's background flusher may hold the directory lock a moment after the drop.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let db = loop {
            match sled::open(dir.path()) {
                Ok(db) => break db,
                Err(error) => {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "cannot reopen sled: {error}"
                    );
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
            }
        };
        let store = RoomStore::open(&db).expect("tree");
        assert_eq!(store.get("r-1").expect("get"), Some(def));
        assert_eq!(store.get("r-2").expect("get"), None);
    }
}
