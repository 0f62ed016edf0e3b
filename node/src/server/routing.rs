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
/// How long an activating owner waits to apply its own ownership claim (a node that has
/// just joined may still be catching up with the log).
pub const CLAIM_APPLIED_TIMEOUT_MS: u64 = 5_000;
/// How long a history read (`room.comments`) waits for each other node's part.
pub const HISTORY_READ_TIMEOUT_MS: u64 = 2_000;
/// Time each node has to list its members of a room being activated.
pub const READMIT_QUERY_TIMEOUT_MS: u64 = 1_000;
/// How long a session takeover keeps trying to re-join a room whose owner is unavailable
/// (typically: the node that died, until it is marked down). Below the client library's
/// connect timeout.
pub const TAKEOVER_JOIN_WINDOW_MS: u64 = 4_000;
/// Pause between those tries, unless the metadata changes first.
pub const TAKEOVER_RETRY_PAUSE_MS: u64 = 200;
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
        /// For a member joining again: the latest comment id it has; the room sends the
        /// comments after it (from its recent log) before anything else.
        since: Option<u64>,
    },
    /// Leave.
    Leave,
    /// Comment.
    Comment {
        /// Text.
        text: String,
        /// The request's id, unique for its user: a repeat gets the first answer.
        #[serde(default)]
        request_id: Option<String>,
        /// Past this time (ms since the epoch) the room does not run it.
        #[serde(default)]
        deadline_ms: Option<u64>,
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
    /// Change the stage.
    Stage {
        /// Who asks.
        user: UserId,
        /// What.
        command: chorus_actors::room::StageCommand,
    },
    /// Read the stage as `user` may see it.
    StageInfo {
        /// Who asks.
        user: UserId,
    },
    /// Read one page of the room's users.
    Members {
        /// Start after this user id.
        after: Option<UserId>,
        /// Users per page.
        limit: usize,
    },
    /// Mark or unmark interest in the scheduled room.
    Interest {
        /// Who.
        user: UserId,
        /// Interested or not.
        interested: bool,
    },
    /// Read the room's totals.
    Summary,
    /// Invite users to the room.
    InviteUsers {
        /// Who invites.
        user: UserId,
        /// Whom.
        users: Vec<UserId>,
    },
    /// Read the room's info.
    Info,
    /// Open a poll.
    PollCreate {
        /// Who asks.
        user: UserId,
        /// The question.
        question: String,
        /// The answers.
        options: Vec<String>,
    },
    /// Vote (as the member).
    Vote {
        /// The poll.
        poll_id: u64,
        /// The option.
        option: u32,
    },
    /// Close a poll.
    PollClose {
        /// Who asks.
        user: UserId,
        /// The poll.
        poll_id: u64,
    },
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
    /// The stage.
    Stage(chorus_protocol::StageInfo),
    /// A page of users.
    Members(chorus_protocol::RoomMembersResponse),
    /// Interested users now.
    Interested(u64),
    /// The room's totals.
    Summary(chorus_protocol::RoomSummary),
    /// A poll.
    Poll(chorus_protocol::PollInfo),
    /// Done, nothing to report.
    Done,
}

/// What a node knows of a room being activated elsewhere.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RoomRecovery {
    /// Its sessions in the room: (member key, user, latest comment id delivered).
    pub members: Vec<(u64, String, Option<u64>)>,
    /// The latest durable state it holds (as owner or replica), with the ownership epoch
    /// it was written at.
    pub durable: Option<(u64, RoomDurable)>,
}

/// Users named in one inter-node user notice; longer lists go in several.
pub const USER_NOTICE_USERS_MAX: usize = 1_000;

/// Why a replica refused a room's durable state.
pub const STALE_EPOCH_REASON: &str = "stale ownership epoch";

/// The sled tree holding [`DurableStates`].
pub const DURABLE_STATES_TREE: &str = "rooms/durable";

pub use chorus_actors::replica::VotesRefused;
use chorus_actors::replica::{HeldCopy, ReplicaStore};

/// Durable room states this node holds, as an owner or a replica, fenced by ownership
/// epoch: the shell over `chorus_actors::replica::ReplicaStore` (which decides), in
/// memory and written to sled. In a cluster a write is not flushed (the copy on another
/// node is what makes an acknowledged change survive this node's loss; sled's copy brings
/// the state back when every node restarts). On a node with no other member the
/// replicator waits for a flush ([`super::group_commit`]) before the change is
/// acknowledged, so a killed and restarted single node keeps every acknowledged comment
/// and never gives a comment id twice. A room's next owner takes the most advanced copy
/// (`chorus_actors::replica::most_advanced`).
#[derive(Default)]
pub struct DurableStates {
    store: Mutex<ReplicaStore>,
    tree: Option<sled::Tree>,
}

impl DurableStates {
    /// The states saved in `db` (an entry that does not decode is skipped and logged).
    ///
    /// # Errors
    ///
    /// sled's, opening or reading the tree.
    pub fn open(db: &sled::Db) -> Result<Self, sled::Error> {
        let tree = db.open_tree(DURABLE_STATES_TREE)?;
        let mut copies = Vec::new();
        for entry in tree.iter() {
            let (key, value) = entry?;
            let room_id = String::from_utf8_lossy(&key).into_owned();
            match rmp_serde::from_slice::<HeldCopy>(&value) {
                Ok(held) => copies.push((room_id, held)),
                Err(error) => {
                    tracing::warn!(room = %room_id, %error, "skipping an undecodable saved room state")
                }
            }
        }
        Ok(DurableStates {
            store: Mutex::new(ReplicaStore::from_copies(copies)),
            tree: Some(tree),
        })
    }

    fn store(&self) -> MutexGuard<'_, ReplicaStore> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes a changed copy to sled (called under the lock, so the saved copy is never
    /// older than the one in memory).
    fn save(&self, room_id: &str, held: &HeldCopy) {
        let Some(tree) = &self.tree else { return };
        let saved = rmp_serde::to_vec_named(held)
            .map_err(|e| e.to_string())
            .and_then(|bytes| {
                tree.insert(room_id.as_bytes(), bytes)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            });
        if let Err(error) = saved {
            tracing::error!(room = %room_id, %error, "cannot save a room's state");
        }
    }

    /// Every state held: (room, epoch, state).
    pub fn held_states(&self) -> Vec<(String, u64, RoomDurable)> {
        self.store().states()
    }

    /// Forgets the states of `rooms` (expired), in memory and in sled; returns how many
    /// were held.
    pub fn forget(&self, rooms: &[String]) -> usize {
        let mut store = self.store();
        let mut forgotten = 0;
        for room_id in rooms {
            if store.forget(room_id) {
                forgotten += 1;
                if let Some(tree) = &self.tree {
                    if let Err(error) = tree.remove(room_id.as_bytes()) {
                        tracing::error!(room = %room_id, %error, "cannot forget a room's state");
                    }
                }
            }
        }
        forgotten
    }

    /// Keeps `durable`, written by the owner at `epoch`, if it is ahead of what is held
    /// (see `ReplicaStore::keep`).
    ///
    /// # Errors
    ///
    /// The highest epoch seen, if `epoch` is below it: a newer owner exists and the writer
    /// must stop acting for the room.
    pub fn keep(&self, room_id: &str, epoch: u64, durable: RoomDurable) -> Result<(), u64> {
        let mut store = self.store();
        let held = store.keep(room_id, epoch, durable)?;
        self.save(room_id, held);
        Ok(())
    }

    /// Applies replicated votes to the state held for `room_id`, if it is the one they
    /// follow (see `ReplicaStore::apply_votes`).
    ///
    /// # Errors
    ///
    /// [`VotesRefused::Stale`] with the fence if a newer owner exists;
    /// [`VotesRefused::OutOfStep`] if the held state is not the one the votes follow.
    pub fn apply_votes(
        &self,
        room_id: &str,
        epoch: u64,
        base_revision: u64,
        revision: u64,
        votes: &[chorus_actors::polls::VoteRecord],
    ) -> Result<(), VotesRefused> {
        let mut store = self.store();
        let held = store.apply_votes(room_id, epoch, base_revision, revision, votes)?;
        self.save(room_id, held);
        Ok(())
    }

    /// Raises the room's fence to `epoch` (a new owner is activating it) and returns the
    /// state held.
    pub fn fence(&self, room_id: &str, epoch: u64) -> Option<(u64, RoomDurable)> {
        let mut store = self.store();
        let (held, raised) = store.fence(room_id, epoch);
        if raised {
            if let Some(copy) = store.copy(room_id) {
                self.save(room_id, copy);
            }
        }
        held
    }

    /// The highest ownership epoch seen for `room_id` (0 if none).
    pub fn fence_of(&self, room_id: &str) -> u64 {
        self.store().fence_of(room_id)
    }

    /// The state held for `room_id`, with its epoch.
    pub fn get(&self, room_id: &str) -> Option<(u64, RoomDurable)> {
        self.store().get(room_id)
    }
}

/// Other nodes tried, in ring preference order, before a change counts as not replicated.
pub const REPLICA_CANDIDATES_MAX: usize = 3;

/// Replicates a room's durable state to another node before the change is acknowledged:
/// the next node on the ring for the room's key (the node that becomes its owner if this
/// one dies), or if it does not answer, the one after it (a room's next owner gathers the
/// most advanced copy from every node). A copy is kept here too.
pub struct NodeReplicator {
    /// The node.
    pub node: Weak<Node>,
}

