//! What nodes say to each other about rooms: room operations for an owner, replication,
//! recovery, relayed events, notices.

use bytes::Bytes;
use chorus_actors::room::{RoomDefinition, RoomDurable};
use chorus_cluster::metadata::NodeId;
use chorus_protocol::{RoomCommentResponse, RoomInfo, RoomJoinResponse, UserId};
use serde::{Deserialize, Serialize};

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

/// A node's answer to a copy of a room's state (`Replicate`, `ReplicateVotes`,
/// `ReplicateChange`, `ReplicateComments`): typed, so the owner acts on the kind, never on words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CopyReply {
    /// Kept (the node holds the room at the new revision).
    Kept,
    /// A newer owner exists: the room is at epoch `fence`. The writer stops acting for it.
    Stale {
        /// The highest ownership epoch the node has seen for the room.
        fence: u64,
    },
    /// The delta does not follow the state held (the owner sends its whole state).
    OutOfStep,
}

impl CopyReply {
    /// The answer to a delta applied (or not) by the replica store.
    pub fn of(applied: Result<(), chorus_actors::replica::VotesRefused>) -> CopyReply {
        match applied {
            Ok(()) => CopyReply::Kept,
            Err(chorus_actors::replica::VotesRefused::Stale(fence)) => CopyReply::Stale { fence },
            Err(chorus_actors::replica::VotesRefused::OutOfStep) => CopyReply::OutOfStep,
        }
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

/// A message between nodes about rooms (inside the cluster's application channel,
/// [`crate::server::common::codec::Domain::Rooms`]).
#[derive(Debug, Serialize, Deserialize)]
pub enum RoomMessage {
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
    /// (answered with a [`CopyReply`]: `Stale` if a newer owner
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
    /// owner at `epoch`), which then is at `revision` (answered with a [`CopyReply`]).
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
    /// Take this state of `room_id` without its polls (the held polls stay) over the
    /// state held at `base_revision` (written by its owner at `epoch`): a change that left
    /// the polls alone (answered with a [`CopyReply`]).
    ReplicateChange {
        /// Room.
        room_id: String,
        /// The writer's ownership epoch.
        epoch: u64,
        /// The revision the change follows.
        base_revision: u64,
        /// The state, polls empty.
        durable: RoomDurable,
    },
    /// Take the comments posted in `room_id` since `base_revision` (only comments were)
    /// into the state held at that revision (written by its owner at `epoch`): answered
    /// with a [`CopyReply`].
    ReplicateComments {
        /// Room.
        room_id: String,
        /// The writer's ownership epoch.
        epoch: u64,
        /// The revision the comments follow.
        base_revision: u64,
        /// The comments and what they leave behind.
        delta: chorus_actors::room::CommentsDelta,
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
        /// At most [`crate::server::rooms::bullets::BATCH_USERS_MAX`] are taken.
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
    /// The listener counts of these rooms, which this node owns (answered with a
    /// `Vec<Option<u64>>` in the same order; at most `ROOM_LIST_PAGE_MAX` rooms).
    ListenerCounts {
        /// Rooms.
        room_ids: Vec<String>,
    },
    /// This node's load, for the operator page (answered with a [`NodeLoad`]).
    NodeLoad,
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
    /// Events from an owner to the members on this node.
    Relay {
        /// Sending node.
        from: NodeId,
        /// In order.
        items: Vec<RelayItem>,
    },
}

/// A node's load as the operator page shows it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeLoad {
    /// Client connections open.
    pub connections: u64,
    /// Sessions held (connected or resumable).
    pub sessions: u64,
    /// Room actors running (the rooms this node serves now).
    pub rooms: u64,
}
