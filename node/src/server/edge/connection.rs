//! The connection driver: one client connection, whatever the transport.
//!
//! A transport (WebSocket or QUIC) provides a [`TransportReader`] and a
//! [`TransportWriter`]. The driver runs the protocol over them: auth, request order and
//! rate ([`ConnectionCore`]), liveness pings, dispatch to rooms, rains and quizzes. Its
//! [`Egress`] writes, in the connection's own task (one task per connection): a writer
//! draining the bounded outgoing queue ([`Queued`]: QUIC, WebSocket over TLS), or, on a
//! plain WebSocket, the `sessions::wire` that writes each frame to the socket from the
//! task that made it and flushes only what the socket did not take. Every refusal is an
//! error response or a close with a reason; nothing a client sends can panic the task or
//! block another client.
//!
//! - One request in flight per connection: the driver finishes a frame before it reads the
//!   next. With the connection's token bucket and the node's connection cap, this bounds
//!   what a client puts in front of a room's unbounded mailbox.
//! - A room request gets a deadline and, for a comment, a request id (see `rooms::route`).
//! - A node that becomes cut off closes its client connections with 4401 (`unavailable`),
//!   so clients resume on other nodes; so does a stopping node.
//!
//! **Boundary:** the outgoing queue is bounded (`outgoing_queue_frames_max`, 4,096 frames)
//! and rooms never wait on it: when it is full the connection is closed as a slow consumer
//! (4203), and the client may resume from its session's buffer. Voice has its own queue
//! beside it (`audio_queue_frames_max`, 64 frames) that drops the oldest frame; the writer
//! sends voice first, and on QUIC voice goes straight out as datagrams. On a plain
//! WebSocket the same bounds hold on the wire's one queue: a voice frame is dropped while
//! 64 frames wait. Voice is never acknowledged, retried or kept for resume.

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use chorus_actors::rate::TokenBucket;
use chorus_actors::room::{RoomDefinition, StageCommand};
use chorus_actors::room_actor::unix_now_ms;
use chorus_actors::session::{ConnectionConfig, ConnectionCore, LivenessAction};
use chorus_protocol::{
    decode_frame, encode_request, encode_response_error, encode_response_ok, AuthRequest,
    AuthResponse, ClientRequest, Empty, Encoding, ErrorBody, ErrorCode, Frame, PingRequest,
    PingResponse, ProtocolError, ResumeOutcome, RoomCommentRequest, RoomCommentResponse,
    RoomCreateResponse, PROTOCOL_VERSION,
};
use futures_util::stream::{FuturesUnordered, StreamExt};
use serde::Serialize;

use crate::server::rooms::messages::{RoomOp, RoomOpReply};
use crate::server::rooms::route::{room_error, REQUEST_DEADLINE_MS};

/// Users in a `room.members` page when the request names no limit.
const MEMBERS_PAGE_DEFAULT: usize = 50;
use crate::config::LimitsConfig;
use crate::server::edge::service::Edge;
use crate::server::sessions::session::{
    AheadQueue, CloseSignal, OutFrame, Outbound, OutboundRx, Session,
};
use crate::server::sessions::wire::Wire;
use crate::token::TokenError;

/// Time the writer gets to flush and close after the connection ends.
const WRITER_DRAIN_TIMEOUT_MS: u64 = 2_000;

/// One message read from a transport.
#[derive(Debug)]
pub enum Inbound {
    /// A complete frame in the given encoding.
    Frame(Encoding, Bytes),
    /// A frame above the frame limit (but within the transport cap) that was discarded.
    TooLarge(usize),
    /// A message above the transport cap: the stream cannot continue; close.
    OverCap,
    /// A WebSocket text message that is not UTF-8: close (1007).
    NotUtf8,
    /// A read broke the connection's budget (see `budget`): close.
    OverBudget(crate::server::edge::budget::BudgetExceeded),
    /// The client closed on purpose (WebSocket close 1000, QUIC stream finished or close
    /// code 0): its session ends now instead of waiting out the resume window.
    Goodbye,
    /// A voice frame (a QUIC datagram, or a binary WebSocket message starting with the
    /// audio marker `0xc1`).
    Audio(Bytes),
}

/// The receiving half of a transport.
pub trait TransportReader: Send {
    /// The next message; `None` when the peer closed; `Err` for a transport failure.
    fn next(&mut self) -> impl Future<Output = Option<Result<Inbound, String>>> + Send;
    /// The connection authenticated: lift the limits that hold before `auth`.
    fn authenticated(&mut self) {}
}

/// The sending half of a transport.
pub trait TransportWriter: Send + 'static {
    /// Queues one frame (may buffer).
    fn feed(
        &mut self,
        frame: Bytes,
        encoding: Encoding,
    ) -> impl Future<Output = Result<(), String>> + Send;
    /// Flushes buffered frames.
    fn flush(&mut self) -> impl Future<Output = Result<(), String>> + Send;
    /// Sends one voice frame (unreliable: a QUIC datagram, or a binary WebSocket message
    /// that is fed like a frame). An `Err` ends the connection.
    fn send_audio(&mut self, frame: Bytes) -> impl Future<Output = Result<(), String>> + Send;
    /// The QUIC connection to send voice datagrams on directly, bypassing the writer
    /// (`None`: voice goes through [`Self::send_audio`]).
    fn datagrams(&self) -> Option<quinn::Connection> {
        None
    }
    /// Closes the transport: `None` is a normal close, else (close code, reason).
    fn close(self, reason: Option<(u16, String)>) -> impl Future<Output = ()> + Send;
}

/// How a connection's outgoing frames reach its transport.
pub trait Egress: Send + 'static {
    /// The writer: writes what waits until the connection's outgoing side is closed.
    type Writer: Future<Output = ()> + Send;

    /// Starts the connection's outgoing side under `limits`: the queue rooms and
    /// responses push to, and the writer the connection's task runs beside its reading.
    fn start(self, attachment: u64, limits: &LimitsConfig) -> Started<Self::Writer>;
}

/// A connection's started outgoing side.
pub struct Started<W> {
    outbound: Outbound,
    close: Arc<CloseSignal>,
    encoding: Arc<OnceLock<Encoding>>,
    /// Runs in the connection's own task (one task per connection, not two: an idle
    /// connection is mostly its task).
    writer: W,
}

/// Frames wait in a bounded queue for a writer that feeds them to a
/// [`TransportWriter`] (QUIC, WebSocket over TLS).
pub struct Queued<W>(pub W);

