//! Session and connection cores (sans-IO).
//!
//! A *session* is what a client resumes: its notification sequence, a bounded buffer of
//! recent notifications, and its room memberships. It outlives a connection by the resume
//! window. A *connection* is one transport attachment: its request order, rate limit and
//! liveness (server pings). Neither reads the clock nor touches a socket: the node's
//! connection driver feeds them `now_ms` and executes what they decide.
//!
//! Per room a session keeps the position (comment id) of the latest comment it delivered.
//! [`SessionCore::handle_position`] says whether the next one is delivered, a repeat, or a
//! gap (one it lacks comes first), and whether to start a repair; the node's session shell
//! drops repeats and gaps and re-joins the room to repair.

use std::collections::VecDeque;
use std::sync::Arc;

use chorus_protocol::{ErrorCode, RoomId};

use crate::rate::TokenBucket;

/// Session limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionConfig {
    /// How long a detached session can be resumed, in ms. Default 60,000. After this the
    /// session leaves its rooms and is forgotten; a resume gets `resync`.
    pub resume_window_ms: u64,
    /// Notifications kept for replay on resume. Default 1,024. A client that missed more
    /// than this gets `resync`.
    pub resume_buffer_frames_max: usize,
    /// Rooms one session may be in at once. Default 16; more joins get `too_many_rooms`.
    pub rooms_max: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            resume_window_ms: 60_000,
            resume_buffer_frames_max: 1024,
            rooms_max: 16,
        }
    }
}

/// Why a resume was refused (the client must resync).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResumeRefusal {
    /// The resume window has passed.
    Expired,
    /// The client claims to have seen notifications that were never sent.
    FromTheFuture,
    /// Some missed notifications are no longer buffered.
    BufferOverrun,
}

/// The state of one session, generic over the buffered notification type `N`.
#[derive(Debug)]
pub struct SessionCore<N> {
    config: SessionConfig,
    last_seq: u64,
    /// The latest notifications, in order: the last one is `last_seq` (their numbers are
    /// consecutive, so they are not stored).
    buffer: VecDeque<N>,
    attachment: Option<u64>,
    detached_since_ms: Option<u64>,
    /// Rooms joined (or being joined), each with the position of the latest ordered event
    /// (comment id) delivered from it.
    rooms: Rooms,
}

/// A session's rooms, sorted by id: a few (at most `rooms_max`), so a vector sized to
/// them (a one-room session holds one entry, not a tree node for eleven).
#[derive(Debug, Clone, Default)]
struct Rooms(Vec<(RoomId, RoomPosition)>);

impl Rooms {
    fn find(&self, room: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(id, _)| id.as_str().cmp(room))
    }

    fn contains_key(&self, room: &str) -> bool {
        self.find(room).is_ok()
    }

    fn get(&self, room: &str) -> Option<&RoomPosition> {
        self.find(room).ok().map(|at| &self.0[at].1)
    }

    fn get_mut(&mut self, room: &str) -> Option<&mut RoomPosition> {
        self.find(room).ok().map(|at| &mut self.0[at].1)
    }

    fn insert(&mut self, room: &str) {
        if let Err(at) = self.find(room) {
            self.0.reserve_exact(1);
            self.0
                .insert(at, (room.to_string(), RoomPosition::default()));
        }
    }

    fn remove(&mut self, room: &str) {
        if let Ok(at) = self.find(room) {
            self.0.remove(at);
            self.0.shrink_to_fit();
        }
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn keys(&self) -> impl Iterator<Item = &RoomId> {
        self.0.iter().map(|(id, _)| id)
    }

    fn values_mut(&mut self) -> impl Iterator<Item = &mut RoomPosition> {
        self.0.iter_mut().map(|(_, position)| position)
    }
}

/// Where a session is in one room's total order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct RoomPosition {
    /// The latest ordered event delivered (0: none).
    latest: u64,
    /// Whether the room answered the join (until then the room's recent comments are on
    /// their way in that answer, so the position means nothing yet).
    joined: bool,
    /// A gap was seen and a repair (a re-join asking for what came after `latest`) is
    /// under way: further gaps do not ask again.
    repairing: bool,
    /// The room's shared name as its latest event carried it (see
    /// [`SessionCore::handle_position`]).
    name: Option<Arc<str>>,
}

