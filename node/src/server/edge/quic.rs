//! QUIC transport (quinn): one bidirectional stream per connection carrying 4-byte
//! big-endian length-prefixed MessagePack frames. Voice frames travel as datagrams.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use quinn::{RecvStream, SendStream, VarInt};
use tokio_util::codec::{FramedRead, LengthDelimitedCodec};

use chorus_protocol::{Encoding, ErrorCode};

use tokio_util::task::TaskTracker;

use crate::server::edge::budget::{BudgetExceeded, BudgetedRead, ReadBudget};
use crate::server::edge::connection::{Inbound, TransportReader, TransportWriter};
use crate::server::edge::service::Edge;
use crate::server::sessions::session::send_voice_datagram;

/// QUIC idle timeout: a peer silent for this long is gone.
pub const IDLE_TIMEOUT_MS: u32 = 30_000;
/// Keep-alive interval, well under the idle timeout.
pub const KEEP_ALIVE_MS: u64 = 10_000;
/// The QUIC application close code with which a client ends its session (like WebSocket's
/// 1000 normal closure).
pub const GOODBYE_CLOSE_CODE: u16 = 1000;
/// Bytes of voice datagrams buffered per client connection, each way (about 100 frames).
pub const VOICE_DATAGRAM_BUFFER_BYTES: usize = 16 * 1024;
/// Connection flow-control window before `auth`: the most stream data a client can make
/// the node buffer (in order or not) until it has authenticated.
pub const PREAUTH_RECEIVE_WINDOW_BYTES: u32 = 16 * 1024;
/// Bytes a client connection's streams may hold in quinn, sent but not acknowledged or
/// not sent yet (quinn's default is 10 MB). Past it, what the connection has to send waits
/// in the node's own queue, where a backlog counts (a connection behind, a slow consumer)
/// like a WebSocket's unsent bytes (`socket_unsent_bytes_max`): under overload comments
/// are refused at once instead of waiting in quinn. 64 KiB a round trip is 640 KB/s at
/// 100 ms, far above a room's comments.
pub const SEND_WINDOW_BYTES: u64 = 64 * 1024;
/// Time to wait for the peer to acknowledge the last frames before closing.
const CLOSE_LINGER_MS: u64 = 1_000;

/// Builds the transport config shared by client-facing endpoints.
pub fn transport_config() -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(VarInt::from_u32(IDLE_TIMEOUT_MS).into()));
    transport.keep_alive_interval(Some(Duration::from_millis(KEEP_ALIVE_MS)));
    // One control stream per client; a second is refused by flow control.
    transport.max_concurrent_bidi_streams(VarInt::from_u32(1));
    transport.max_concurrent_uni_streams(VarInt::from_u32(0));
    // Before `auth` the connection's window is small (see `budget`); it opens after.
    transport.receive_window(VarInt::from_u32(PREAUTH_RECEIVE_WINDOW_BYTES));
    transport.send_window(SEND_WINDOW_BYTES);
    // Voice datagrams: bounded each way, the oldest dropped first, so a listener that
    // falls behind loses old audio instead of hearing it late. Together with the
    // connection's voice queue this bounds the added latency.
    transport.datagram_receive_buffer_size(Some(VOICE_DATAGRAM_BUFFER_BYTES));
    transport.datagram_send_buffer_size(VOICE_DATAGRAM_BUFFER_BYTES);
    // One datagram per transmit: with segmentation offload a connection keeps a transmit
    // buffer for a batch of datagrams (about 15 KB) for its whole life, and a client
    // connection mostly sends a frame at a time.
    transport.enable_segmentation_offload(false);
    // No path MTU discovery: packets stay at the 1,200 bytes every path carries, and the
    // connection's transmit buffer stays at that size for its whole life (discovery grows
    // it to about 2.4 KB; measured 1.4 KB less RSS per idle connection). A client's frames
    // and voice datagrams are far smaller.
    transport.mtu_discovery_config(None);
    transport
}

