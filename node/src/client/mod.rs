//! The Rust client library: connect to a node over WebSocket or QUIC, authenticate, send
//! requests, receive events, and survive connection loss.
//!
//! Start with [`Client`]: [`Client::connect`] opens a connection and authenticates,
//! [`Client::request`] sends a typed request and waits for its response,
//! [`Client::next_event`] yields server notifications and connection lifecycle events.
//! A background task (`driver`) owns the connection: it answers server pings, matches
//! responses to requests, drops duplicate notifications, and on transport loss reconnects
//! with jittered exponential backoff ([`backoff_delay_ms`]) and resumes the session
//! (SPEC P5).
//!
//! [`Connection`] is the layer below: one transport connection, frames in and out, no
//! automation. Tests use it to misbehave on purpose.
//!
//! Not here: the server side of the transports, and anything room-specific beyond the
//! typed bodies of `chorus-protocol`.
//!
//! **Boundary:** every queue is bounded. Events wait in a channel of
//! [`ClientConfig::events_queue_max`]; when the application does not read them, the
//! driver stops reading from the socket, the server's outgoing queue for this connection
//! fills, and the server closes it as a slow consumer. That is intended: a client that
//! does not keep up must not make the server buffer without bound.

mod backoff;
pub mod cli;
pub mod connection;
mod driver;
mod error;
pub mod ogg_opus;
pub mod quiz;
pub mod voicemail_cli;

#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
pub use chorus_protocol::audio::{AudioFrame, AudioHeader};
use chorus_protocol::{
    Body, Encoding, ErrorBody, Event, ProtocolError, RequestKind, ResumeOutcome, SessionId, UserId,
};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

pub use backoff::{backoff_cap_ms, backoff_delay_ms};
pub use connection::{
    client_endpoint, quic_client_config, udp_socket, Connection, Connector, RawMessage, Received,
    ServerUrl, TransportKind, BACKLOG_FRAMES_MAX, QUIC_PORT_DEFAULT, TRANSPORT_MESSAGE_BYTES_MAX,
};
pub use error::{is_final_close_code, ClientError};

/// Requests waiting for the driver to pick them up. Callers beyond this wait (bounded by
/// their request timeout).
const COMMANDS_QUEUE_MAX: usize = 64;
/// Voice frames waiting to be sent; more are dropped (late audio is useless).
const AUDIO_OUT_QUEUE_MAX: usize = 64;
/// Received voice frames waiting for the application; more are dropped.
const AUDIO_IN_QUEUE_MAX: usize = 256;

/// How long [`Client::close`] waits for the driver to finish the close handshake.
const CLOSE_WAIT_MS: u64 = 2000;

/// When and how to reconnect after the transport is lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReconnectPolicy {
    /// Reconnect at all. Default true. When false, transport loss ends the client
    /// ([`ClientEvent::Closed`]).
    pub enabled: bool,
    /// Upper bound of the first retry delay, in milliseconds. Default 100. The n-th retry
    /// waits a uniform random time in `0 ..= min(max_backoff_ms, initial_backoff_ms × 2^n)`.
    pub initial_backoff_ms: u64,
    /// Largest retry delay, in milliseconds. Default 5000.
    pub max_backoff_ms: u64,
    /// Consecutive failed attempts before the client gives up ([`ClientEvent::Closed`]).
    /// Default 20 (about a minute with the defaults: roughly the server's resume window).
    pub attempts_max: u32,
}

impl Default for ReconnectPolicy {
    fn default() -> Self {
        ReconnectPolicy {
            enabled: true,
            initial_backoff_ms: 100,
            max_backoff_ms: 5000,
            attempts_max: 20,
        }
    }
}

impl ReconnectPolicy {
    /// A policy that never reconnects.
    pub fn disabled() -> Self {
        ReconnectPolicy {
            enabled: false,
            ..ReconnectPolicy::default()
        }
    }
}

