//! WebSocket transport (tokio-tungstenite over a hyper upgrade).
//!
//! Text messages carry JSON frames, binary messages MessagePack frames, or voice frames
//! when their first byte is the audio marker `0xc1`. Messages above
//! the frame limit but within the transport cap are discarded and answered with
//! `frame_too_large`; above the cap tungstenite fails the read and the connection closes
//! with 1009.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

use chorus_protocol::{Encoding, ErrorCode};

use crate::server::edge::budget::{BudgetedRead, ReadBudget};
use crate::server::edge::connection::{Inbound, TransportReader, TransportWriter};

/// The stream type after the HTTP upgrade, its reads counted against a [`ReadBudget`].
pub type ServerWebSocket = WebSocketStream<BudgetedRead<TokioIo<Upgraded>>>;

/// Read buffer per connection. tungstenite allocates it eagerly, so it is kept small:
/// 10k connections × 1 KiB = 10 MiB. A bigger message grows it while it is read (a frame
/// reserves its whole length at once), so this costs no more than a few more reads for
/// the rare large ones.
const READ_BUFFER_BYTES: usize = 1024;
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

/// Reading half.
pub struct WsReader {
    stream: SplitStream<ServerWebSocket>,
    frame_bytes_max: usize,
    budget: Arc<ReadBudget>,
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
            stream,
            frame_bytes_max,
            budget,
        },
        WsWriter { sink },
    )
}

impl TransportReader for WsReader {
    fn authenticated(&mut self) {
        self.budget.authenticated();
    }

    async fn next(&mut self) -> Option<Result<Inbound, String>> {
        loop {
            let message = match self.stream.next().await? {
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
                // WebSocket has its own code for an oversized message (1009).
                // and for a text message that is not UTF-8 (1007, RFC 6455 §8.1).
                code: if code == ErrorCode::FrameTooLarge.close_code() {
                    CloseCode::Size
                } else if code == ErrorCode::MalformedFrame.close_code() {
                    CloseCode::Invalid
                } else {
                    CloseCode::from(code)
                },
                // Close reasons are limited to 123 bytes by RFC 6455.
                reason: Utf8Bytes::from(truncate_utf8(&reason, 123).to_string()),
            },
        };
        let _ = self.sink.send(Message::Close(Some(frame))).await;
        let _ = self.sink.close().await;
    }
}

fn truncate_utf8(text: &str, bytes_max: usize) -> &str {
    if text.len() <= bytes_max {
        return text;
    }
    let mut end = bytes_max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_reasons_are_cut_on_char_boundaries() {
        let text = "é".repeat(100);
        let cut = truncate_utf8(&text, 123);
        assert!(cut.len() <= 123);
        assert_eq!(cut.len() % 2, 0);
    }
}
