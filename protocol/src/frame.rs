//! Frames: the envelope every message travels in, and its two encodings.
//!
//! A frame is a map with a `type` field: `"req"` (request), `"res"` (response) or `"ntf"`
//! (notification). The same schema is encoded as MessagePack (maps with string keys) on
//! binary WebSocket frames and on the QUIC stream, and as JSON on text WebSocket frames.
//!
//! Decoding is two-phase: the envelope first (so a bad body can still be answered with the
//! request's sequence number), then the body by kind (see [`crate::messages`]).

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{ErrorBody, ProtocolError};
use crate::limits::{scan_json, scan_msgpack, FrameLimits};

/// The two encodings of the same schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// MessagePack with string map keys (binary WebSocket frames, QUIC stream).
    MsgPack,
    /// JSON (text WebSocket frames).
    Json,
}

/// A frame body whose schema depends on the kind; decoded lazily with [`Body::decode`].
#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    /// No body was sent; decodes as an empty map.
    Empty,
    /// A MessagePack value.
    MsgPack(rmpv::Value),
    /// A JSON value.
    Json(serde_json::Value),
}

impl Body {
    /// Decodes the body into `T`; an absent body decodes like an empty map.
    pub fn decode<T: DeserializeOwned>(&self, kind: &str) -> Result<T, ProtocolError> {
        let invalid = |reason: String| ProtocolError::InvalidBody {
            kind: kind.to_string(),
            reason,
        };
        match self {
            Body::Empty => serde_json::from_value(serde_json::Value::Object(Default::default()))
                .map_err(|e| invalid(e.to_string())),
            // rmpv's own deserializer cannot read enums sent as strings (unit variants):
            // re-encode the (small, already bounded) value and let rmp-serde read it.
            Body::MsgPack(v) => {
                if holds_bin(v) {
                    return Err(invalid(
                        "a MessagePack bin where a string is required (strings are str, §4.2)"
                            .into(),
                    ));
                }
                let bytes = rmp_serde::to_vec(v).map_err(|e| invalid(e.to_string()))?;
                rmp_serde::from_slice(&bytes).map_err(|e| invalid(e.to_string()))
            }
            Body::Json(v) => serde_json::from_value(v.clone()).map_err(|e| invalid(e.to_string())),
        }
    }
}

/// A request: from client to server (or `ping` from server to client).
#[derive(Debug, Clone, PartialEq)]
pub struct RequestFrame {
    /// The sender's sequence number; strictly increasing per connection and direction.
    pub seq: u64,
    /// What is asked (e.g. `room.join`).
    pub kind: String,
    /// Kind-specific body.
    pub body: Body,
}

/// A response: echoes the request's sequence number.
#[derive(Debug, Clone, PartialEq)]
pub struct ResponseFrame {
    /// The sequence number of the request answered (0 if the request could not be read).
    pub seq: u64,
    /// The ok body or the error.
    pub result: Result<Body, ErrorBody>,
}

/// A notification: a server push with a per-session sequence number.
#[derive(Debug, Clone, PartialEq)]
pub struct NotificationFrame {
    /// Per-session sequence number, starting at 1, without gaps; used for resume.
    pub seq: u64,
    /// What happened (e.g. `room.comment`).
    pub kind: String,
    /// Kind-specific body.
    pub body: Body,
}

/// Any decoded frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// A request.
    Request(RequestFrame),
    /// A response.
    Response(ResponseFrame),
    /// A notification.
    Notification(NotificationFrame),
}

/// A string field that MUST be a string: MessagePack `str`, never `bin` (§4.2).
struct StrictString(String);