impl RoomPosition {
    fn check(&mut self, position: u64) -> PositionCheck {
        if position <= self.latest {
            PositionCheck::Repeat
        } else if self.joined && position > self.latest + 1 {
            let repair = !self.repairing;
            self.repairing = true;
            PositionCheck::Gap { repair }
        } else {
            self.latest = position;
            PositionCheck::Deliver
        }
    }
}

/// What to do with an ordered event (see [`SessionCore::handle_position`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PositionCheck {
    /// Deliver it: the next one (or the session is not in the room, or its join has not
    /// been answered yet).
    Deliver,
    /// Drop it: the session has it already (a re-sent catch-up).
    Repeat,
    /// Drop it: events before it are missing (it overtook them on another path, or they
    /// were lost). `repair`: ask the room for what came after the latest delivered (the
    /// first gap since the last repair); the catch-up brings this one again, in order.
    Gap {
        /// Start a repair now.
        repair: bool,
    },
}

impl<N: Clone> SessionCore<N> {
    /// A new session attached to connection `attachment`.
    pub fn new(config: SessionConfig, attachment: u64) -> Self {
        SessionCore {
            config,
            last_seq: 0,
            buffer: VecDeque::new(),
            attachment: Some(attachment),
            detached_since_ms: None,
            rooms: Rooms::default(),
        }
    }

    /// A session taken over on this node for a client whose node is gone: detached since
    /// `now_ms`, numbering its notifications on from the client's `last_seq`, so that the
    /// client resumes it with that `last_seq` and sees no gap.
    pub fn new_taken_over(config: SessionConfig, now_ms: u64, last_seq: u64) -> Self {
        SessionCore {
            config,
            last_seq,
            buffer: VecDeque::new(),
            attachment: None,
            detached_since_ms: Some(now_ms),
            rooms: Rooms::default(),
        }
    }

    /// The sequence number of the last notification assigned.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// The attached connection, if any.
    pub fn attachment(&self) -> Option<u64> {
        self.attachment
    }

    /// Assigns the next sequence number to `notification` and buffers it for resume.
    /// Returns the sequence number; the caller sends it if a connection is attached.
    pub fn handle_notification(&mut self, notification: N) -> u64 {
        self.last_seq += 1;
        self.buffer.push_back(notification);
        while self.buffer.len() > self.config.resume_buffer_frames_max {
            self.buffer.pop_front();
        }
        self.check_invariants();
        self.last_seq
    }

    /// The connection `attachment` went away at `now_ms`. Ignored if another connection
    /// has taken over the session since.
    pub fn handle_detach(&mut self, now_ms: u64, attachment: u64) {
        if self.attachment == Some(attachment) {
            self.attachment = None;
            self.detached_since_ms = Some(now_ms);
        }
    }

    /// A client resumes on connection `attachment`, having seen up to `last_seq`.
    /// Returns the notifications to replay, in order. The previous attachment, if any, is
    /// replaced (the caller closes it).
    pub fn handle_resume(
        &mut self,
        now_ms: u64,
        attachment: u64,
        last_seq: u64,
    ) -> Result<Vec<(u64, N)>, ResumeRefusal> {
        if self.is_expired(now_ms) {
            return Err(ResumeRefusal::Expired);
        }
        if last_seq > self.last_seq {
            return Err(ResumeRefusal::FromTheFuture);
        }
        // Some of what the client missed is no longer buffered.
        if last_seq + 1 < self.oldest_buffered() {
            return Err(ResumeRefusal::BufferOverrun);
        }
        self.attachment = Some(attachment);
        self.detached_since_ms = None;
        let first = self.oldest_buffered();
        let replay = (first..)
            .zip(&self.buffer)
            .filter(|(seq, _)| *seq > last_seq)
            .map(|(seq, notification)| (seq, notification.clone()))
            .collect();
        Ok(replay)
    }

    /// The number of the oldest buffered notification (one past `last_seq` when none is).
    fn oldest_buffered(&self) -> u64 {
        self.last_seq + 1 - self.buffer.len() as u64
    }

    /// Whether the session is detached for longer than the resume window.
    pub fn is_expired(&self, now_ms: u64) -> bool {
        match self.detached_since_ms {
            Some(since) => now_ms.saturating_sub(since) > self.config.resume_window_ms,
            None => false,
        }
    }

