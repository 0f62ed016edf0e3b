//! The room actor (a thin ractor shell around [`RoomCore`]) and the directory that finds or
//! starts room actors.
//!
//! The shell decodes a message, reads the clock, calls the core, and executes the core's
//! effects: fan-out to members, persistence, timers. Fan-out encodes each notification
//! once ([`EncodedBody`]) and hands the same bytes to every member's [`MemberSink`]; the
//! members on another node share one sink group ([`MemberSink::relay_group`]), so a
//! broadcast crosses to each node once. One actor and one fan-out loop per room: every
//! member's session receives the room's comments in the order the room handled them.
//!
//! # Replication before acknowledgement
//!
//! A comment, a stage change, a poll or a vote is broadcast or acknowledged only after the
//! room's durable state is on another node ([`DurableSink`]; the node picks that node, and
//! a node with no other member waits for its own disk instead). If no node takes it, the
//! caller gets `unavailable`, nothing is broadcast, and the actor stops (fail-stop); the
//! next request activates the room again from the replicated state. A replica that refuses
//! the copy because a newer owner exists stops the room the same way.
//!
//! Not every change sends the whole state:
//!
//! - A vote is applied at once (tallies are pushed at most once a second) and answered at
//!   the next group commit (`vote_commit_ms`, 20 ms), when the votes since the last
//!   replication go as one delta: epoch, the revision they follow, the revision after.
//! - A change that left the polls alone goes without the polls, against the revision the
//!   replica holds, so its cost does not grow with the votes.
//!
//! A replica applies either only to a copy at exactly that epoch and revision; anything
//! else (a copy behind, a newer owner, no answer) makes the room send its whole state,
//! which carries the votes too.
//!
//! A member that joins again says which comment it has last; the room sends it the
//! comments after that from its recent log (`recent_comments_max`, 50), in order, before
//! anything else.
//!
//! **Boundary:** ractor mailboxes are unbounded. What enters a room's mailbox is bounded
//! in front of it: every request comes from a connection that passed its token bucket
//! (`ConnectionConfig::requests_per_sec`), connections per node are capped, timers are
//! at most one outstanding per room (`tick_at_ms`), and batches from edges (reactions,
//! bullet comments) are at most one per node, room and kind every 50 ms. The
//! [`RoomDirectory`] holds its lock only around its map: a room being started is marked as
//! such, so no other room waits on an activation (which may wait on Raft and peers).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chorus_protocol::audio::{AudioFrame, AudioHeader};
use chorus_protocol::{
    EncodedBody, Event, PollInfo, RoomCommentResponse, RoomInfo, RoomJoinResponse,
    RoomMembersResponse, RoomSummary, StageInfo, UserId,
};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::polls::VoteRecord;
use crate::room::{
    CommentsDelta, RequestTerms, RoomConfig, RoomCore, RoomDefinition, RoomDurable, RoomEffect,
    RoomError, StageCommand,
};
use crate::store::{DefinitionStore, StoreError};

/// Where a room delivers notifications for one member (a session on this node).
pub trait MemberSink: Send + Sync + 'static {
    /// Delivers an encoded notification. Must not block: queue or drop. For a member on
    /// another node this is a broadcast's one copy for that node (see
    /// [`Self::relay_group`]): every member there gets it.
    fn deliver(&self, body: &Arc<EncodedBody>);
    /// Delivers several notifications in order, as [`Self::deliver`] each; a sink may
    /// write them out together (one write for a group commit's comments).
    fn deliver_all(&self, bodies: &[Arc<EncodedBody>]) {
        for body in bodies {
            self.deliver(body);
        }
    }
    /// Delivers an encoded notification to this member only (a catch-up, a notice to
    /// moderators). Same as [`Self::deliver`] for a local member.
    fn deliver_one(&self, body: &Arc<EncodedBody>) {
        self.deliver(body);
    }
    /// The room removed this member (it ended).
    fn removed_from_room(&self, room_id: &str);
    /// Members on another node share one relay: a broadcast is handed to a relay group
    /// once, however many of its members are in the room (one copy per node).
    fn relay_group(&self) -> Option<u64> {
        None
    }
    /// Delivers an encoded voice frame (R11), unreliably: a member that cannot take it now
    /// loses it (its oldest queued frame first). For a member on another node it is the
    /// node's one copy, as for [`Self::deliver`]. The default drops it.
    fn deliver_audio(&self, frame: &Bytes) {
        let _ = frame;
    }
}

/// A sink that delivers nowhere: the handle of [`Member::lookup`].
struct Nowhere;

impl MemberSink for Nowhere {
    fn deliver(&self, _body: &Arc<EncodedBody>) {}
    fn removed_from_room(&self, _room_id: &str) {}
}

/// What a room needs from the cluster beyond its own node: its durable state goes to
/// another node after each change, before the change is acknowledged (replication, so the
/// next owner can continue from it); and notices go to users wherever their sessions are.
pub trait DurableSink: Send + Sync + 'static {
    /// Sends `body` to every session of `users` on every node (members of the room or
    /// not), without waiting. The default delivers nowhere (a room without a cluster).
    fn notify_users(&self, users: Vec<UserId>, body: Arc<EncodedBody>) {
        let _ = (users, body);
    }

    /// Keeps `durable` for `room_id`, written by its owner at ownership `epoch`, on at least
    /// one other node; resolves `Ok` when it is there (or when no other node exists).
    ///
    /// # Errors
    ///
    /// [`DirectoryError::Replication`] when no other node took it in time, or a node
    /// refused it because a newer owner exists (the epoch is stale): the change must not
    /// be acknowledged and the room stops acting (fail-stop).
    fn replicate<'a>(
        &'a self,
        room_id: &'a str,
        epoch: u64,
        durable: RoomDurable,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), DirectoryError>> + Send + 'a>>;

    /// Keeps `votes` for `room_id` on the node that holds its state at `base_revision`,
    /// which then is at `revision`. An `Err` of any kind makes the room replicate its whole
    /// state instead ([`Self::replicate`]); the default always does.
    fn replicate_votes<'a>(
        &'a self,
        room_id: &'a str,
        epoch: u64,
        base_revision: u64,
        revision: u64,
        votes: Vec<VoteRecord>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), DirectoryError>> + Send + 'a>>
    {
        let _ = (room_id, epoch, base_revision, revision, votes);
        Box::pin(async { Err(DirectoryError::Replication("no vote deltas".into())) })
    }

    /// Keeps `change` (the state without its polls, see
    /// [`crate::room::RoomCore::durable_without_polls`]) for `room_id` on the node that
    /// holds its state at `base_revision`, whose polls are the owner's. An `Err` of any
    /// kind makes the room replicate its whole state instead ([`Self::replicate`]); the
    /// default always does.
    fn replicate_change<'a>(
        &'a self,
        room_id: &'a str,
        epoch: u64,
        base_revision: u64,
        change: RoomDurable,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), DirectoryError>> + Send + 'a>>
    {
        let _ = (room_id, epoch, base_revision, change);
        Box::pin(async { Err(DirectoryError::Replication("no change deltas".into())) })
    }

    /// Keeps the comments of `delta` for `room_id` on the node that holds its state at
    /// `base_revision` (only comments were posted since). An `Err` of any kind makes the
    /// room replicate its whole state instead ([`Self::replicate`]); the default always
    /// does.
    fn replicate_comments<'a>(
        &'a self,
        room_id: &'a str,
        epoch: u64,
        base_revision: u64,
        delta: CommentsDelta,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), DirectoryError>> + Send + 'a>>
    {
        let _ = (room_id, epoch, base_revision, delta);
        Box::pin(async { Err(DirectoryError::Replication("no comment deltas".into())) })
    }
}

/// Where a room's summary and event log go when the room ends (SPEC R10). Pluggable: the
/// node's default writes one JSON-lines file per room under its data dir.
pub trait AnalyticsSink: Send + Sync + 'static {
    /// Takes the summary and the whole event log of a room that ended, the log in order
    /// (by ownership epoch, then sequence). `missing` names the parts of the log that
    /// could not be gathered (a node that logged some of it was unreachable). Must not
    /// block: hand the work off.
    fn export(&self, summary: RoomSummary, events: Vec<LoggedEvent>, missing: Vec<String>);
}

