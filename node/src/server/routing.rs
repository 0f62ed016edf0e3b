//! Any-edge routing: a room request from a client on any node goes to the room's owner
//! (placement ring), and the owner's fan-out reaches other nodes' members through one relay
//! per node.
//!
//! - Owner side: a remote session is a room member whose sink is a [`RemoteMember`]; all
//!   remote members on one node share that node's [`EdgeRelay`] (relay group = node id), so
//!   a broadcast crosses to each node once. The relay is a bounded queue drained in order
//!   by one task, in batches, over the inter-node link.
//! - Edge side: [`RoomMirrors`] holds, per remote room, the local sessions that joined it;
//!   relayed events are delivered to them.
//!
//! **Boundary:** relay queues are bounded ([`RELAY_QUEUE_ITEMS_MAX`]). A batch an edge does
//! not take (paused, partitioned) is retried in order for [`RELAY_RETRY_WINDOW_MS`] while
//! later events wait in the queue; past the window, or when the queue overflows, events
//! for that edge are dropped and counted (`chorus_relay_dropped_total`).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use bytes::Bytes;
use chorus_actors::room::{RoomDefinition, RoomDurable};
use chorus_actors::room_actor::{Member, MemberSink};
use chorus_cluster::metadata::NodeId;
use chorus_protocol::{
    EncodedBody, Encoding, ErrorBody, ErrorCode, RoomCommentResponse, RoomInfo, RoomJoinResponse,
    UserId,
};
use serde::{Deserialize, Serialize};
use std::time::Duration;

use chorus_actors::room::RoomError;
use chorus_actors::room_actor::{DirectoryError, RoomMsg};
use ractor::{ActorRef, RpcReplyPort};
use tokio::sync::mpsc;

use super::session::Session;
use super::Node;

/// Events queued per destination node before the relay drops.
pub const RELAY_QUEUE_ITEMS_MAX: usize = 65_536;
/// How long a relay keeps retrying one batch for an edge that does not answer (longer
/// than a paused process or a short partition usually lasts).
pub const RELAY_RETRY_WINDOW_MS: u64 = 30_000;
/// First pause between relay retries.
pub const RELAY_RETRY_BACKOFF_MIN_MS: u64 = 50;
/// Longest pause between relay retries.
pub const RELAY_RETRY_BACKOFF_MAX_MS: u64 = 2_000;
/// Items sent in one relay message.
pub const RELAY_BATCH_ITEMS_MAX: usize = 512;
/// How long an owner waits for its metadata to catch up before it answers that a room
/// does not exist.
pub const DEFINITION_SETTLE_MS: u64 = 2_000;
/// Time a replica has to take a room's durable state.
pub const REPLICATE_TIMEOUT_MS: u64 = 1_000;
/// Time each node has to list its members of a room being activated.
pub const READMIT_QUERY_TIMEOUT_MS: u64 = 1_000;
/// Times a room request follows ownership to a new node before it gives up.
pub const ROUTE_RETRIES_MAX: u32 = 3;
/// Bits of a member key that hold the session number; the node id sits above them, so
/// keys are unique across the cluster.
pub const MEMBER_KEY_NODE_SHIFT: u32 = 40;

/// A cluster-wide member key for session `session_key` on node `node`.
pub fn member_key(node: NodeId, session_key: u64) -> u64 {
    (node << MEMBER_KEY_NODE_SHIFT) | (session_key & ((1 << MEMBER_KEY_NODE_SHIFT) - 1))
}

/// The ring key of a room.
pub fn room_key(room_id: &str) -> String {
    super::admin::room_key(room_id)
}

/// A room operation, executed by the room's owner.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum RoomOp {
    /// Create the room with this definition.
    Create(RoomDefinition),
    /// Join as `user`.
    Join {
        /// The user.
        user: UserId,
    },
    /// Leave.
    Leave,
    /// Comment.
    Comment {
        /// Text.
        text: String,
    },
    /// React.
    React {
        /// Emoji.
        emoji: String,
    },
    /// Start (host only).
    Start {
        /// Who asks.
        user: UserId,
    },
    /// End (host only).
    End {
        /// Who asks.
        user: UserId,
    },
    /// Read the room's info.
    Info,
}

/// The result of a [`RoomOp`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum RoomOpReply {
    /// Created.
    Created(RoomInfo),
    /// Joined.
    Joined(RoomJoinResponse),
    /// Commented.
    Commented(RoomCommentResponse),
    /// Info.
    Info(RoomInfo),
    /// Done, nothing to report.
    Done,
}