impl<W: TransportWriter + 'static> Egress for Queued<W> {
    type Writer = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

    fn start(self, attachment: u64, limits: &LimitsConfig) -> Started<Self::Writer> {
        let Queued(writer) = self;
        let close = Arc::new(CloseSignal::default());
        let ahead = Arc::new(AheadQueue::new(
            limits.audio_queue_frames_max,
            writer.datagrams(),
        ));
        let (outbound, rx) = Outbound::new(
            attachment,
            limits.outgoing_queue_frames_max,
            close.clone(),
            ahead.clone(),
        );
        let encoding = Arc::new(OnceLock::new());
        // Boxed: the loop holds the transport's write futures, bigger than an idle
        // connection needs inline.
        let writer = Box::pin(write_loop(
            writer,
            rx,
            ahead,
            close.clone(),
            encoding.clone(),
        ));
        Started {
            outbound,
            close,
            encoding,
            writer,
        }
    }
}

/// Frames go straight to a plain WebSocket's socket (see `sessions::wire`).
impl Egress for Arc<Wire> {
    type Writer = crate::server::sessions::wire::Flush;

    fn start(self, attachment: u64, _limits: &LimitsConfig) -> Started<Self::Writer> {
        Started {
            outbound: Outbound::wire(attachment, self.clone()),
            close: self.close.clone(),
            encoding: self.encoding.clone(),
            writer: crate::server::sessions::wire::flush(self),
        }
    }
}

/// Runs one connection to completion.
pub(crate) async fn drive<R: TransportReader, E: Egress>(
    node: Arc<Edge>,
    transport: &'static str,
    reader: R,
    egress: E,
    slot: crate::server::edge::service::ConnectionSlot,
) {
    use tracing::Instrument;
    let attachment = node.next_attachment_id();
    // Every log line of this connection carries its id and, after auth, its user; with
    // the request span below, `conn`/`seq` identify a request end to end.
    let span = tracing::info_span!(
        "conn",
        id = attachment,
        transport,
        user = tracing::field::Empty
    );
    drive_attached(node, transport, attachment, reader, egress)
        .instrument(span)
        .await;
    drop(slot);
}

async fn drive_attached<R: TransportReader, E: Egress>(
    node: Arc<Edge>,
    transport: &'static str,
    attachment: u64,
    mut reader: R,
    egress: E,
) {
    let limits = &node.ctx.config.limits;
    let Started {
        outbound,
        close,
        encoding,
        writer,
    } = egress.start(attachment, limits);
    let mut writer = Writer {
        future: std::pin::pin!(writer),
        done: false,
    };
    metrics::gauge!("chorus_connections", "transport" => transport).increment(1.0);

    let connection_config = ConnectionConfig {
        ping_interval_ms: limits.ping_interval_ms,
        pings_missed_max: limits.pings_missed_max,
        requests_per_sec: limits.requests_per_sec,
        requests_burst: limits.requests_burst,
        auth_timeout_ms: limits.auth_timeout_ms,
    };
    let mut conn = Connection {
        node: node.clone(),
        span: tracing::Span::current(),
        core: ConnectionCore::new(connection_config, unix_now_ms()),
        session: None,
        outbound,
        encoding,
        audio_bucket: TokenBucket::new(
            limits.audio_frames_burst,
            limits.audio_frames_per_sec,
            unix_now_ms(),
        ),
        audio_refused_at_ms: None,
        request_nonce: {
            let mut bytes = [0u8; 8];
            // A failed generator leaves zeros: the attachment id still separates connections.
            let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes);
            u64::from_be_bytes(bytes) ^ attachment
        },
    };

    let mut cut_off = node.ctx.cluster.subscribe_cut_off();
    let mut authenticated = false;
    // Comments under way (see `Admitted::Comment`); made on the first, since most
    // connections never comment.
    let mut comments: Option<Comments> = None;
    loop {
        let deadline_ms = conn.core.next_deadline_ms();
        let sleep = Duration::from_millis(deadline_ms.saturating_sub(unix_now_ms()));
        tokio::select! {
            _ = close.requested() => break,
            () = writer.run() => {}
            _ = node.ctx.shutdown.cancelled() => {
                close.close(ErrorCode::Unavailable, "node shutting down");
                break;
            }
            // Cut off from the cluster: the client reconnects to another node (the client
            // library tries the next URL) and resumes its session there.
            () = until_cut_off(&mut cut_off) => {
                close.close(
                    ErrorCode::Unavailable,
                    "node cut off from the cluster: reconnect to another node",
                );
                break;
            }
            _ = tokio::time::sleep(sleep) => {
                match conn.core.handle_tick(unix_now_ms()) {
                    LivenessAction::Wait => {}
                    LivenessAction::SendPing(seq) => {
                        let ping = PingRequest {};
                        let _ = ping;
                        let body = PingResponse { time_ms: unix_now_ms() };
                        if let Ok(frame) = encode_request(conn.encoding(), seq, "ping", &body) {
                            conn.outbound.push(OutFrame::Encoded(frame));
                        }
                    }
                    LivenessAction::Close(code) => {
                        let reason = match code {
                            ErrorCode::PingTimeout => "missed pings",
                            _ => "not authenticated in time",
                        };
                        conn.close_after_flush(code, reason);
                        break;
                    }
                }
            }
            Some(()) = next_answered(&mut comments) => {}
            // At most `COMMENTS_IN_FLIGHT_MAX` comments under way: then nothing more is read
            // until one is answered.
            message = reader.next(), if comments.as_ref().is_none_or(|c| c.len() < COMMENTS_IN_FLIGHT_MAX) => match message {
                None => break,
                Some(Ok(Inbound::Goodbye)) => {
                    writer.beside(Box::pin(finish_all(&mut comments))).await;
                    if let Some(session) = conn.session.take() {
                        writer.beside(Box::pin(node.rooms.end_session(&session))).await;
                    }
                    break;
                }
                Some(Err(error)) => {
                    tracing::debug!(%error, transport, "transport closed");
                    break;
                }
                Some(Ok(Inbound::OverCap)) => {
                    close.close(ErrorCode::FrameTooLarge, "message exceeds the transport cap");
                    break;
                }
                Some(Ok(Inbound::OverBudget(crate::server::edge::budget::BudgetExceeded::PreAuth))) => {
                    let limit = node.ctx.config.limits.preauth_message_bytes_max;
                    close.close(
                        ErrorCode::FrameTooLarge,
                        format!("before auth a message may hold at most {limit} bytes"),
                    );
                    break;
                }
                Some(Ok(Inbound::OverBudget(crate::server::edge::budget::BudgetExceeded::Node))) => {
                    close.close(
                        ErrorCode::Unavailable,
                        "the node holds too many partial messages: retry later or elsewhere",
                    );
                    break;
                }
                Some(Ok(Inbound::NotUtf8)) => {
                    close.close(ErrorCode::MalformedFrame, "a text message is not valid UTF-8");
                    break;
                }
                Some(Ok(Inbound::TooLarge(size_bytes))) => {
                    let error = ProtocolError::FrameTooLarge { size_bytes, limit_bytes: node.ctx.config.limits.frame_bytes_max };
                    conn.respond_error(0, error.to_body());
                }
                Some(Ok(Inbound::Audio(bytes))) => {
                    metrics::counter!("chorus_audio_in_total", "transport" => transport).increment(1);
                    writer.beside(Box::pin(conn.handle_audio(bytes))).await;
                }
                Some(Ok(Inbound::Frame(encoding, bytes))) => {
                    let _ = conn.encoding.set(encoding);
                    metrics::counter!("chorus_frames_in_total", "transport" => transport).increment(1);
                    match conn.admit(encoding, &bytes) {
                        Admitted::Done => {}
                        Admitted::Comment(task) => {
                            comments.get_or_insert_with(FuturesUnordered::new).push(task);
                        }
                        Admitted::Alone(seq, request, span) => {
                            // Boxed, like every request-sized future here: an idle
                            // connection's task holds only the loop's own state (about 2 KB
                            // instead of 12), not the request.
                            let alone = run_alone(&mut comments, &mut conn, seq, request, span);
                            if writer.beside(Box::pin(alone)).await == Flow::Stop {
                                break;
                            }
                        }
                    }
                    if !authenticated && conn.session.is_some() {
                        authenticated = true;
                        reader.authenticated();
                    }
                }
            }
        }
    }

    if let Some(session) = &conn.session {
        session.detach(unix_now_ms(), attachment);
    }
    // Dropping the last sender lets a queued writer finish the queue and close normally;
    // a wire queues its close.
    conn.outbound.finish();
    drop(conn);
    if !writer.done
        && tokio::time::timeout(Duration::from_millis(WRITER_DRAIN_TIMEOUT_MS), writer.run())
            .await
            .is_err()
    {
        // A peer that does not read (slow consumer) would pin the writer on a full socket:
        // dropping it (with this task) drops the socket.
        tracing::debug!(
            transport,
            "writer did not drain in time; dropping the transport"
        );
    }
    metrics::gauge!("chorus_connections", "transport" => transport).decrement(1.0);
}

