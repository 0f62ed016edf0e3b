//! An in-process [`RaftTransport`] for tests: RPCs go straight to the target's
//! [`RaftRpcHandler`], through the same MessagePack encoding a real link uses.
//!
//! Members are registered by id; an unregistered (or [`disconnect`](InMemoryTransport::disconnect)ed)
//! member is unreachable, which is how tests kill or isolate a node.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};

use super::network::{RaftRpc, RaftRpcHandler, RaftRpcReply, RaftTransport, TransportError};
use crate::metadata::{NodeId, MEMBERS_MAX};

/// A registry of in-process members. Clones share the registry.
#[derive(Debug, Clone, Default)]
pub struct InMemoryTransport {
    // std Mutex: held only to look up or change an entry, never across an await.
    members: Arc<Mutex<BTreeMap<NodeId, RaftRpcHandler>>>,
}

impl InMemoryTransport {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes member `id` reachable through `handler` (replacing an earlier registration).
    /// Registrations beyond [`MEMBERS_MAX`] are ignored, as no cluster can have more members.
    pub fn register(&self, id: NodeId, handler: RaftRpcHandler) {
        let mut members = self.members.lock().unwrap_or_else(PoisonError::into_inner);
        if members.len() < MEMBERS_MAX || members.contains_key(&id) {
            members.insert(id, handler);
        }
    }

    /// Makes member `id` unreachable (as if killed or cut off).
    pub fn disconnect(&self, id: NodeId) {
        self.members
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
    }

    fn handler(&self, id: NodeId) -> Option<RaftRpcHandler> {
        self.members
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&id)
            .cloned()
    }
}

impl RaftTransport for InMemoryTransport {
    fn send(
        &self,
        target: NodeId,
        addr: &str,
        rpc: RaftRpc,
    ) -> impl Future<Output = Result<RaftRpcReply, TransportError>> + Send {
        let handler = self.handler(target);
        let addr = addr.to_owned();
        async move {
            let handler = handler.ok_or_else(|| TransportError::Unreachable {
                target,
                addr,
                reason: "not registered".into(),
            })?;
            // Round-trip through bytes, as over a real link, so the tests cover the codec.
            let request = rpc.encode()?;
            let reply = handler.handle_bytes(&request).await?;
            RaftRpcReply::decode(&reply)
        }
    }
}
