//! Typed request, response and notification bodies, and the kind table.
//!
//! Each request kind has a body type and a response type ([`RequestKind`]); each
//! notification kind has a body type ([`Event`]). Unknown body fields are ignored, so
//! newer clients can talk to older servers; unknown kinds are refused with
//! `unknown_kind`.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::ProtocolError;
use crate::frame::{encode_request, Body, EncodedBody, Encoding};
use crate::voicemail::*;

/// A room identifier (opaque string, e.g. `r-3f9c…`).
pub type RoomId = String;
/// A user identifier, taken from the token's `sub` claim.
pub type UserId = String;
/// A session identifier, issued by the server in the `auth` response; used to resume.
pub type SessionId = String;

/// A request body type: its kind string and the type of its ok response.
pub trait RequestKind: Serialize + DeserializeOwned {
    /// The `kind` string on the wire.
    const KIND: &'static str;
    /// The ok body of the response.
    type Response: Serialize + DeserializeOwned;
}

/// A body with no fields (`{}`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Empty {}

/// `auth`: the first request on every connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthRequest {
    /// A JWT (HS256) with `sub` (user id) and `exp` (seconds since the epoch); optional `roles`.
    pub token: String,
    /// The protocol version the client speaks; absent means 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol_version: Option<u32>,
    /// Resume an earlier session instead of starting a new one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<ResumeRequest>,
}

/// The resume part of `auth`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumeRequest {
    /// The session id from an earlier `auth` response.
    pub session_id: SessionId,
    /// The highest notification sequence number the client has processed (0 if none).
    pub last_seq: u64,
    /// The rooms the client is in, each with the latest comment id it has. With this, any
    /// node can resume the session if the node that held it is gone: it re-joins these
    /// rooms and replays the comments after each id (within the rooms' recent logs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rooms: Option<std::collections::BTreeMap<RoomId, u64>>,
}

/// What happened to a resume request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResumeOutcome {
    /// No resume was asked for: a new session.
    New,
    /// The session was resumed: every notification after `last_seq` follows, in order.
    Resumed,
    /// The session could not be resumed (unknown, expired, other user, or the missed
    /// notifications are no longer buffered): a new session was started, the client must
    /// re-join its rooms and refetch state.
    Resync,
}

/// Response to `auth`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthResponse {
    /// The protocol version the server will speak.
    pub protocol_version: u32,
    /// The authenticated user.
    pub user_id: UserId,
    /// The session id to resume with later.
    pub session_id: SessionId,
    /// Whether an earlier session was resumed.
    pub resume: ResumeOutcome,
    /// The sequence number of the last notification already sent in this session (on
    /// resume: before replay starts, notifications `last_seq+1 ..` follow).
    pub notification_seq: u64,
    /// The node that accepted the connection.
    pub node: String,
    /// The server's ping interval; answer pings within two intervals.
    pub ping_interval_ms: u64,
    /// How long a disconnected session can be resumed.
    pub resume_window_ms: u64,
}

/// `ping`: from either side; the other answers with [`PingResponse`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PingRequest {}

/// Response to `ping`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PingResponse {
    /// Sender's wall clock, milliseconds since the Unix epoch (0 if not given).
    #[serde(default)]
    pub time_ms: u64,
}

/// A participant's role in a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The creator.
    Host,
    /// May moderate.
    Moderator,
    /// On stage.
    Speaker,
    /// In the audience.
    Listener,
}

/// Where a room is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoomState {
    /// Created with a future start; not live yet.
    Scheduled,
    /// Live.
    Live,
    /// Ended; no more joins.
    Ended,
}

/// A room as seen by members.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomInfo {
    /// Room id.
    pub room_id: RoomId,
    /// Title.
    pub title: String,
    /// The creator.
    pub host: UserId,
    /// Lifecycle state.
    pub state: RoomState,
    /// Scheduled start, ms since the epoch, if scheduled.
    #[serde(default)]
    pub scheduled_start_ms: Option<u64>,
    /// Creation time, ms since the epoch.
    pub created_at_ms: u64,
    /// Listeners (distinct users) currently in the room.
    pub listener_count: u64,
    /// Comments posted so far.
    pub comment_count: u64,
}

/// `room.create`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomCreateRequest {
    /// 1-200 characters.
    pub title: String,
    /// Optional scheduled start (ms since the epoch); absent means live now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_start_ms: Option<u64>,
}

/// Response to `room.create`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomCreateResponse {
    /// The new room's id.
    pub room_id: RoomId,
    /// The room.
    pub room: RoomInfo,
}

/// A request naming one room (`room.join`, `room.leave`, `room.end`, `room.info`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomRef {
    /// The room.
    pub room_id: RoomId,
}

/// `room.join` body.
pub type RoomJoinRequest = RoomRef;

/// Response to `room.join`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomJoinResponse {
    /// The room.
    pub room: RoomInfo,
    /// The joiner's role.
    pub role: Role,
    /// The last comments (oldest first), so a joiner sees the conversation.
    pub recent_comments: Vec<CommentEvent>,
    /// The stage: host, moderators and speakers in full.
    #[serde(default)]
    pub stage: StageInfo,
    /// The room's polls, open and closed, oldest first, with current tallies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub polls: Vec<PollInfo>,
}

/// `room.leave` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomLeaveRequest {
    /// The room.
    pub room_id: RoomId,
}

/// `room.start` body (host only): a scheduled room goes live.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomStartRequest {
    /// The room.
    pub room_id: RoomId,
}