/// One entry of a room's event log: a notification the room broadcast.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LoggedEvent {
    /// The owner's ownership epoch when it was logged.
    pub epoch: u64,
    /// Its place in that owner's log, from 0.
    pub seq: u64,
    /// When, ms since the epoch.
    pub at_ms: u64,
    /// Notification kind.
    pub kind: String,
    /// The body as JSON.
    pub json: Bytes,
}

/// A room's event log while it lives (R10): the owner appends what it broadcasts; when
/// the room ends, `finish` gathers the log (from every node that owned the room) and hands
/// it, with the summary, to the analytics sink.
pub trait EventLog: Send + Sync + 'static {
    /// Appends an entry for `room_id` (its `seq` is assigned here). Must not block long.
    fn append(&self, room_id: &str, epoch: u64, at_ms: u64, kind: &str, json: Bytes);
    /// The room ended: export its summary and log. Must not block: hand the work off.
    fn finish(&self, summary: RoomSummary);
}

/// A member handle: a stable key (ordering and identity) and the sink to deliver to.
#[derive(Clone)]
pub struct Member {
    key: u64,
    sink: Arc<dyn MemberSink>,
}

impl Member {
    /// A member with identity `key` (unique per session on this node).
    pub fn new(key: u64, sink: Arc<dyn MemberSink>) -> Self {
        Member { key, sink }
    }

    /// The identity key.
    pub fn key(&self) -> u64 {
        self.key
    }

    /// A handle that only names `key`, to find the member with that key in a room (members
    /// compare by key); it delivers nowhere.
    pub fn lookup(key: u64) -> Self {
        // One shared sink: a lookup per voice frame allocates nothing.
        static NOWHERE: std::sync::OnceLock<Arc<dyn MemberSink>> = std::sync::OnceLock::new();
        Member {
            key,
            sink: NOWHERE.get_or_init(|| Arc::new(Nowhere)).clone(),
        }
    }
}

impl std::fmt::Debug for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Member({})", self.key)
    }
}

impl PartialEq for Member {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}
impl Eq for Member {}
impl PartialOrd for Member {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Member {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key.cmp(&other.key)
    }
}

/// Messages a room actor handles.
pub enum RoomMsg {
    /// Join as `user`.
    Join {
        /// Who.
        member: Member,
        /// User id of the member.
        user: UserId,
        /// For a member joining again (after a failover or a move): the latest comment id
        /// it has. The comments after it in the recent log are sent to it, in order,
        /// before anything else the room does.
        since: Option<u64>,
        /// Answer.
        reply: RpcReplyPort<Result<RoomJoinResponse, RoomError>>,
    },
    /// Leave.
    Leave {
        /// Who.
        member: Member,
        /// Answer, if anyone waits.
        reply: Option<RpcReplyPort<Result<(), RoomError>>>,
    },
    /// Post a comment.
    Comment {
        /// Who.
        member: Member,
        /// Text.
        text: String,
        /// The request's id (a repeat gets the first answer), unique for its user.
        request_id: Option<String>,
        /// Past this time (ms since the epoch) a new request is not run.
        deadline_ms: Option<u64>,
        /// Answer.
        reply: RpcReplyPort<Result<RoomCommentResponse, RoomError>>,
    },
    /// Start a scheduled room (host only).
    Start {
        /// Who asks.
        user: UserId,
        /// Answer.
        reply: RpcReplyPort<Result<(), RoomError>>,
    },
    /// End the room (host only).
    End {
        /// Who asks.
        user: UserId,
        /// Answer.
        reply: RpcReplyPort<Result<(), RoomError>>,
    },
    /// Change the stage (roles, hands, invitations, mutes, kicks, blocks).
    Stage {
        /// Who asks.
        user: UserId,
        /// What.
        command: StageCommand,
        /// Answer, once the change is replicated.
        reply: RpcReplyPort<Result<(), RoomError>>,
    },
    /// Read the stage as `user` may see it.
    StageInfo {
        /// Who asks.
        user: UserId,
        /// Answer.
        reply: RpcReplyPort<StageInfo>,
    },
    /// Mark or unmark interest in the scheduled room.
    Interest {
        /// Who.
        user: UserId,
        /// Interested or not.
        interested: bool,
        /// Answer (interested users), once the change is replicated.
        reply: RpcReplyPort<Result<u64, RoomError>>,
    },
    /// Invite users to the room (host, moderators).
    InviteUsers {
        /// Who invites.
        user: UserId,
        /// Whom.
        users: Vec<UserId>,
        /// Answer.
        reply: RpcReplyPort<Result<(), RoomError>>,
    },
    /// Read the room's totals.
    Summary {
        /// Answer.
        reply: RpcReplyPort<RoomSummary>,
    },
    /// Read one page of the room's users.
    Members {
        /// Start after this user id.
        after: Option<UserId>,
        /// Users per page.
        limit: usize,
        /// Answer.
        reply: RpcReplyPort<RoomMembersResponse>,
    },
    /// Read the room's info.
    Info {
        /// Answer.
        reply: RpcReplyPort<RoomInfo>,
    },
    /// Become the owner at `epoch` (fencing: replication carries it) and continue from a
    /// durable state recovered from a previous owner or a replica, if any.
    Restore {
        /// The ownership epoch granted to this activation.
        epoch: u64,
        /// The most advanced state found (boxed: it is by far the largest message).
        durable: Option<Box<RoomDurable>>,
        /// Answer when applied: the room's durable state now.
        reply: RpcReplyPort<RoomDurable>,
    },
    /// Remove the members whose key `gone` says belongs to a node that is gone (down or
    /// removed): their sessions re-join when (if) that node comes back.
    Prune {
        /// True for the keys of members to remove.
        gone: Box<dyn Fn(u64) -> bool + Send>,
    },
    /// A voice packet from member `member_key` (R11): relayed to every member if its user
    /// may speak now, else dropped. No answer.
    Audio {
        /// The sending member.
        member_key: u64,
        /// Sequence, time, level.
        header: AudioHeader,
        /// The Opus packet.
        payload: Bytes,
    },
    /// Reactions an edge node counted for this room over a short batch (R7). No answer:
    /// the edge acknowledged them.
    ReactBatch {
        /// Count per emoji.
        counts: std::collections::BTreeMap<String, u64>,
    },
    /// Bullet comments an edge node admitted for this room over a short batch (Q6),
    /// at most one per user. No answer: the edge answered their senders.
    BulletBatch {
        /// The bullets, each its user's latest of the batch.
        bullets: Vec<crate::bullets::Bullet>,
    },
    /// A notice for every member from a service of the room (a quiz question, a rain
    /// starting): delivered as is, logged in the event log. No answer.
    Announce {
        /// The encoded notification.
        body: Arc<EncodedBody>,
    },
    /// Open a poll (R8).
    PollCreate {
        /// Who asks.
        user: UserId,
        /// The question.
        question: String,
        /// The answers.
        options: Vec<String>,
        /// Answer.
        reply: RpcReplyPort<Result<PollInfo, RoomError>>,
    },
    /// Vote in a poll; answered once the vote is replicated.
    Vote {
        /// Who.
        member: Member,
        /// The poll.
        poll_id: u64,
        /// The option.
        option: u32,
        /// Answer.
        reply: RpcReplyPort<Result<(), RoomError>>,
    },
    /// Close a poll.
    PollClose {
        /// Who asks.
        user: UserId,
        /// The poll.
        poll_id: u64,
        /// Answer.
        reply: RpcReplyPort<Result<PollInfo, RoomError>>,
    },
    /// Replicate the votes waiting, then acknowledge them (group commit).
    FlushVotes,
    /// The copy of comments `flight` finished (see [`CommentCommits`]): acknowledge them and
    /// send the comments that came since.
    CopyDone {
        /// Which copy.
        flight: u64,
    },
    /// A timer fired: flush windows and counters.
    Tick,
}

// Local only: ractor's `cluster` feature asks every message type to say so.
impl ractor::Message for RoomMsg {}