fn codec(transport_message_bytes_max: usize) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_length(4)
        .big_endian()
        .max_frame_length(transport_message_bytes_max)
        .new_codec()
}

/// Reading half.
pub struct QuicReader {
    frames: FramedRead<BudgetedRead<RecvStream>, LengthDelimitedCodec>,
    frame_bytes_max: usize,
    transport_message_bytes_max: usize,
    connection: quinn::Connection,
    budget: Arc<ReadBudget>,
}

impl QuicReader {
    /// Whether the client closed the connection with application code 1000 (as WebSocket's
    /// normal closure): a goodbye. Code 0 is what quinn sends when a client merely drops
    /// its handle, so it does not end the session.
    fn closed_by_client_normally(&self) -> bool {
        matches!(
            self.connection.close_reason(),
            Some(quinn::ConnectionError::ApplicationClosed(close))
                if close.error_code.into_inner() == u64::from(GOODBYE_CLOSE_CODE)
        )
    }
}

/// Read buffer per connection: sized to what an idle listener sends (its auth and joins,
/// see `ws`); a bigger frame grows it while it is read.
const READ_BUFFER_BYTES: usize = 256;

/// Writing half: each frame goes to the stream as its 4-byte length and the frame's own
/// bytes (no copy into a write buffer, which would be 8 KiB per connection).
pub struct QuicWriter {
    send: SendStream,
    transport_message_bytes_max: usize,
    connection: quinn::Connection,
}

/// Wraps an accepted stream pair. Until [`TransportReader::authenticated`] a frame may
/// hold at most `preauth_message_bytes_max` bytes (a longer length prefix closes the
/// connection at once, before anything is buffered).
pub fn split(
    connection: quinn::Connection,
    send: SendStream,
    recv: RecvStream,
    limits: &crate::config::LimitsConfig,
    budget: Arc<ReadBudget>,
) -> (QuicReader, QuicWriter) {
    let transport_message_bytes_max = limits.transport_message_bytes_max;
    let preauth = codec(
        limits
            .preauth_message_bytes_max
            .min(transport_message_bytes_max),
    );
    (
        QuicReader {
            frames: FramedRead::with_capacity(
                BudgetedRead::new(recv, budget.clone()),
                preauth,
                READ_BUFFER_BYTES,
            ),
            frame_bytes_max: limits.frame_bytes_max,
            transport_message_bytes_max,
            connection: connection.clone(),
            budget,
        },
        QuicWriter {
            send,
            transport_message_bytes_max,
            connection,
        },
    )
}

impl TransportReader for QuicReader {
    fn authenticated(&mut self) {
        self.budget.authenticated();
        self.frames
            .decoder_mut()
            .set_max_frame_length(self.transport_message_bytes_max);
        // Room for one whole message in flight, and the next one behind it.
        let window = (self.transport_message_bytes_max as u64).saturating_mul(2);
        self.connection
            .set_receive_window(VarInt::from_u64(window).unwrap_or(VarInt::MAX));
    }

    async fn next(&mut self) -> Option<Result<Inbound, String>> {
        // Voice frames come as datagrams beside the stream. Both reads are cancel safe.
        let next = tokio::select! {
            next = self.frames.next() => next,
            datagram = self.connection.read_datagram() => match datagram {
                Ok(datagram) => return Some(Ok(Inbound::Audio(datagram))),
                // The connection is gone: the stream read reports how.
                Err(_) => self.frames.next().await,
            },
        };
        let Some(next) = next else {
            return if self.closed_by_client_normally() {
                Some(Ok(Inbound::Goodbye))
            } else {
                None
            };
        };
        if next.is_ok() {
            self.budget.message_done();
        }
        match next {
            Ok(frame) if frame.len() > self.frame_bytes_max => {
                Some(Ok(Inbound::TooLarge(frame.len())))
            }
            Ok(frame) => Some(Ok(Inbound::Frame(Encoding::MsgPack, frame.freeze()))),
            // LengthDelimitedCodec reports a length above the cap as InvalidData.
            Err(error) if error.kind() == std::io::ErrorKind::InvalidData => {
                Some(Ok(if self.budget.is_authenticated() {
                    Inbound::OverCap
                } else {
                    Inbound::OverBudget(BudgetExceeded::PreAuth)
                }))
            }
            Err(_) if self.budget.exceeded().is_some() => {
                Some(Ok(Inbound::OverBudget(self.budget.exceeded()?)))
            }
            Err(_) if self.closed_by_client_normally() => Some(Ok(Inbound::Goodbye)),
            Err(error) => Some(Err(error.to_string())),
        }
    }
}

