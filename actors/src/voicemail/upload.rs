//! One voice message's upload (SPEC M1, M4), sans-IO: chunks at byte offsets, checked as
//! Opus in Ogg, acknowledged page by page, resumable from the acknowledged offset.
//!
//! - A chunk at the acknowledged offset or below it is taken: the part below must equal
//!   the bytes already there (a repeat is idempotent; different bytes are refused and
//!   change nothing), the rest is appended. A chunk above it is refused as out of order
//!   with the offset to continue from.
//! - Bytes are acknowledged only up to the end of the last complete, valid page: a page
//!   split over chunks waits for its end, and a page that turns out invalid is dropped
//!   with the chunk that ended it (nothing wrong is ever acknowledged or served).
//! - The server decides the status: `uploading` until the sender's last chunk ends on a
//!   page boundary with the headers read (`complete`), the sender cancels (`cancelled`),
//!   or nothing arrives for `idle_ms` (`failed`).
//! - Bounds: total bytes, duration (from the granule positions), bytes per chunk.

use serde::{Deserialize, Serialize};

use super::ogg::{OggError, OpusStream};

/// Defaults: at most 256 KiB.
pub const MESSAGE_BYTES_MAX_DEFAULT: u64 = 256 * 1024;
/// Defaults: at most 60 s of audio.
pub const MESSAGE_DURATION_MS_MAX_DEFAULT: u64 = 60_000;
/// Defaults: an upload with no chunk for 120 s fails.
pub const UPLOAD_IDLE_MS_DEFAULT: u64 = 120_000;
/// Defaults: at most 64 KiB per chunk.
pub const CHUNK_BYTES_MAX_DEFAULT: usize = 64 * 1024;

/// An upload's bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadLimits {
    /// Bytes in a message.
    pub bytes_max: u64,
    /// Audio in a message, ms.
    pub duration_ms_max: u64,
    /// Time without a chunk before the upload fails, ms.
    pub idle_ms: u64,
    /// Bytes in one chunk.
    pub chunk_bytes_max: usize,
}

impl Default for UploadLimits {
    fn default() -> Self {
        UploadLimits {
            bytes_max: MESSAGE_BYTES_MAX_DEFAULT,
            duration_ms_max: MESSAGE_DURATION_MS_MAX_DEFAULT,
            idle_ms: UPLOAD_IDLE_MS_DEFAULT,
            chunk_bytes_max: CHUNK_BYTES_MAX_DEFAULT,
        }
    }
}

/// Where an upload is (decided by the server).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UploadStatus {
    /// Chunks are arriving.
    Uploading,
    /// Every byte is here.
    Complete,
    /// Nothing arrived for too long (or the stream was refused): what was acknowledged
    /// stays playable.
    Failed,
    /// The sender cancelled.
    Cancelled,
}

impl UploadStatus {
    /// Whether the upload is over (no more bytes will come).
    pub fn is_final(self) -> bool {
        self != UploadStatus::Uploading
    }

    /// The status's snake_case name.
    pub fn name(self) -> &'static str {
        match self {
            UploadStatus::Uploading => "uploading",
            UploadStatus::Complete => "complete",
            UploadStatus::Failed => "failed",
            UploadStatus::Cancelled => "cancelled",
        }
    }
}

/// Why a chunk (or a cancel) was refused. Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkRefusal {
    /// The chunk starts past what is here: continue from `expected`.
    #[error("out of order: the upload continues at byte {expected}")]
    OutOfOrder {
        /// The acknowledged offset plus any unacknowledged page start held.
        expected: u64,
    },
    /// The chunk repeats bytes with different content.
    #[error("the chunk's bytes at {at} differ from the bytes already uploaded there")]
    Mismatch {
        /// The first differing byte.
        at: u64,
    },
    /// The message would pass its size bound.
    #[error("a voice message holds at most {max} bytes")]
    TooLarge {
        /// The bound.
        max: u64,
    },
    /// The message would pass its duration bound.
    #[error("a voice message lasts at most {max_ms} ms")]
    TooLong {
        /// The bound.
        max_ms: u64,
    },
    /// One chunk is too big.
    #[error("a chunk holds at most {max} bytes")]
    ChunkTooLarge {
        /// The bound.
        max: usize,
    },
    /// The bytes are not Opus in Ogg.
    #[error("{0}")]
    NotOpus(#[from] OggError),
    /// The last chunk does not end the stream on a page boundary, or the stream has no
    /// headers.
    #[error("the upload cannot end here: {0}")]
    Incomplete(String),
    /// The upload is over.
    #[error("the upload is {}", .0.name())]
    Over(UploadStatus),
}