/// `room.end` body (host only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomEndRequest {
    /// The room.
    pub room_id: RoomId,
}

/// `room.info` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomInfoRequest {
    /// The room.
    pub room_id: RoomId,
}

/// `room.members`: one page of the room's users, in user id order (R9: the listener list
/// is fetched in pages, never pushed whole).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomMembersRequest {
    /// The room.
    pub room_id: RoomId,
    /// Start after this user id (the previous page's `next`); absent: from the start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<UserId>,
    /// Users per page, 1-100 (default 50).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

/// A user in a room, with its role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    /// The user.
    pub user_id: UserId,
    /// Its role.
    pub role: Role,
}

/// Response to `room.members`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomMembersResponse {
    /// This page, in user id order.
    pub users: Vec<MemberInfo>,
    /// Where the next page starts (`after`), if there is one.
    #[serde(default)]
    pub next: Option<UserId>,
    /// Users in the room now.
    pub count: u64,
}

/// `room.invite_users`: the host or a moderator invites users to the room (scheduled or
/// live); each gets `room.invitation` on its sessions, wherever they are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomInviteUsersRequest {
    /// The room.
    pub room_id: RoomId,
    /// The users, 1-100.
    pub user_ids: Vec<UserId>,
}

/// `room.invitation` notification: someone invites this user to a room.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomInvitationEvent {
    /// The room.
    pub room_id: RoomId,
    /// Its title.
    pub title: String,
    /// Who invites.
    pub by: UserId,
    /// The room's state (a scheduled room: mark interest to hear when it starts).
    pub state: RoomState,
    /// Scheduled start, ms since the epoch, if scheduled.
    #[serde(default)]
    pub scheduled_start_ms: Option<u64>,
}

/// `room.interest`: mark (or unmark) interest in a scheduled room; no need to be in it.
/// Interested users get `room.live` when the host starts the room.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomInterestRequest {
    /// The room.
    pub room_id: RoomId,
    /// Interested (`true`) or not.
    pub interested: bool,
}

/// Response to `room.interest`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomInterestResponse {
    /// Users interested now.
    pub interested_count: u64,
}

/// `room.live` notification: a scheduled room went live. Sent to its members and to
/// every user who marked interest, on each of their sessions, wherever they are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomLiveEvent {
    /// The room.
    pub room_id: RoomId,
    /// Its title.
    pub title: String,
    /// Its host.
    pub host: UserId,
}

/// `room.list` body: a page of the cluster's rooms that are live or scheduled, newest
/// first (by creation time, then room id). Any node answers for the whole cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomListRequest {
    /// Only rooms in this state: `live` or `scheduled` (`ended` is refused with `4003`).
    /// Default: both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<RoomState>,
    /// Continue after this cursor: the previous page's `next`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    /// Rooms in the page, 1 to [`ROOM_LIST_PAGE_MAX`]; default 20 (larger values are
    /// capped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

/// Most rooms in one `room.list` page.
pub const ROOM_LIST_PAGE_MAX: u32 = 50;

/// One room in a `room.list` page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomListEntry {
    /// Room id.
    pub room_id: RoomId,
    /// Title.
    pub title: String,
    /// The host.
    pub host: UserId,
    /// `live` or `scheduled`.
    pub state: RoomState,
    /// Scheduled start, ms since the epoch, if the room was created with one.
    #[serde(default)]
    pub scheduled_start_ms: Option<u64>,
    /// When it went live, ms since the epoch.
    #[serde(default)]
    pub started_at_ms: Option<u64>,
    /// Creation time, ms since the epoch.
    pub created_at_ms: u64,
    /// Listeners (distinct users) in the room now, from its owner; `null` when the owner
    /// did not answer in time.
    #[serde(default)]
    pub listener_count: Option<u64>,
}

/// Response to `room.list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomListResponse {
    /// The page, newest first.
    pub rooms: Vec<RoomListEntry>,
    /// The `after` of the next page; `null` on the last.
    #[serde(default)]
    pub next: Option<String>,
}

/// `room.summary` body: read the room's totals (R10).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomSummaryRequest {
    /// The room.
    pub room_id: RoomId,
}

/// A room's totals, readable live (`room.summary`) and exported when the room ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomSummary {
    /// The room.
    pub room_id: RoomId,
    /// Title.
    pub title: String,
    /// Host.
    pub host: UserId,
    /// Lifecycle state.
    pub state: RoomState,
    /// When it went live, ms since the epoch (absent while scheduled).
    #[serde(default)]
    pub started_at_ms: Option<u64>,
    /// When it ended, ms since the epoch.
    #[serde(default)]
    pub ended_at_ms: Option<u64>,
    /// Live time so far (or in all, once ended), ms.
    pub duration_ms: u64,
    /// Comments posted.
    pub comments: u64,
    /// Reactions per emoji (at most 256 kinds; the rest under `"other"`).
    pub reactions: std::collections::BTreeMap<String, u64>,
    /// Most listeners at once.
    pub peak_listeners: u64,
    /// Distinct users ever in the room (estimated within a few percent).
    pub unique_listeners: u64,
    /// Listeners now.
    pub listeners: u64,
}

/// `room.poll_create` body: a moderator asks the room a question (R8).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomPollCreateRequest {
    /// The room.
    pub room_id: RoomId,
    /// The question, 1-200 characters.
    pub question: String,
    /// The answers, 2-10, each 1-80 characters, distinct.
    pub options: Vec<String>,
}