/// A connection's comments under way.
type Comments = FuturesUnordered<std::pin::Pin<Box<dyn Future<Output = ()> + Send>>>;

/// Resolves when one of the comments under way is answered; never while none is.
async fn next_answered(comments: &mut Option<Comments>) -> Option<()> {
    match comments {
        Some(comments) if !comments.is_empty() => comments.next().await,
        _ => std::future::pending().await,
    }
}

/// Runs a request that runs alone: after the comments before it are answered.
async fn run_alone(
    comments: &mut Option<Comments>,
    conn: &mut Connection,
    seq: u64,
    request: ClientRequest,
    span: tracing::Span,
) -> Flow {
    finish_all(comments).await;
    tracing::Instrument::instrument(conn.dispatch(seq, request), span).await
}

/// Resolves when every comment under way is answered.
async fn finish_all(comments: &mut Option<Comments>) {
    if let Some(comments) = comments {
        while comments.next().await.is_some() {}
    }
}

/// A connection's writer, run by the connection's task beside whatever else it awaits.
struct Writer<'a, F> {
    future: std::pin::Pin<&'a mut F>,
    /// The writer has ended (the outgoing side closed or failed).
    done: bool,
}

impl<F: Future<Output = ()>> Writer<'_, F> {
    /// Runs the writer until it ends; once it has, never resolves.
    async fn run(&mut self) {
        if self.done {
            return std::future::pending().await;
        }
        self.future.as_mut().await;
        self.done = true;
    }

    /// Awaits `work` while the writer keeps writing: a request that waits on a room must
    /// not hold up what the connection has to send.
    async fn beside<T>(&mut self, work: impl Future<Output = T> + Unpin) -> T {
        let mut work = work;
        loop {
            tokio::select! {
                biased;
                out = &mut work => return out,
                () = self.run() => {}
            }
        }
    }
}

async fn write_loop<W: TransportWriter>(
    mut writer: W,
    mut rx: OutboundRx,
    ahead: Arc<AheadQueue>,
    close: Arc<CloseSignal>,
    encoding: Arc<OnceLock<Encoding>>,
) {
    // The connection's encoding, read once there is something to write (`auth` sets it).
    let encoding = || *encoding.get().unwrap_or(&Encoding::MsgPack);
    loop {
        // A frame from the queue, after what goes ahead of it.
        let queued = tokio::select! {
            biased;
            _ = close.requested() => {
                let reason = close.reason().map(|(code, reason)| (code.close_code(), reason));
                writer.close(reason).await;
                return;
            }
            // Answers first, then voice (it is late soon; its queue is bounded by
            // dropping), then the notifications that wait.
            _ = ahead.ready() => {
                let lanes = ahead.take_all();
                for frame in lanes.answers {
                    if let Err(error) = writer.feed(frame, encoding()).await {
                        return write_failed(&close, "write", &error);
                    }
                    metrics::counter!("chorus_frames_out_total").increment(1);
                }
                for frame in lanes.audio {
                    if let Err(error) = writer.send_audio(frame).await {
                        return write_failed(&close, "audio write", &error);
                    }
                    metrics::counter!("chorus_audio_out_total").increment(1);
                }
                None
            }
            frame = rx.recv() => match frame {
                None => {
                    writer.close(None).await;
                    return;
                }
                Some(OutFrame::Close(code, reason)) => {
                    let _ = writer.flush().await;
                    writer.close(Some((code.close_code(), reason))).await;
                    return;
                }
                // (`Outbound` sends answers through `ahead`, not the queue.)
                Some(OutFrame::Encoded(bytes)) => Some(bytes),
                Some(OutFrame::Notification(seq, body)) => Some(body.frame(encoding(), seq)),
            },
        };
        if let Some(bytes) = queued {
            if let Err(error) = writer.feed(bytes, encoding()).await {
                return write_failed(&close, "write", &error);
            }
            metrics::counter!("chorus_frames_out_total").increment(1);
        }
        if rx.is_empty() {
            if let Err(error) = writer.flush().await {
                return write_failed(&close, "flush", &error);
            }
        }
    }
}

