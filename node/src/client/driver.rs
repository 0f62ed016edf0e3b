//! The background task behind a [`Client`](super::Client): owns the connection, assigns
//! request sequence numbers, matches responses, answers pings, deduplicates
//! notifications, and reconnects with resume.
//!
//! One task per client, one `select!` loop: frames from the server, requests from the
//! handles, cancellation, and a liveness deadline (no frame for 2.5 ping intervals means
//! the server is gone even if the transport has not noticed, e.g. a stopped process).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chorus_protocol::audio::AudioFrame;
use chorus_protocol::{
    AuthResponse, ErrorBody, ErrorCode, Event, Frame, NotificationFrame, PingResponse,
    ProtocolError, RequestFrame, ResumeOutcome, ResumeRequest,
};
use rand::rngs::SmallRng;
use rand::SeedableRng;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::error::is_final_auth_error;
use super::{
    backoff_delay_ms, is_final_close_code, ClientConfig, ClientError, ClientEvent, Command,
    Connection, Connector, Received, Reply, Shared,
};

/// Normal WebSocket close code, also used as the QUIC application code for a normal close.
const CLOSE_NORMAL: u16 = 1000;

/// Silence tolerated from the server, in half ping intervals, before the connection is
/// considered dead. The server pings every interval, so 2.5 intervals without any frame
/// means two pings went missing.
const SILENCE_HALF_PING_INTERVALS: u64 = 5;

