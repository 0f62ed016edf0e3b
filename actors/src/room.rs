//! The room core: lifecycle, membership, stage, comments, polls, reactions, bullet
//! comments, voice order, presence and totals of one live audio room (SPEC R1-R11, Q6),
//! sans-IO.
//!
//! [`RoomCore`] is a plain struct. Each `handle_*` method takes the caller's clock
//! (`now_ms`), validates, changes state, answers with a result and queues
//! [`RoomEffect`]s (broadcast an event, persist the definition, tell removed members) that
//! the actor shell drains with [`RoomCore::drain_effects`] and executes in order. Timers are
//! the shell's job too: it calls [`RoomCore::handle_tick`] at
//! [`RoomCore::next_deadline_ms`].
//!
//! This module does not know sessions, sockets, actors, Raft or the clock. Members are
//! opaque handles `M` (the shell's session handle; `u64` in tests) that belong to a user:
//! one user may be present through several members (devices, SPEC P7). The stage (R2-R5:
//! roles, hands, invitations, mutes, kicks and blocks) is [`RoomStage`]. With the comment
//! count, the recent comments, the polls with every vote (R8), the totals and the answered
//! request ids it forms the durable state ([`RoomDurable`]), whose revision counts changes;
//! the shell copies it to another node before a change is acknowledged (`room_actor`).
//!
//! **Invariant:** a room's comments get ids 1, 2, 3, … in the order the core handles them.
//! The comment count (as the poll list for poll ids) is durable, so no id is handed out
//! twice. A comment request runs at most once per request id (the last
//! [`RoomConfig::request_ids_max`] are remembered, for
//! [`RoomConfig::request_ids_window_ms`]), and not at all once its deadline has passed.
//!
//! Costs: a join or leave is O(log members) and never broadcasts by itself; the listener
//! count is pushed from [`RoomCore::handle_tick`] at most once per
//! [`RoomConfig::listener_count_interval_ms`] (R9), naming who came and went only while
//! the room holds at most [`RoomConfig::presence_users_max`] users; the user list is read
//! in pages (`room.members`). Hands and invitations reach only the host, the moderators and
//! the user concerned. Reactions are counted per window and pushed once per window (R7).
//! Bullet comments (Q6) go through the room's [`BulletGate`]: candidates in, one
//! `room.bullets` broadcast per window out.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use chorus_protocol::audio::AudioHeader;
use chorus_protocol::{
    BulletsEvent, CommentEvent, ErrorCode, Event, ListenersEvent, MemberInfo, PollInfo,
    ReactionsEvent, Role, RoomCommentResponse, RoomEndedEvent, RoomId, RoomInfo,
    RoomInvitationEvent, RoomJoinResponse, RoomLiveEvent, RoomMembersResponse, RoomState,
    RoomSummary, SpeakingEvent, StageAction, StageEvent, StageInfo, UserId,
};
use serde::{Deserialize, Serialize};

use crate::bullets::{Bullet, BulletConfig, BulletGate};
use crate::polls::{PollConfig, PollRefusal, Polls, VoteRecord};
use crate::rate::TokenBucket;
use crate::totals::RoomTotals;
use crate::voice::{AudioDrop, VoiceConfig, VoiceState};

/// Users one `room.invite_users` may name.
pub const INVITE_USERS_MAX: usize = 100;
/// Longest user id an invitation may name, in bytes.
pub const USER_ID_BYTES_MAX: usize = 256;

/// Effects queued and not yet drained. The shell drains after every call, so a handful is
/// normal; more means the shell forgot to drain ([`RoomCore::check_invariants`] asserts it).
pub const EFFECTS_PENDING_MAX: usize = 4096;

/// Above this many members, [`RoomCore::check_invariants`] skips its O(members)
/// cross-checks (members against per-user counts) so debug builds of large rooms do not
/// turn every join into a full scan; the O(1) checks still run.
pub const INVARIANTS_MEMBERS_SCAN_MAX: usize = 1_000;

/// Limits and timings of a room. Defaults match the protocol notes (`docs/protocol.md`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RoomConfig {
    /// Comments kept for joiners (the join response carries them, oldest first). Default
    /// 50. Bigger means more context for joiners and a bigger join response. It is also
    /// how many comments may wait for the next copy to another node; past them a comment
    /// is refused at once with `5001`.
    pub recent_comments_max: usize,
    /// Longest title, in characters (Unicode scalar values) after trimming. Default 200.
    pub title_chars_max: usize,
    /// Longest comment, in characters (Unicode scalar values) after trimming. Default 500.
    pub comment_chars_max: usize,
    /// Longest emoji, in bytes of UTF-8. Default 16.
    pub emoji_bytes_max: usize,
    /// Distinct emojis counted in one reaction window; a reaction with a new emoji beyond it
    /// is refused as rate limited until the window closes. Default 64. Bounds the size of a
    /// `room.reactions` notification.
    pub reaction_emojis_max: usize,
    /// Length of a reaction aggregation window, in milliseconds. Default 200. Longer means
    /// fewer notifications and later ones.
    pub reaction_window_ms: u64,
    /// Least time between two `room.listeners` pushes, in milliseconds. Default 1000.
    pub listener_count_interval_ms: u64,
    /// Comments a user may post per second, sustained (shared by all the user's devices).
    /// Default 5.
    pub comment_rate_per_sec: u32,
    /// Comments a user may post in a burst before the sustained rate applies. Default 10.
    pub comment_burst: u32,
    /// Members (sessions) in the room at once; joins beyond it are refused with
    /// [`RoomError::RoomFull`]. Default 1,000,000.
    pub members_max: usize,
    /// Users whose comment rate is tracked at once. Beyond it the least recently active
    /// user's bucket is dropped, which lets that user burst again; harmless as long as a
    /// bucket is dropped only after `comment_burst / comment_rate_per_sec` seconds of
    /// inactivity (then it was full anyway). Default 100,000.
    pub comment_rate_users_max: usize,
    /// Moderators besides the host. Default 50.
    pub moderators_max: usize,
    /// Speakers on stage besides the host and moderators; accepting an invitation beyond
    /// it is refused. Default 50.
    pub speakers_max: usize,
    /// Raised hands waiting; raising one beyond it is refused. Default 1,000.
    pub hands_max: usize,
    /// Open invitations to speak. Default 100.
    pub invited_max: usize,
    /// Users blocked from the room. Default 10,000.
    pub blocked_max: usize,
    /// Rooms of at most this many users name who came and went in their `room.listeners`
    /// pushes; bigger rooms push the count alone, so a join costs every member O(1) (R9).
    /// Default 100.
    pub presence_users_max: usize,
    /// Most users in one `room.members` page. Default 100.
    pub members_page_max: usize,
    /// Users interested in a scheduled room (R1); marking interest beyond it is refused.
    /// Default 10,000.
    pub interested_max: usize,
    /// How long an ended room's data is kept (its definition, for `room_ended` answers,
    /// and its replicated state), in milliseconds. Default 259,200,000 (72 h, R10).
    pub ended_retention_ms: u64,
    /// Voice relay: active-speaker announcements and per-speaker order (R11).
    pub voice: VoiceConfig,
    /// Polls: counts, text bounds, tally rate (R8).
    pub polls: PollConfig,
    /// Bullet comments: the room's rate and window, text bounds, per-user rate and
    /// blocklist (Q6; the last three are applied by the edge node).
    pub bullets: BulletConfig,
    /// Comment request ids remembered (with the answer given), so that a request that
    /// arrives again (a client's retry, a retry on a new owner) is answered, not run
    /// twice. They are part of the durable state. Default 512; beyond it the oldest is
    /// forgotten.
    pub request_ids_max: usize,
    /// How long a request id is remembered, in milliseconds. Default 30,000: three times
    /// the edge's request deadline, after which a repeat is refused anyway.
    pub request_ids_window_ms: u64,
}

impl Default for RoomConfig {
    fn default() -> Self {
        RoomConfig {
            recent_comments_max: 50,
            title_chars_max: 200,
            comment_chars_max: 500,
            emoji_bytes_max: 16,
            reaction_emojis_max: 64,
            reaction_window_ms: 200,
            listener_count_interval_ms: 1_000,
            comment_rate_per_sec: 5,
            comment_burst: 10,
            members_max: 1_000_000,
            comment_rate_users_max: 100_000,
            moderators_max: 50,
            speakers_max: 50,
            hands_max: 1_000,
            invited_max: 100,
            blocked_max: 10_000,
            presence_users_max: 100,
            members_page_max: 100,
            interested_max: 10_000,
            ended_retention_ms: 72 * 3_600_000,
            voice: VoiceConfig::default(),
            polls: PollConfig::default(),
            bullets: BulletConfig::default(),
            request_ids_max: 512,
            request_ids_window_ms: 30_000,
        }
    }
}

/// Why a room request was refused. Each variant maps to a stable wire code
/// ([`RoomError::code`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoomError {
    /// The member is not in the room.
    #[error("not a member of the room")]
    NotInRoom,
    /// The room has ended; nothing but reading its info is possible.
    #[error("the room has ended")]
    RoomEnded,
    /// The user may not do this (e.g. end a room they do not host).
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// An argument is out of range (empty title, comment too long, bad emoji, …).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The user posts faster than the room allows; retry later.
    #[error("rate limited, retry later")]
    RateLimited,
    /// The room holds [`RoomConfig::members_max`] members already.
    #[error("the room is full")]
    RoomFull,
    /// The room cannot take the change now (e.g. it could not be replicated); the change
    /// was not made visible. Retry later.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The request reached the room after its deadline and was not run.
    #[error("the request's deadline passed before it reached the room; it was not run")]
    DeadlineExceeded,
}

impl RoomError {
    /// The stable error code a client sees.
    pub fn code(&self) -> ErrorCode {
        match self {
            RoomError::NotInRoom => ErrorCode::NotInRoom,
            RoomError::RoomEnded => ErrorCode::RoomEnded,
            RoomError::Forbidden(_) => ErrorCode::Forbidden,
            RoomError::InvalidArgument(_) => ErrorCode::InvalidArgument,
            RoomError::RateLimited => ErrorCode::RateLimited,
            RoomError::RoomFull | RoomError::Unavailable(_) => ErrorCode::Unavailable,
            RoomError::DeadlineExceeded => ErrorCode::DeadlineExceeded,
        }
    }
}

/// What must survive the room's owner: persisted (and replicated) whenever it changes, and
/// enough to rebuild a [`RoomCore`] on another node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomDefinition {
    /// The room's id.
    pub room_id: RoomId,
    /// Title, trimmed, 1 to [`RoomConfig::title_chars_max`] characters.
    pub title: String,
    /// The creator; the only user with the host role.
    pub host: UserId,
    /// Scheduled start, ms since the epoch, if the room was created with one.
    #[serde(default)]
    pub scheduled_start_ms: Option<u64>,
    /// Creation time, ms since the epoch.
    pub created_at_ms: u64,
    /// Lifecycle state.
    pub state: RoomState,
    /// When the room ended, ms since the epoch; set exactly when `state` is `Ended`.
    #[serde(default)]
    pub ended_at_ms: Option<u64>,
    /// When it went live, ms since the epoch (at creation for a room created live).
    #[serde(default)]
    pub started_at_ms: Option<u64>,
}

impl RoomDefinition {
    /// Validates a new room: the title is trimmed and must hold 1 to `title_chars_max`
    /// characters and no control characters; `room_id` and `host` must not be empty. The
    /// room is `Scheduled` if `scheduled_start_ms` is after `now_ms`, else `Live`.
    pub fn new(
        room_id: RoomId,
        title: &str,
        host: UserId,
        scheduled_start_ms: Option<u64>,
        now_ms: u64,
        config: &RoomConfig,
    ) -> Result<Self, RoomError> {
        if room_id.is_empty() {
            return Err(RoomError::InvalidArgument("empty room id".into()));
        }
        if host.is_empty() {
            return Err(RoomError::InvalidArgument("empty host user id".into()));
        }
        let title = title.trim();
        if title.is_empty() {
            return Err(RoomError::InvalidArgument("empty title".into()));
        }
        if exceeds_chars(title, config.title_chars_max) {
            return Err(RoomError::InvalidArgument(format!(
                "title longer than {} characters",
                config.title_chars_max
            )));
        }
        if title.chars().any(char::is_control) {
            return Err(RoomError::InvalidArgument(
                "title contains control characters".into(),
            ));
        }
        let state = match scheduled_start_ms {
            Some(start_ms) if start_ms > now_ms => RoomState::Scheduled,
            _ => RoomState::Live,
        };
        Ok(RoomDefinition {
            room_id,
            title: title.to_string(),
            host,
            scheduled_start_ms,
            created_at_ms: now_ms,
            state,
            ended_at_ms: None,
            started_at_ms: (state == RoomState::Live).then_some(now_ms),
        })
    }
}

/// Something the shell must do, in queue order.
///
/// A `Broadcast` goes to the room's members as of its place in the queue: the shell keeps
/// its fan-out set in step by applying `MembersRemoved` when it reaches it. So the
/// `room.ended` broadcast queued by [`RoomCore::handle_end`] still reaches every member,
/// and the `MembersRemoved` right after it then detaches them.
#[derive(Debug, Clone, PartialEq)]
pub enum RoomEffect<M> {
    /// Send this notification to every member.
    Broadcast(Event),
    /// Store (and replicate) this definition, replacing the previous one.
    Persist(RoomDefinition),
    /// These members were removed by the room (it ended, or their user was kicked or
    /// blocked): tell their sessions they are no longer in it.
    MembersRemoved(Vec<M>),
    /// Send this notification to these members only (the host and moderators, and the
    /// user concerned): hands and invitations.
    Notify(Vec<M>, Event),
    /// Send this notification to these users on every node, members or not (the users
    /// interested in a scheduled room that went live).
    NotifyUsers(Vec<UserId>, Event),
    /// The room ended: export its summary (the analytics sink).
    Export(RoomSummary),
}

/// Reactions counted since the window opened.
#[derive(Debug, Clone)]
struct ReactionWindow {
    closes_at_ms: u64,
    /// At most `reaction_emojis_max` entries.
    counts: BTreeMap<String, u64>,
}

/// Per-user comment buckets, bounded by `comment_rate_users_max`, least recently used
/// evicted first.
#[derive(Debug, Clone, Default)]
struct CommentLimiter {
    /// User → (bucket, use stamp of its latest use).
    buckets: BTreeMap<UserId, (TokenBucket, u64)>,
    /// Use stamp → user; the first entry is the least recently used.
    recency: BTreeMap<u64, UserId>,
    /// Next use stamp: a counter, not the clock, so a clock stepping back cannot reorder.
    use_next: u64,
}

impl CommentLimiter {
    fn try_take(&mut self, user: &str, now_ms: u64, config: &RoomConfig) -> bool {
        let stamp = self.use_next;
        self.use_next += 1;
        let granted = match self.buckets.get_mut(user) {
            Some((bucket, used)) => {
                self.recency.remove(used);
                *used = stamp;
                bucket.try_take(now_ms)
            }
            None => {
                let mut bucket =
                    TokenBucket::new(config.comment_burst, config.comment_rate_per_sec, now_ms);
                let granted = bucket.try_take(now_ms);
                self.buckets.insert(user.to_string(), (bucket, stamp));
                granted
            }
        };
        self.recency.insert(stamp, user.to_string());
        while self.buckets.len() > config.comment_rate_users_max {
            let Some((_, evicted)) = self.recency.pop_first() else {
                break;
            };
            self.buckets.remove(&evicted);
        }
        granted
    }

    fn clear(&mut self) {
        self.buckets.clear();
        self.recency.clear();
    }
}

