//! Stable numeric error codes and the crate's error type.
//!
//! Codes are part of the wire contract (`docs/protocol.md`): a code is never reused for a
//! different condition. Ranges: 1xxx frame and protocol, 2xxx auth, 3xxx limits,
//! 4xxx domain (rooms, …), 5xxx server.

use serde::{Deserialize, Serialize};

/// A stable error code carried in error responses and close reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u16)]
pub enum ErrorCode {
    /// The frame is not valid MessagePack / JSON, or lacks required envelope fields.
    MalformedFrame = 1000,
    /// The frame exceeds the maximum frame size.
    FrameTooLarge = 1001,
    /// The request kind is not known to this server.
    UnknownKind = 1002,
    /// The request body does not match the schema of its kind.
    InvalidBody = 1003,
    /// The request sequence number is not greater than the previous one on this connection.
    OutOfOrder = 1004,
    /// The client asked for a protocol version this server does not speak.
    UnsupportedVersion = 1005,
    /// The frame nests deeper, or holds more elements, than the limits allow.
    FrameTooComplex = 1006,
    /// A frame type the receiver does not accept in this direction (e.g. a notification from a client).
    UnexpectedFrame = 1007,
    /// A request other than `auth` or `ping` was sent before authentication succeeded.
    Unauthenticated = 2000,
    /// The token is malformed or its signature does not verify.
    InvalidToken = 2001,
    /// The token has expired.
    TokenExpired = 2002,
    /// `auth` was sent on a connection that is already authenticated.
    AlreadyAuthenticated = 2003,
    /// The user may not perform this action.
    Forbidden = 2004,
    /// The connection exceeded its request rate (token bucket).
    RateLimited = 3000,
    /// The connection is already in the maximum number of rooms.
    TooManyRooms = 3001,
    /// The node already holds the maximum number of connections.
    TooManyConnections = 3002,
    /// The connection did not keep up with its outgoing queue and was closed.
    SlowConsumer = 3003,
    /// The connection missed too many pings and was closed.
    PingTimeout = 3004,
    /// The user holds the maximum number of sessions on this node and all of them are
    /// connected.
    TooManySessions = 3005,
    /// A per-user quota is used up (e.g. rooms open at once); the message says which.
    QuotaExceeded = 3006,
    /// The room does not exist (or has expired).
    RoomNotFound = 4000,
    /// The connection is not a member of the room.
    NotInRoom = 4001,
    /// The room has ended.
    RoomEnded = 4002,
    /// An argument is out of range (text too long, empty title, bad emoji, …).
    InvalidArgument = 4003,
    /// The resume request names an unknown or expired session; the client must resync.
    ResumeFailed = 4004,
    /// The quiz show does not exist.
    QuizNotFound = 4005,
    /// The answer was refused without being judged: no question is open or it is not
    /// this one (`not_current`), an earlier question was not passed (`skipped`), or the
    /// viewer is out (`eliminated`); the message starts with that word.
    QuizRefused = 4006,
    /// The voice message does not exist (or was deleted), or the user is neither its
    /// sender nor a recipient.
    MessageNotFound = 4007,
    /// A chunk does not continue the upload: its offset is past the bytes held; the
    /// message names the offset to continue from (also `vm.status`).
    UploadOutOfOrder = 4008,
    /// A chunk's bytes differ from the bytes already uploaded at the same offset.
    UploadConflict = 4009,
    /// The message or the chunk is too large or too long (bytes, chunk bytes, duration).
    MessageTooLarge = 4010,
    /// The bytes are not Opus in Ogg (a bad page, checksum, header or codec).
    NotOpus = 4011,
    /// The upload is over (`complete`, `failed` or `cancelled`, named in the message) and
    /// takes no new bytes.
    UploadClosed = 4012,
    /// An unexpected server error; the request may be retried.
    Internal = 5000,
    /// The server is shutting down or overloaded; retry elsewhere or later.
    Unavailable = 5001,
    /// The request's deadline passed before it could run; it was not run. Retry (with the
    /// same `request_id` where the request has one).
    DeadlineExceeded = 5002,
}

