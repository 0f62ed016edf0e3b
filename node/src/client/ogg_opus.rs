//! Ogg Opus files (RFC 7845) for `chorus client speak` and `listen --record`: the packets
//! of a file to send, and a writer that puts received packets back into a file.
//!
//! Packets are opaque to Chorus; only their durations are read, from the TOC byte (RFC
//! 6716 §3.1), to pace sending in real time and to set granule positions when writing.

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::Path;

use ogg::writing::PacketWriteEndInfo;
use ogg::{PacketReader, PacketWriter};

use super::ClientError;

/// Opus always counts time in 48 kHz samples.
pub const OPUS_RATE_HZ: u32 = 48_000;
/// Pre-skip written into recorded files (libopus' usual encoder delay at 48 kHz): the
/// sender's own value is not relayed.
pub const RECORD_PRE_SKIP_SAMPLES: u16 = 312;
/// Audio packets per Ogg page when writing (about one second of 20 ms packets).
const PACKETS_PER_PAGE: u64 = 50;
/// Largest file `read_file` takes, in bytes (an hour of 128 kbit/s audio).
pub const OPUS_FILE_BYTES_MAX: u64 = 64 * 1024 * 1024;

fn bad_file(path: &Path, reason: impl std::fmt::Display) -> ClientError {
    ClientError::Config(format!("{}: {reason}", path.display()))
}

/// The audio of an Ogg Opus file: its header fields and packets, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpusFile {
    /// Output channels (1 or 2 for the mapping family 0 files this reads).
    pub channels: u8,
    /// Samples to drop at the start.
    pub pre_skip: u16,
    /// The encoder's input rate (informational).
    pub input_rate_hz: u32,
    /// The audio packets (the `OpusHead` and `OpusTags` packets are not among them).
    pub packets: Vec<Vec<u8>>,
}

impl OpusFile {
    /// Reads the first logical Opus stream of an Ogg file.
    ///
    /// # Errors
    ///
    /// [`ClientError::Io`] when the file cannot be read, [`ClientError::Config`] when it
    /// is not Ogg Opus (no `OpusHead`, a bad page) or is too large.
    pub fn read(path: &Path) -> Result<Self, ClientError> {
        let file = File::open(path)?;
        let size = file.metadata()?.len();
        if size > OPUS_FILE_BYTES_MAX {
            return Err(bad_file(
                path,
                format!("{size} bytes, above {OPUS_FILE_BYTES_MAX}"),
            ));
        }
        let mut reader = PacketReader::new(BufReader::new(file));
        let head = reader
            .read_packet()
            .map_err(|e| bad_file(path, e))?
            .ok_or_else(|| bad_file(path, "empty file"))?;
        let serial = head.stream_serial();
        let data = &head.data;
        if data.len() < 19 || &data[..8] != b"OpusHead" {
            return Err(bad_file(path, "not an Ogg Opus file (no OpusHead)"));
        }
        let channels = data[9];
        let pre_skip = u16::from_le_bytes([data[10], data[11]]);
        let input_rate_hz = u32::from_le_bytes([data[12], data[13], data[14], data[15]]);
        let mut packets = Vec::new();
        let mut tags_seen = false;
        while let Some(packet) = reader.read_packet().map_err(|e| bad_file(path, e))? {
            if packet.stream_serial() != serial {
                continue;
            }
            if !tags_seen {
                if !packet.data.starts_with(b"OpusTags") {
                    return Err(bad_file(path, "OpusTags missing after OpusHead"));
                }
                tags_seen = true;
                continue;
            }
            if !packet.data.is_empty() {
                packets.push(packet.data);
            }
        }
        Ok(OpusFile {
            channels,
            pre_skip,
            input_rate_hz,
            packets,
        })
    }
}

/// The duration of an Opus packet in 48 kHz samples, from its TOC byte and, for code 3,
/// its frame count byte (RFC 6716 §3.1); `None` for a packet too short to say.
pub fn packet_samples(packet: &[u8]) -> Option<u32> {
    let toc = *packet.first()?;
    let config = toc >> 3;
    // Frame size per configuration, in 48 kHz samples.
    let frame = match config {
        // SILK-only NB/MB/WB: 10, 20, 40, 60 ms.
        0..=11 => [480, 960, 1920, 2880][usize::from(config % 4)],
        // Hybrid SWB/FB: 10, 20 ms.
        12..=15 => [480, 960][usize::from(config % 2)],
        // CELT-only: 2.5, 5, 10, 20 ms.
        _ => [120, 240, 480, 960][usize::from(config % 4)],
    };
    let frames = match toc & 0x03 {
        0 => 1,
        1 | 2 => 2,
        _ => u32::from(*packet.get(1)? & 0x3f),
    };
    Some(frame * frames)
}

/// Whether the packet is stereo (the TOC's `s` bit).
pub fn packet_is_stereo(packet: &[u8]) -> bool {
    packet.first().is_some_and(|toc| toc & 0x04 != 0)
}

/// Writes packets into a new Ogg Opus file. The header is written with the first packet
/// (its channel count comes from that packet); [`OpusRecorder::finish`] ends the stream.
pub struct OpusRecorder {
    writer: PacketWriter<'static, BufWriter<File>>,
    serial: u32,
    /// The last packet, held back so that the final one can end the stream.
    held: Option<(Vec<u8>, u64)>,
    granule: u64,
    packets: u64,
    header_written: bool,
}