    /// Records that the session joins `room` (the room has not answered yet, see
    /// [`Self::handle_room_join_answered`]); refuses past `rooms_max`.
    pub fn handle_room_joined(&mut self, room: &str) -> Result<(), ErrorCode> {
        if self.rooms.contains_key(room) {
            return Ok(());
        }
        if self.rooms.len() >= self.config.rooms_max {
            return Err(ErrorCode::TooManyRooms);
        }
        self.rooms.insert(room);
        Ok(())
    }

    /// The room answered the join: its comments up to `comment_count` came with the
    /// answer, so the position is at least that.
    pub fn handle_room_join_answered(&mut self, room: &str, comment_count: u64) {
        if let Some(position) = self.rooms.get_mut(room) {
            position.latest = position.latest.max(comment_count);
            position.joined = true;
        }
    }

    /// Whether the session may join one more room (checked before asking the room).
    pub fn can_join(&self, room: &str) -> bool {
        self.rooms.contains_key(room) || self.rooms.len() < self.config.rooms_max
    }

    /// Records that the session left (or was removed from) `room`.
    pub fn handle_room_left(&mut self, room: &str) {
        self.rooms.remove(room);
    }

    /// Whether the session is in `room`.
    pub fn in_room(&self, room: &str) -> bool {
        self.rooms.contains_key(room)
    }

    /// The rooms the session is in.
    pub fn rooms(&self) -> impl Iterator<Item = &RoomId> {
        self.rooms.keys()
    }

    /// An ordered event at `position` of `room` is about to be delivered: delivered only
    /// in order, each once. Events of rooms the session is not in pass; so do events
    /// before the room answered the join (the answer sets the position).
    ///
    /// `room` is the event's shared room name: a room gives all its events one name, so
    /// the session finds its entry by that pointer and compares names only when the name
    /// is new to it (in a fan-out to thousands of sessions, reading each session's copy
    /// of the name would cost a cache miss each).
    pub fn handle_position(&mut self, room: &Arc<str>, position: u64) -> PositionCheck {
        let seen = |held: &&mut RoomPosition| {
            held.name
                .as_ref()
                .is_some_and(|name| Arc::ptr_eq(name, room))
        };
        if let Some(held) = self.rooms.values_mut().find(seen) {
            return held.check(position);
        }
        match self.rooms.get_mut(room) {
            Some(held) => {
                held.name = Some(room.clone());
                held.check(position)
            }
            None => PositionCheck::Deliver,
        }
    }

    /// The repair of `room` finished (or was given up): the next gap starts another.
    pub fn handle_repair_done(&mut self, room: &str) {
        if let Some(held) = self.rooms.get_mut(room) {
            held.repairing = false;
        }
    }

    /// The room's recent log starts after what the session has: it cannot get the
    /// comments before `first_available`; go on from there (they are lost to it).
    pub fn handle_positions_skipped(&mut self, room: &str, first_available: u64) {
        if let Some(held) = self.rooms.get_mut(room) {
            held.latest = held.latest.max(first_available.saturating_sub(1));
        }
    }

    /// The position of the latest ordered event delivered from `room` (`None` if the
    /// session is not in it, or the room has not answered its join yet): a re-join asks
    /// the room for what came after it.
    pub fn room_position(&self, room: &str) -> Option<u64> {
        self.rooms
            .get(room)
            .filter(|held| held.joined)
            .map(|held| held.latest)
    }

    /// Checks the core's invariants (debug builds).
    pub fn check_invariants(&self) {
        #[cfg(debug_assertions)]
        {
            assert!(self.buffer.len() <= self.config.resume_buffer_frames_max);
            assert!(self.buffer.len() as u64 <= self.last_seq);
            assert!(self.rooms.len() <= self.config.rooms_max);
            assert!(
                self.rooms.0.windows(2).all(|pair| pair[0].0 < pair[1].0),
                "rooms are sorted and unique"
            );
        }
    }
}

/// Per-connection limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionConfig {
    /// Interval between server pings, in ms. Default 30,000.
    pub ping_interval_ms: u64,
    /// Consecutive unanswered pings after which the connection is closed. Default 2.
    pub pings_missed_max: u32,
    /// Sustained requests per second per connection. Default 20.
    pub requests_per_sec: u32,
    /// Request burst per connection. Default 40.
    pub requests_burst: u32,
    /// Time allowed from connect to successful auth, in ms. Default 10,000.
    pub auth_timeout_ms: u64,
}