/// Opens a transport connection to `url` and authenticates (resuming if asked), within
/// the connect timeout.
pub(super) async fn open_session(
    connector: &Connector,
    url: &str,
    config: &ClientConfig,
    seq: u64,
    resume: Option<ResumeRequest>,
) -> Result<(Connection, AuthResponse), ClientError> {
    let timeout = Duration::from_millis(config.connect_timeout_ms);
    let attempt = async {
        let mut connection = connector.connect(url).await?;
        match connection.authenticate(seq, &config.token, resume).await {
            Ok(auth) => Ok((connection, auth)),
            Err(e) => {
                connection
                    .close(CLOSE_NORMAL, "authentication failed")
                    .await;
                Err(e)
            }
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(ClientError::Timeout {
            what: format!("connect and authenticate at {url}"),
            timeout_ms: config.connect_timeout_ms,
        }),
    }
}

/// Why serving one connection ended.
enum End {
    /// The application closed the client (or dropped it).
    Cancelled,
    /// The transport was lost or the server closed it.
    Lost { code: Option<u16>, reason: String },
}

/// Why the client stops for good.
struct Stop {
    code: Option<u16>,
    reason: String,
}

/// The driver task's state.
pub(super) struct Driver {
    config: ClientConfig,
    connector: Connector,
    connection: Connection,
    url_index: usize,
    shared: Arc<Shared>,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<ClientEvent>,
    cancel: CancellationToken,
    /// Requests sent on the current connection, by sequence number. Bounded by
    /// `config.pending_requests_max`.
    pending: BTreeMap<u64, (&'static str, Option<String>, Reply)>,
    /// The rooms the session is in, each with the latest comment id seen (from join
    /// answers and comment notifications): sent on resume so that any node can take the
    /// session over. Bounded by the server's rooms-per-session limit (it answers joins).
    rooms: BTreeMap<String, u64>,
    next_seq: u64,
    last_seq: u64,
    session_id: String,
    ping_interval_ms: u64,
    rng: SmallRng,
    /// Voice frames to send (encoded uplink frames), from [`super::Client::send_audio`].
    audio_out: Option<mpsc::Receiver<Bytes>>,
    /// Where received voice frames go (bounded; a full queue drops the newest).
    audio_in: Option<mpsc::Sender<AudioFrame>>,
}

/// The next voice frame to send; pending forever without a queue.
async fn recv_audio(out: &mut Option<mpsc::Receiver<Bytes>>) -> Option<Bytes> {
    match out {
        Some(out) => out.recv().await,
        None => std::future::pending().await,
    }
}

impl Driver {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        config: ClientConfig,
        connector: Connector,
        connection: Connection,
        url_index: usize,
        shared: Arc<Shared>,
        commands: mpsc::Receiver<Command>,
        events: mpsc::Sender<ClientEvent>,
        cancel: CancellationToken,
    ) -> Self {
        let (session_id, last_seq) = (
            shared
                .session_id
                .lock()
                .map(|s| s.clone())
                .unwrap_or_default(),
            shared.last_seq.load(Ordering::Acquire),
        );
        Driver {
            config,
            connector,
            connection,
            url_index,
            shared,
            commands,
            events,
            cancel,
            pending: BTreeMap::new(),
            rooms: BTreeMap::new(),
            // The first `auth` used 1.
            next_seq: 2,
            last_seq,
            session_id,
            ping_interval_ms: 0,
            rng: SmallRng::from_os_rng(),
            audio_out: None,
            audio_in: None,
        }
    }

    /// Voice frames to send come from `out`; received ones go to `into`.
    pub(super) fn with_audio(
        mut self,
        out: mpsc::Receiver<Bytes>,
        into: mpsc::Sender<AudioFrame>,
    ) -> Self {
        self.audio_out = Some(out);
        self.audio_in = Some(into);
        self
    }

    /// Runs until the client is closed or gives up.
    pub(super) async fn run(mut self) {
        loop {
            let end = self.serve().await;
            self.fail_pending("connection lost");
            match end {
                End::Cancelled => {
                    self.connection.close(CLOSE_NORMAL, "client closed").await;
                    return;
                }
                End::Lost { code, reason } => {
                    tracing::debug!(?code, %reason, "connection lost");
                    let final_close = code.is_some_and(is_final_close_code);
                    if !self
                        .emit(ClientEvent::Disconnected {
                            code,
                            reason: reason.clone(),
                        })
                        .await
                    {
                        return;
                    }
                    let stop = if final_close {
                        Stop { code, reason }
                    } else if !self.config.reconnect.enabled {
                        Stop {
                            code,
                            reason: format!("{reason} (reconnect disabled)"),
                        }
                    } else {
                        match self.reconnect().await {
                            Ok(outcome) => {
                                if self.emit(ClientEvent::Reconnected { outcome }).await {
                                    continue;
                                }
                                return;
                            }
                            Err(None) => return,
                            Err(Some(stop)) => stop,
                        }
                    };
                    self.fail_queued(&stop.reason);
                    let _ = self
                        .emit(ClientEvent::Closed {
                            code: stop.code,
                            reason: stop.reason,
                        })
                        .await;
                    return;
                }
            }
        }
    }

    /// Serves the current connection until it ends.
    async fn serve(&mut self) -> End {
        let silence_limit = self.silence_limit();
        let mut last_frame_at = Instant::now();
        // One timer per connection, moved on only when it fires: frames do not touch it.
        let silence =
            tokio::time::sleep(silence_limit.unwrap_or(Duration::from_secs(365 * 86_400)));
        tokio::pin!(silence);
        // One wait for cancellation for the whole connection, not one per frame.
        let cancelled = self.cancel.clone().cancelled_owned();
        tokio::pin!(cancelled);
        loop {
            // Unbiased: a busy stream of notifications must not starve requests.
            tokio::select! {
                _ = &mut cancelled => return End::Cancelled,
                received = self.connection.recv_any() => {
                    last_frame_at = Instant::now();
                    match received {
                        Ok(Received::Frame(frame)) => {
                            if let Some(end) = self.on_frame(frame).await {
                                return end;
                            }
                        }
                        Ok(Received::Audio(bytes)) => self.on_audio(&bytes),
                        Err(ClientError::Protocol(e)) => {
                            tracing::warn!(error = %e, "undecodable frame from the server");
                            if self.connection.close_status().is_some() {
                                return End::Lost { code: None, reason: e.to_string() };
                            }
                        }
                        Err(ClientError::Closed { code, reason }) => return End::Lost { code, reason },
                        Err(other) => return End::Lost { code: None, reason: other.to_string() },
                    }
                }
                command = self.commands.recv() => match command {
                    Some(command) => {
                        if let Some(end) = self.send_command(command).await {
                            return end;
                        }
                    }
                    // Every handle is gone: nobody can observe anything any more.
                    None => return End::Cancelled,
                },
                Some(frame) = recv_audio(&mut self.audio_out) => {
                    match self.connection.send_audio(frame).await {
                        Ok(()) => {}
                        Err(ClientError::Closed { code, reason }) => return End::Lost { code, reason },
                        Err(error) => tracing::debug!(%error, "voice frame not sent"),
                    }
                }
                _ = &mut silence, if silence_limit.is_some() => {
                    let limit = silence_limit.unwrap_or_default();
                    let deadline = last_frame_at + limit;
                    if Instant::now() < deadline {
                        silence.as_mut().reset(deadline);
                        continue;
                    }
                    self.connection.close(CLOSE_NORMAL, "server silent").await;
                    return End::Lost {
                        code: None,
                        reason: format!("no frame from the server for {} ms", limit.as_millis()),
                    };
                }
            }
        }
    }

    /// A voice frame from the server: decoded and handed to the application (dropped if
    /// its queue is full or it is malformed).
    fn on_audio(&mut self, bytes: &Bytes) {
        let Some(audio_in) = &self.audio_in else {
            return;
        };
        match chorus_protocol::audio::decode_frame(bytes) {
            Ok(frame) => {
                let _ = audio_in.try_send(frame);
            }
            Err(error) => tracing::debug!(%error, "undecodable voice frame from the server"),
        }
    }

    /// How long the server may stay silent (it pings every interval), if it pings at all.
    fn silence_limit(&self) -> Option<Duration> {
        if self.ping_interval_ms == 0 {
            return None;
        }
        let silence_ms = self
            .ping_interval_ms
            .saturating_mul(SILENCE_HALF_PING_INTERVALS)
            / 2;
        Some(Duration::from_millis(silence_ms))
    }

    /// Handles one frame; returns `Some` if the connection must end.
    async fn on_frame(&mut self, frame: Frame) -> Option<End> {
        match frame {
            Frame::Notification(notification) => {
                let event = self.on_notification(notification)?;
                if !self.emit(event).await {
                    return Some(End::Cancelled);
                }
                None
            }
            Frame::Response(response) => {
                match self.pending.remove(&response.seq) {
                    Some((kind, room_left, reply)) => {
                        if let Ok(body) = &response.result {
                            self.track_rooms(kind, room_left, body);
                        }
                        let _ = reply.send(response.result.map_err(ClientError::Server));
                    }
                    None => match response.result {
                        Err(error) => {
                            if !self
                                .emit(ClientEvent::ServerError {
                                    seq: response.seq,
                                    error,
                                })
                                .await
                            {
                                return Some(End::Cancelled);
                            }
                        }
                        // The caller gave up (timeout) before the answer came.
                        Ok(_) => tracing::debug!(seq = response.seq, "late response dropped"),
                    },
                }
                None
            }
            Frame::Request(request) => self.on_server_request(request).await,
        }
    }

    /// Keeps the room list in step with a successful answer to a `kind` request.
    fn track_rooms(&mut self, kind: &str, room_left: Option<String>, body: &chorus_protocol::Body) {
        if kind == <chorus_protocol::RoomJoinRequest as chorus_protocol::RequestKind>::KIND {
            if let Ok(joined) = body.decode::<chorus_protocol::RoomJoinResponse>(kind) {
                let latest = self.rooms.entry(joined.room.room_id).or_default();
                *latest = (*latest).max(joined.room.comment_count);
            }
        } else if let Some(room) = room_left {
            self.rooms.remove(&room);
        }
    }

    /// Deduplicates and decodes a notification.
    fn on_notification(&mut self, notification: NotificationFrame) -> Option<ClientEvent> {
        if notification.seq <= self.last_seq {
            tracing::debug!(
                seq = notification.seq,
                last_seq = self.last_seq,
                "duplicate notification dropped"
            );
            return None;
        }
        if notification.seq != self.last_seq + 1 {
            tracing::warn!(
                seq = notification.seq,
                last_seq = self.last_seq,
                "gap in notification sequence"
            );
        }
        self.last_seq = notification.seq;
        self.shared
            .last_seq
            .store(notification.seq, Ordering::Release);
        let body = notification.body;
        Some(match Event::decode(&notification.kind, &body) {
            Ok(event) => {
                match &event {
                    Event::Comment(comment) => {
                        if let Some(latest) = self.rooms.get_mut(&comment.room_id) {
                            *latest = (*latest).max(comment.comment_id);
                        }
                    }
                    Event::RoomEnded(ended) => {
                        self.rooms.remove(&ended.room_id);
                    }
                    _ => {}
                }
                ClientEvent::Notification {
                    seq: notification.seq,
                    event,
                }
            }
            Err(e) => {
                if !matches!(e, ProtocolError::UnknownKind(_)) {
                    tracing::warn!(error = %e, "notification body does not match its kind");
                }
                ClientEvent::RawNotification {
                    seq: notification.seq,
                    body: body.to_json(),
                    kind: notification.kind,
                }
            }
        })
    }

    /// Answers a request from the server (`ping`; anything else is refused).
    async fn on_server_request(&mut self, request: RequestFrame) -> Option<End> {
        let result = if request.kind == "ping" {
            if !self.config.answer_pings {
                return None;
            }
            let pong = PingResponse {
                time_ms: unix_now_ms(),
            };
            self.connection.send_response_ok(request.seq, &pong).await
        } else {
            let error = ErrorBody::new(
                ErrorCode::UnknownKind,
                format!("the client does not serve {:?}", request.kind),
            );
            self.connection
                .send_response_error(request.seq, &error)
                .await
        };
        match result {
            Ok(()) => None,
            Err(e) => Some(End::Lost {
                code: None,
                reason: e.to_string(),
            }),
        }
    }

    /// Sends a request from a handle; returns `Some` if the connection broke.
    async fn send_command(&mut self, command: Command) -> Option<End> {
        if command.reply.is_closed() {
            // The caller timed out while the request was queued: do not send it.
            return None;
        }
        if self.pending.len() >= self.config.pending_requests_max {
            // Callers that gave up leave entries behind; drop those first.
            self.pending.retain(|_, (_, _, reply)| !reply.is_closed());
            if self.pending.len() >= self.config.pending_requests_max {
                let _ = command.reply.send(Err(ClientError::TooManyPending {
                    limit: self.config.pending_requests_max,
                }));
                return None;
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let frame = match (command.encode)(self.connection.encoding(), seq) {
            Ok(frame) => frame,
            Err(e) => {
                let _ = command.reply.send(Err(ClientError::Protocol(e)));
                return None;
            }
        };
        match self.connection.send_frame(&frame).await {
            Ok(()) => {
                self.pending
                    .insert(seq, (command.kind, command.room_left, command.reply));
                None
            }
            Err(e) => {
                let reason = e.to_string();
                let _ = command.reply.send(Err(ClientError::ConnectionLost {
                    kind: command.kind.to_string(),
                    reason: reason.clone(),
                }));
                Some(End::Lost { code: None, reason })
            }
        }
    }

    /// Fails every request in flight on the lost connection.
    fn fail_pending(&mut self, reason: &str) {
        for (_, (kind, _, reply)) in std::mem::take(&mut self.pending) {
            let _ = reply.send(Err(ClientError::ConnectionLost {
                kind: kind.to_string(),
                reason: reason.to_string(),
            }));
        }
    }

    /// Fails every request queued but not sent.
    fn fail_queued(&mut self, reason: &str) {
        while let Ok(command) = self.commands.try_recv() {
            let _ = command.reply.send(Err(ClientError::ConnectionLost {
                kind: command.kind.to_string(),
                reason: reason.to_string(),
            }));
        }
    }

    /// Queues an event for the application; waits while the queue is full (the server then
    /// sees a slow consumer). False if the client was closed meanwhile.
    async fn emit(&mut self, event: ClientEvent) -> bool {
        // Room in the queue (the usual case): no need to wait.
        let event = match self.events.try_send(event) {
            Ok(()) => return true,
            Err(mpsc::error::TrySendError::Closed(_)) => return false,
            Err(mpsc::error::TrySendError::Full(event)) => event,
        };
        if self.cancel.is_cancelled() {
            return false;
        }
        tokio::select! {
            biased;
            _ = self.cancel.cancelled() => false,
            sent = self.events.send(event) => sent.is_ok(),
        }
    }

    /// Reconnects with backoff and resumes. `Err(None)`: cancelled; `Err(Some)`: give up.
    async fn reconnect(&mut self) -> Result<ResumeOutcome, Option<Stop>> {
        let policy = self.config.reconnect;
        let mut last_error = String::new();
        for attempt in 0..policy.attempts_max {
            let delay = backoff_delay_ms(attempt, &policy, &mut self.rng);
            self.wait_failing_requests(Duration::from_millis(delay))
                .await?;
            self.url_index = (self.url_index + 1) % self.config.urls.len().max(1);
            let Some(url) = self.config.urls.get(self.url_index).cloned() else {
                return Err(Some(Stop {
                    code: None,
                    reason: "no server URL".into(),
                }));
            };
            let resume = ResumeRequest {
                session_id: self.session_id.clone(),
                last_seq: self.last_seq,
                rooms: Some(self.rooms.clone()),
            };
            let seq = self.next_seq;
            self.next_seq += 1;
            let attempt_result = tokio::select! {
                biased;
                _ = self.cancel.cancelled() => return Err(None),
                result = open_session(&self.connector, &url, &self.config, seq, Some(resume)) => result,
            };
            match attempt_result {
                Ok((connection, auth)) => {
                    self.install(connection, &auth);
                    tracing::debug!(%url, outcome = ?auth.resume, "reconnected");
                    return Ok(auth.resume);
                }
                Err(ClientError::Auth(body)) if is_final_auth_error(&body) => {
                    return Err(Some(Stop {
                        code: Some(
                            body.error_code()
                                .map(ErrorCode::close_code)
                                .unwrap_or(body.code),
                        ),
                        reason: format!("authentication refused on reconnect: {body}"),
                    }));
                }
                Err(e) => {
                    tracing::debug!(%url, attempt, error = %e, "reconnect attempt failed");
                    last_error = e.to_string();
                }
            }
        }
        Err(Some(Stop {
            code: None,
            reason: format!(
                "gave up after {} reconnect attempts; last error: {last_error}",
                policy.attempts_max
            ),
        }))
    }

    /// Takes over a freshly authenticated connection.
    fn install(&mut self, connection: Connection, auth: &AuthResponse) {
        self.connection = connection;
        self.ping_interval_ms = auth.ping_interval_ms;
        if auth.resume != ResumeOutcome::Resumed {
            // A new session is in no room and numbers its notifications from scratch.
            self.rooms.clear();
            self.last_seq = auth.notification_seq;
            self.shared
                .last_seq
                .store(auth.notification_seq, Ordering::Release);
        }
        self.session_id = auth.session_id.clone();
        if let Ok(mut session_id) = self.shared.session_id.lock() {
            *session_id = auth.session_id.clone();
        }
    }

    /// Sleeps `delay`, failing requests that arrive meanwhile (there is no connection to
    /// send them on). `Err(None)` if cancelled.
    async fn wait_failing_requests(&mut self, delay: Duration) -> Result<(), Option<Stop>> {
        let deadline = Instant::now() + delay;
        loop {
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => return Err(None),
                _ = tokio::time::sleep_until(deadline) => return Ok(()),
                command = self.commands.recv() => match command {
                    Some(command) => {
                        let _ = command.reply.send(Err(ClientError::ConnectionLost {
                            kind: command.kind.to_string(),
                            reason: "reconnecting".into(),
                        }));
                    }
                    None => return Err(None),
                },
            }
        }
    }

    /// Records the ping interval of the first session (the client learned it in `connect`).
    pub(super) fn with_ping_interval(mut self, ping_interval_ms: u64) -> Self {
        self.ping_interval_ms = ping_interval_ms;
        self
    }
}

/// Milliseconds since the Unix epoch.
pub(crate) fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