/// Who came and went since the last `room.listeners` push.
#[derive(Debug, Clone, Default)]
struct Presence {
    joined: Vec<UserId>,
    left: Vec<UserId>,
    /// The room was too big (or the lists too long) since the last push: no names.
    overflow: bool,
}

impl Presence {
    fn is_empty(&self) -> bool {
        self.joined.is_empty() && self.left.is_empty()
    }

    fn clear(&mut self) {
        self.joined.clear();
        self.left.clear();
        self.overflow = false;
    }

    /// Too many to name since the last push: the next one carries the count alone.
    fn overflow(&mut self) {
        self.joined.clear();
        self.left.clear();
        self.overflow = true;
    }
}

/// The stage: roles, mutes, blocks, raised hands and open invitations. Durable: it is part
/// of [`RoomDurable`], replicated before a change is acknowledged.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomStage {
    /// Moderators besides the host (at most `moderators_max`).
    pub moderators: BTreeSet<UserId>,
    /// Speakers besides the host and moderators (at most `speakers_max`).
    pub speakers: BTreeSet<UserId>,
    /// Muted users on stage.
    pub muted: BTreeSet<UserId>,
    /// Blocked users (at most `blocked_max`), for the room's life.
    pub blocked: BTreeSet<UserId>,
    /// Raised hands, oldest first (at most `hands_max`).
    pub hands: Vec<UserId>,
    /// Listeners invited to speak (at most `invited_max`).
    pub invited: BTreeSet<UserId>,
}

/// A change to the stage, asked by a user (see the protocol's `room.set_role`,
/// `room.hand`, `room.invite`, `room.invite_answer`, `room.mute`, `room.kick`,
/// `room.block`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StageCommand {
    /// Give `user` the role `role`.
    SetRole {
        /// Whose role.
        user: UserId,
        /// The new role.
        role: Role,
    },
    /// Raise or lower the caller's hand.
    Hand {
        /// Raised or lowered.
        raised: bool,
    },
    /// Invite listener `user` to speak.
    Invite {
        /// Who.
        user: UserId,
    },
    /// Answer the caller's invitation.
    InviteAnswer {
        /// Accept or decline.
        accept: bool,
    },
    /// Mute or unmute `user` (the caller's own microphone when `None`).
    Mute {
        /// Whose.
        user: Option<UserId>,
        /// Muted or not.
        muted: bool,
    },
    /// Remove `user` from the room now.
    Kick {
        /// Who.
        user: UserId,
    },
    /// Block or unblock `user`.
    Block {
        /// Who.
        user: UserId,
        /// Blocked or not.
        blocked: bool,
    },
}

impl StageCommand {
    /// Whether `by` does this as itself (its hand, its invitation, its own microphone, its
    /// own role), which needs it in the room; the host and moderators moderate others by
    /// role, present or not (docs/protocol.md §6.10).
    pub fn acts_as_itself(&self, by: &str) -> bool {
        match self {
            StageCommand::Hand { .. } | StageCommand::InviteAnswer { .. } => true,
            StageCommand::Mute { user, .. } => user.as_deref().is_none_or(|u| u == by),
            StageCommand::SetRole { user, .. } => user == by,
            StageCommand::Invite { .. }
            | StageCommand::Kick { .. }
            | StageCommand::Block { .. } => false,
        }
    }
}

/// The part of a room's state that must survive its owner: replicated to another node
/// before a comment or stage change is acknowledged, and handed to the next owner.
/// (Membership is rebuilt from the edges; reaction windows and counters are transient.)
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomDurable {
    /// Changes so far (comments and stage changes): of two copies at one ownership epoch,
    /// the one with the higher revision is the more advanced.
    #[serde(default)]
    pub revision: u64,
    /// Roles, mutes, blocks, hands, invitations.
    #[serde(default)]
    pub stage: RoomStage,
    /// Users interested in the room while it is scheduled (R1).
    #[serde(default)]
    pub interested: BTreeSet<UserId>,
    /// Running totals (R10).
    #[serde(default)]
    pub totals: RoomTotals,
    /// Comments posted so far (the id of the latest).
    pub comment_count: u64,
    /// The latest comments, oldest first, ids consecutive.
    pub recent_comments: Vec<CommentEvent>,
    /// `at_ms` of the latest comment.
    pub comment_latest_at_ms: u64,
    /// Polls with every vote (R8).
    #[serde(default)]
    pub polls: Polls,
    /// Recently answered comment requests, oldest first (see
    /// [`RoomConfig::request_ids_max`]).
    #[serde(default)]
    pub requests: Vec<AnsweredRequest>,
}

impl RoomDurable {
    /// Takes `change` (a state without polls, from [`RoomCore::durable_without_polls`])
    /// over this one, keeping this one's polls.
    pub fn take_change(&mut self, change: RoomDurable) {
        let polls = std::mem::take(&mut self.polls);
        *self = change;
        self.polls = polls;
    }

    /// A copy without the polls (empty there).
    pub fn without_polls(&self) -> RoomDurable {
        RoomDurable {
            revision: self.revision,
            stage: self.stage.clone(),
            interested: self.interested.clone(),
            totals: self.totals.clone(),
            comment_count: self.comment_count,
            recent_comments: self.recent_comments.clone(),
            comment_latest_at_ms: self.comment_latest_at_ms,
            polls: Polls::default(),
            requests: self.requests.clone(),
        }
    }
}

/// What comments changed in a room since a revision at which only comments were posted:
/// the new comments and the requests they answered, and what they leave behind. A copy
/// that holds the room at `base` takes it with [`RoomDurable::take_comments`]; it costs
/// what the new comments cost, not what the room holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommentsDelta {
    /// The revision after the comments.
    pub revision: u64,
    /// The comments, oldest first, ids consecutive after the copy's latest.
    pub comments: Vec<CommentEvent>,
    /// The requests they answered, oldest first.
    pub requests: Vec<AnsweredRequest>,
    /// `at_ms` of the latest comment.
    pub comment_latest_at_ms: u64,
    /// How many recent comments the room keeps after them.
    pub recent_len: usize,
    /// How many answered requests the room remembers after them.
    pub requests_len: usize,
    /// The running totals now (merged, never lowered).
    pub totals: RoomTotals,
}

impl RoomDurable {
    /// Takes the comments of `delta`, which must follow this state's latest comment:
    /// appends them and the requests they answered, and trims both to what the room keeps.
    ///
    /// # Errors
    ///
    /// `Err(())` (nothing changed) if the comments do not continue this state's.
    #[allow(clippy::result_unit_err)]
    pub fn take_comments(&mut self, delta: CommentsDelta) -> Result<(), ()> {
        let follows = delta
            .comments
            .first()
            .is_some_and(|c| c.comment_id == self.comment_count + 1)
            && delta
                .comments
                .windows(2)
                .all(|w| w[1].comment_id == w[0].comment_id + 1)
            && delta.revision >= self.revision + delta.comments.len() as u64;
        if !follows {
            return Err(());
        }
        if let Some(last) = delta.comments.last() {
            self.comment_count = last.comment_id;
        }
        self.revision = delta.revision;
        self.comment_latest_at_ms = self.comment_latest_at_ms.max(delta.comment_latest_at_ms);
        self.recent_comments.extend(delta.comments);
        let drop = self.recent_comments.len().saturating_sub(delta.recent_len);
        self.recent_comments.drain(..drop);
        self.requests.extend(delta.requests);
        let drop = self.requests.len().saturating_sub(delta.requests_len);
        self.requests.drain(..drop);
        self.totals.merge(&delta.totals);
        Ok(())
    }
}

/// A comment request the room has run, remembered so a repeat gets the same answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnsweredRequest {
    /// Who sent it (request ids are per user).
    pub user_id: UserId,
    /// Its id.
    pub request_id: String,
    /// The comment it posted.
    pub comment_id: u64,
    /// When it ran.
    pub at_ms: u64,
}

/// How a comment request is to be run: its id (a repeat gets the first answer) and its
/// deadline (past it, it is not run).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestTerms<'a> {
    /// The request's id, unique for its user.
    pub request_id: Option<&'a str>,
    /// Latest time to run it, ms since the epoch.
    pub deadline_ms: Option<u64>,
}

/// Votes waiting to be replicated as a delta, at most; beyond it the next replication
/// sends the whole state instead.
pub const VOTE_DELTA_MAX: usize = 10_000;

/// One user's members in a room, in order: nearly always one (a user on two devices
/// has two), so a vector sized to them rather than a tree node with room for eleven.
#[derive(Debug, Clone)]
struct MemberSet<M>(Vec<M>);

impl<M: Ord> MemberSet<M> {
    fn new() -> Self {
        MemberSet(Vec::new())
    }

    fn insert(&mut self, member: M) {
        if let Err(at) = self.0.binary_search(&member) {
            self.0.reserve_exact(1);
            self.0.insert(at, member);
        }
    }

    fn remove(&mut self, member: &M) {
        if let Ok(at) = self.0.binary_search(member) {
            self.0.remove(at);
        }
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn iter(&self) -> std::slice::Iter<'_, M> {
        self.0.iter()
    }
}

impl<'a, M> IntoIterator for &'a MemberSet<M> {
    type Item = &'a M;
    type IntoIter = std::slice::Iter<'a, M>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// One room's state and rules. See the module docs.
#[derive(Debug, Clone)]
pub struct RoomCore<M> {
    definition: RoomDefinition,
    config: RoomConfig,
    /// Member → its user. At most `members_max` entries.
    members: BTreeMap<M, UserId>,
    /// User → its members (≥ 1); `users.len()` is the listener count.
    users: BTreeMap<UserId, MemberSet<M>>,
    /// Roles, mutes, blocks, hands, invitations (durable).
    stage: RoomStage,
    /// Users interested while the room is scheduled (durable), at most `interested_max`.
    interested: BTreeSet<UserId>,
    /// Running totals (durable, riding along with replicated changes).
    totals: RoomTotals,
    /// Durable changes so far (see [`RoomDurable::revision`]).
    revision: u64,
    /// Comments posted so far; also the id of the latest comment.
    comment_count: u64,
    /// The latest `recent_comments_max` comments, ids consecutive, oldest first.
    recent_comments: VecDeque<CommentEvent>,
    /// `at_ms` of the latest comment, so comment times never go backwards.
    comment_latest_at_ms: u64,
    /// Answered comment requests, oldest first (durable), at most `request_ids_max`.
    requests: VecDeque<AnsweredRequest>,
    comment_limiter: CommentLimiter,
    reactions: Option<ReactionWindow>,
    /// The listener count last pushed (0 before the first push).
    listeners_pushed_count: u64,
    /// When it was pushed.
    listeners_pushed_at_ms: Option<u64>,
    /// When the count first differed from the pushed one (or someone came or went);
    /// `None` when nothing is to push.
    listeners_changed_at_ms: Option<u64>,
    /// Who came and went since the last push (small rooms only; see
    /// `presence_users_max`), at most `presence_users_max` names in all.
    presence: Presence,
    /// Voice order and active speakers (not durable).
    voice: VoiceState,
    /// Polls (durable).
    polls: Polls,
    /// Votes since the last replication, in order, for a delta (at most
    /// [`VOTE_DELTA_MAX`]; `None` once it overflowed: replicate the whole state).
    vote_delta: Option<Vec<VoteRecord>>,
    /// The revision the vote delta starts from.
    vote_delta_base: u64,
    /// Polls whose tallies changed since their last push.
    polls_dirty: BTreeSet<u64>,
    /// Bumped whenever the polls change (create, vote, close, restore), so the shell
    /// knows whether a replica's polls are still the owner's (then a change is
    /// replicated without them).
    polls_version: u64,
    /// Bullet comments waiting for their window (not durable).
    bullets: BulletGate,
    /// When each poll's tallies were last pushed.
    polls_pushed_at_ms: BTreeMap<u64, u64>,
    /// Bumped whenever a member joins or leaves, so the shell can cache what it derives
    /// from the member set (the voice fan-out targets).
    members_version: u64,
    /// Bounded by the shell draining after every call (see [`EFFECTS_PENDING_MAX`]).
    effects: Vec<RoomEffect<M>>,
}

impl<M: Clone + Ord> RoomCore<M> {
    /// A room with no members, from its (validated or persisted) definition.
    pub fn new(definition: RoomDefinition, config: RoomConfig) -> Self {
        let bullets = BulletGate::new(config.bullets.clone(), 0);
        let core = RoomCore {
            definition,
            config,
            members: BTreeMap::new(),
            users: BTreeMap::new(),
            stage: RoomStage::default(),
            interested: BTreeSet::new(),
            totals: RoomTotals::default(),
            revision: 0,
            comment_count: 0,
            recent_comments: VecDeque::new(),
            comment_latest_at_ms: 0,
            requests: VecDeque::new(),
            comment_limiter: CommentLimiter::default(),
            reactions: None,
            listeners_pushed_count: 0,
            listeners_pushed_at_ms: None,
            listeners_changed_at_ms: None,
            presence: Presence::default(),
            voice: VoiceState::default(),
            polls: Polls::default(),
            vote_delta: Some(Vec::new()),
            vote_delta_base: 0,
            polls_dirty: BTreeSet::new(),
            polls_version: 0,
            polls_pushed_at_ms: BTreeMap::new(),
            bullets,
            members_version: 0,
            effects: Vec::new(),
        };
        core.checked();
        core
    }

    /// The durable part of the state without the polls (empty there): what a change
    /// that left the polls alone replicates. Its cost does not grow with the votes.
    pub fn durable_without_polls(&self) -> RoomDurable {
        RoomDurable {
            revision: self.revision,
            stage: self.stage.clone(),
            interested: self.interested.clone(),
            totals: self.totals.clone(),
            comment_count: self.comment_count,
            recent_comments: self.recent_comments.iter().cloned().collect(),
            comment_latest_at_ms: self.comment_latest_at_ms,
            polls: Polls::default(),
            requests: self.requests.iter().cloned().collect(),
        }
    }

    /// The comments posted since the room was at `base_revision` with `base_comments`
    /// comments, as a delta ([`CommentsDelta`]); `None` when something else changed since
    /// (every revision since is not a comment) or the recent log no longer holds them all.
    pub fn comments_delta(&self, base_revision: u64, base_comments: u64) -> Option<CommentsDelta> {
        let posted = self.comment_count.checked_sub(base_comments)?;
        if posted == 0 || self.revision.checked_sub(base_revision)? != posted {
            return None;
        }
        let comments: Vec<CommentEvent> = self
            .recent_comments
            .iter()
            .filter(|c| c.comment_id > base_comments)
            .cloned()
            .collect();
        if comments.len() as u64 != posted {
            return None;
        }
        let requests = self
            .requests
            .iter()
            .filter(|r| r.comment_id > base_comments)
            .cloned()
            .collect();
        Some(CommentsDelta {
            revision: self.revision,
            comments,
            requests,
            comment_latest_at_ms: self.comment_latest_at_ms,
            recent_len: self.recent_comments.len(),
            requests_len: self.requests.len(),
            totals: self.totals.clone(),
        })
    }

    /// The version of the polls: it changes whenever they do.
    pub fn polls_version(&self) -> u64 {
        self.polls_version
    }

    /// The durable part of the state (see [`RoomDurable`]).
    pub fn durable(&self) -> RoomDurable {
        RoomDurable {
            polls: self.polls.clone(),
            ..self.durable_without_polls()
        }
    }