/// A write of `what` failed: the connection ends (the client may resume elsewhere).
fn write_failed(close: &CloseSignal, what: &str, error: &str) {
    tracing::debug!(%error, "{what} failed");
    close.close(ErrorCode::Unavailable, "write failed");
}

#[derive(Debug, PartialEq, Eq)]
enum Flow {
    Continue,
    Stop,
}

struct Connection {
    node: Arc<Edge>,
    span: tracing::Span,
    core: ConnectionCore,
    session: Option<Arc<Session>>,
    outbound: Outbound,
    encoding: Arc<OnceLock<Encoding>>,
    /// Voice frames this connection may send (`audio_frames_per_sec`).
    audio_bucket: TokenBucket,
    /// When a voice frame was last refused with an error response (at most one a second).
    audio_refused_at_ms: Option<u64>,
    /// Random, names this connection in the request ids the node makes up for requests
    /// that carry none (`seq` restarts on every connection).
    request_nonce: u64,
}

/// Least time between two error responses about refused voice frames.
const AUDIO_REFUSAL_INTERVAL_MS: u64 = 1_000;

impl Connection {
    /// A voice frame from the client: checked (well formed, within the rate, for a room
    /// the session is in) and passed to the room's owner, which relays it if the user may
    /// speak. A refused frame is dropped; the client hears why at most once a second (an
    /// error response with seq 0), since audio is never answered one by one.
    async fn handle_audio(&mut self, bytes: Bytes) {
        let now_ms = unix_now_ms();
        let Some(session) = self.session.clone() else {
            self.refuse_audio(
                now_ms,
                ErrorBody::new(
                    ErrorCode::Unauthenticated,
                    "authenticate before sending audio",
                ),
            );
            return;
        };
        if !self.audio_bucket.try_take(now_ms) {
            metrics::counter!("chorus_audio_dropped_total", "reason" => "rate_limited")
                .increment(1);
            self.refuse_audio(
                now_ms,
                ErrorBody::new(
                    ErrorCode::RateLimited,
                    "too many audio frames on this connection",
                ),
            );
            return;
        }
        let uplink = match chorus_protocol::audio::decode_uplink(&bytes) {
            Ok(uplink) => uplink,
            Err(error) => {
                metrics::counter!("chorus_audio_dropped_total", "reason" => "malformed")
                    .increment(1);
                self.refuse_audio(now_ms, error.to_body());
                return;
            }
        };
        let downlink_bytes = chorus_protocol::audio::downlink_frame_bytes(
            &uplink.room_id,
            &session.user_id,
            uplink.payload.len(),
        );
        if downlink_bytes > chorus_protocol::audio::AUDIO_FRAME_BYTES_MAX {
            metrics::counter!("chorus_audio_dropped_total", "reason" => "too_large").increment(1);
            self.refuse_audio(
                now_ms,
                ErrorBody::new(
                    ErrorCode::FrameTooLarge,
                    format!(
                        "the relayed audio frame would be {downlink_bytes} bytes, above {}",
                        chorus_protocol::audio::AUDIO_FRAME_BYTES_MAX
                    ),
                ),
            );
            return;
        }
        if !session.with_core(|core| core.in_room(&uplink.room_id)) {
            metrics::counter!("chorus_audio_dropped_total", "reason" => "not_in_room").increment(1);
            self.refuse_audio(
                now_ms,
                ErrorBody::new(
                    ErrorCode::NotInRoom,
                    format!(
                        "audio for room {:?}, which this session has not joined",
                        uplink.room_id
                    ),
                ),
            );
            return;
        }
        self.node.rooms.route_audio(&session, uplink, &bytes).await;
    }

    fn refuse_audio(&mut self, now_ms: u64, error: ErrorBody) {
        if self
            .audio_refused_at_ms
            .is_some_and(|at| now_ms < at + AUDIO_REFUSAL_INTERVAL_MS)
        {
            return;
        }
        self.audio_refused_at_ms = Some(now_ms);
        self.respond_error(0, error);
    }

    fn encoding(&self) -> Encoding {
        *self.encoding.get().unwrap_or(&Encoding::MsgPack)
    }

    fn respond_ok<B: Serialize>(&self, seq: u64, body: &B) {
        match encode_response_ok(self.encoding(), seq, body) {
            Ok(frame) => {
                self.outbound.push(OutFrame::Encoded(frame));
            }
            Err(error) => self.respond_error(seq, error.to_body()),
        }
    }

    fn respond_error(&self, seq: u64, error: ErrorBody) {
        let name = error.error_code().map(|c| c.name()).unwrap_or("unknown");
        metrics::counter!("chorus_errors_total", "code" => name).increment(1);
        if let Ok(frame) = encode_response_error(self.encoding(), seq, &error) {
            self.outbound.push(OutFrame::Encoded(frame));
        }
    }

    fn close_after_flush(&self, code: ErrorCode, reason: &str) {
        if !self
            .outbound
            .push(OutFrame::Close(code, reason.to_string()))
        {
            self.outbound.close_signal().close(code, reason);
        }
    }

    /// Decodes a frame and passes it through admission (order, authentication, rate,
    /// kind, body): what is refused or needs no execution is answered here; a comment of
    /// an authenticated session becomes a task of its own; anything else runs alone.
    fn admit(&mut self, encoding: Encoding, bytes: &[u8]) -> Admitted {
        let frame = match decode_frame(encoding, bytes, &self.node.frame_limits) {
            Ok(frame) => frame,
            Err(error) => {
                self.respond_error(0, error.to_body());
                return Admitted::Done;
            }
        };
        let request = match frame {
            Frame::Response(response) => {
                self.core.handle_pong(response.seq);
                return Admitted::Done;
            }
            Frame::Notification(notification) => {
                self.respond_error(
                    notification.seq,
                    ErrorBody::new(
                        ErrorCode::UnexpectedFrame,
                        "clients may not send notifications",
                    ),
                );
                return Admitted::Done;
            }
            Frame::Request(request) => request,
        };
        let seq = request.seq;
        if let Err(code) = self.core.handle_request(unix_now_ms(), seq, &request.kind) {
            let message = match code {
                ErrorCode::OutOfOrder => "request seq must be greater than the previous one",
                ErrorCode::Unauthenticated => "authenticate first: only auth and ping are served",
                ErrorCode::RateLimited => "too many requests on this connection",
                _ => "refused",
            };
            self.respond_error(seq, ErrorBody::new(code, message));
            return Admitted::Done;
        }
        let decoded = match ClientRequest::decode(&request.kind, &request.body) {
            Ok(decoded) => decoded,
            Err(error) => {
                self.respond_error(seq, error.to_body());
                return Admitted::Done;
            }
        };
        let span = tracing::debug_span!("request", seq, kind = decoded.kind());
        match (decoded, &self.session) {
            (ClientRequest::RoomComment(comment), Some(session)) => {
                let task = CommentTask {
                    node: self.node.clone(),
                    session: session.clone(),
                    outbound: self.outbound.clone(),
                    encoding: self.encoding.clone(),
                    request_nonce: self.request_nonce,
                };
                Admitted::Comment(Box::pin(tracing::Instrument::instrument(
                    task.run(seq, comment, unix_now_ms()),
                    span,
                )))
            }
            (decoded, _) => Admitted::Alone(seq, decoded, span),
        }
    }

