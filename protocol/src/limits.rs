//! Hard limits on frames, checked before any allocation-heavy decoding.
//!
//! The scanners here walk the raw bytes once, without allocating, and reject frames that
//! nest too deeply, claim more elements than the frame could hold, or hold more elements in
//! total than allowed. Only frames that pass are handed to serde. This is what keeps a
//! hostile peer from making the decoder recurse or allocate without bound.

use crate::error::ProtocolError;

/// Default maximum frame size in bytes (64 KiB).
pub const FRAME_BYTES_MAX_DEFAULT: usize = 64 * 1024;
/// Default maximum nesting depth of arrays/maps/objects inside one frame.
pub const NESTING_DEPTH_MAX_DEFAULT: usize = 16;
/// Default maximum number of values (scalars and containers) inside one frame.
pub const ELEMENTS_MAX_DEFAULT: usize = 16 * 1024;

/// Limits applied to every decoded frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameLimits {
    /// Maximum encoded frame size in bytes. Default 64 KiB. Larger frames are refused with
    /// `frame_too_large` before they are parsed.
    pub frame_bytes_max: usize,
    /// Maximum nesting depth of containers. Default 16.
    pub nesting_depth_max: usize,
    /// Maximum number of values in a frame. Default 16,384.
    pub elements_max: usize,
}

impl Default for FrameLimits {
    fn default() -> Self {
        FrameLimits {
            frame_bytes_max: FRAME_BYTES_MAX_DEFAULT,
            nesting_depth_max: NESTING_DEPTH_MAX_DEFAULT,
            elements_max: ELEMENTS_MAX_DEFAULT,
        }
    }
}

impl FrameLimits {
    /// Checks the size limit.
    pub fn check_size(&self, size_bytes: usize) -> Result<(), ProtocolError> {
        if size_bytes > self.frame_bytes_max {
            return Err(ProtocolError::FrameTooLarge {
                size_bytes,
                limit_bytes: self.frame_bytes_max,
            });
        }
        Ok(())
    }
}

fn too_complex(what: &str) -> ProtocolError {
    ProtocolError::FrameTooComplex(what.to_string())
}

fn truncated() -> ProtocolError {
    ProtocolError::Malformed("truncated MessagePack value".to_string())
}

/// Walks one MessagePack value occupying all of `bytes`, enforcing `limits`.
pub fn scan_msgpack(bytes: &[u8], limits: &FrameLimits) -> Result<(), ProtocolError> {
    limits.check_size(bytes.len())?;
    // Stack of "values still to read" per open container.
    let mut stack: Vec<usize> = Vec::with_capacity(limits.nesting_depth_max.min(64));
    let mut pos = 0usize;
    let mut elements = 0usize;
    let mut pending_top = 1usize; // exactly one top-level value
    loop {
        // Pop finished containers.
        while let Some(0) = stack.last() {
            stack.pop();
        }
        match stack.last_mut() {
            Some(remaining) => *remaining -= 1,
            None => {
                if pending_top == 0 {
                    break;
                }
                pending_top -= 1;
            }
        }
        elements += 1;
        if elements > limits.elements_max {
            return Err(too_complex("too many elements"));
        }
        let (_, skip, children) = msgpack_head(bytes, &mut pos)?;
        if skip > bytes.len() - pos {
            return Err(truncated());
        }
        pos += skip;
        if let Some(n) = children {
            // Every element takes at least one byte: a claim beyond the bytes left is a lie
            // that would make a decoder pre-allocate.
            if n > bytes.len() - pos {
                return Err(truncated());
            }
            if n > 0 {
                if stack.len() + 1 > limits.nesting_depth_max {
                    return Err(too_complex("nesting too deep"));
                }
                stack.push(n);
            } else if stack.len() + 1 > limits.nesting_depth_max {
                return Err(too_complex("nesting too deep"));
            }
        }
        if stack.is_empty() && pending_top == 0 {
            break;
        }
    }
    if pos != bytes.len() {
        return Err(ProtocolError::Malformed(format!(
            "{} trailing bytes after the frame",
            bytes.len() - pos
        )));
    }
    Ok(())
}