/// The nodes a room's state is replicated to, in order of preference: the ring's next
/// owners of the room's key after this node (at most [`REPLICA_CANDIDATES_MAX`]).
fn replica_candidates(node: &Node, room_id: &str) -> Vec<NodeId> {
    let self_id = node.cluster.node_id();
    node.cluster
        .ring()
        .map(|ring| ring.owners_n(&room_key(room_id), REPLICA_CANDIDATES_MAX + 1))
        .unwrap_or_default()
        .into_iter()
        .filter(|id| *id != self_id)
        .take(REPLICA_CANDIDATES_MAX)
        .collect()
}

/// Waits until this node's copies written so far are flushed to its disk: what a node
/// with no other member acknowledges (see [`super::group_commit`]).
async fn own_copy_durable(node: &Node) -> Result<(), DirectoryError> {
    node.group_commit
        .durable()
        .await
        .map_err(|e| DirectoryError::Replication(format!("own copy: {e}")))
}

/// The ownership epoch of `room_id` committed in this node's metadata (0 if none).
fn committed_epoch(node: &Node, room_id: &str) -> u64 {
    node.committed_epoch_of(&room_key(room_id))
}

impl NodeReplicator {
    async fn replicate_to_others(
        node: &Node,
        room_id: &str,
        epoch: u64,
        durable: RoomDurable,
    ) -> Result<(), DirectoryError> {
        let stale = |fence: u64| {
            DirectoryError::Replication(format!(
                "{STALE_EPOCH_REASON}: room {room_id:?} is owned at epoch {fence}, this node holds epoch {epoch}"
            ))
        };
        let fence = node.durable.fence_of(room_id);
        if epoch < fence {
            return Err(stale(fence));
        }
        let candidates = replica_candidates(node, room_id);
        if candidates.is_empty() {
            // No other node exists: this node's disk is the only copy, so the change is
            // acknowledged only once a flush covers it (group commit).
            node.durable.keep(room_id, epoch, durable).map_err(stale)?;
            return own_copy_durable(node).await;
        }
        let message = encode(&NodeMessage::Replicate {
            room_id: room_id.to_string(),
            epoch,
            durable: durable.clone(),
        });
        let mut failures = Vec::new();
        for replica in candidates {
            let call = node.cluster.call_app(replica, message.clone());
            match tokio::time::timeout(Duration::from_millis(REPLICATE_TIMEOUT_MS), call).await {
                Ok(Ok(reply)) => match decode::<Result<RoomOpReply, ErrorBody>>(&reply) {
                    Ok(Ok(_)) => {
                        return node.durable.keep(room_id, epoch, durable).map_err(stale);
                    }
                    Ok(Err(refusal)) if refusal.message.starts_with(STALE_EPOCH_REASON) => {
                        node.durable.fence(room_id, epoch + 1);
                        return Err(DirectoryError::Replication(refusal.message));
                    }
                    Ok(Err(refusal)) => {
                        failures.push(format!("node {replica}: {}", refusal.message))
                    }
                    Err(error) => failures.push(format!("node {replica}: {}", error.message)),
                },
                Ok(Err(error)) => failures.push(format!("node {replica}: {error}")),
                Err(_) => failures.push(format!(
                    "node {replica}: no answer in {REPLICATE_TIMEOUT_MS} ms"
                )),
            }
            metrics::counter!("chorus_replication_failures_total").increment(1);
        }
        Err(DirectoryError::Replication(format!(
            "no other node took the room's state ({})",
            failures.join("; ")
        )))
    }
}

impl NodeReplicator {
    /// Sends a vote delta to the first replica candidate that answers (the one that took
    /// the last whole state, unless it failed since). Any refusal (out of step, a newer
    /// owner) or silence is an `Err`: the room then replicates its whole state, which
    /// handles every case as for any change.
    async fn replicate_votes_to_others(
        node: &Node,
        room_id: &str,
        epoch: u64,
        base_revision: u64,
        revision: u64,
        votes: Vec<chorus_actors::polls::VoteRecord>,
    ) -> Result<(), DirectoryError> {
        let candidates = replica_candidates(node, room_id);
        let refused = |why: String| DirectoryError::Replication(why);
        let apply_here = || {
            node.durable
                .apply_votes(room_id, epoch, base_revision, revision, &votes)
                .map_err(|e| refused(format!("own copy: {e:?}")))
        };
        if candidates.is_empty() {
            // As for a whole state: on disk before the votes are answered.
            apply_here()?;
            return own_copy_durable(node).await;
        }
        let message = encode(&NodeMessage::ReplicateVotes {
            room_id: room_id.to_string(),
            epoch,
            base_revision,
            revision,
            votes: votes.clone(),
        });
        for replica in candidates {
            let call = node.cluster.call_app(replica, message.clone());
            match tokio::time::timeout(Duration::from_millis(REPLICATE_TIMEOUT_MS), call).await {
                Ok(Ok(reply)) => {
                    return match decode::<Result<RoomOpReply, ErrorBody>>(&reply) {
                        // The local copy follows; if it cannot, the next whole state
                        // brings it up to date.
                        Ok(Ok(_)) => {
                            let _ = apply_here();
                            Ok(())
                        }
                        Ok(Err(refusal)) => Err(refused(refusal.message)),
                        Err(error) => Err(refused(error.message)),
                    };
                }
                Ok(Err(error)) => {
                    tracing::debug!(replica, %error, "vote delta: replica unreachable");
                }
                Err(_) => tracing::debug!(replica, "vote delta: replica silent"),
            }
        }
        Err(refused("no replica answered".into()))
    }
}

impl chorus_actors::room_actor::DurableSink for NodeReplicator {
    fn notify_users(&self, users: Vec<UserId>, body: Arc<EncodedBody>) {
        let Some(node) = self.node.upgrade() else {
            return;
        };
        node.deliver_to_users(&users, &body);
        let others = node.live_peers();
        for chunk in users.chunks(USER_NOTICE_USERS_MAX) {
            let message = encode(&NodeMessage::NotifyUsers {
                users: chunk.to_vec(),
                kind: body.kind().to_string(),
                msgpack: body.body_bytes(Encoding::MsgPack).clone(),
                json: body.body_bytes(Encoding::Json).clone(),
            });
            for &peer in &others {
                let node = node.clone();
                let message = message.clone();
                tokio::spawn(async move {
                    if let Err(error) = node.cluster.call_app(peer, message).await {
                        tracing::debug!(peer, %error, "user notice not delivered");
                    }
                });
            }
        }
    }