/// Milliseconds since the Unix epoch from the system clock (shell only; cores get `now_ms`).
pub fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The room actor's state.
pub struct RoomShell {
    core: RoomCore<Member>,
    store: Arc<dyn DefinitionStore>,
    replicator: Option<Arc<dyn DurableSink>>,
    analytics: Option<Arc<dyn AnalyticsSink>>,
    event_log: Option<Arc<dyn EventLog>>,
    /// Ownership epoch of this activation (0 until [`RoomMsg::Restore`]).
    epoch: u64,
    /// The revision last replicated.
    replicated_revision: u64,
    /// The room's comment count in the state last replicated.
    replicated_comments: u64,
    /// The polls' version in the state last replicated (`None`: not known, e.g. after an
    /// activation): while the polls stay at it, a change is replicated without them.
    replicated_polls: Option<u64>,
    tick_at_ms: Option<u64>,
    /// Where a voice frame goes: the local members and one member per other node, for
    /// the member set of the given version (rebuilt when it changes).
    audio_targets: Option<(u64, Vec<Member>)>,
    /// Votes applied but not yet replicated: answered at the next flush (or full
    /// replication). Bounded by the mailbox between two flushes.
    pending_votes: Vec<RpcReplyPort<Result<(), RoomError>>>,
    /// Whether a [`RoomMsg::FlushVotes`] is on its way.
    vote_flush_scheduled: bool,
    /// Comments applied but not yet replicated (group commit).
    commits: CommentCommits,
    /// The room's id, shared by all its events (see [`EncodedBody::with_room_position`]).
    name: Arc<str>,
}

/// The room actor.
pub struct RoomActor;

/// Start-up arguments: the definition, config and store.
pub struct RoomArgs {
    /// The room.
    pub definition: RoomDefinition,
    /// Limits.
    pub config: RoomConfig,
    /// Where definition changes are written.
    pub store: Arc<dyn DefinitionStore>,
    /// Where the durable state is replicated after each comment.
    pub replicator: Option<Arc<dyn DurableSink>>,
    /// Where the summary goes when the room ends (without an event log).
    pub analytics: Option<Arc<dyn AnalyticsSink>>,
    /// Where broadcasts are logged, and the log exported at the end.
    pub event_log: Option<Arc<dyn EventLog>>,
}

impl Actor for RoomActor {
    type Msg = RoomMsg;
    type State = RoomShell;
    type Arguments = RoomArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        metrics::gauge!("chorus_rooms_active").increment(1.0);
        Ok(RoomShell {
            name: Arc::from(args.definition.room_id.as_str()),
            core: RoomCore::new(args.definition, args.config),
            store: args.store,
            replicator: args.replicator,
            analytics: args.analytics,
            event_log: args.event_log,
            epoch: 0,
            replicated_revision: 0,
            replicated_comments: 0,
            replicated_polls: None,
            tick_at_ms: None,
            audio_targets: None,
            pending_votes: Vec::new(),
            vote_flush_scheduled: false,
            commits: CommentCommits::default(),
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        _state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        metrics::gauge!("chorus_rooms_active").decrement(1.0);
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let now_ms = unix_now_ms();
        // Comments are group-committed (see [`CommentCommits`]); every request that reads
        // or changes the room first waits until the comments before it are replicated and
        // broadcast, so it sees (and replicates) them as acknowledged. Voice, edge batches
        // and timers neither read comments nor need them settled.
        let pipelined = matches!(
            message,
            RoomMsg::Comment { .. }
                | RoomMsg::CopyDone { .. }
                | RoomMsg::Audio { .. }
                | RoomMsg::ReactBatch { .. }
                | RoomMsg::BulletBatch { .. }
                | RoomMsg::Tick
        );
        if !pipelined {
            if let Err(error) = state.settle_comments(&myself).await {
                tracing::warn!(room = %state.core.definition().room_id, %error, "comments not replicated; the room stops");
                myself.stop(Some("replication failed".into()));
                return Ok(());
            }
        }
        match message {
            RoomMsg::CopyDone { flight } => {
                if state.commits.in_flight_is(flight) {
                    if let Err(error) = state.settle_in_flight().await {
                        tracing::warn!(room = %state.core.definition().room_id, %error, "comments not replicated; the room stops");
                        myself.stop(Some("replication failed".into()));
                        return Ok(());
                    }
                    state.start_copy(&myself);
                }
            }
            RoomMsg::Join {
                member,
                user,
                since,
                reply,
            } => {
                let result = state.core.handle_join(now_ms, member.clone(), &user);
                if let (Ok(_), Some(since)) = (&result, since) {
                    state.catch_up(&member, since);
                }
                let _ = reply.send(result);
            }
            RoomMsg::Leave { member, reply } => {
                let result = state.core.handle_leave(now_ms, &member);
                if let Some(reply) = reply {
                    let _ = reply.send(result);
                }
            }
            RoomMsg::Comment {
                member,
                text,
                request_id,
                deadline_ms,
                reply,
            } => {
                // Past this many comments waiting for replication the room is over its
                // capacity: the comment is refused at once instead of waiting.
                if state.commits.queued.len() >= state.commits_queued_max() {
                    metrics::counter!("chorus_comments_refused_total", "reason" => "overloaded")
                        .increment(1);
                    let _ = reply.send(Err(RoomError::Unavailable(
                        "the room is taking more comments than it can replicate; retry later"
                            .into(),
                    )));
                    return Ok(());
                }
                let revision = state.core.revision();
                let terms = RequestTerms {
                    request_id: request_id.as_deref(),
                    deadline_ms,
                };
                let result = state
                    .core
                    .handle_comment_request(now_ms, &member, &text, terms);
                // A repeat answered from memory changed nothing; it is answered when what
                // it repeats is replicated, if that is still under way.
                let changed = result.is_ok() && state.core.revision() != revision;
                if result.is_err() || (!changed && state.commits.is_idle()) {
                    let _ = reply.send(result);
                } else {
                    // Replicated before anyone sees the comment: an acknowledged (or
                    // broadcast) comment survives the loss of this node. The comment waits
                    // with its broadcast for the next copy (group commit); if it cannot be
                    // replicated it is neither broadcast nor acknowledged and the room stops
                    // (fail-stop): the next activation continues from the replicated state,
                    // so no comment id ever names two different comments.
                    let effects = state.core.drain_effects();
                    state.commits.queued.push(PendingComment {
                        effects,
                        reply,
                        result,
                    });
                    if state.commits.in_flight.is_none() {
                        state.start_copy(&myself);
                    }
                }
            }
            RoomMsg::Stage {
                user,
                command,
                reply,
            } => {
                // A kick or block removes members before its effects run; its announcement
                // still reaches them (as `room.ended` does).
                let removes = matches!(
                    command,
                    StageCommand::Kick { .. } | StageCommand::Block { blocked: true, .. }
                );
                let before: Option<Vec<Member>> =
                    removes.then(|| state.core.members().cloned().collect());
                let revision = state.core.revision();
                let result = state.core.handle_stage(now_ms, &user, command);
                // Like a comment: replicated before it is visible or acknowledged.
                let changed = result.is_ok() && state.core.revision() != revision;
                if let Err(error) = state.replicate_change(changed).await {
                    return fail_stop(&myself, reply, error);
                }
                state.execute_effects_to(before.as_deref()).await;
                let _ = reply.send(result);
            }
            RoomMsg::Interest {
                user,
                interested,
                reply,
            } => {
                let revision = state.core.revision();
                let result = state.core.handle_interest(&user, interested);
                let changed = result.is_ok() && state.core.revision() != revision;
                if let Err(error) = state.replicate_change(changed).await {
                    return fail_stop(&myself, reply, error);
                }
                let _ = reply.send(result);
            }
            RoomMsg::InviteUsers { user, users, reply } => {
                let result = state.core.handle_invite_users(&user, users);
                state.execute_effects().await;
                let _ = reply.send(result);
            }
            RoomMsg::Summary { reply } => {
                let _ = reply.send(state.core.summary(now_ms));
            }
            RoomMsg::Members {
                after,
                limit,
                reply,
            } => {
                let _ = reply.send(state.core.members_page(after.as_deref(), limit));
            }
            RoomMsg::StageInfo { user, reply } => {
                let _ = reply.send(state.core.stage_info(&user));
            }
            RoomMsg::Start { user, reply } => {
                let result = state.core.handle_start(now_ms, &user);
                // The definition (now live) is committed before the host hears so.
                state.execute_effects().await;
                let _ = reply.send(result);
            }
            RoomMsg::End { user, reply } => {
                // handle_end removes every member before its effects run; the room.ended
                // broadcast must still reach them, so fan out to the members as they were.
                let members: Vec<Member> = state.core.members().cloned().collect();
                let result = state.core.handle_end(now_ms, &user);
                state.execute_effects_to(Some(&members)).await;
                let ended = result.is_ok();
                let _ = reply.send(result);
                if ended {
                    myself.stop(Some("room ended".into()));
                    return Ok(());
                }
            }
            RoomMsg::Info { reply } => {
                let _ = reply.send(state.core.info());
            }
            RoomMsg::Restore {
                epoch,
                durable,
                reply,
            } => {
                state.epoch = state.epoch.max(epoch);
                if let Some(durable) = durable {
                    state.core.restore_durable(now_ms, *durable);
                }
                // The activation replicates what it restored itself (best effort: the
                // next change sends the whole state).
                state.replicated_revision = state.core.revision();
                state.replicated_comments = state.core.comment_count();
                state.replicated_polls = None;
                let _ = reply.send(state.core.durable());
            }
            RoomMsg::Prune { gone } => {
                let stale: Vec<Member> = state
                    .core
                    .members()
                    .filter(|m| gone(m.key()))
                    .cloned()
                    .collect();
                for member in &stale {
                    let _ = state.core.handle_leave(now_ms, member);
                }
                if !stale.is_empty() {
                    tracing::info!(room = %state.core.definition().room_id, pruned = stale.len(), "members of gone nodes removed");
                }
            }
            RoomMsg::Audio {
                member_key,
                header,
                payload,
            } => state.relay_audio(now_ms, member_key, header, payload),
            RoomMsg::ReactBatch { counts } => {
                if let Ok(dropped) = state.core.handle_react_batch(now_ms, &counts) {
                    if dropped > 0 {
                        metrics::counter!("chorus_reactions_dropped_total").increment(dropped);
                    }
                }
            }
            RoomMsg::BulletBatch { bullets } => {
                if let Ok(dropped) = state.core.handle_bullet_batch(now_ms, bullets) {
                    if dropped > 0 {
                        metrics::counter!("chorus_bullets_dropped_total").increment(dropped);
                    }
                }
            }
            RoomMsg::Announce { body } => state.fan_out(&[(body, true)], None),
            RoomMsg::PollCreate {
                user,
                question,
                options,
                reply,
            } => {
                let result = state
                    .core
                    .handle_poll_create(now_ms, &user, &question, &options);
                if let Err(error) = state.replicate_change(result.is_ok()).await {
                    return fail_stop(&myself, reply, error);
                }
                state.execute_effects().await;
                let _ = reply.send(result);
            }
            RoomMsg::PollClose {
                user,
                poll_id,
                reply,
            } => {
                let revision = state.core.revision();
                let result = state.core.handle_poll_close(now_ms, &user, poll_id);
                let changed = result.is_ok() && state.core.revision() != revision;
                if let Err(error) = state.replicate_change(changed).await {
                    return fail_stop(&myself, reply, error);
                }
                state.execute_effects().await;
                let _ = reply.send(result);
            }
            RoomMsg::Vote {
                member,
                poll_id,
                option,
                reply,
            } => match state.core.handle_vote(now_ms, &member, poll_id, option) {
                Ok(true) => {
                    state.pending_votes.push(reply);
                    if !state.vote_flush_scheduled {
                        state.vote_flush_scheduled = true;
                        let delay = Duration::from_millis(state.core.config().polls.vote_commit_ms);
                        myself.send_after(delay, || RoomMsg::FlushVotes);
                    }
                }
                Ok(false) => {
                    let _ = reply.send(Ok(()));
                }
                Err(error) => {
                    let _ = reply.send(Err(error));
                }
            },
            RoomMsg::FlushVotes => {
                state.vote_flush_scheduled = false;
                if let Err(error) = state.flush_votes().await {
                    for reply in state.pending_votes.drain(..) {
                        let _ = reply.send(Err(error.clone()));
                    }
                    myself.stop(Some("replication failed".into()));
                    return Ok(());
                }
            }
            RoomMsg::Tick => {
                state.tick_at_ms = None;
                state.core.handle_tick(now_ms);
            }
        }
        state.execute_effects().await;
        // Stage changes nobody waits for (a speaker who left the room leaves the stage):
        // replicated too, best effort; the next acknowledged change carries them anyway.
        // Votes wait for their flush instead.
        if state.core.revision() != state.replicated_revision
            && !state.vote_flush_scheduled
            && state.commits.is_idle()
        {
            let _ = state.replicate().await;
        }
        state.schedule_tick(&myself, now_ms);
        Ok(())
    }
}

/// A comment applied to the room but not yet replicated: its broadcast and its answer wait
/// for the copy that carries it.
struct PendingComment {
    effects: Vec<RoomEffect<Member>>,
    reply: RpcReplyPort<Result<RoomCommentResponse, RoomError>>,
    result: Result<RoomCommentResponse, RoomError>,
}

/// The copy of the room's state on its way to the replica, with the comments it carries.
struct InFlight {
    /// Its number (a [`RoomMsg::CopyDone`] names it).
    flight: u64,
    /// The revision it carries.
    revision: u64,
    /// The room's comment count it carries.
    comments: u64,
    /// What it sends (for the metric).
    kind: &'static str,
    /// The polls' version it carries, if it is the whole state (`None`: a change without
    /// the polls).
    full_polls: Option<u64>,
    /// Its outcome.
    done: tokio::sync::oneshot::Receiver<Result<(), DirectoryError>>,
    /// The comments it carries, in order.
    batch: Vec<PendingComment>,
}

/// Group commit of comments. A comment is applied to the room at once and waits, with its
/// broadcast and its answer, for a copy of the room's state on another node. One copy is
/// on its way at a time (in its own task, so the room goes on taking comments); the
/// comments that come meanwhile go together in the next one. A copy carries the room's
/// recent comments (`recent_comments_max`), so at most that many wait for the next copy:
/// past it the room is over capacity and refuses a comment at once (`5001`) rather than
/// making it wait.
#[derive(Default)]
pub(crate) struct CommentCommits {
    in_flight: Option<InFlight>,
    queued: Vec<PendingComment>,
    flights: u64,
}

impl CommentCommits {
    fn is_idle(&self) -> bool {
        self.in_flight.is_none() && self.queued.is_empty()
    }

