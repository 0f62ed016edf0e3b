//! Voice frames (SPEC R11): opaque Opus packets with a small binary header.
//!
//! Audio does not travel in the frames of [`crate::frame`]: a speaker sends each packet as
//! one QUIC datagram or one binary WebSocket message, and listeners receive them the same
//! way. Every audio message starts with [`AUDIO_MARKER`] (`0xc1`), a byte that begins no
//! MessagePack value and no JSON text, so a receiver tells audio from protocol frames by
//! its first byte. The layouts (all integers big-endian; `docs/protocol.md` §13):
//!
//! ```text
//! uplink (client → server), kind 0x01:
//!   0xc1 | 0x01 | room len (u8) | room id | seq (u32) | timestamp ms (u32) | level (u8) | opus
//! downlink (server → client), kind 0x02:
//!   0xc1 | 0x02 | room len (u8) | room id | speaker len (u8) | speaker | seq | timestamp | level | opus
//! ```
//!
//! The level is RFC 6464's: 0 to 127, the audio level in -dBov (0 is the loudest, 127
//! silence). Decoding checks every length against the bytes present: nothing a peer sends
//! can make it panic or read out of bounds.

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::ProtocolError;

/// First byte of every audio message.
pub const AUDIO_MARKER: u8 = 0xc1;
/// Largest Opus packet in one audio frame, in bytes.
pub const AUDIO_PAYLOAD_BYTES_MAX: usize = 1_000;
/// Largest downlink frame, in bytes (header with room and speaker ids, and the packet): it
/// must fit one QUIC datagram on a path with the minimum MTU (1,200 bytes).
pub const AUDIO_FRAME_BYTES_MAX: usize = 1_100;
/// Quietest level (RFC 6464: 127 is -127 dBov, silence).
pub const AUDIO_LEVEL_SILENT: u8 = 127;

/// The second byte of an audio message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum AudioKind {
    /// A speaker's packet, client to server.
    Uplink = 0x01,
    /// A relayed packet, server to listener.
    Downlink = 0x02,
}

impl AudioKind {
    fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            0x01 => Some(AudioKind::Uplink),
            0x02 => Some(AudioKind::Downlink),
            _ => None,
        }
    }
}

/// Whether `bytes` is an audio message (rather than a protocol frame).
pub fn is_audio(bytes: &[u8]) -> bool {
    bytes.first() == Some(&AUDIO_MARKER)
}

/// The per-packet header a speaker sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AudioHeader {
    /// Per speaker and room: one more for each packet, wrapping at 2^32.
    pub seq: u32,
    /// Capture time on the speaker's clock, in milliseconds (wrapping).
    pub timestamp_ms: u32,
    /// Audio level, 0 (loudest) to 127 (silence), -dBov.
    pub level: u8,
}

/// A speaker's packet as sent (kind [`AudioKind::Uplink`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AudioUplink {
    /// The room it is for.
    pub room_id: String,
    /// Sequence, time, level.
    pub header: AudioHeader,
    /// The Opus packet.
    pub payload: Bytes,
}

/// A packet with its speaker named (kind [`AudioKind::Downlink`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AudioFrame {
    /// The room.
    pub room_id: String,
    /// The speaking user.
    pub speaker: String,
    /// Sequence, time, level.
    pub header: AudioHeader,
    /// The Opus packet.
    pub payload: Bytes,
}

fn bad(reason: impl Into<String>) -> ProtocolError {
    ProtocolError::BadAudio(reason.into())
}

fn check_id(what: &str, id: &str) -> Result<u8, ProtocolError> {
    match u8::try_from(id.len()) {
        Ok(0) => Err(bad(format!("empty {what}"))),
        Ok(len) => Ok(len),
        Err(_) => Err(bad(format!("{what} longer than 255 bytes"))),
    }
}

fn check_payload(payload: &[u8]) -> Result<(), ProtocolError> {
    if payload.is_empty() {
        return Err(bad("empty Opus packet"));
    }
    if payload.len() > AUDIO_PAYLOAD_BYTES_MAX {
        return Err(bad(format!(
            "Opus packet of {} bytes exceeds {AUDIO_PAYLOAD_BYTES_MAX}",
            payload.len()
        )));
    }
    Ok(())
}

fn check_level(level: u8) -> Result<(), ProtocolError> {
    if level > AUDIO_LEVEL_SILENT {
        return Err(bad(format!("audio level {level} above 127")));
    }
    Ok(())
}

fn put_header(out: &mut BytesMut, header: &AudioHeader) {
    out.put_u32(header.seq);
    out.put_u32(header.timestamp_ms);
    out.put_u8(header.level);
}