    async fn dispatch(&mut self, seq: u64, request: ClientRequest) -> Flow {
        let now_ms = unix_now_ms();
        if let ClientRequest::Auth(auth) = request {
            return self.authenticate(seq, auth, now_ms).await;
        }
        if let ClientRequest::Ping(_) = request {
            self.respond_ok(seq, &PingResponse { time_ms: now_ms });
            return Flow::Continue;
        }
        // ConnectionCore admits nothing else before auth.
        let Some(session) = self.session.clone() else {
            self.respond_error(
                seq,
                ErrorBody::new(ErrorCode::Unauthenticated, "authenticate first"),
            );
            return Flow::Continue;
        };
        let result = self.room_request(&session, seq, request, now_ms).await;
        match result {
            Ok(frame) => {
                self.outbound
                    .push(OutFrame::Encoded(frame(self.encoding(), seq)));
            }
            Err(error) => self.respond_error(seq, error),
        }
        Flow::Continue
    }

    async fn authenticate(&mut self, seq: u64, auth: AuthRequest, now_ms: u64) -> Flow {
        if self.session.is_some() {
            self.respond_error(
                seq,
                ErrorBody::new(ErrorCode::AlreadyAuthenticated, "already authenticated"),
            );
            return Flow::Continue;
        }
        let version = auth.protocol_version.unwrap_or(PROTOCOL_VERSION);
        if version != PROTOCOL_VERSION {
            self.respond_error(
                seq,
                ErrorBody::new(
                    ErrorCode::UnsupportedVersion,
                    format!("protocol version {version} not supported; this server speaks {PROTOCOL_VERSION}"),
                ),
            );
            self.close_after_flush(
                ErrorCode::UnsupportedVersion,
                "unsupported protocol version",
            );
            return Flow::Stop;
        }
        let claims = match self.node.keys.verify(&auth.token, now_ms / 1000) {
            Ok(claims) => claims,
            Err(error) => {
                let code = match error {
                    TokenError::Expired => ErrorCode::TokenExpired,
                    _ => ErrorCode::InvalidToken,
                };
                tracing::info!(code = code.name(), "auth refused");
                self.respond_error(seq, ErrorBody::new(code, error.to_string()));
                self.close_after_flush(code, &error.to_string());
                return Flow::Stop;
            }
        };
        let user = claims.sub;
        self.span.record("user", user.as_str());
        let node = &self.node;
        let encoding = self.encoding();
        let response = |session_id: &str, outcome: ResumeOutcome, notification_seq: u64| {
            let body = AuthResponse {
                protocol_version: PROTOCOL_VERSION,
                user_id: user.clone(),
                session_id: session_id.to_string(),
                resume: outcome,
                notification_seq,
                node: node.ctx.config.node_name.clone(),
                ping_interval_ms: node.ctx.config.limits.ping_interval_ms,
                resume_window_ms: node.ctx.config.limits.resume_window_ms,
            };
            encode_response_ok(encoding, seq, &body).unwrap_or_default()
        };
        let mut outcome = ResumeOutcome::New;
        if let Some(resume) = &auth.resume {
            outcome = ResumeOutcome::Resync;
            let local = node
                .ctx
                .sessions
                .get(&resume.session_id)
                .or_else(|| node.ctx.sessions.taken_over_copy(&resume.session_id));
            // Not here: if the client lists its rooms and the id is really its own, take
            // the session over (its node is gone, or the client moved).
            let taken_over = match (&local, &resume.rooms) {
                (None, Some(rooms)) => {
                    node.rooms
                        .take_over_session(&resume.session_id, &user, resume.last_seq, rooms)
                        .await
                }
                _ => None,
            };
            // A takeover may have taken a while.
            let now_ms = unix_now_ms();
            if let Some(session) = local.or(taken_over) {
                if session.user_id == user {
                    let resumed =
                        session.resume(now_ms, resume.last_seq, self.outbound.clone(), |last| {
                            response(&session.id, ResumeOutcome::Resumed, last)
                        });
                    match resumed {
                        Ok(replayed) => {
                            metrics::counter!("chorus_resumes_total", "outcome" => "resumed")
                                .increment(1);
                            tracing::debug!(session = %session.id, replayed, "session resumed");
                            self.core.handle_authenticated();
                            self.session = Some(session);
                            return Flow::Continue;
                        }
                        Err(refusal) => {
                            tracing::debug!(?refusal, "resume refused");
                        }
                    }
                }
            }
            metrics::counter!("chorus_resumes_total", "outcome" => "resync").increment(1);
        }
        match node
            .ctx
            .sessions
            .create(&user, self.outbound.clone(), |id| response(id, outcome, 0))
        {
            Ok(created) => {
                if let Some(evicted) = created.evicted {
                    // The user's oldest idle session made room: it leaves its rooms.
                    tracing::debug!(session = %evicted.id, "session ended: the user opened too many");
                    let node = node.clone();
                    tokio::spawn(async move { node.rooms.leave_all_rooms(&evicted).await });
                }
                self.core.handle_authenticated();
                self.session = Some(created.session);
                Flow::Continue
            }
            Err(crate::server::sessions::session::SessionRefusal::NodeFull) => {
                self.respond_error(
                    seq,
                    ErrorBody::new(ErrorCode::Unavailable, "node has too many sessions"),
                );
                self.close_after_flush(ErrorCode::Unavailable, "too many sessions");
                Flow::Stop
            }
            Err(crate::server::sessions::session::SessionRefusal::UserFull(max)) => {
                let message = format!(
                    "this user already has {max} sessions on this node, all connected: close one"
                );
                self.respond_error(seq, ErrorBody::new(ErrorCode::TooManySessions, &message));
                self.close_after_flush(ErrorCode::TooManySessions, &message);
                Flow::Stop
            }
        }
    }