impl TransportWriter for QuicWriter {
    async fn feed(&mut self, frame: Bytes, _encoding: Encoding) -> Result<(), String> {
        if frame.len() > self.transport_message_bytes_max {
            return Err(format!(
                "frame of {} bytes exceeds the transport cap of {} bytes",
                frame.len(),
                self.transport_message_bytes_max
            ));
        }
        let length = u32::try_from(frame.len()).map_err(|e| e.to_string())?;
        let mut chunks = [Bytes::copy_from_slice(&length.to_be_bytes()), frame];
        self.send
            .write_all_chunks(&mut chunks)
            .await
            .map_err(|e| e.to_string())
    }

    async fn flush(&mut self) -> Result<(), String> {
        // The stream sends what it was given as the connection's window allows.
        Ok(())
    }

    fn datagrams(&self) -> Option<quinn::Connection> {
        Some(self.connection.clone())
    }

    async fn send_audio(&mut self, frame: Bytes) -> Result<(), String> {
        send_voice_datagram(&self.connection, frame);
        Ok(())
    }

    async fn close(mut self, reason: Option<(u16, String)>) {
        let send = &mut self.send;
        let _ = send.finish();
        // Let the last frames (an error response, say) reach the peer before closing.
        let _ = tokio::time::timeout(Duration::from_millis(CLOSE_LINGER_MS), send.stopped()).await;
        let (code, reason) = reason.unwrap_or((0, String::new()));
        self.connection
            .close(VarInt::from_u32(code as u32), reason.as_bytes());
    }
}

/// Closes a connection that could not be served (e.g. too many connections).
pub fn refuse(connection: &quinn::Connection, code: ErrorCode, reason: &str) {
    connection.close(
        VarInt::from_u32(code.close_code() as u32),
        reason.as_bytes(),
    );
}

/// Builds a server endpoint config from a rustls server config.
pub fn server_config(
    tls: rustls::ServerConfig,
) -> Result<quinn::ServerConfig, Box<dyn std::error::Error + Send + Sync>> {
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config()));
    Ok(config)
}

/// Accepts client QUIC connections until the node stops.
pub(crate) async fn accept(node: Arc<Edge>, endpoint: quinn::Endpoint, tracker: TaskTracker) {
    loop {
        let incoming = tokio::select! {
            _ = node.ctx.shutdown.cancelled() => return,
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => return,
            },
        };
        let node = node.clone();
        tracker.spawn(async move {
            let connection = match incoming.await {
                Ok(connection) => connection,
                Err(error) => {
                    tracing::debug!(%error, "QUIC handshake failed");
                    return;
                }
            };
            let Some(slot) = node.try_open_connection() else {
                refuse(&connection, ErrorCode::TooManyConnections, "node is full");
                return;
            };
            let accepted = tokio::select! {
                _ = node.ctx.shutdown.cancelled() => None,
                stream = connection.accept_bi() => stream.ok(),
                _ = tokio::time::sleep(Duration::from_millis(node.ctx.config.limits.auth_timeout_ms)) => None,
            };
            let Some((send, recv)) = accepted else {
                refuse(&connection, ErrorCode::Unauthenticated, "no stream opened");
                return;
            };
            let (reader, writer) = split(
                connection,
                send,
                recv,
                &node.ctx.config.limits,
                node.read_budget(),
            );
            crate::server::edge::connection::drive(
                node.clone(),
                "quic",
                reader,
                crate::server::edge::connection::Queued(writer),
                slot,
            )
            .await;
        });
    }
}
