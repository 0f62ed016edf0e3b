//! Checking Opus-in-Ogg as it arrives (RFC 3533 pages, RFC 7845 Opus mapping), page by
//! page, without decoding audio.
//!
//! A page is `OggS`, version 0, a header-type byte (continued 0x01, first 0x02, last
//! 0x04), a 64-bit granule position, the stream serial, the page sequence, a CRC-32 over
//! the page (with its own field zeroed), the segment count and table, then the payload.
//! The stream must be one logical Opus stream: the first page starts with `OpusHead`
//! (version 1, 1 or 2 channels) and is the only one flagged first; the next starts with
//! `OpusTags`; every page has the same serial and the next sequence number; nothing follows
//! a page flagged last. The duration is the last granule position minus the pre-skip, at
//! 48 kHz.

/// Bytes of a page header before the segment table.
pub const PAGE_HEADER_BYTES: usize = 27;
/// The largest page: header, 255 segment sizes, 255 segments of 255 bytes.
pub const PAGE_BYTES_MAX: usize = PAGE_HEADER_BYTES + 255 + 255 * 255;

const FLAG_CONTINUED: u8 = 0x01;
const FLAG_FIRST: u8 = 0x02;
const FLAG_LAST: u8 = 0x04;

/// Why bytes are not Opus in Ogg.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OggError {
    /// Not a page where one must start.
    #[error("no Ogg page at byte {0} (expected \"OggS\")")]
    NoPage(u64),
    /// A page's header is not one this reader takes.
    #[error("bad Ogg page at byte {at}: {why}")]
    BadPage {
        /// Where the page starts.
        at: u64,
        /// What is wrong.
        why: String,
    },
    /// The CRC does not match: the page is corrupt.
    #[error("Ogg page at byte {0} fails its CRC")]
    Crc(u64),
    /// The stream is not Opus as RFC 7845 maps it.
    #[error("not an Opus stream: {0}")]
    NotOpus(String),
}

/// The Ogg CRC-32 (polynomial 0x04c11db7, not reflected, initial value 0).
fn crc32(bytes: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut table = [0u32; 256];
        for (i, entry) in table.iter_mut().enumerate() {
            let mut r = (i as u32) << 24;
            for _ in 0..8 {
                r = if r & 0x8000_0000 != 0 {
                    (r << 1) ^ 0x04c1_1db7
                } else {
                    r << 1
                };
            }
            *entry = r;
        }
        table
    });
    bytes.iter().fold(0u32, |crc, &b| {
        (crc << 8) ^ table[(((crc >> 24) as u8) ^ b) as usize]
    })
}

/// A page header as read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Page {
    flags: u8,
    granule: u64,
    serial: u32,
    sequence: u32,
    /// Header and payload.
    len: usize,
    header_len: usize,
}

/// Reads the page at the start of `bytes` (which starts at stream offset `at`): `Ok(None)`
/// if it is not complete yet; an error as soon as what is there cannot be a page.
fn read_page(bytes: &[u8], at: u64) -> Result<Option<Page>, OggError> {
    let have = bytes.len().min(4);
    if bytes[..have] != b"OggS"[..have] {
        return Err(OggError::NoPage(at));
    }
    if bytes.len() < PAGE_HEADER_BYTES {
        if bytes.len() > 4 && bytes[4] != 0 {
            return Err(OggError::BadPage {
                at,
                why: format!("version {}", bytes[4]),
            });
        }
        return Ok(None);
    }
    if bytes[4] != 0 {
        return Err(OggError::BadPage {
            at,
            why: format!("version {}", bytes[4]),
        });
    }
    let flags = bytes[5];
    if flags & !(FLAG_CONTINUED | FLAG_FIRST | FLAG_LAST) != 0 {
        return Err(OggError::BadPage {
            at,
            why: format!("header type {flags:#04x}"),
        });
    }
    let u32_at =
        |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    let granule = u64::from_le_bytes(bytes[6..14].try_into().unwrap_or([0; 8]));
    let serial = u32_at(14);
    let sequence = u32_at(18);
    let crc = u32_at(22);
    let segments = usize::from(bytes[26]);
    let header_len = PAGE_HEADER_BYTES + segments;
    if bytes.len() < header_len {
        return Ok(None);
    }
    let payload: usize = bytes[PAGE_HEADER_BYTES..header_len]
        .iter()
        .map(|&s| usize::from(s))
        .sum();
    let len = header_len + payload;
    if bytes.len() < len {
        return Ok(None);
    }
    let mut page = bytes[..len].to_vec();
    page[22..26].fill(0);
    if crc32(&page) != crc {
        return Err(OggError::Crc(at));
    }
    Ok(Some(Page {
        flags,
        granule,
        serial,
        sequence,
        len,
        header_len,
    }))
}

