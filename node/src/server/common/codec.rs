//! The inter-node channel's encoding: MessagePack, each request tagged with the domain
//! that handles it (rooms, red-packet rains, quizzes, voice messages), so each domain owns its messages.

use bytes::Bytes;
use chorus_protocol::{ErrorBody, ErrorCode};
use serde::{Deserialize, Serialize};

/// The part of the node a request between nodes is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Domain {
    /// Rooms (`rooms::messages::RoomMessage`).
    Rooms = 1,
    /// Red-packet rains (`rain::RainMessage`).
    Rain = 2,
    /// Quizzes (`quiz::QuizMessage`).
    Quiz = 3,
    /// Voice messages and user actors (`voicemail::messages::VoiceMessage`).
    Voice = 4,
}

impl Domain {
    fn from_tag(tag: u8) -> Option<Domain> {
        match tag {
            1 => Some(Domain::Rooms),
            2 => Some(Domain::Rain),
            3 => Some(Domain::Quiz),
            4 => Some(Domain::Voice),
            _ => None,
        }
    }
}

/// Encodes a request for `domain` on another node: one tag byte, then the message.
pub fn request<T: Serialize>(domain: Domain, message: &T) -> Bytes {
    let body = encode(message);
    if body.is_empty() {
        return body;
    }
    let mut bytes = Vec::with_capacity(body.len() + 1);
    bytes.push(domain as u8);
    bytes.extend_from_slice(&body);
    Bytes::from(bytes)
}

/// The domain of a request and its message bytes.
pub fn split_request(request: &Bytes) -> Result<(Domain, Bytes), ErrorBody> {
    let tag = request.first().copied().unwrap_or(0);
    match Domain::from_tag(tag) {
        Some(domain) => Ok((domain, request.slice(1..))),
        None => Err(ErrorBody::new(
            ErrorCode::Internal,
            format!("inter-node message for an unknown part of the node (tag {tag})"),
        )),
    }
}

/// Encodes a value for the inter-node channel. A failure (a bug: every value sent is
/// plain data) is logged and counted (`chorus_encode_failures_total`), and the empty
/// message sent instead is refused by the receiver's decoder.
pub fn encode<T: Serialize>(value: &T) -> Bytes {
    match rmp_serde::to_vec_named(value) {
        Ok(bytes) => Bytes::from(bytes),
        Err(error) => {
            metrics::counter!("chorus_encode_failures_total").increment(1);
            tracing::error!(%error, what = std::any::type_name::<T>(), "cannot encode an inter-node message");
            Bytes::new()
        }
    }
}

/// Decodes a value from the inter-node channel.
pub fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, ErrorBody> {
    rmp_serde::from_slice(bytes)
        .map_err(|e| ErrorBody::new(ErrorCode::Internal, format!("inter-node message: {e}")))
}
