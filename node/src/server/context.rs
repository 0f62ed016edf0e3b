//! What every part of the node shares ([`NodeContext`]): its configuration, its cluster
//! membership (`ClusterService`: Raft metadata, ring, inter-node channel), the actor mesh,
//! its sled database and that database's group commit, its sessions and per-user bounds,
//! and its stop signal. `NodeTicker` is the clock of the node's background loops: one tick
//! per period (a late tick delays the next, never bunches them), ending when the part it
//! runs for is dropped or the node stops.
//!
//! **Boundary:** this layer sits above `common` and `sessions` and below the rooms,
//! rains, quizzes, edge and admin, which each hold an `Arc<NodeContext>`. It imports
//! nothing above it and holds no room, rain or quiz state: its helpers answer from the
//! applied metadata (owners, committed epochs, live peers) and deliver to local sessions.

use std::sync::{Arc, Weak};
use std::time::Duration;

use chorus_cluster::metadata::NodeId;
use tokio_util::sync::CancellationToken;

use crate::config::NodeConfig;
use crate::server::common::group_commit::GroupCommit;
use crate::server::common::keys::room_key;
use crate::server::sessions::session::SessionRegistry;
use crate::server::sessions::users::UserBounds;

/// The node's shared parts.
pub struct NodeContext {
    /// The configuration in force.
    pub config: NodeConfig,
    /// Membership, metadata, ring and the inter-node channel.
    pub cluster: chorus_cluster::service::ClusterService,
    /// The actor mesh between nodes (session control).
    pub mesh: chorus_cluster::mesh::ActorMesh,
    /// This node's database.
    pub db: sled::Db,
    /// Cancelled when the node stops.
    pub shutdown: CancellationToken,
    /// Flushes this node's sled for changes acknowledged without a copy on another node.
    pub group_commit: GroupCommit,
    /// The client sessions on this node.
    pub sessions: SessionRegistry,
    /// Per-user bounds kept on this node (sessions, creations).
    pub users: UserBounds,
    /// Client connections open on this node (counted by the edge against
    /// `connections_max`).
    pub connections: std::sync::atomic::AtomicUsize,
}

impl NodeContext {
    /// The other members not marked `Down`: the nodes a room asks (recovery, notices, log
    /// parts).
    pub(crate) fn live_peers(&self) -> Vec<NodeId> {
        let self_id = self.cluster.node_id();
        self.cluster
            .metadata()
            .nodes
            .values()
            .filter(|n| n.id != self_id && n.state != chorus_cluster::metadata::NodeState::Down)
            .map(|n| n.id)
            .collect()
    }

    /// The owner of `room_id` on this node's current ring (this node if there is none).
    pub(crate) fn owner_of(&self, room_id: &str) -> NodeId {
        self.owner_of_key(&room_key(room_id))
    }

    /// The owner of actor key `key` (`room/…`, `rain/…`, `quiz/…`) on this node's current
    /// ring (this node if there is none).
    pub(crate) fn owner_of_key(&self, key: &str) -> NodeId {
        self.cluster
            .ring()
            .and_then(|ring| ring.owner(key))
            .unwrap_or_else(|| self.cluster.node_id())
    }

    /// The ownership epoch of actor key `key` committed in this node's metadata (0 if
    /// none).
    pub(crate) fn committed_epoch_of(&self, key: &str) -> u64 {
        self.cluster
            .metadata()
            .owners
            .get(key)
            .map(|o| o.epoch)
            .unwrap_or(0)
    }

    /// Whether `room_id` exists and has not ended (from the applied metadata).
    pub(crate) fn room_is_open(&self, room_id: &str) -> bool {
        let metadata = self.cluster.metadata();
        metadata
            .definitions
            .get(&room_key(room_id))
            .and_then(|bytes| {
                rmp_serde::from_slice::<chorus_actors::room::RoomDefinition>(bytes).ok()
            })
            .is_some_and(|definition| definition.ended_at_ms.is_none())
    }

    /// Delivers `body` to every session here of one of `users`. O(sessions here).
    pub(crate) fn deliver_to_users(
        &self,
        users: &[String],
        body: &Arc<chorus_protocol::EncodedBody>,
    ) {
        use chorus_actors::room_actor::MemberSink as _;
        let users: std::collections::HashSet<&str> = users.iter().map(String::as_str).collect();
        for session in self.sessions.all() {
            if users.contains(session.user_id.as_str()) {
                session.deliver(body);
            }
        }
    }
}

/// A part of the node that a background loop runs for, and stops with.
pub(crate) trait Stopping {
    /// Whether the node is stopping.
    fn stopping(&self) -> bool;
}

impl Stopping for NodeContext {
    fn stopping(&self) -> bool {
        self.shutdown.is_cancelled()
    }
}

/// The clock of a node's background loop: one tick per period (a late tick delays the
/// next, never bunches them), and the part it runs for for as long as the node runs.
pub(crate) struct NodeTicker<T> {
    node: Weak<T>,
    tick: tokio::time::Interval,
}

impl<T: Stopping> NodeTicker<T> {
    /// Ticks every `period`, the first at once.
    pub(crate) fn new(node: Weak<T>, period: Duration) -> Self {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        NodeTicker { node, tick }
    }

    /// Waits for the next tick: the part, or `None` once it is gone or the node stops.
    pub(crate) async fn next(&mut self) -> Option<Arc<T>> {
        self.tick.tick().await;
        self.node.upgrade().filter(|node| !node.stopping())
    }
}