    /// Runs a room request (on this node or the room's owner); returns a closure that
    /// encodes the ok response.
    async fn room_request(
        &self,
        session: &Arc<Session>,
        seq: u64,
        request: ClientRequest,
        now_ms: u64,
    ) -> Result<Box<dyn FnOnce(Encoding, u64) -> Bytes + Send>, ErrorBody> {
        fn ok<B: Serialize + Send + 'static>(
            body: B,
        ) -> Box<dyn FnOnce(Encoding, u64) -> Bytes + Send> {
            Box::new(move |encoding, seq| {
                encode_response_ok(encoding, seq, &body).unwrap_or_default()
            })
        }
        fn unexpected(reply: RoomOpReply) -> ErrorBody {
            ErrorBody::new(
                ErrorCode::Internal,
                format!("unexpected room reply {reply:?}"),
            )
        }
        let node = &self.node;
        let user = session.user_id.clone();
        match request {
            ClientRequest::RoomCreate(create) => {
                node.ctx
                    .users
                    .try_room_create(&user, now_ms, |room| node.ctx.room_is_open(room))
                    .map_err(|refusal| creation_refused(refusal, "rooms"))?;
                let definition = RoomDefinition::new(
                    crate::server::sessions::session::random_id("r-"),
                    &create.title,
                    user,
                    create.scheduled_start_ms,
                    now_ms,
                    node.rooms.directory.config(),
                )
                .map_err(room_error)?;
                let room_id = definition.room_id.clone();
                match node
                    .rooms
                    .room_op(session, &room_id, RoomOp::Create(definition))
                    .await?
                {
                    RoomOpReply::Created(room) => {
                        node.ctx
                            .users
                            .room_created(&session.user_id, &room.room_id, now_ms);
                        Ok(ok(RoomCreateResponse {
                            room_id: room.room_id.clone(),
                            room,
                        }))
                    }
                    other => Err(unexpected(other)),
                }
            }
            ClientRequest::RoomJoin(join) => {
                if !session.with_core(|core| core.can_join(&join.room_id)) {
                    return Err(ErrorBody::new(
                        ErrorCode::TooManyRooms,
                        "this session is in the maximum number of rooms",
                    ));
                }
                // The session counts as in the room from now on, so that the room's events
                // that overtake the answer are recorded (their positions bound a later
                // catch-up); undone if the join fails.
                let was_in_room = session.with_core(|core| core.in_room(&join.room_id));
                let memberships_max = node.ctx.config.limits.memberships_per_user_max;
                if !was_in_room && node.ctx.sessions.user_memberships(&user) >= memberships_max {
                    return Err(ErrorBody::new(
                        ErrorCode::TooManyRooms,
                        format!(
                            "this user is in {memberships_max} rooms through this node: leave one first"
                        ),
                    ));
                }
                session
                    .with_core(|core| core.handle_room_joined(&join.room_id))
                    .map_err(|code| ErrorBody::new(code, "too many rooms"))?;
                // Joining again (e.g. after a failover): the room sends what came after
                // the latest comment this session has, as notifications.
                let since = if was_in_room {
                    session.with_core(|core| core.room_position(&join.room_id))
                } else {
                    None
                };
                let reply = node
                    .rooms
                    .room_op(session, &join.room_id, RoomOp::Join { user, since })
                    .await;
                let response = match reply {
                    Ok(RoomOpReply::Joined(response)) => response,
                    other => {
                        if !was_in_room {
                            session.with_core(|core| core.handle_room_left(&join.room_id));
                            node.rooms.forget_mirror(&join.room_id, session);
                        }
                        return Err(match other {
                            Err(error) => error,
                            Ok(reply) => unexpected(reply),
                        });
                    }
                };
                // A fresh join got the room's recent comments in the answer; a repeated
                // one gets what it missed as notifications (perhaps still on their way).
                let answered = if since.is_some() {
                    0
                } else {
                    response.room.comment_count
                };
                session.with_core(|core| core.handle_room_join_answered(&join.room_id, answered));
                Ok(ok(response))
            }
            ClientRequest::RoomLeave(leave) => {
                self.require_member(session, &leave.room_id)?;
                let result = node
                    .rooms
                    .room_op(session, &leave.room_id, RoomOp::Leave)
                    .await;
                session.with_core(|core| core.handle_room_left(&leave.room_id));
                result?;
                Ok(ok(Empty {}))
            }
            ClientRequest::RoomStart(start) => {
                node.rooms
                    .room_op(session, &start.room_id, RoomOp::Start { user })
                    .await?;
                Ok(ok(Empty {}))
            }
            ClientRequest::RoomEnd(end) => {
                node.rooms
                    .room_op(session, &end.room_id, RoomOp::End { user })
                    .await?;
                Ok(ok(Empty {}))
            }
            ClientRequest::RoomInfo(info) => {
                match node
                    .rooms
                    .room_op(session, &info.room_id, RoomOp::Info)
                    .await?
                {
                    RoomOpReply::Info(room) => Ok(ok(room)),
                    other => Err(unexpected(other)),
                }
            }
            ClientRequest::RoomComment(comment) => {
                post_comment(node, session, self.request_nonce, seq, comment, now_ms)
                    .await
                    .map(ok)
            }
            ClientRequest::RoomComments(page) => {
                self.require_member(session, &page.room_id)?;
                let limit = page
                    .limit
                    .unwrap_or(chorus_protocol::COMMENTS_PAGE_MAX)
                    .clamp(1, chorus_protocol::COMMENTS_PAGE_MAX);
                let response = node
                    .rooms
                    .room_comments(session, &page.room_id, page.after, u64::from(limit))
                    .await?;
                Ok(ok(response))
            }
            ClientRequest::RoomReact(react) => {
                // Counted here and sent to the owner in batches (R7).
                self.require_member(session, &react.room_id)?;
                chorus_actors::room::check_emoji(&node.ctx.config.room, &react.emoji)
                    .map_err(room_error)?;
                if !node.rooms.reactions.add(&react.room_id, &react.emoji) {
                    return Err(ErrorBody::new(
                        ErrorCode::RateLimited,
                        "too many different reactions in this moment; retry",
                    ));
                }
                metrics::counter!("chorus_reactions_total").increment(1);
                Ok(ok(Empty {}))
            }
            ClientRequest::RoomBullet(bullet) => {
                // Checked and rate limited here, sent to the owner in batches (Q6).
                self.require_member(session, &bullet.room_id)?;
                node.rooms
                    .bullets
                    .send(now_ms, &bullet.room_id, &user, &bullet.text)?;
                metrics::counter!("chorus_bullets_total").increment(1);
                Ok(ok(Empty {}))
            }
            ClientRequest::RoomSetRole(r) => {
                let command = StageCommand::SetRole {
                    user: r.user_id,
                    role: r.role,
                };
                self.stage(node, session, &r.room_id, user, command)
                    .await
                    .map(|()| ok(Empty {}))
            }
            ClientRequest::RoomHand(r) => {
                let command = StageCommand::Hand { raised: r.raised };
                self.stage(node, session, &r.room_id, user, command)
                    .await
                    .map(|()| ok(Empty {}))
            }
            ClientRequest::RoomInvite(r) => {
                let command = StageCommand::Invite { user: r.user_id };
                self.stage(node, session, &r.room_id, user, command)
                    .await
                    .map(|()| ok(Empty {}))
            }
            ClientRequest::RoomInviteAnswer(r) => {
                let command = StageCommand::InviteAnswer { accept: r.accept };
                self.stage(node, session, &r.room_id, user, command)
                    .await
                    .map(|()| ok(Empty {}))
            }
            ClientRequest::RoomMute(r) => {
                let command = StageCommand::Mute {
                    user: r.user_id,
                    muted: r.muted,
                };
                self.stage(node, session, &r.room_id, user, command)
                    .await
                    .map(|()| ok(Empty {}))
            }
            ClientRequest::RoomKick(r) => {
                let command = StageCommand::Kick { user: r.user_id };
                self.stage(node, session, &r.room_id, user, command)
                    .await
                    .map(|()| ok(Empty {}))
            }
            ClientRequest::RoomBlock(r) => {
                let command = StageCommand::Block {
                    user: r.user_id,
                    blocked: r.blocked,
                };
                self.stage(node, session, &r.room_id, user, command)
                    .await
                    .map(|()| ok(Empty {}))
            }
            ClientRequest::RoomInviteUsers(r) => {
                if r.user_ids.len() > chorus_actors::room::INVITE_USERS_MAX {
                    return Err(ErrorBody::new(
                        ErrorCode::InvalidArgument,
                        format!(
                            "invite 1 to {} users at once",
                            chorus_actors::room::INVITE_USERS_MAX
                        ),
                    ));
                }
                let op = RoomOp::InviteUsers {
                    user,
                    users: r.user_ids,
                };
                node.rooms.room_op(session, &r.room_id, op).await?;
                Ok(ok(Empty {}))
            }
            ClientRequest::RoomPollCreate(r) => {
                node.ctx
                    .users
                    .try_poll_create(&user, now_ms)
                    .map_err(|refusal| creation_refused(refusal, "polls"))?;
                let op = RoomOp::PollCreate {
                    user,
                    question: r.question,
                    options: r.options,
                };
                match node.rooms.room_op(session, &r.room_id, op).await? {
                    RoomOpReply::Poll(poll) => Ok(ok(poll)),
                    other => Err(unexpected(other)),
                }
            }
            ClientRequest::RoomVote(r) => {
                let op = RoomOp::Vote {
                    poll_id: r.poll_id,
                    option: r.option,
                };
                node.rooms.room_op(session, &r.room_id, op).await?;
                Ok(ok(Empty {}))
            }
            ClientRequest::RoomPollClose(r) => {
                let op = RoomOp::PollClose {
                    user,
                    poll_id: r.poll_id,
                };
                match node.rooms.room_op(session, &r.room_id, op).await? {
                    RoomOpReply::Poll(poll) => Ok(ok(poll)),
                    other => Err(unexpected(other)),
                }
            }
            ClientRequest::RainGrab(r) => {
                let answer = node
                    .rain
                    .rain_grab(&r.rain_id, &user, &r.request_id)
                    .await?;
                Ok(ok(answer))
            }
            ClientRequest::RoomList(r) => node.rooms.list_rooms(r).await.map(ok),
            ClientRequest::RoomSummary(r) => {
                match node
                    .rooms
                    .room_op(session, &r.room_id, RoomOp::Summary)
                    .await?
                {
                    RoomOpReply::Summary(summary) => Ok(ok(summary)),
                    other => Err(unexpected(other)),
                }
            }
            ClientRequest::RoomInterest(r) => {
                let op = RoomOp::Interest {
                    user,
                    interested: r.interested,
                };
                match node.rooms.room_op(session, &r.room_id, op).await? {
                    RoomOpReply::Interested(count) => {
                        Ok(ok(chorus_protocol::RoomInterestResponse {
                            interested_count: count,
                        }))
                    }
                    other => Err(unexpected(other)),
                }
            }
            ClientRequest::RoomMembers(r) => {
                let op = RoomOp::Members {
                    after: r.after,
                    limit: r.limit.map_or(MEMBERS_PAGE_DEFAULT, |l| l as usize),
                };
                match node.rooms.room_op(session, &r.room_id, op).await? {
                    RoomOpReply::Members(page) => Ok(ok(page)),
                    other => Err(unexpected(other)),
                }
            }
            ClientRequest::RoomStage(r) => {
                match node
                    .rooms
                    .room_op(session, &r.room_id, RoomOp::StageInfo { user })
                    .await?
                {
                    RoomOpReply::Stage(stage) => Ok(ok(stage)),
                    other => Err(unexpected(other)),
                }
            }
            ClientRequest::QuizAnswer(answer) => {
                Ok(ok(node.quiz.quiz_answer(session, answer).await?))
            }
            ClientRequest::VmSend(r) => Ok(ok(node.voicemail.send(&user, r.to, r.group).await?)),
            ClientRequest::VmGroupCreate(r) => {
                Ok(ok(node.voicemail.group_create(&user, r).await?))
            }
            ClientRequest::VmGroupInfo(r) => {
                Ok(ok(node.voicemail.group_info(&user, &r.group_id).await?))
            }
            ClientRequest::VmChunk(r) => Ok(ok(node.voicemail.chunk(&user, r).await?)),
            ClientRequest::VmStatus(r) => {
                Ok(ok(node.voicemail.status(&user, r.message_id).await?))
            }
            ClientRequest::VmCancel(r) => {
                Ok(ok(node.voicemail.cancel(&user, r.message_id).await?))
            }
            ClientRequest::VmFetch(r) => Ok(ok(node.voicemail.fetch(&user, r).await?)),
            ClientRequest::VmSync(r) => Ok(ok(node.voicemail.sync(&user, r).await?)),
            ClientRequest::VmRead(r) => Ok(ok(node.voicemail.read(&user, r.message_id).await?)),
            ClientRequest::VmPlay(r) => Ok(ok(node.voicemail.play(&user, r).await?)),
            ClientRequest::VmHistory(r) => Ok(ok(node.voicemail.history(&user, r).await?)),
            ClientRequest::Auth(_) | ClientRequest::Ping(_) => Err(ErrorBody::new(
                ErrorCode::Internal,
                "auth and ping are handled before dispatch",
            )),
        }
    }

    /// A stage change: what a user does as itself (its hand, its invitation, its own
    /// microphone) needs this session in the room; the room's owner checks the role, and
    /// the host and moderators moderate from outside the room too (docs/protocol.md §6.10).
    async fn stage(
        &self,
        node: &Edge,
        session: &Arc<Session>,
        room_id: &str,
        user: String,
        command: StageCommand,
    ) -> Result<(), ErrorBody> {
        if command.acts_as_itself(&user) {
            self.require_member(session, room_id)?;
        }
        node.rooms
            .room_op(session, room_id, RoomOp::Stage { user, command })
            .await?;
        Ok(())
    }

    fn require_member(&self, session: &Session, room_id: &str) -> Result<(), ErrorBody> {
        require_member(session, room_id)
    }
}