/// What a node knows of a room being activated elsewhere.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RoomRecovery {
    /// Its sessions in the room: (member key, user).
    pub members: Vec<(u64, String)>,
    /// The latest durable state it holds (as owner or replica).
    pub durable: Option<RoomDurable>,
}

/// Durable room states this node holds, as an owner or a replica (in memory: they survive
/// the loss of another node, not of this one; the next owner takes the most advanced copy).
#[derive(Default)]
pub struct DurableStates {
    rooms: Mutex<HashMap<String, RoomDurable>>,
}

impl DurableStates {
    /// Keeps `durable` if it is ahead of what is held.
    pub fn keep(&self, room_id: &str, durable: RoomDurable) {
        let mut rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
        let entry = rooms.entry(room_id.to_string()).or_default();
        if durable.comment_count >= entry.comment_count {
            *entry = durable;
        }
    }

    /// The state held for `room_id`.
    pub fn get(&self, room_id: &str) -> Option<RoomDurable> {
        self.rooms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(room_id)
            .cloned()
    }
}

/// Replicates a room's durable state to the next node on the ring for its key (the node
/// that becomes its owner if this one dies), and keeps a copy here.
pub struct NodeReplicator {
    /// The node.
    pub node: Weak<Node>,
}

impl chorus_actors::room_actor::DurableSink for NodeReplicator {
    fn replicate<'a>(
        &'a self,
        room_id: &'a str,
        durable: RoomDurable,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>> {
        Box::pin(async move {
            let Some(node) = self.node.upgrade() else {
                return;
            };
            node.durable.keep(room_id, durable.clone());
            let self_id = node.cluster.node_id();
            let Some(ring) = node.cluster.ring() else {
                return;
            };
            let replica = ring
                .owners_n(&room_key(room_id), 2)
                .into_iter()
                .find(|id| *id != self_id);
            let Some(replica) = replica else { return };
            let message = NodeMessage::Replicate {
                room_id: room_id.to_string(),
                durable,
            };
            let call = node.cluster.call_app(replica, encode(&message));
            match tokio::time::timeout(Duration::from_millis(REPLICATE_TIMEOUT_MS), call).await {
                Ok(Ok(_)) => {}
                _ => {
                    metrics::counter!("chorus_replication_failures_total").increment(1);
                    tracing::warn!(room = %room_id, replica, "replication to the next node failed");
                }
            }
        })
    }
}

/// One item relayed from an owner to an edge.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum RelayItem {
    /// A notification for the edge's members of `room_id`.
    Event {
        /// Room.
        room_id: String,
        /// Notification kind.
        kind: String,
        /// MessagePack body.
        msgpack: Bytes,
        /// JSON body.
        json: Bytes,
    },
    /// The room removed this member (it ended).
    Removed {
        /// Room.
        room_id: String,
        /// Member key.
        member_key: u64,
    },
}

/// A message between nodes (inside the cluster's application channel).
#[derive(Debug, Serialize, Deserialize)]
pub enum NodeMessage {
    /// A room operation for the owner, on behalf of a session on node `from`.
    Room {
        /// Sending node.
        from: NodeId,
        /// Room.
        room_id: String,
        /// The session's cluster-wide member key.
        member_key: u64,
        /// What to do.
        op: RoomOp,
    },
    /// Keep the durable state of `room_id` (from its owner; answered with `Ok(Done)`).
    Replicate {
        /// Room.
        room_id: String,
        /// State.
        durable: RoomDurable,
    },
    /// Which sessions on this node are in `room_id`, and the room's durable state if this
    /// node has one (asked by a room's new owner when it activates the room): answered
    /// with a [`RoomRecovery`].
    Members {
        /// Room.
        room_id: String,
    },
    /// Events from an owner to the members on this node.
    Relay {
        /// Sending node.
        from: NodeId,
        /// In order.
        items: Vec<RelayItem>,
    },
}

/// Encodes a value for the inter-node channel.
pub fn encode<T: Serialize>(value: &T) -> Bytes {
    rmp_serde::to_vec_named(value)
        .map(Bytes::from)
        .unwrap_or_default()
}

/// Decodes a value from the inter-node channel.
pub fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, ErrorBody> {
    rmp_serde::from_slice(bytes)
        .map_err(|e| ErrorBody::new(ErrorCode::Internal, format!("inter-node message: {e}")))
}

