//! The client library's one error type.

use chorus_protocol::{ErrorBody, ErrorCode, ProtocolError};

/// Everything that can go wrong for a client, named for the condition.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The URL is not `ws://HOST:PORT/PATH` or `quic://HOST:PORT`.
    #[error("invalid URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The configuration cannot work (no URL, no CA for QUIC, …).
    #[error("invalid client configuration: {0}")]
    Config(String),
    /// The transport connection could not be established (refused, unreachable, handshake).
    #[error("cannot connect to {url}: {reason}")]
    Connect {
        /// The URL tried.
        url: String,
        /// Why it failed.
        reason: String,
    },
    /// TLS setup or verification failed (CA file unreadable, certificate not trusted).
    #[error("TLS: {0}")]
    Tls(String),
    /// The server refused `auth` (invalid or expired token, unsupported version).
    #[error("authentication refused: {0}")]
    Auth(ErrorBody),
    /// The server answered a request with an error.
    #[error("server error: {0}")]
    Server(ErrorBody),
    /// No answer within the deadline.
    #[error("timed out after {timeout_ms} ms waiting for {what}")]
    Timeout {
        /// What was awaited (a request kind, `connect`, …).
        what: String,
        /// The deadline that passed.
        timeout_ms: u64,
    },
    /// The connection is closed: by the server (with its close code and reason), by the
    /// network (no code), or by [`Client::close`](super::Client::close).
    #[error("connection closed ({}): {reason}", code.map_or_else(|| "no close code".to_string(), |c| format!("code {c}")))]
    Closed {
        /// WebSocket close code or QUIC application error code; `None` if the transport
        /// ended without one.
        code: Option<u16>,
        /// The close reason.
        reason: String,
    },
    /// The connection dropped while the request was in flight or waiting to be sent. The
    /// request may or may not have been executed by the server.
    #[error("connection lost before {kind} was answered ({reason}); it may or may not have been executed")]
    ConnectionLost {
        /// The request kind.
        kind: String,
        /// Why the connection was lost.
        reason: String,
    },
    /// Too many requests are waiting for a response.
    #[error("too many requests in flight (limit {limit})")]
    TooManyPending {
        /// The configured bound (`pending_requests_max`).
        limit: usize,
    },
    /// A frame from the server could not be decoded, or a frame could not be encoded.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// An I/O error outside the transport's own error reporting (e.g. reading the CA file).
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl ClientError {
    /// The server's stable error code (auth and request errors) or the close code
    /// (closed connections), if there is one.
    pub fn code(&self) -> Option<u16> {
        match self {
            ClientError::Auth(body) | ClientError::Server(body) => Some(body.code),
            ClientError::Closed { code, .. } => *code,
            _ => None,
        }
    }

    /// The known server error code, for matching (`Some(ErrorCode::RoomNotFound)`).
    pub fn error_code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Auth(body) | ClientError::Server(body) => body.error_code(),
            _ => None,
        }
    }

    /// A short, bounded label for counting errors (metrics, load reports): the server's
    /// error name when there is one, else the variant.
    pub fn label(&self) -> String {
        match self {
            ClientError::Auth(body) | ClientError::Server(body) => match body.error_code() {
                Some(code) => code.name().to_string(),
                None => format!("error_{}", body.code),
            },
            ClientError::Closed { code: Some(c), .. } => format!("closed_{c}"),
            ClientError::Closed { code: None, .. } => "closed".into(),
            ClientError::InvalidUrl { .. } => "invalid_url".into(),
            ClientError::Config(_) => "config".into(),
            ClientError::Connect { .. } => "connect".into(),
            ClientError::Tls(_) => "tls".into(),
            ClientError::Timeout { .. } => "timeout".into(),
            ClientError::ConnectionLost { .. } => "connection_lost".into(),
            ClientError::TooManyPending { .. } => "too_many_pending".into(),
            ClientError::Protocol(e) => format!("protocol_{}", e.code().name()),
            ClientError::Io(_) => "io".into(),
        }
    }
}

/// Whether a close code (WebSocket close code or QUIC application error code) means the
/// client must not reconnect: the 41xx range (authentication: invalid or expired token,
/// unauthenticated) and 4005 (unsupported protocol version). Reconnecting would only be
/// refused again.
pub fn is_final_close_code(code: u16) -> bool {
    (4100..4200).contains(&code) || code == ErrorCode::UnsupportedVersion.close_code()
}

/// Whether an error response to `auth` is final (retrying with the same token cannot work).
pub(crate) fn is_final_auth_error(body: &ErrorBody) -> bool {
    (2000..3000).contains(&body.code) || body.code == ErrorCode::UnsupportedVersion.as_u16()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_close_codes_are_final_and_others_are_not() {
        assert!(is_final_close_code(ErrorCode::InvalidToken.close_code()));
        assert!(is_final_close_code(ErrorCode::TokenExpired.close_code()));
        assert!(is_final_close_code(ErrorCode::Unauthenticated.close_code()));
        assert!(is_final_close_code(4005));
        assert!(!is_final_close_code(ErrorCode::PingTimeout.close_code()));
        assert!(!is_final_close_code(ErrorCode::SlowConsumer.close_code()));
        assert!(!is_final_close_code(ErrorCode::Unavailable.close_code()));
        assert!(!is_final_close_code(1000));
        assert!(!is_final_close_code(1006));
    }

    #[test]
    fn labels_name_server_codes() {
        let e = ClientError::Server(ErrorBody::new(ErrorCode::RateLimited, "slow down"));
        assert_eq!(e.label(), "rate_limited");
        assert_eq!(e.code(), Some(3000));
        let e = ClientError::Server(ErrorBody {
            code: 9999,
            message: "future".into(),
        });
        assert_eq!(e.label(), "error_9999");
        assert_eq!(e.error_code(), None);
    }
}