/// Encodes a speaker's packet for `room_id`.
///
/// # Errors
///
/// [`ProtocolError::BadAudio`] for an empty or over-long room id, an empty or oversized
/// packet, or a level above 127.
pub fn encode_uplink(
    room_id: &str,
    header: AudioHeader,
    payload: &[u8],
) -> Result<Bytes, ProtocolError> {
    let room_len = check_id("room id", room_id)?;
    check_payload(payload)?;
    check_level(header.level)?;
    let mut out = BytesMut::with_capacity(3 + room_id.len() + 9 + payload.len());
    out.put_u8(AUDIO_MARKER);
    out.put_u8(AudioKind::Uplink as u8);
    out.put_u8(room_len);
    out.put_slice(room_id.as_bytes());
    put_header(&mut out, &header);
    out.put_slice(payload);
    Ok(out.freeze())
}

/// The size of the downlink frame for a packet of `payload_bytes` from `speaker` in
/// `room_id` (at most [`AUDIO_FRAME_BYTES_MAX`] may be relayed).
pub fn downlink_frame_bytes(room_id: &str, speaker: &str, payload_bytes: usize) -> usize {
    // Marker, kind, two id lengths; sequence, timestamp, level.
    4 + room_id.len() + speaker.len() + 9 + payload_bytes
}

/// Encodes a relayed packet with its speaker (kind [`AudioKind::Downlink`]).
///
/// # Errors
///
/// As [`encode_uplink`], plus a frame above [`AUDIO_FRAME_BYTES_MAX`].
pub fn encode_frame(frame: &AudioFrame) -> Result<Bytes, ProtocolError> {
    let room_len = check_id("room id", &frame.room_id)?;
    let speaker_len = check_id("speaker", &frame.speaker)?;
    check_payload(&frame.payload)?;
    check_level(frame.header.level)?;
    let size = downlink_frame_bytes(&frame.room_id, &frame.speaker, frame.payload.len());
    if size > AUDIO_FRAME_BYTES_MAX {
        return Err(bad(format!(
            "audio frame of {size} bytes exceeds {AUDIO_FRAME_BYTES_MAX}"
        )));
    }
    let mut out = BytesMut::with_capacity(size);
    out.put_u8(AUDIO_MARKER);
    out.put_u8(AudioKind::Downlink as u8);
    out.put_u8(room_len);
    out.put_slice(frame.room_id.as_bytes());
    out.put_u8(speaker_len);
    out.put_slice(frame.speaker.as_bytes());
    put_header(&mut out, &frame.header);
    out.put_slice(&frame.payload);
    Ok(out.freeze())
}

/// A cursor over an audio message that refuses to read past its end.
struct Reader<'a> {
    bytes: &'a Bytes,
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, len: usize, what: &str) -> Result<&[u8], ProtocolError> {
        let end = self
            .at
            .checked_add(len)
            .filter(|end| *end <= self.bytes.len())
            .ok_or_else(|| bad(format!("audio message ends inside its {what}")))?;
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }

    fn u8(&mut self, what: &str) -> Result<u8, ProtocolError> {
        Ok(self.take(1, what)?[0])
    }

    fn u32(&mut self, what: &str) -> Result<u32, ProtocolError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn id(&mut self, what: &str) -> Result<String, ProtocolError> {
        let len = usize::from(self.u8(what)?);
        if len == 0 {
            return Err(bad(format!("empty {what}")));
        }
        let raw = self.take(len, what)?;
        std::str::from_utf8(raw)
            .map(str::to_string)
            .map_err(|_| bad(format!("{what} is not UTF-8")))
    }

    fn header(&mut self) -> Result<AudioHeader, ProtocolError> {
        let seq = self.u32("sequence")?;
        let timestamp_ms = self.u32("timestamp")?;
        let level = self.u8("level")?;
        check_level(level)?;
        Ok(AudioHeader {
            seq,
            timestamp_ms,
            level,
        })
    }

    fn payload(self) -> Result<Bytes, ProtocolError> {
        let payload = self.bytes.slice(self.at..);
        check_payload(&payload)?;
        Ok(payload)
    }
}

fn start(bytes: &Bytes) -> Result<(AudioKind, Reader<'_>), ProtocolError> {
    let mut reader = Reader { bytes, at: 0 };
    if reader.u8("marker")? != AUDIO_MARKER {
        return Err(bad("not an audio message (first byte is not 0xc1)"));
    }
    let kind_byte = reader.u8("kind")?;
    let kind = AudioKind::from_byte(kind_byte)
        .ok_or_else(|| bad(format!("unknown audio kind 0x{kind_byte:02x}")))?;
    Ok((kind, reader))
}

/// Decodes a speaker's packet (kind [`AudioKind::Uplink`]). The payload shares `bytes`.
///
/// # Errors
///
/// [`ProtocolError::BadAudio`] for any other kind or a malformed message.
pub fn decode_uplink(bytes: &Bytes) -> Result<AudioUplink, ProtocolError> {
    let (kind, mut reader) = start(bytes)?;
    if kind != AudioKind::Uplink {
        return Err(bad(format!(
            "expected an uplink audio packet (kind 0x01), got {kind:?}"
        )));
    }
    let room_id = reader.id("room id")?;
    let header = reader.header()?;
    let payload = reader.payload()?;
    Ok(AudioUplink {
        room_id,
        header,
        payload,
    })
}