/// Relays one room's events from this (owner) node to one edge node, in order.
pub struct EdgeRelay {
    edge: NodeId,
    tx: mpsc::Sender<RelayItem>,
}

impl EdgeRelay {
    /// Starts the relay task toward `edge`.
    pub fn start(node: Weak<Node>, edge: NodeId) -> Arc<Self> {
        let (tx, mut rx) = mpsc::channel::<RelayItem>(RELAY_QUEUE_ITEMS_MAX);
        let node_weak = node.clone();
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(RELAY_BATCH_ITEMS_MAX);
            while let Some(item) = rx.recv().await {
                batch.push(item);
                while batch.len() < RELAY_BATCH_ITEMS_MAX {
                    match rx.try_recv() {
                        Ok(item) => batch.push(item),
                        Err(_) => break,
                    }
                }
                let Some(node) = node.upgrade() else { return };
                let message = encode(&NodeMessage::Relay {
                    from: node.cluster.node_id(),
                    items: std::mem::take(&mut batch),
                });
                drop(node);
                // An edge that is slow or paused gets the batch when it answers again (in
                // order: nothing after it is sent meanwhile); new events wait in the
                // bounded queue. Only after RELAY_RETRY_WINDOW_MS is the batch given up.
                let started = tokio::time::Instant::now();
                let mut backoff_ms = RELAY_RETRY_BACKOFF_MIN_MS;
                loop {
                    let Some(node) = node_weak.upgrade() else {
                        return;
                    };
                    match node.cluster.call_app(edge, message.clone()).await {
                        Ok(_) => break,
                        Err(error) => {
                            if started.elapsed() >= Duration::from_millis(RELAY_RETRY_WINDOW_MS)
                                || node.shutdown.is_cancelled()
                            {
                                metrics::counter!("chorus_relay_dropped_total").increment(1);
                                tracing::warn!(edge, %error, "relay batch given up");
                                break;
                            }
                            tracing::debug!(edge, %error, backoff_ms, "relay batch failed; retrying");
                        }
                    }
                    drop(node);
                    tokio::time::sleep(Duration::from_millis(backoff_ms)).await;
                    backoff_ms = (backoff_ms * 2).min(RELAY_RETRY_BACKOFF_MAX_MS);
                }
            }
        });
        Arc::new(EdgeRelay { edge, tx })
    }

    fn push(&self, item: RelayItem) {
        if self.tx.try_send(item).is_err() {
            metrics::counter!("chorus_relay_dropped_total").increment(1);
            tracing::warn!(edge = self.edge, "relay queue full: dropping");
        }
    }
}

/// A member of a room on this (owner) node whose session lives on another node.
pub struct RemoteMember {
    room_id: String,
    member_key: u64,
    relay: Arc<EdgeRelay>,
}

impl RemoteMember {
    /// The member handle for `member_key` in `room_id`, relayed through `relay`.
    pub fn member(room_id: &str, member_key: u64, relay: Arc<EdgeRelay>) -> Member {
        Member::new(
            member_key,
            Arc::new(RemoteMember {
                room_id: room_id.to_string(),
                member_key,
                relay,
            }),
        )
    }
}

impl MemberSink for RemoteMember {
    fn deliver(&self, body: &Arc<EncodedBody>) {
        // The edge finds its members by room id, so it travels alongside the body.
        self.relay.push(RelayItem::Event {
            room_id: self.room_id.clone(),
            kind: body.kind().to_string(),
            msgpack: body.body_bytes(Encoding::MsgPack).clone(),
            json: body.body_bytes(Encoding::Json).clone(),
        });
    }

    fn removed_from_room(&self, room_id: &str) {
        self.relay.push(RelayItem::Removed {
            room_id: room_id.to_string(),
            member_key: self.member_key,
        });
    }

    fn relay_group(&self) -> Option<u64> {
        Some(self.relay.edge)
    }
}

/// Local sessions in rooms owned by other nodes.
#[derive(Default)]
pub struct RoomMirrors {
    rooms: Mutex<HashMap<String, BTreeMap<u64, Arc<Session>>>>,
}