/// The answer to a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkAccepted {
    /// Bytes acknowledged (resume from here).
    pub acked: u64,
    /// The status after the chunk.
    pub status: UploadStatus,
    /// Whether the acknowledged bytes grew (recipients waiting for bytes can be woken).
    pub grew: bool,
}

/// One upload. Its durable form is its acknowledged bytes and status
/// ([`Upload::restore`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upload {
    limits: UploadLimits,
    /// Acknowledged bytes: complete, valid pages.
    bytes: Vec<u8>,
    /// Bytes after them, of a page not complete yet (not acknowledged, not served).
    tail: Vec<u8>,
    stream: OpusStream,
    status: UploadStatus,
    last_chunk_ms: u64,
}

impl Upload {
    /// A new upload at `now_ms`.
    pub fn new(now_ms: u64, limits: UploadLimits) -> Self {
        Upload {
            limits,
            bytes: Vec::new(),
            tail: Vec::new(),
            stream: OpusStream::default(),
            status: UploadStatus::Uploading,
            last_chunk_ms: now_ms,
        }
    }

    /// An upload restored from its acknowledged bytes (a replica's copy), at `status`.
    ///
    /// # Errors
    ///
    /// If the bytes are not valid Opus in Ogg pages (a corrupt copy).
    pub fn restore(
        now_ms: u64,
        limits: UploadLimits,
        bytes: Vec<u8>,
        status: UploadStatus,
    ) -> Result<Self, OggError> {
        let mut stream = OpusStream::default();
        let used = stream.read(&bytes)?;
        if used != bytes.len() {
            return Err(OggError::BadPage {
                at: used as u64,
                why: "a copy ends inside a page".into(),
            });
        }
        Ok(Upload {
            limits,
            bytes,
            tail: Vec::new(),
            stream,
            status,
            last_chunk_ms: now_ms,
        })
    }