/// `room.vote` body: a member votes (again, to change its vote, while the poll is open).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomVoteRequest {
    /// The room.
    pub room_id: RoomId,
    /// The poll.
    pub poll_id: u64,
    /// Index of the chosen option, from 0.
    pub option: u32,
}

/// `room.poll_close` body: a moderator closes a poll; the final result is pushed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomPollCloseRequest {
    /// The room.
    pub room_id: RoomId,
    /// The poll.
    pub poll_id: u64,
}

/// `rain.grab` body: one tap on a red-packet rain (SPEC Q7). `request_id` is the client's
/// id for this tap (at most 64 bytes): a retry with the same id gets the same answer, and
/// is never paid twice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RainGrabRequest {
    /// The rain.
    pub rain_id: String,
    /// The client's id for this tap.
    pub request_id: String,
}

/// What a grab got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrabResult {
    /// A packet: `amount` cents (the same packet again for a repeated request id).
    Granted,
    /// Every packet is taken.
    NoneLeft,
    /// The user has as many packets as a user may get.
    CapReached,
    /// Too many grabs at once: tap again later.
    Throttled,
    /// The rain has not started.
    NotStarted,
    /// The rain is over.
    Ended,
}

/// `rain.grab` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RainGrabResponse {
    /// The rain.
    pub rain_id: String,
    /// The outcome.
    pub result: GrabResult,
    /// Cents, when granted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount: Option<u64>,
    /// The packet's index, when granted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packet: Option<u32>,
    /// The share of taps a client should send (0 < throttle ≤ 1), as in `rain.start`.
    pub throttle: f64,
}

/// `rain.start` notification: a rain begins in the room. Clients send only a `throttle`
/// share of their taps (the server computed it from the room's audience and the packets),
/// and the server's token bucket applies too.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RainStartEvent {
    /// The room.
    pub room_id: RoomId,
    /// The rain.
    pub rain_id: String,
    /// Packets.
    pub count: u32,
    /// Start, ms since the epoch.
    pub start_ms: u64,
    /// End, ms since the epoch.
    pub end_ms: u64,
    /// The share of taps to send, 0 < throttle ≤ 1.
    pub throttle: f64,
}

/// `rain.ended` notification: the rain is over; what was not grabbed went back to its
/// creator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RainEndedEvent {
    /// The room.
    pub room_id: RoomId,
    /// The rain.
    pub rain_id: String,
    /// Packets granted.
    pub granted: u64,
    /// Cents granted.
    pub granted_cents: u64,
    /// Cents refunded to the creator.
    pub refunded_cents: u64,
}

/// A poll's lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PollState {
    /// Taking votes.
    Open,
    /// Closed by a moderator (or the room ended): the tallies are final.
    Closed,
}

/// A poll and its tallies (`room.poll` notification, `room.poll_create` and
/// `room.poll_close` answers, `room.join` answers).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PollInfo {
    /// The room.
    pub room_id: RoomId,
    /// Numbered from 1 in the room.
    pub poll_id: u64,
    /// The question.
    pub question: String,
    /// The answers.
    pub options: Vec<String>,
    /// Votes per option, in option order.
    pub tallies: Vec<u64>,
    /// Users who voted.
    pub voters: u64,
    /// Open or closed.
    pub state: PollState,
    /// Who created it.
    pub by: UserId,
    /// When, ms since the epoch.
    pub created_at_ms: u64,
    /// When it closed, ms since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closed_at_ms: Option<u64>,
}

/// `room.stage` body: read the stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomStageRequest {
    /// The room.
    pub room_id: RoomId,
}

/// `room.comment`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomCommentRequest {
    /// The room.
    pub room_id: RoomId,
    /// 1-500 characters.
    pub text: String,
    /// The client's id for this comment, 1-64 bytes, unique per user (e.g. a UUID): a
    /// request sent again with the same id (a retry after a timeout or a reconnect, on any
    /// node) is answered with the first answer and posts nothing. See
    /// [`REQUEST_ID_BYTES_MAX`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// Longest `request_id`, in bytes.
pub const REQUEST_ID_BYTES_MAX: usize = 64;

/// Response to `room.comment`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomCommentResponse {
    /// The comment's position in the room's total order (1, 2, …).
    pub comment_id: u64,
}

/// `room.react`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomReactRequest {
    /// The room.
    pub room_id: RoomId,
    /// One emoji (1-16 bytes of UTF-8).
    pub emoji: String,
}

/// `room.bullet`: a bullet comment (SPEC Q6), shown over the room's stream if it is
/// chosen for a window (`room.bullets`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomBulletRequest {
    /// The room.
    pub room_id: RoomId,
    /// 1-50 characters (the node's `bullets.chars_max`) after trimming, no control
    /// characters, no blocked word.
    pub text: String,
}

/// `room.set_role`: the host makes or unmakes moderators; moderators move a speaker to
/// the audience (`listener`); a speaker leaves the stage by setting its own role to
/// `listener`. Nobody becomes a speaker this way: moderators invite (`room.invite`) and
/// the listener accepts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomSetRoleRequest {
    /// The room.
    pub room_id: RoomId,
    /// Whose role changes.
    pub user_id: UserId,
    /// The new role (`moderator`, `speaker` for a moderator stepping down, or `listener`).
    pub role: Role,
}

/// `room.hand`: a listener raises or lowers its hand.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomHandRequest {
    /// The room.
    pub room_id: RoomId,
    /// Raised (`true`) or lowered.
    pub raised: bool,
}

/// `room.invite`: a moderator invites a listener to speak.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomInviteRequest {
    /// The room.
    pub room_id: RoomId,
    /// The listener invited.
    pub user_id: UserId,
}