/// Everything a [`Client`] needs. Build with [`ClientConfig::new`] and adjust fields.
#[derive(Clone)]
pub struct ClientConfig {
    /// Server URLs, `ws://HOST:PORT/ws` or `quic://HOST:PORT`. The first is used to
    /// connect; reconnects try them in turn, starting after the one that was lost. Any
    /// node of a cluster will do.
    pub urls: Vec<String>,
    /// The JWT sent in `auth`. Never logged.
    pub token: String,
    /// PEM file with the CA certificate(s) a QUIC client trusts (a node writes its CA to
    /// `<data-dir>/ca.pem`). Required if a URL is `quic://`; unused for `ws://`.
    pub ca_path: Option<PathBuf>,
    /// Encoding on WebSocket: MessagePack on binary messages (default) or JSON on text
    /// messages. QUIC always uses MessagePack.
    pub encoding: Encoding,
    /// How long [`Client::request`] waits for a response, in milliseconds. Default 10,000.
    pub request_timeout_ms: u64,
    /// How long opening a transport connection plus `auth` may take, in milliseconds.
    /// Default 5,000.
    pub connect_timeout_ms: u64,
    /// Reconnect behaviour.
    pub reconnect: ReconnectPolicy,
    /// Answer server `ping` requests. Default true. Tests turn this off to play a silent
    /// client, which the server closes after two missed pings.
    pub answer_pings: bool,
    /// Events buffered for the application, in events. Default 1024. When full, the
    /// client stops reading from the server (see the module documentation).
    pub events_queue_max: usize,
    /// Requests sent and not yet answered, in requests. Default 256. Beyond it a request
    /// fails at once with [`ClientError::TooManyPending`].
    pub pending_requests_max: usize,
    /// QUIC idle timeout, in milliseconds (keep-alives are sent at a quarter of it).
    /// Default 15,000: a vanished server is noticed within this time. The server's own
    /// setting may shorten it (the smaller one applies).
    pub quic_idle_timeout_ms: u64,
    /// A QUIC endpoint (one UDP socket) to share between many clients, e.g. in the load
    /// generator. `None` (default): each connection binds its own.
    pub quic_endpoint: Option<quinn::Endpoint>,
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("urls", &self.urls)
            .field("token", &"<redacted>")
            .field("ca_path", &self.ca_path)
            .field("encoding", &self.encoding)
            .field("request_timeout_ms", &self.request_timeout_ms)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("reconnect", &self.reconnect)
            .field("answer_pings", &self.answer_pings)
            .field("events_queue_max", &self.events_queue_max)
            .field("pending_requests_max", &self.pending_requests_max)
            .field("quic_idle_timeout_ms", &self.quic_idle_timeout_ms)
            .finish_non_exhaustive()
    }
}

impl ClientConfig {
    /// A configuration for one URL and token, with the defaults documented on each field.
    pub fn new(url: impl Into<String>, token: impl Into<String>) -> Self {
        ClientConfig {
            urls: vec![url.into()],
            token: token.into(),
            ca_path: None,
            encoding: Encoding::MsgPack,
            request_timeout_ms: 10_000,
            connect_timeout_ms: 5_000,
            reconnect: ReconnectPolicy::default(),
            answer_pings: true,
            events_queue_max: 1024,
            pending_requests_max: 256,
            quic_idle_timeout_ms: 15_000,
            quic_endpoint: None,
        }
    }
}

/// What the application receives from [`Client::next_event`].
#[derive(Debug, Clone, PartialEq)]
pub enum ClientEvent {
    /// A server notification of a known kind, each sequence number at most once.
    Notification {
        /// The session's notification sequence number.
        seq: u64,
        /// The decoded event.
        event: Event,
    },
    /// A notification this client version cannot decode (unknown kind, or a body that does
    /// not match its kind). Not an error: newer servers may send new kinds.
    RawNotification {
        /// The session's notification sequence number.
        seq: u64,
        /// The kind string.
        kind: String,
        /// The body as JSON.
        body: serde_json::Value,
    },
    /// An error response that answers no waiting request (e.g. sequence number 0: the
    /// server could not read one of our frames).
    ServerError {
        /// The sequence number the server echoed.
        seq: u64,
        /// The error.
        error: ErrorBody,
    },
    /// The transport was lost (the client reconnects unless this is followed by `Closed`).
    Disconnected {
        /// The server's close code, if it sent one.
        code: Option<u16>,
        /// The close reason or transport error.
        reason: String,
    },
    /// The client reconnected. `Resumed`: every missed notification follows, in order, none
    /// twice. `Resync`: the server started a new session (not in any room): re-join rooms
    /// and refetch state.
    Reconnected {
        /// What the server did with the resume request.
        outcome: ResumeOutcome,
    },
    /// The client gave up (final close, reconnect disabled or exhausted). No events follow.
    Closed {
        /// The last close code seen, if any.
        code: Option<u16>,
        /// Why.
        reason: String,
    },
}

impl ClientEvent {
    /// The event as one JSON object: `{"seq":…,"kind":…,"body":{…}}` for notifications
    /// (what `chorus client` prints); lifecycle events use kinds `client.disconnected`,
    /// `client.reconnected`, `client.closed` and `client.server_error` without `seq`.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::json;
        match self {
            ClientEvent::Notification { seq, event } => {
                json!({"seq": seq, "kind": event.kind(), "body": event.body_json()})
            }
            ClientEvent::RawNotification { seq, kind, body } => {
                json!({"seq": seq, "kind": kind, "body": body})
            }
            ClientEvent::ServerError { seq, error } => {
                json!({"kind": "client.server_error", "body": {"seq": seq, "code": error.code, "message": error.message}})
            }
            ClientEvent::Disconnected { code, reason } => {
                json!({"kind": "client.disconnected", "body": {"code": code, "reason": reason}})
            }
            ClientEvent::Reconnected { outcome } => {
                json!({"kind": "client.reconnected", "body": {"outcome": outcome}})
            }
            ClientEvent::Closed { code, reason } => {
                json!({"kind": "client.closed", "body": {"code": code, "reason": reason}})
            }
        }
    }
}