/// Decodes a relayed packet with its speaker (kind [`AudioKind::Downlink`]). The payload
/// shares `bytes`.
///
/// # Errors
///
/// [`ProtocolError::BadAudio`] for an uplink packet or a malformed message.
pub fn decode_frame(bytes: &Bytes) -> Result<AudioFrame, ProtocolError> {
    let (kind, mut reader) = start(bytes)?;
    if kind == AudioKind::Uplink {
        return Err(bad("expected a relayed audio frame, got an uplink packet"));
    }
    let room_id = reader.id("room id")?;
    let speaker = reader.id("speaker")?;
    let header = reader.header()?;
    let payload = reader.payload()?;
    Ok(AudioFrame {
        room_id,
        speaker,
        header,
        payload,
    })
}

/// Whether sequence number `seq` comes after `last` (serial number arithmetic, RFC 1982:
/// less than 2^31 ahead, wrapping).
pub fn seq_after(seq: u32, last: u32) -> bool {
    let ahead = seq.wrapping_sub(last);
    ahead != 0 && ahead < 1 << 31
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> AudioHeader {
        AudioHeader {
            seq: 7,
            timestamp_ms: 123_456,
            level: 30,
        }
    }

    #[test]
    fn uplink_round_trips() {
        let bytes = encode_uplink("r-1", header(), b"opus!").expect("encode");
        assert!(is_audio(&bytes));
        let decoded = decode_uplink(&bytes).expect("decode");
        assert_eq!(decoded.room_id, "r-1");
        assert_eq!(decoded.header, header());
        assert_eq!(&decoded.payload[..], b"opus!");
        assert!(decode_frame(&bytes).is_err());
    }

    #[test]
    fn downlink_round_trips() {
        let frame = AudioFrame {
            room_id: "r-1".into(),
            speaker: "alice".into(),
            header: header(),
            payload: Bytes::from_static(b"\x78\x01\x02"),
        };
        let bytes = encode_frame(&frame).expect("encode");
        assert_eq!(decode_frame(&bytes).expect("decode"), frame);
        assert!(decode_uplink(&bytes).is_err());
    }

    #[test]
    fn bad_messages_are_refused_never_panicked_on() {
        let good = encode_uplink("room", header(), b"x").expect("encode");
        // Every truncation is refused.
        for len in 0..good.len() {
            assert!(decode_uplink(&good.slice(..len)).is_err(), "len {len}");
        }
        let cases: Vec<Vec<u8>> = vec![
            vec![0x81, 0x01, 1, b'r'],
            vec![AUDIO_MARKER, 0x09, 1, b'r'],
            vec![AUDIO_MARKER, 0x01, 0, 0, 0, 0, 1, 0, 0, 0, 1, 3, b'x'],
            vec![AUDIO_MARKER, 0x01, 200, b'r'],
            vec![AUDIO_MARKER, 0x01, 1, 0xff, 0, 0, 0, 1, 0, 0, 0, 1, 3, b'x'],
            vec![
                AUDIO_MARKER,
                0x01,
                1,
                b'r',
                0,
                0,
                0,
                1,
                0,
                0,
                0,
                1,
                200,
                b'x',
            ],
        ];
        for case in cases {
            assert!(
                decode_uplink(&Bytes::from(case.clone())).is_err(),
                "{case:?}"
            );
            assert!(
                decode_frame(&Bytes::from(case.clone())).is_err(),
                "{case:?}"
            );
        }
        let big = vec![0u8; AUDIO_PAYLOAD_BYTES_MAX + 1];
        assert!(encode_uplink("room", header(), &big).is_err());
        assert!(encode_uplink("", header(), b"x").is_err());
        assert!(encode_uplink(&"r".repeat(256), header(), b"x").is_err());
        let mut loud = header();
        loud.level = 128;
        assert!(encode_uplink("room", loud, b"x").is_err());
        // A frame whose ids and packet together would not fit a datagram.
        let frame = AudioFrame {
            room_id: "r".repeat(255),
            speaker: "s".repeat(255),
            header: header(),
            payload: Bytes::from(vec![1u8; AUDIO_PAYLOAD_BYTES_MAX]),
        };
        assert!(encode_frame(&frame).is_err());
    }

    #[test]
    fn sequence_numbers_compare_across_the_wrap() {
        assert!(seq_after(1, 0));
        assert!(!seq_after(0, 0));
        assert!(!seq_after(0, 1));
        assert!(seq_after(0, u32::MAX));
        assert!(seq_after(5, u32::MAX - 5));
        assert!(!seq_after(u32::MAX - 5, 5));
    }
}