    fn in_flight_is(&self, flight: u64) -> bool {
        self.in_flight.as_ref().is_some_and(|f| f.flight == flight)
    }
}

/// What one copy sends.
enum CopyKind {
    /// The comments posted since the revision the replica holds.
    Comments { base: u64, delta: CommentsDelta },
    /// The state without the polls, against the revision the replica holds.
    Change { base: u64, state: RoomDurable },
    /// The whole state.
    Full(RoomDurable),
}

impl RoomShell {
    /// Comments that may wait for the next copy: as many as a copy carries.
    fn commits_queued_max(&self) -> usize {
        self.core.config().recent_comments_max.max(1)
    }

    /// Sends the comments queued in one copy of the room's state (nothing if none are, or
    /// one is on its way). Without a replicator, or when the state is already replicated
    /// (a repeat), they are acknowledged at once.
    fn start_copy(&mut self, myself: &ActorRef<RoomMsg>) {
        if self.commits.in_flight.is_some() || self.commits.queued.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.commits.queued);
        let revision = self.core.revision();
        let replicator = match &self.replicator {
            Some(replicator) if revision != self.replicated_revision => replicator.clone(),
            _ => {
                let (tx, done) = tokio::sync::oneshot::channel();
                let _ = tx.send(Ok(()));
                self.commits.flights += 1;
                self.commits.in_flight = Some(InFlight {
                    flight: self.commits.flights,
                    revision,
                    comments: self.core.comment_count(),
                    kind: "none",
                    full_polls: None,
                    done,
                    batch,
                });
                let _ = myself.cast(RoomMsg::CopyDone {
                    flight: self.commits.flights,
                });
                return;
            }
        };
        let polls_version = self.core.polls_version();
        let base = self.replicated_revision;
        let (kind, full_polls) = if self.replicated_polls != Some(polls_version) {
            (CopyKind::Full(self.core.durable()), Some(polls_version))
        } else if let Some(delta) = self.core.comments_delta(base, self.replicated_comments) {
            (CopyKind::Comments { base, delta }, None)
        } else {
            let state = self.core.durable_without_polls();
            (CopyKind::Change { base, state }, None)
        };
        let label = match kind {
            CopyKind::Comments { .. } => "comments",
            CopyKind::Change { .. } => "change",
            CopyKind::Full(_) => "full",
        };
        let (tx, done) = tokio::sync::oneshot::channel();
        self.commits.flights += 1;
        let flight = self.commits.flights;
        let room_id = self.core.definition().room_id.clone();
        let epoch = self.epoch;
        let myself = myself.clone();
        tokio::spawn(async move {
            let outcome = match kind {
                CopyKind::Comments { base, delta } => {
                    replicator
                        .replicate_comments(&room_id, epoch, base, delta)
                        .await
                }
                CopyKind::Change { base, state } => {
                    replicator
                        .replicate_change(&room_id, epoch, base, state)
                        .await
                }
                CopyKind::Full(state) => replicator.replicate(&room_id, epoch, state).await,
            };
            let _ = tx.send(outcome);
            let _ = myself.cast(RoomMsg::CopyDone { flight });
        });
        metrics::histogram!("chorus_comment_batch_size").record(batch.len() as f64);
        self.commits.in_flight = Some(InFlight {
            flight,
            revision,
            comments: self.core.comment_count(),
            kind: label,
            full_polls,
            done,
            batch,
        });
    }

