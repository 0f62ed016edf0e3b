//! Sessions on this node: the resumable part of a client, and its link to the attached
//! connection's outgoing queue.
//!
//! A [`Session`] wraps a [`SessionCore`] under a mutex. Rooms deliver notifications to it
//! ([`MemberSink`]); it assigns the sequence number, buffers the notification for resume
//! and, if a connection is attached, queues it there. Sequence assignment and queueing
//! happen under one lock, so a resume sees a consistent cut: everything up to `last_seq`
//! is replayed, each once and in order, and live notifications follow.
//!
//! **Order.** A session delivers a room's comments only in order of their position (the
//! comment id). A repeat is dropped. A comment that arrives ahead of one the session lacks
//! (it overtook a catch-up on another path, e.g. a new owner's live broadcast against the
//! old path's backlog) is dropped too and reported once ([`SessionRegistry::take_repairs`],
//! at most [`REPAIRS_PENDING_MAX`] waiting); the node re-joins the room asking for what
//! came after the latest delivered (`rooms::upkeep`).
//!
//! **Lifetime.** A session ends in exactly one of two ways: its client says goodbye
//! (WebSocket close 1000, QUIC application close 1000), or it stays detached past the
//! resume window (60 s). Either way it leaves all its rooms. Every other disconnect (a
//! slow consumer, a node cut off or stopping) leaves it resumable. Per user and node there
//! are at most `sessions_per_user_max` (16) sessions; the oldest detached one makes room.
//!
//! **Identity.** A session lives on the node that created it. Its id names that home node
//! and carries an HMAC binding it to the user ([`SessionIds`]), so any node can check a
//! resume of a session it does not hold and take it over (`rooms::route`). Member keys
//! carry the node id in their high bits (`common::keys`), so they are unique across the
//! cluster; session numbers start at a random point, so a restarted node does not reuse
//! the member keys its previous run left in rooms elsewhere.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use chorus_actors::room_actor::{Member, MemberSink};
use chorus_actors::session::{PositionCheck, ResumeRefusal, SessionConfig, SessionCore};
use chorus_protocol::{EncodedBody, ErrorCode};
use tokio::sync::mpsc;

pub use super::outgoing::{delivery_behind, CloseSignal};
use super::outgoing::{Backlog, BACKLOG_HIGH_FRAMES, BACKLOG_LOW_FRAMES};
use super::wire::{Sent, Wire};

/// One frame waiting in a connection's outgoing queue.
#[derive(Debug)]
pub enum OutFrame {
    /// A notification, framed by the writer in the connection's encoding.
    Notification(u64, Arc<EncodedBody>),
    /// An already encoded frame (response, server ping).
    Encoded(Bytes),
    /// Flush what is queued, then close with this code and reason.
    Close(ErrorCode, String),
}

/// What a queued writer (QUIC, WebSocket over TLS) sends ahead of the notifications that
/// wait in its queue: answers (responses, server pings), then voice frames.
///
/// Answers go ahead as on a plain WebSocket (see `Wire::encoded`): a client that reads
/// behind its rooms still gets its answers soon, and the protocol promises no order
/// between answers and notifications. A connection has few answers under way (one per
/// request, a bounded number of requests at once); more than the queue's capacity waiting
/// means the client does not read, and it is closed as a slow consumer.
///
/// Voice frames are bounded, and when full the oldest makes room for the newest (late
/// audio is worth less than current audio). On QUIC they go straight to the connection as
/// datagrams: quinn's datagram send buffer is the bounded queue (it drops the oldest too),
/// and no writer task is woken per frame.
#[derive(Debug)]
pub struct AheadQueue {
    lanes: Mutex<Lanes>,
    capacity: usize,
    ready: tokio::sync::Notify,
    datagrams: Option<quinn::Connection>,
}