impl OpusRecorder {
    /// Creates (truncates) `path`.
    ///
    /// # Errors
    ///
    /// [`ClientError::Io`] when the file cannot be created.
    pub fn create(path: &Path) -> Result<Self, ClientError> {
        let file = File::create(path)?;
        Ok(OpusRecorder {
            writer: PacketWriter::new(BufWriter::new(file)),
            serial: rand::random(),
            held: None,
            granule: 0,
            packets: 0,
            header_written: false,
        })
    }

    fn write_header(&mut self, channels: u8) -> Result<(), ClientError> {
        let mut head = Vec::with_capacity(19);
        head.extend_from_slice(b"OpusHead");
        head.push(1); // version
        head.push(channels);
        head.extend_from_slice(&RECORD_PRE_SKIP_SAMPLES.to_le_bytes());
        head.extend_from_slice(&OPUS_RATE_HZ.to_le_bytes());
        head.extend_from_slice(&0i16.to_le_bytes()); // output gain
        head.push(0); // channel mapping family 0
        self.writer
            .write_packet(head, self.serial, PacketWriteEndInfo::EndPage, 0)?;
        let vendor = b"chorus";
        let mut tags = Vec::with_capacity(8 + 4 + vendor.len() + 4);
        tags.extend_from_slice(b"OpusTags");
        tags.extend_from_slice(&(vendor.len() as u32).to_le_bytes());
        tags.extend_from_slice(vendor);
        tags.extend_from_slice(&0u32.to_le_bytes()); // no comments
        self.writer
            .write_packet(tags, self.serial, PacketWriteEndInfo::EndPage, 0)?;
        self.header_written = true;
        Ok(())
    }

    /// Appends one audio packet.
    ///
    /// # Errors
    ///
    /// [`ClientError::Io`] when writing fails.
    pub fn write(&mut self, packet: &[u8]) -> Result<(), ClientError> {
        if !self.header_written {
            self.write_header(if packet_is_stereo(packet) { 2 } else { 1 })?;
        }
        self.granule += u64::from(packet_samples(packet).unwrap_or(960));
        if let Some((previous, granule)) = self.held.take() {
            self.packets += 1;
            let end = if self.packets.is_multiple_of(PACKETS_PER_PAGE) {
                PacketWriteEndInfo::EndPage
            } else {
                PacketWriteEndInfo::NormalPacket
            };
            self.writer
                .write_packet(previous, self.serial, end, granule)?;
        }
        self.held = Some((packet.to_vec(), self.granule));
        Ok(())
    }

    /// Audio packets written so far.
    pub fn packets(&self) -> u64 {
        self.packets + u64::from(self.held.is_some())
    }

    /// Ends the stream and flushes the file.
    ///
    /// # Errors
    ///
    /// [`ClientError::Io`] when writing fails.
    pub fn finish(mut self) -> Result<(), ClientError> {
        if !self.header_written {
            self.write_header(1)?;
        }
        match self.held.take() {
            Some((packet, granule)) => self.writer.write_packet(
                packet,
                self.serial,
                PacketWriteEndInfo::EndStream,
                granule,
            )?,
            // No audio: end the stream with an empty page after the headers.
            None => self.writer.write_packet(
                Vec::new(),
                self.serial,
                PacketWriteEndInfo::EndStream,
                0,
            )?,
        }
        self.writer.inner_mut().flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_durations_follow_the_toc() {
        // CELT FB 20 ms, one frame.
        assert_eq!(packet_samples(&[31 << 3]), Some(960));
        // SILK WB 60 ms, two frames (code 1).
        assert_eq!(packet_samples(&[(11 << 3) | 1]), Some(5760));
        // Hybrid FB 10 ms, code 3 with 3 frames.
        assert_eq!(packet_samples(&[(14 << 3) | 3, 3]), Some(1440));
        assert_eq!(packet_samples(&[(14 << 3) | 3]), None);
        assert_eq!(packet_samples(&[]), None);
        assert!(packet_is_stereo(&[(31 << 3) | 4]));
    }

    #[test]
    fn recorded_packets_read_back_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("out.opus");
        let packets: Vec<Vec<u8>> = (0..120u32)
            .map(|i| {
                let mut p = vec![31 << 3];
                p.extend_from_slice(&i.to_be_bytes());
                p.resize(4 + (i as usize % 300), 7);
                p
            })
            .collect();
        let mut recorder = OpusRecorder::create(&path).expect("create");
        for packet in &packets {
            recorder.write(packet).expect("write");
        }
        assert_eq!(recorder.packets(), 120);
        recorder.finish().expect("finish");
        let file = OpusFile::read(&path).expect("read");
        assert_eq!(file.channels, 1);
        assert_eq!(file.pre_skip, RECORD_PRE_SKIP_SAMPLES);
        assert_eq!(file.packets, packets);
    }

    #[test]
    fn a_file_that_is_not_ogg_opus_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x.opus");
        std::fs::write(&path, b"definitely not ogg").expect("write");
        assert!(matches!(OpusFile::read(&path), Err(ClientError::Config(_))));
        assert!(matches!(
            OpusFile::read(&dir.path().join("missing.opus")),
            Err(ClientError::Io(_))
        ));
    }
}