/// Reads the head of the MessagePack value at `*pos`: its marker and any length field,
/// leaving `*pos` at its payload. Returns the marker, the payload bytes that follow, and
/// for a container its number of child values (a map's keys and values both count).
/// Checks the length field is there, not that the payload is.
pub(crate) fn msgpack_head(
    bytes: &[u8],
    pos: &mut usize,
) -> Result<(u8, usize, Option<usize>), ProtocolError> {
    let marker = *bytes.get(*pos).ok_or_else(truncated)?;
    *pos += 1;
    let (skip, children): (usize, Option<usize>) = match marker {
        0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (0, None),
        0x80..=0x8f => (0, Some(2 * (marker & 0x0f) as usize)),
        0x90..=0x9f => (0, Some((marker & 0x0f) as usize)),
        0xa0..=0xbf => ((marker & 0x1f) as usize, None),
        0xc1 => {
            return Err(ProtocolError::Malformed(
                "reserved MessagePack marker 0xc1".into(),
            ))
        }
        0xc4 | 0xd9 => (read_len(bytes, pos, 1)?, None),
        0xc5 | 0xda => (read_len(bytes, pos, 2)?, None),
        0xc6 | 0xdb => (read_len(bytes, pos, 4)?, None),
        0xc7 => (read_len(bytes, pos, 1)? + 1, None),
        0xc8 => (read_len(bytes, pos, 2)? + 1, None),
        0xc9 => (read_len(bytes, pos, 4)? + 1, None),
        0xca => (4, None),
        0xcb => (8, None),
        0xcc | 0xd0 => (1, None),
        0xcd | 0xd1 => (2, None),
        0xce | 0xd2 => (4, None),
        0xcf | 0xd3 => (8, None),
        0xd4 => (2, None),
        0xd5 => (3, None),
        0xd6 => (5, None),
        0xd7 => (9, None),
        0xd8 => (17, None),
        0xdc => (0, Some(read_len(bytes, pos, 2)?)),
        0xdd => (0, Some(read_len(bytes, pos, 4)?)),
        0xde => (0, Some(2 * read_len(bytes, pos, 2)?)),
        0xdf => (0, Some(read_len(bytes, pos, 4)?.saturating_mul(2))),
    };
    Ok((marker, skip, children))
}

fn read_len(bytes: &[u8], pos: &mut usize, width: usize) -> Result<usize, ProtocolError> {
    let end = pos.checked_add(width).ok_or_else(truncated)?;
    let slice = bytes.get(*pos..end).ok_or_else(truncated)?;
    *pos = end;
    let mut value = 0usize;
    for b in slice {
        value = (value << 8) | *b as usize;
    }
    Ok(value)
}

/// Checks the nesting depth and element count of a JSON text without parsing it fully.
/// Syntax errors are left to the parser; this only bounds the work it will do.
pub fn scan_json(bytes: &[u8], limits: &FrameLimits) -> Result<(), ProtocolError> {
    limits.check_size(bytes.len())?;
    let mut depth = 0usize;
    let mut elements = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in bytes {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                elements += 1;
                if depth > limits.nesting_depth_max {
                    return Err(too_complex("nesting too deep"));
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            b',' | b':' => {
                elements += 1;
            }
            _ => {}
        }
        if elements > limits.elements_max.saturating_mul(2) {
            return Err(too_complex("too many elements"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msgpack_scan_accepts_normal_values() {
        let v = serde_json::json!({"a": [1, 2, {"b": "c"}], "d": null, "e": 1.5, "f": -3});
        let bytes = rmp_serde::to_vec_named(&v).expect("encode");
        scan_msgpack(&bytes, &FrameLimits::default()).expect("valid");
    }

    #[test]
    fn msgpack_scan_rejects_deep_nesting() {
        let mut bytes = vec![0x91u8; 40];
        bytes.push(0x01);
        let err = scan_msgpack(&bytes, &FrameLimits::default()).unwrap_err();
        assert!(matches!(err, ProtocolError::FrameTooComplex(_)), "{err}");
    }

    #[test]
    fn msgpack_scan_rejects_lying_lengths() {
        // array32 claiming 4 billion elements in a 5-byte frame
        let bytes = [0xdd, 0xff, 0xff, 0xff, 0xff];
        assert!(scan_msgpack(&bytes, &FrameLimits::default()).is_err());
        // str32 claiming more bytes than present
        let bytes = [0xdb, 0x00, 0x00, 0x10, 0x00, b'a'];
        assert!(scan_msgpack(&bytes, &FrameLimits::default()).is_err());
    }

    #[test]
    fn msgpack_scan_rejects_trailing_bytes() {
        let bytes = [0x01, 0x02];
        assert!(scan_msgpack(&bytes, &FrameLimits::default()).is_err());
        assert!(scan_msgpack(&[], &FrameLimits::default()).is_err());
    }

    #[test]
    fn json_scan_rejects_deep_nesting_but_not_brackets_in_strings() {
        let deep = "[".repeat(100) + &"]".repeat(100);
        assert!(scan_json(deep.as_bytes(), &FrameLimits::default()).is_err());
        let fine = format!("{{\"text\": \"{}\"}}", "[".repeat(100));
        scan_json(fine.as_bytes(), &FrameLimits::default()).expect("brackets in strings are text");
    }

    #[test]
    fn oversized_frames_are_refused() {
        let limits = FrameLimits {
            frame_bytes_max: 8,
            ..FrameLimits::default()
        };
        let err = scan_json(b"{\"a\": 123456}", &limits).unwrap_err();
        assert!(matches!(err, ProtocolError::FrameTooLarge { .. }));
    }
}