impl RoomMirrors {
    fn map(&self) -> MutexGuard<'_, HashMap<String, BTreeMap<u64, Arc<Session>>>> {
        self.rooms.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `session` (member key `key`) joined remote room `room_id`.
    pub fn add(&self, room_id: &str, key: u64, session: Arc<Session>) {
        self.map()
            .entry(room_id.to_string())
            .or_default()
            .insert(key, session);
    }

    /// The session with member key `key` left `room_id`.
    pub fn remove(&self, room_id: &str, key: u64) -> Option<Arc<Session>> {
        let mut map = self.map();
        let members = map.get_mut(room_id)?;
        let removed = members.remove(&key);
        if members.is_empty() {
            map.remove(room_id);
        }
        removed
    }

    /// The members of `room_id` on this node: (member key, user).
    pub fn members(&self, room_id: &str) -> Vec<(u64, String)> {
        self.map()
            .get(room_id)
            .map(|m| m.iter().map(|(k, s)| (*k, s.user_id.clone())).collect())
            .unwrap_or_default()
    }

    /// Delivers relayed items to the local members.
    pub fn apply(&self, items: Vec<RelayItem>) {
        for item in items {
            match item {
                RelayItem::Event {
                    room_id,
                    kind,
                    msgpack,
                    json,
                } => {
                    let Some(body) = EncodedBody::from_parts(&kind, msgpack, json) else {
                        tracing::warn!(%kind, "relayed event of unknown kind");
                        continue;
                    };
                    let body = Arc::new(body);
                    let members: Vec<Arc<Session>> = self
                        .map()
                        .get(&room_id)
                        .map(|m| m.values().cloned().collect())
                        .unwrap_or_default();
                    if members.is_empty() {
                        tracing::debug!(room = %room_id, "relayed event for a room with no local members");
                    }
                    for session in members {
                        session.deliver(&body);
                    }
                }
                RelayItem::Removed {
                    room_id,
                    member_key,
                } => {
                    if let Some(session) = self.remove(&room_id, member_key) {
                        session.removed_from_room(&room_id);
                    }
                }
            }
        }
    }
}

/// Time a room has to answer a request before the client gets `unavailable`.
const ROOM_CALL_TIMEOUT_MS: u64 = 5_000;

/// Asks a room actor and waits (bounded) for its answer.
pub(crate) async fn ask<T: Send + 'static>(
    actor: &ActorRef<RoomMsg>,
    message: impl FnOnce(RpcReplyPort<T>) -> RoomMsg,
) -> Result<T, ErrorBody> {
    match actor
        .call(message, Some(Duration::from_millis(ROOM_CALL_TIMEOUT_MS)))
        .await
    {
        Ok(ractor::rpc::CallResult::Success(value)) => Ok(value),
        Ok(ractor::rpc::CallResult::Timeout) => Err(ErrorBody::new(
            ErrorCode::Unavailable,
            "the room did not answer in time",
        )),
        Ok(ractor::rpc::CallResult::SenderError) | Err(_) => Err(ErrorBody::new(
            ErrorCode::Unavailable,
            "the room is not available (it may have ended)",
        )),
    }
}

/// A room refusal as a wire error.
pub(crate) fn room_error(error: RoomError) -> ErrorBody {
    ErrorBody::new(error.code(), error.to_string())
}

/// A directory failure as a wire error.
pub(crate) fn directory_error(error: DirectoryError) -> ErrorBody {
    let code = match &error {
        DirectoryError::NotFound(_) => ErrorCode::RoomNotFound,
        DirectoryError::Ended(_) => ErrorCode::RoomEnded,
        DirectoryError::Exists(_) => ErrorCode::Internal,
        DirectoryError::Store(_) | DirectoryError::Spawn(_) => {
            tracing::error!(%error, "room directory failure");
            ErrorCode::Internal
        }
    };
    ErrorBody::new(code, error.to_string())
}

impl Node {
    /// The owner of `room_id` on this node's current ring (this node if there is none).
    pub(crate) fn owner_of(&self, room_id: &str) -> NodeId {
        self.cluster
            .ring()
            .and_then(|ring| ring.owner(&room_key(room_id)))
            .unwrap_or_else(|| self.cluster.node_id())
    }

    /// The relay from this node to `edge` (started on first use).
    pub(crate) fn relay_to(&self, edge: NodeId) -> Arc<EdgeRelay> {
        let mut relays = self.relays.lock().unwrap_or_else(|e| e.into_inner());
        relays
            .entry(edge)
            .or_insert_with(|| EdgeRelay::start(self.this.clone(), edge))
            .clone()
    }