impl Default for ConnectionConfig {
    fn default() -> Self {
        ConnectionConfig {
            ping_interval_ms: 30_000,
            pings_missed_max: 2,
            requests_per_sec: 20,
            requests_burst: 40,
            auth_timeout_ms: 10_000,
        }
    }
}

/// What the liveness check asks the driver to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LivenessAction {
    /// Nothing is due.
    Wait,
    /// Send a ping request with this server sequence number.
    SendPing(u64),
    /// Close the connection with this code.
    Close(ErrorCode),
}

/// Per-connection protocol state: request ordering, rate limit, liveness, auth deadline.
#[derive(Debug)]
pub struct ConnectionCore {
    config: ConnectionConfig,
    connected_at_ms: u64,
    authenticated: bool,
    last_request_seq: Option<u64>,
    bucket: TokenBucket,
    next_ping_at_ms: u64,
    next_ping_seq: u64,
    unanswered_pings: u32,
    outstanding_ping_seqs: VecDeque<u64>,
}

impl ConnectionCore {
    /// A connection opened at `now_ms`.
    pub fn new(config: ConnectionConfig, now_ms: u64) -> Self {
        ConnectionCore {
            config,
            connected_at_ms: now_ms,
            authenticated: false,
            last_request_seq: None,
            bucket: TokenBucket::new(config.requests_burst, config.requests_per_sec, now_ms),
            next_ping_at_ms: now_ms + config.ping_interval_ms,
            next_ping_seq: 1,
            unanswered_pings: 0,
            outstanding_ping_seqs: VecDeque::new(),
        }
    }

    /// Whether auth succeeded.
    pub fn is_authenticated(&self) -> bool {
        self.authenticated
    }

    /// Marks the connection authenticated.
    pub fn handle_authenticated(&mut self) {
        self.authenticated = true;
    }

    /// Admits a request with sequence number `seq` and `kind` at `now_ms`, or says which
    /// error to answer with. Checks, cheapest first: order, auth, rate.
    pub fn handle_request(&mut self, now_ms: u64, seq: u64, kind: &str) -> Result<(), ErrorCode> {
        if let Some(last) = self.last_request_seq {
            if seq <= last {
                return Err(ErrorCode::OutOfOrder);
            }
        }
        if seq == 0 {
            return Err(ErrorCode::OutOfOrder);
        }
        self.last_request_seq = Some(seq);
        if !self.authenticated && kind != "auth" && kind != "ping" {
            return Err(ErrorCode::Unauthenticated);
        }
        if !self.bucket.try_take(now_ms) {
            return Err(ErrorCode::RateLimited);
        }
        Ok(())
    }

    /// The client answered server ping `seq`.
    pub fn handle_pong(&mut self, seq: u64) {
        if self.outstanding_ping_seqs.contains(&seq) {
            self.outstanding_ping_seqs.clear();
            self.unanswered_pings = 0;
        }
    }

    /// Liveness and auth-deadline check at `now_ms`.
    pub fn handle_tick(&mut self, now_ms: u64) -> LivenessAction {
        if !self.authenticated
            && now_ms.saturating_sub(self.connected_at_ms) >= self.config.auth_timeout_ms
        {
            return LivenessAction::Close(ErrorCode::Unauthenticated);
        }
        if now_ms < self.next_ping_at_ms {
            return LivenessAction::Wait;
        }
        if self.unanswered_pings >= self.config.pings_missed_max {
            return LivenessAction::Close(ErrorCode::PingTimeout);
        }
        let seq = self.next_ping_seq;
        self.next_ping_seq += 1;
        self.unanswered_pings += 1;
        self.outstanding_ping_seqs.push_back(seq);
        // Bounded by pings_missed_max: we close before more accumulate.
        while self.outstanding_ping_seqs.len() > self.config.pings_missed_max as usize {
            self.outstanding_ping_seqs.pop_front();
        }
        self.next_ping_at_ms = now_ms + self.config.ping_interval_ms;
        LivenessAction::SendPing(seq)
    }