    /// Waits for the copy on its way, then broadcasts and acknowledges its comments. A
    /// change the replica would not take is followed by the whole state. If no node took
    /// it, every waiting comment is refused with the error and the room must stop.
    async fn settle_in_flight(&mut self) -> Result<(), RoomError> {
        let Some(flight) = self.commits.in_flight.take() else {
            return Ok(());
        };
        let outcome = flight
            .done
            .await
            .unwrap_or_else(|_| Err(DirectoryError::Replication("the copy's task ended".into())));
        let copied = match outcome {
            Ok(()) => {
                if flight.revision != self.replicated_revision {
                    metrics::counter!("chorus_room_copies_total", "kind" => flight.kind)
                        .increment(1);
                }
                if flight.revision > self.replicated_revision {
                    self.replicated_revision = flight.revision;
                    self.replicated_comments = flight.comments;
                }
                if let Some(polls) = flight.full_polls {
                    self.replicated_polls = Some(polls);
                }
                Ok(())
            }
            Err(error) if flight.full_polls.is_none() => {
                tracing::debug!(room = %self.core.definition().room_id, %error, "change not taken; replicating the whole state");
                self.replicated_polls = None;
                self.replicate().await
            }
            Err(error) => {
                tracing::warn!(room = %self.core.definition().room_id, epoch = self.epoch, %error, "room state not replicated");
                metrics::counter!("chorus_room_fail_stops_total").increment(1);
                Err(RoomError::Unavailable(error.to_string()))
            }
        };
        if let Err(error) = copied {
            for pending in flight.batch {
                let _ = pending.reply.send(Err(error.clone()));
            }
            for pending in self.commits.queued.drain(..) {
                let _ = pending.reply.send(Err(error.clone()));
            }
            return Err(error);
        }
        if self.replicated_revision == self.core.revision() {
            self.core.vote_delta_replicated();
        }
        // The broadcasts before the answers: an author sees its own comment no later than
        // the response. The batch's broadcasts go out together (one write per listener).
        let mut effects = Vec::new();
        let mut replies = Vec::with_capacity(flight.batch.len());
        for pending in flight.batch {
            effects.extend(pending.effects);
            replies.push((pending.reply, pending.result));
        }
        self.execute_effect_list(effects, None).await;
        for (reply, result) in replies {
            let _ = reply.send(result);
        }
        Ok(())
    }

    /// Replicates, broadcasts and acknowledges every comment applied so far.
    async fn settle_comments(&mut self, myself: &ActorRef<RoomMsg>) -> Result<(), RoomError> {
        while !self.commits.is_idle() {
            self.start_copy(myself);
            self.settle_in_flight().await?;
        }
        Ok(())
    }
}

/// A change could not be replicated: its caller gets `error` and the room stops here
/// (fail-stop); the next activation continues from the replicated state.
fn fail_stop<T>(
    myself: &ActorRef<RoomMsg>,
    reply: RpcReplyPort<Result<T, RoomError>>,
    error: RoomError,
) -> Result<(), ActorProcessingErr> {
    let _ = reply.send(Err(error));
    myself.stop(Some("replication failed".into()));
    Ok(())
}

impl RoomShell {
    /// Replicates a change the caller is about to make visible or acknowledge, if it made
    /// one (`changed`).
    async fn replicate_change(&mut self, changed: bool) -> Result<(), RoomError> {
        if changed {
            self.replicate().await
        } else {
            Ok(())
        }
    }

    /// Replicates the durable state (see [`DurableSink`]); on failure the room must stop
    /// (fail-stop) and the caller's change is refused.
    async fn replicate(&mut self) -> Result<(), RoomError> {
        let Some(replicator) = self.replicator.clone() else {
            return Ok(());
        };
        let room_id = self.core.definition().room_id.clone();
        let polls_version = self.core.polls_version();
        if self.replicated_polls == Some(polls_version) {
            // The polls are as last replicated: send the rest only, against the revision
            // the replica holds (a replica out of step refuses; the whole state follows).
            let change = self.core.durable_without_polls();
            let base = self.replicated_revision;
            match replicator
                .replicate_change(&room_id, self.epoch, base, change)
                .await
            {
                Ok(()) => {
                    metrics::counter!("chorus_room_copies_total", "kind" => "change").increment(1);
                    self.replicated_revision = self.core.revision();
                    self.replicated_comments = self.core.comment_count();
                    self.replicated_comments = self.core.comment_count();
                    self.core.vote_delta_replicated();
                    for reply in self.pending_votes.drain(..) {
                        let _ = reply.send(Ok(()));
                    }
                    return Ok(());
                }
                Err(error) => {
                    tracing::debug!(room = %room_id, %error, "change not taken; replicating the whole state");
                }
            }
        }
        match replicator
            .replicate(&room_id, self.epoch, self.core.durable())
            .await
        {
            Ok(()) => {
                metrics::counter!("chorus_room_copies_total", "kind" => "full").increment(1);
                self.replicated_revision = self.core.revision();
                self.replicated_polls = Some(polls_version);
                // The whole state holds every vote so far: they are safe now.
                self.core.vote_delta_replicated();
                for reply in self.pending_votes.drain(..) {
                    let _ = reply.send(Ok(()));
                }
                Ok(())
            }
            Err(error) => {
                tracing::warn!(room = %room_id, epoch = self.epoch, %error, "room state not replicated");
                metrics::counter!("chorus_room_fail_stops_total").increment(1);
                Err(RoomError::Unavailable(error.to_string()))
            }
        }
    }

    /// Replicates the votes since the last replication as a delta (or, if the delta
    /// cannot be applied or overflowed, the whole state), then answers their voters.
    async fn flush_votes(&mut self) -> Result<(), RoomError> {
        let Some((base, votes)) = self.core.take_vote_delta() else {
            return self.replicate().await;
        };
        if votes.is_empty() && self.pending_votes.is_empty() {
            return Ok(());
        }
        let Some(replicator) = &self.replicator else {
            for reply in self.pending_votes.drain(..) {
                let _ = reply.send(Ok(()));
            }
            return Ok(());
        };
        let room_id = self.core.definition().room_id.clone();
        let revision = self.core.revision();
        let count = votes.len();
        match replicator
            .replicate_votes(&room_id, self.epoch, base, revision, votes)
            .await
        {
            Ok(()) => {
                metrics::counter!("chorus_vote_deltas_total").increment(1);
                metrics::counter!("chorus_votes_replicated_total").increment(count as u64);
                self.replicated_revision = revision;
                self.replicated_comments = self.core.comment_count();
                self.replicated_polls = Some(self.core.polls_version());
                for reply in self.pending_votes.drain(..) {
                    let _ = reply.send(Ok(()));
                }
                Ok(())
            }
            Err(error) => {
                tracing::debug!(room = %room_id, %error, "vote delta not taken; replicating the whole state");
                self.replicate().await
            }
        }
    }