    /// Runs `op` for `session` on the room's owner: here, or over the inter-node link.
    ///
    /// Ownership can move while a request is under way (a node joined, drained or died):
    /// a remote call is raced against ring changes and retried on the new owner, and a
    /// member the owner does not know (its room was just re-activated there) re-joins
    /// once before the request is retried.
    pub(crate) async fn room_op(
        &self,
        session: &Arc<Session>,
        room_id: &str,
        op: RoomOp,
    ) -> Result<RoomOpReply, ErrorBody> {
        let result = self.room_op_once(session, room_id, op.clone()).await;
        let rejoin = matches!(op, RoomOp::Comment { .. } | RoomOp::React { .. });
        match result {
            Err(error)
                if rejoin
                    && error.code == ErrorCode::NotInRoom.as_u16()
                    && session.with_core(|core| core.in_room(room_id)) =>
            {
                let user = session.user_id.clone();
                self.room_op_once(session, room_id, RoomOp::Join { user })
                    .await?;
                self.room_op_once(session, room_id, op).await
            }
            other => other,
        }
    }

    async fn room_op_once(
        &self,
        session: &Arc<Session>,
        room_id: &str,
        op: RoomOp,
    ) -> Result<RoomOpReply, ErrorBody> {
        let mut attempts = 0;
        loop {
            let mut metadata = self.cluster.subscribe_metadata();
            let epoch = metadata.borrow().ring_epoch;
            let call = self.room_op_at_owner(session, room_id, op.clone());
            let ring_changed = async {
                while metadata.changed().await.is_ok() {
                    if metadata.borrow().ring_epoch != epoch {
                        return;
                    }
                }
                std::future::pending::<()>().await
            };
            tokio::select! {
                result = call => return result,
                _ = ring_changed, if attempts < ROUTE_RETRIES_MAX => {
                    attempts += 1;
                    tracing::debug!(room = %room_id, attempts, "ring changed during a room request; retrying on the new owner");
                }
            }
        }
    }

    async fn room_op_at_owner(
        &self,
        session: &Arc<Session>,
        room_id: &str,
        op: RoomOp,
    ) -> Result<RoomOpReply, ErrorBody> {
        let owner = self.owner_of(room_id);
        let member = session.member();
        if owner == self.cluster.node_id() {
            return self.local_room_op(room_id, member, op).await;
        }
        let key = member.key();
        let joining = matches!(op, RoomOp::Join { .. });
        let leaving = matches!(op, RoomOp::Leave);
        // Mirror first: the owner may broadcast (e.g. a listener count) as soon as the join
        // is applied, before its answer arrives here.
        if joining {
            self.mirrors.add(room_id, key, session.clone());
        }
        let message = NodeMessage::Room {
            from: self.cluster.node_id(),
            room_id: room_id.to_string(),
            member_key: key,
            op,
        };
        let result = match self.cluster.call_app(owner, encode(&message)).await {
            Ok(reply) => decode::<Result<RoomOpReply, ErrorBody>>(&reply).and_then(|r| r),
            Err(error) => Err(ErrorBody::new(
                ErrorCode::Unavailable,
                format!("the room's owner (node {owner}) is unreachable: {error}"),
            )),
        };
        let rejoining = joining && session.with_core(|core| core.in_room(room_id));
        if (joining && result.is_err() && !rejoining) || leaving {
            self.mirrors.remove(room_id, key);
        }
        result
    }