    /// When `handle_tick` should next be called.
    pub fn next_deadline_ms(&self) -> u64 {
        if self.authenticated {
            self.next_ping_at_ms
        } else {
            self.next_ping_at_ms
                .min(self.connected_at_ms + self.config.auth_timeout_ms)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> SessionCore<&'static str> {
        SessionCore::new(
            SessionConfig {
                resume_buffer_frames_max: 3,
                ..SessionConfig::default()
            },
            1,
        )
    }

    #[test]
    fn resume_replays_exactly_the_missed_notifications_in_order() {
        let mut s = session();
        s.handle_notification("a");
        s.handle_notification("b");
        s.handle_detach(1_000, 1);
        s.handle_notification("c");
        let replay = s.handle_resume(2_000, 2, 1).expect("resume");
        assert_eq!(replay, vec![(2, "b"), (3, "c")]);
        assert_eq!(s.attachment(), Some(2));
        // nothing missed: empty replay
        assert_eq!(s.handle_resume(2_000, 3, 3).expect("resume"), vec![]);
    }

    #[test]
    fn resume_is_refused_after_the_window_or_past_the_buffer() {
        let mut s = session();
        for n in ["a", "b", "c", "d", "e"] {
            s.handle_notification(n);
        }
        assert_eq!(s.handle_resume(0, 2, 0), Err(ResumeRefusal::BufferOverrun));
        assert_eq!(s.handle_resume(0, 2, 9), Err(ResumeRefusal::FromTheFuture));
        assert_eq!(s.handle_resume(0, 2, 1), Err(ResumeRefusal::BufferOverrun));
        assert!(s.handle_resume(0, 2, 2).is_ok(), "3..5 are still buffered");
        s.handle_detach(10, 2);
        assert!(!s.is_expired(60_010));
        assert!(s.is_expired(60_011));
        assert_eq!(s.handle_resume(60_011, 3, 5), Err(ResumeRefusal::Expired));
    }

    #[test]
    fn a_stale_detach_does_not_detach_the_new_connection() {
        let mut s = session();
        s.handle_resume(0, 2, 0).expect("take over");
        s.handle_detach(5, 1);
        assert_eq!(s.attachment(), Some(2));
        assert!(!s.is_expired(1_000_000));
    }

    #[test]
    fn rooms_are_bounded() {
        let mut s = SessionCore::<()>::new(
            SessionConfig {
                rooms_max: 2,
                ..SessionConfig::default()
            },
            1,
        );
        assert_eq!(s.handle_room_joined("a"), Ok(()));
        assert_eq!(s.handle_room_joined("b"), Ok(()));
        assert_eq!(s.handle_room_joined("a"), Ok(()), "rejoin is free");
        assert_eq!(s.handle_room_joined("c"), Err(ErrorCode::TooManyRooms));
        s.handle_room_left("a");
        assert_eq!(s.handle_room_joined("c"), Ok(()));
    }

    #[test]
    fn room_positions_drop_repeats_and_gaps_and_bound_catch_up() {
        use PositionCheck::{Deliver, Gap, Repeat};
        let mut s = SessionCore::<()>::new(SessionConfig::default(), 1);
        // Events of one room share its name; some come with a copy of it (a relayed
        // event), which must be recognised by content.
        let shared: Arc<str> = Arc::from("a");
        let mut copies = 0;
        let mut a = |i: u64| -> Arc<str> {
            if i.is_multiple_of(3) {
                copies += 1;
                Arc::from("a")
            } else {
                shared.clone()
            }
        };
        assert_eq!(
            s.handle_position(&a(1), 3),
            Deliver,
            "not in the room: passes"
        );
        assert_eq!(s.handle_room_joined("a"), Ok(()));
        assert_eq!(s.room_position("a"), None, "no position before the answer");
        // an event that overtakes the join's answer is delivered and counted
        assert_eq!(s.handle_position(&a(2), 8), Deliver);
        s.handle_room_join_answered("a", 7);
        assert_eq!(s.room_position("a"), Some(8));
        assert_eq!(s.handle_position(&a(3), 8), Repeat, "a repeat is dropped");
        assert_eq!(s.handle_position(&a(4), 5), Repeat, "an older one too");
        assert_eq!(s.handle_position(&a(5), 9), Deliver);
        assert_eq!(s.room_position("a"), Some(9));
        // 10 is missing: 11 and 12 are held back, one repair is asked for.
        assert_eq!(s.handle_position(&a(6), 11), Gap { repair: true });
        assert_eq!(s.handle_position(&a(7), 12), Gap { repair: false });
        assert_eq!(
            s.room_position("a"),
            Some(9),
            "a gap does not move the position"
        );
        // the catch-up brings them in order
        for position in 10..=12 {
            assert_eq!(s.handle_position(&a(8), position), Deliver);
        }
        s.handle_repair_done("a");
        assert_eq!(s.handle_position(&a(9), 14), Gap { repair: true });
        // the room's log no longer reaches back: go on from what it has
        s.handle_positions_skipped("a", 14);
        s.handle_repair_done("a");
        assert_eq!(s.handle_position(&a(10), 14), Deliver);
        s.handle_room_left("a");
        assert_eq!(s.room_position("a"), None);
        assert!(copies > 0);
    }

    #[test]
    fn a_rooms_shared_name_does_not_stand_for_another_room() {
        let mut s = SessionCore::<()>::new(SessionConfig::default(), 1);
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        assert_eq!(s.handle_room_joined("a"), Ok(()));
        assert_eq!(s.handle_room_joined("b"), Ok(()));
        s.handle_room_join_answered("a", 0);
        s.handle_room_join_answered("b", 0);
        assert_eq!(s.handle_position(&a, 1), PositionCheck::Deliver);
        assert_eq!(s.handle_position(&b, 1), PositionCheck::Deliver);
        assert_eq!(s.handle_position(&a, 2), PositionCheck::Deliver);
        assert_eq!(s.handle_position(&b, 1), PositionCheck::Repeat);
        assert_eq!(s.room_position("a"), Some(2));
        assert_eq!(s.room_position("b"), Some(1));
    }

    #[test]
    fn requests_must_increase_and_auth_comes_first() {
        let mut c = ConnectionCore::new(ConnectionConfig::default(), 0);
        assert_eq!(
            c.handle_request(0, 1, "room.join"),
            Err(ErrorCode::Unauthenticated)
        );
        assert_eq!(c.handle_request(0, 2, "ping"), Ok(()));
        assert_eq!(c.handle_request(0, 2, "auth"), Err(ErrorCode::OutOfOrder));
        assert_eq!(c.handle_request(0, 3, "auth"), Ok(()));
        c.handle_authenticated();
        assert_eq!(c.handle_request(0, 10, "room.join"), Ok(()));
        assert_eq!(
            c.handle_request(0, 9, "room.join"),
            Err(ErrorCode::OutOfOrder)
        );
    }

    #[test]
    fn a_flood_is_rate_limited_and_recovers() {
        let config = ConnectionConfig {
            requests_per_sec: 10,
            requests_burst: 5,
            ..ConnectionConfig::default()
        };
        let mut c = ConnectionCore::new(config, 0);
        c.handle_authenticated();
        let admitted = (1..=50)
            .filter(|seq| c.handle_request(0, *seq, "ping").is_ok())
            .count();
        assert_eq!(admitted, 5);
        assert_eq!(c.handle_request(1_000, 51, "ping"), Ok(()));
    }

    #[test]
    fn two_missed_pings_close_the_connection() {
        let config = ConnectionConfig {
            ping_interval_ms: 100,
            ..ConnectionConfig::default()
        };
        let mut c = ConnectionCore::new(config, 0);
        c.handle_authenticated();
        assert_eq!(c.handle_tick(50), LivenessAction::Wait);
        assert_eq!(c.handle_tick(100), LivenessAction::SendPing(1));
        c.handle_pong(1);
        assert_eq!(c.handle_tick(200), LivenessAction::SendPing(2));
        assert_eq!(c.handle_tick(300), LivenessAction::SendPing(3));
        assert_eq!(
            c.handle_tick(400),
            LivenessAction::Close(ErrorCode::PingTimeout)
        );
    }

    #[test]
    fn unauthenticated_connections_time_out() {
        let mut c = ConnectionCore::new(ConnectionConfig::default(), 0);
        assert_eq!(c.next_deadline_ms(), 10_000);
        assert_eq!(
            c.handle_tick(10_000),
            LivenessAction::Close(ErrorCode::Unauthenticated)
        );
    }
}