/// What the stream read so far says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpusStream {
    /// Complete, valid pages read.
    pub pages: u32,
    /// Bytes of those pages (the stream's valid prefix).
    pub bytes: u64,
    /// Channels (from `OpusHead`).
    pub channels: u8,
    /// Samples at 48 kHz to drop at the start (from `OpusHead`).
    pub pre_skip: u16,
    /// The last granule position seen.
    pub granule: u64,
    /// The page flagged last was read.
    pub ended: bool,
    serial: u32,
}

impl OpusStream {
    /// The audio's duration so far, ms.
    pub fn duration_ms(&self) -> u64 {
        self.granule.saturating_sub(u64::from(self.pre_skip)) / 48
    }

    /// Whether the headers (`OpusHead`, `OpusTags`) were read: the stream can carry audio.
    pub fn has_headers(&self) -> bool {
        self.pages >= 2
    }

    /// Reads the complete pages at the start of `bytes` (the stream after [`Self::bytes`]),
    /// returning how many bytes they take; a partial page at the end is left for later.
    ///
    /// # Errors
    ///
    /// The first page that is not valid Opus in Ogg; the pages before it were read.
    pub fn read(&mut self, bytes: &[u8]) -> Result<usize, OggError> {
        let mut used = 0;
        while used < bytes.len() {
            let at = self.bytes;
            let Some(page) = read_page(&bytes[used..], at)? else {
                break;
            };
            let payload = &bytes[used + page.header_len..used + page.len];
            self.check(&page, payload, at)?;
            self.pages += 1;
            self.bytes += page.len as u64;
            used += page.len;
        }
        Ok(used)
    }

    fn check(&mut self, page: &Page, payload: &[u8], at: u64) -> Result<(), OggError> {
        let bad = |why: String| OggError::BadPage { at, why };
        if self.ended {
            return Err(bad("a page after the last page".into()));
        }
        let first = page.flags & FLAG_FIRST != 0;
        match self.pages {
            0 => {
                if !first {
                    return Err(OggError::NotOpus(
                        "the first page is not flagged first".into(),
                    ));
                }
                if payload.len() < 19 || &payload[..8] != b"OpusHead" {
                    return Err(OggError::NotOpus(
                        "the first page is not an OpusHead".into(),
                    ));
                }
                if payload[8] != 1 {
                    return Err(OggError::NotOpus(format!(
                        "OpusHead version {}",
                        payload[8]
                    )));
                }
                let channels = payload[9];
                if !(1..=2).contains(&channels) {
                    return Err(OggError::NotOpus(format!("{channels} channels (1 or 2)")));
                }
                self.channels = channels;
                self.pre_skip = u16::from_le_bytes([payload[10], payload[11]]);
                self.serial = page.serial;
                if page.sequence != 0 {
                    return Err(bad(format!("first page numbered {}", page.sequence)));
                }
            }
            n => {
                if first {
                    return Err(bad("a second page flagged first".into()));
                }
                if page.serial != self.serial {
                    return Err(OggError::NotOpus("more than one logical stream".into()));
                }
                if page.sequence != n {
                    return Err(bad(format!("page {} where {n} was due", page.sequence)));
                }
                if n == 1 && (payload.len() < 8 || &payload[..8] != b"OpusTags") {
                    return Err(OggError::NotOpus("the second page is not OpusTags".into()));
                }
            }
        }
        // -1 (all ones) means no packet ends on the page.
        if page.granule != u64::MAX && self.pages >= 2 {
            if page.granule < self.granule {
                return Err(bad("the granule position went back".into()));
            }
            self.granule = page.granule;
        }
        self.ended = page.flags & FLAG_LAST != 0;
        Ok(())
    }
}

