//! Room definitions kept in the cluster's Raft metadata.

use crate::server::common::keys::room_key;

/// Room definitions in the cluster's Raft metadata (key `room/<id>`), so any node can
/// activate a room after its owner is gone.
pub struct RaftDefinitions {
    /// The cluster whose metadata holds them.
    pub cluster: chorus_cluster::service::ClusterService,
}

impl chorus_actors::store::DefinitionStore for RaftDefinitions {
    fn get(
        &self,
        room_id: &str,
    ) -> Result<Option<chorus_actors::room::RoomDefinition>, chorus_actors::store::StoreError> {
        let metadata = self.cluster.metadata();
        match metadata.definitions.get(&room_key(room_id)) {
            None => Ok(None),
            Some(bytes) => rmp_serde::from_slice(bytes).map(Some).map_err(|e| {
                chorus_actors::store::StoreError::Decode {
                    room_id: room_id.to_string(),
                    reason: e.to_string(),
                }
            }),
        }
    }

    fn put<'a>(
        &'a self,
        definition: &'a chorus_actors::room::RoomDefinition,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<Output = Result<(), chorus_actors::store::StoreError>>
                + Send
                + 'a,
        >,
    > {
        Box::pin(async move {
            let value = rmp_serde::to_vec_named(definition)
                .map_err(|e| chorus_actors::store::StoreError::Encode(e.to_string()))?;
            let command = chorus_cluster::metadata::MetadataCommand::PutDefinition {
                key: room_key(&definition.room_id),
                value,
            };
            match self.cluster.write(command).await {
                Ok(chorus_cluster::metadata::MetadataResponse::Ok) => Ok(()),
                Ok(other) => Err(chorus_actors::store::StoreError::Replication(format!(
                    "{other:?}"
                ))),
                Err(error) => Err(chorus_actors::store::StoreError::Replication(
                    error.to_string(),
                )),
            }
        })
    }
}