    /// A room was just activated here (it moved, or its owner died): before it serves
    /// anything, ask every node which of its sessions are in the room and re-admit them, so
    /// no member misses what the room does next. Each node answers within
    /// [`READMIT_QUERY_TIMEOUT_MS`]; a node that does not is skipped (its sessions re-join
    /// when they next act).
    async fn readmit_members(&self, room_id: &str, actor: ActorRef<RoomMsg>) {
        let self_id = self.cluster.node_id();
        let metadata = self.cluster.metadata();
        let nodes: Vec<NodeId> = metadata
            .nodes
            .values()
            .filter(|n| n.state != chorus_cluster::metadata::NodeState::Down)
            .map(|n| n.id)
            .collect();
        let mut recoveries = Vec::with_capacity(nodes.len());
        for node_id in nodes {
            if node_id == self_id {
                recoveries.push((
                    node_id,
                    RoomRecovery {
                        members: self.mirrors.members(room_id),
                        durable: self.durable.get(room_id),
                    },
                ));
                continue;
            }
            let query = NodeMessage::Members {
                room_id: room_id.to_string(),
            };
            let call = self.cluster.call_app(node_id, encode(&query));
            match tokio::time::timeout(Duration::from_millis(READMIT_QUERY_TIMEOUT_MS), call).await
            {
                Ok(Ok(reply)) => match decode::<RoomRecovery>(&reply) {
                    Ok(recovery) => recoveries.push((node_id, recovery)),
                    Err(error) => {
                        tracing::warn!(room = %room_id, node = node_id, %error.message, "bad recovery answer")
                    }
                },
                _ => {
                    tracing::warn!(room = %room_id, node = node_id, "no recovery answer from node")
                }
            }
        }
        // Continue from the most advanced durable state anyone holds.
        let durable = recoveries
            .iter()
            .filter_map(|(_, r)| r.durable.clone())
            .max_by_key(|d| d.comment_count);
        let restored = durable.as_ref().map(|d| d.comment_count).unwrap_or(0);
        if let Some(durable) = durable {
            let _ = ask(&actor, |reply| RoomMsg::Restore { durable, reply }).await;
        }
        let mut readmitted = 0;
        for (node_id, recovery) in recoveries {
            for (key, user) in recovery.members {
                let member = if node_id == self_id {
                    match self.sessions.by_member_key(key) {
                        Some(session) => session.member(),
                        None => continue,
                    }
                } else {
                    RemoteMember::member(room_id, key, self.relay_to(node_id))
                };
                let joined = ask(&actor, |reply| RoomMsg::Join {
                    member,
                    user,
                    reply,
                })
                .await;
                if matches!(joined, Ok(Ok(_))) {
                    readmitted += 1;
                }
            }
        }
        tracing::info!(room = %room_id, readmitted, restored, "room activated");
    }

    /// The running actor of a room this node owns, activated (with its members re-admitted)
    /// if needed. A node that has just joined may not have applied the room's definition
    /// yet: "not found" is only believed after the metadata stops changing for a moment
    /// (at most [`DEFINITION_SETTLE_MS`]).
    async fn activate(&self, room_id: &str) -> Result<ActorRef<RoomMsg>, ErrorBody> {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(DEFINITION_SETTLE_MS);
        let mut metadata = self.cluster.subscribe_metadata();
        loop {
            match self
                .rooms
                .get_with(room_id, |actor| self.readmit_members(room_id, actor))
                .await
            {
                Err(DirectoryError::NotFound(_)) if tokio::time::Instant::now() < deadline => {
                    let changed = tokio::time::timeout_at(deadline, metadata.changed()).await;
                    if !matches!(changed, Ok(Ok(()))) {
                        return Err(directory_error(DirectoryError::NotFound(
                            room_id.to_string(),
                        )));
                    }
                }
                other => return other.map_err(directory_error),
            }
        }
    }

    /// Runs `op` on a room this node owns.
    pub(crate) async fn local_room_op(
        &self,
        room_id: &str,
        member: Member,
        op: RoomOp,
    ) -> Result<RoomOpReply, ErrorBody> {
        use chorus_actors::room_actor::RoomMsg;
        if let RoomOp::Create(definition) = op {
            let info = self
                .rooms
                .create(definition)
                .await
                .map_err(directory_error)?;
            return Ok(RoomOpReply::Created(info));
        }
        let actor = self.activate(room_id).await?;
        Ok(match op {
            RoomOp::Create(_) => RoomOpReply::Done,
            RoomOp::Join { user } => RoomOpReply::Joined(
                ask(&actor, |reply| RoomMsg::Join {
                    member,
                    user,
                    reply,
                })
                .await?
                .map_err(room_error)?,
            ),
            RoomOp::Leave => {
                ask(&actor, |reply| RoomMsg::Leave {
                    member,
                    reply: Some(reply),
                })
                .await?
                .map_err(room_error)?;
                RoomOpReply::Done
            }
            RoomOp::Comment { text } => RoomOpReply::Commented(
                ask(&actor, |reply| RoomMsg::Comment {
                    member,
                    text,
                    reply,
                })
                .await?
                .map_err(room_error)?,
            ),
            RoomOp::React { emoji } => {
                ask(&actor, |reply| RoomMsg::React {
                    member,
                    emoji,
                    reply,
                })
                .await?
                .map_err(room_error)?;
                RoomOpReply::Done
            }
            RoomOp::Start { user } => {
                ask(&actor, |reply| RoomMsg::Start { user, reply })
                    .await?
                    .map_err(room_error)?;
                RoomOpReply::Done
            }
            RoomOp::End { user } => {
                ask(&actor, |reply| RoomMsg::End { user, reply })
                    .await?
                    .map_err(room_error)?;
                RoomOpReply::Done
            }
            RoomOp::Info => RoomOpReply::Info(ask(&actor, |reply| RoomMsg::Info { reply }).await?),
        })
    }
}