impl ErrorCode {
    /// Every code, in numeric order (for documentation and tests).
    pub const ALL: &'static [ErrorCode] = &[
        ErrorCode::MalformedFrame,
        ErrorCode::FrameTooLarge,
        ErrorCode::UnknownKind,
        ErrorCode::InvalidBody,
        ErrorCode::OutOfOrder,
        ErrorCode::UnsupportedVersion,
        ErrorCode::FrameTooComplex,
        ErrorCode::UnexpectedFrame,
        ErrorCode::Unauthenticated,
        ErrorCode::InvalidToken,
        ErrorCode::TokenExpired,
        ErrorCode::AlreadyAuthenticated,
        ErrorCode::Forbidden,
        ErrorCode::RateLimited,
        ErrorCode::TooManyRooms,
        ErrorCode::TooManyConnections,
        ErrorCode::SlowConsumer,
        ErrorCode::PingTimeout,
        ErrorCode::TooManySessions,
        ErrorCode::QuotaExceeded,
        ErrorCode::RoomNotFound,
        ErrorCode::NotInRoom,
        ErrorCode::RoomEnded,
        ErrorCode::InvalidArgument,
        ErrorCode::ResumeFailed,
        ErrorCode::QuizNotFound,
        ErrorCode::QuizRefused,
        ErrorCode::MessageNotFound,
        ErrorCode::UploadOutOfOrder,
        ErrorCode::UploadConflict,
        ErrorCode::MessageTooLarge,
        ErrorCode::NotOpus,
        ErrorCode::UploadClosed,
        ErrorCode::Internal,
        ErrorCode::Unavailable,
        ErrorCode::DeadlineExceeded,
    ];

    /// The numeric value on the wire.
    pub fn as_u16(self) -> u16 {
        self as u16
    }

    /// The code for a numeric value, if known.
    pub fn from_u16(value: u16) -> Option<Self> {
        Self::ALL.iter().copied().find(|c| c.as_u16() == value)
    }

    /// A short snake_case name, used in metrics labels and logs.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::MalformedFrame => "malformed_frame",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::UnknownKind => "unknown_kind",
            ErrorCode::InvalidBody => "invalid_body",
            ErrorCode::OutOfOrder => "out_of_order",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::FrameTooComplex => "frame_too_complex",
            ErrorCode::UnexpectedFrame => "unexpected_frame",
            ErrorCode::Unauthenticated => "unauthenticated",
            ErrorCode::InvalidToken => "invalid_token",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::AlreadyAuthenticated => "already_authenticated",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::TooManyRooms => "too_many_rooms",
            ErrorCode::TooManyConnections => "too_many_connections",
            ErrorCode::SlowConsumer => "slow_consumer",
            ErrorCode::PingTimeout => "ping_timeout",
            ErrorCode::TooManySessions => "too_many_sessions",
            ErrorCode::QuotaExceeded => "quota_exceeded",
            ErrorCode::RoomNotFound => "room_not_found",
            ErrorCode::NotInRoom => "not_in_room",
            ErrorCode::RoomEnded => "room_ended",
            ErrorCode::InvalidArgument => "invalid_argument",
            ErrorCode::ResumeFailed => "resume_failed",
            ErrorCode::QuizNotFound => "quiz_not_found",
            ErrorCode::QuizRefused => "quiz_refused",
            ErrorCode::MessageNotFound => "message_not_found",
            ErrorCode::UploadOutOfOrder => "upload_out_of_order",
            ErrorCode::UploadConflict => "upload_conflict",
            ErrorCode::MessageTooLarge => "message_too_large",
            ErrorCode::NotOpus => "not_opus",
            ErrorCode::UploadClosed => "upload_closed",
            ErrorCode::Internal => "internal",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::DeadlineExceeded => "deadline_exceeded",
        }
    }

    /// The WebSocket close code (and QUIC application error code) used when a connection
    /// is closed for this reason: 4000 + (code mod 1000) + 100 × (code / 1000 − 1).
    ///
    /// E.g. `PingTimeout` (3004) closes with 4204, `InvalidToken` (2001) with 4101.
    pub fn close_code(self) -> u16 {
        let c = self.as_u16();
        4000 + (c / 1000 - 1) * 100 + c % 1000
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name(), self.as_u16())
    }
}

