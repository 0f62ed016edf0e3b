//! `GET /vm/<message_id>`: a voice message's audio over HTTP, for a browser's media
//! element or Media Source Extensions (SPEC M4).
//!
//! - `Authorization: Bearer <token>`: a participant of the message (sender or recipient).
//! - `Range: bytes=<a>-[<b>]` (one range): `206 Partial Content` with what is stored of
//!   it, at most 256 KiB; `Content-Range: bytes a-e/*` while the upload goes on (the size
//!   is not known yet), `bytes a-e/<size>` once it is complete. A range starting at or
//!   past the bytes stored waits up to 10 s for more while the upload goes on.
//! - Without `Range`: `200` with the whole message once it is complete; while it is still
//!   uploading, `409` (ask with `Range`).
//! - `Content-Type: audio/ogg; codecs=opus`; `Accept-Ranges: bytes`.
//! - Errors: `401` (no or bad token), `404` (no such message, or not a participant),
//!   `416` (a range past the end of a complete message), `400` (a bad range), `503`.

use base64::Engine as _;
use bytes::Bytes;
use chorus_protocol::{VmFetchRequest, VmFetchResponse, VmUploadStatus, FETCH_BYTES_MAX};
use http_body_util::Full;
use hyper::header::{HeaderValue, ACCEPT_RANGES, CONTENT_RANGE, CONTENT_TYPE};
use hyper::{Response, StatusCode};

use super::messages::VoiceError;
use super::service::Voicemail;
use crate::server::common::http::HttpResponse;

/// The most bytes one range answer carries.
pub const RANGE_BYTES_MAX: u64 = 256 * 1024;
/// How long a range past the stored bytes waits for more, ms.
pub const RANGE_WAIT_MS: u64 = 10_000;
/// The audio's media type.
pub const CONTENT_TYPE_OPUS: &str = "audio/ogg; codecs=opus";

/// A parsed `Range` header: the first byte, and the last if given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    /// The first byte.
    pub start: u64,
    /// The last byte (inclusive), if given.
    pub end: Option<u64>,
}

/// Reads `bytes=a-b` or `bytes=a-` (one range; suffix ranges `-n` and several ranges are
/// refused).
pub fn parse_range(value: &str) -> Result<ByteRange, String> {
    let spec = value
        .trim()
        .strip_prefix("bytes=")
        .ok_or("a range is bytes=<first>-[<last>]")?;
    if spec.contains(',') {
        return Err("one range at a time".into());
    }
    let (first, last) = spec
        .split_once('-')
        .ok_or("a range is bytes=<first>-[<last>]")?;
    let start: u64 = first
        .trim()
        .parse()
        .map_err(|_| "the first byte of a range is a number (suffix ranges are not served)")?;
    let end = match last.trim() {
        "" => None,
        last => Some(
            last.parse::<u64>()
                .map_err(|_| "the last byte is a number")?,
        ),
    };
    if end.is_some_and(|end| end < start) {
        return Err("the last byte is before the first".into());
    }
    Ok(ByteRange { start, end })
}

fn text(status: StatusCode, message: impl Into<String>) -> HttpResponse {
    let mut response = Response::new(Full::new(Bytes::from(message.into() + "\n")));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn voice_error(error: VoiceError) -> HttpResponse {
    let status = match &error {
        VoiceError::NotFound(_) | VoiceError::NotSender(_) => StatusCode::NOT_FOUND,
        VoiceError::Invalid(_) => StatusCode::BAD_REQUEST,
        VoiceError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    text(status, error.to_string())
}

fn decode(answer: &VoiceFetch) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(answer.data.as_bytes())
        .unwrap_or_default()
}

type VoiceFetch = VmFetchResponse;

/// Reads `[start, start + len)` in fetch-sized pieces; the last answer and the bytes.
async fn read(
    voicemail: &Voicemail,
    user: &str,
    message_id: &str,
    start: u64,
    len: u64,
    wait_ms: u64,
) -> Result<(VoiceFetch, Vec<u8>), VoiceError> {
    let mut bytes = Vec::new();
    let mut at = start;
    loop {
        let want = start
            .saturating_add(len)
            .saturating_sub(at)
            .min(u64::from(FETCH_BYTES_MAX)) as u32;
        let answer = voicemail
            .fetch(
                user,
                VmFetchRequest {
                    message_id: message_id.to_string(),
                    offset: at,
                    length: Some(want.max(1)),
                    wait_ms: Some(if at == start { wait_ms } else { 0 }),
                },
            )
            .await?;
        let piece = decode(&answer);
        at += piece.len() as u64;
        bytes.extend_from_slice(&piece);
        if piece.is_empty() || at >= start.saturating_add(len) || at >= answer.acked {
            return Ok((answer, bytes));
        }
    }
}

/// Serves `GET /vm/<message_id>` for `user` (already authenticated).
pub async fn serve(
    voicemail: &Voicemail,
    user: &str,
    message_id: &str,
    range: Option<&str>,
) -> HttpResponse {
    let range = match range.map(parse_range).transpose() {
        Ok(range) => range,
        Err(why) => return text(StatusCode::BAD_REQUEST, why),
    };
    let Some(range) = range else {
        // The whole message, once complete.
        let (answer, bytes) = match read(
            voicemail,
            user,
            message_id,
            0,
            RANGE_BYTES_MAX.max(1 << 24),
            0,
        )
        .await
        {
            Ok(read) => read,
            Err(error) => return voice_error(error),
        };
        if answer.status != VmUploadStatus::Complete {
            return text(
                StatusCode::CONFLICT,
                "the message is still uploading (or its upload ended without completing): ask with Range",
            );
        }
        let mut response = Response::new(Full::new(Bytes::from(bytes)));
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE_OPUS));
        headers.insert(ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        return response;
    };
    let len = range.end.map_or(RANGE_BYTES_MAX, |end| {
        (end - range.start).saturating_add(1).min(RANGE_BYTES_MAX)
    });
    let (answer, bytes) =
        match read(voicemail, user, message_id, range.start, len, RANGE_WAIT_MS).await {
            Ok(read) => read,
            Err(error) => return voice_error(error),
        };
    let complete = answer.status == VmUploadStatus::Complete;
    let total = if complete {
        answer.acked.to_string()
    } else {
        "*".to_string()
    };
    if bytes.is_empty() {
        if complete || answer.status != VmUploadStatus::Uploading {
            let mut response = text(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "the range starts past the end",
            );
            if let Ok(value) = HeaderValue::from_str(&format!("bytes */{}", answer.acked)) {
                response.headers_mut().insert(CONTENT_RANGE, value);
            }
            return response;
        }
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "no bytes there yet: the upload goes on; ask again",
        );
    }
    let last = range.start + bytes.len() as u64 - 1;
    let mut response = Response::new(Full::new(Bytes::from(bytes)));
    *response.status_mut() = StatusCode::PARTIAL_CONTENT;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE_OPUS));
    headers.insert(ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Ok(value) = HeaderValue::from_str(&format!("bytes {}-{last}/{total}", range.start)) {
        headers.insert(CONTENT_RANGE, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_read_or_refused_with_a_reason() {
        assert_eq!(
            parse_range("bytes=0-"),
            Ok(ByteRange {
                start: 0,
                end: None
            })
        );
        assert_eq!(
            parse_range("bytes=10-19"),
            Ok(ByteRange {
                start: 10,
                end: Some(19)
            })
        );
        assert!(parse_range("bytes=-5").is_err());
        assert!(parse_range("bytes=0-1,4-5").is_err());
        assert!(parse_range("bytes=9-3").is_err());
        assert!(parse_range("items=0-").is_err());
    }
}