impl<'de> Deserialize<'de> for StrictString {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = StrictString;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string (MessagePack str, not bin)")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<StrictString, E> {
                Ok(StrictString(v.to_string()))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<StrictString, E> {
                Ok(StrictString(v))
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

#[derive(Deserialize)]
#[serde(bound(deserialize = "B: Deserialize<'de>"))]
struct Envelope<B> {
    #[serde(rename = "type")]
    frame_type: StrictString,
    seq: u64,
    #[serde(default)]
    kind: Option<StrictString>,
    #[serde(default)]
    body: Option<B>,
    #[serde(default)]
    ok: Option<B>,
    #[serde(default)]
    error: Option<ErrorBody>,
}

#[derive(Serialize)]
struct OutFrame<'a, B: Serialize + ?Sized> {
    #[serde(rename = "type")]
    frame_type: &'static str,
    seq: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    kind: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    body: Option<&'a B>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ok: Option<&'a B>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a ErrorBody>,
}

fn envelope_into_frame<B>(
    env: Envelope<B>,
    wrap: impl Fn(B) -> Body,
) -> Result<Frame, ProtocolError> {
    let body = |b: Option<B>| b.map(&wrap).unwrap_or(Body::Empty);
    let kind = env.kind.map(|k| k.0);
    match env.frame_type.0.as_str() {
        "req" => Ok(Frame::Request(RequestFrame {
            seq: env.seq,
            kind: kind.ok_or_else(|| ProtocolError::Malformed("request without kind".into()))?,
            body: body(env.body),
        })),
        "res" => {
            let result = match (env.ok, env.error) {
                (_, Some(error)) => Err(error),
                (ok, None) => Ok(body(ok)),
            };
            Ok(Frame::Response(ResponseFrame {
                seq: env.seq,
                result,
            }))
        }
        "ntf" => Ok(Frame::Notification(NotificationFrame {
            seq: env.seq,
            kind: kind
                .ok_or_else(|| ProtocolError::Malformed("notification without kind".into()))?,
            body: body(env.body),
        })),
        other => Err(ProtocolError::Malformed(format!(
            "unknown frame type {other:?} (expected \"req\", \"res\" or \"ntf\")"
        ))),
    }
}

/// A frame, body or result that is not a map (§4.1).
fn not_a_map(what: &str) -> ProtocolError {
    ProtocolError::Malformed(format!(
        "a {what} must be a map (JSON object / MessagePack map)"
    ))
}

/// Whether a MessagePack value holds a `bin` anywhere (a string must be `str`, §4.2).
fn holds_bin(value: &rmpv::Value) -> bool {
    match value {
        rmpv::Value::Binary(_) => true,
        rmpv::Value::Array(items) => items.iter().any(holds_bin),
        rmpv::Value::Map(entries) => entries.iter().any(|(k, v)| holds_bin(k) || holds_bin(v)),
        _ => false,
    }
}

/// Decodes one frame, enforcing `limits` before parsing.
pub fn decode_frame(
    encoding: Encoding,
    bytes: &[u8],
    limits: &FrameLimits,
) -> Result<Frame, ProtocolError> {
    match encoding {
        Encoding::MsgPack => {
            scan_msgpack(bytes, limits)?;
            if !matches!(bytes.first(), Some(0x80..=0x8f | 0xde | 0xdf)) {
                return Err(not_a_map("frame"));
            }
            let env: Envelope<rmpv::Value> = rmp_serde::from_slice(bytes)
                .map_err(|e| ProtocolError::Malformed(e.to_string()))?;
            let is_map = |v: &Option<rmpv::Value>| v.as_ref().is_none_or(rmpv::Value::is_map);
            if !is_map(&env.body) || !is_map(&env.ok) {
                return Err(not_a_map("body"));
            }
            envelope_into_frame(env, Body::MsgPack)
        }
        Encoding::Json => {
            scan_json(bytes, limits)?;
            if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
                return Err(not_a_map("frame"));
            }
            let env: Envelope<serde_json::Value> = serde_json::from_slice(bytes)
                .map_err(|e| ProtocolError::Malformed(e.to_string()))?;
            let is_map =
                |v: &Option<serde_json::Value>| v.as_ref().is_none_or(serde_json::Value::is_object);
            if !is_map(&env.body) || !is_map(&env.ok) {
                return Err(not_a_map("body"));
            }
            envelope_into_frame(env, Body::Json)
        }
    }
}

fn encode<B: Serialize + ?Sized>(
    encoding: Encoding,
    frame: &OutFrame<'_, B>,
) -> Result<Bytes, ProtocolError> {
    match encoding {
        Encoding::MsgPack => rmp_serde::to_vec_named(frame)
            .map(Bytes::from)
            .map_err(|e| ProtocolError::Encode(e.to_string())),
        Encoding::Json => serde_json::to_vec(frame)
            .map(Bytes::from)
            .map_err(|e| ProtocolError::Encode(e.to_string())),
    }
}