/// Follows the placement ring: when its epoch changes, rooms that moved away are stopped
/// here and every local session re-joins the rooms whose owner changed (on the new owner),
/// keeping its connection.
pub(crate) async fn follow_ring(node: Weak<Node>) {
    let Some(mut metadata) = node.upgrade().map(|n| n.cluster.subscribe_metadata()) else {
        return;
    };
    let mut ring = node.upgrade().and_then(|n| n.cluster.ring());
    loop {
        if metadata.changed().await.is_err() {
            return;
        }
        let Some(node) = node.upgrade() else { return };
        if node.shutdown.is_cancelled() {
            return;
        }
        let Some(next) = node.cluster.ring() else {
            continue;
        };
        if ring.as_ref().map(|r| r.epoch()) == Some(next.epoch()) {
            continue;
        }
        let previous = ring.replace(next.clone());
        let self_id = node.cluster.node_id();
        let stopped = node
            .rooms
            .stop_unless(|room_id| next.owner(&room_key(room_id)) == Some(self_id))
            .await;
        let mut rejoined = 0;
        for session in node.sessions.all() {
            let rooms: Vec<String> = session.with_core(|core| core.rooms().cloned().collect());
            for room_id in rooms {
                let key = room_key(&room_id);
                let before = previous.as_ref().and_then(|r| r.owner(&key));
                let after = next.owner(&key);
                if before == after {
                    continue;
                }
                // Keep the mirror in step with where the room now lives, whether or not the
                // join below succeeds at once: a room activated later re-admits the members
                // the edges list.
                let key = session.member().key();
                if after == Some(self_id) {
                    node.mirrors.remove(&room_id, key);
                } else {
                    node.mirrors.add(&room_id, key, session.clone());
                }
                let user = session.user_id.clone();
                match node
                    .room_op(&session, &room_id, RoomOp::Join { user })
                    .await
                {
                    Ok(_) => rejoined += 1,
                    Err(error) => {
                        tracing::warn!(room = %room_id, %error, "re-join after a ring change failed")
                    }
                }
            }
        }
        tracing::info!(
            epoch = next.epoch(),
            stopped,
            rejoined,
            "followed a ring change"
        );
    }
}

/// The node's handler for messages from other nodes.
pub struct NodeApp {
    /// The node (weak: the node owns the cluster service that owns this handler).
    pub node: Weak<Node>,
}

impl chorus_cluster::service::AppHandler for NodeApp {
    fn handle(
        &self,
        request: Bytes,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Bytes> + Send + '_>> {
        Box::pin(async move {
            let Some(node) = self.node.upgrade() else {
                return encode(&Err::<RoomOpReply, _>(ErrorBody::new(
                    ErrorCode::Unavailable,
                    "node shutting down",
                )));
            };
            match decode::<NodeMessage>(&request) {
                Ok(NodeMessage::Members { room_id }) => encode(&RoomRecovery {
                    members: node.mirrors.members(&room_id),
                    durable: node.durable.get(&room_id),
                }),
                Ok(NodeMessage::Replicate { room_id, durable }) => {
                    node.durable.keep(&room_id, durable);
                    encode(&Ok::<RoomOpReply, ErrorBody>(RoomOpReply::Done))
                }
                Ok(NodeMessage::Relay { items, .. }) => {
                    node.mirrors.apply(items);
                    encode(&Ok::<RoomOpReply, ErrorBody>(RoomOpReply::Done))
                }
                Ok(NodeMessage::Room {
                    from,
                    room_id,
                    member_key,
                    op,
                }) => {
                    let relay = node.relay_to(from);
                    let member = RemoteMember::member(&room_id, member_key, relay);
                    encode(&node.local_room_op(&room_id, member, op).await)
                }
                Err(error) => encode(&Err::<RoomOpReply, _>(error)),
            }
        })
    }
}
