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
use crate::limits::{msgpack_head, scan_json, scan_msgpack, FrameLimits};

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
    /// A MessagePack value, as its own bytes (a map or `nil`; checked when the frame was
    /// read, see [`decode_frame`]). Kept as bytes, so that reading the body is one pass
    /// into its type.
    MsgPack(Bytes),
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
            Body::MsgPack(bytes) => {
                // rmp-serde would read a `bin` as a string: no schema has one (§4.2).
                if msgpack_value_end(bytes, 0).is_none_or(|(_, bin)| bin) {
                    return Err(invalid(
                        "a MessagePack bin where a string is required (strings are str, §4.2)"
                            .into(),
                    ));
                }
                rmp_serde::from_slice(bytes).map_err(|e| invalid(e.to_string()))
            }
            Body::Json(v) => serde_json::from_value(v.clone()).map_err(|e| invalid(e.to_string())),
        }
    }

    /// The body as JSON, for printing (MessagePack converts losslessly except binary data,
    /// which becomes an array of numbers; bytes that are not one value become `null`).
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Body::Empty => serde_json::Value::Object(Default::default()),
            Body::Json(value) => value.clone(),
            Body::MsgPack(bytes) => rmpv::decode::read_value(&mut &bytes[..])
                .ok()
                .and_then(|value| serde_json::to_value(value).ok())
                .unwrap_or(serde_json::Value::Null),
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

/// Where the MessagePack value that starts at `start` ends, and whether it holds a `bin`
/// anywhere (a string must be `str`, §4.2). `None` if the bytes end first. For bytes that
/// [`scan_msgpack`] has passed; it walks without a stack (a count of values still to read).
fn msgpack_value_end(bytes: &[u8], start: usize) -> Option<(usize, bool)> {
    let mut pos = start;
    let mut to_read = 1usize;
    let mut bin = false;
    while to_read > 0 {
        to_read -= 1;
        let (marker, skip, children) = msgpack_head(bytes, &mut pos).ok()?;
        bin |= matches!(marker, 0xc4..=0xc6);
        pos = pos.checked_add(skip).filter(|end| *end <= bytes.len())?;
        to_read = to_read.checked_add(children.unwrap_or(0))?;
    }
    Some((pos, bin))
}

/// The bytes of a MessagePack frame's `body` and `ok`, each `None` when absent.
struct RawBodies<'a> {
    body: Option<&'a [u8]>,
    ok: Option<&'a [u8]>,
}