    /// Bytes acknowledged.
    pub fn acked(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// The status.
    pub fn status(&self) -> UploadStatus {
        self.status
    }

    /// Audio acknowledged so far, ms.
    pub fn duration_ms(&self) -> u64 {
        self.stream.duration_ms()
    }

    /// The acknowledged bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Acknowledged bytes from `offset`, at most `len` (empty past the end).
    pub fn read(&self, offset: u64, len: usize) -> &[u8] {
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(self.bytes.len());
        let end = start.saturating_add(len).min(self.bytes.len());
        &self.bytes[start..end]
    }

    /// Takes a chunk of `data` at `offset`, received at `now_ms`; `last` says the sender
    /// has no more.
    ///
    /// # Errors
    ///
    /// See [`ChunkRefusal`]; a refused chunk changes nothing (an invalid page also drops
    /// the unacknowledged bytes of that page).
    pub fn chunk(
        &mut self,
        now_ms: u64,
        offset: u64,
        data: &[u8],
        last: bool,
    ) -> Result<ChunkAccepted, ChunkRefusal> {
        if data.len() > self.limits.chunk_bytes_max {
            return Err(ChunkRefusal::ChunkTooLarge {
                max: self.limits.chunk_bytes_max,
            });
        }
        let acked = self.bytes.len() as u64;
        let held = acked + self.tail.len() as u64;
        let end = offset.saturating_add(data.len() as u64);
        if self.status.is_final() && end > acked {
            // Only a repeat of bytes already here is answered (below).
            return Err(ChunkRefusal::Over(self.status));
        }
        if offset > held {
            return Err(ChunkRefusal::OutOfOrder { expected: held });
        }
        // The part of the chunk below the acknowledged offset must equal what is there.
        let below = end.min(acked).saturating_sub(offset) as usize;
        for (i, &b) in data[..below].iter().enumerate() {
            let at = offset as usize + i;
            if self.bytes[at] != b {
                return Err(ChunkRefusal::Mismatch { at: at as u64 });
            }
        }
        // The rest goes over the unacknowledged tail (a resend may change it: nothing of
        // it was acknowledged), unless it only repeats part of it.
        if self.status.is_final() {
            return Ok(ChunkAccepted {
                acked,
                status: self.status,
                grew: false,
            });
        }
        let rest_start = offset.max(acked);
        let rest = &data[(rest_start - offset) as usize..];
        let kept = (rest_start - acked) as usize;
        let pending = if self.tail[kept..].starts_with(rest) {
            self.tail.clone()
        } else {
            let mut pending = self.tail[..kept].to_vec();
            pending.extend_from_slice(rest);
            pending
        };
        if acked + pending.len() as u64 > self.limits.bytes_max {
            return Err(ChunkRefusal::TooLarge {
                max: self.limits.bytes_max,
            });
        }
        // Read the pages that complete now, on a copy of the reader: only a valid result
        // is kept.
        let mut stream = self.stream.clone();
        let used = match stream.read(&pending) {
            Ok(used) => used,
            Err(error) => {
                // The page that failed was partly held unacknowledged: drop it.
                self.tail.clear();
                return Err(error.into());
            }
        };
        if stream.duration_ms() > self.limits.duration_ms_max {
            return Err(ChunkRefusal::TooLong {
                max_ms: self.limits.duration_ms_max,
            });
        }
        if last && (used != pending.len() || !stream.has_headers()) {
            return Err(ChunkRefusal::Incomplete(if stream.has_headers() {
                "the last chunk ends inside a page".into()
            } else {
                "no OpusHead and OpusTags pages".into()
            }));
        }
        self.last_chunk_ms = now_ms;
        self.stream = stream;
        let grew = used > 0;
        self.bytes.extend_from_slice(&pending[..used]);
        self.tail = pending[used..].to_vec();
        if (last || self.stream.ended) && self.tail.is_empty() && self.stream.has_headers() {
            self.status = UploadStatus::Complete;
        }
        Ok(ChunkAccepted {
            acked: self.acked(),
            status: self.status,
            grew,
        })
    }

    /// The sender cancels; whether it was uploading.
    ///
    /// # Errors
    ///
    /// [`ChunkRefusal::Over`] once the upload is over.
    pub fn cancel(&mut self) -> Result<(), ChunkRefusal> {
        if self.status.is_final() {
            return Err(ChunkRefusal::Over(self.status));
        }
        self.status = UploadStatus::Cancelled;
        self.tail.clear();
        Ok(())
    }

    /// Fails the upload if no chunk came for `idle_ms`; whether it failed now.
    pub fn tick(&mut self, now_ms: u64) -> bool {
        if self.status == UploadStatus::Uploading
            && now_ms.saturating_sub(self.last_chunk_ms) >= self.limits.idle_ms
        {
            self.status = UploadStatus::Failed;
            self.tail.clear();
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::voicemail::ogg::build_stream;

    fn message(packets: usize) -> Vec<u8> {
        let packets: Vec<Vec<u8>> = (0..packets).map(|i| vec![0xfc, i as u8, 1, 2, 3]).collect();
        build_stream(11, &packets, 5)
    }

    #[test]
    fn an_offset_at_the_end_of_the_number_range_is_out_of_order_not_a_panic() {
        let mut upload = Upload::new(0, UploadLimits::default());
        for offset in [u64::MAX, u64::MAX - 1] {
            assert_eq!(
                upload.chunk(1, offset, b"OggS", false),
                Err(ChunkRefusal::OutOfOrder { expected: 0 })
            );
        }
        assert_eq!(upload.acked(), 0);
    }

    #[test]
    fn chunks_in_order_complete_the_upload_in_any_split() {
        let bytes = message(100);
        for size in [1usize, 13, 200, 4_096] {
            let mut upload = Upload::new(0, UploadLimits::default());
            let mut offset = 0;
            let pieces: Vec<&[u8]> = bytes.chunks(size).collect();
            for (i, piece) in pieces.iter().enumerate() {
                let last = i + 1 == pieces.len();
                let accepted = upload.chunk(1, offset, piece, last).expect("chunk");
                assert!(accepted.acked <= offset + piece.len() as u64);
                offset += piece.len() as u64;
            }
            assert_eq!(upload.status(), UploadStatus::Complete);
            assert_eq!(upload.bytes(), &bytes[..]);
            assert_eq!(upload.duration_ms(), 2_000);
        }
    }

    #[test]
    fn a_resumed_upload_repeats_and_continues_and_only_whole_pages_are_acknowledged() {
        let bytes = message(40);
        let mut upload = Upload::new(0, UploadLimits::default());
        // Half a page past the headers: acknowledged up to the last whole page.
        let cut = 150;
        let first = upload.chunk(1, 0, &bytes[..cut], false).expect("chunk");
        assert!(first.acked < cut as u64);
        assert_eq!(upload.read(0, 1_000).len() as u64, first.acked);
        // The client resumes from the acknowledged offset (on any node: the copy holds
        // the acknowledged bytes); the repeat of the held tail is fine too.
        let again = upload
            .chunk(2, first.acked, &bytes[first.acked as usize..], true)
            .expect("resume");
        assert_eq!(again.status, UploadStatus::Complete);
        assert_eq!(upload.bytes(), &bytes[..]);
        // The whole message again: idempotent.
        let repeat = upload.chunk(3, 0, &bytes, true).expect("repeat");
        assert_eq!(repeat.acked, bytes.len() as u64);
        assert!(!repeat.grew);
    }

    #[test]
    fn refusals_say_why_and_change_nothing() {
        let bytes = message(40);
        let limits = UploadLimits {
            bytes_max: bytes.len() as u64 - 1,
            ..UploadLimits::default()
        };
        let mut upload = Upload::new(0, limits);
        upload.chunk(1, 0, &bytes[..100], false).expect("chunk");
        let held = upload.acked();
        assert_eq!(
            upload.chunk(1, 300, &bytes[300..400], false),
            Err(ChunkRefusal::OutOfOrder { expected: 100 })
        );
        let mut changed = bytes[..100].to_vec();
        changed[50] ^= 1;
        assert_eq!(
            upload.chunk(1, 0, &changed, false),
            Err(ChunkRefusal::Mismatch { at: 50 })
        );
        assert_eq!(
            upload.chunk(1, 100, &bytes[100..], true),
            Err(ChunkRefusal::TooLarge {
                max: bytes.len() as u64 - 1
            })
        );
        assert_eq!(upload.acked(), held);
        assert_eq!(upload.status(), UploadStatus::Uploading);
        // Not Opus at all.
        let mut other = Upload::new(0, UploadLimits::default());
        assert!(matches!(
            other.chunk(1, 0, b"ID3\x04 this is an mp3", false),
            Err(ChunkRefusal::NotOpus(_))
        ));
        assert_eq!(other.acked(), 0);
        // Ending inside a page.
        let mut early = Upload::new(0, UploadLimits::default());
        assert!(matches!(
            early.chunk(1, 0, &bytes[..bytes.len() - 3], true),
            Err(ChunkRefusal::Incomplete(_))
        ));
    }

    #[test]
    fn a_message_longer_than_its_bound_is_refused() {
        let bytes = message(100); // 2 s
        let limits = UploadLimits {
            duration_ms_max: 1_000,
            ..UploadLimits::default()
        };
        let mut upload = Upload::new(0, limits);
        let refused = upload.chunk(1, 0, &bytes, true);
        assert_eq!(refused, Err(ChunkRefusal::TooLong { max_ms: 1_000 }));
        assert_eq!(upload.acked(), 0);
    }

    #[test]
    fn the_server_decides_cancelled_and_failed() {
        let bytes = message(20);
        let mut upload = Upload::new(0, UploadLimits::default());
        upload.chunk(1, 0, &bytes[..200], false).expect("chunk");
        assert!(!upload.tick(1_000));
        upload.cancel().expect("cancel");
        assert_eq!(upload.status(), UploadStatus::Cancelled);
        assert_eq!(
            upload.chunk(2, 200, &bytes[200..], true),
            Err(ChunkRefusal::Over(UploadStatus::Cancelled))
        );
        let mut idle = Upload::new(0, UploadLimits::default());
        idle.chunk(1, 0, &bytes[..200], false).expect("chunk");
        assert!(idle.tick(1 + UPLOAD_IDLE_MS_DEFAULT));
        assert_eq!(idle.status(), UploadStatus::Failed);
        assert_eq!(idle.cancel(), Err(ChunkRefusal::Over(UploadStatus::Failed)));
        // What was acknowledged stays readable.
        assert!(!idle.read(0, 10).is_empty());
    }

    #[test]
    fn a_copy_restores_to_the_same_upload() {
        let bytes = message(30);
        let mut upload = Upload::new(0, UploadLimits::default());
        upload.chunk(1, 0, &bytes[..300], false).expect("chunk");
        let acked = upload.bytes().to_vec();
        let mut copy =
            Upload::restore(5, UploadLimits::default(), acked, upload.status()).expect("restore");
        assert_eq!(copy.acked(), upload.acked());
        copy.chunk(6, copy.acked(), &bytes[copy.acked() as usize..], true)
            .expect("continue on the copy");
        assert_eq!(copy.bytes(), &bytes[..]);
        assert!(Upload::restore(
            5,
            UploadLimits::default(),
            bytes[..50].to_vec(),
            UploadStatus::Failed
        )
        .is_err());
    }
}