    /// Sends `member` the comments after `since` from the recent log, in order.
    fn catch_up(&self, member: &Member, since: u64) {
        let mut sent = 0u64;
        let mut complete = since >= self.core.comment_count();
        for comment in self.core.recent_comments() {
            if comment.comment_id == since + 1 {
                complete = true;
            }
            if comment.comment_id <= since {
                continue;
            }
            match Event::Comment(comment.clone()).encode_body_in(&self.name) {
                Ok(body) => {
                    member.sink.deliver_one(&Arc::new(body));
                    sent += 1;
                }
                Err(error) => tracing::error!(%error, "cannot encode a comment"),
            }
        }
        if !complete {
            metrics::counter!("chorus_catch_up_incomplete_total").increment(1);
            tracing::warn!(room = %self.core.definition().room_id, since, "a re-joining member missed more comments than the recent log holds");
        }
        metrics::counter!("chorus_catch_up_comments_total").increment(sent);
    }

    async fn execute_effects(&mut self) {
        self.execute_effects_to(None).await;
    }

    /// Executes queued effects; broadcasts go to `recipients` if given, else to the
    /// current members.
    async fn execute_effects_to(&mut self, recipients: Option<&[Member]>) {
        let effects = self.core.drain_effects();
        self.execute_effect_list(effects, recipients).await;
    }

    /// Executes `effects` in order; broadcasts go to `recipients` if given, else to the
    /// current members.
    async fn execute_effect_list(
        &mut self,
        effects: Vec<RoomEffect<Member>>,
        recipients: Option<&[Member]>,
    ) {
        // Consecutive broadcasts are fanned out together.
        let mut run: Vec<(Arc<EncodedBody>, bool)> = Vec::new();
        for effect in effects {
            if !matches!(effect, RoomEffect::Broadcast(_)) && !run.is_empty() {
                self.fan_out(&std::mem::take(&mut run), recipients);
            }
            match effect {
                RoomEffect::Broadcast(event) => match event.encode_body_in(&self.name) {
                    Ok(body) => run.push((Arc::new(body), !matches!(event, Event::Speaking(_)))),
                    Err(error) => tracing::error!(%error, "cannot encode room event"),
                },
                RoomEffect::Persist(definition) => {
                    if let Err(error) = self.store.put(&definition).await {
                        tracing::error!(room = %definition.room_id, %error, "cannot persist room");
                    }
                }
                RoomEffect::Notify(members, event) => match event.encode_body() {
                    Ok(body) => {
                        let body = Arc::new(body);
                        for member in &members {
                            member.sink.deliver_one(&body);
                        }
                    }
                    Err(error) => tracing::error!(%error, "cannot encode room event"),
                },
                RoomEffect::NotifyUsers(users, event) => match event.encode_body() {
                    Ok(body) => {
                        if let Some(sink) = &self.replicator {
                            sink.notify_users(users, Arc::new(body));
                        }
                    }
                    Err(error) => tracing::error!(%error, "cannot encode room event"),
                },
                RoomEffect::Export(summary) => match (&self.event_log, &self.analytics) {
                    (Some(log), _) => log.finish(summary),
                    (None, Some(analytics)) => analytics.export(summary, Vec::new(), Vec::new()),
                    (None, None) => {}
                },
                RoomEffect::MembersRemoved(members) => {
                    let room_id = self.core.definition().room_id.clone();
                    for member in members {
                        member.sink.removed_from_room(&room_id);
                    }
                }
            }
        }
        if !run.is_empty() {
            self.fan_out(&run, recipients);
        }
    }

    /// Delivers `bodies` in order to `recipients` (else the current members): once to
    /// each local member and once to each other node with members, all of them to a
    /// member at once. The `logged` ones go to the room's event log first.
    fn fan_out(&self, bodies: &[(Arc<EncodedBody>, bool)], recipients: Option<&[Member]>) {
        let started = Instant::now();
        if let Some(log) = &self.event_log {
            for (body, _) in bodies.iter().filter(|(_, logged)| *logged) {
                log.append(
                    &self.core.definition().room_id,
                    self.epoch,
                    unix_now_ms(),
                    body.kind(),
                    body.body_bytes(chorus_protocol::Encoding::Json).clone(),
                );
            }
        }
        let bodies: Vec<Arc<EncodedBody>> = bodies.iter().map(|(body, _)| body.clone()).collect();
        let mut delivered = 0u64;
        // Bounded by the number of nodes.
        let mut relayed = std::collections::BTreeSet::new();
        let mut deliver = |member: &Member| {
            if let Some(group) = member.sink.relay_group() {
                if !relayed.insert(group) {
                    return;
                }
            }
            member.sink.deliver_all(&bodies);
            delivered += bodies.len() as u64;
        };
        match recipients {
            Some(members) => members.iter().for_each(&mut deliver),
            None => self.core.members().for_each(&mut deliver),
        }
        metrics::histogram!("chorus_fanout_seconds").record(started.elapsed().as_secs_f64());
        metrics::counter!("chorus_fanout_deliveries_total").increment(delivered);
    }

    /// Relays a voice packet if the core lets it through: encoded once, handed to each
    /// local member and to one member per other node.
    fn relay_audio(&mut self, now_ms: u64, member_key: u64, header: AudioHeader, payload: Bytes) {
        let member = Member::lookup(member_key);
        if let Err(drop) = self.core.handle_audio(now_ms, &member, &header) {
            metrics::counter!("chorus_audio_dropped_total", "reason" => drop.label()).increment(1);
            return;
        }
        let Some(speaker) = self.core.member_user(&member) else {
            return;
        };
        let frame = AudioFrame {
            room_id: self.core.definition().room_id.clone(),
            speaker: speaker.to_string(),
            header,
            payload,
        };
        let bytes = match chorus_protocol::audio::encode_frame(&frame) {
            Ok(bytes) => bytes,
            Err(error) => {
                tracing::debug!(%error, "voice frame not relayed");
                metrics::counter!("chorus_audio_dropped_total", "reason" => "too_large")
                    .increment(1);
                return;
            }
        };
        let version = self.core.members_version();
        if self.audio_targets.as_ref().map(|(v, _)| *v) != Some(version) {
            let mut groups = std::collections::BTreeSet::new();
            let targets = self
                .core
                .members()
                .filter(|m| m.sink.relay_group().is_none_or(|g| groups.insert(g)))
                .cloned()
                .collect();
            self.audio_targets = Some((version, targets));
        }
        if let Some((_, targets)) = &self.audio_targets {
            for target in targets {
                target.sink.deliver_audio(&bytes);
            }
            metrics::counter!("chorus_audio_relayed_total").increment(1);
            metrics::counter!("chorus_audio_deliveries_total").increment(targets.len() as u64);
        }
    }

    fn schedule_tick(&mut self, myself: &ActorRef<RoomMsg>, now_ms: u64) {
        let Some(due_ms) = self.core.next_deadline_ms() else {
            return;
        };
        if matches!(self.tick_at_ms, Some(at) if at <= due_ms) {
            return;
        }
        self.tick_at_ms = Some(due_ms);
        let delay = Duration::from_millis(due_ms.saturating_sub(now_ms));
        myself.send_after(delay, || RoomMsg::Tick);
    }
}

/// Why a room could not be found or started.
#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    /// No such room.
    #[error("room {0:?} not found")]
    NotFound(String),
    /// The room has ended.
    #[error("room {0:?} has ended")]
    Ended(String),
    /// A room with this id exists already.
    #[error("room {0:?} exists already")]
    Exists(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The actor could not be started.
    #[error("cannot start room actor: {0}")]
    Spawn(String),
    /// The room could not be activated here (ownership claim refused, ring moved on).
    #[error("room {room:?} cannot be activated here: {reason}")]
    Activation {
        /// The room.
        room: String,
        /// Why.
        reason: String,
    },
    /// A change could not be replicated to another node.
    #[error("replication failed: {0}")]
    Replication(String),
}

/// A room in the directory: running, or being started (created or activated).
enum Slot {
    Running(ActorRef<RoomMsg>),
    /// Someone is starting the room; `done` closes when they finish, either way.
    Starting {
        token: u64,
        done: tokio::sync::watch::Receiver<()>,
    },
}