    fn replicate<'a>(
        &'a self,
        room_id: &'a str,
        epoch: u64,
        durable: RoomDurable,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), DirectoryError>> + Send + 'a>>
    {
        Box::pin(async move {
            let Some(node) = self.node.upgrade() else {
                return Err(DirectoryError::Replication("node shutting down".into()));
            };
            Self::replicate_to_others(&node, room_id, epoch, durable).await
        })
    }

    fn replicate_votes<'a>(
        &'a self,
        room_id: &'a str,
        epoch: u64,
        base_revision: u64,
        revision: u64,
        votes: Vec<chorus_actors::polls::VoteRecord>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), DirectoryError>> + Send + 'a>>
    {
        Box::pin(async move {
            let Some(node) = self.node.upgrade() else {
                return Err(DirectoryError::Replication("node shutting down".into()));
            };
            Self::replicate_votes_to_others(&node, room_id, epoch, base_revision, revision, votes)
                .await
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
        /// Position in the room's total order (comment id), for ordered events.
        position: Option<u64>,
        /// The sending owner's ownership epoch for the room: an edge drops events from an
        /// owner whose epoch is below the committed one (a stale owner).
        #[serde(default)]
        epoch: u64,
        /// For one member only (a catch-up, a notice to moderators): its member key.
        /// `None`: every member of the room on the edge.
        #[serde(default)]
        member_key: Option<u64>,
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
        /// Past this time (ms since the epoch) the owner does not run it: the edge has
        /// answered its client already.
        #[serde(default)]
        deadline_ms: Option<u64>,
    },
    /// Keep the durable state of `room_id`, written by its owner at ownership `epoch`
    /// (answered with `Ok(Done)`, or refused with [`STALE_EPOCH_REASON`] if a newer owner
    /// exists).
    Replicate {
        /// Room.
        room_id: String,
        /// The writer's ownership epoch.
        epoch: u64,
        /// State.
        durable: RoomDurable,
    },
    /// Apply these votes to the state of `room_id` held at `base_revision` (written by its
    /// owner at `epoch`), which then is at `revision` (answered with `Ok(Done)`; refused if
    /// the held state is not at `base_revision`, or with [`STALE_EPOCH_REASON`]).
    ReplicateVotes {
        /// Room.
        room_id: String,
        /// The writer's ownership epoch.
        epoch: u64,
        /// The revision the votes apply to.
        base_revision: u64,
        /// The revision after them.
        revision: u64,
        /// In order.
        votes: Vec<chorus_actors::polls::VoteRecord>,
    },
    /// A new owner activates `room_id` at `epoch`: refuse older owners' writes from now
    /// on (and stop acting for the room if this node did), and tell which sessions on this
    /// node are in it and the most advanced durable state held: answered with a
    /// [`RoomRecovery`].
    Members {
        /// Room.
        room_id: String,
        /// The new owner's epoch.
        epoch: u64,
    },
    /// Reactions an edge counted for `room_id`, which this node owns (answered with
    /// `Ok(Done)`).
    ReactBatch {
        /// Room.
        room_id: String,
        /// Count per emoji.
        counts: std::collections::BTreeMap<String, u64>,
    },
    /// Bullet comments an edge admitted for `room_id`, which this node owns, one per user
    /// (answered with `Ok(Done)`).
    BulletBatch {
        /// Room.
        room_id: String,
        /// At most [`super::bullets::BATCH_USERS_MAX`] are taken.
        bullets: Vec<chorus_actors::bullets::Bullet>,
    },
    /// The room ended: hand over (and remove) this node's part of its event log, in
    /// order (answered with a `Vec<LoggedEvent>`).
    LogTake {
        /// Room.
        room_id: String,
    },
    /// A history read: the comments of `room_id` with ids in `after + 1 ..= after +
    /// limit` this node has, from its part of the event log and the room states it holds
    /// (answered with a `Vec<chorus_protocol::CommentEvent>`, any order).
    LogComments {
        /// Room.
        room_id: String,
        /// First id wanted, minus one.
        after: u64,
        /// Ids wanted.
        limit: u64,
    },
    /// Another node took over session `session_id` (its client resumed there): end it
    /// here (answered with `Ok(Done)`).
    EndSession {
        /// The session.
        session_id: String,
    },
    /// A notice for these users' sessions on this node (members of the room or not).
    NotifyUsers {
        /// The users (at most [`USER_NOTICE_USERS_MAX`]).
        users: Vec<UserId>,
        /// Notification kind.
        kind: String,
        /// MessagePack body.
        msgpack: Bytes,
        /// JSON body.
        json: Bytes,
    },
    /// A notice for every member of `room_id`, which this node owns (answered with
    /// `Ok(Done)` once the room actor has it).
    Announce {
        /// Room.
        room_id: String,
        /// Notification kind.
        kind: String,
        /// MessagePack body.
        msgpack: Bytes,
        /// JSON body.
        json: Bytes,
    },
    /// About a red-packet rain (`node/src/server/rain.rs`).
    Rain(super::rain::RainMessage),
    /// Quiz answers for shards this node owns (answered with one
    /// `Result<String, ErrorBody>` per answer, in order: the sealed verdict or a refusal).
    QuizAnswers {
        /// At most `quiz::ANSWER_BATCH_MAX`.
        answers: Vec<super::quiz::AnswerItem>,
    },
    /// Work on this node's quiz shards (answered with `Result<ShardReply, ErrorBody>`).
    QuizShards(super::quiz::ShardOp),
    /// An operator action for a show this node controls (answered with
    /// `Result<String, ErrorBody>`, the JSON text of the result).
    QuizControl {
        /// The show.
        quiz_id: String,
        /// What to do.
        action: super::quiz::QuizAction,
    },
    /// A show's new committed state, from its controller (answered with `Ok(Done)`).
    QuizPhase {
        /// The show.
        quiz_id: String,
        /// The `QuizState`, MessagePack.
        state: Bytes,
    },
    /// Events from an owner to the members on this node.
    Relay {
        /// Sending node.
        from: NodeId,
        /// In order.
        items: Vec<RelayItem>,
    },
}

/// Encodes a value for the inter-node channel. A failure (a bug: every value sent is
/// plain data) is logged and counted (`chorus_encode_failures_total`), and the empty
/// message sent instead is refused by the receiver's decoder.
pub fn encode<T: Serialize>(value: &T) -> Bytes {
    match rmp_serde::to_vec_named(value) {
        Ok(bytes) => Bytes::from(bytes),
        Err(error) => {
            metrics::counter!("chorus_encode_failures_total").increment(1);
            tracing::error!(%error, what = std::any::type_name::<T>(), "cannot encode an inter-node message");
            Bytes::new()
        }
    }
}

/// Decodes a value from the inter-node channel.
pub fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, ErrorBody> {
    rmp_serde::from_slice(bytes)
        .map_err(|e| ErrorBody::new(ErrorCode::Internal, format!("inter-node message: {e}")))
}

/// Relays one room's events from this (owner) node to one edge node, in order.
///
/// Its task is watched: if it ends while the node runs (a panic), the next item pushed
/// starts a new one (`chorus_relay_restarted_total`) instead of finding the queue closed
/// for good.
pub struct EdgeRelay {
    edge: NodeId,
    tx: std::sync::Mutex<mpsc::Sender<RelayItem>>,
    node: Weak<Node>,
}

impl EdgeRelay {
    /// Starts the relay task toward `edge`.
    pub fn start(node: Weak<Node>, edge: NodeId) -> Arc<Self> {
        Arc::new(EdgeRelay {
            edge,
            tx: std::sync::Mutex::new(Self::spawn_task(node.clone(), edge)),
            node,
        })
    }

    /// The relay task: batches the queue and sends each batch to `edge`, in order.
    fn spawn_task(node: Weak<Node>, edge: NodeId) -> mpsc::Sender<RelayItem> {
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
        tx
    }

    /// This node's ownership epoch for `room_id` (0 if it never activated it).
    fn owned_epoch(&self, room_id: &str) -> u64 {
        self.node
            .upgrade()
            .and_then(|node| {
                node.owned_epochs
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(room_id)
                    .copied()
            })
            .unwrap_or(0)
    }

    /// The node this relay sends to.
    pub fn edge(&self) -> NodeId {
        self.edge
    }

    fn push(&self, item: RelayItem) {
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match tx.try_send(item) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                metrics::counter!("chorus_relay_dropped_total").increment(1);
                tracing::warn!(edge = self.edge, "relay queue full: dropping");
            }
            Err(mpsc::error::TrySendError::Closed(item)) => {
                // The task ended: the node is stopping, or the task died. Restart it.
                let Some(node) = self.node.upgrade() else {
                    return;
                };
                if node.shutdown.is_cancelled() {
                    return;
                }
                let mut current = self.tx.lock().unwrap_or_else(|e| e.into_inner());
                if current.same_channel(&tx) {
                    *current = Self::spawn_task(self.node.clone(), self.edge);
                    metrics::counter!("chorus_relay_restarted_total").increment(1);
                    tracing::error!(edge = self.edge, "the relay task had ended: restarted");
                }
                // (Or another push restarted it already.)
                let _ = current.try_send(item);
            }
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

impl RemoteMember {
    fn relay_event(&self, body: &Arc<EncodedBody>, member_key: Option<u64>) {
        // The edge finds its members by room id, so it travels alongside the body.
        self.relay.push(RelayItem::Event {
            room_id: self.room_id.clone(),
            kind: body.kind().to_string(),
            msgpack: body.body_bytes(Encoding::MsgPack).clone(),
            json: body.body_bytes(Encoding::Json).clone(),
            position: body.position().map(|(_, position)| position),
            epoch: self.relay.owned_epoch(&self.room_id),
            member_key,
        });
    }
}

impl MemberSink for RemoteMember {
    fn deliver(&self, body: &Arc<EncodedBody>) {
        self.relay_event(body, None);
    }

    fn deliver_one(&self, body: &Arc<EncodedBody>) {
        self.relay_event(body, Some(self.member_key));
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

    fn deliver_audio(&self, frame: &Bytes) {
        if let Some(node) = self.relay.node.upgrade() {
            self.relay.send_audio(&node, frame);
        }
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

    /// The sessions of this node in `room_id`.
    pub fn sessions(&self, room_id: &str) -> Vec<Arc<Session>> {
        self.map()
            .get(room_id)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// The members of `room_id` on this node: (member key, user).
    pub fn members(&self, room_id: &str) -> Vec<(u64, String)> {
        self.map()
            .get(room_id)
            .map(|m| m.iter().map(|(k, s)| (*k, s.user_id.clone())).collect())
            .unwrap_or_default()
    }

    /// Delivers relayed items to the local members.
    /// Unordered events (reactions, listener counts) from an owner whose epoch is below
    /// the committed ownership in `metadata` are dropped (counted in
    /// `chorus_relay_stale_total`). Comments are not: one a stale owner broadcast was
    /// replicated and acknowledged before the newer owner fenced its replica (fencing
    /// refuses the rest), so it is in the newer owner's state too, and sessions drop the
    /// copy they already have by its position. Dropping it here lost acknowledged comments
    /// when it raced the newer owner's catch-up.
    pub fn apply(
        &self,
        items: Vec<RelayItem>,
        metadata: &chorus_cluster::metadata::ClusterMetadata,
    ) {
        for item in items {
            match item {
                RelayItem::Event {
                    ref room_id,
                    epoch,
                    position: None,
                    ..
                } if metadata
                    .owners
                    .get(&room_key(room_id))
                    .is_some_and(|o| epoch < o.epoch) =>
                {
                    metrics::counter!("chorus_relay_stale_total").increment(1);
                    tracing::debug!(room = %room_id, epoch, "event from a stale owner dropped");
                }
                RelayItem::Event {
                    room_id,
                    kind,
                    msgpack,
                    json,
                    position,
                    epoch: _,
                    member_key,
                } => {
                    let Some(mut body) = EncodedBody::from_parts(&kind, msgpack, json) else {
                        tracing::warn!(%kind, "relayed event of unknown kind");
                        continue;
                    };
                    if let Some(position) = position {
                        body = body.with_position(&room_id, position);
                    }
                    let body = Arc::new(body);
                    let members: Vec<Arc<Session>> = self
                        .map()
                        .get(&room_id)
                        .map(|m| match member_key {
                            Some(key) => m.get(&key).cloned().into_iter().collect(),
                            None => m.values().cloned().collect(),
                        })
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
        DirectoryError::Activation { .. } | DirectoryError::Replication(_) => {
            tracing::warn!(%error, "room not available here");
            ErrorCode::Unavailable
        }
        DirectoryError::Store(_) | DirectoryError::Spawn(_) => {
            tracing::error!(%error, "room directory failure");
            ErrorCode::Internal
        }
    };
    ErrorBody::new(code, error.to_string())
}

impl Node {
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

    /// The comments of `room_id` with ids in `after + 1 ..= after + limit` that this node
    /// has: from its part of the room's event log and from the room's state it holds (the
    /// recent comments, as owner or replica).
    pub(crate) fn comments_held(
        &self,
        room_id: &str,
        after: u64,
        limit: u64,
    ) -> Vec<chorus_protocol::CommentEvent> {
        let mut comments = self
            .event_log()
            .map(|log| log.comments_after(room_id, after, limit))
            .unwrap_or_default();
        let wanted = after + 1..=after.saturating_add(limit);
        comments.extend(
            self.durable
                .held_states()
                .into_iter()
                .filter(|(id, _, _)| id == room_id)
                .flat_map(|(_, _, durable)| durable.recent_comments)
                .filter(|c| wanted.contains(&c.comment_id)),
        );
        comments
    }

    /// A page of `room_id`'s comments after `after` (`room.comments`): from every live
    /// node's event log part and held room states, merged by id, consecutive from
    /// `after + 1`; with the room's comment count from its owner.
    pub(crate) async fn room_comments(
        &self,
        session: &Arc<Session>,
        room_id: &str,
        after: u64,
        limit: u64,
    ) -> Result<chorus_protocol::RoomCommentsResponse, ErrorBody> {
        let comment_count = match self.room_op(session, room_id, RoomOp::Info).await? {
            RoomOpReply::Info(info) => info.comment_count,
            other => {
                return Err(ErrorBody::new(
                    ErrorCode::Internal,
                    format!("unexpected answer {other:?}"),
                ))
            }
        };
        let limit = limit.min(comment_count.saturating_sub(after));
        let mut found: BTreeMap<u64, chorus_protocol::CommentEvent> = self
            .comments_held(room_id, after, limit)
            .into_iter()
            .map(|c| (c.comment_id, c))
            .collect();
        if (found.len() as u64) < limit {
            let message = encode(&NodeMessage::LogComments {
                room_id: room_id.to_string(),
                after,
                limit,
            });
            let calls = self.live_peers().into_iter().map(|peer| {
                let call = self.cluster.call_app(peer, message.clone());
                async move {
                    match tokio::time::timeout(Duration::from_millis(HISTORY_READ_TIMEOUT_MS), call)
                        .await
                    {
                        Ok(Ok(reply)) => {
                            decode::<Vec<chorus_protocol::CommentEvent>>(&reply).unwrap_or_default()
                        }
                        _ => Vec::new(),
                    }
                }
            });
            for part in futures_util::future::join_all(calls).await {
                for comment in part {
                    found.entry(comment.comment_id).or_insert(comment);
                }
            }
        }
        let comments = found
            .into_values()
            .enumerate()
            .take_while(|(i, c)| c.comment_id == after + 1 + *i as u64)
            .map(|(_, c)| c)
            .collect();
        Ok(chorus_protocol::RoomCommentsResponse {
            comments,
            comment_count,
        })
    }

    /// Re-joins `session` to `room_id`, asking for the comments after the latest it has:
    /// after a ring change, a cut, or a gap in the order.
    pub(crate) async fn rejoin(
        &self,
        session: &Arc<Session>,
        room_id: &str,
    ) -> Result<RoomOpReply, ErrorBody> {
        let user = session.user_id.clone();
        let since = session.with_core(|core| core.room_position(room_id));
        self.room_op(session, room_id, RoomOp::Join { user, since })
            .await
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

    /// The relay from this node to `edge` (started on first use).
    pub(crate) fn relay_to(&self, edge: NodeId) -> Arc<EdgeRelay> {
        // Voice goes to the edge as datagrams, which need an open connection.
        self.cluster.ensure_connected(edge);
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
        let deadline_ms =
            chorus_actors::room_actor::unix_now_ms() + super::connection::REQUEST_DEADLINE_MS;
        let result = self
            .room_op_once(session, room_id, op.clone(), deadline_ms)
            .await;
        let rejoin = matches!(op, RoomOp::Comment { .. } | RoomOp::Vote { .. });
        match result {
            Err(error)
                if rejoin
                    && error.code == ErrorCode::NotInRoom.as_u16()
                    && session.with_core(|core| core.in_room(room_id)) =>
            {
                let user = session.user_id.clone();
                let since = session.with_core(|core| core.room_position(room_id));
                self.room_op_once(session, room_id, RoomOp::Join { user, since }, deadline_ms)
                    .await?;
                self.room_op_once(session, room_id, op, deadline_ms).await
            }
            other => other,
        }
    }

    async fn room_op_once(
        &self,
        session: &Arc<Session>,
        room_id: &str,
        op: RoomOp,
        deadline_ms: u64,
    ) -> Result<RoomOpReply, ErrorBody> {
        let mut attempts = 0;
        loop {
            let mut metadata = self.cluster.subscribe_metadata();
            let epoch = metadata.borrow().ring_epoch;
            let call = self.room_op_at_owner(session, room_id, op.clone(), deadline_ms);
            // A request waiting on another node is answered at once when this node finds
            // itself cut off (a local room answers on its own: it cannot replicate).
            let mut cut_off = self.cluster.subscribe_cut_off();
            let owner_remote = self.owner_of(room_id) != self.cluster.node_id();
            let cut = async {
                if !owner_remote || cut_off.wait_for(|cut| *cut).await.is_err() {
                    std::future::pending::<()>().await;
                }
            };
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
                () = cut => {
                    return Err(ErrorBody::new(
                        ErrorCode::Unavailable,
                        "this node is cut off from the cluster and cannot reach the room's \
                         owner: reconnect to another node",
                    ));
                }
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
        deadline_ms: u64,
    ) -> Result<RoomOpReply, ErrorBody> {
        let owner = self.owner_of(room_id);
        let member = session.member();
        if owner == self.cluster.node_id() {
            return self.local_room_op(room_id, member, op).await;
        }
        if self.cluster.is_cut_off() {
            return Err(ErrorBody::new(
                ErrorCode::Unavailable,
                "this node is cut off from the cluster and cannot reach the room's owner: \
                 reconnect to another node",
            ));
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
            deadline_ms: Some(deadline_ms),
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

    /// Takes over session `session_id` of `user` from another node (or from this node's
    /// previous run): if the id was minted for `user`, a session is created here (under a
    /// new id the client adopts), numbering on from `last_seq`, and re-joins `rooms`, each asking for the
    /// comments after the id the client has (they are buffered for the resume that
    /// follows). The home node, if it is up, is told to end its copy. `None` (the client
    /// must resync) if the id is not the user's, a room cannot be re-joined, or a room's
    /// recent log no longer reaches back to what the client has.
    pub(crate) async fn take_over_session(
        &self,
        session_id: &str,
        user: &str,
        last_seq: u64,
        rooms: &BTreeMap<String, u64>,
    ) -> Option<Arc<Session>> {
        let home = self.sessions.ids().verify(session_id, user)?;
        if rooms.len() > self.config.limits.rooms_per_session_max {
            return None;
        }
        let self_id = self.cluster.node_id();
        let home_up = self
            .cluster
            .metadata()
            .nodes
            .get(&home)
            .is_some_and(|n| n.state != chorus_cluster::metadata::NodeState::Down);
        if home != self_id && home_up {
            // The home still holds the session: tell it over the actor mesh, or, when the
            // mesh has no session to it yet (it just started), with an RPC.
            let timeout = Duration::from_millis(READMIT_QUERY_TIMEOUT_MS);
            let delivery = super::control::end_session_on(home, session_id, timeout).await;
            if delivery == super::control::Delivery::NoSession {
                let message = encode(&NodeMessage::EndSession {
                    session_id: session_id.to_string(),
                });
                let _ = tokio::time::timeout(timeout, self.cluster.call_app(home, message)).await;
            }
        }
        let now_ms = chorus_actors::room_actor::unix_now_ms();
        let session = self
            .sessions
            .take_over(session_id, user, now_ms, last_seq)?;
        let mut complete = true;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(TAKEOVER_JOIN_WINDOW_MS);
        for (room_id, since) in rooms {
            let since = *since;
            let reserved = session.with_core(|core| {
                core.handle_room_joined(room_id)?;
                core.handle_room_join_answered(room_id, since);
                Ok::<(), ErrorCode>(())
            });
            if reserved.is_err() {
                complete = false;
                break;
            }
            let op = RoomOp::Join {
                user: user.to_string(),
                since: Some(since),
            };
            // The room's owner may be the node that just died: keep trying (its rooms move
            // once it is marked down) within the takeover window.
            let mut metadata = self.cluster.subscribe_metadata();
            let result = loop {
                let result = self.room_op(&session, room_id, op.clone()).await;
                match &result {
                    Err(error)
                        if error.code == ErrorCode::Unavailable.as_u16()
                            && tokio::time::Instant::now() < deadline =>
                    {
                        let pause = tokio::time::Instant::now()
                            + Duration::from_millis(TAKEOVER_RETRY_PAUSE_MS);
                        let _ =
                            tokio::time::timeout_at(pause.min(deadline), metadata.changed()).await;
                    }
                    _ => break result,
                }
            };
            match result {
                Ok(RoomOpReply::Joined(joined)) => {
                    let reaches_back = joined.room.comment_count <= since
                        || joined
                            .recent_comments
                            .first()
                            .is_some_and(|c| c.comment_id <= since + 1);
                    if !reaches_back {
                        tracing::info!(session = %session_id, room = %room_id, since, "takeover: the room's recent log does not reach back far enough");
                        complete = false;
                        break;
                    }
                }
                other => {
                    tracing::info!(session = %session_id, room = %room_id, outcome = ?other.err(), "takeover: cannot re-join");
                    complete = false;
                    break;
                }
            }
        }
        if !complete {
            self.end_session(&session).await;
            metrics::counter!("chorus_session_takeovers_total", "outcome" => "refused")
                .increment(1);
            return None;
        }
        metrics::counter!("chorus_session_takeovers_total", "outcome" => "taken_over").increment(1);
        tracing::info!(session = %session_id, home, rooms = rooms.len(), "session taken over");
        Some(session)
    }

    /// The sessions on this node that are in `room_id`: (member key, user).
    pub(crate) fn local_members(&self, room_id: &str) -> Vec<(u64, String, Option<u64>)> {
        self.local_sessions(room_id)
            .into_iter()
            .map(|(session, since)| (session.member().key(), session.user_id.clone(), Some(since)))
            .collect()
    }

    /// The sessions on this node that are in `room_id`, each with the latest comment id
    /// it has from the room.
    fn local_sessions(&self, room_id: &str) -> Vec<(Arc<Session>, u64)> {
        self.sessions
            .all()
            .into_iter()
            .filter_map(|session| {
                let since = session.with_core(|core| core.room_position(room_id))?;
                Some((session, since))
            })
            .collect()
    }

    /// `session` is no longer in remote room `room_id`: its events stop here.
    pub(crate) fn forget_mirror(&self, room_id: &str, session: &Arc<Session>) {
        self.mirrors.remove(room_id, session.member().key());
    }

    /// A room's actor was just started here (it was created, it moved, its owner died, or
    /// it stopped after a failed replication). Before it serves anything:
    ///
    /// 1. claim ownership through Raft (granted only to the room's owner on the committed
    ///    ring; each claim is a new, higher epoch);
    /// 2. tell every node the new epoch (they refuse older owners' writes from then on and
    ///    stop acting for the room) and gather its members and durable state, all nodes at
    ///    once, each within [`READMIT_QUERY_TIMEOUT_MS`] (a node that does not answer is
    ///    skipped: its sessions re-join when they next act);
    /// 3. continue from the most advanced state, by (epoch, revision, comment count), and
    ///    replicate it at the new epoch;
    /// 4. re-admit the members, so none misses what the room does next.
    async fn activate_room(
        &self,
        room_id: &str,
        actor: ActorRef<RoomMsg>,
    ) -> Result<(), DirectoryError> {
        // Activations run concurrently, each room on its own (see `RoomDirectory`).
        let gauge = metrics::gauge!("chorus_room_activations_in_progress");
        gauge.increment(1.0);
        let result = self.activate_room_inner(room_id, actor).await;
        gauge.decrement(1.0);
        result
    }

    async fn activate_room_inner(
        &self,
        room_id: &str,
        actor: ActorRef<RoomMsg>,
    ) -> Result<(), DirectoryError> {
        let key = room_key(room_id);
        let self_id = self.cluster.node_id();
        let activation_error = |reason: String| DirectoryError::Activation {
            room: room_id.to_string(),
            reason,
        };
        let claim = chorus_cluster::metadata::MetadataCommand::ClaimOwnership {
            key: key.clone(),
            node: self_id,
        };
        let epoch = match self.cluster.write(claim).await {
            Ok(chorus_cluster::metadata::MetadataResponse::OwnershipGranted(granted)) => {
                granted.epoch
            }
            Ok(other) => return Err(activation_error(format!("ownership claim: {other:?}"))),
            Err(error) => return Err(activation_error(format!("ownership claim: {error}"))),
        };
        // The claim was decided by the leader; wait until this node has applied it too, so
        // that the members asked below are the current ones (the log applies in order: a
        // node that has just joined may still be applying old entries, naming members long
        // gone, some of whose addresses now belong to others).
        let mut metadata = self.cluster.subscribe_metadata();
        let applied =
            tokio::time::timeout(Duration::from_millis(CLAIM_APPLIED_TIMEOUT_MS), async {
                while metadata
                    .borrow_and_update()
                    .owners
                    .get(&key)
                    .map_or(0, |o| o.epoch)
                    < epoch
                {
                    if metadata.changed().await.is_err() {
                        return false;
                    }
                }
                true
            })
            .await;
        if !matches!(applied, Ok(true)) {
            return Err(activation_error(format!(
                "the ownership claim at epoch {epoch} was not applied here within \
                 {CLAIM_APPLIED_TIMEOUT_MS} ms"
            )));
        }
        self.owned_epochs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(room_id.to_string(), epoch);
        let others = self.live_peers();
        let queries = others.into_iter().map(|node_id| {
            let query = encode(&NodeMessage::Members {
                room_id: room_id.to_string(),
                epoch,
            });
            async move {
                let call = self.cluster.call_app(node_id, query);
                let answer = tokio::time::timeout(
                    Duration::from_millis(READMIT_QUERY_TIMEOUT_MS),
                    call,
                )
                .await;
                match answer {
                    Ok(Ok(reply)) => match decode::<RoomRecovery>(&reply) {
                        Ok(recovery) => Some((node_id, recovery)),
                        Err(error) => {
                            tracing::warn!(room = %room_id, node = node_id, %error.message, "bad recovery answer");
                            None
                        }
                    },
                    _ => {
                        tracing::warn!(room = %room_id, node = node_id, "no recovery answer from node");
                        None
                    }
                }
            }
        });
        let mut recoveries: Vec<(NodeId, RoomRecovery)> = futures_util::future::join_all(queries)
            .await
            .into_iter()
            .flatten()
            .collect();
        let local = self.local_sessions(room_id);
        recoveries.push((
            self_id,
            RoomRecovery {
                members: Vec::new(),
                durable: self.durable.fence(room_id, epoch),
            },
        ));
        let durable = chorus_actors::replica::most_advanced(
            recoveries.iter().filter_map(|(_, r)| r.durable.clone()),
        )
        .map(|(_, d)| d);
        let restored = durable.as_ref().map(|d| d.comment_count).unwrap_or(0);
        let current = ask(&actor, |reply| RoomMsg::Restore {
            epoch,
            durable: durable.map(Box::new),
            reply,
        })
        .await
        .map_err(|e| activation_error(e.message))?;
        // The state at the new epoch on a second node (best effort: the next comment
        // replicates it again, and is refused if this fails for good).
        if let Err(error) = NodeReplicator::replicate_to_others(self, room_id, epoch, current).await
        {
            tracing::warn!(room = %room_id, epoch, %error, "replicating an activated room's state failed");
        }
        // This node's sessions as themselves, the others' through their node's relay.
        let local = local
            .into_iter()
            .map(|(session, since)| (session.member(), session.user_id.clone(), Some(since)));
        let remote = recoveries.into_iter().flat_map(|(node_id, recovery)| {
            let relay = (node_id != self_id).then(|| self.relay_to(node_id));
            recovery
                .members
                .into_iter()
                .filter_map(move |(key, user, since)| {
                    let member = RemoteMember::member(room_id, key, relay.clone()?);
                    Some((member, user, since))
                })
        });
        let mut readmitted = 0;
        for (member, user, since) in local.chain(remote) {
            let joined = ask(&actor, |reply| RoomMsg::Join {
                member,
                user,
                since,
                reply,
            })
            .await;
            if matches!(joined, Ok(Ok(_))) {
                readmitted += 1;
            }
        }
        tracing::info!(room = %room_id, epoch, readmitted, restored, "room activated");
        Ok(())
    }

    /// Another node activates `room_id` at `epoch`: refuse older writes from now on, stop
    /// acting for the room here if this node still did, and report what this node knows.
    fn recovery_for(&self, room_id: &str, epoch: u64) -> RoomRecovery {
        let durable = self.durable.fence(room_id, epoch);
        let owned = self
            .owned_epochs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(room_id)
            .copied();
        if matches!(owned, Some(own) if own < epoch) {
            // Not awaited: the directory may be busy activating another room that waits
            // for this node's answer.
            if let Some(node) = self.this.upgrade() {
                let room_id = room_id.to_string();
                tokio::spawn(async move {
                    let stopped = node.rooms.stop_unless(|id| id != room_id).await;
                    if stopped > 0 {
                        tracing::info!(room = %room_id, epoch, "a newer owner took the room: stopped here");
                    }
                });
            }
        }
        RoomRecovery {
            members: self.local_members(room_id),
            durable,
        }
    }

    /// The running actor of a room this node owns, activated (with its members re-admitted)
    /// if needed. A node that has just joined may not have applied the room's definition
    /// yet: "not found" is believed once this node caught up with what the leader had
    /// committed (one ReadIndex, see `ClusterService::catch_up`), or, with no leader to
    /// ask, after the metadata stops changing for a moment (at most
    /// [`DEFINITION_SETTLE_MS`]).
    pub(crate) async fn activate(&self, room_id: &str) -> Result<ActorRef<RoomMsg>, ErrorBody> {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(DEFINITION_SETTLE_MS);
        let mut metadata = self.cluster.subscribe_metadata();
        let (mut asked_leader, mut caught_up) = (false, false);
        loop {
            match self
                .rooms
                .get_with(room_id, |actor| self.activate_room(room_id, actor))
                .await
            {
                Err(DirectoryError::NotFound(_)) if tokio::time::Instant::now() < deadline => {
                    // Catch up with what the leader has committed (one ReadIndex): then a
                    // definition still missing does not exist, and the answer is at once.
                    if !asked_leader {
                        asked_leader = true;
                        let caught = tokio::time::timeout_at(deadline, self.cluster.catch_up());
                        if matches!(caught.await, Ok(Ok(_))) {
                            caught_up = true;
                            continue;
                        }
                    } else if caught_up {
                        return Err(directory_error(DirectoryError::NotFound(
                            room_id.to_string(),
                        )));
                    }
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

    /// Sends a notice to every member of `room_id` through its owner (a quiz question, a
    /// rain starting, bullet comments). Retried once on the new owner if the ring moves.
    pub(crate) async fn announce(
        &self,
        room_id: &str,
        body: Arc<EncodedBody>,
    ) -> Result<(), ErrorBody> {
        let mut result = Ok(());
        for _ in 0..2 {
            let owner = self.owner_of(room_id);
            result = if owner == self.cluster.node_id() {
                self.announce_local(room_id, body.clone()).await
            } else {
                let message = encode(&NodeMessage::Announce {
                    room_id: room_id.to_string(),
                    kind: body.kind().to_string(),
                    msgpack: body.body_bytes(Encoding::MsgPack).clone(),
                    json: body.body_bytes(Encoding::Json).clone(),
                });
                match self.cluster.call_app(owner, message).await {
                    Ok(reply) => decode::<Result<RoomOpReply, ErrorBody>>(&reply)
                        .and_then(|r| r)
                        .map(|_| ()),
                    Err(error) => Err(ErrorBody::new(
                        ErrorCode::Unavailable,
                        format!("the room's owner (node {owner}) is unreachable: {error}"),
                    )),
                }
            };
            if result.is_ok() || self.owner_of(room_id) == owner {
                break;
            }
        }
        result
    }

    /// How many members `room_id` has (0 if it cannot be asked): the audience a rain's
    /// throttle is computed from.
    pub(crate) async fn room_audience(&self, room_id: &str) -> u64 {
        let owner = self.owner_of(room_id);
        let info = if owner == self.cluster.node_id() {
            match self.activate(room_id).await {
                Ok(actor) => ask(&actor, |reply| RoomMsg::Info { reply }).await.ok(),
                Err(_) => None,
            }
        } else {
            let message = encode(&NodeMessage::Room {
                from: self.cluster.node_id(),
                room_id: room_id.to_string(),
                member_key: 0,
                op: RoomOp::Info,
                deadline_ms: None,
            });
            match self.cluster.call_app(owner, message).await {
                Ok(reply) => match decode::<Result<RoomOpReply, ErrorBody>>(&reply) {
                    Ok(Ok(RoomOpReply::Info(info))) => Some(info),
                    _ => None,
                },
                Err(_) => None,
            }
        };
        info.map(|info| info.listener_count).unwrap_or(0)
    }

    /// [`Node::announce`] on the owner.
    pub(crate) async fn announce_local(
        &self,
        room_id: &str,
        body: Arc<EncodedBody>,
    ) -> Result<(), ErrorBody> {
        let actor = self.activate(room_id).await?;
        actor
            .cast(chorus_actors::room_actor::RoomMsg::Announce { body })
            .map_err(|_| ErrorBody::new(ErrorCode::Unavailable, "the room stopped"))
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
            let room_id = definition.room_id.clone();
            let info = self
                .rooms
                .create_with(definition, |actor| self.activate_room(&room_id, actor))
                .await
                .map_err(directory_error)?;
            return Ok(RoomOpReply::Created(info));
        }
        let actor = self.activate(room_id).await?;
        Ok(match op {
            RoomOp::Create(_) => RoomOpReply::Done,
            RoomOp::Join { user, since } => RoomOpReply::Joined(
                ask(&actor, |reply| RoomMsg::Join {
                    member,
                    user,
                    since,
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
            RoomOp::Comment {
                text,
                request_id,
                deadline_ms,
            } => RoomOpReply::Commented(
                ask(&actor, |reply| RoomMsg::Comment {
                    member,
                    text,
                    request_id,
                    deadline_ms,
                    reply,
                })
                .await?
                .map_err(room_error)?,
            ),
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
            RoomOp::Stage { user, command } => {
                ask(&actor, |reply| RoomMsg::Stage {
                    user,
                    command,
                    reply,
                })
                .await?
                .map_err(room_error)?;
                RoomOpReply::Done
            }
            RoomOp::InviteUsers { user, users } => {
                ask(&actor, |reply| RoomMsg::InviteUsers { user, users, reply })
                    .await?
                    .map_err(room_error)?;
                RoomOpReply::Done
            }
            RoomOp::Summary => {
                RoomOpReply::Summary(ask(&actor, |reply| RoomMsg::Summary { reply }).await?)
            }
            RoomOp::Interest { user, interested } => RoomOpReply::Interested(
                ask(&actor, |reply| RoomMsg::Interest {
                    user,
                    interested,
                    reply,
                })
                .await?
                .map_err(room_error)?,
            ),
            RoomOp::Members { after, limit } => RoomOpReply::Members(
                ask(&actor, |reply| RoomMsg::Members {
                    after,
                    limit,
                    reply,
                })
                .await?,
            ),
            RoomOp::StageInfo { user } => {
                RoomOpReply::Stage(ask(&actor, |reply| RoomMsg::StageInfo { user, reply }).await?)
            }
            RoomOp::Info => RoomOpReply::Info(ask(&actor, |reply| RoomMsg::Info { reply }).await?),
            RoomOp::PollCreate {
                user,
                question,
                options,
            } => RoomOpReply::Poll(
                ask(&actor, |reply| RoomMsg::PollCreate {
                    user,
                    question,
                    options,
                    reply,
                })
                .await?
                .map_err(room_error)?,
            ),
            RoomOp::Vote { poll_id, option } => {
                ask(&actor, |reply| RoomMsg::Vote {
                    member,
                    poll_id,
                    option,
                    reply,
                })
                .await?
                .map_err(room_error)?;
                RoomOpReply::Done
            }
            RoomOp::PollClose { user, poll_id } => RoomOpReply::Poll(
                ask(&actor, |reply| RoomMsg::PollClose {
                    user,
                    poll_id,
                    reply,
                })
                .await?
                .map_err(room_error)?,
            ),
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
        // Members on nodes that are gone (down or removed; not draining: those still
        // serve their clients) leave the rooms this node owns.
        let metadata = node.cluster.metadata();
        let gone: std::collections::BTreeSet<NodeId> = previous
            .as_ref()
            .map(|p| p.members().to_vec())
            .unwrap_or_default()
            .into_iter()
            .filter(|id| {
                metadata
                    .nodes
                    .get(id)
                    .is_none_or(|n| n.state == chorus_cluster::metadata::NodeState::Down)
            })
            .collect();
        if !gone.is_empty() {
            for (_, actor) in node.rooms.running_actors().await {
                let gone = gone.clone();
                let _ = actor.cast(RoomMsg::Prune {
                    gone: Box::new(move |key| gone.contains(&(key >> MEMBER_KEY_NODE_SHIFT))),
                });
            }
        }
        // A node that was down (paused, cut off) and is back: rooms that stayed put may
        // have dropped its members meanwhile, so its sessions re-join every room (asking
        // for what they missed). The watch channel coalesces changes, so "down, then up"
        // may arrive as one jump of the epoch: any jump by more than one counts too (a
        // re-join is idempotent, so an unneeded one costs a round trip).
        let came_back = previous.as_ref().is_some_and(|p| {
            (!p.contains(self_id) && next.contains(self_id)) || next.epoch() > p.epoch() + 1
        }) && metadata.nodes.len() > 1;
        let stopped = node
            .rooms
            .stop_unless(|room_id| next.owner(&room_key(room_id)) == Some(self_id))
            .await;
        // This node is leaving (draining): its copies go to the nodes that keep the rooms.
        let leaving = metadata
            .nodes
            .get(&self_id)
            .is_some_and(|n| n.state == chorus_cluster::metadata::NodeState::Draining);
        if leaving && previous.as_ref().is_none_or(|p| p.contains(self_id)) {
            let node = node.clone();
            tokio::spawn(async move {
                let (taken, untaken) = hand_off_copies(&node).await;
                tracing::info!(
                    taken,
                    untaken,
                    "draining: handed off the room copies held here"
                );
            });
        }
        let mut rejoined = 0;
        for session in node.sessions.all() {
            let rooms: Vec<String> = session.with_core(|core| core.rooms().cloned().collect());
            for room_id in rooms {
                let key = room_key(&room_id);
                let before = previous.as_ref().and_then(|r| r.owner(&key));
                let after = next.owner(&key);
                if before == after && !came_back {
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
                match node.rejoin(&session, &room_id).await {
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

/// Rooms whose copies a leaving node hands off at once.
const HAND_OFF_CONCURRENCY: usize = 16;

/// Copies every room state this node holds to the nodes that hold the room once this one
/// is gone: the owner and the next node for the room's key on the current ring (which no
/// longer names this node once it drains). A leaving node may be the only replica of a
/// room whose owner crashes at the same moment; with its copies handed off, the room's
/// next owner still finds every acknowledged change. Receivers keep a copy only if it is
/// ahead of theirs and not fenced by a newer owner, so handing off an old copy is
/// harmless. Returns (copies taken, rooms none of whose targets took it).
pub(crate) async fn hand_off_copies(node: &Node) -> (usize, usize) {
    use futures_util::StreamExt;
    let self_id = node.cluster.node_id();
    let Some(ring) = node.cluster.ring() else {
        return (0, 0);
    };
    let states = node.durable.held_states();
    let outcomes: Vec<(usize, bool)> = futures_util::stream::iter(states)
        .map(|(room_id, epoch, durable)| {
            let targets: Vec<NodeId> = ring
                .owners_n(&room_key(&room_id), 2 + 1)
                .into_iter()
                .filter(|id| *id != self_id)
                .take(2)
                .collect();
            let message = encode(&NodeMessage::Replicate {
                room_id,
                epoch,
                durable,
            });
            async move {
                let calls = targets.iter().map(|target| {
                    let call = node.cluster.call_app(*target, message.clone());
                    async move {
                        matches!(
                            tokio::time::timeout(Duration::from_millis(REPLICATE_TIMEOUT_MS), call)
                                .await,
                            Ok(Ok(reply)) if matches!(
                                decode::<Result<RoomOpReply, ErrorBody>>(&reply),
                                Ok(Ok(_))
                            )
                        )
                    }
                });
                let taken = futures_util::future::join_all(calls)
                    .await
                    .into_iter()
                    .filter(|taken| *taken)
                    .count();
                (taken, targets.is_empty() || taken == 0)
            }
        })
        .buffer_unordered(HAND_OFF_CONCURRENCY)
        .collect()
        .await;
    let taken = outcomes.iter().map(|(taken, _)| taken).sum();
    let untaken = outcomes.iter().filter(|(_, none)| *none).count();
    (taken, untaken)
}

/// When this node stops being cut off (it reaches a majority again and caught up), its
/// sessions re-join every room they are in, asking for what they missed: while it was
/// cut off, re-joins on ring changes were refused, and the rooms dropped its members when
/// the others marked it down. Runs until the node stops.
pub(crate) async fn rejoin_after_cut(node: Weak<Node>) {
    let Some(mut cut_off) = node.upgrade().map(|n| n.cluster.subscribe_cut_off()) else {
        return;
    };
    let mut was_cut_off = *cut_off.borrow_and_update();
    while cut_off.changed().await.is_ok() {
        let now_cut_off = *cut_off.borrow_and_update();
        let healed = was_cut_off && !now_cut_off;
        was_cut_off = now_cut_off;
        if !healed {
            continue;
        }
        let Some(node) = node.upgrade() else { return };
        let mut rejoined = 0;
        for session in node.sessions.all() {
            let rooms: Vec<String> = session.with_core(|core| core.rooms().cloned().collect());
            for room_id in rooms {
                match node.rejoin(&session, &room_id).await {
                    Ok(_) => rejoined += 1,
                    Err(error) => {
                        tracing::warn!(room = %room_id, %error, "re-join after a cut failed")
                    }
                }
            }
        }
        tracing::info!(
            rejoined,
            "no longer cut off: sessions re-joined their rooms"
        );
    }
}

/// Re-joins, asking for what they missed, the rooms in which a session saw a gap in the
/// order (an event that overtook one it lacks, e.g. a live comment from a new owner
/// arriving before the catch-up of the comments a failover kept from it). The session
/// dropped the early event; the catch-up brings everything after its latest, in order. If
/// the room's recent log no longer reaches back, the session goes on from what the log
/// has (counted in `chorus_catch_up_skipped_total`). Runs until the node stops.
pub(crate) async fn repair_gaps(
    node: Weak<Node>,
    mut repairs: tokio::sync::mpsc::Receiver<(String, String)>,
) {
    while let Some((session_id, room_id)) = repairs.recv().await {
        let Some(node) = node.upgrade() else { return };
        let Some(session) = node.sessions.get(&session_id) else {
            continue;
        };
        tokio::spawn(async move {
            for _ in 0..REPAIR_ATTEMPTS_MAX {
                let Some(since) = session.with_core(|core| core.room_position(&room_id)) else {
                    break;
                };
                let op = RoomOp::Join {
                    user: session.user_id.clone(),
                    since: Some(since),
                };
                match node.room_op(&session, &room_id, op).await {
                    Ok(RoomOpReply::Joined(joined)) => {
                        let first = joined.recent_comments.first().map(|c| c.comment_id);
                        match first {
                            Some(first)
                                if first > since + 1 && joined.room.comment_count > since =>
                            {
                                // The log starts after what the session has: take what
                                // it has, from its start.
                                metrics::counter!("chorus_catch_up_skipped_total")
                                    .increment(first - since - 1);
                                session.with_core(|core| {
                                    core.handle_positions_skipped(&room_id, first)
                                });
                                // Said, never silent: the client fetches the missing ones
                                // with `room.comments`.
                                let gap = chorus_protocol::Event::Gap(chorus_protocol::GapEvent {
                                    room_id: room_id.clone(),
                                    after: since,
                                    next: first,
                                });
                                if let Ok(body) = gap.encode_body() {
                                    chorus_actors::room_actor::MemberSink::deliver(
                                        &*session,
                                        &Arc::new(body),
                                    );
                                }
                            }
                            _ => {
                                metrics::counter!("chorus_order_repairs_total").increment(1);
                                tracing::info!(room = %room_id, session = %session.id, since, "repaired a gap in the room's order");
                                break;
                            }
                        }
                    }
                    Ok(_) => break,
                    Err(error) => {
                        tracing::debug!(room = %room_id, session = %session.id, %error, "gap repair failed; retrying");
                        tokio::time::sleep(Duration::from_millis(REPAIR_RETRY_MS)).await;
                    }
                }
            }
            session.with_core(|core| core.handle_repair_done(&room_id));
        });
    }
}

/// Removes what is left of rooms that ended longer ago than `ended_retention_ms` (R10:
/// 72 h by default). Every node forgets its replicated states of such rooms; the Raft
/// leader then deletes their definitions (and ownership), a little later so that every
/// node has swept first, after which the rooms answer `room_not_found`. At most
/// [`EXPIRE_DELETES_PER_SWEEP`] definitions go per sweep. Runs until the node stops.
pub(crate) async fn expire_rooms(node: Weak<Node>) {
    let Some(retention_ms) = node.upgrade().map(|n| n.config.room.ended_retention_ms) else {
        return;
    };
    let every_ms = (retention_ms / 4).clamp(EXPIRE_SWEEP_MIN_MS, EXPIRE_SWEEP_MAX_MS);
    let mut ticker = super::NodeTicker::new(node, Duration::from_millis(every_ms));
    while let Some(node) = ticker.next().await {
        let now_ms = chorus_actors::room_actor::unix_now_ms();
        let metadata = node.cluster.metadata();
        let mut expired = Vec::new();
        let mut deletable = Vec::new();
        for (key, bytes) in &metadata.definitions {
            let Some(room_id) = key.strip_prefix("room/") else {
                continue;
            };
            let Ok(definition) = rmp_serde::from_slice::<RoomDefinition>(bytes) else {
                continue;
            };
            let Some(ended_at_ms) = definition.ended_at_ms else {
                continue;
            };
            let expires_at = ended_at_ms.saturating_add(retention_ms);
            if now_ms >= expires_at {
                expired.push(room_id.to_string());
                if now_ms >= expires_at.saturating_add(2 * every_ms) {
                    deletable.push(key.clone());
                }
            }
        }
        let forgotten = node.durable.forget(&expired);
        if let Some(log) = node.event_log() {
            log.forget(&expired);
        }
        if forgotten > 0 {
            tracing::info!(forgotten, "forgot the states of expired rooms");
        }
        if node.cluster.raft_metrics().leader == Some(node.cluster.node_id()) {
            for key in deletable.into_iter().take(EXPIRE_DELETES_PER_SWEEP) {
                let command = chorus_cluster::metadata::MetadataCommand::DeleteDefinition {
                    key: key.clone(),
                };
                match node.cluster.write(command).await {
                    Ok(_) => {
                        metrics::counter!("chorus_rooms_expired_total").increment(1);
                        tracing::info!(%key, "expired an ended room");
                    }
                    Err(error) => tracing::warn!(%key, %error, "cannot expire an ended room"),
                }
            }
        }
    }
}

/// Shortest and longest pause between two sweeps for expired rooms.
const EXPIRE_SWEEP_MIN_MS: u64 = 100;
const EXPIRE_SWEEP_MAX_MS: u64 = 60_000;
/// Definitions of expired rooms deleted per sweep (the rest wait for the next).
const EXPIRE_DELETES_PER_SWEEP: usize = 100;

/// Re-joins one gap repair tries before it gives up (the next gap starts another).
const REPAIR_ATTEMPTS_MAX: u32 = 5;
/// Pause between two tries of a gap repair.
const REPAIR_RETRY_MS: u64 = 200;

/// The node's handler for messages from other nodes.
pub struct NodeApp {
    /// The node (weak: the node owns the cluster service that owns this handler).
    pub node: Weak<Node>,
}

impl chorus_cluster::service::AppHandler for NodeApp {
    fn datagram(
        &self,
        datagram: Bytes,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            if let Some(node) = self.node.upgrade() {
                node.audio_datagram(datagram).await;
            }
        })
    }

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
                Ok(NodeMessage::Members { room_id, epoch }) => {
                    encode(&node.recovery_for(&room_id, epoch))
                }
                Ok(NodeMessage::Replicate {
                    room_id,
                    epoch,
                    durable,
                }) => {
                    // Fenced twice: by the epochs this node has seen, and by the committed
                    // ownership in its metadata.
                    let committed = committed_epoch(&node, &room_id);
                    let kept = if epoch < committed {
                        Err(committed)
                    } else {
                        node.durable.keep(&room_id, epoch, durable)
                    };
                    match kept {
                        Ok(()) => encode(&Ok::<RoomOpReply, ErrorBody>(RoomOpReply::Done)),
                        Err(fence) => encode(&Err::<RoomOpReply, _>(ErrorBody::new(
                            ErrorCode::Unavailable,
                            format!("{STALE_EPOCH_REASON}: {room_id:?} is at epoch {fence}, the write at {epoch}"),
                        ))),
                    }
                }
                Ok(NodeMessage::ReplicateVotes {
                    room_id,
                    epoch,
                    base_revision,
                    revision,
                    votes,
                }) => {
                    let committed = committed_epoch(&node, &room_id);
                    let applied = if epoch < committed {
                        Err(VotesRefused::Stale(committed))
                    } else {
                        node.durable
                            .apply_votes(&room_id, epoch, base_revision, revision, &votes)
                    };
                    match applied {
                        Ok(()) => encode(&Ok::<RoomOpReply, ErrorBody>(RoomOpReply::Done)),
                        Err(VotesRefused::Stale(fence)) => encode(&Err::<RoomOpReply, _>(ErrorBody::new(
                            ErrorCode::Unavailable,
                            format!("{STALE_EPOCH_REASON}: {room_id:?} is at epoch {fence}, the votes at {epoch}"),
                        ))),
                        Err(VotesRefused::OutOfStep) => encode(&Err::<RoomOpReply, _>(ErrorBody::new(
                            ErrorCode::Unavailable,
                            format!("votes for {room_id:?} follow revision {base_revision}, which this node does not hold"),
                        ))),
                    }
                }
                Ok(NodeMessage::ReactBatch { room_id, counts }) => {
                    node.react_batch_here(&room_id, counts).await;
                    encode(&Ok::<RoomOpReply, ErrorBody>(RoomOpReply::Done))
                }
                Ok(NodeMessage::BulletBatch { room_id, bullets }) => {
                    node.bullet_batch_here(&room_id, bullets).await;
                    encode(&Ok::<RoomOpReply, ErrorBody>(RoomOpReply::Done))
                }
                Ok(NodeMessage::LogComments {
                    room_id,
                    after,
                    limit,
                }) => encode(&node.comments_held(&room_id, after, limit)),
                Ok(NodeMessage::LogTake { room_id }) => encode(
                    &node
                        .event_log()
                        .map(|log| log.take(&room_id))
                        .unwrap_or_default(),
                ),
                Ok(NodeMessage::EndSession { session_id }) => {
                    node.end_session_resumed_elsewhere(&session_id).await;
                    encode(&Ok::<RoomOpReply, ErrorBody>(RoomOpReply::Done))
                }
                Ok(NodeMessage::NotifyUsers {
                    users,
                    kind,
                    msgpack,
                    json,
                }) => {
                    if let Some(body) = EncodedBody::from_parts(&kind, msgpack, json) {
                        let users = &users[..users.len().min(USER_NOTICE_USERS_MAX)];
                        node.deliver_to_users(users, &Arc::new(body));
                    }
                    encode(&Ok::<RoomOpReply, ErrorBody>(RoomOpReply::Done))
                }
                Ok(NodeMessage::Announce {
                    room_id,
                    kind,
                    msgpack,
                    json,
                }) => match EncodedBody::from_parts(&kind, msgpack, json) {
                    Some(body) => encode(
                        &node
                            .announce_local(&room_id, Arc::new(body))
                            .await
                            .map(|()| RoomOpReply::Done),
                    ),
                    None => encode(&Err::<RoomOpReply, _>(ErrorBody::new(
                        ErrorCode::UnknownKind,
                        format!("unknown notification kind {kind:?}"),
                    ))),
                },
                Ok(NodeMessage::Rain(message)) => node.rain_message(message).await,
                Ok(NodeMessage::QuizAnswers { answers }) => {
                    let answers = answers
                        .into_iter()
                        .take(super::quiz::ANSWER_BATCH_MAX)
                        .collect();
                    encode(&node.quiz_judge(answers).await)
                }
                Ok(NodeMessage::QuizShards(op)) => encode(&node.quiz_shard_op(op).await),
                Ok(NodeMessage::QuizControl { quiz_id, action }) => {
                    encode(&node.quiz_control(&quiz_id, action).await)
                }
                Ok(NodeMessage::QuizPhase { quiz_id, state }) => {
                    node.quiz_phase_seen(&quiz_id, &state);
                    encode(&Ok::<RoomOpReply, ErrorBody>(RoomOpReply::Done))
                }
                Ok(NodeMessage::Relay { items, .. }) => {
                    node.mirrors.apply(items, &node.cluster.metadata());
                    encode(&Ok::<RoomOpReply, ErrorBody>(RoomOpReply::Done))
                }
                Ok(NodeMessage::Room {
                    from,
                    room_id,
                    member_key,
                    op,
                    deadline_ms,
                }) => {
                    if deadline_ms.is_some_and(|d| chorus_actors::room_actor::unix_now_ms() > d) {
                        metrics::counter!("chorus_requests_past_deadline_total").increment(1);
                        return encode(&Err::<RoomOpReply, _>(room_error(
                            RoomError::DeadlineExceeded,
                        )));
                    }
                    let relay = node.relay_to(from);
                    let member = RemoteMember::member(&room_id, member_key, relay);
                    encode(&node.local_room_op(&room_id, member, op).await)
                }
                Err(error) => encode(&Err::<RoomOpReply, _>(error)),
            }
        })
    }
}

/// How long the idle sweep waits for a room to say how many are in it.
const IDLE_INFO_TIMEOUT_MS: u64 = 1_000;

/// Stops the actors of rooms no one has been in for `room_idle_release_ms` (sampled a
/// few times per period), so that rooms created and left empty do not stay resident.
/// Their state stays stored; the next request for one starts it again through the
/// usual activation (claim, recover, re-admit).
pub(crate) async fn release_idle_rooms(node: Weak<Node>) {
    let Some(idle_ms) = node.upgrade().map(|n| n.config.limits.room_idle_release_ms) else {
        return;
    };
    let every_ms = (idle_ms / 4).clamp(50, 60_000);
    let mut ticker = super::NodeTicker::new(node, Duration::from_millis(every_ms));
    let mut empty_since: HashMap<String, u64> = HashMap::new();
    while let Some(node) = ticker.next().await {
        let running = node.rooms.running_actors().await;
        metrics::gauge!("chorus_rooms_running").set(running.len() as f64);
        let now_ms = chorus_actors::room_actor::unix_now_ms();
        let mut seen = std::collections::HashSet::with_capacity(running.len());
        for (room_id, actor) in running {
            let Ok(info) = ask(&actor, |reply| RoomMsg::Info { reply }).await else {
                continue;
            };
            seen.insert(room_id.clone());
            if info.listener_count > 0 {
                empty_since.remove(&room_id);
                continue;
            }
            let since = *empty_since.entry(room_id.clone()).or_insert(now_ms);
            if now_ms.saturating_sub(since) < idle_ms {
                continue;
            }
            let timeout = Duration::from_millis(IDLE_INFO_TIMEOUT_MS);
            if node.rooms.release_if_empty(&room_id, timeout).await {
                empty_since.remove(&room_id);
                metrics::counter!("chorus_rooms_released_idle_total").increment(1);
                tracing::debug!(room = %room_id, "released an idle room");
            }
        }
        empty_since.retain(|room_id, _| seen.contains(room_id));
    }
}