    /// Continues from a durable state recovered from a previous owner or a replica. Only a
    /// state ahead of the current one is taken (a newly activated room is at 0), so
    /// restoring is idempotent and never goes back.
    pub fn restore_durable(&mut self, now_ms: u64, durable: RoomDurable) {
        self.totals.merge(&durable.totals);
        if (durable.revision, durable.comment_count) <= (self.revision, self.comment_count) {
            return;
        }
        self.revision = durable.revision;
        self.stage = durable.stage;
        self.interested = durable.interested;
        self.polls = durable.polls;
        self.polls_version += 1;
        self.vote_delta = Some(Vec::new());
        self.vote_delta_base = self.revision;
        // Members present now who are blocked in the restored state leave.
        let blocked: Vec<UserId> = self
            .users
            .keys()
            .filter(|u| self.stage.blocked.contains(*u))
            .cloned()
            .collect();
        for user in blocked {
            self.remove_user(now_ms, &user);
        }
        let keep = self.config.recent_comments_max;
        let skip = durable.recent_comments.len().saturating_sub(keep);
        let recent: VecDeque<CommentEvent> =
            durable.recent_comments.into_iter().skip(skip).collect();
        // The recent log must end at the count and be consecutive; otherwise keep the count
        // but drop the log (it is a convenience for joiners, the count is the order).
        let consistent = recent.back().map(|c| c.comment_id) == Some(durable.comment_count)
            && recent
                .iter()
                .zip(recent.iter().skip(1))
                .all(|(a, b)| b.comment_id == a.comment_id + 1);
        self.comment_count = durable.comment_count;
        self.comment_latest_at_ms = self.comment_latest_at_ms.max(durable.comment_latest_at_ms);
        let skip = durable
            .requests
            .len()
            .saturating_sub(self.config.request_ids_max);
        self.requests = durable.requests.into_iter().skip(skip).collect();
        self.recent_comments = if consistent { recent } else { VecDeque::new() };
        self.checked();
    }

    /// `member` (a session of `user`) joins. Joining again with the same member is
    /// idempotent and answers the same way. Scheduled rooms may be joined (members wait for
    /// the start); ended rooms may not. The host gets the host role, everyone else listener.
    ///
    /// The listener count is not pushed here: the change makes [`Self::handle_tick`] due.
    pub fn handle_join(
        &mut self,
        now_ms: u64,
        member: M,
        user: &str,
    ) -> Result<RoomJoinResponse, RoomError> {
        self.refuse_if_ended()?;
        if self.stage.blocked.contains(user) {
            return Err(RoomError::Forbidden(
                "you are blocked from this room".into(),
            ));
        }
        match self.members.get(&member) {
            Some(existing) if existing == user => {}
            Some(_) => {
                return Err(RoomError::Forbidden(
                    "this session is in the room as another user".into(),
                ))
            }
            None => {
                if self.members.len() >= self.config.members_max {
                    return Err(RoomError::RoomFull);
                }
                self.members.insert(member.clone(), user.to_string());
                self.members_version += 1;
                let members = self
                    .users
                    .entry(user.to_string())
                    .or_insert_with(MemberSet::new);
                let first = members.is_empty();
                members.insert(member);
                if first {
                    self.note_presence(user, true);
                    self.totals.note_user(user);
                    let listeners = self.listener_count();
                    self.totals.note_listeners(listeners);
                }
                self.note_listener_change(now_ms);
            }
        }
        let response = RoomJoinResponse {
            room: self.info(),
            role: self.role_of(user),
            recent_comments: self.recent_comments.iter().cloned().collect(),
            stage: self.stage_info(user),
            polls: self.polls.infos(&self.definition.room_id),
        };
        self.checked();
        Ok(response)
    }

    /// `member` leaves. The listener count is not pushed here (see [`Self::handle_join`]).
    pub fn handle_leave(&mut self, now_ms: u64, member: &M) -> Result<(), RoomError> {
        self.refuse_if_ended()?;
        let user = self.members.remove(member).ok_or(RoomError::NotInRoom)?;
        self.members_version += 1;
        if let Some(members) = self.users.get_mut(&user) {
            members.remove(member);
            if members.is_empty() {
                self.users.remove(&user);
                // A user who is gone leaves the stage (roles other than speaker stay).
                self.leave_stage(&user);
                self.note_presence(&user, false);
            }
        }
        self.note_listener_change(now_ms);
        self.checked();
        Ok(())
    }

    /// `member` posts a comment: trimmed, 1 to `comment_chars_max` characters, within its
    /// user's rate (shared by all the user's members). It gets the next id in the room's
    /// total order and is broadcast to every member, the sender included.
    pub fn handle_comment(
        &mut self,
        now_ms: u64,
        member: &M,
        text: &str,
    ) -> Result<RoomCommentResponse, RoomError> {
        self.handle_comment_request(now_ms, member, text, RequestTerms::default())
    }

    /// [`Self::handle_comment`] on terms: a request whose id this room has answered
    /// (within `request_ids_window_ms`, among the latest `request_ids_max`) gets the same
    /// answer and posts nothing; a new one past its deadline is refused with
    /// [`RoomError::DeadlineExceeded`] and not run.
    pub fn handle_comment_request(
        &mut self,
        now_ms: u64,
        member: &M,
        text: &str,
        terms: RequestTerms<'_>,
    ) -> Result<RoomCommentResponse, RoomError> {
        self.refuse_if_ended()?;
        let user = self.members.get(member).ok_or(RoomError::NotInRoom)?;
        if let Some(request_id) = terms.request_id {
            if let Some(answered) = self
                .requests
                .iter()
                .rev()
                .find(|r| r.request_id == request_id && &r.user_id == user)
            {
                return Ok(RoomCommentResponse {
                    comment_id: answered.comment_id,
                });
            }
        }
        if terms.deadline_ms.is_some_and(|deadline| now_ms > deadline) {
            return Err(RoomError::DeadlineExceeded);
        }
        let text = text.trim();
        if text.is_empty() {
            return Err(RoomError::InvalidArgument("empty comment".into()));
        }
        if exceeds_chars(text, self.config.comment_chars_max) {
            return Err(RoomError::InvalidArgument(format!(
                "comment longer than {} characters",
                self.config.comment_chars_max
            )));
        }
        // Validate before spending a token: a refused comment costs the user nothing.
        if !self.comment_limiter.try_take(user, now_ms, &self.config) {
            return Err(RoomError::RateLimited);
        }
        self.comment_count += 1;
        self.revision += 1;
        self.comment_latest_at_ms = self.comment_latest_at_ms.max(now_ms);
        let comment = CommentEvent {
            room_id: self.definition.room_id.clone(),
            comment_id: self.comment_count,
            user_id: user.clone(),
            text: text.to_string(),
            at_ms: self.comment_latest_at_ms,
        };
        self.recent_comments.push_back(comment.clone());
        while self.recent_comments.len() > self.config.recent_comments_max {
            self.recent_comments.pop_front();
        }
        if let Some(request_id) = terms.request_id {
            let window_start = now_ms.saturating_sub(self.config.request_ids_window_ms);
            while self
                .requests
                .front()
                .is_some_and(|r| r.at_ms < window_start)
                || self.requests.len() >= self.config.request_ids_max.max(1)
            {
                self.requests.pop_front();
            }
            self.requests.push_back(AnsweredRequest {
                user_id: comment.user_id.clone(),
                request_id: request_id.to_string(),
                comment_id: comment.comment_id,
                at_ms: comment.at_ms,
            });
        }
        self.effects
            .push(RoomEffect::Broadcast(Event::Comment(comment)));
        let response = RoomCommentResponse {
            comment_id: self.comment_count,
        };
        self.checked();
        Ok(response)
    }

    /// `member` reacts with `emoji` (1 to `emoji_bytes_max` bytes, no control characters).
    /// The reaction is counted in the open window, or opens one closing
    /// `reaction_window_ms` from now; the window's counts are broadcast once, from
    /// [`Self::handle_tick`].
    pub fn handle_react(&mut self, now_ms: u64, member: &M, emoji: &str) -> Result<(), RoomError> {
        self.refuse_if_ended()?;
        if !self.members.contains_key(member) {
            return Err(RoomError::NotInRoom);
        }
        check_emoji(&self.config, emoji)?;
        if self.add_reactions(now_ms, emoji, 1) {
            Ok(())
        } else {
            Err(RoomError::RateLimited)
        }
    }

    /// Reactions counted by an edge node over a short batch (its members were checked
    /// there; see [`check_emoji`]): added to the current window. Emojis beyond the
    /// window's `reaction_emojis_max` kinds, and invalid ones, are dropped; returns how
    /// many reactions were.
    ///
    /// # Errors
    ///
    /// [`RoomError::RoomEnded`].
    pub fn handle_react_batch(
        &mut self,
        now_ms: u64,
        counts: &BTreeMap<String, u64>,
    ) -> Result<u64, RoomError> {
        self.refuse_if_ended()?;
        let mut dropped = 0u64;
        for (emoji, count) in counts {
            if *count == 0 {
                continue;
            }
            if check_emoji(&self.config, emoji).is_err()
                || !self.add_reactions(now_ms, emoji, *count)
            {
                dropped = dropped.saturating_add(*count);
            }
        }
        self.checked();
        Ok(dropped)
    }

    /// Adds `count` reactions with `emoji` to the window (opening it if needed); false if
    /// the window has as many kinds as it may and this is a new one.
    fn add_reactions(&mut self, now_ms: u64, emoji: &str, count: u64) -> bool {
        // A window that is already due is closed first, even if the shell's tick is late,
        // so windows never run longer than configured.
        self.close_reaction_window_if_due(now_ms);
        let counted = self.reactions.as_ref().map_or(0, |w| w.counts.len());
        let known = self
            .reactions
            .as_ref()
            .is_some_and(|w| w.counts.contains_key(emoji));
        if !known && counted >= self.config.reaction_emojis_max {
            return false;
        }
        let window_ms = self.config.reaction_window_ms;
        let window = self.reactions.get_or_insert_with(|| ReactionWindow {
            closes_at_ms: now_ms.saturating_add(window_ms),
            counts: BTreeMap::new(),
        });
        if let Some(total) = window.counts.get_mut(emoji) {
            *total = total.saturating_add(count);
        } else {
            window.counts.insert(emoji.to_string(), count);
        }
        self.checked();
        true
    }

    /// Bullet comments an edge node admitted for this room (its members, text rules,
    /// blocklist and per-user rates were checked there; see
    /// [`crate::bullets::BulletFilter`]): each becomes its user's candidate for the
    /// current window. The window's choice is broadcast from [`Self::handle_tick`].
    /// Returns how many were dropped (bad text, window full).
    ///
    /// # Errors
    ///
    /// [`RoomError::RoomEnded`].
    pub fn handle_bullet_batch(
        &mut self,
        now_ms: u64,
        bullets: Vec<Bullet>,
    ) -> Result<u64, RoomError> {
        self.refuse_if_ended()?;
        let mut dropped = 0u64;
        for bullet in bullets {
            if !self.bullets.offer(now_ms, bullet) {
                dropped += 1;
            }
        }
        self.checked();
        Ok(dropped)
    }

    /// The host starts a scheduled room: it goes live and the definition is persisted.
    /// Starting a live room is a no-op.
    pub fn handle_start(&mut self, now_ms: u64, user: &str) -> Result<(), RoomError> {
        self.refuse_if_ended()?;
        self.refuse_unless_host(user, "start")?;
        if self.definition.state == RoomState::Scheduled {
            self.definition.state = RoomState::Live;
            self.definition.started_at_ms = Some(now_ms);
            self.effects
                .push(RoomEffect::Persist(self.definition.clone()));
            let live = Event::Live(RoomLiveEvent {
                room_id: self.definition.room_id.clone(),
                title: self.definition.title.clone(),
                host: self.definition.host.clone(),
            });
            self.effects.push(RoomEffect::Broadcast(live.clone()));
            // Interested users who are in the room have it already.
            let interested: Vec<UserId> = std::mem::take(&mut self.interested)
                .into_iter()
                .filter(|u| !self.users.contains_key(u))
                .collect();
            self.revision += 1;
            if !interested.is_empty() {
                self.effects.push(RoomEffect::NotifyUsers(interested, live));
            }
        }
        self.checked();
        Ok(())
    }

    /// `by` (the host or a moderator, in the room or not) invites `users` (1 to
    /// [`INVITE_USERS_MAX`], deduplicated, the blocked left out) to the room: each gets a
    /// `room.invitation` on its sessions, wherever they are. Not durable: a notice.
    pub fn handle_invite_users(&mut self, by: &str, users: Vec<UserId>) -> Result<(), RoomError> {
        self.refuse_if_ended()?;
        self.refuse_unless(
            self.role_of(by) <= Role::Moderator,
            "only the host and moderators invite users to the room",
        )?;
        if users.is_empty() || users.len() > INVITE_USERS_MAX {
            return Err(RoomError::InvalidArgument(format!(
                "invite 1 to {INVITE_USERS_MAX} users at once"
            )));
        }
        let users: Vec<UserId> = users
            .into_iter()
            .filter(|u| !u.is_empty() && u.len() <= USER_ID_BYTES_MAX)
            .filter(|u| !self.stage.blocked.contains(u))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let invitation = Event::Invitation(RoomInvitationEvent {
            room_id: self.definition.room_id.clone(),
            title: self.definition.title.clone(),
            by: by.to_string(),
            state: self.definition.state,
            scheduled_start_ms: self.definition.scheduled_start_ms,
        });
        if !users.is_empty() {
            self.effects
                .push(RoomEffect::NotifyUsers(users, invitation));
        }
        Ok(())
    }

    /// `user` (in the room or not) marks or unmarks interest in the scheduled room; the
    /// answer is how many are interested. Only a scheduled room takes interest (a live one
    /// is joined). A change moves the revision (durable).
    pub fn handle_interest(&mut self, user: &str, interested: bool) -> Result<u64, RoomError> {
        self.refuse_if_ended()?;
        if self.definition.state != RoomState::Scheduled {
            return Err(RoomError::InvalidArgument(
                "the room is live already: join it".into(),
            ));
        }
        if self.stage.blocked.contains(user) {
            return Err(RoomError::Forbidden(
                "you are blocked from this room".into(),
            ));
        }
        let changed = if interested {
            if !self.interested.contains(user)
                && self.interested.len() >= self.config.interested_max
            {
                return Err(RoomError::Unavailable(format!(
                    "the room has {} interested users already",
                    self.config.interested_max
                )));
            }
            self.interested.insert(user.to_string())
        } else {
            self.interested.remove(user)
        };
        if changed {
            self.revision += 1;
        }
        self.checked();
        Ok(u64::try_from(self.interested.len()).unwrap_or(u64::MAX))
    }

    /// The host ends the room. In order: pending reactions are broadcast, the ended
    /// definition is persisted, `room.ended` is broadcast, and every member is removed
    /// (one [`RoomEffect::MembersRemoved`] listing them, possibly empty).
    pub fn handle_end(&mut self, now_ms: u64, user: &str) -> Result<(), RoomError> {
        self.refuse_if_ended()?;
        self.refuse_unless_host(user, "end")?;
        self.close_reaction_window();
        // Bullets of the open window are not shown: they are passing remarks.
        self.bullets.clear();
        self.definition.state = RoomState::Ended;
        self.definition.ended_at_ms = Some(now_ms);
        self.effects
            .push(RoomEffect::Persist(self.definition.clone()));
        self.effects
            .push(RoomEffect::Broadcast(Event::RoomEnded(RoomEndedEvent {
                room_id: self.definition.room_id.clone(),
                by: user.to_string(),
            })));
        for poll_id in self.polls.close_all(now_ms) {
            self.polls_version += 1;
            self.push_poll(now_ms, poll_id);
        }
        self.effects.push(RoomEffect::Export(self.summary(now_ms)));
        let removed: Vec<M> = std::mem::take(&mut self.members).into_keys().collect();
        self.members_version += 1;
        self.users.clear();
        self.presence.clear();
        self.comment_limiter.clear();
        self.listeners_changed_at_ms = None;
        self.effects.push(RoomEffect::MembersRemoved(removed));
        self.checked();
        Ok(())
    }

