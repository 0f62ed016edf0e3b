//! The Chorus wire protocol, version 1.
//!
//! Start with [`frame`]: every message is a frame (request, response or notification)
//! encoded as MessagePack or JSON with the same schema. [`messages`] holds the typed bodies
//! per kind; [`limits`] the hard bounds checked before parsing; [`error`] the stable error
//! codes. This crate does no I/O: transports (WebSocket, QUIC) live in `chorus-node`.
//! `docs/protocol.md` is the human-readable specification of the same contract.

pub mod audio;
pub mod error;
pub mod frame;
pub mod limits;
pub mod messages;
pub mod sealed;
pub mod voicemail;

pub use error::{ErrorBody, ErrorCode, ProtocolError};
pub use frame::{
    decode_frame, encode_notification, encode_request, encode_response_error, encode_response_ok,
    Body, EncodedBody, Encoding, Frame, NotificationFrame, RequestFrame, ResponseFrame,
};
pub use limits::FrameLimits;
pub use messages::*;
pub use voicemail::*;

/// The protocol version this crate implements.
pub const PROTOCOL_VERSION: u32 = 1;

/// The QUIC ALPN protocol identifier for client connections.
pub const ALPN: &[u8] = b"chorus/1";

/// The WebSocket subprotocol name a client may offer (optional).
pub const WS_SUBPROTOCOL: &str = "chorus.v1";

/// Bytes of the big-endian length prefix before each frame on the QUIC stream.
pub const LENGTH_PREFIX_BYTES: usize = 4;