/// `room.invite_answer`: the invited listener accepts (comes on stage) or declines.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomInviteAnswerRequest {
    /// The room.
    pub room_id: RoomId,
    /// Accept (`true`) or decline.
    pub accept: bool,
}

/// `room.mute`: a speaker mutes or unmutes itself (no `user_id`, or its own); a moderator
/// force-mutes another speaker (`muted: true` only: moderators may ask, not unmute).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomMuteRequest {
    /// The room.
    pub room_id: RoomId,
    /// Whose microphone; absent means the caller's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<UserId>,
    /// Muted (`true`) or not.
    pub muted: bool,
}

/// `room.kick`: a moderator removes a user from the room now; it may join again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomKickRequest {
    /// The room.
    pub room_id: RoomId,
    /// Who.
    pub user_id: UserId,
}

/// `room.block`: a moderator blocks a user (removed now, may not join again for the room's
/// life) or lifts the block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomBlockRequest {
    /// The room.
    pub room_id: RoomId,
    /// Who.
    pub user_id: UserId,
    /// Blocked (`true`) or not.
    pub blocked: bool,
}

/// The stage of a room: its roles in full (response to `room.stage`, and part of the
/// `room.join` response).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageInfo {
    /// The room.
    pub room_id: RoomId,
    /// The host.
    pub host: UserId,
    /// Moderators (besides the host).
    pub moderators: Vec<UserId>,
    /// Speakers (besides the host and moderators, who are on stage too).
    pub speakers: Vec<UserId>,
    /// Muted users on stage.
    pub muted: Vec<UserId>,
    /// Raised hands, in order; only shown to the host and moderators (empty otherwise).
    pub hands: Vec<UserId>,
    /// Listeners invited to speak who have not answered; shown to the host and moderators.
    pub invited: Vec<UserId>,
}

/// What changed on a room's stage (`room.stage` notification).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageAction {
    /// `user_id` has a new role (`role`).
    RoleChanged,
    /// `user_id` raised its hand (to the host and moderators).
    HandRaised,
    /// `user_id` lowered its hand, or it was lowered (to the host and moderators).
    HandLowered,
    /// `user_id` was invited to speak (to it, the host and moderators).
    Invited,
    /// `user_id` declined (to the host and moderators).
    InviteDeclined,
    /// `user_id` is muted.
    Muted,
    /// `user_id` unmuted itself.
    Unmuted,
    /// `user_id` was removed from the room.
    Kicked,
    /// `user_id` is blocked from the room.
    Blocked,
    /// `user_id` may join again.
    Unblocked,
}

/// `room.stage` notification: one change on the stage or one moderation action. Every
/// moderation action is sent to the whole room.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageEvent {
    /// The room.
    pub room_id: RoomId,
    /// What happened.
    pub action: StageAction,
    /// To whom.
    pub user_id: UserId,
    /// Who did it.
    pub by: UserId,
    /// The new role, for `role_changed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
}

/// `room.comment` notification: one comment, in the room's total order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommentEvent {
    /// The room.
    pub room_id: RoomId,
    /// Position in the room's total order, from 1, without gaps.
    pub comment_id: u64,
    /// Author.
    pub user_id: UserId,
    /// Text.
    pub text: String,
    /// Server time the comment was ordered, ms since the epoch.
    pub at_ms: u64,
}

/// `room.gap` notification: the session could not be given the room's comments after
/// `after` and before `next` (it missed more than the room's recent log holds, e.g. on a
/// node cut off from the cluster); it goes on from `next`. Fetch the missing ones with
/// `room.comments` (`after`, until `next - 1`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GapEvent {
    /// The room.
    pub room_id: RoomId,
    /// The latest comment id the session had.
    pub after: u64,
    /// The next comment id it gets.
    pub next: u64,
}

/// `room.comments`: the room's comments after `after`, oldest first (a page).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomCommentsRequest {
    /// The room.
    pub room_id: RoomId,
    /// The page starts after this comment id (0: from the first).
    pub after: u64,
    /// Most comments in the page, 1 to [`COMMENTS_PAGE_MAX`]; default 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

/// Most comments in one `room.comments` page.
pub const COMMENTS_PAGE_MAX: u32 = 100;

/// Answer to `room.comments`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomCommentsResponse {
    /// The comments, ids ascending and consecutive from `after + 1` (shorter than the
    /// limit at the end of the room's comments, or where the history cannot be read).
    pub comments: Vec<CommentEvent>,
    /// The room's comment count: the id of its latest comment.
    pub comment_count: u64,
}

/// `room.reactions` notification: reactions aggregated over one window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReactionsEvent {
    /// The room.
    pub room_id: RoomId,
    /// Length of the aggregation window.
    pub window_ms: u64,
    /// Count per emoji in this window.
    pub counts: BTreeMap<String, u64>,
}

/// One bullet comment shown in a room.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bullet {
    /// Who sent it.
    pub user_id: UserId,
    /// Its text.
    pub text: String,
    /// When the sender's node accepted it, ms since the epoch.
    pub at_ms: u64,
}

/// `room.bullets` notification: the bullet comments chosen for one window (at most the
/// room's rate times the window), in the order they were sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BulletsEvent {
    /// The room.
    pub room_id: RoomId,
    /// The chosen bullets, oldest first.
    pub bullets: Vec<Bullet>,
}