/// The frames an [`AheadQueue`] holds.
#[derive(Debug, Default)]
pub struct Lanes {
    /// Answers, oldest first.
    pub answers: VecDeque<Bytes>,
    /// Voice frames, oldest first.
    pub audio: VecDeque<Bytes>,
}

impl AheadQueue {
    /// A queue of at most `capacity` voice frames and as many answers (at least 1 each),
    /// or, with `datagrams`, a direct path for voice to that QUIC connection.
    pub fn new(capacity: usize, datagrams: Option<quinn::Connection>) -> Self {
        AheadQueue {
            lanes: Mutex::new(Lanes::default()),
            capacity: capacity.max(1),
            ready: tokio::sync::Notify::new(),
            datagrams,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Lanes> {
        self.lanes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues voice `frame`, dropping the oldest if the queue is full; wakes the writer.
    /// On QUIC, sends it as a datagram instead.
    pub fn push(&self, frame: Bytes) {
        if let Some(connection) = &self.datagrams {
            if send_voice_datagram(connection, frame) {
                metrics::counter!("chorus_audio_out_total").increment(1);
            }
            return;
        }
        {
            let mut lanes = self.lock();
            if lanes.audio.len() >= self.capacity {
                lanes.audio.pop_front();
                metrics::counter!("chorus_audio_dropped_total", "reason" => "listener_queue")
                    .increment(1);
            }
            lanes.audio.push_back(frame);
        }
        self.ready.notify_one();
    }

    /// Queues an answer; wakes the writer. `false` when the queue is full: the client
    /// does not read its answers.
    pub fn push_answer(&self, frame: Bytes) -> bool {
        {
            let mut lanes = self.lock();
            if lanes.answers.len() >= self.capacity {
                return false;
            }
            lanes.answers.push_back(frame);
        }
        self.ready.notify_one();
        true
    }

    /// Takes every queued frame, each lane oldest first.
    pub fn take_all(&self) -> Lanes {
        std::mem::take(&mut *self.lock())
    }

    /// Resolves when frames may be waiting (after a push since the last call).
    pub async fn ready(&self) {
        self.ready.notified().await
    }
}

/// The receiving side of one connection's outgoing queue (its writer's).
#[derive(Debug)]
pub struct OutboundRx {
    rx: mpsc::Receiver<OutFrame>,
    backlog: Arc<Backlog>,
}

impl OutboundRx {
    /// The next frame; `None` once every sender is gone.
    pub async fn recv(&mut self) -> Option<OutFrame> {
        let frame = self.rx.recv().await;
        if self.rx.len() < BACKLOG_LOW_FRAMES {
            self.backlog.lower();
        }
        frame
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }
}

impl Drop for OutboundRx {
    fn drop(&mut self) {
        self.backlog.lower();
    }
}

/// The sending side of one connection's bounded outgoing queue.
#[derive(Debug, Clone)]
pub struct Outbound {
    /// Identifies the connection (attachment) on this node.
    pub attachment: u64,
    sink: Sink,
    close: Arc<CloseSignal>,
}

/// Where an [`Outbound`]'s frames go.
#[derive(Debug, Clone)]
enum Sink {
    /// A bounded channel drained by the connection's writer task (QUIC, WebSocket over
    /// TLS), with the answers and voice that go ahead of it beside it.
    Queue {
        tx: mpsc::Sender<OutFrame>,
        ahead: Arc<AheadQueue>,
        backlog: Arc<Backlog>,
    },
    /// Straight to the socket of a plain WebSocket (see `wire`).
    Wire(Arc<Wire>),
}

impl Outbound {
    /// A queue of `capacity` frames, beside the connection's answers and voice `ahead`;
    /// returns the receiving end for the writer.
    pub fn new(
        attachment: u64,
        capacity: usize,
        close: Arc<CloseSignal>,
        ahead: Arc<AheadQueue>,
    ) -> (Self, OutboundRx) {
        let (tx, rx) = mpsc::channel(capacity);
        let backlog = Arc::new(Backlog::default());
        (
            Outbound {
                attachment,
                sink: Sink::Queue {
                    tx,
                    ahead,
                    backlog: backlog.clone(),
                },
                close,
            },
            OutboundRx { rx, backlog },
        )
    }

    /// Frames written straight to a plain WebSocket's socket through `wire`.
    pub fn wire(attachment: u64, wire: Arc<Wire>) -> Self {
        Outbound {
            attachment,
            close: wire.close.clone(),
            sink: Sink::Wire(wire),
        }
    }

    /// Queues a voice frame (never blocks; drops a frame when too much waits).
    pub fn push_audio(&self, frame: Bytes) {
        match &self.sink {
            Sink::Queue { ahead, .. } => ahead.push(frame),
            Sink::Wire(wire) => match wire.audio(&frame) {
                Sent::Taken => metrics::counter!("chorus_audio_out_total").increment(1),
                Sent::Dropped => {
                    metrics::counter!("chorus_audio_dropped_total", "reason" => "listener_queue")
                        .increment(1)
                }
                Sent::Full => wire.close.slow_consumer(),
                Sent::Closed => {}
            },
        }
    }

    /// Queues notification `body` with sequence number `seq` (as [`Self::push`]).
    pub fn notify(&self, seq: u64, body: &Arc<EncodedBody>) -> bool {
        self.notify_all(&[(seq, body)])
    }

    /// Queues notifications (sequence number, body) in order, together where the
    /// transport can (one write on a plain WebSocket).
    pub fn notify_all(&self, numbered: &[(u64, &Arc<EncodedBody>)]) -> bool {
        match (&self.sink, numbered) {
            (_, []) => true,
            (Sink::Wire(wire), _) => Self::sent(wire, wire.notifications(numbered)),
            (Sink::Queue { .. }, _) => numbered
                .iter()
                .all(|(seq, body)| self.push(OutFrame::Notification(*seq, (*body).clone()))),
        }
    }

    fn sent(wire: &Wire, sent: Sent) -> bool {
        match sent {
            Sent::Taken | Sent::Dropped => true,
            Sent::Full => {
                wire.close.slow_consumer();
                false
            }
            Sent::Closed => false,
        }
    }

    /// Queues a frame without waiting. A full queue means the client does not keep up: the
    /// connection is closed as a slow consumer (it may resume and catch up from the buffer).
    pub fn push(&self, frame: OutFrame) -> bool {
        let (tx, backlog, frame) = match (&self.sink, frame) {
            // Answers go ahead of the queue (see `AheadQueue`).
            (Sink::Queue { ahead, .. }, OutFrame::Encoded(bytes)) => {
                if ahead.push_answer(bytes) {
                    return true;
                }
                self.close.slow_consumer();
                return false;
            }
            (Sink::Queue { tx, backlog, .. }, frame) => (tx, backlog, frame),
            (Sink::Wire(wire), frame) => {
                let sent = match frame {
                    OutFrame::Notification(seq, body) => wire.notifications(&[(seq, &body)]),
                    OutFrame::Encoded(bytes) => wire.encoded(&bytes),
                    OutFrame::Close(code, reason) => {
                        wire.finish(Some((code.close_code(), reason)));
                        return true;
                    }
                };
                return Self::sent(wire, sent);
            }
        };
        match tx.try_send(frame) {
            Ok(()) => {
                if tx.max_capacity() - tx.capacity() > BACKLOG_HIGH_FRAMES {
                    backlog.raise();
                    // The writer may have gone meanwhile: it lowers only while it runs.
                    if tx.is_closed() {
                        backlog.lower();
                    }
                }
                true
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.close.slow_consumer();
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// The connection ended: on a plain WebSocket, queue a normal close (a no-op after
    /// another close). A queued writer closes once every sender is gone.
    pub fn finish(&self) {
        if let Sink::Wire(wire) = &self.sink {
            wire.finish(None);
        }
    }

    /// The connection's close signal.
    pub fn close_signal(&self) -> &Arc<CloseSignal> {
        &self.close
    }
}

struct SessionInner {
    core: SessionCore<Arc<EncodedBody>>,
    outbound: Option<Outbound>,
}

/// A client session on this node.
pub struct Session {
    /// The id clients resume with (shared with the registry's maps).
    pub id: Arc<str>,
    /// The authenticated user.
    pub user_id: String,
    key: u64,
    inner: Mutex<SessionInner>,
    /// Where gaps in a room's order are reported (see [`SessionRegistry::take_repairs`]).
    repairs: tokio::sync::mpsc::Sender<(String, String)>,
}

impl Session {
    fn lock(&self) -> MutexGuard<'_, SessionInner> {
        // A poisoned lock means a panic while holding it; the data is still consistent for
        // our purposes (each operation is a few field updates), so keep serving.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The member handle rooms use for this session.
    pub fn member(self: &Arc<Self>) -> Member {
        Member::new(self.key, self.clone() as Arc<dyn MemberSink>)
    }

    /// Runs `f` on the core.
    pub fn with_core<T>(&self, f: impl FnOnce(&mut SessionCore<Arc<EncodedBody>>) -> T) -> T {
        f(&mut self.lock().core)
    }

    /// The connection `attachment` closed at `now_ms`.
    pub fn detach(&self, now_ms: u64, attachment: u64) {
        let mut inner = self.lock();
        inner.core.handle_detach(now_ms, attachment);
        if inner.outbound.as_ref().map(|o| o.attachment) == Some(attachment) {
            inner.outbound = None;
        }
    }

    /// Closes the attached connection, if any, with `code` and `reason`.
    pub fn close_connection(&self, code: ErrorCode, reason: &str) {
        if let Some(outbound) = self.lock().outbound.take() {
            outbound.close.close(code, reason);
        }
    }

    /// Attaches `outbound` after replaying what the client missed since `last_seq`. The
    /// auth response is queued first. A previous connection is closed.
    pub fn resume(
        &self,
        now_ms: u64,
        last_seq: u64,
        outbound: Outbound,
        auth_response: impl FnOnce(u64) -> Bytes,
    ) -> Result<usize, ResumeRefusal> {
        let mut inner = self.lock();
        let replay = inner
            .core
            .handle_resume(now_ms, outbound.attachment, last_seq)?;
        outbound.push(OutFrame::Encoded(auth_response(inner.core.last_seq())));
        let count = replay.len();
        for (seq, body) in replay {
            outbound.push(OutFrame::Notification(seq, body));
        }
        if let Some(previous) = inner.outbound.replace(outbound) {
            previous.close.close(
                ErrorCode::ResumeFailed,
                "session resumed on another connection",
            );
        }
        Ok(count)
    }
}

impl Session {
    /// Whether `body` is delivered: a room's ordered events only in order, each once (a
    /// gap is reported for repair).
    fn in_order(&self, inner: &mut SessionInner, body: &EncodedBody) -> bool {
        let Some((room, position)) = body.room_position() else {
            return true;
        };
        match inner.core.handle_position(room, position) {
            PositionCheck::Deliver => true,
            PositionCheck::Repeat => false,
            PositionCheck::Gap { repair } => {
                metrics::counter!("chorus_order_gaps_total").increment(1);
                if repair
                    && self
                        .repairs
                        .try_send((self.id.to_string(), room.to_string()))
                        .is_err()
                {
                    // The repair queue is full: the next gap asks again.
                    inner.core.handle_repair_done(room);
                }
                false
            }
        }
    }
}

impl MemberSink for Session {
    fn deliver(&self, body: &Arc<EncodedBody>) {
        let mut inner = self.lock();
        if !self.in_order(&mut inner, body) {
            return;
        }
        let seq = inner.core.handle_notification(body.clone());
        if let Some(outbound) = &inner.outbound {
            outbound.notify(seq, body);
        }
    }

    fn deliver_all(&self, bodies: &[Arc<EncodedBody>]) {
        if let [body] = bodies {
            // Most fan-outs carry one event: no list to build.
            return self.deliver(body);
        }
        let mut inner = self.lock();
        let mut numbered = Vec::with_capacity(bodies.len());
        for body in bodies {
            if self.in_order(&mut inner, body) {
                numbered.push((inner.core.handle_notification(body.clone()), body));
            }
        }
        if let Some(outbound) = &inner.outbound {
            outbound.notify_all(&numbered);
        }
    }

    fn removed_from_room(&self, room_id: &str) {
        self.lock().core.handle_room_left(room_id);
    }

    fn deliver_audio(&self, frame: &Bytes) {
        // Voice is not numbered or buffered for resume: only an attached connection gets it.
        if let Some(outbound) = &self.lock().outbound {
            outbound.push_audio(frame.clone());
        }
    }
}

/// Bytes of the HMAC kept in a session id.
const SESSION_MAC_BYTES: usize = 12;

/// Mints and checks session ids. An id names its home node and is bound to its user by an
/// HMAC under the cluster's token secret (`s-<node hex>-<nonce hex>-<mac hex>`), so any
/// node can tell that a client resuming an unknown session really owns it.
pub struct SessionIds {
    key: ring::hmac::Key,
}

impl SessionIds {
    /// Ids under `secret` (the token secret every node shares).
    pub fn new(secret: &[u8]) -> Self {
        SessionIds {
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret),
        }
    }

    fn mac(&self, node: u64, nonce: &str, user: &str) -> String {
        let message = format!("chorus-session\0{node}\0{nonce}\0{user}");
        let tag = ring::hmac::sign(&self.key, message.as_bytes());
        tag.as_ref()[..SESSION_MAC_BYTES]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// A new session id for `user` at home node `node`.
    pub fn mint(&self, node: u64, user: &str) -> String {
        let nonce = format!("{:016x}", rand::random::<u64>());
        let mac = self.mac(node, &nonce, user);
        format!("s-{node:x}-{nonce}-{mac}")
    }

    /// The home node of `id` if it is a well-formed id minted for `user`.
    pub fn verify(&self, id: &str, user: &str) -> Option<u64> {
        let mut parts = id.strip_prefix("s-")?.splitn(3, '-');
        let node_hex = parts.next()?;
        let nonce = parts.next()?;
        let mac = parts.next()?;
        let node = u64::from_str_radix(node_hex, 16).ok()?;
        let expected = self.mac(node, nonce, user);
        // Constant time: the comparison does not reveal how much of a forged mac matched.
        crate::server::common::keys::constant_time_eq(expected.as_bytes(), mac.as_bytes())
            .then_some(node)
    }
}

/// A session [`SessionRegistry::create`] made.
pub struct Created {
    /// The new session.
    pub session: Arc<Session>,
    /// The user's oldest detached session, ended to make room for it.
    pub evicted: Option<Arc<Session>>,
}

/// Why [`SessionRegistry::create`] refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionRefusal {
    /// The node holds `sessions_max` sessions.
    NodeFull,
    /// The user holds this many sessions here, all connected.
    UserFull(usize),
}

/// All sessions on this node, by id.
pub struct SessionRegistry {
    config: SessionConfig,
    sessions_max: usize,
    sessions_per_user_max: usize,
    /// Each user's session ids here, oldest first (locked after `sessions`).
    by_user: Mutex<HashMap<String, VecDeque<Arc<str>>>>,
    next_key: AtomicU64,
    node_id: u64,
    ids: SessionIds,
    sessions: Mutex<HashMap<Arc<str>, Arc<Session>>>,
    /// Sessions taken over here: the id the client resumed with → the new session's id
    /// (a client that retries the resume gets the same copy). Entries whose session is
    /// gone are dropped on the next takeover, so this holds at most `sessions_max`.
    taken_over: Mutex<HashMap<String, Arc<str>>>,
    repairs: tokio::sync::mpsc::Sender<(String, String)>,
    repairs_rx: Mutex<Option<tokio::sync::mpsc::Receiver<(String, String)>>>,
}

/// Repairs (a session's gap in a room's order) waiting for the node at once; beyond it a
/// gap is reported again by the next event.
pub const REPAIRS_PENDING_MAX: usize = 4096;

impl SessionRegistry {
    /// An empty registry.
    ///
    /// Member keys are made unique across the cluster by composing them with `node_id`.
    /// Session numbers start at a random point, so that a restarted node does not reuse
    /// the member keys its previous run left in rooms elsewhere.
    pub fn new(
        config: SessionConfig,
        sessions_max: usize,
        sessions_per_user_max: usize,
        node_id: u64,
        ids: SessionIds,
    ) -> Self {
        let start = rand::random::<u64>()
            & ((1 << (crate::server::common::keys::MEMBER_KEY_NODE_SHIFT - 1)) - 1);
        let (repairs, repairs_rx) = tokio::sync::mpsc::channel(REPAIRS_PENDING_MAX);
        SessionRegistry {
            config,
            sessions_max,
            sessions_per_user_max,
            by_user: Mutex::new(HashMap::new()),
            next_key: AtomicU64::new(start.max(1)),
            node_id,
            ids,
            sessions: Mutex::new(HashMap::new()),
            taken_over: Mutex::new(HashMap::new()),
            repairs,
            repairs_rx: Mutex::new(Some(repairs_rx)),
        }
    }

    /// The gaps sessions report: (session id, room). A session that sees a room's event
    /// arrive ahead of one it lacks drops it and reports the room once; the node re-joins
    /// it asking for what came after the latest delivered (then calls
    /// `handle_repair_done`). Taken once.
    pub fn take_repairs(&self) -> Option<tokio::sync::mpsc::Receiver<(String, String)>> {
        self.repairs_rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// The session that took over `old_id` here, if it is still alive.
    pub fn taken_over_copy(&self, old_id: &str) -> Option<Arc<Session>> {
        let new_id = self
            .taken_over
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(old_id)
            .cloned()?;
        self.get(&new_id)
    }

    /// The session ids this registry mints and checks.
    pub fn ids(&self) -> &SessionIds {
        &self.ids
    }

    /// Takes over session `old_id` of `user` (held by another node, or by this node's
    /// previous run): a new session here, under a new id, detached, that numbers on from
    /// `last_seq` (see [`SessionCore::new_taken_over`]). A new id, so that a stale copy
    /// left on the old node can never be resumed by mistake with this numbering. `None` if
    /// the node holds `sessions_max` sessions already.
    pub fn take_over(
        &self,
        old_id: &str,
        user_id: &str,
        now_ms: u64,
        last_seq: u64,
    ) -> Option<Arc<Session>> {
        let mut map = self.map();
        if map.len() >= self.sessions_max {
            return None;
        }
        // A takeover never evicts: at the user's bound the client starts afresh (`auth`
        // without resume then makes room, see `create`).
        if self.user_sessions(user_id) >= self.sessions_per_user_max {
            return None;
        }
        let id: Arc<str> = self.ids.mint(self.node_id, user_id).into();
        let core = SessionCore::new_taken_over(self.config, now_ms, last_seq);
        let session = self.admit(&mut map, id.clone(), user_id, core, None);
        let mut taken_over = self.taken_over.lock().unwrap_or_else(|e| e.into_inner());
        taken_over.retain(|_, new_id| map.contains_key(new_id));
        taken_over.insert(old_id.to_string(), id);
        Some(session)
    }

    fn map(&self) -> MutexGuard<'_, HashMap<Arc<str>, Arc<Session>>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Creates a session for `user_id` attached to `outbound`, queueing the auth response
    /// first. At the user's bound (`sessions_per_user_max`) the user's oldest detached
    /// session is ended to make room and returned with the new one (the caller takes it
    /// out of its rooms); if every one of them is connected, the new one is refused.
    pub fn create(
        &self,
        user_id: &str,
        outbound: Outbound,
        auth_response: impl FnOnce(&str) -> Bytes,
    ) -> Result<Created, SessionRefusal> {
        let mut map = self.map();
        let mut evicted = None;
        if self.user_sessions(user_id) >= self.sessions_per_user_max {
            let oldest_detached = self
                .by_user
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(user_id)
                .and_then(|ids| {
                    ids.iter()
                        .find(|id| {
                            map.get(&**id)
                                .is_some_and(|s| s.with_core(|core| core.attachment().is_none()))
                        })
                        .cloned()
                });
            let Some(oldest) = oldest_detached else {
                return Err(SessionRefusal::UserFull(self.sessions_per_user_max));
            };
            evicted = map.remove(&oldest);
            self.forget_user_session(user_id, &oldest);
            metrics::counter!("chorus_sessions_evicted_total").increment(1);
        }
        if map.len() >= self.sessions_max {
            return Err(SessionRefusal::NodeFull);
        }
        let id: Arc<str> = self.ids.mint(self.node_id, user_id).into();
        outbound.push(OutFrame::Encoded(auth_response(&id)));
        let core = SessionCore::new(self.config, outbound.attachment);
        let session = self.admit(&mut map, id, user_id, core, Some(outbound));
        Ok(Created { session, evicted })
    }

    /// Sessions `user_id` holds here.
    pub fn user_sessions(&self, user_id: &str) -> usize {
        self.by_user
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(user_id)
            .map_or(0, VecDeque::len)
    }

    /// Rooms `user_id` is in through its sessions here (counting a room once per session).
    pub fn user_memberships(&self, user_id: &str) -> usize {
        let ids: Vec<Arc<str>> = self
            .by_user
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(user_id)
            .map(|ids| ids.iter().cloned().collect())
            .unwrap_or_default();
        ids.iter()
            .filter_map(|id| self.get(id))
            .map(|s| s.with_core(|core| core.rooms().count()))
            .sum()
    }

    fn forget_user_session(&self, user_id: &str, id: &str) {
        let mut by_user = self.by_user.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(ids) = by_user.get_mut(user_id) {
            ids.retain(|other| &**other != id);
            if ids.is_empty() {
                by_user.remove(user_id);
            }
        }
    }

    /// A new session `id` of `user_id` with the next member key, added to `map`.
    fn admit(
        &self,
        map: &mut HashMap<Arc<str>, Arc<Session>>,
        id: Arc<str>,
        user_id: &str,
        core: SessionCore<Arc<EncodedBody>>,
        outbound: Option<Outbound>,
    ) -> Arc<Session> {
        let session = Arc::new(Session {
            id: id.clone(),
            user_id: user_id.to_string(),
            key: crate::server::common::keys::member_key(
                self.node_id,
                self.next_key.fetch_add(1, Ordering::Relaxed),
            ),
            inner: Mutex::new(SessionInner { core, outbound }),
            repairs: self.repairs.clone(),
        });
        self.by_user
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(user_id.to_string())
            // Room for one: most users hold one session.
            .or_insert_with(|| VecDeque::with_capacity(1))
            .push_back(id.clone());
        map.insert(id, session.clone());
        metrics::gauge!("chorus_sessions").set(map.len() as f64);
        session
    }

    /// Looks a session up.
    pub fn get(&self, id: &str) -> Option<Arc<Session>> {
        self.map().get(id).cloned()
    }

    /// Removes a session (its client said goodbye).
    pub fn remove(&self, id: &str) -> Option<Arc<Session>> {
        let mut map = self.map();
        let removed = map.remove(id);
        if let Some(session) = &removed {
            self.forget_user_session(&session.user_id, id);
        }
        metrics::gauge!("chorus_sessions").set(map.len() as f64);
        removed
    }

    /// Removes and returns sessions detached for longer than the resume window.
    pub fn take_expired(&self, now_ms: u64) -> Vec<Arc<Session>> {
        let mut map = self.map();
        let expired: Vec<Arc<str>> = map
            .iter()
            .filter(|(_, s)| s.with_core(|core| core.is_expired(now_ms)))
            .map(|(id, _)| id.clone())
            .collect();
        let taken: Vec<Arc<Session>> = expired.iter().filter_map(|id| map.remove(id)).collect();
        for session in &taken {
            self.forget_user_session(&session.user_id, &session.id);
        }
        metrics::gauge!("chorus_sessions").set(map.len() as f64);
        taken
    }

    /// Every session (a snapshot).
    pub fn all(&self) -> Vec<Arc<Session>> {
        self.map().values().cloned().collect()
    }

    /// Number of sessions.
    pub fn len(&self) -> usize {
        self.map().len()
    }

    /// Whether there are no sessions.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A random identifier with a prefix: 128 bits, hex.
pub fn random_id(prefix: &str) -> String {
    let value: u128 = rand::random();
    format!("{prefix}{value:032x}")
}

/// Sends a voice frame as a datagram; whether it was queued. Unreliable: quinn keeps a
/// bounded datagram buffer that drops the oldest; a datagram the path cannot carry (or a
/// peer that refuses datagrams) loses this frame only, counted as dropped.
pub fn send_voice_datagram(connection: &quinn::Connection, frame: Bytes) -> bool {
    match connection.send_datagram(frame) {
        Ok(()) => true,
        Err(error) => {
            metrics::counter!("chorus_audio_dropped_total", "reason" => "datagram").increment(1);
            tracing::debug!(%error, "voice datagram not sent");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a queued connection an answer goes ahead of the notifications that wait, and a
    /// client that reads none of its answers is closed as a slow consumer, not buffered
    /// without end.
    #[tokio::test]
    async fn answers_go_ahead_of_queued_notifications_and_are_bounded() {
        let close = Arc::new(CloseSignal::default());
        let ahead = Arc::new(AheadQueue::new(2, None));
        let (outbound, mut rx) = Outbound::new(7, 16, close.clone(), ahead.clone());
        let body = Arc::new(
            EncodedBody::new("room.comment", &serde_json::json!({"text": "hi"})).expect("encode"),
        );
        assert!(outbound.notify(1, &body));
        assert!(outbound.push(OutFrame::Encoded(Bytes::from_static(b"answer 1"))));
        // The answer waits beside the queue, which holds only the notification.
        tokio::time::timeout(std::time::Duration::from_secs(5), ahead.ready())
            .await
            .expect("the writer is woken for the answer");
        let lanes = ahead.take_all();
        assert_eq!(lanes.answers, [Bytes::from_static(b"answer 1")]);
        assert!(lanes.audio.is_empty());
        assert!(matches!(
            rx.recv().await,
            Some(OutFrame::Notification(1, _))
        ));
        assert!(rx.is_empty());
        // Two answers wait unread: a third closes the connection as a slow consumer.
        assert!(outbound.push(OutFrame::Encoded(Bytes::from_static(b"2"))));
        assert!(outbound.push(OutFrame::Encoded(Bytes::from_static(b"3"))));
        assert!(!close.is_requested());
        assert!(!outbound.push(OutFrame::Encoded(Bytes::from_static(b"4"))));
        assert!(close.is_requested());
        assert_eq!(
            close.reason().map(|(code, _)| code),
            Some(ErrorCode::SlowConsumer)
        );
    }
}