/// Builds Opus-in-Ogg bytes: a head, tags, and audio pages of `packets` (each a packet of
/// 20 ms). For tests and the load generator: the packets need not be real Opus.
pub fn build_stream(serial: u32, packets: &[Vec<u8>], packets_per_page: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut sequence = 0u32;
    let mut page = |out: &mut Vec<u8>, flags: u8, granule: u64, packets: &[&[u8]]| {
        let mut table = Vec::new();
        for packet in packets {
            let mut left = packet.len();
            loop {
                let n = left.min(255);
                table.push(n as u8);
                left -= n;
                if n < 255 {
                    break;
                }
            }
        }
        let start = out.len();
        out.extend_from_slice(b"OggS");
        out.push(0);
        out.push(flags);
        out.extend_from_slice(&granule.to_le_bytes());
        out.extend_from_slice(&serial.to_le_bytes());
        out.extend_from_slice(&sequence.to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        out.push(table.len() as u8);
        out.extend_from_slice(&table);
        for packet in packets {
            out.extend_from_slice(packet);
        }
        let crc = crc32(&out[start..]);
        out[start + 22..start + 26].copy_from_slice(&crc.to_le_bytes());
        sequence += 1;
    };
    let pre_skip: u16 = 312;
    let mut head = b"OpusHead".to_vec();
    head.extend_from_slice(&[1, 1]);
    head.extend_from_slice(&pre_skip.to_le_bytes());
    head.extend_from_slice(&48_000u32.to_le_bytes());
    head.extend_from_slice(&[0, 0, 0]);
    page(&mut out, FLAG_FIRST, 0, &[&head]);
    let mut tags = b"OpusTags".to_vec();
    tags.extend_from_slice(&6u32.to_le_bytes());
    tags.extend_from_slice(b"chorus");
    tags.extend_from_slice(&0u32.to_le_bytes());
    page(&mut out, 0, 0, &[&tags]);
    let chunks: Vec<&[Vec<u8>]> = packets.chunks(packets_per_page.max(1)).collect();
    let mut granule = u64::from(pre_skip);
    for (i, chunk) in chunks.iter().enumerate() {
        granule += 960 * chunk.len() as u64;
        let flags = if i + 1 == chunks.len() { FLAG_LAST } else { 0 };
        let refs: Vec<&[u8]> = chunk.iter().map(Vec::as_slice).collect();
        page(&mut out, flags, granule, &refs);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packets(n: usize) -> Vec<Vec<u8>> {
        (0..n).map(|i| vec![0xfc, i as u8, 7, 7, 7]).collect()
    }

    #[test]
    fn a_built_stream_reads_whole_and_says_its_duration() {
        let bytes = build_stream(7, &packets(50), 10);
        let mut stream = OpusStream::default();
        assert_eq!(stream.read(&bytes), Ok(bytes.len()));
        assert_eq!(stream.pages, 7);
        assert!(stream.ended);
        assert_eq!(stream.duration_ms(), 1_000);
        assert_eq!(stream.channels, 1);
    }

    #[test]
    fn pages_are_read_as_they_complete_in_any_chunking() {
        let bytes = build_stream(7, &packets(30), 3);
        for chunk in [1usize, 7, 100, 4_096] {
            let mut stream = OpusStream::default();
            let mut pending: Vec<u8> = Vec::new();
            for piece in bytes.chunks(chunk) {
                pending.extend_from_slice(piece);
                let used = stream.read(&pending).expect("valid");
                pending.drain(..used);
            }
            assert!(pending.is_empty());
            assert_eq!(stream.bytes, bytes.len() as u64);
            assert_eq!(stream.duration_ms(), 600);
        }
    }

    #[test]
    fn corrupt_or_foreign_bytes_are_refused() {
        let bytes = build_stream(7, &packets(10), 5);
        // A flipped payload byte fails the CRC.
        let mut corrupt = bytes.clone();
        let last = corrupt.len() - 1;
        corrupt[last] ^= 0xff;
        let mut stream = OpusStream::default();
        assert!(matches!(stream.read(&corrupt), Err(OggError::Crc(_))));
        // Not Ogg at all.
        let mut stream = OpusStream::default();
        assert_eq!(stream.read(b"RIFF1234WAVE"), Err(OggError::NoPage(0)));
        // Ogg, but not Opus (a Vorbis head).
        let mut vorbis = bytes.clone();
        vorbis[28..36].copy_from_slice(b"\x01vorbis\x00");
        let mut stream = OpusStream::default();
        assert!(stream.read(&vorbis).is_err());
        // A page after the last one.
        let mut twice = bytes.clone();
        twice.extend_from_slice(&bytes);
        let mut stream = OpusStream::default();
        assert!(matches!(stream.read(&twice), Err(OggError::BadPage { .. })));
    }

    /// A file `opusenc` wrote (1 s of a 440 Hz tone at 6 kbit/s): the reader takes real
    /// encoder output, CRCs included.
    #[test]
    fn a_file_from_opusenc_reads_whole() {
        let bytes = include_bytes!("testdata/sine-1s.opus");
        let mut stream = OpusStream::default();
        assert_eq!(stream.read(bytes), Ok(bytes.len()));
        assert!(stream.ended);
        assert_eq!(stream.duration_ms(), 1_000);
    }

    #[test]
    fn the_crc_is_the_ogg_one() {
        // "OggS" alone, by the reference algorithm (computed independently).
        assert_eq!(crc32(b""), 0);
        assert_eq!(crc32(&[0x01]), 0x04c1_1db7);
    }
}