/// `room.listeners` notification: the listener count, pushed at a bounded rate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenersEvent {
    /// The room.
    pub room_id: RoomId,
    /// Distinct users in the room.
    pub count: u64,
    /// Users who came since the previous push: only in rooms of at most
    /// `presence_users_max` users (default 100); bigger rooms push the count alone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub joined: Vec<UserId>,
    /// Users who left since the previous push (as `joined`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub left: Vec<UserId>,
}

/// One speaker in a `room.speaking` notification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActiveSpeaker {
    /// The speaking user.
    pub user_id: UserId,
    /// Level of its latest speech packet, 0 (loudest) to 127 (silence), -dBov.
    pub level: u8,
}

/// `room.speaking` notification: who is speaking now, loudest first; pushed when the list
/// changes, at most a few times a second.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpeakingEvent {
    /// The room.
    pub room_id: RoomId,
    /// Active speakers, loudest first (empty: no one speaks).
    pub speakers: Vec<ActiveSpeaker>,
}

/// `room.ended` notification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomEndedEvent {
    /// The room.
    pub room_id: RoomId,
    /// Who ended it.
    pub by: UserId,
}

/// `quiz.answer`: a viewer's answer to the open question of a quiz show (it must be in
/// the show's room). Judged at once; the verdict comes back sealed (see `sealed.rs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuizAnswerRequest {
    /// The show.
    pub quiz_id: String,
    /// The question's index, from 0.
    pub question: u32,
    /// The chosen option's index, from 0.
    pub option: u8,
}

/// Response to `quiz.answer`, and the `quiz.result` notification to the answering
/// session: the verdict sealed with the question's key, which arrives with
/// `quiz.announce`. A repeated answer gets the same bytes back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuizResultEvent {
    /// The show's room.
    pub room_id: RoomId,
    /// The show.
    pub quiz_id: String,
    /// The question.
    pub question: u32,
    /// The sealed verdict, lowercase hex (`crate::sealed::open_verdict`).
    pub sealed: String,
}

/// `quiz.question` notification: question `index` is open until `deadline_ms` (server
/// clock). The right option is not in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuizQuestionEvent {
    /// The show's room.
    pub room_id: RoomId,
    /// The show.
    pub quiz_id: String,
    /// The question's index, from 0.
    pub index: u32,
    /// Questions in the show.
    pub questions: u32,
    /// The question.
    pub text: String,
    /// The options.
    pub options: Vec<String>,
    /// Answers after this are late, ms since the epoch.
    pub deadline_ms: u64,
}

/// `quiz.announce` notification: the answer to `question`, one identical packet for
/// every viewer, with the key that opens the sealed results.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuizAnnounceEvent {
    /// The show's room.
    pub room_id: RoomId,
    /// The show.
    pub quiz_id: String,
    /// The question.
    pub question: u32,
    /// The right option.
    pub correct: u8,
    /// The question's key, lowercase hex (32 bytes).
    pub key: String,
    /// Judged answers in time per option.
    pub counts: Vec<u64>,
    /// Whether this was the last question.
    pub last: bool,
}

/// `quiz.finished` notification: the prize was split among the winners.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuizFinishedEvent {
    /// The show's room.
    pub room_id: RoomId,
    /// The show.
    pub quiz_id: String,
    /// Viewers who passed every question.
    pub winners: u64,
    /// The prize, cents.
    pub prize_cents: u64,
    /// Each winner's share, cents (the first `prize_cents mod winners` winners by user id
    /// get one cent more).
    pub share_cents: u64,
}