/// Finds running room actors or starts them from stored definitions.
///
/// The directory's lock is held only to look at or change its map, never across an
/// await: a room being started (its activation may write to Raft and wait on peers) is
/// marked `Starting`, requests for that room wait for it, and every other room, voice
/// lookups included, is found at once.
pub struct RoomDirectory {
    store: Arc<dyn DefinitionStore>,
    replicator: Option<Arc<dyn DurableSink>>,
    analytics: std::sync::OnceLock<Arc<dyn AnalyticsSink>>,
    event_log: std::sync::OnceLock<Arc<dyn EventLog>>,
    config: RoomConfig,
    rooms: std::sync::Mutex<HashMap<String, Slot>>,
    next_token: std::sync::atomic::AtomicU64,
}

/// The right to start one room: held by whoever marked it `Starting`. Dropped unfinished
/// (an error, a cancelled caller), it removes the mark; either way its end wakes the
/// waiters, who look again.
struct StartGuard<'a> {
    directory: &'a RoomDirectory,
    room_id: String,
    token: u64,
    finished: bool,
    _done: tokio::sync::watch::Sender<()>,
}

impl StartGuard<'_> {
    /// The room runs as `actor` from now on.
    fn finish(mut self, actor: ActorRef<RoomMsg>) {
        self.directory
            .map()
            .insert(self.room_id.clone(), Slot::Running(actor));
        self.finished = true;
    }
}

impl Drop for StartGuard<'_> {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let mut rooms = self.directory.map();
        if matches!(rooms.get(&self.room_id), Some(Slot::Starting { token, .. }) if *token == self.token)
        {
            rooms.remove(&self.room_id);
        }
    }
}

/// What a look at the directory found for one room.
enum Lookup<'a> {
    Running(ActorRef<RoomMsg>),
    Wait(tokio::sync::watch::Receiver<()>),
    Start(StartGuard<'a>),
}