    /// Timers: closes the reaction window if due (one `room.reactions` broadcast), closes
    /// the bullet window if due (one `room.bullets` broadcast if any was chosen), and
    /// pushes the listener count if it changed since the last push and
    /// `listener_count_interval_ms` has passed since then. Call it at
    /// [`Self::next_deadline_ms`]; calling it early or late is harmless.
    pub fn handle_tick(&mut self, now_ms: u64) {
        self.close_reaction_window_if_due(now_ms);
        let bullets = self.bullets.tick(now_ms);
        if !bullets.is_empty() {
            self.effects
                .push(RoomEffect::Broadcast(Event::Bullets(BulletsEvent {
                    room_id: self.definition.room_id.clone(),
                    bullets,
                })));
        }
        self.evaluate_speakers(now_ms);
        self.push_due_tallies(now_ms);
        if self.listeners_changed_at_ms.is_some() && now_ms >= self.listeners_push_allowed_at_ms() {
            let count = self.listener_count();
            if count != self.listeners_pushed_count || !self.presence.is_empty() {
                let presence = std::mem::take(&mut self.presence);
                let (joined, left) = if presence.overflow {
                    (Vec::new(), Vec::new())
                } else {
                    (presence.joined, presence.left)
                };
                self.effects
                    .push(RoomEffect::Broadcast(Event::Listeners(ListenersEvent {
                        room_id: self.definition.room_id.clone(),
                        count,
                        joined,
                        left,
                    })));
                self.listeners_pushed_count = count;
                self.listeners_pushed_at_ms = Some(now_ms);
            }
            self.listeners_changed_at_ms = None;
        }
        self.checked();
    }

    /// When the shell should next call [`Self::handle_tick`], ms since the epoch (possibly
    /// already past: call it now); `None` when nothing is pending.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        let reactions = self.reactions.as_ref().map(|w| w.closes_at_ms);
        let listeners = self
            .listeners_changed_at_ms
            .map(|changed_at_ms| changed_at_ms.max(self.listeners_push_allowed_at_ms()));
        let voice = self.voice.next_deadline_ms(&self.config.voice);
        let polls = self
            .polls_dirty
            .iter()
            .map(|id| self.tally_push_allowed_at_ms(*id))
            .min();
        let bullets = self.bullets.next_deadline_ms();
        [reactions, listeners, voice, polls, bullets]
            .into_iter()
            .flatten()
            .min()
    }

    /// A moderator opens a poll (R8): pushed to every member at once.
    ///
    /// # Errors
    ///
    /// [`RoomError::Forbidden`] for anyone but the host and moderators,
    /// [`RoomError::InvalidArgument`] for a bad question or options or too many polls,
    /// [`RoomError::NotInRoom`], [`RoomError::RoomEnded`].
    pub fn handle_poll_create(
        &mut self,
        now_ms: u64,
        by: &str,
        question: &str,
        options: &[String],
    ) -> Result<PollInfo, RoomError> {
        self.refuse_unless_moderating(by, "create polls")?;
        let poll_id = self
            .polls
            .create(&self.config.polls, now_ms, by, question, options)
            .map_err(poll_error)?
            .poll_id;
        self.revision += 1;
        self.polls_version += 1;
        let info = self.push_poll(now_ms, poll_id);
        self.checked();
        info.ok_or(RoomError::Unavailable("the poll vanished".into()))
    }

    /// A member votes (again, to change its vote); tallies are pushed at most once per
    /// `tally_interval_ms`. `Ok(true)` if the vote changed anything: it must be replicated
    /// ([`Self::take_vote_delta`]) before it is acknowledged.
    ///
    /// # Errors
    ///
    /// [`RoomError::NotInRoom`], [`RoomError::RoomEnded`], [`RoomError::InvalidArgument`]
    /// (no such poll, closed, bad option).
    pub fn handle_vote(
        &mut self,
        now_ms: u64,
        member: &M,
        poll_id: u64,
        option: u32,
    ) -> Result<bool, RoomError> {
        self.refuse_if_ended()?;
        let user = self
            .members
            .get(member)
            .ok_or(RoomError::NotInRoom)?
            .clone();
        if !self
            .polls
            .vote(&user, poll_id, option)
            .map_err(poll_error)?
        {
            return Ok(false);
        }
        self.revision += 1;
        self.polls_version += 1;
        if let Some(delta) = &mut self.vote_delta {
            if delta.len() < VOTE_DELTA_MAX {
                delta.push(VoteRecord {
                    poll_id,
                    user,
                    option: option as u8,
                });
            } else {
                self.vote_delta = None;
            }
        }
        self.polls_dirty.insert(poll_id);
        self.push_due_tallies(now_ms);
        self.checked();
        Ok(true)
    }

    /// A moderator closes a poll: the final tallies are pushed at once.
    ///
    /// # Errors
    ///
    /// As [`Self::handle_poll_create`], and [`RoomError::InvalidArgument`] for no such
    /// poll. Closing a closed poll answers its result again.
    pub fn handle_poll_close(
        &mut self,
        now_ms: u64,
        by: &str,
        poll_id: u64,
    ) -> Result<PollInfo, RoomError> {
        self.refuse_unless_moderating(by, "close polls")?;
        let closed = self.polls.close(now_ms, poll_id).map_err(poll_error)?;
        let info = if closed {
            self.revision += 1;
            self.polls_version += 1;
            self.push_poll(now_ms, poll_id)
        } else {
            self.polls
                .polls
                .get(&poll_id)
                .map(|p| p.info(&self.definition.room_id))
        };
        self.checked();
        info.ok_or(RoomError::Unavailable("the poll vanished".into()))
    }

    /// The votes to replicate since the last call, as a delta from revision `.0` to the
    /// current revision; `None` when the delta overflowed (replicate the whole state).
    /// Starts a new delta either way.
    pub fn take_vote_delta(&mut self) -> Option<(u64, Vec<VoteRecord>)> {
        let base = std::mem::replace(&mut self.vote_delta_base, self.revision);
        self.vote_delta
            .replace(Vec::new())
            .map(|delta| (base, delta))
    }

    /// The whole state was replicated: the pending vote delta is in it.
    pub fn vote_delta_replicated(&mut self) {
        self.vote_delta = Some(Vec::new());
        self.vote_delta_base = self.revision;
    }

    /// Broadcasts a poll now; returns it.
    fn push_poll(&mut self, now_ms: u64, poll_id: u64) -> Option<PollInfo> {
        let info = self
            .polls
            .polls
            .get(&poll_id)?
            .info(&self.definition.room_id);
        self.polls_dirty.remove(&poll_id);
        self.polls_pushed_at_ms.insert(poll_id, now_ms);
        self.effects
            .push(RoomEffect::Broadcast(Event::Poll(info.clone())));
        Some(info)
    }

    /// When a poll's tallies may be pushed again: `tally_interval_ms` after the last push
    /// (at once if never pushed).
    fn tally_push_allowed_at_ms(&self, poll_id: u64) -> u64 {
        self.polls_pushed_at_ms
            .get(&poll_id)
            .map_or(0, |at| at + self.config.polls.tally_interval_ms)
    }

    /// Pushes the tallies of changed polls whose interval has passed.
    fn push_due_tallies(&mut self, now_ms: u64) {
        let due: Vec<u64> = self
            .polls_dirty
            .iter()
            .copied()
            .filter(|id| now_ms >= self.tally_push_allowed_at_ms(*id))
            .collect();
        for poll_id in due {
            self.push_poll(now_ms, poll_id);
        }
    }

    /// A voice packet from `member` (R11): `Ok` if the room relays it to every member.
    /// Only a member whose user is on stage (host, moderator, speaker) and not muted, in
    /// a live room, is relayed, and each speaker's packets only in sequence order.
    ///
    /// # Errors
    ///
    /// Why the packet is dropped (no one is told: audio is not acknowledged).
    pub fn handle_audio(
        &mut self,
        now_ms: u64,
        member: &M,
        header: &AudioHeader,
    ) -> Result<(), AudioDrop> {
        if self.definition.state != RoomState::Live {
            return Err(AudioDrop::NotLive);
        }
        let user = self.members.get(member).ok_or(AudioDrop::NotInRoom)?;
        if self.role_of(user) == Role::Listener {
            return Err(AudioDrop::NotOnStage);
        }
        if self.stage.muted.contains(user) {
            return Err(AudioDrop::Muted);
        }
        // Everyone who may be on stage at once.
        let tracks_max = 1 + self.config.moderators_max + self.config.speakers_max;
        let user = user.clone();
        self.voice
            .accept(&self.config.voice, now_ms, &user, header, tracks_max)
    }

    /// Announces the active speakers if they changed and the interval allows.
    fn evaluate_speakers(&mut self, now_ms: u64) {
        if self
            .voice
            .next_deadline_ms(&self.config.voice)
            .is_none_or(|at| at > now_ms)
        {
            return;
        }
        let config = self.config.voice;
        let stage = &self.stage;
        let host = &self.definition.host;
        let users = &self.users;
        let may_speak = |user: &str| {
            users.contains_key(user)
                && !stage.muted.contains(user)
                && (user == host
                    || stage.moderators.contains(user)
                    || stage.speakers.contains(user))
        };
        if let Some(speakers) = self.voice.evaluate(&config, now_ms, may_speak) {
            self.effects
                .push(RoomEffect::Broadcast(Event::Speaking(SpeakingEvent {
                    room_id: self.definition.room_id.clone(),
                    speakers,
                })));
        }
    }

    /// Changes whenever a member joins or leaves (for caches of the member set).
    pub fn members_version(&self) -> u64 {
        self.members_version
    }

    /// Takes the queued effects, oldest first. The shell executes them in this order.
    pub fn drain_effects(&mut self) -> Vec<RoomEffect<M>> {
        std::mem::take(&mut self.effects)
    }

    /// The room as members see it; `listener_count` counts distinct users, right now (not
    /// the last pushed value).
    pub fn info(&self) -> RoomInfo {
        RoomInfo {
            room_id: self.definition.room_id.clone(),
            title: self.definition.title.clone(),
            host: self.definition.host.clone(),
            state: self.definition.state,
            scheduled_start_ms: self.definition.scheduled_start_ms,
            created_at_ms: self.definition.created_at_ms,
            listener_count: self.listener_count(),
            comment_count: self.comment_count,
        }
    }

    /// The members, in `M`'s order.
    pub fn members(&self) -> impl Iterator<Item = &M> {
        self.members.keys()
    }

    /// The user a member belongs to, if it is a member.
    pub fn member_user(&self, member: &M) -> Option<&str> {
        self.members.get(member).map(String::as_str)
    }

    /// How many members (sessions) are in the room.
    pub fn member_count(&self) -> usize {
        self.members.len()
    }

    /// How many distinct users are in the room.
    pub fn listener_count(&self) -> u64 {
        u64::try_from(self.users.len()).unwrap_or(u64::MAX)
    }

    /// Comments posted so far: the id of the latest.
    pub fn comment_count(&self) -> u64 {
        self.comment_count
    }

    /// The latest comments, oldest first (at most `recent_comments_max`).
    pub fn recent_comments(&self) -> impl Iterator<Item = &CommentEvent> {
        self.recent_comments.iter()
    }

    /// The room's definition (what is persisted).
    pub fn definition(&self) -> &RoomDefinition {
        &self.definition
    }

    /// The room's limits and timings.
    pub fn config(&self) -> &RoomConfig {
        &self.config
    }

    /// The role `user` holds in this room.
    pub fn role_of(&self, user: &str) -> Role {
        if user == self.definition.host {
            Role::Host
        } else if self.stage.moderators.contains(user) {
            Role::Moderator
        } else if self.stage.speakers.contains(user) {
            Role::Speaker
        } else {
            Role::Listener
        }
    }

    /// The stage as `viewer` may see it: hands and invitations only for the host and
    /// moderators.
    pub fn stage_info(&self, viewer: &str) -> StageInfo {
        let moderating = self.role_of(viewer) <= Role::Moderator;
        StageInfo {
            room_id: self.definition.room_id.clone(),
            host: self.definition.host.clone(),
            moderators: self.stage.moderators.iter().cloned().collect(),
            speakers: self.stage.speakers.iter().cloned().collect(),
            muted: self.stage.muted.iter().cloned().collect(),
            hands: if moderating {
                self.stage.hands.clone()
            } else {
                Vec::new()
            },
            invited: if moderating {
                self.stage.invited.iter().cloned().collect()
            } else {
                Vec::new()
            },
        }
    }

    /// The room's totals (R10), as of `now_ms`.
    pub fn summary(&self, now_ms: u64) -> RoomSummary {
        let definition = &self.definition;
        let until = definition.ended_at_ms.unwrap_or(now_ms);
        RoomSummary {
            room_id: definition.room_id.clone(),
            title: definition.title.clone(),
            host: definition.host.clone(),
            state: definition.state,
            started_at_ms: definition.started_at_ms,
            ended_at_ms: definition.ended_at_ms,
            duration_ms: definition
                .started_at_ms
                .map_or(0, |start| until.saturating_sub(start)),
            comments: self.comment_count,
            reactions: self.totals.reactions.clone(),
            peak_listeners: self.totals.peak_listeners,
            unique_listeners: self.totals.unique_listeners(),
            listeners: self.listener_count(),
        }
    }

    /// The stage (roles, mutes, blocks, hands, invitations).
    pub fn stage(&self) -> &RoomStage {
        &self.stage
    }