/// Encodes a request frame once the driver has assigned its sequence number.
type EncodeRequest = Box<dyn FnOnce(Encoding, u64) -> Result<Bytes, ProtocolError> + Send>;

/// Where the driver delivers a request's outcome.
type Reply = oneshot::Sender<Result<Body, ClientError>>;

/// A request on its way to the driver.
struct Command {
    kind: &'static str,
    /// For `room.leave`: the room (the driver keeps the list of rooms the client is in).
    room_left: Option<String>,
    encode: EncodeRequest,
    reply: Reply,
}

/// The room a `room.leave` body names.
fn room_left<R: RequestKind>(body: &R) -> Option<String> {
    if R::KIND != chorus_protocol::RoomLeaveRequest::KIND {
        return None;
    }
    serde_json::to_value(body)
        .ok()?
        .get("room_id")?
        .as_str()
        .map(str::to_string)
}

/// State the driver updates and the handles read.
#[derive(Debug)]
struct Shared {
    session_id: Mutex<SessionId>,
    last_seq: AtomicU64,
}

/// Sends requests on a [`Client`]'s connection. Cheap to clone; usable from other tasks
/// while the client's owner reads events.
#[derive(Debug, Clone)]
pub struct Requester {
    commands: mpsc::Sender<Command>,
    request_timeout: Duration,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Command").field("kind", &self.kind).finish()
    }
}

impl Requester {
    /// Sends a request and waits for its response, at most `request_timeout_ms`.
    ///
    /// Sequence numbers are assigned in send order by the driver. An error response gives
    /// [`ClientError::Server`]; a connection lost while the request is in flight gives
    /// [`ClientError::ConnectionLost`] (requests are not retried on the new connection:
    /// the server may have executed them).
    pub async fn request<R>(&self, body: R) -> Result<R::Response, ClientError>
    where
        R: RequestKind + Send + 'static,
    {
        let timeout_ms = self.request_timeout.as_millis() as u64;
        let deadline = tokio::time::Instant::now() + self.request_timeout;
        let timeout = || ClientError::Timeout {
            what: R::KIND.to_string(),
            timeout_ms,
        };
        let (reply, response) = oneshot::channel();
        let command = Command {
            kind: R::KIND,
            room_left: room_left(&body),
            encode: Box::new(move |encoding, seq| {
                chorus_protocol::encode_request(encoding, seq, R::KIND, &body)
            }),
            reply,
        };
        match tokio::time::timeout_at(deadline, self.commands.send(command)).await {
            Err(_) => return Err(timeout()),
            Ok(Err(_)) => return Err(closed_error()),
            Ok(Ok(())) => {}
        }
        match tokio::time::timeout_at(deadline, response).await {
            Err(_) => Err(timeout()),
            Ok(Err(_)) => Err(closed_error()),
            Ok(Ok(result)) => result?
                .decode::<R::Response>(R::KIND)
                .map_err(ClientError::Protocol),
        }
    }
}

fn closed_error() -> ClientError {
    ClientError::Closed {
        code: None,
        reason: "the client is closed".into(),
    }
}

/// A connected, authenticated client. See the module documentation.
///
/// Dropping it closes the connection in the background.
#[derive(Debug)]
pub struct Client {
    requester: Requester,
    events: mpsc::Receiver<ClientEvent>,
    shared: Arc<Shared>,
    user_id: UserId,
    auth: chorus_protocol::AuthResponse,
    cancel: CancellationToken,
    driver: Option<tokio::task::JoinHandle<()>>,
    audio_out: mpsc::Sender<Bytes>,
    audio_in: Option<mpsc::Receiver<AudioFrame>>,
}

impl Client {
    /// Connects to the first URL that accepts (trying each once, in order) and
    /// authenticates. An auth refusal is returned at once ([`ClientError::Auth`]).
    pub async fn connect(config: ClientConfig) -> Result<Client, ClientError> {
        let connector = Connector::new(&config)?;
        let mut last_error = None;
        for (index, url) in config.urls.iter().enumerate() {
            match driver::open_session(&connector, url, &config, 1, None).await {
                Ok((connection, auth)) => {
                    return Ok(Self::start(config, connector, connection, auth, index));
                }
                Err(e @ ClientError::Auth(_)) => return Err(e),
                Err(e) => {
                    tracing::debug!(url = %url, error = %e, "connect failed");
                    last_error = Some(e);
                }
            }
        }
        Err(last_error.unwrap_or_else(|| ClientError::Config("no server URL given".into())))
    }