/// `4001 not_in_room` unless `session` is in `room_id`.
fn require_member(session: &Session, room_id: &str) -> Result<(), ErrorBody> {
    if session.with_core(|core| core.in_room(room_id)) {
        Ok(())
    } else {
        Err(ErrorBody::new(
            ErrorCode::NotInRoom,
            format!("join room {room_id:?} first"),
        ))
    }
}

/// Comments of one connection that may be under way at once. While this many are, the
/// connection reads nothing more until one is answered.
pub const COMMENTS_IN_FLIGHT_MAX: usize = 32;

/// What admission made of a frame.
enum Admitted {
    /// Answered (or nothing to answer).
    Done,
    /// A comment: runs as a task of its own, beside the connection's other comments.
    Comment(std::pin::Pin<Box<dyn Future<Output = ()> + Send>>),
    /// Anything else: runs alone, after the comments before it are answered.
    Alone(u64, ClientRequest, tracing::Span),
}

/// What a comment needs to run without its connection.
struct CommentTask {
    node: Arc<Edge>,
    session: Arc<Session>,
    outbound: Outbound,
    encoding: Arc<OnceLock<Encoding>>,
    request_nonce: u64,
}

impl CommentTask {
    /// Posts the comment and queues its answer.
    async fn run(self, seq: u64, comment: RoomCommentRequest, now_ms: u64) {
        let result = post_comment(
            &self.node,
            &self.session,
            self.request_nonce,
            seq,
            comment,
            now_ms,
        )
        .await;
        let encoding = *self.encoding.get().unwrap_or(&Encoding::MsgPack);
        let frame = match result {
            Ok(response) => encode_response_ok(encoding, seq, &response),
            Err(error) => {
                let name = error.error_code().map(|c| c.name()).unwrap_or("unknown");
                metrics::counter!("chorus_errors_total", "code" => name).increment(1);
                encode_response_error(encoding, seq, &error)
            }
        };
        if let Ok(frame) = frame {
            self.outbound.push(OutFrame::Encoded(frame));
        }
    }
}