    /// Durable changes so far (see [`RoomDurable::revision`]).
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// `by` (who must be in the room) changes the stage. Every change is durable (the
    /// revision moves on) and announced: role changes, mutes, kicks and blocks to the whole
    /// room; hands and invitations to the host, the moderators and the user concerned.
    /// What `by`'s role does not allow is refused with [`RoomError::Forbidden`] (a speaker
    /// raising a hand); a change that does not apply (answering no invitation) with
    /// [`RoomError::InvalidArgument`]; a no-op (muting the muted, lowering a hand not
    /// raised) succeeds quietly.
    pub fn handle_stage(
        &mut self,
        now_ms: u64,
        by: &str,
        command: StageCommand,
    ) -> Result<(), RoomError> {
        self.refuse_if_ended()?;
        let by_role = self.role_of(by);
        let moderating = by_role <= Role::Moderator;
        if command.acts_as_itself(by) && !self.users.contains_key(by) {
            return Err(RoomError::NotInRoom);
        }
        let changed = match command {
            StageCommand::SetRole { user, role } => self.set_role(by, by_role, &user, role)?,
            StageCommand::Hand { raised } => {
                // Raising is a listener's: the stage's role does not allow it (2004).
                // Lowering a hand that is not raised changes nothing and succeeds.
                if self.role_of(by) != Role::Listener {
                    if !raised {
                        return Ok(());
                    }
                    return Err(RoomError::Forbidden(
                        "you are on stage already: only listeners raise hands".into(),
                    ));
                }
                let present = self.stage.hands.iter().any(|u| u == by);
                match (raised, present) {
                    (true, false) => {
                        if self.stage.hands.len() >= self.config.hands_max {
                            return Err(RoomError::Unavailable(format!(
                                "the hand queue is full ({} hands)",
                                self.config.hands_max
                            )));
                        }
                        self.stage.hands.push(by.to_string());
                        self.notify_moderators(by, StageAction::HandRaised, by, None);
                        true
                    }
                    (false, true) => {
                        self.stage.hands.retain(|u| u != by);
                        self.notify_moderators(by, StageAction::HandLowered, by, None);
                        true
                    }
                    _ => false,
                }
            }
            StageCommand::Invite { user } => {
                self.refuse_unless(moderating, "only the host and moderators invite speakers")?;
                if !self.users.contains_key(&user) {
                    return Err(RoomError::InvalidArgument(format!(
                        "{user:?} is not in the room"
                    )));
                }
                if self.role_of(&user) != Role::Listener {
                    return Err(RoomError::InvalidArgument(format!(
                        "{user:?} is on stage already"
                    )));
                }
                if self.stage.invited.contains(&user) {
                    false
                } else {
                    if self.stage.invited.len() >= self.config.invited_max {
                        return Err(RoomError::Unavailable(format!(
                            "too many open invitations ({})",
                            self.config.invited_max
                        )));
                    }
                    self.stage.invited.insert(user.clone());
                    self.notify_moderators(&user, StageAction::Invited, by, None);
                    true
                }
            }
            StageCommand::InviteAnswer { accept } => {
                if !self.stage.invited.contains(by) {
                    return Err(RoomError::InvalidArgument(
                        "you have no invitation to speak".into(),
                    ));
                }
                if accept {
                    if self.stage.speakers.len() >= self.config.speakers_max {
                        return Err(RoomError::Unavailable(format!(
                            "the stage is full ({} speakers)",
                            self.config.speakers_max
                        )));
                    }
                    self.stage.invited.remove(by);
                    self.stage.hands.retain(|u| u != by);
                    self.stage.speakers.insert(by.to_string());
                    self.broadcast_stage(StageAction::RoleChanged, by, by, Some(Role::Speaker));
                } else {
                    self.stage.invited.remove(by);
                    self.notify_moderators(by, StageAction::InviteDeclined, by, None);
                }
                true
            }
            StageCommand::Mute { user, muted } => {
                let target = user.unwrap_or_else(|| by.to_string());
                let target_role = self.role_of(&target);
                if target_role == Role::Listener {
                    return Err(RoomError::InvalidArgument(format!(
                        "{target:?} is not on stage"
                    )));
                }
                if target != by {
                    self.refuse_unless(moderating, "only the host and moderators mute others")?;
                    self.refuse_unless(muted, "moderators may not unmute others: ask them")?;
                    self.refuse_unless(
                        target_role != Role::Host,
                        "nobody mutes the host but the host",
                    )?;
                }
                let changed = if muted {
                    self.stage.muted.insert(target.clone())
                } else {
                    self.stage.muted.remove(&target)
                };
                if changed {
                    let action = if muted {
                        StageAction::Muted
                    } else {
                        StageAction::Unmuted
                    };
                    self.broadcast_stage(action, &target, by, None);
                }
                changed
            }
            StageCommand::Kick { user } => {
                self.refuse_unless(moderating, "only the host and moderators kick")?;
                self.refuse_unless_above(by_role, &user, "kick")?;
                if !self.users.contains_key(&user) {
                    return Err(RoomError::InvalidArgument(format!(
                        "{user:?} is not in the room"
                    )));
                }
                self.broadcast_stage(StageAction::Kicked, &user, by, None);
                self.stage.moderators.remove(&user);
                self.remove_user(now_ms, &user);
                true
            }
            StageCommand::Block { user, blocked } => {
                self.refuse_unless(moderating, "only the host and moderators block")?;
                self.refuse_unless_above(by_role, &user, "block")?;
                if blocked {
                    if self.stage.blocked.contains(&user) {
                        false
                    } else {
                        if self.stage.blocked.len() >= self.config.blocked_max {
                            return Err(RoomError::Unavailable(format!(
                                "the block list is full ({} users)",
                                self.config.blocked_max
                            )));
                        }
                        self.stage.blocked.insert(user.clone());
                        self.broadcast_stage(StageAction::Blocked, &user, by, None);
                        self.stage.moderators.remove(&user);
                        self.remove_user(now_ms, &user);
                        true
                    }
                } else if self.stage.blocked.remove(&user) {
                    self.broadcast_stage(StageAction::Unblocked, &user, by, None);
                    true
                } else {
                    false
                }
            }
        };
        if changed {
            self.revision += 1;
        }
        self.checked();
        Ok(())
    }

    fn set_role(
        &mut self,
        by: &str,
        by_role: Role,
        user: &str,
        role: Role,
    ) -> Result<bool, RoomError> {
        let current = self.role_of(user);
        if current == Role::Host || role == Role::Host {
            return Err(RoomError::Forbidden(
                "a room has one host, for its life".into(),
            ));
        }
        if current == role {
            return Ok(false);
        }
        match (current, role) {
            // Making and unmaking moderators is the host's.
            (_, Role::Moderator) | (Role::Moderator, _) => {
                self.refuse_unless(
                    by_role == Role::Host,
                    "only the host makes and unmakes moderators",
                )?;
                if role == Role::Moderator
                    && self.stage.moderators.len() >= self.config.moderators_max
                {
                    return Err(RoomError::Unavailable(format!(
                        "the room has {} moderators already",
                        self.config.moderators_max
                    )));
                }
            }
            // Nobody is put on stage: they are invited and accept.
            (Role::Listener, Role::Speaker) => {
                return Err(RoomError::InvalidArgument(
                    "listeners come on stage by invitation: use room.invite, then they accept"
                        .into(),
                ))
            }
            // Moving a speaker to the audience: moderators, or the speaker leaving.
            (Role::Speaker, Role::Listener) => {
                self.refuse_unless(
                    by_role <= Role::Moderator || by == user,
                    "only moderators move speakers to the audience",
                )?;
            }
            _ => {}
        }
        self.stage.moderators.remove(user);
        self.stage.speakers.remove(user);
        self.stage.hands.retain(|u| u != user);
        self.stage.invited.remove(user);
        match role {
            Role::Moderator => {
                self.stage.moderators.insert(user.to_string());
            }
            Role::Speaker => {
                self.stage.speakers.insert(user.to_string());
            }
            Role::Listener | Role::Host => {
                self.stage.muted.remove(user);
            }
        }
        self.broadcast_stage(StageAction::RoleChanged, user, by, Some(role));
        Ok(true)
    }

    /// Refuses unless the room is live or scheduled and `by` is the host or a moderator
    /// (who alone may `action`, in the room or not).
    fn refuse_unless_moderating(&self, by: &str, action: &str) -> Result<(), RoomError> {
        self.refuse_if_ended()?;
        self.refuse_unless(
            self.role_of(by) <= Role::Moderator,
            &format!("only the host and moderators {action}"),
        )
    }

    fn refuse_unless(&self, allowed: bool, why: &str) -> Result<(), RoomError> {
        if allowed {
            Ok(())
        } else {
            Err(RoomError::Forbidden(why.to_string()))
        }
    }

    /// Moderators act on listeners and speakers; the host on anyone but itself.
    fn refuse_unless_above(
        &self,
        by_role: Role,
        user: &str,
        action: &str,
    ) -> Result<(), RoomError> {
        let target = self.role_of(user);
        if target == Role::Host || (target == Role::Moderator && by_role != Role::Host) {
            Err(RoomError::Forbidden(format!(
                "a {} may not {action} a {}",
                role_name(by_role),
                role_name(target)
            )))
        } else {
            Ok(())
        }
    }

    /// Removes every member of `user` (kicked or blocked): one
    /// [`RoomEffect::MembersRemoved`]; the user leaves the stage.
    fn remove_user(&mut self, now_ms: u64, user: &str) {
        let Some(members) = self.users.remove(user) else {
            return;
        };
        for member in &members {
            self.members.remove(member);
        }
        self.members_version += 1;
        self.leave_stage(user);
        self.note_presence(user, false);
        self.note_listener_change(now_ms);
        self.effects
            .push(RoomEffect::MembersRemoved(members.0.into_iter().collect()));
    }

    /// A user gone from the room leaves the stage: speaker role, mute, hand, invitation.
    fn leave_stage(&mut self, user: &str) {
        let mut changed = self.stage.speakers.remove(user);
        changed |= self.stage.muted.remove(user);
        changed |= self.stage.invited.remove(user);
        let hands = self.stage.hands.len();
        self.stage.hands.retain(|u| u != user);
        changed |= hands != self.stage.hands.len();
        if changed {
            self.revision += 1;
        }
    }

    fn stage_event(&self, action: StageAction, user: &str, by: &str, role: Option<Role>) -> Event {
        Event::Stage(StageEvent {
            room_id: self.definition.room_id.clone(),
            action,
            user_id: user.to_string(),
            by: by.to_string(),
            role,
        })
    }

    fn broadcast_stage(&mut self, action: StageAction, user: &str, by: &str, role: Option<Role>) {
        let event = self.stage_event(action, user, by, role);
        self.effects.push(RoomEffect::Broadcast(event));
    }

    /// Sends a stage event to the host, the moderators and `user`, on all their members.
    /// O(moderators · log members).
    fn notify_moderators(&mut self, user: &str, action: StageAction, by: &str, role: Option<Role>) {
        let event = self.stage_event(action, user, by, role);
        let recipients: Vec<M> = std::iter::once(self.definition.host.as_str())
            .chain(self.stage.moderators.iter().map(String::as_str))
            .chain(std::iter::once(user))
            .collect::<BTreeSet<&str>>()
            .into_iter()
            .filter_map(|u| self.users.get(u))
            .flat_map(|members| members.iter().cloned())
            .collect();
        if !recipients.is_empty() {
            self.effects.push(RoomEffect::Notify(recipients, event));
        }
    }

    /// Panics if the state is inconsistent (a bug in this module or in the shell). Run after
    /// every transition in debug builds. Costs O(recent comments), plus O(members) for
    /// rooms up to [`INVARIANTS_MEMBERS_SCAN_MAX`] members.
    pub fn check_invariants(&self) {
        let config = &self.config;
        self.bullets.check_invariants();
        // Answered requests: bounded, oldest first, each naming a comment that exists.
        assert!(
            self.requests.len() <= config.request_ids_max.max(1),
            "at most request_ids_max answered requests"
        );
        assert!(
            self.requests
                .iter()
                .zip(self.requests.iter().skip(1))
                .all(|(a, b)| a.at_ms <= b.at_ms && a.comment_id < b.comment_id),
            "answered requests are in the order they ran"
        );
        assert!(
            self.requests
                .back()
                .is_none_or(|r| r.comment_id <= self.comment_count),
            "an answered request names a posted comment"
        );
        // Lifecycle.
        let ended = self.definition.state == RoomState::Ended;
        assert_eq!(
            ended,
            self.definition.ended_at_ms.is_some(),
            "ended_at_ms is set exactly when the room has ended"
        );
        if ended {
            assert!(self.members.is_empty(), "an ended room has no members");
            assert!(self.users.is_empty(), "an ended room has no users");
            assert!(self.reactions.is_none(), "an ended room has no open window");
            assert_eq!(self.bullets.candidates(), 0, "an ended room has no bullets");
            assert!(self.listeners_changed_at_ms.is_none());
        }
        assert!(
            self.interested.len() <= config.interested_max,
            "interested over bound"
        );
        assert!(
            self.interested.is_empty() || self.definition.state == RoomState::Scheduled,
            "only a scheduled room holds interest"
        );
        // Presence names are bounded.
        assert!(
            self.presence.joined.len() + self.presence.left.len() <= config.presence_users_max,
            "presence lists over bound"
        );
        // Membership.
        assert!(
            self.members.len() <= config.members_max,
            "members over bound"
        );
        assert!(
            self.users.len() <= self.members.len(),
            "more users than members"
        );
        assert_eq!(self.users.is_empty(), self.members.is_empty());
        if self.members.len() <= INVARIANTS_MEMBERS_SCAN_MAX {
            let mut recount: BTreeMap<&str, usize> = BTreeMap::new();
            for user in self.members.values() {
                *recount.entry(user.as_str()).or_insert(0) += 1;
            }
            assert_eq!(
                recount.len(),
                self.users.len(),
                "user set differs from members"
            );
            for (user, members) in &self.users {
                assert_eq!(
                    recount.get(user.as_str()),
                    Some(&members.len()),
                    "member count of user {user:?} differs from members"
                );
                for member in members {
                    assert_eq!(self.members.get(member), Some(user), "member index");
                }
            }
        }
        // Comments: the recent buffer holds the latest ids, consecutive, oldest first.
        assert!(self.recent_comments.len() <= config.recent_comments_max);
        let recent_len = u64::try_from(self.recent_comments.len()).unwrap_or(u64::MAX);
        assert!(recent_len <= self.comment_count);
        let first_id = self.comment_count - recent_len + 1;
        for (expected_id, comment) in (first_id..).zip(&self.recent_comments) {
            assert_eq!(comment.comment_id, expected_id, "comment ids have a gap");
            assert!(comment.at_ms <= self.comment_latest_at_ms);
        }
        let limiter = &self.comment_limiter;
        assert!(limiter.buckets.len() <= config.comment_rate_users_max);
        assert_eq!(limiter.buckets.len(), limiter.recency.len());
        // Reactions.
        if let Some(window) = &self.reactions {
            assert!(!window.counts.is_empty(), "an open window counts something");
            assert!(window.counts.len() <= config.reaction_emojis_max);
        }
        assert!(
            self.effects.len() <= EFFECTS_PENDING_MAX,
            "effects are not drained by the shell"
        );
    }

    fn checked(&self) {
        #[cfg(debug_assertions)]
        self.check_invariants();
    }

    fn refuse_if_ended(&self) -> Result<(), RoomError> {
        if self.definition.state == RoomState::Ended {
            Err(RoomError::RoomEnded)
        } else {
            Ok(())
        }
    }

    fn refuse_unless_host(&self, user: &str, action: &str) -> Result<(), RoomError> {
        self.refuse_unless(
            user == self.definition.host,
            &format!("only the host may {action} the room"),
        )
    }

    /// Notes that `user` came (its first member) or went (its last): named in the next
    /// `room.listeners` push while the room is small, else only counted. A come-and-go
    /// within one interval cancels out. O(presence_users_max) at worst, in small rooms.
    fn note_presence(&mut self, user: &str, joined: bool) {
        let max = self.config.presence_users_max;
        if self.presence.overflow || self.users.len() > max {
            self.presence.overflow();
            return;
        }
        let (list, other) = if joined {
            (&mut self.presence.joined, &mut self.presence.left)
        } else {
            (&mut self.presence.left, &mut self.presence.joined)
        };
        match other.iter().position(|u| u == user) {
            Some(at) => {
                other.remove(at);
            }
            None => list.push(user.to_string()),
        }
        if self.presence.joined.len() + self.presence.left.len() > max {
            self.presence.overflow();
        }
    }

    /// One page of the room's users in user id order, after `after`, at most `limit`
    /// (1 to `members_page_max`). O(limit · log users).
    pub fn members_page(&self, after: Option<&str>, limit: usize) -> RoomMembersResponse {
        use std::ops::Bound;
        let limit = limit.clamp(1, self.config.members_page_max.max(1));
        let start = match after {
            Some(after) => Bound::Excluded(after),
            None => Bound::Unbounded,
        };
        let mut page: Vec<MemberInfo> = self
            .users
            .range::<str, _>((start, Bound::Unbounded))
            .take(limit + 1)
            .map(|(user, _)| MemberInfo {
                user_id: user.clone(),
                role: self.role_of(user),
            })
            .collect();
        let next = if page.len() > limit {
            page.truncate(limit);
            page.last().map(|m| m.user_id.clone())
        } else {
            None
        };
        RoomMembersResponse {
            users: page,
            next,
            count: self.listener_count(),
        }
    }

    /// O(1): remembers whether the listener count now differs from the pushed one.
    fn note_listener_change(&mut self, now_ms: u64) {
        if self.listener_count() == self.listeners_pushed_count && self.presence.is_empty() {
            self.listeners_changed_at_ms = None;
        } else if self.listeners_changed_at_ms.is_none() {
            self.listeners_changed_at_ms = Some(now_ms);
        }
    }