/// The error object of an error response: a stable code and a human-readable message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Stable numeric code (see [`ErrorCode`]); clients must tolerate codes they do not know.
    pub code: u16,
    /// Human-readable explanation; not stable, not for parsing.
    pub message: String,
}

impl ErrorBody {
    /// Builds an error body from a code and message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorBody {
            code: code.as_u16(),
            message: message.into(),
        }
    }

    /// The known code, if this server version knows it.
    pub fn error_code(&self) -> Option<ErrorCode> {
        ErrorCode::from_u16(self.code)
    }
}

impl std::fmt::Display for ErrorBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.error_code() {
            Some(code) => write!(f, "{code}: {}", self.message),
            None => write!(f, "error {}: {}", self.code, self.message),
        }
    }
}

/// Everything that can go wrong decoding or encoding a frame.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The frame is larger than the configured maximum.
    #[error("frame of {size_bytes} bytes exceeds the limit of {limit_bytes} bytes")]
    FrameTooLarge {
        /// Size of the offending frame.
        size_bytes: usize,
        /// The limit in force.
        limit_bytes: usize,
    },
    /// The frame nests deeper or holds more elements than allowed.
    #[error("frame too complex: {0}")]
    FrameTooComplex(String),
    /// The bytes are not a valid frame.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The request kind is not known.
    #[error("unknown request kind {0:?}")]
    UnknownKind(String),
    /// The body does not fit the schema of its kind.
    #[error("invalid body for {kind:?}: {reason}")]
    InvalidBody {
        /// The request or notification kind.
        kind: String,
        /// Decoder message.
        reason: String,
    },
    /// Encoding failed (a bug: every type we send is encodable).
    #[error("cannot encode frame: {0}")]
    Encode(String),
    /// An audio message (voice frame) is malformed or out of bounds.
    #[error("bad audio frame: {0}")]
    BadAudio(String),
}

impl ProtocolError {
    /// The stable error code a peer sees for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            ProtocolError::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            ProtocolError::FrameTooComplex(_) => ErrorCode::FrameTooComplex,
            ProtocolError::Malformed(_) => ErrorCode::MalformedFrame,
            ProtocolError::UnknownKind(_) => ErrorCode::UnknownKind,
            ProtocolError::InvalidBody { .. } => ErrorCode::InvalidBody,
            ProtocolError::Encode(_) => ErrorCode::Internal,
            ProtocolError::BadAudio(_) => ErrorCode::MalformedFrame,
        }
    }

    /// The error as a wire error body.
    pub fn to_body(&self) -> ErrorBody {
        ErrorBody::new(self.code(), self.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_round_trip() {
        let mut seen = std::collections::BTreeSet::new();
        for code in ErrorCode::ALL {
            assert!(seen.insert(code.as_u16()), "duplicate {code}");
            assert_eq!(ErrorCode::from_u16(code.as_u16()), Some(*code));
            let close = code.close_code();
            assert!((4000..5000).contains(&close), "{code} -> {close}");
        }
        assert_eq!(ErrorCode::PingTimeout.close_code(), 4204);
        assert_eq!(ErrorCode::InvalidToken.close_code(), 4101);
        assert_eq!(ErrorCode::MalformedFrame.close_code(), 4000);
    }
}
