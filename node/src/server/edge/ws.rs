//! WebSocket transport (tokio-tungstenite over a hyper upgrade).
//!
//! Text messages carry JSON frames, binary messages MessagePack frames, or voice frames
//! when their first byte is the audio marker `0xc1`. Messages above
//! the frame limit but within the transport cap are discarded and answered with
//! `frame_too_large`; above the cap tungstenite fails the read and the connection closes
//! with 1009.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

use chorus_protocol::Encoding;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::server::edge::budget::{BudgetedRead, ReadBudget};
use crate::server::edge::connection::{Inbound, TransportReader, TransportWriter};
use crate::server::sessions::wire::{truncate_utf8, ws_close_code, Wire};

/// The stream type after the HTTP upgrade, its reads counted against a [`ReadBudget`].
pub type ServerWebSocket = WebSocketStream<BudgetedRead<TokioIo<Upgraded>>>;

/// Read buffer per connection. tungstenite allocates it eagerly and keeps it for the
/// connection's life, so it is sized to what an idle listener sends: its auth (about
/// 220 bytes with a development token) and its joins. A bigger message grows it while
/// it is read (a frame reserves its whole length at once; each read takes at most this
/// many bytes), so the rare large one costs a few more reads.
const READ_BUFFER_BYTES: usize = 256;
/// Write buffer per connection before a flush is forced.
const WRITE_BUFFER_BYTES: usize = 16 * 1024;

/// The WebSocket config for `/ws`.
pub fn config(transport_message_bytes_max: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(WRITE_BUFFER_BYTES)
        .max_write_buffer_size(transport_message_bytes_max * 2 + WRITE_BUFFER_BYTES)
        .max_message_size(Some(transport_message_bytes_max))
        .max_frame_size(Some(transport_message_bytes_max))
}

/// A plain WebSocket's stream: the node reads through the library and writes to the
/// socket itself (see `sessions::wire`).
pub type DirectWebSocket = WebSocketStream<BudgetedRead<WireIo>>;

/// Reading half.
pub struct WsReader {
    source: Source,
    frame_bytes_max: usize,
    budget: Arc<ReadBudget>,
}

/// What a [`WsReader`] reads.
enum Source {
    /// Half of a stream whose other half is a [`WsWriter`] (WebSocket over TLS).
    Split(SplitStream<ServerWebSocket>),
    /// A whole stream whose frames the node writes to the socket through the wire.
    Direct(Box<DirectWebSocket>, Arc<Wire>),
}

/// Writing half.
pub struct WsWriter {
    sink: SplitSink<ServerWebSocket, Message>,
}

/// Splits an upgraded WebSocket into transport halves.
pub fn split(
    socket: ServerWebSocket,
    frame_bytes_max: usize,
    budget: Arc<ReadBudget>,
) -> (WsReader, WsWriter) {
    let (sink, stream) = socket.split();
    (
        WsReader {
            source: Source::Split(stream),
            frame_bytes_max,
            budget,
        },
        WsWriter { sink },
    )
}

/// The reading side of a plain WebSocket whose frames go out through `wire`.
pub fn direct(
    socket: DirectWebSocket,
    wire: Arc<Wire>,
    frame_bytes_max: usize,
    budget: Arc<ReadBudget>,
) -> WsReader {
    WsReader {
        source: Source::Direct(Box::new(socket), wire),
        frame_bytes_max,
        budget,
    }
}

/// A plain WebSocket's TCP socket for the WebSocket library: reads come from the socket
/// (after the bytes the HTTP server read ahead), and the library's own writes (pongs,
/// the close reply) join the wire's queue, in order with the node's frames.
pub struct WireIo {
    socket: Arc<TcpStream>,
    read_ahead: Bytes,
    wire: Arc<Wire>,
}

impl WireIo {
    /// `socket`, after `read_ahead` (what the HTTP server read past the upgrade request).
    pub fn new(socket: Arc<TcpStream>, read_ahead: Bytes, wire: Arc<Wire>) -> Self {
        WireIo {
            socket,
            // Copied out: the slice would keep the HTTP server's whole read buffer (8 KiB)
            // alive for the connection's life, even when empty.
            read_ahead: Bytes::copy_from_slice(&read_ahead),
            wire,
        }
    }
}

impl AsyncRead for WireIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.read_ahead.is_empty() {
            let n = self.read_ahead.len().min(buf.remaining());
            buf.put_slice(&self.read_ahead.split_to(n));
            return Poll::Ready(Ok(()));
        }
        loop {
            std::task::ready!(self.socket.poll_read_ready(cx))?;
            match self.socket.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(error) => return Poll::Ready(Err(error)),
            }
        }
    }
}