/// Encodes a request frame.
pub fn encode_request<B: Serialize + ?Sized>(
    encoding: Encoding,
    seq: u64,
    kind: &str,
    body: &B,
) -> Result<Bytes, ProtocolError> {
    encode(
        encoding,
        &OutFrame {
            frame_type: "req",
            seq,
            kind: Some(kind),
            body: Some(body),
            ok: None,
            error: None,
        },
    )
}

/// Encodes a successful response frame.
pub fn encode_response_ok<B: Serialize + ?Sized>(
    encoding: Encoding,
    seq: u64,
    ok: &B,
) -> Result<Bytes, ProtocolError> {
    encode(
        encoding,
        &OutFrame {
            frame_type: "res",
            seq,
            kind: None,
            body: None,
            ok: Some(ok),
            error: None,
        },
    )
}

/// Encodes an error response frame.
pub fn encode_response_error(
    encoding: Encoding,
    seq: u64,
    error: &ErrorBody,
) -> Result<Bytes, ProtocolError> {
    encode::<()>(
        encoding,
        &OutFrame {
            frame_type: "res",
            seq,
            kind: None,
            body: None,
            ok: None,
            error: Some(error),
        },
    )
}

/// Encodes a notification frame.
pub fn encode_notification<B: Serialize + ?Sized>(
    encoding: Encoding,
    seq: u64,
    kind: &str,
    body: &B,
) -> Result<Bytes, ProtocolError> {
    encode(
        encoding,
        &OutFrame {
            frame_type: "ntf",
            seq,
            kind: Some(kind),
            body: Some(body),
            ok: None,
            error: None,
        },
    )
}

/// A notification body encoded once, framed many times with different sequence numbers.
///
/// Fan-out to N connections costs one body encoding per encoding in use plus N small
/// envelope writes, not N full serializations.
#[derive(Debug, Clone)]
pub struct EncodedBody {
    kind: &'static str,
    msgpack: Bytes,
    json: Bytes,
    /// For events in a room's total order (comments): the room and the position.
    position: Option<(std::sync::Arc<str>, u64)>,
}

impl EncodedBody {
    /// Encodes `body` in both encodings.
    pub fn new<B: Serialize + ?Sized>(kind: &'static str, body: &B) -> Result<Self, ProtocolError> {
        let msgpack =
            rmp_serde::to_vec_named(body).map_err(|e| ProtocolError::Encode(e.to_string()))?;
        let json = serde_json::to_vec(body).map_err(|e| ProtocolError::Encode(e.to_string()))?;
        Ok(EncodedBody {
            kind,
            msgpack: msgpack.into(),
            json: json.into(),
            position: None,
        })
    }

    /// Marks the body as the event at `position` in `room_id`'s total order (a comment id):
    /// receivers use it to drop what they already have and to ask for what they missed.
    pub fn with_position(mut self, room_id: &str, position: u64) -> Self {
        self.position = Some((room_id.into(), position));
        self
    }

    /// As [`Self::with_position`], naming the room by `room`: a room gives all its events
    /// the same name, so receivers tell its events apart from others' by the pointer.
    pub fn with_room_position(mut self, room: std::sync::Arc<str>, position: u64) -> Self {
        self.position = Some((room, position));
        self
    }

    /// The room and position in its total order, for ordered events.
    pub fn position(&self) -> Option<(&str, u64)> {
        self.position.as_ref().map(|(room, p)| (&**room, *p))
    }

    /// As [`Self::position`], with the room's shared name.
    pub fn room_position(&self) -> Option<(&std::sync::Arc<str>, u64)> {
        self.position.as_ref().map(|(room, p)| (room, *p))
    }

    /// Rebuilds an encoded body from its parts (as relayed between nodes). `None` if the
    /// kind is not a known notification kind.
    pub fn from_parts(kind: &str, msgpack: Bytes, json: Bytes) -> Option<Self> {
        let kind = crate::messages::Event::KINDS
            .iter()
            .copied()
            .find(|k| *k == kind)?;
        Some(EncodedBody {
            kind,
            msgpack,
            json,
            position: None,
        })
    }

    /// The notification kind.
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// The encoded body bytes (without envelope).
    pub fn body_bytes(&self, encoding: Encoding) -> &Bytes {
        match encoding {
            Encoding::MsgPack => &self.msgpack,
            Encoding::Json => &self.json,
        }
    }