    fn listeners_push_allowed_at_ms(&self) -> u64 {
        self.listeners_pushed_at_ms.map_or(0, |pushed_at_ms| {
            pushed_at_ms.saturating_add(self.config.listener_count_interval_ms)
        })
    }

    fn close_reaction_window_if_due(&mut self, now_ms: u64) {
        if self
            .reactions
            .as_ref()
            .is_some_and(|window| now_ms >= window.closes_at_ms)
        {
            self.close_reaction_window();
        }
    }

    fn close_reaction_window(&mut self) {
        if let Some(window) = self.reactions.take() {
            self.totals.add_reactions(&window.counts);
            self.effects
                .push(RoomEffect::Broadcast(Event::Reactions(ReactionsEvent {
                    room_id: self.definition.room_id.clone(),
                    window_ms: self.config.reaction_window_ms,
                    counts: window.counts,
                })));
        }
    }
}

/// Checks a reaction's emoji: 1 to `emoji_bytes_max` bytes, no control characters.
///
/// # Errors
///
/// [`RoomError::InvalidArgument`] saying which rule it breaks.
pub fn check_emoji(config: &RoomConfig, emoji: &str) -> Result<(), RoomError> {
    if emoji.is_empty() {
        return Err(RoomError::InvalidArgument("empty emoji".into()));
    }
    if emoji.len() > config.emoji_bytes_max {
        return Err(RoomError::InvalidArgument(format!(
            "emoji longer than {} bytes",
            config.emoji_bytes_max
        )));
    }
    if emoji.chars().any(char::is_control) {
        return Err(RoomError::InvalidArgument(
            "emoji contains control characters".into(),
        ));
    }
    Ok(())
}

/// Whether `text` has more than `chars_max` characters, looking at no more than
/// `chars_max + 1` of them.
fn exceeds_chars(text: &str, chars_max: usize) -> bool {
    text.chars().nth(chars_max).is_some()
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Host => "host",
        Role::Moderator => "moderator",
        Role::Speaker => "speaker",
        Role::Listener => "listener",
    }
}

