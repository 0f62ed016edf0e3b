//! Speakers for `chorus loadgen --speakers` (R11): put on stage by the room's host, they
//! send voice frames at the real-time pace; listeners count and time what they hear.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use chorus_protocol::audio::{seq_after, AudioFrame, AudioHeader};
use chorus_protocol::{RoomInviteAnswerRequest, RoomInviteRequest};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::{connect_and_join, unix_now_us, Host, Plan, SenderFinished, Stats};
use crate::client::{Client, ClientEvent};

/// Bytes at the start of each frame's packet: a TOC byte (20 ms CELT, so the packet
/// looks like Opus) and the send time in microseconds since the epoch.
pub const FRAME_HEADER_BYTES: usize = 9;
/// The TOC byte of the generated packets.
const TOC_CELT_FB_20MS: u8 = 31 << 3;
/// Speech level the generated frames carry (-30 dBov).
const SPEECH_LEVEL: u8 = 30;

/// How speakers speak.
#[derive(Debug, Clone, Copy)]
pub struct Voice {
    /// Milliseconds per frame.
    pub frame_ms: u64,
    /// Packet bytes per frame.
    pub frame_bytes: usize,
    /// How long to speak.
    pub duration: Duration,
}

/// Connects speaker `index`, joins, and has the host invite it to the stage; `None` (an
/// error counted) if any step fails.
pub(super) async fn put_on_stage(
    plan: &Plan,
    host: &Host,
    index: usize,
    stats: &Stats,
) -> Option<Client> {
    let user = format!("lg-{}-v{index}", plan.run_id);
    let mut client = connect_and_join(plan, &user, index, stats, "speaker").await?;
    let invited = host
        .requester
        .request(RoomInviteRequest {
            room_id: plan.room_id.clone(),
            user_id: user.clone(),
        })
        .await;
    let accepted = match invited {
        Ok(_) => {
            client
                .request(RoomInviteAnswerRequest {
                    room_id: plan.room_id.clone(),
                    accept: true,
                })
                .await
        }
        Err(error) => Err(error),
    };
    match accepted {
        Ok(_) => {
            stats.speakers_joined.fetch_add(1, Ordering::Relaxed);
            Some(client)
        }
        Err(error) => {
            stats.error("speaker stage", &error);
            client.close().await;
            None
        }
    }
}

/// One speaker: waits for `start`, sends a frame every `voice.frame_ms` for
/// `voice.duration` (made-up ticks are skipped, not bursted: late audio is useless),
/// then drains its events until `stop`.
#[allow(clippy::too_many_arguments)]
pub(super) async fn speaker(
    mut client: Client,
    plan: Arc<Plan>,
    stats: Arc<Stats>,
    voice: Voice,
    start: CancellationToken,
    finish: CancellationToken,
    stop: CancellationToken,
) {
    let finished = SenderFinished(stats.clone());
    // A speaker hears the others; it does not count them.
    drop(client.take_audio());
    loop {
        tokio::select! {
            _ = finish.cancelled() => { client.close().await; return; }
            _ = start.cancelled() => break,
            event = client.next_event() => if event.is_none() { return },
        }
    }
    let period = Duration::from_millis(voice.frame_ms);
    let started = Instant::now();
    let end = started + voice.duration;
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut packet = vec![0u8; voice.frame_bytes];
    packet[0] = TOC_CELT_FB_20MS;
    let mut seq = 0u32;
    loop {
        tokio::select! {
            biased;
            _ = finish.cancelled() => break,
            _ = tick.tick() => {
                if Instant::now() >= end {
                    break;
                }
                let sent_us = unix_now_us();
                packet[1..FRAME_HEADER_BYTES].copy_from_slice(&sent_us.to_be_bytes());
                let header = AudioHeader {
                    seq,
                    timestamp_ms: (sent_us / 1_000) as u32,
                    level: SPEECH_LEVEL,
                };
                seq = seq.wrapping_add(1);
                match client.send_audio(&plan.room_id, header, &packet) {
                    Ok(true) => {
                        stats.audio_sent.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(false) => {
                        stats.errors.fetch_add(1, Ordering::Relaxed);
                        if let Ok(mut map) = stats.errors_by_kind.lock() {
                            *map.entry("speaker frame: send queue full".into()).or_insert(0) += 1;
                        }
                    }
                    Err(error) => stats.error("speaker frame", &error),
                }
            }
            event = client.next_event() => match event {
                Some(ClientEvent::Disconnected { code, reason }) => {
                    stats.disconnects.fetch_add(1, Ordering::Relaxed);
                    stats.error("speaker", &crate::client::ClientError::Closed { code, reason });
                }
                Some(ClientEvent::Closed { .. }) | None => break,
                Some(_) => {}
            },
        }
    }
    drop(finished);
    super::drain_then_close(client, &stop).await;
}

/// What one listener heard: the last sequence number per speaker (bounded by the
/// speakers on stage).
#[derive(Debug, Default)]
pub(super) struct Heard {
    last_seq: HashMap<String, u32>,
}

impl Heard {
    /// Counts a received frame, its order, and its latency from the send time it carries.
    pub(super) fn frame(&mut self, shard: usize, frame: &AudioFrame, stats: &Stats) {
        if !frame.speaker.starts_with("lg-") || frame.payload.len() < FRAME_HEADER_BYTES {
            return;
        }
        let now_us = unix_now_us();
        let mut sent = [0u8; 8];
        sent.copy_from_slice(&frame.payload[1..FRAME_HEADER_BYTES]);
        let sent_us = u64::from_be_bytes(sent);
        super::record_into(
            &stats.audio_latency_us,
            shard,
            now_us.saturating_sub(sent_us),
        );
        let tracked = self.last_seq.len();
        match self.last_seq.get_mut(&frame.speaker) {
            Some(last) => {
                if !seq_after(frame.header.seq, *last) {
                    stats.audio_order_violations.fetch_add(1, Ordering::Relaxed);
                }
                *last = frame.header.seq;
            }
            None if tracked < super::SPEAKERS_MAX as usize => {
                self.last_seq
                    .insert(frame.speaker.clone(), frame.header.seq);
            }
            None => {}
        }
        stats.audio_received.fetch_add(1, Ordering::Relaxed);
    }
}