    /// Approximate memory held, for queue accounting.
    pub fn size_bytes(&self) -> usize {
        self.msgpack.len() + self.json.len()
    }

    /// Frames the body as a notification with sequence number `seq`.
    pub fn frame(&self, encoding: Encoding, seq: u64) -> Bytes {
        let mut out = Vec::with_capacity(self.frame_bytes_hint(encoding));
        self.frame_into(encoding, seq, &mut out);
        out.into()
    }

    /// About how many bytes [`Self::frame`] makes (an upper bound but for huge `seq`s).
    pub fn frame_bytes_hint(&self, encoding: Encoding) -> usize {
        match encoding {
            Encoding::MsgPack => self.msgpack.len() + self.kind.len() + 32,
            Encoding::Json => self.json.len() + self.kind.len() + 48,
        }
    }

    /// Appends the notification frame with sequence number `seq` to `out` (the bytes of
    /// [`Self::frame`], written where the caller wants them, e.g. after a transport's
    /// header).
    pub fn frame_into(&self, encoding: Encoding, seq: u64, out: &mut Vec<u8>) {
        match encoding {
            Encoding::MsgPack => {
                // Writing into a Vec cannot fail.
                let _ = rmp::encode::write_map_len(out, 4);
                let _ = rmp::encode::write_str(out, "type");
                let _ = rmp::encode::write_str(out, "ntf");
                let _ = rmp::encode::write_str(out, "seq");
                let _ = rmp::encode::write_uint(out, seq);
                let _ = rmp::encode::write_str(out, "kind");
                let _ = rmp::encode::write_str(out, self.kind);
                let _ = rmp::encode::write_str(out, "body");
                out.extend_from_slice(&self.msgpack);
            }
            Encoding::Json => {
                out.extend_from_slice(b"{\"type\":\"ntf\",\"seq\":");
                // Writing into a Vec cannot fail.
                let _ = std::io::Write::write_fmt(out, format_args!("{seq}"));
                out.extend_from_slice(b",\"kind\":");
                // Kinds are static ASCII identifiers; serde_json escapes anyway.
                let _ = serde_json::to_writer(&mut *out, self.kind);
                out.extend_from_slice(b",\"body\":");
                out.extend_from_slice(&self.json);
                out.push(b'}');
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct Hello {
        text: String,
        n: u32,
    }

    /// §4.1: every frame and body is a map; §4.2: a string is never MessagePack `bin`.
    #[test]
    fn arrays_and_bin_strings_are_refused_with_their_codes() {
        let limits = FrameLimits::default();
        let code = |encoding, bytes: &[u8]| match decode_frame(encoding, bytes, &limits) {
            Ok(Frame::Request(r)) => match r.body.decode::<Hello>(&r.kind) {
                Ok(_) => 0,
                Err(e) => e.code() as u16,
            },
            Ok(_) => 0,
            Err(e) => e.code() as u16,
        };
        let good = rmp_serde::to_vec_named(&serde_json::json!({
            "type": "req", "seq": 1, "kind": "k", "body": {"text": "hi", "n": 1}
        }))
        .expect("encode");
        assert_eq!(code(Encoding::MsgPack, &good), 0);
        // The frame as an array (read by position before).
        let array = rmp_serde::to_vec(&("req", 1u64, "k", ("hi", 1u32))).expect("encode");
        assert_eq!(code(Encoding::MsgPack, &array), 1000);
        assert_eq!(
            code(Encoding::Json, br#"["req",1,"k",{"text":"hi","n":1}]"#),
            1000
        );
        // The body as an array.
        let body_array = rmp_serde::to_vec_named(&serde_json::json!({
            "type": "req", "seq": 1, "kind": "k", "body": ["hi", 1]
        }))
        .expect("encode");
        assert_eq!(code(Encoding::MsgPack, &body_array), 1000);
        assert_eq!(
            code(
                Encoding::Json,
                br#"{"type":"req","seq":1,"kind":"k","body":["hi",1]}"#
            ),
            1000
        );
        // A string sent as bin: in the body 1003, in the envelope 1000.
        let mut map = vec![0x84];
        for (k, v) in [("type", "req"), ("kind", "k")] {
            map.extend(rmp_serde::to_vec(k).expect("key"));
            map.extend(rmp_serde::to_vec(v).expect("value"));
        }
        map.extend(rmp_serde::to_vec("seq").expect("key"));
        map.push(0x01);
        map.extend(rmp_serde::to_vec("body").expect("key"));
        map.push(0x82);
        map.extend(rmp_serde::to_vec("text").expect("key"));
        map.extend([0xc4, 0x02, b'h', b'i']);
        map.extend(rmp_serde::to_vec("n").expect("key"));
        map.push(0x01);
        assert_eq!(code(Encoding::MsgPack, &map), 1003);
        let mut bin_kind = map.clone();
        // "kind": fixstr a4 "kind", then fixstr a1 "k" → bin c4 01 "k".
        let at = bin_kind
            .windows(6)
            .position(|w| w == [0xa4, b'k', b'i', b'n', b'd', 0xa1])
            .expect("kind");
        bin_kind.splice(at + 5..at + 6, [0xc4, 0x01]);
        assert_eq!(code(Encoding::MsgPack, &bin_kind), 1000);
    }

    #[test]
    fn request_round_trips_in_both_encodings() {
        for enc in [Encoding::MsgPack, Encoding::Json] {
            let body = Hello {
                text: "hi".into(),
                n: 7,
            };
            let bytes = encode_request(enc, 42, "room.comment", &body).expect("encode");
            let frame = decode_frame(enc, &bytes, &FrameLimits::default()).expect("decode");
            let Frame::Request(req) = frame else {
                panic!("not a request: {frame:?}")
            };
            assert_eq!(req.seq, 42);
            assert_eq!(req.kind, "room.comment");
            assert_eq!(
                req.body.decode::<Hello>("room.comment").expect("body"),
                body
            );
        }
    }

    #[test]
    fn error_response_round_trips() {
        for enc in [Encoding::MsgPack, Encoding::Json] {
            let err = ErrorBody::new(ErrorCode::RoomNotFound, "no such room");
            let bytes = encode_response_error(enc, 3, &err).expect("encode");
            let frame = decode_frame(enc, &bytes, &FrameLimits::default()).expect("decode");
            assert_eq!(
                frame,
                Frame::Response(ResponseFrame {
                    seq: 3,
                    result: Err(err.clone())
                })
            );
        }
    }

    #[test]
    fn prepared_notification_equals_direct_encoding() {
        let body = Hello {
            text: "x\"y".into(),
            n: 1,
        };
        let prepared = EncodedBody::new("room.comment", &body).expect("encode");
        for enc in [Encoding::MsgPack, Encoding::Json] {
            let framed = prepared.frame(enc, 9);
            let direct = encode_notification(enc, 9, "room.comment", &body).expect("encode");
            let a = decode_frame(enc, &framed, &FrameLimits::default()).expect("decode framed");
            let b = decode_frame(enc, &direct, &FrameLimits::default()).expect("decode direct");
            assert_eq!(a, b);
        }
    }

    #[test]
    fn bodies_with_enums_decode_in_both_encodings() {
        use crate::messages::{AuthResponse, ResumeOutcome};
        let body = AuthResponse {
            protocol_version: 1,
            user_id: "u".into(),
            session_id: "s".into(),
            resume: ResumeOutcome::Resync,
            notification_seq: 3,
            node: "n".into(),
            ping_interval_ms: 1,
            resume_window_ms: 2,
        };
        for enc in [Encoding::MsgPack, Encoding::Json] {
            let bytes = encode_response_ok(enc, 1, &body).expect("encode");
            let Frame::Response(ResponseFrame { result: Ok(ok), .. }) =
                decode_frame(enc, &bytes, &FrameLimits::default()).expect("decode")
            else {
                panic!("not an ok response");
            };
            assert_eq!(ok.decode::<AuthResponse>("auth").expect("body"), body);
        }
    }

    #[test]
    fn json_text_frame_is_human_writable() {
        let text = br#"{"type":"req","seq":1,"kind":"ping"}"#;
        let frame = decode_frame(Encoding::Json, text, &FrameLimits::default()).expect("decode");
        assert!(
            matches!(frame, Frame::Request(RequestFrame { seq: 1, ref kind, body: Body::Empty }) if kind == "ping")
        );
    }
}