impl AsyncWrite for WireIo {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Poll::Ready(self.wire.library(buf).map(|()| buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        // The wire writes what it takes (or its flusher does).
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        // The wire's flusher shuts the socket after the close frame.
        Poll::Ready(Ok(()))
    }
}

impl TransportReader for WsReader {
    fn authenticated(&mut self) {
        self.budget.authenticated();
    }

    async fn next(&mut self) -> Option<Result<Inbound, String>> {
        loop {
            let next = match &mut self.source {
                Source::Split(stream) => stream.next().await,
                Source::Direct(stream, _) => stream.next().await,
            };
            let message = match next? {
                Ok(message) => message,
                Err(tokio_tungstenite::tungstenite::Error::Capacity(_)) => {
                    return Some(Ok(Inbound::OverCap))
                }
                Err(tokio_tungstenite::tungstenite::Error::Utf8(_)) => {
                    return Some(Ok(Inbound::NotUtf8))
                }
                Err(error) => {
                    return Some(match self.budget.exceeded() {
                        Some(exceeded) => Ok(Inbound::OverBudget(exceeded)),
                        None => Err(error.to_string()),
                    })
                }
            };
            self.budget.message_done();
            if let (Message::Close(_), Source::Direct(stream, wire)) = (&message, &mut self.source)
            {
                // Nothing of ours follows the library's close reply: write it now.
                wire.peer_closed();
                let _ = stream.flush().await;
            }
            let (encoding, bytes) = match message {
                Message::Text(text) => (Encoding::Json, Bytes::from(text)),
                Message::Binary(bytes) if chorus_protocol::audio::is_audio(&bytes) => {
                    return Some(Ok(Inbound::Audio(bytes)))
                }
                Message::Binary(bytes) => (Encoding::MsgPack, bytes),
                // A normal close (1000) is a goodbye: the session ends. Other closes (e.g.
                // 1001 going away) leave it resumable.
                Message::Close(Some(frame)) if frame.code == CloseCode::Normal => {
                    return Some(Ok(Inbound::Goodbye))
                }
                // Control frames: tungstenite answers pings itself. After a Close, keep
                // reading: that flushes tungstenite's close reply and then ends the stream.
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) | Message::Close(_) => {
                    continue
                }
            };
            if bytes.len() > self.frame_bytes_max {
                return Some(Ok(Inbound::TooLarge(bytes.len())));
            }
            return Some(Ok(Inbound::Frame(encoding, bytes)));
        }
    }
}

impl TransportWriter for WsWriter {
    async fn feed(&mut self, frame: Bytes, encoding: Encoding) -> Result<(), String> {
        let message = match encoding {
            Encoding::MsgPack => Message::Binary(frame),
            Encoding::Json => Message::Text(
                Utf8Bytes::try_from(frame).map_err(|e| format!("JSON frame is not UTF-8: {e}"))?,
            ),
        };
        self.sink.feed(message).await.map_err(|e| e.to_string())
    }

    async fn flush(&mut self) -> Result<(), String> {
        self.sink.flush().await.map_err(|e| e.to_string())
    }

    async fn send_audio(&mut self, frame: Bytes) -> Result<(), String> {
        // Binary even on a JSON connection: the audio marker tells it from a frame.
        self.sink
            .feed(Message::Binary(frame))
            .await
            .map_err(|e| e.to_string())
    }

    async fn close(mut self, reason: Option<(u16, String)>) {
        let frame = match reason {
            None => CloseFrame {
                code: CloseCode::Normal,
                reason: Utf8Bytes::from_static(""),
            },
            Some((code, reason)) => CloseFrame {
                code: CloseCode::from(ws_close_code(code)),
                reason: Utf8Bytes::from(truncate_utf8(&reason, 123).to_string()),
            },
        };
        let _ = self.sink.send(Message::Close(Some(frame))).await;
        let _ = self.sink.close().await;
    }
}

/// Echoes every data message back (for the Autobahn conformance cases), with the same
/// WebSocket stack as `/ws`.
pub async fn echo<S>(mut socket: WebSocketStream<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    while let Some(message) = socket.next().await {
        let message = match message {
            Ok(message) => message,
            Err(_) => break,
        };
        let reply = match message {
            Message::Text(_) | Message::Binary(_) => message,
            // Keep reading after a Close: tungstenite replies and then ends the stream,
            // completing the closing handshake cleanly.
            _ => continue,
        };
        if socket.send(reply).await.is_err() {
            break;
        }
    }
}