/// A poll refusal as a room error.
fn poll_error(refusal: PollRefusal) -> RoomError {
    match refusal {
        PollRefusal::Invalid(why) | PollRefusal::Full(why) => RoomError::InvalidArgument(why),
        PollRefusal::NoSuchPoll(id) => RoomError::InvalidArgument(format!("no poll {id}")),
        PollRefusal::Closed(id) => RoomError::InvalidArgument(format!("poll {id} is closed")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: &str = "host";
    const T0: u64 = 1_700_000_000_000;

    fn definition(config: &RoomConfig) -> RoomDefinition {
        RoomDefinition::new(
            "r-1".into(),
            "  Morning show ",
            HOST.into(),
            None,
            T0,
            config,
        )
        .expect("valid definition")
    }

    fn room_with(config: RoomConfig) -> RoomCore<u64> {
        RoomCore::new(definition(&config), config)
    }

    fn room() -> RoomCore<u64> {
        room_with(RoomConfig::default())
    }

    fn broadcasts(effects: &[RoomEffect<u64>]) -> Vec<&Event> {
        effects
            .iter()
            .filter_map(|e| match e {
                RoomEffect::Broadcast(event) => Some(event),
                _ => None,
            })
            .collect()
    }

    fn listener_pushes(effects: &[RoomEffect<u64>]) -> Vec<u64> {
        broadcasts(effects)
            .into_iter()
            .filter_map(|e| match e {
                Event::Listeners(l) => Some(l.count),
                _ => None,
            })
            .collect()
    }

    /// Ticks whenever the room asks to, up to `now_ms`, like the shell's timer would.
    fn tick_if_due(room: &mut RoomCore<u64>, now_ms: u64) {
        if room.next_deadline_ms().is_some_and(|d| d <= now_ms) {
            room.handle_tick(now_ms);
        }
    }

    #[test]
    fn a_new_definition_is_trimmed_and_live_unless_scheduled_in_the_future() {
        let config = RoomConfig::default();
        let live = definition(&config);
        assert_eq!(live.title, "Morning show");
        assert_eq!(live.state, RoomState::Live);
        assert_eq!(live.created_at_ms, T0);
        let past = RoomDefinition::new("r".into(), "t", HOST.into(), Some(T0), T0, &config)
            .expect("valid");
        assert_eq!(past.state, RoomState::Live);
        let future = RoomDefinition::new("r".into(), "t", HOST.into(), Some(T0 + 1), T0, &config)
            .expect("valid");
        assert_eq!(future.state, RoomState::Scheduled);
        assert_eq!(future.scheduled_start_ms, Some(T0 + 1));
    }

    #[test]
    fn the_definition_round_trips_through_serde() {
        let def = definition(&RoomConfig::default());
        let json = serde_json::to_string(&def).expect("encodes");
        assert!(json.contains("\"state\":\"live\""), "{json}");
        let back: RoomDefinition = serde_json::from_str(&json).expect("decodes");
        assert_eq!(back, def);
        let config: RoomConfig = serde_json::from_str(r#"{"members_max": 3}"#).expect("config");
        assert_eq!(config.members_max, 3);
        assert_eq!(
            config.recent_comments_max, 50,
            "absent fields take defaults"
        );
    }

    #[test]
    fn comments_are_ordered_and_the_last_n_are_replayed_to_joiners() {
        let mut room = room();
        room.handle_join(T0, 1, HOST).expect("host joins");
        // 60 comments from 12 users, 5 each: within every user's burst.
        for i in 0..60u64 {
            let member = 100 + i % 12;
            if room.member_user(&member).is_none() {
                room.handle_join(T0, member, &format!("user-{member}"))
                    .expect("join");
            }
            let response = room
                .handle_comment(T0 + i, &member, &format!("  comment {}  ", i + 1))
                .expect("comment");
            assert_eq!(response.comment_id, i + 1);
        }
        let effects = room.drain_effects();
        let ids: Vec<u64> = broadcasts(&effects)
            .into_iter()
            .filter_map(|e| match e {
                Event::Comment(c) => Some(c.comment_id),
                _ => None,
            })
            .collect();
        assert_eq!(
            ids,
            (1..=60).collect::<Vec<_>>(),
            "one total order, no gaps"
        );

        let joined = room.handle_join(T0 + 100, 2, "late").expect("join");
        assert_eq!(joined.role, Role::Listener);
        assert_eq!(joined.room.comment_count, 60);
        let replayed: Vec<u64> = joined
            .recent_comments
            .iter()
            .map(|c| c.comment_id)
            .collect();
        assert_eq!(
            replayed,
            (11..=60).collect::<Vec<_>>(),
            "the last 50, oldest first"
        );
        let last = joined.recent_comments.last().expect("some");
        assert_eq!(last.text, "comment 60");
        assert_eq!(last.room_id, "r-1");
        assert_eq!(last.user_id, "user-111");
    }

    #[test]
    fn a_repeated_comment_request_gets_the_first_answer_and_posts_once() {
        let mut room = room();
        room.handle_join(T0, 1, "alice").unwrap();
        room.handle_join(T0, 2, "bob").unwrap();
        room.drain_effects();
        let terms = |id| RequestTerms {
            request_id: Some(id),
            deadline_ms: Some(T0 + 10_000),
        };
        let comments = |room: &mut RoomCore<u64>| {
            broadcasts(&room.drain_effects())
                .into_iter()
                .filter(|e| matches!(e, Event::Comment(_)))
                .count()
        };
        let first = room
            .handle_comment_request(T0 + 100, &1, "hello", terms("r-1"))
            .unwrap();
        assert_eq!(comments(&mut room), 1);
        // The same id again, even past its deadline and with other text: the first answer.
        let again = room
            .handle_comment_request(T0 + 20_000, &1, "hello again", terms("r-1"))
            .unwrap();
        assert_eq!(again, first);
        assert_eq!(comments(&mut room), 0);
        assert_eq!(room.comment_count(), 1);
        // Ids are per user: bob's "r-1" is another request.
        let bobs = room
            .handle_comment_request(T0 + 200, &2, "hi", terms("r-1"))
            .unwrap();
        assert_eq!(bobs.comment_id, 2);
        // A new request past its deadline is not run.
        assert_eq!(
            room.handle_comment_request(T0 + 10_001, &1, "late", terms("r-2")),
            Err(RoomError::DeadlineExceeded)
        );
        assert_eq!(room.comment_count(), 2);
        // The answers move with the durable state to another owner.
        let mut moved = self::room();
        moved.restore_durable(T0 + 300, room.durable());
        moved.handle_join(T0 + 300, 7, "alice").unwrap();
        let after_move = moved
            .handle_comment_request(T0 + 300, &7, "hello", terms("r-1"))
            .unwrap();
        assert_eq!(after_move, first);
        assert_eq!(moved.comment_count(), 2);
    }

    #[test]
    fn a_comments_delta_brings_a_copy_to_the_owners_state_and_only_after_comments() {
        let mut room = room_with(RoomConfig {
            recent_comments_max: 5,
            request_ids_max: 3,
            request_ids_window_ms: 1_000,
            comment_burst: 100,
            comment_rate_per_sec: 100,
            ..RoomConfig::default()
        });
        room.handle_join(T0, 1, HOST).unwrap();
        room.handle_join(T0, 2, "bob").unwrap();
        let comment = |room: &mut RoomCore<u64>, at: u64, id: Option<&str>| {
            let terms = RequestTerms {
                request_id: id,
                deadline_ms: None,
            };
            room.handle_comment_request(T0 + at, &1, "x", terms)
                .unwrap()
                .comment_id
        };
        for i in 0..4 {
            comment(&mut room, i, Some(&format!("q{i}")));
        }
        let mut copy = room.durable_without_polls();
        let (base, base_comments) = (room.revision(), room.comment_count());
        assert_eq!(
            room.comments_delta(base, base_comments),
            None,
            "nothing new"
        );
        // Three more, one without a request id, one past the request window.
        comment(&mut room, 10, Some("q4"));
        comment(&mut room, 11, None);
        comment(&mut room, 2_000, Some("q6"));
        let delta = room
            .comments_delta(base, base_comments)
            .expect("only comments");
        assert_eq!(delta.comments.len(), 3);
        copy.take_comments(delta.clone()).expect("follows");
        assert_eq!(copy, room.durable_without_polls());
        // Taken twice, or by a copy behind, it does not follow.
        assert_eq!(copy.take_comments(delta), Err(()));
        // Another change in between: no delta (the whole change goes instead).
        let (base, base_comments) = (room.revision(), room.comment_count());
        comment(&mut room, 2_001, None);
        room.handle_stage(T0 + 2_002, "bob", StageCommand::Hand { raised: true })
            .unwrap();
        assert_eq!(room.comments_delta(base, base_comments), None);
        // More comments than the recent log holds: no delta.
        let (base, base_comments) = (room.revision(), room.comment_count());
        for i in 0..6 {
            comment(&mut room, 2_100 + i, None);
        }
        assert_eq!(room.comments_delta(base, base_comments), None);
    }

    #[test]
    fn answered_requests_are_bounded_in_count_and_time() {
        let mut room = room_with(RoomConfig {
            request_ids_max: 3,
            request_ids_window_ms: 1_000,
            comment_burst: 100,
            comment_rate_per_sec: 100,
            ..RoomConfig::default()
        });
        room.handle_join(T0, 1, "alice").unwrap();
        let comment = |room: &mut RoomCore<u64>, at: u64, id: &str| {
            let terms = RequestTerms {
                request_id: Some(id),
                deadline_ms: None,
            };
            room.handle_comment_request(T0 + at, &1, "x", terms)
                .unwrap()
                .comment_id
        };
        for i in 0..5 {
            comment(&mut room, i, &format!("q{i}"));
        }
        assert_eq!(room.durable().requests.len(), 3);
        // The oldest was forgotten: it runs again.
        assert_eq!(comment(&mut room, 10, "q0"), 6);
        // The latest is still known.
        assert_eq!(comment(&mut room, 11, "q4"), 5);
        // Past the window, everything older is forgotten.
        comment(&mut room, 5_000, "q9");
        assert_eq!(room.durable().requests.len(), 1);
    }

    #[test]
    fn comment_times_never_go_backwards_even_if_the_clock_does() {
        let mut room = room();
        room.handle_join(T0, 1, "a").expect("join");
        room.handle_comment(T0 + 500, &1, "first").expect("comment");
        room.handle_comment(T0, &1, "second").expect("comment");
        let times: Vec<u64> = room.recent_comments().map(|c| c.at_ms).collect();
        assert_eq!(times, vec![T0 + 500, T0 + 500]);
    }

    #[test]
    fn the_comment_rate_limit_is_per_user_and_shared_across_devices() {
        let mut room = room();
        room.handle_join(T0, 1, "alice").expect("phone");
        room.handle_join(T0, 2, "alice").expect("laptop");
        room.handle_join(T0, 3, "bob").expect("bob");
        for i in 0..10u64 {
            let device = 1 + i % 2;
            room.handle_comment(T0, &device, "hi")
                .expect("within burst");
        }
        for device in [1, 2] {
            let err = room.handle_comment(T0, &device, "hi").expect_err("limited");
            assert_eq!(err, RoomError::RateLimited);
            assert_eq!(err.code(), ErrorCode::RateLimited);
        }
        room.handle_comment(T0, &3, "bob is not limited")
            .expect("other user");
        // 5 per second: one more comment every 200 ms.
        room.handle_comment(T0 + 200, &2, "again")
            .expect("refilled");
        assert_eq!(
            room.handle_comment(T0 + 200, &1, "again"),
            Err(RoomError::RateLimited)
        );
        // Refused comments took no id.
        assert_eq!(room.info().comment_count, 12);
    }

    #[test]
    fn invalid_comments_do_not_spend_rate_tokens() {
        let mut room = room_with(RoomConfig {
            comment_burst: 1,
            ..RoomConfig::default()
        });
        room.handle_join(T0, 1, "a").expect("join");
        for _ in 0..5 {
            assert!(room.handle_comment(T0, &1, "   ").is_err());
        }
        room.handle_comment(T0, &1, "ok")
            .expect("token still there");
    }

    #[test]
    fn the_comment_rate_map_is_bounded_and_evicts_the_least_recently_active() {
        let mut room = room_with(RoomConfig {
            comment_rate_users_max: 2,
            comment_burst: 1,
            ..RoomConfig::default()
        });
        for member in 1..=3u64 {
            room.handle_join(T0, member, &format!("u{member}"))
                .expect("join");
        }
        room.handle_comment(T0, &1, "x").expect("u1");
        room.handle_comment(T0, &2, "x").expect("u2");
        assert_eq!(
            room.handle_comment(T0, &1, "x"),
            Err(RoomError::RateLimited)
        );
        // u3 pushes out u2 (least recently used: u1 was used after it).
        room.handle_comment(T0, &3, "x").expect("u3");
        assert_eq!(room.comment_limiter.buckets.len(), 2);
        assert!(!room.comment_limiter.buckets.contains_key("u2"));
        assert_eq!(
            room.handle_comment(T0, &1, "x"),
            Err(RoomError::RateLimited)
        );
    }

    #[test]
    fn bullet_batches_from_edges_become_one_broadcast_per_window_at_the_rate() {
        let mut room = room();
        room.handle_join(T0, 1, HOST).expect("host joins");
        room.handle_tick(T0);
        room.drain_effects();
        let bullet = |user: u64, at_ms: u64| Bullet {
            user_id: format!("u{user}"),
            text: format!("hi from {user}"),
            at_ms,
        };
        // Two edges send 20 users' bullets in one window: 5 are shown (20/s × 250 ms).
        let dropped = room
            .handle_bullet_batch(T0, (0..10).map(|u| bullet(u, T0)).collect())
            .expect("live room");
        assert_eq!(dropped, 0);
        room.handle_bullet_batch(T0 + 50, (10..20).map(|u| bullet(u, T0 + 50)).collect())
            .expect("live room");
        assert_eq!(room.next_deadline_ms(), Some(T0 + 250));
        room.handle_tick(T0 + 100);
        assert!(broadcasts(&room.drain_effects()).is_empty(), "window open");
        let mut shown = BTreeSet::new();
        for window in 0..4u64 {
            let now = T0 + 250 * (window + 1);
            tick_if_due(&mut room, now);
            let effects = room.drain_effects();
            let events = broadcasts(&effects);
            assert_eq!(events.len(), 1, "one broadcast per window");
            let Event::Bullets(event) = events[0] else {
                panic!("not bullets: {:?}", events[0]);
            };
            assert_eq!(event.bullets.len(), 5);
            shown.extend(event.bullets.iter().map(|b| b.user_id.clone()));
            // Everyone sends again for the next window.
            room.handle_bullet_batch(now, (0..20).map(|u| bullet(u, now)).collect())
                .expect("live room");
        }
        assert_eq!(
            shown.len(),
            20,
            "each of 20 senders shown once in 4 windows"
        );
        room.handle_end(T0 + 2_000, HOST).expect("host ends");
        assert!(!room
            .drain_effects()
            .iter()
            .any(|e| matches!(e, RoomEffect::Broadcast(Event::Bullets(_)))));
        assert_eq!(
            room.handle_bullet_batch(T0 + 2_000, vec![bullet(1, T0)]),
            Err(RoomError::RoomEnded)
        );
    }

    #[test]
    fn reactions_aggregate_into_one_broadcast_per_window() {
        let mut room = room();
        for member in 1..=3u64 {
            room.handle_join(T0, member, &format!("u{member}"))
                .expect("join");
        }
        room.handle_tick(T0);
        room.drain_effects();
        assert_eq!(room.next_deadline_ms(), None);

        for i in 0..300u64 {
            let member = 1 + i % 3;
            let emoji = if i % 3 == 0 { "👏" } else { "🔥" };
            room.handle_react(T0 + i / 2, &member, emoji)
                .expect("react");
        }
        assert!(room.drain_effects().is_empty(), "no broadcast per reaction");
        assert_eq!(room.next_deadline_ms(), Some(T0 + 200));
        room.handle_tick(T0 + 199);
        assert!(room.drain_effects().is_empty(), "window not closed early");

        room.handle_tick(T0 + 200);
        let effects = room.drain_effects();
        let expected = BTreeMap::from([("👏".to_string(), 100), ("🔥".to_string(), 200)]);
        assert_eq!(
            effects,
            vec![RoomEffect::Broadcast(Event::Reactions(ReactionsEvent {
                room_id: "r-1".into(),
                window_ms: 200,
                counts: expected,
            }))]
        );
        assert_eq!(room.next_deadline_ms(), None);
        room.handle_tick(T0 + 400);
        assert!(
            room.drain_effects().is_empty(),
            "nothing pending, nothing sent"
        );
    }

    #[test]
    fn a_late_tick_does_not_merge_two_windows() {
        let mut room = room();
        room.handle_join(T0, 1, "a").expect("join");
        room.handle_tick(T0);
        room.drain_effects();
        room.handle_react(T0, &1, "👍").expect("react");
        // The shell's tick is late: the next reaction closes the due window first.
        room.handle_react(T0 + 250, &1, "👍").expect("react");
        let first = room.drain_effects();
        assert_eq!(broadcasts(&first).len(), 1);
        assert_eq!(room.next_deadline_ms(), Some(T0 + 450));
        room.handle_tick(T0 + 450);
        assert_eq!(broadcasts(&room.drain_effects()).len(), 1);
    }

    #[test]
    fn distinct_emojis_per_window_are_bounded() {
        let mut room = room_with(RoomConfig {
            reaction_emojis_max: 2,
            ..RoomConfig::default()
        });
        room.handle_join(T0, 1, "a").expect("join");
        room.handle_react(T0, &1, "a").expect("1st kind");
        room.handle_react(T0, &1, "b").expect("2nd kind");
        assert_eq!(room.handle_react(T0, &1, "c"), Err(RoomError::RateLimited));
        room.handle_react(T0, &1, "a")
            .expect("known kind still counts");
        room.handle_tick(T0 + 200);
        room.handle_react(T0 + 200, &1, "c").expect("new window");
    }

    #[test]
    fn the_listener_count_is_pushed_at_most_once_per_interval_and_only_when_changed() {
        let mut room = room();
        room.handle_join(T0, 1, HOST).expect("join");
        assert!(room.drain_effects().is_empty(), "join does not broadcast");
        assert_eq!(room.next_deadline_ms(), Some(T0));
        room.handle_tick(T0);
        assert_eq!(listener_pushes(&room.drain_effects()), vec![1]);

        room.handle_join(T0 + 10, 2, "a").expect("join");
        room.handle_join(T0 + 20, 3, "a")
            .expect("second device, same user");
        assert_eq!(room.next_deadline_ms(), Some(T0 + 1_000));
        room.handle_tick(T0 + 500);
        assert!(
            room.drain_effects().is_empty(),
            "too soon after the last push"
        );
        room.handle_tick(T0 + 1_000);
        assert_eq!(listener_pushes(&room.drain_effects()), vec![2]);

        // Leave and come back: the count is what was pushed and the user's going and
        // coming cancel out, so nothing is due.
        room.handle_leave(T0 + 1_100, &2).expect("leave");
        room.handle_leave(T0 + 1_100, &3).expect("leave");
        assert!(room.next_deadline_ms().is_some());
        room.handle_join(T0 + 1_200, 4, "a").expect("join");
        assert_eq!(room.next_deadline_ms(), None);
        room.handle_tick(T0 + 5_000);
        assert!(
            room.drain_effects().is_empty(),
            "unchanged count is not pushed"
        );

        // A change long after the last push goes out at the next tick.
        room.handle_leave(T0 + 9_000, &4).expect("leave");
        assert_eq!(room.next_deadline_ms(), Some(T0 + 9_000));
        room.handle_tick(T0 + 9_000);
        assert_eq!(listener_pushes(&room.drain_effects()), vec![1]);
        assert_eq!(room.info().listener_count, 1);
    }

    #[test]
    fn five_thousand_joins_produce_a_bounded_number_of_broadcasts() {
        let mut room = room();
        let mut effects = Vec::new();
        // 5,000 joins over 5 s, the shell ticking whenever the room asks.
        for member in 0..5_000u64 {
            let now_ms = T0 + member;
            room.handle_join(now_ms, member, &format!("user-{member}"))
                .expect("join");
            tick_if_due(&mut room, now_ms);
            effects.extend(room.drain_effects());
        }
        room.handle_tick(T0 + 6_000);
        effects.extend(room.drain_effects());
        let pushes = listener_pushes(&effects);
        assert_eq!(
            effects.len(),
            pushes.len(),
            "only listener counts were broadcast"
        );
        assert!(pushes.len() <= 6, "{} pushes for 5,000 joins", pushes.len());
        assert_eq!(pushes.last(), Some(&5_000));
        assert_eq!(room.member_count(), 5_000);
    }

    #[test]
    fn end_is_host_only_and_removes_every_member() {
        let mut room = room();
        room.handle_join(T0, 1, HOST).expect("join");
        room.handle_join(T0, 2, "a").expect("join");
        room.handle_join(T0, 3, "b").expect("join");
        room.handle_react(T0, &2, "🎉").expect("react");
        room.drain_effects();

        let err = room.handle_end(T0 + 50, "a").expect_err("not the host");
        assert!(matches!(err, RoomError::Forbidden(_)), "{err}");
        assert_eq!(err.code(), ErrorCode::Forbidden);
        assert!(room.drain_effects().is_empty());
        assert_eq!(room.member_count(), 3);

        room.handle_end(T0 + 100, HOST).expect("host ends");
        let effects = room.drain_effects();
        assert_eq!(effects.len(), 5, "{effects:?}");
        assert!(
            matches!(&effects[0], RoomEffect::Broadcast(Event::Reactions(r)) if r.counts["🎉"] == 1),
            "pending reactions are flushed first"
        );
        let RoomEffect::Persist(persisted) = &effects[1] else {
            panic!("expected persist, got {:?}", effects[1]);
        };
        assert_eq!(persisted.state, RoomState::Ended);
        assert_eq!(persisted.ended_at_ms, Some(T0 + 100));
        assert_eq!(
            effects[2],
            RoomEffect::Broadcast(Event::RoomEnded(RoomEndedEvent {
                room_id: "r-1".into(),
                by: HOST.into(),
            }))
        );
        let RoomEffect::Export(summary) = &effects[3] else {
            panic!("expected the summary's export, got {:?}", effects[3]);
        };
        assert_eq!(
            (summary.state, summary.ended_at_ms, summary.listeners),
            (RoomState::Ended, Some(T0 + 100), 3)
        );
        assert_eq!(effects[4], RoomEffect::MembersRemoved(vec![1, 2, 3]));
        assert_eq!(room.member_count(), 0);
        assert_eq!(room.info().state, RoomState::Ended);
        assert_eq!(room.info().listener_count, 0);
        assert_eq!(room.next_deadline_ms(), None);

        assert_eq!(
            room.handle_join(T0 + 200, 4, "c"),
            Err(RoomError::RoomEnded)
        );
        assert_eq!(
            room.handle_comment(T0 + 200, &2, "hi"),
            Err(RoomError::RoomEnded)
        );
        assert_eq!(
            room.handle_react(T0 + 200, &2, "🎉"),
            Err(RoomError::RoomEnded)
        );
        assert_eq!(room.handle_leave(T0 + 200, &2), Err(RoomError::RoomEnded));
        assert_eq!(room.handle_end(T0 + 200, HOST), Err(RoomError::RoomEnded));
        assert_eq!(RoomError::RoomEnded.code(), ErrorCode::RoomEnded);
        room.handle_tick(T0 + 10_000);
        assert!(room.drain_effects().is_empty());
    }

    #[test]
    fn a_scheduled_room_can_be_joined_and_goes_live_when_the_host_starts_it() {
        let config = RoomConfig::default();
        let def = RoomDefinition::new(
            "r-2".into(),
            "Later",
            HOST.into(),
            Some(T0 + 3_600_000),
            T0,
            &config,
        )
        .expect("valid");
        let mut room: RoomCore<u64> = RoomCore::new(def, config);
        let joined = room
            .handle_join(T0, 1, "early")
            .expect("join a scheduled room");
        assert_eq!(joined.room.state, RoomState::Scheduled);

        let err = room
            .handle_start(T0 + 10, "early")
            .expect_err("not the host");
        assert_eq!(err.code(), ErrorCode::Forbidden);
        room.handle_start(T0 + 10, HOST).expect("host starts");
        let effects = room.drain_effects();
        assert!(
            matches!(&effects[..], [RoomEffect::Persist(d), RoomEffect::Broadcast(Event::Live(_))]
                if d.state == RoomState::Live && d.started_at_ms == Some(T0 + 10)),
            "{effects:?}"
        );
        room.handle_start(T0 + 20, HOST)
            .expect("starting twice is a no-op");
        assert!(room.drain_effects().is_empty());
        assert_eq!(room.info().state, RoomState::Live);
    }

    #[test]
    fn invalid_inputs_are_refused_with_the_right_code() {
        let config = RoomConfig::default();
        let invalid = |result: Result<RoomDefinition, RoomError>| {
            assert_eq!(
                result.expect_err("refused").code(),
                ErrorCode::InvalidArgument
            );
        };
        invalid(RoomDefinition::new(
            "r".into(),
            "   ",
            HOST.into(),
            None,
            T0,
            &config,
        ));
        invalid(RoomDefinition::new(
            "r".into(),
            &"x".repeat(201),
            HOST.into(),
            None,
            T0,
            &config,
        ));
        invalid(RoomDefinition::new(
            "r".into(),
            "a\u{7}b",
            HOST.into(),
            None,
            T0,
            &config,
        ));
        invalid(RoomDefinition::new(
            "".into(),
            "t",
            HOST.into(),
            None,
            T0,
            &config,
        ));
        invalid(RoomDefinition::new(
            "r".into(),
            "t",
            "".into(),
            None,
            T0,
            &config,
        ));
        // 200 multi-byte characters are fine: the limit is in characters.
        RoomDefinition::new("r".into(), &"é".repeat(200), HOST.into(), None, T0, &config)
            .expect("200 characters");

        let mut room = room_with(RoomConfig {
            members_max: 2,
            ..RoomConfig::default()
        });
        room.handle_join(T0, 1, "a").expect("join");
        let code = |result: Result<(), RoomError>| result.expect_err("refused").code();
        let comment = |room: &mut RoomCore<u64>, member: u64, text: &str| {
            room.handle_comment(T0, &member, text).map(|_| ())
        };
        assert_eq!(
            code(comment(&mut room, 1, " \n ")),
            ErrorCode::InvalidArgument
        );
        assert_eq!(
            code(comment(&mut room, 1, &"x".repeat(501))),
            ErrorCode::InvalidArgument
        );
        comment(&mut room, 1, &"ü".repeat(500)).expect("500 characters");
        assert_eq!(code(comment(&mut room, 9, "hi")), ErrorCode::NotInRoom);

        assert_eq!(
            code(room.handle_react(T0, &1, "")),
            ErrorCode::InvalidArgument
        );
        assert_eq!(
            code(room.handle_react(T0, &1, &"x".repeat(17))),
            ErrorCode::InvalidArgument
        );
        assert_eq!(
            code(room.handle_react(T0, &1, "\u{0}")),
            ErrorCode::InvalidArgument
        );
        assert_eq!(code(room.handle_react(T0, &9, "👍")), ErrorCode::NotInRoom);
        // The limit is in bytes: an 18-byte family emoji is refused.
        assert_eq!(
            code(room.handle_react(T0, &1, "👨‍👩‍👧")),
            ErrorCode::InvalidArgument
        );
        assert_eq!(code(room.handle_leave(T0, &9)), ErrorCode::NotInRoom);

        room.handle_join(T0, 2, "b").expect("join");
        let full = room.handle_join(T0, 3, "c").expect_err("full");
        assert_eq!(full, RoomError::RoomFull);
        assert_eq!(full.code(), ErrorCode::Unavailable);
        room.handle_join(T0, 2, "b")
            .expect("rejoining a full room is still idempotent");

        let other = room
            .handle_join(T0, 1, "mallory")
            .expect_err("member is someone else");
        assert_eq!(other.code(), ErrorCode::Forbidden);
    }

    #[test]
    fn joining_twice_is_idempotent() {
        let mut room = room();
        let first = room.handle_join(T0, 7, HOST).expect("join");
        let again = room.handle_join(T0 + 5, 7, HOST).expect("join again");
        assert_eq!(first, again);
        assert_eq!(first.role, Role::Host);
        assert_eq!(room.member_count(), 1);
        assert_eq!(room.info().listener_count, 1);

        // A second device of the same user is a second member, not a second listener.
        let device = room.handle_join(T0 + 6, 8, HOST).expect("second device");
        assert_eq!(device.role, Role::Host);
        assert_eq!(room.member_count(), 2);
        assert_eq!(room.info().listener_count, 1);
        assert_eq!(room.members().copied().collect::<Vec<_>>(), vec![7, 8]);

        room.handle_leave(T0 + 7, &7).expect("leave");
        assert_eq!(room.info().listener_count, 1);
        room.handle_leave(T0 + 8, &8).expect("leave");
        assert_eq!(room.info().listener_count, 0);
        assert_eq!(room.handle_leave(T0 + 9, &8), Err(RoomError::NotInRoom));
    }

    fn stage_actions(effects: &[RoomEffect<u64>]) -> Vec<(StageAction, String)> {
        effects
            .iter()
            .filter_map(|e| match e {
                RoomEffect::Broadcast(Event::Stage(s)) | RoomEffect::Notify(_, Event::Stage(s)) => {
                    Some((s.action, s.user_id.clone()))
                }
                _ => None,
            })
            .collect()
    }

    fn code(result: Result<(), RoomError>) -> ErrorCode {
        result.expect_err("refused").code()
    }

    #[test]
    fn the_stage_follows_the_roles_rules() {
        let mut room = room();
        for (member, user) in [(1, HOST), (2, "mod"), (3, "ann"), (4, "bob"), (5, "bob")] {
            room.handle_join(T0, member, user).expect("join");
        }
        room.drain_effects();
        let stage =
            |room: &mut RoomCore<u64>, by: &str, command| room.handle_stage(T0, by, command);
        // R2: only the host makes moderators; nobody changes the host.
        let make_mod = StageCommand::SetRole {
            user: "mod".into(),
            role: Role::Moderator,
        };
        assert_eq!(
            code(stage(&mut room, "ann", make_mod.clone())),
            ErrorCode::Forbidden
        );
        stage(&mut room, HOST, make_mod).expect("host makes a moderator");
        assert_eq!(room.role_of("mod"), Role::Moderator);
        let demote_host = StageCommand::SetRole {
            user: HOST.into(),
            role: Role::Listener,
        };
        assert_eq!(
            code(stage(&mut room, "mod", demote_host)),
            ErrorCode::Forbidden
        );
        // R3: hands in order, seen by moderators; invitation, then acceptance.
        stage(&mut room, "bob", StageCommand::Hand { raised: true }).expect("hand");
        stage(&mut room, "ann", StageCommand::Hand { raised: true }).expect("hand");
        assert_eq!(room.stage_info("mod").hands, vec!["bob", "ann"]);
        assert!(
            room.stage_info("ann").hands.is_empty(),
            "listeners do not see hands"
        );
        let effects = room.drain_effects();
        let notified: Vec<&Vec<u64>> = effects
            .iter()
            .filter_map(|e| match e {
                RoomEffect::Notify(members, _) => Some(members),
                _ => None,
            })
            .collect();
        let mut first = notified[0].clone();
        first.sort_unstable();
        assert_eq!(
            first,
            vec![1, 2, 4, 5],
            "host, moderator and bob's two devices"
        );
        let to_stage = StageCommand::SetRole {
            user: "bob".into(),
            role: Role::Speaker,
        };
        assert_eq!(
            code(stage(&mut room, "mod", to_stage)),
            ErrorCode::InvalidArgument
        );
        let invite = StageCommand::Invite { user: "bob".into() };
        assert_eq!(
            code(stage(&mut room, "ann", invite.clone())),
            ErrorCode::Forbidden
        );
        stage(&mut room, "mod", invite).expect("invite");
        let accept = StageCommand::InviteAnswer { accept: true };
        assert_eq!(
            code(stage(&mut room, "ann", accept.clone())),
            ErrorCode::InvalidArgument
        );
        stage(&mut room, "bob", accept).expect("accept");
        assert_eq!(room.role_of("bob"), Role::Speaker);
        assert_eq!(
            room.stage_info("mod").hands,
            vec!["ann"],
            "bob's hand is down"
        );
        // R4: self mute and force-mute; no force-unmute.
        let mute_bob = |muted| StageCommand::Mute {
            user: Some("bob".into()),
            muted,
        };
        assert_eq!(
            code(stage(&mut room, "ann", mute_bob(true))),
            ErrorCode::Forbidden
        );
        stage(&mut room, "mod", mute_bob(true)).expect("force-mute");
        assert_eq!(
            code(stage(&mut room, "mod", mute_bob(false))),
            ErrorCode::Forbidden
        );
        stage(
            &mut room,
            "bob",
            StageCommand::Mute {
                user: None,
                muted: false,
            },
        )
        .expect("self");
        assert!(room.stage().muted.is_empty());
        let listener_mute = StageCommand::Mute {
            user: None,
            muted: true,
        };
        assert_eq!(
            code(stage(&mut room, "ann", listener_mute)),
            ErrorCode::InvalidArgument
        );
        // Moderators move speakers to the audience.
        let to_audience = StageCommand::SetRole {
            user: "bob".into(),
            role: Role::Listener,
        };
        stage(&mut room, "mod", to_audience).expect("move to audience");
        assert_eq!(room.role_of("bob"), Role::Listener);
        // R5: a moderator may not kick the host or another moderator; kick removes every
        // device, block keeps the user out.
        let kick = |user: &str| StageCommand::Kick { user: user.into() };
        assert_eq!(
            code(stage(&mut room, "mod", kick(HOST))),
            ErrorCode::Forbidden
        );
        assert_eq!(
            code(stage(&mut room, "ann", kick("bob"))),
            ErrorCode::Forbidden
        );
        room.drain_effects();
        stage(&mut room, "mod", kick("bob")).expect("kick");
        let effects = room.drain_effects();
        assert_eq!(
            stage_actions(&effects),
            vec![(StageAction::Kicked, "bob".into())]
        );
        assert!(effects
            .iter()
            .any(|e| matches!(e, RoomEffect::MembersRemoved(m) if m == &vec![4, 5])));
        room.handle_join(T0, 4, "bob")
            .expect("a kicked user may come back");
        let block = StageCommand::Block {
            user: "bob".into(),
            blocked: true,
        };
        stage(&mut room, "mod", block).expect("block");
        assert_eq!(
            room.handle_join(T0, 6, "bob").expect_err("blocked").code(),
            ErrorCode::Forbidden
        );
        // Everything above is durable and survives a new owner.
        let durable = room.durable();
        assert!(durable.revision > 0);
        let mut next = room_with(RoomConfig::default());
        next.handle_join(T0, 7, "bob").expect("before the restore");
        next.restore_durable(T0, durable);
        assert_eq!(next.role_of("mod"), Role::Moderator);
        assert!(next.stage().blocked.contains("bob"));
        assert_eq!(
            next.listener_count(),
            0,
            "the blocked member is removed on restore"
        );
        assert_eq!(next.stage_info(HOST).hands, vec!["ann"]);
    }

    /// docs/protocol.md §6.10: raising a hand is a listener's (2004 for anyone on stage);
    /// lowering a hand that is not raised changes nothing and succeeds quietly.
    #[test]
    fn hands_follow_the_documented_rules() {
        let mut room = room_with(RoomConfig::default());
        for (member, user) in [(1, HOST), (2, "a")] {
            room.handle_join(T0, member, user).expect("join");
        }
        room.drain_effects();
        let raised = room.handle_stage(T0, HOST, StageCommand::Hand { raised: true });
        assert_eq!(raised.expect_err("host").code(), ErrorCode::Forbidden);
        room.handle_stage(T0, HOST, StageCommand::Hand { raised: false })
            .expect("lowering no hand");
        room.handle_stage(T0, "a", StageCommand::Hand { raised: false })
            .expect("lowering no hand");
        assert!(room.drain_effects().is_empty(), "nothing to announce");
        room.handle_stage(T0, "a", StageCommand::Hand { raised: true })
            .expect("a listener raises");
        assert_eq!(room.stage_info(HOST).hands, vec!["a"]);
    }

    #[test]
    fn the_host_and_moderators_moderate_from_outside_the_room_and_others_act_from_inside() {
        let mut room = room();
        room.handle_join(T0, 2, "a").expect("join");
        room.handle_join(T0, 3, "b").expect("join");
        // The host is not in the room: it makes a moderator, invites, kicks, polls.
        room.handle_stage(
            T0,
            HOST,
            StageCommand::SetRole {
                user: "m".into(),
                role: Role::Moderator,
            },
        )
        .expect("the host names a moderator from outside");
        room.handle_stage(T0, "m", StageCommand::Invite { user: "a".into() })
            .expect("a moderator invites from outside");
        room.handle_stage(T0, "m", StageCommand::Kick { user: "b".into() })
            .expect("a moderator kicks from outside");
        room.handle_poll_create(T0, HOST, "Go?", &["y".into(), "n".into()])
            .expect("the host opens a poll from outside");
        // What one does as oneself needs the room.
        let hand = room.handle_stage(T0, "x", StageCommand::Hand { raised: true });
        assert_eq!(hand.expect_err("outside").code(), ErrorCode::NotInRoom);
        let own_mute = room.handle_stage(
            T0,
            HOST,
            StageCommand::Mute {
                user: None,
                muted: true,
            },
        );
        assert_eq!(own_mute.expect_err("outside").code(), ErrorCode::NotInRoom);
        // Moderating is by role: a listener outside (or inside) gets 2004.
        let invite = room.handle_stage(T0, "x", StageCommand::Invite { user: "a".into() });
        assert_eq!(
            invite.expect_err("not a moderator").code(),
            ErrorCode::Forbidden
        );
        let poll = room.handle_poll_create(T0, "x", "Me?", &["y".into(), "n".into()]);
        assert_eq!(
            poll.expect_err("not a moderator").code(),
            ErrorCode::Forbidden
        );
    }

    #[test]
    fn stage_bounds_hold() {
        let config = RoomConfig {
            hands_max: 1,
            speakers_max: 1,
            ..RoomConfig::default()
        };
        let mut room = room_with(config);
        for (member, user) in [(1, HOST), (2, "a"), (3, "b")] {
            room.handle_join(T0, member, user).expect("join");
        }
        room.handle_stage(T0, "a", StageCommand::Hand { raised: true })
            .expect("first hand");
        let full = room.handle_stage(T0, "b", StageCommand::Hand { raised: true });
        assert_eq!(full.expect_err("queue full").code(), ErrorCode::Unavailable);
        for user in ["a", "b"] {
            room.handle_stage(T0, HOST, StageCommand::Invite { user: user.into() })
                .expect("invite");
        }
        room.handle_stage(T0, "a", StageCommand::InviteAnswer { accept: true })
            .expect("first speaker");
        let full = room.handle_stage(T0, "b", StageCommand::InviteAnswer { accept: true });
        assert_eq!(full.expect_err("stage full").code(), ErrorCode::Unavailable);
        // Leaving the room leaves the stage.
        room.handle_leave(T0, &2).expect("leave");
        assert!(room.stage().speakers.is_empty());
    }

    #[test]
    fn presence_names_only_small_rooms_and_pages_list_everyone() {
        let mut room = room_with(RoomConfig {
            presence_users_max: 2,
            members_page_max: 2,
            ..RoomConfig::default()
        });
        let pushed = |room: &mut RoomCore<u64>| -> Vec<ListenersEvent> {
            room.drain_effects()
                .into_iter()
                .filter_map(|e| match e {
                    RoomEffect::Broadcast(Event::Listeners(l)) => Some(l),
                    _ => None,
                })
                .collect()
        };
        room.handle_join(T0, 1, "a").expect("join");
        room.handle_join(T0, 2, "b").expect("join");
        room.handle_tick(T0);
        let first = pushed(&mut room);
        assert_eq!(
            (first[0].count, first[0].joined.clone()),
            (2, vec!["a".into(), "b".into()])
        );
        // Above the bound: the count alone.
        room.handle_join(T0 + 1_000, 3, "c").expect("join");
        room.handle_tick(T0 + 1_000);
        let second = pushed(&mut room);
        assert_eq!(second[0].count, 3);
        assert!(second[0].joined.is_empty() && second[0].left.is_empty());
        // Pages: capped at members_page_max, in user order, to the end.
        let page = room.members_page(None, 10);
        assert_eq!(page.users.len(), 2);
        assert_eq!(page.next.as_deref(), Some("b"));
        let rest = room.members_page(page.next.as_deref(), 10);
        assert_eq!(rest.users.len(), 1);
        assert_eq!(rest.users[0].user_id, "c");
        assert_eq!((rest.next, rest.count), (None, 3));
    }

    #[test]
    fn interest_is_bounded_and_turns_into_a_notice_to_users_not_in_the_room() {
        let config = RoomConfig {
            interested_max: 2,
            ..RoomConfig::default()
        };
        let definition = RoomDefinition::new(
            "r-s".into(),
            "later",
            HOST.into(),
            Some(T0 + 60_000),
            T0,
            &config,
        )
        .expect("scheduled");
        let mut room: RoomCore<u64> = RoomCore::new(definition, config);
        assert_eq!(room.handle_interest("a", true), Ok(1));
        assert_eq!(room.handle_interest("a", true), Ok(1), "idempotent");
        assert_eq!(room.handle_interest("b", true), Ok(2));
        let full = room.handle_interest("c", true).expect_err("bound");
        assert_eq!(full.code(), ErrorCode::Unavailable);
        room.handle_join(T0, 1, "b").expect("b waits in the room");
        room.handle_join(T0, 2, HOST).expect("host");
        room.drain_effects();
        room.handle_start(T0 + 60_000, HOST).expect("start");
        let effects = room.drain_effects();
        let noticed: Vec<&Vec<UserId>> = effects
            .iter()
            .filter_map(|e| match e {
                RoomEffect::NotifyUsers(users, Event::Live(_)) => Some(users),
                _ => None,
            })
            .collect();
        assert_eq!(
            noticed,
            vec![&vec!["a".to_string()]],
            "b is in the room: the broadcast"
        );
        assert_eq!(broadcasts(&effects).len(), 1);
        let late = room.handle_interest("c", true).expect_err("live");
        assert_eq!(late.code(), ErrorCode::InvalidArgument);
    }

    #[test]
    fn only_unmuted_members_on_stage_are_relayed_in_order_and_speakers_are_announced() {
        let mut room = room();
        room.handle_join(T0, 1, HOST).expect("host joins");
        room.handle_join(T0, 2, "bob").expect("bob joins");
        let packet = |seq, level| AudioHeader {
            seq,
            timestamp_ms: seq * 20,
            level,
        };
        assert_eq!(room.handle_audio(T0, &1, &packet(1, 20)), Ok(()));
        assert_eq!(
            room.handle_audio(T0, &1, &packet(1, 20)),
            Err(AudioDrop::OutOfOrder)
        );
        assert_eq!(
            room.handle_audio(T0, &2, &packet(1, 20)),
            Err(AudioDrop::NotOnStage)
        );
        assert_eq!(
            room.handle_audio(T0, &3, &packet(1, 20)),
            Err(AudioDrop::NotInRoom)
        );
        room.handle_stage(
            T0,
            HOST,
            StageCommand::Mute {
                user: None,
                muted: true,
            },
        )
        .expect("host mutes itself");
        assert_eq!(
            room.handle_audio(T0, &1, &packet(2, 20)),
            Err(AudioDrop::Muted)
        );
        room.handle_stage(
            T0,
            HOST,
            StageCommand::Mute {
                user: None,
                muted: false,
            },
        )
        .expect("host unmutes");
        assert_eq!(room.handle_audio(T0, &1, &packet(3, 20)), Ok(()));
        room.drain_effects();
        tick_if_due(&mut room, T0 + 10);
        let effects = room.drain_effects();
        let speaking: Vec<&SpeakingEvent> = broadcasts(&effects)
            .into_iter()
            .filter_map(|e| match e {
                Event::Speaking(s) => Some(s),
                _ => None,
            })
            .collect();
        assert_eq!(speaking.len(), 1, "{effects:?}");
        assert_eq!(speaking[0].speakers[0].user_id, HOST);
        room.handle_end(T0 + 20, HOST).expect("end");
        assert_eq!(
            room.handle_audio(T0 + 30, &1, &packet(4, 20)),
            Err(AudioDrop::NotLive)
        );
    }
}