/// Posts a comment of `session` (request `seq` of a connection named `request_nonce`):
/// on the room's owner, within the request deadline.
async fn post_comment(
    node: &Arc<Edge>,
    session: &Arc<Session>,
    request_nonce: u64,
    seq: u64,
    comment: RoomCommentRequest,
    now_ms: u64,
) -> Result<RoomCommentResponse, ErrorBody> {
    require_member(session, &comment.room_id)?;
    let request_id = match comment.request_id {
        Some(id) => {
            check_request_id(&id)?;
            id
        }
        // Without one from the client, still one per request: a retry on a new owner (the
        // ring moved during the request) is answered, not run again.
        None => format!("~{request_nonce:016x}#{seq}"),
    };
    let deadline_ms = now_ms + REQUEST_DEADLINE_MS;
    let op = RoomOp::Comment {
        text: comment.text,
        request_id: Some(request_id),
        deadline_ms: Some(deadline_ms),
    };
    let answer = tokio::time::timeout(
        Duration::from_millis(REQUEST_DEADLINE_MS),
        node.rooms.room_op(session, &comment.room_id, op),
    )
    .await
    .map_err(|_| {
        ErrorBody::new(
            ErrorCode::Unavailable,
            format!(
                "no answer from the room within {REQUEST_DEADLINE_MS} ms; the comment may have \
                 been posted: send it again with the same request_id to learn its id"
            ),
        )
    })??;
    match answer {
        RoomOpReply::Commented(response) => Ok(response),
        other => Err(ErrorBody::new(
            ErrorCode::Internal,
            format!("unexpected room reply {other:?}"),
        )),
    }
}

/// Resolves when the node becomes cut off while this connection is open (not for a
/// connection made while it already is: that client chose this node, and gets
/// `unavailable` at once for rooms owned elsewhere); never if the cluster service is gone.
async fn until_cut_off(cut_off: &mut tokio::sync::watch::Receiver<bool>) {
    loop {
        if cut_off.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
        if *cut_off.borrow_and_update() {
            return;
        }
    }
}

/// A client's `request_id`: 1 to [`chorus_protocol::REQUEST_ID_BYTES_MAX`] bytes.
fn check_request_id(id: &str) -> Result<(), ErrorBody> {
    if id.is_empty() || id.len() > chorus_protocol::REQUEST_ID_BYTES_MAX {
        return Err(ErrorBody::new(
            ErrorCode::InvalidArgument,
            format!(
                "request_id must be 1 to {} bytes",
                chorus_protocol::REQUEST_ID_BYTES_MAX
            ),
        ));
    }
    Ok(())
}

/// The error for a creation refused by a per-user bound.
fn creation_refused(
    refusal: crate::server::sessions::users::CreateRefusal,
    what: &str,
) -> ErrorBody {
    match refusal {
        crate::server::sessions::users::CreateRefusal::Rate => ErrorBody::new(
            ErrorCode::RateLimited,
            format!("this user creates {what} too fast: wait a little"),
        ),
        crate::server::sessions::users::CreateRefusal::OpenRooms(max) => ErrorBody::new(
            ErrorCode::QuotaExceeded,
            format!("this user already has {max} open rooms: end one first"),
        ),
    }
}