/// The bytes of the top-level fields `body` and `ok` of a MessagePack frame (a map that
/// [`scan_msgpack`] has passed).
fn msgpack_bodies(frame: &[u8]) -> Result<RawBodies<'_>, ProtocolError> {
    let malformed = || ProtocolError::Malformed("truncated MessagePack frame".into());
    let mut pos = 0;
    let entries = match msgpack_head(frame, &mut pos)? {
        (0x80..=0x8f | 0xde | 0xdf, _, Some(children)) => children / 2,
        _ => return Err(not_a_map("frame")),
    };
    let (mut body, mut ok) = (None, None);
    for _ in 0..entries {
        let mut text_at = pos;
        let (key_marker, _, _) = msgpack_head(frame, &mut text_at)?;
        let (key_end, _) = msgpack_value_end(frame, pos).ok_or_else(malformed)?;
        let (value_end, _) = msgpack_value_end(frame, key_end).ok_or_else(malformed)?;
        let value = &frame[key_end..value_end];
        // The key's text, whichever `str` encoding carries it.
        let text = match key_marker {
            0xa0..=0xbf | 0xd9..=0xdb => &frame[text_at..key_end],
            _ => &[],
        };
        match text {
            b"body" => body = Some(value),
            b"ok" => ok = Some(value),
            _ => {}
        }
        pos = value_end;
    }
    Ok(RawBodies { body, ok })
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
            // The envelope through serde (its errors, duplicate keys, strict strings), the
            // bodies as the bytes they are.
            let env: Envelope<serde::de::IgnoredAny> = rmp_serde::from_slice(bytes)
                .map_err(|e| ProtocolError::Malformed(e.to_string()))?;
            let RawBodies { body, ok } = msgpack_bodies(bytes)?;
            let as_body =
                |present: bool, raw: Option<&[u8]>| -> Result<Option<Body>, ProtocolError> {
                    match (present, raw) {
                        (false, _) | (true, Some([0xc0])) => Ok(None),
                        (true, Some(raw @ [0x80..=0x8f | 0xde | 0xdf, ..])) => {
                            Ok(Some(Body::MsgPack(Bytes::copy_from_slice(raw))))
                        }
                        (true, Some(_)) => Err(not_a_map("body")),
                        (true, None) => Err(ProtocolError::Malformed(
                            "envelope keys must be strings".into(),
                        )),
                    }
                };
            let body = as_body(env.body.is_some(), body)?;
            let ok = as_body(env.ok.is_some(), ok)?;
            envelope_into_frame(
                Envelope {
                    frame_type: env.frame_type,
                    seq: env.seq,
                    kind: env.kind,
                    body,
                    ok,
                    error: env.error,
                },
                |b| b,
            )
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

    /// The body is kept as its bytes: found whatever encodes its key and whatever comes
    /// before it, and read into its type in one pass.
    #[test]
    fn msgpack_bodies_are_found_in_any_encoding_of_the_envelope() {
        let limits = FrameLimits::default();
        let hello = |bytes: &[u8]| match decode_frame(Encoding::MsgPack, bytes, &limits) {
            Ok(Frame::Request(r)) => r.body.decode::<Hello>(&r.kind).map_err(|e| e.code()),
            Ok(other) => panic!("not a request: {other:?}"),
            Err(e) => Err(e.code()),
        };
        // 16 entries (map16), keys as str8, unknown fields of every shape before the body:
        // nested containers, ext, floats, negative integers, bin.
        let mut map = vec![0xde, 0x00, 0x0a];
        let key = |map: &mut Vec<u8>, k: &str| {
            map.extend([0xd9, k.len() as u8]);
            map.extend(k.as_bytes());
        };
        key(&mut map, "type");
        map.extend(rmp_serde::to_vec("req").expect("value"));
        key(&mut map, "seq");
        map.extend([0xcd, 0x01, 0x00]);
        key(&mut map, "kind");
        map.extend(rmp_serde::to_vec("k").expect("value"));
        key(&mut map, "x_nested");
        map.extend(
            rmp_serde::to_vec_named(&serde_json::json!({"a": [1, -2, {"b": null}], "c": 1.5}))
                .expect("nested"),
        );
        key(&mut map, "x_ext");
        map.extend([0xd6, 0x05, 1, 2, 3, 4]);
        key(&mut map, "x_ext8");
        map.extend([0xc7, 0x02, 0x07, 9, 9]);
        key(&mut map, "x_bin");
        map.extend([0xc4, 0x02, 0xff, 0xfe]);
        key(&mut map, "x_array16");
        map.extend([
            0xdc, 0x00, 0x02, 0xcb, 0, 0, 0, 0, 0, 0, 0, 0, 0xd3, 0xff, 0xff, 0xff, 0xff, 0xff,
            0xff, 0xff, 0xff,
        ]);
        key(&mut map, "x_nil");
        map.push(0xc0);
        key(&mut map, "body");
        map.extend(
            rmp_serde::to_vec_named(&Hello {
                text: "hé".into(),
                n: 9,
            })
            .expect("body"),
        );
        assert_eq!(
            hello(&map),
            Ok(Hello {
                text: "hé".into(),
                n: 9
            })
        );
        // A body of nil reads as no body; a missing required field is the body's error.
        let nil = rmp_serde::to_vec_named(&serde_json::json!({
            "type": "req", "seq": 1, "kind": "k", "body": null
        }))
        .expect("encode");
        assert_eq!(hello(&nil), Err(ErrorCode::InvalidBody));
        // A truncated body is the frame's error, not a panic.
        assert_eq!(hello(&map[..map.len() - 1]), Err(ErrorCode::MalformedFrame));
        // A response's `ok`, and its printing as JSON.
        let res = encode_response_ok(
            Encoding::MsgPack,
            3,
            &Hello {
                text: "x".into(),
                n: 1,
            },
        )
        .expect("encode");
        match decode_frame(Encoding::MsgPack, &res, &limits).expect("decode") {
            Frame::Response(ResponseFrame {
                seq: 3,
                result: Ok(body),
            }) => {
                assert_eq!(body.to_json(), serde_json::json!({"text": "x", "n": 1}));
            }
            other => panic!("not the response: {other:?}"),
        }
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