    fn start(
        config: ClientConfig,
        connector: Connector,
        connection: Connection,
        auth: chorus_protocol::AuthResponse,
        url_index: usize,
    ) -> Client {
        let (commands_tx, commands_rx) = mpsc::channel(COMMANDS_QUEUE_MAX);
        let (audio_out_tx, audio_out_rx) = mpsc::channel(AUDIO_OUT_QUEUE_MAX);
        let (audio_in_tx, audio_in_rx) = mpsc::channel(AUDIO_IN_QUEUE_MAX);
        let (events_tx, events_rx) = mpsc::channel(config.events_queue_max.max(1));
        let shared = Arc::new(Shared {
            session_id: Mutex::new(auth.session_id.clone()),
            last_seq: AtomicU64::new(auth.notification_seq),
        });
        let cancel = CancellationToken::new();
        let request_timeout = Duration::from_millis(config.request_timeout_ms);
        let driver = driver::Driver::new(
            config,
            connector,
            connection,
            url_index,
            shared.clone(),
            commands_rx,
            events_tx,
            cancel.clone(),
        )
        .with_ping_interval(auth.ping_interval_ms)
        .with_audio(audio_out_rx, audio_in_tx);
        let handle = tokio::spawn(driver.run());
        Client {
            requester: Requester {
                commands: commands_tx,
                request_timeout,
            },
            events: events_rx,
            shared,
            user_id: auth.user_id.clone(),
            auth,
            cancel,
            driver: Some(handle),
            audio_out: audio_out_tx,
            audio_in: Some(audio_in_rx),
        }
    }

    /// Sends one voice frame (R11) for `room_id`, which the session must have joined with
    /// the user on stage and not muted, else the server drops it. Never waits: `Ok(false)`
    /// means the send queue was full and the frame was dropped. Frames are not resent
    /// after a reconnect.
    ///
    /// # Errors
    ///
    /// [`ClientError::Protocol`] for a frame that cannot be encoded (empty or oversized
    /// packet, level above 127, room id over 255 bytes).
    pub fn send_audio(
        &self,
        room_id: &str,
        header: AudioHeader,
        payload: &[u8],
    ) -> Result<bool, ClientError> {
        let frame = chorus_protocol::audio::encode_uplink(room_id, header, payload)?;
        Ok(self.audio_out.try_send(frame).is_ok())
    }

    /// The stream of voice frames received, in arrival order (bounded: when the
    /// application does not keep up, new frames are dropped). Returns it once; `None`
    /// after.
    pub fn take_audio(&mut self) -> Option<mpsc::Receiver<AudioFrame>> {
        self.audio_in.take()
    }

    /// Sends a request and waits for its response; see [`Requester::request`].
    pub async fn request<R>(&self, body: R) -> Result<R::Response, ClientError>
    where
        R: RequestKind + Send + 'static,
    {
        self.requester.request(body).await
    }

    /// A handle to send requests from another task.
    pub fn requester(&self) -> Requester {
        self.requester.clone()
    }

    /// The next event; `None` once the client is closed and every buffered event has been
    /// returned. Cancel safe.
    pub async fn next_event(&mut self) -> Option<ClientEvent> {
        self.events.recv().await
    }

    /// The next event if one is buffered, without waiting.
    pub fn try_next_event(&mut self) -> Option<ClientEvent> {
        self.events.try_recv().ok()
    }

    /// The current session id (it changes when a reconnect ends in `Resync`).
    pub fn session_id(&self) -> SessionId {
        self.shared
            .session_id
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// The highest notification sequence number received (and queued for the
    /// application) in the current session.
    pub fn last_seq(&self) -> u64 {
        self.shared.last_seq.load(Ordering::Acquire)
    }

    /// The authenticated user.
    pub fn user_id(&self) -> &str {
        &self.user_id
    }

    /// The server's response to the first `auth` (node, ping interval, resume window).
    pub fn auth_response(&self) -> &chorus_protocol::AuthResponse {
        &self.auth
    }

    /// Closes the connection (close code 1000) and waits, bounded, for the driver to end.
    /// Events already buffered can still be read; then [`Client::next_event`] gives `None`.
    pub async fn close(&mut self) {
        self.cancel.cancel();
        if let Some(handle) = self.driver.take() {
            let _ = tokio::time::timeout(Duration::from_millis(CLOSE_WAIT_MS), handle).await;
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}