impl RoomDirectory {
    /// A directory over `store`.
    pub fn new(
        store: Arc<dyn DefinitionStore>,
        replicator: Option<Arc<dyn DurableSink>>,
        config: RoomConfig,
    ) -> Self {
        RoomDirectory {
            store,
            replicator,
            analytics: std::sync::OnceLock::new(),
            event_log: std::sync::OnceLock::new(),
            config,
            rooms: std::sync::Mutex::new(HashMap::new()),
            next_token: std::sync::atomic::AtomicU64::new(1),
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        self.rooms.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Installs where ended rooms' summaries go (once; later calls are ignored).
    pub fn set_analytics(&self, analytics: Arc<dyn AnalyticsSink>) {
        let _ = self.analytics.set(analytics);
    }

    /// Installs the event log rooms append their broadcasts to (once).
    pub fn set_event_log(&self, log: Arc<dyn EventLog>) {
        let _ = self.event_log.set(log);
    }

    /// The room limits in force.
    pub fn config(&self) -> &RoomConfig {
        &self.config
    }

    /// Looks `room_id` up; when it is neither running nor starting, marks it `Starting`
    /// for the caller (unless `start` is false: then `None`).
    fn lookup(&self, room_id: &str, start: bool) -> Option<Lookup<'_>> {
        let mut rooms = self.map();
        match rooms.get(room_id) {
            Some(Slot::Running(actor)) if actor.get_status() == ractor::ActorStatus::Running => {
                return Some(Lookup::Running(actor.clone()))
            }
            Some(Slot::Starting { done, .. }) => return Some(Lookup::Wait(done.clone())),
            _ => {}
        }
        if !start {
            return None;
        }
        let token = self
            .next_token
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = tokio::sync::watch::channel(());
        rooms.insert(room_id.to_string(), Slot::Starting { token, done: rx });
        Some(Lookup::Start(StartGuard {
            directory: self,
            room_id: room_id.to_string(),
            token,
            finished: false,
            _done: tx,
        }))
    }

    /// Stores a new room's definition and starts its actor.
    pub async fn create(&self, definition: RoomDefinition) -> Result<RoomInfo, DirectoryError> {
        self.create_with(definition, |_| async { Ok(()) }).await
    }

    /// Like [`create`](Self::create), but the new actor is first handed to `activate`
    /// (e.g. to claim ownership) before anyone can reach it; if that fails, the actor is
    /// stopped and the error returned (the definition stays stored).
    pub async fn create_with<F, Fut>(
        &self,
        definition: RoomDefinition,
        activate: F,
    ) -> Result<RoomInfo, DirectoryError>
    where
        F: FnOnce(ActorRef<RoomMsg>) -> Fut,
        Fut: std::future::Future<Output = Result<(), DirectoryError>>,
    {
        let guard = match self.lookup(&definition.room_id, true) {
            Some(Lookup::Start(guard)) => guard,
            _ => return Err(DirectoryError::Exists(definition.room_id)),
        };
        if self.store.get(&definition.room_id)?.is_some() {
            return Err(DirectoryError::Exists(definition.room_id));
        }
        self.store.put(&definition).await?;
        let actor = self.spawn(definition).await?;
        if let Err(error) = activate(actor.clone()).await {
            actor.stop(Some("activation failed".into()));
            return Err(error);
        }
        let info = match ractor::call!(actor, |reply| RoomMsg::Info { reply }) {
            Ok(info) => info,
            Err(error) => {
                actor.stop(Some("no answer after creation".into()));
                return Err(DirectoryError::Spawn(error.to_string()));
            }
        };
        guard.finish(actor);
        Ok(info)
    }

    /// The running actor of `room_id`, started from its stored definition if needed.
    pub async fn get(&self, room_id: &str) -> Result<ActorRef<RoomMsg>, DirectoryError> {
        self.get_with(room_id, |_| async { Ok(()) }).await
    }

    /// Like [`get`](Self::get), but a freshly started actor is first handed to `activate`
    /// (e.g. to claim ownership and re-admit the room's members after its owner moved)
    /// before anyone else can reach it: requests for the room wait until `activate` is
    /// done (requests for other rooms do not). If it fails, the actor is stopped and the
    /// error returned.
    pub async fn get_with<F, Fut>(
        &self,
        room_id: &str,
        activate: F,
    ) -> Result<ActorRef<RoomMsg>, DirectoryError>
    where
        F: FnOnce(ActorRef<RoomMsg>) -> Fut,
        Fut: std::future::Future<Output = Result<(), DirectoryError>>,
    {
        let guard = loop {
            match self.lookup(room_id, true) {
                Some(Lookup::Running(actor)) => return Ok(actor),
                Some(Lookup::Wait(mut done)) => {
                    // Closed when the starter finishes, either way: look again.
                    let _ = done.changed().await;
                }
                Some(Lookup::Start(guard)) => break guard,
                None => unreachable!("lookup with start always answers"),
            }
        };
        let definition = self
            .store
            .get(room_id)?
            .ok_or_else(|| DirectoryError::NotFound(room_id.to_string()))?;
        if definition.state == chorus_protocol::RoomState::Ended {
            return Err(DirectoryError::Ended(room_id.to_string()));
        }
        let actor = self.spawn(definition).await?;
        if let Err(error) = activate(actor.clone()).await {
            actor.stop(Some("activation failed".into()));
            return Err(error);
        }
        guard.finish(actor.clone());
        Ok(actor)
    }

    /// The actor of `room_id` if it runs here (never waits, never starts one: for traffic
    /// that must not start a room, such as voice).
    pub async fn find_running(&self, room_id: &str) -> Option<ActorRef<RoomMsg>> {
        match self.lookup(room_id, false) {
            Some(Lookup::Running(actor)) => Some(actor),
            _ => None,
        }
    }

    /// Whether the actor of `room_id` runs here now (never waits).
    pub fn is_running(&self, room_id: &str) -> bool {
        matches!(self.lookup(room_id, false), Some(Lookup::Running(_)))
    }

    /// The running room actors (a snapshot).
    pub async fn running_actors(&self) -> Vec<(String, ActorRef<RoomMsg>)> {
        self.map()
            .iter()
            .filter_map(|(id, slot)| match slot {
                Slot::Running(actor) => Some((id.clone(), actor.clone())),
                Slot::Starting { .. } => None,
            })
            .collect()
    }

    /// Number of running room actors.
    pub async fn running(&self) -> usize {
        self.map()
            .values()
            .filter(|slot| matches!(slot, Slot::Running(_)))
            .count()
    }

    /// Stops the running rooms for which `keep` is false (ownership moved away): this node
    /// stops acting for them. Rooms still starting are left to their activation (which
    /// checks ownership itself).
    pub async fn stop_unless(&self, keep: impl Fn(&str) -> bool) -> usize {
        let mut rooms = self.map();
        let moved: Vec<String> = rooms
            .iter()
            .filter(|(id, slot)| matches!(slot, Slot::Running(_)) && !keep(id))
            .map(|(id, _)| id.clone())
            .collect();
        for room_id in &moved {
            if let Some(Slot::Running(actor)) = rooms.remove(room_id) {
                actor.stop(Some("ownership moved".into()));
            }
        }
        moved.len()
    }

    /// Stops the actor of `room_id` and lets it go if no one is in the room; the room's
    /// state stays stored and the next request for it starts it again. Whether it was
    /// released. (A request that found the actor just before may then get no answer and
    /// is retried by its client, which starts the room again.)
    pub async fn release_if_empty(&self, room_id: &str, timeout: std::time::Duration) -> bool {
        let Some(Lookup::Running(actor)) = self.lookup(room_id, false) else {
            return false;
        };
        let info = actor
            .call(|reply| RoomMsg::Info { reply }, Some(timeout))
            .await;
        let empty = matches!(
            info,
            Ok(ractor::rpc::CallResult::Success(ref info)) if info.listener_count == 0
        );
        if !empty {
            return false;
        }
        let mut rooms = self.map();
        match rooms.get(room_id) {
            Some(Slot::Running(current)) if current.get_id() == actor.get_id() => {
                rooms.remove(room_id);
                actor.stop(Some("idle: no one in the room".into()));
                true
            }
            _ => false,
        }
    }

    /// Stops every room actor (shutdown).
    pub async fn stop_all(&self) {
        let rooms = std::mem::take(&mut *self.map());
        for (_, slot) in rooms {
            if let Slot::Running(actor) = slot {
                actor.stop(Some("node shutting down".into()));
            }
        }
    }

    async fn spawn(&self, definition: RoomDefinition) -> Result<ActorRef<RoomMsg>, DirectoryError> {
        let (actor, _handle) = Actor::spawn(
            None,
            RoomActor,
            RoomArgs {
                definition,
                config: self.config.clone(),
                store: self.store.clone(),
                replicator: self.replicator.clone(),
                analytics: self.analytics.get().cloned(),
                event_log: self.event_log.get().cloned(),
            },
        )
        .await
        .map_err(|e| DirectoryError::Spawn(e.to_string()))?;
        Ok(actor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    use crate::room::RoomConfig;

    /// Definitions in memory.
    struct Definitions;

    impl DefinitionStore for Definitions {
        fn get(&self, _room_id: &str) -> Result<Option<RoomDefinition>, StoreError> {
            Ok(None)
        }
        fn put<'a>(
            &'a self,
            _definition: &'a RoomDefinition,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), StoreError>> + Send + 'a>>
        {
            Box::pin(async { Ok(()) })
        }
    }

    /// A replica that takes a copy only when the test lets one through.
    struct GatedReplica {
        gate: tokio::sync::Semaphore,
        copies: AtomicUsize,
        deltas: AtomicUsize,
    }

    impl GatedReplica {
        async fn take(&self) -> Result<(), DirectoryError> {
            self.gate
                .acquire()
                .await
                .map_err(|e| DirectoryError::Replication(e.to_string()))?
                .forget();
            self.copies.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    impl DurableSink for GatedReplica {
        fn replicate<'a>(
            &'a self,
            _room_id: &'a str,
            _epoch: u64,
            _durable: RoomDurable,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<(), DirectoryError>> + Send + 'a>,
        > {
            Box::pin(self.take())
        }

        fn replicate_comments<'a>(
            &'a self,
            _room_id: &'a str,
            _epoch: u64,
            _base_revision: u64,
            _delta: CommentsDelta,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<(), DirectoryError>> + Send + 'a>,
        > {
            self.deltas.fetch_add(1, Ordering::SeqCst);
            Box::pin(self.take())
        }
    }

    /// Records the ids of the comments delivered to a member.
    #[derive(Default)]
    struct Seen(Mutex<Vec<u64>>);

    impl MemberSink for Seen {
        fn deliver(&self, body: &Arc<EncodedBody>) {
            if body.kind() == "room.comment" {
                let json: serde_json::Value =
                    serde_json::from_slice(body.body_bytes(chorus_protocol::Encoding::Json))
                        .expect("json body");
                let id = json["comment_id"].as_u64().expect("comment id");
                self.0.lock().unwrap().push(id);
            }
        }
        fn removed_from_room(&self, _room_id: &str) {}
    }

    fn seen(sink: &Seen) -> Vec<u64> {
        sink.0.lock().unwrap().clone()
    }

    async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn comments_wait_for_their_copy_go_together_and_past_capacity_are_refused_at_once() {
        let config = RoomConfig {
            recent_comments_max: 4,
            comment_burst: 1_000,
            comment_rate_per_sec: 1_000,
            ..RoomConfig::default()
        };
        let definition = RoomDefinition::new(
            "r-1".into(),
            "t",
            "host".into(),
            None,
            unix_now_ms(),
            &config,
        )
        .expect("definition");
        let replica = Arc::new(GatedReplica {
            gate: tokio::sync::Semaphore::new(0),
            copies: AtomicUsize::new(0),
            deltas: AtomicUsize::new(0),
        });
        // Copies go through freely until the first comment is acknowledged.
        replica.gate.add_permits(10);
        let (room, _handle) = Actor::spawn(
            None,
            RoomActor,
            RoomArgs {
                definition,
                config,
                store: Arc::new(Definitions),
                replicator: Some(replica.clone()),
                analytics: None,
                event_log: None,
            },
        )
        .await
        .expect("room starts");
        let sink = Arc::new(Seen::default());
        let member = Member::new(1, sink.clone());
        let joined = ractor::call!(room, |reply| RoomMsg::Join {
            member: member.clone(),
            user: "host".into(),
            since: None,
            reply,
        })
        .expect("call");
        joined.expect("joins");
        // The first copy (the whole state) goes through: from then on comments go as
        // deltas, and the gate closes.
        let comment = |text: &str| {
            let (room, member, text) = (room.clone(), member.clone(), text.to_string());
            tokio::spawn(async move {
                ractor::call!(room, |reply| RoomMsg::Comment {
                    member,
                    text,
                    request_id: None,
                    deadline_ms: None,
                    reply,
                })
                .expect("call")
            })
        };
        let first = tokio::time::timeout(Duration::from_secs(5), comment("first"))
            .await
            .expect("first in time")
            .expect("task")
            .expect("acknowledged");
        assert_eq!(first.comment_id, 1);
        assert_eq!(seen(&sink), vec![1]);
        replica
            .gate
            .forget_permits(replica.gate.available_permits());
        let copies = replica.copies.load(Ordering::SeqCst);
        let deltas = replica.deltas.load(Ordering::SeqCst);

        // One copy on its way (comment 2), and four comments behind it: none is seen or
        // answered before its copy is taken.
        let mut waiting = vec![comment("c2")];
        wait_for("the next copy to start", || {
            replica.deltas.load(Ordering::SeqCst) == deltas + 1
        })
        .await;
        for i in 3..=6 {
            waiting.push(comment(&format!("c{i}")));
        }
        // The queue holds a copy's worth (recent_comments_max, 4): the next is refused at
        // once, without waiting for any copy.
        let refused = tokio::time::timeout(Duration::from_secs(5), comment("one too many"))
            .await
            .expect("refusal in time")
            .expect("task");
        assert!(
            matches!(refused, Err(RoomError::Unavailable(_))),
            "{refused:?}"
        );
        assert_eq!(seen(&sink), vec![1]);
        assert!(waiting.iter().all(|w| !w.is_finished()));

        // Let the copies through: comment 2 alone, then 3-6 together in one copy.
        replica.gate.add_permits(2);
        let mut ids = Vec::new();
        for w in waiting {
            ids.push(w.await.expect("task").expect("acknowledged").comment_id);
        }
        assert_eq!(ids, vec![2, 3, 4, 5, 6]);
        assert_eq!(seen(&sink), vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(replica.copies.load(Ordering::SeqCst), copies + 2);
        assert_eq!(replica.deltas.load(Ordering::SeqCst), deltas + 2);
        room.stop(None);
    }
}