macro_rules! request_table {
    ($( $(#[$doc:meta])* $variant:ident = $kind:literal : $req:ty => $resp:ty ),* $(,)?) => {
        /// Every request a client may send, decoded.
        #[derive(Debug, Clone, PartialEq)]
        pub enum ClientRequest {
            $( $(#[$doc])* $variant($req), )*
        }

        impl ClientRequest {
            /// Every request kind, in table order.
            pub const KINDS: &'static [&'static str] = &[$($kind),*];

            /// The `kind` string.
            pub fn kind(&self) -> &'static str {
                match self { $( ClientRequest::$variant(_) => $kind, )* }
            }

            /// Decodes a request body by kind.
            pub fn decode(kind: &str, body: &Body) -> Result<Self, ProtocolError> {
                match kind {
                    $( $kind => Ok(ClientRequest::$variant(body.decode(kind)?)), )*
                    other => Err(ProtocolError::UnknownKind(other.to_string())),
                }
            }

            /// Encodes the request as a frame.
            pub fn encode(&self, encoding: Encoding, seq: u64) -> Result<Bytes, ProtocolError> {
                match self { $( ClientRequest::$variant(b) => encode_request(encoding, seq, $kind, b), )* }
            }

            /// Decodes the `ok` body of a response to a request of `kind` as its type and
            /// encodes it back as JSON (what this server would send for it).
            pub fn response_json(kind: &str, ok: &Body) -> Result<serde_json::Value, ProtocolError> {
                match kind {
                    $( $kind => serde_json::to_value(ok.decode::<$resp>(kind)?)
                        .map_err(|e| ProtocolError::Encode(e.to_string())), )*
                    other => Err(ProtocolError::UnknownKind(other.to_string())),
                }
            }
        }
    };
}

request_table! {
    /// `auth`
    Auth = "auth": AuthRequest => AuthResponse,
    /// `ping`
    Ping = "ping": PingRequest => PingResponse,
    /// `room.create`
    RoomCreate = "room.create": RoomCreateRequest => RoomCreateResponse,
    /// `room.join`
    RoomJoin = "room.join": RoomRef => RoomJoinResponse,
    /// `room.leave`
    RoomLeave = "room.leave": RoomLeaveRequest => Empty,
    /// `room.start`
    RoomStart = "room.start": RoomStartRequest => Empty,
    /// `room.end`
    RoomEnd = "room.end": RoomEndRequest => Empty,
    /// `room.info`
    RoomInfo = "room.info": RoomInfoRequest => RoomInfo,
    /// `room.comment`
    RoomComment = "room.comment": RoomCommentRequest => RoomCommentResponse,
    /// `room.comments`
    RoomComments = "room.comments": RoomCommentsRequest => RoomCommentsResponse,
    /// `room.react`
    RoomReact = "room.react": RoomReactRequest => Empty,
    /// `room.set_role`
    RoomSetRole = "room.set_role": RoomSetRoleRequest => Empty,
    /// `room.hand`
    RoomHand = "room.hand": RoomHandRequest => Empty,
    /// `room.invite`
    RoomInvite = "room.invite": RoomInviteRequest => Empty,
    /// `room.invite_answer`
    RoomInviteAnswer = "room.invite_answer": RoomInviteAnswerRequest => Empty,
    /// `room.mute`
    RoomMute = "room.mute": RoomMuteRequest => Empty,
    /// `room.kick`
    RoomKick = "room.kick": RoomKickRequest => Empty,
    /// `room.block`
    RoomBlock = "room.block": RoomBlockRequest => Empty,
    /// `room.stage`
    RoomStage = "room.stage": RoomStageRequest => StageInfo,
    /// `room.members`
    RoomMembers = "room.members": RoomMembersRequest => RoomMembersResponse,
    /// `room.interest`
    RoomInterest = "room.interest": RoomInterestRequest => RoomInterestResponse,
    /// `room.summary`
    RoomSummary = "room.summary": RoomSummaryRequest => RoomSummary,
    /// `room.list`
    RoomList = "room.list": RoomListRequest => RoomListResponse,
    /// `room.invite_users`
    RoomInviteUsers = "room.invite_users": RoomInviteUsersRequest => Empty,
    /// `room.poll_create`
    RoomPollCreate = "room.poll_create": RoomPollCreateRequest => PollInfo,
    /// `room.vote`
    RoomVote = "room.vote": RoomVoteRequest => Empty,
    /// `room.poll_close`
    RoomPollClose = "room.poll_close": RoomPollCloseRequest => PollInfo,
    /// `rain.grab`
    RainGrab = "rain.grab": RainGrabRequest => RainGrabResponse,
    /// `room.bullet`
    RoomBullet = "room.bullet": RoomBulletRequest => Empty,
    /// `quiz.answer`
    QuizAnswer = "quiz.answer": QuizAnswerRequest => QuizResultEvent,
    /// `vm.send`
    VmSend = "vm.send": VmSendRequest => VmSendResponse,
    /// `vm.chunk`
    VmChunk = "vm.chunk": VmChunkRequest => VmUploadState,
    /// `vm.status`
    VmStatus = "vm.status": VmStatusRequest => VmUploadState,
    /// `vm.cancel`
    VmCancel = "vm.cancel": VmCancelRequest => VmUploadState,
    /// `vm.fetch`
    VmFetch = "vm.fetch": VmFetchRequest => VmFetchResponse,
    /// `vm.sync`
    VmSync = "vm.sync": VmSyncRequest => VmPage,
    /// `vm.read`
    VmRead = "vm.read": VmReadRequest => VmStateEvent,
    /// `vm.play`
    VmPlay = "vm.play": VmPlayRequest => VmStateEvent,
    /// `vm.history`
    VmHistory = "vm.history": VmHistoryRequest => VmPage,
    /// `vm.group_create`
    VmGroupCreate = "vm.group_create": VmGroupCreateRequest => VmGroup,
    /// `vm.group_info`
    VmGroupInfo = "vm.group_info": VmGroupInfoRequest => VmGroup,
}

macro_rules! request_kinds {
    ($( $req:ty = $kind:literal => $resp:ty ),* $(,)?) => {
        $( impl RequestKind for $req { const KIND: &'static str = $kind; type Response = $resp; } )*
    };
}

request_kinds! {
    AuthRequest = "auth" => AuthResponse,
    PingRequest = "ping" => PingResponse,
    RoomCreateRequest = "room.create" => RoomCreateResponse,
    RoomRef = "room.join" => RoomJoinResponse,
    RoomLeaveRequest = "room.leave" => Empty,
    RoomStartRequest = "room.start" => Empty,
    RoomEndRequest = "room.end" => Empty,
    RoomInfoRequest = "room.info" => RoomInfo,
    RoomCommentRequest = "room.comment" => RoomCommentResponse,
    RoomCommentsRequest = "room.comments" => RoomCommentsResponse,
    RoomReactRequest = "room.react" => Empty,
    RoomSetRoleRequest = "room.set_role" => Empty,
    RoomHandRequest = "room.hand" => Empty,
    RoomInviteRequest = "room.invite" => Empty,
    RoomInviteAnswerRequest = "room.invite_answer" => Empty,
    RoomMuteRequest = "room.mute" => Empty,
    RoomKickRequest = "room.kick" => Empty,
    RoomBlockRequest = "room.block" => Empty,
    RoomStageRequest = "room.stage" => StageInfo,
    RoomMembersRequest = "room.members" => RoomMembersResponse,
    RoomInterestRequest = "room.interest" => RoomInterestResponse,
    RoomSummaryRequest = "room.summary" => RoomSummary,
    RoomListRequest = "room.list" => RoomListResponse,
    RoomInviteUsersRequest = "room.invite_users" => Empty,
    RoomPollCreateRequest = "room.poll_create" => PollInfo,
    RoomVoteRequest = "room.vote" => Empty,
    RoomPollCloseRequest = "room.poll_close" => PollInfo,
    RainGrabRequest = "rain.grab" => RainGrabResponse,
    RoomBulletRequest = "room.bullet" => Empty,
    QuizAnswerRequest = "quiz.answer" => QuizResultEvent,
    VmSendRequest = "vm.send" => VmSendResponse,
    VmChunkRequest = "vm.chunk" => VmUploadState,
    VmStatusRequest = "vm.status" => VmUploadState,
    VmCancelRequest = "vm.cancel" => VmUploadState,
    VmFetchRequest = "vm.fetch" => VmFetchResponse,
    VmSyncRequest = "vm.sync" => VmPage,
    VmReadRequest = "vm.read" => VmStateEvent,
    VmPlayRequest = "vm.play" => VmStateEvent,
    VmHistoryRequest = "vm.history" => VmPage,
    VmGroupCreateRequest = "vm.group_create" => VmGroup,
    VmGroupInfoRequest = "vm.group_info" => VmGroup,
}

macro_rules! event_table {
    ($( $(#[$doc:meta])* $variant:ident = $kind:literal : $body:ty ),* $(,)?) => {
        /// Every notification the server may push, decoded.
        #[derive(Debug, Clone, PartialEq)]
        pub enum Event {
            $( $(#[$doc])* $variant($body), )*
        }

        impl Event {
            /// Every notification kind.
            pub const KINDS: &'static [&'static str] = &[$($kind),*];

            /// The `kind` string.
            pub fn kind(&self) -> &'static str {
                match self { $( Event::$variant(_) => $kind, )* }
            }

            /// Decodes a notification body by kind.
            pub fn decode(kind: &str, body: &Body) -> Result<Self, ProtocolError> {
                match kind {
                    $( $kind => Ok(Event::$variant(body.decode(kind)?)), )*
                    other => Err(ProtocolError::UnknownKind(other.to_string())),
                }
            }

            /// Encodes the body once for fan-out (with its position, for ordered events).
            pub fn encode_body(&self) -> Result<EncodedBody, ProtocolError> {
                let body = match self { $( Event::$variant(b) => EncodedBody::new($kind, b), )* }?;
                Ok(match self.position() {
                    Some((room_id, position)) => body.with_position(room_id, position),
                    None => body,
                })
            }

            /// As [`Self::encode_body`], naming the room by `room` (one name shared by all
            /// of a room's events) when the event is in that room's order.
            pub fn encode_body_in(
                &self,
                room: &std::sync::Arc<str>,
            ) -> Result<EncodedBody, ProtocolError> {
                let body = match self { $( Event::$variant(b) => EncodedBody::new($kind, b), )* }?;
                Ok(match self.position() {
                    Some((room_id, position)) if room_id == &**room => {
                        body.with_room_position(room.clone(), position)
                    }
                    Some((room_id, position)) => body.with_position(room_id, position),
                    None => body,
                })
            }

            /// The body as a JSON value (for printing).
            pub fn body_json(&self) -> serde_json::Value {
                match self { $( Event::$variant(b) => serde_json::to_value(b).unwrap_or_default(), )* }
            }
        }
    };
}

event_table! {
    /// A comment.
    Comment = "room.comment": CommentEvent,
    /// Comments a session could not be given (fetch them with `room.comments`).
    Gap = "room.gap": GapEvent,
    /// Aggregated reactions.
    Reactions = "room.reactions": ReactionsEvent,
    /// Listener count.
    Listeners = "room.listeners": ListenersEvent,
    /// The room ended.
    RoomEnded = "room.ended": RoomEndedEvent,
    /// A stage change or moderation action.
    Stage = "room.stage": StageEvent,
    /// A scheduled room went live.
    Live = "room.live": RoomLiveEvent,
    /// An invitation to a room.
    Invitation = "room.invitation": RoomInvitationEvent,
    /// The active speakers changed.
    Speaking = "room.speaking": SpeakingEvent,
    /// A poll opened, its tallies changed, or it closed.
    Poll = "room.poll": PollInfo,
    /// A red-packet rain starts.
    RainStart = "rain.start": RainStartEvent,
    /// A red-packet rain ended.
    RainEnded = "rain.ended": RainEndedEvent,
    /// Bullet comments chosen for one window.
    Bullets = "room.bullets": BulletsEvent,
    /// A quiz question opened.
    QuizQuestion = "quiz.question": QuizQuestionEvent,
    /// A viewer's sealed verdict (to the answering session).
    QuizResult = "quiz.result": QuizResultEvent,
    /// A quiz question's answer, with the key to the sealed verdicts.
    QuizAnnounce = "quiz.announce": QuizAnnounceEvent,
    /// A quiz show's prize was split.
    QuizFinished = "quiz.finished": QuizFinishedEvent,
    /// A voice message entered the user's inbox.
    VmMessage = "vm.message": VmMessageEvent,
    /// A voice message's state for the user changed.
    VmState = "vm.state": VmStateEvent,
    /// More of a voice message's audio is stored, or its upload ended.
    VmBytes = "vm.bytes": VmBytesEvent,
}

impl Event {
    /// The room this event belongs to (`None` for voice messages).
    pub fn room_id(&self) -> Option<&str> {
        match self {
            Event::Comment(e) => Some(&e.room_id),
            Event::Gap(e) => Some(&e.room_id),
            Event::Reactions(e) => Some(&e.room_id),
            Event::Listeners(e) => Some(&e.room_id),
            Event::RoomEnded(e) => Some(&e.room_id),
            Event::Stage(e) => Some(&e.room_id),
            Event::Live(e) => Some(&e.room_id),
            Event::Invitation(e) => Some(&e.room_id),
            Event::Speaking(e) => Some(&e.room_id),
            Event::Poll(e) => Some(&e.room_id),
            Event::RainStart(e) => Some(&e.room_id),
            Event::RainEnded(e) => Some(&e.room_id),
            Event::Bullets(e) => Some(&e.room_id),
            Event::QuizQuestion(e) => Some(&e.room_id),
            Event::QuizResult(e) => Some(&e.room_id),
            Event::QuizAnnounce(e) => Some(&e.room_id),
            Event::QuizFinished(e) => Some(&e.room_id),
            Event::VmMessage(_) | Event::VmState(_) | Event::VmBytes(_) => None,
        }
    }

    /// For events in the room's total order (comments): the room and the position.
    pub fn position(&self) -> Option<(&str, u64)> {
        match self {
            Event::Comment(e) => Some((&e.room_id, e.comment_id)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{decode_frame, Frame};
    use crate::limits::FrameLimits;

    #[test]
    fn every_request_kind_round_trips() {
        let requests = [
            ClientRequest::Auth(AuthRequest {
                token: "t".into(),
                protocol_version: Some(1),
                resume: Some(ResumeRequest {
                    rooms: Some([("r-1".to_string(), 4)].into_iter().collect()),
                    session_id: "s".into(),
                    last_seq: 4,
                }),
            }),
            ClientRequest::Ping(PingRequest {}),
            ClientRequest::RoomCreate(RoomCreateRequest {
                title: "t".into(),
                scheduled_start_ms: None,
            }),
            ClientRequest::RoomJoin(RoomRef {
                room_id: "r".into(),
            }),
            ClientRequest::RoomComment(RoomCommentRequest {
                room_id: "r".into(),
                text: "hello".into(),
                request_id: None,
            }),
            ClientRequest::RoomComments(RoomCommentsRequest {
                room_id: "r-1".into(),
                after: 40,
                limit: Some(20),
            }),
            ClientRequest::RoomReact(RoomReactRequest {
                room_id: "r".into(),
                emoji: "👏".into(),
            }),
            ClientRequest::RoomBullet(RoomBulletRequest {
                room_id: "r".into(),
                text: "666".into(),
            }),
        ];
        for enc in [Encoding::MsgPack, Encoding::Json] {
            for (i, req) in requests.iter().enumerate() {
                let bytes = req.encode(enc, i as u64 + 1).expect("encode");
                let Frame::Request(frame) =
                    decode_frame(enc, &bytes, &FrameLimits::default()).expect("decode")
                else {
                    panic!("not a request")
                };
                let back = ClientRequest::decode(&frame.kind, &frame.body).expect("body");
                assert_eq!(&back, req);
            }
        }
    }

    #[test]
    fn unknown_kind_and_bad_body_are_distinguished() {
        let err = ClientRequest::decode("room.fly", &Body::Empty).unwrap_err();
        assert!(matches!(err, ProtocolError::UnknownKind(_)));
        let err = ClientRequest::decode("room.join", &Body::Empty).unwrap_err();
        assert!(matches!(err, ProtocolError::InvalidBody { .. }), "{err}");
        // ping has no required fields: an absent body is fine
        ClientRequest::decode("ping", &Body::Empty).expect("ping without body");
    }

    #[test]
    fn kinds_tables_agree() {
        // Every request type's kind is in the dispatch table, once.
        let kinds = [
            AuthRequest::KIND,
            PingRequest::KIND,
            RoomCreateRequest::KIND,
            RoomRef::KIND,
            RoomLeaveRequest::KIND,
            RoomStartRequest::KIND,
            RoomEndRequest::KIND,
            RoomInfoRequest::KIND,
            RoomCommentRequest::KIND,
            RoomCommentsRequest::KIND,
            RoomReactRequest::KIND,
            RoomSetRoleRequest::KIND,
            RoomHandRequest::KIND,
            RoomInviteRequest::KIND,
            RoomInviteAnswerRequest::KIND,
            RoomMuteRequest::KIND,
            RoomKickRequest::KIND,
            RoomBlockRequest::KIND,
            RoomStageRequest::KIND,
            RoomMembersRequest::KIND,
            RoomInterestRequest::KIND,
            RoomSummaryRequest::KIND,
            RoomListRequest::KIND,
            RoomInviteUsersRequest::KIND,
            RoomPollCreateRequest::KIND,
            RoomVoteRequest::KIND,
            RoomPollCloseRequest::KIND,
            RainGrabRequest::KIND,
            RoomBulletRequest::KIND,
            QuizAnswerRequest::KIND,
            VmSendRequest::KIND,
            VmChunkRequest::KIND,
            VmStatusRequest::KIND,
            VmCancelRequest::KIND,
            VmFetchRequest::KIND,
            VmSyncRequest::KIND,
            VmReadRequest::KIND,
            VmPlayRequest::KIND,
            VmHistoryRequest::KIND,
            VmGroupCreateRequest::KIND,
            VmGroupInfoRequest::KIND,
        ];
        assert_eq!(ClientRequest::KINDS, kinds.as_slice());
        assert!(Event::KINDS.contains(&"room.comment"));
        assert!(Event::KINDS.contains(&"room.stage"));
    }
}
