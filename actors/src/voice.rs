//! Voice bookkeeping of a room (SPEC R11), sans-IO: which packets to relay in order, and
//! who is speaking.
//!
//! The room's owner sees every packet its speakers send. [`VoiceState::accept`] passes a
//! packet when it comes after the speaker's previous one (per-speaker sequence order; a
//! late or repeated packet is dropped, and a speaker silent for [`VoiceConfig::
//! stream_restart_ms`] may start over at any sequence number, e.g. after reconnecting).
//! Levels feed the active-speaker list, which [`VoiceState::evaluate`] recomputes at most
//! once per [`VoiceConfig::active_speakers_interval_ms`] and reports only when it changed.

use std::collections::BTreeMap;

use chorus_protocol::audio::{seq_after, AudioHeader};
use chorus_protocol::{ActiveSpeaker, UserId};

/// Voice limits and timings. Every field has its unit last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct VoiceConfig {
    /// Least time between two active-speaker announcements. Default 300 ("at most a few
    /// times a second").
    pub active_speakers_interval_ms: u64,
    /// Speakers named in one announcement, loudest first. Default 4.
    pub active_speakers_max: usize,
    /// A packet at this level or louder (RFC 6464 -dBov: lower is louder) counts as
    /// speech. Default 60 (-60 dBov).
    pub speaking_level_max: u8,
    /// A speaker stays active this long after its last speech packet. Default 600.
    pub speaking_hold_ms: u64,
    /// A speaker silent this long may restart its sequence numbers. Default 2,000.
    pub stream_restart_ms: u64,
    /// A speaker silent this long is forgotten. Default 10,000.
    pub speaker_forget_ms: u64,
}

impl Default for VoiceConfig {
    fn default() -> Self {
        VoiceConfig {
            active_speakers_interval_ms: 300,
            active_speakers_max: 4,
            speaking_level_max: 60,
            speaking_hold_ms: 600,
            stream_restart_ms: 2_000,
            speaker_forget_ms: 10_000,
        }
    }
}

/// One speaker's stream as the room saw it.
#[derive(Debug, Clone, Copy)]
struct Track {
    last_seq: u32,
    last_at_ms: u64,
    /// Latest speech packet (level at or below `speaking_level_max`), and its level.
    spoke_at_ms: Option<u64>,
    spoke_level: u8,
}

/// Why a packet was not relayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AudioDrop {
    /// The room is not live.
    NotLive,
    /// The sender is not in the room.
    NotInRoom,
    /// The sender is a listener (not on stage).
    NotOnStage,
    /// The sender is muted.
    Muted,
    /// The packet does not come after the speaker's previous one.
    OutOfOrder,
    /// The room tracks as many speakers as it can.
    TooManySpeakers,
}

impl AudioDrop {
    /// A short label (for metrics).
    pub fn label(self) -> &'static str {
        match self {
            AudioDrop::NotLive => "not_live",
            AudioDrop::NotInRoom => "not_in_room",
            AudioDrop::NotOnStage => "not_on_stage",
            AudioDrop::Muted => "muted",
            AudioDrop::OutOfOrder => "out_of_order",
            AudioDrop::TooManySpeakers => "too_many_speakers",
        }
    }
}

/// Per-room voice state. Not durable: a new owner starts with none.
#[derive(Debug, Clone, Default)]
pub struct VoiceState {
    /// At most `tracks_max` (given to [`Self::accept`]) entries.
    tracks: BTreeMap<UserId, Track>,
    announced: Vec<UserId>,
    evaluated_at_ms: Option<u64>,
}

impl VoiceState {
    /// Whether to relay a packet from `speaker` (already checked to be allowed to speak)
    /// received at `now_ms`; records it if so. At most `tracks_max` speakers are tracked
    /// (the stage's size), so the state stays bounded.
    pub fn accept(
        &mut self,
        config: &VoiceConfig,
        now_ms: u64,
        speaker: &str,
        header: &AudioHeader,
        tracks_max: usize,
    ) -> Result<(), AudioDrop> {
        let speech = header.level <= config.speaking_level_max;
        match self.tracks.get_mut(speaker) {
            Some(track) => {
                let restarted = now_ms.saturating_sub(track.last_at_ms) >= config.stream_restart_ms;
                if !restarted && !seq_after(header.seq, track.last_seq) {
                    return Err(AudioDrop::OutOfOrder);
                }
                track.last_seq = header.seq;
                track.last_at_ms = now_ms;
                if speech {
                    track.spoke_at_ms = Some(now_ms);
                    track.spoke_level = header.level;
                }
            }
            None => {
                if self.tracks.len() >= tracks_max {
                    self.forget_silent(config, now_ms);
                    if self.tracks.len() >= tracks_max {
                        return Err(AudioDrop::TooManySpeakers);
                    }
                }
                self.tracks.insert(
                    speaker.to_string(),
                    Track {
                        last_seq: header.seq,
                        last_at_ms: now_ms,
                        spoke_at_ms: speech.then_some(now_ms),
                        spoke_level: header.level,
                    },
                );
            }
        }
        Ok(())
    }

    fn forget_silent(&mut self, config: &VoiceConfig, now_ms: u64) {
        self.tracks
            .retain(|_, t| now_ms.saturating_sub(t.last_at_ms) < config.speaker_forget_ms);
    }

    /// When [`Self::evaluate`] should run next; `None` while no one speaks or was
    /// announced.
    pub fn next_deadline_ms(&self, config: &VoiceConfig) -> Option<u64> {
        if self.tracks.is_empty() && self.announced.is_empty() {
            return None;
        }
        Some(
            self.evaluated_at_ms
                .map_or(0, |at| at + config.active_speakers_interval_ms),
        )
    }

    /// Recomputes the active speakers among those `may_speak` allows (on stage and not
    /// muted, now); returns the new list, loudest first, if it differs from the last one
    /// announced. Runs at most once per interval (earlier calls return `None`).
    pub fn evaluate(
        &mut self,
        config: &VoiceConfig,
        now_ms: u64,
        may_speak: impl Fn(&str) -> bool,
    ) -> Option<Vec<ActiveSpeaker>> {
        if let Some(at) = self.evaluated_at_ms {
            if now_ms < at + config.active_speakers_interval_ms {
                return None;
            }
        }
        self.evaluated_at_ms = Some(now_ms);
        self.forget_silent(config, now_ms);
        let mut active: Vec<ActiveSpeaker> = self
            .tracks
            .iter()
            .filter(|(user, track)| {
                track
                    .spoke_at_ms
                    .is_some_and(|at| now_ms.saturating_sub(at) < config.speaking_hold_ms)
                    && may_speak(user)
            })
            .map(|(user, track)| ActiveSpeaker {
                user_id: user.clone(),
                level: track.spoke_level,
            })
            .collect();
        active.sort_by(|a, b| {
            a.level
                .cmp(&b.level)
                .then_with(|| a.user_id.cmp(&b.user_id))
        });
        active.truncate(config.active_speakers_max);
        let names: Vec<UserId> = active.iter().map(|s| s.user_id.clone()).collect();
        if self.tracks.is_empty() && names.is_empty() {
            // Nothing left to watch: stop ticking until someone speaks again.
            self.evaluated_at_ms = None;
        }
        if names == self.announced {
            return None;
        }
        self.announced = names;
        Some(active)
    }

    /// Speakers currently tracked (bounded by the stage's size).
    pub fn tracked(&self) -> usize {
        self.tracks.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(seq: u32, level: u8) -> AudioHeader {
        AudioHeader {
            seq,
            timestamp_ms: seq.wrapping_mul(20),
            level,
        }
    }

    #[test]
    fn packets_pass_in_sequence_order_only() {
        let config = VoiceConfig::default();
        let mut voice = VoiceState::default();
        assert_eq!(voice.accept(&config, 0, "a", &header(1, 30), 4), Ok(()));
        assert_eq!(voice.accept(&config, 20, "a", &header(3, 30), 4), Ok(()));
        // Late and repeated packets are dropped.
        assert_eq!(
            voice.accept(&config, 40, "a", &header(2, 30), 4),
            Err(AudioDrop::OutOfOrder)
        );
        assert_eq!(
            voice.accept(&config, 40, "a", &header(3, 30), 4),
            Err(AudioDrop::OutOfOrder)
        );
        // Another speaker has its own order.
        assert_eq!(voice.accept(&config, 40, "b", &header(1, 30), 4), Ok(()));
        // After a pause a speaker may start over.
        assert_eq!(voice.accept(&config, 5_000, "a", &header(0, 30), 4), Ok(()));
        // Sequence numbers wrap.
        assert_eq!(
            voice.accept(&config, 10_000, "c", &header(u32::MAX, 30), 4),
            Ok(())
        );
        assert_eq!(
            voice.accept(&config, 10_020, "c", &header(0, 30), 4),
            Ok(())
        );
    }

    #[test]
    fn the_tracked_speakers_are_bounded() {
        let config = VoiceConfig::default();
        let mut voice = VoiceState::default();
        assert_eq!(voice.accept(&config, 0, "a", &header(1, 30), 2), Ok(()));
        assert_eq!(voice.accept(&config, 0, "b", &header(1, 30), 2), Ok(()));
        assert_eq!(
            voice.accept(&config, 0, "c", &header(1, 30), 2),
            Err(AudioDrop::TooManySpeakers)
        );
        // Once the others fall silent long enough, a new speaker gets a track.
        assert_eq!(
            voice.accept(&config, 20_000, "c", &header(1, 30), 2),
            Ok(())
        );
        assert_eq!(voice.tracked(), 1);
    }

    #[test]
    fn active_speakers_are_announced_on_change_at_a_bounded_rate() {
        let config = VoiceConfig::default();
        let mut voice = VoiceState::default();
        let anyone = |_: &str| true;
        assert_eq!(voice.next_deadline_ms(&config), None);
        voice.accept(&config, 0, "a", &header(1, 20), 4).expect("a");
        voice.accept(&config, 0, "b", &header(1, 90), 4).expect("b");
        assert_eq!(voice.next_deadline_ms(&config), Some(0));
        let first = voice.evaluate(&config, 0, anyone).expect("announced");
        // b's level is below speech: only a speaks.
        assert_eq!(
            first,
            vec![ActiveSpeaker {
                user_id: "a".into(),
                level: 20
            }]
        );
        // Within the interval nothing is evaluated; after it, no change: no announcement.
        voice
            .accept(&config, 100, "b", &header(2, 10), 4)
            .expect("b");
        assert_eq!(voice.evaluate(&config, 100, anyone), None);
        assert_eq!(voice.next_deadline_ms(&config), Some(300));
        let second = voice.evaluate(&config, 300, anyone).expect("changed");
        assert_eq!(
            second
                .iter()
                .map(|s| s.user_id.as_str())
                .collect::<Vec<_>>(),
            ["b", "a"],
            "loudest first"
        );
        // a's hold ran out.
        let third = voice.evaluate(&config, 600, anyone).expect("changed");
        assert_eq!(third.len(), 1);
        assert_eq!(third[0].user_id, "b");
        // A speaker the room no longer lets speak (muted) leaves the list at once.
        voice
            .accept(&config, 850, "b", &header(3, 10), 4)
            .expect("b");
        let fourth = voice.evaluate(&config, 900, |u| u != "b").expect("changed");
        assert!(fourth.is_empty(), "{fourth:?}");
        assert_eq!(
            voice.evaluate(&config, 1_200, anyone).map(|s| s.len()),
            Some(1)
        );
        // Silence: after the tracks are forgotten, the room stops ticking.
        assert_eq!(voice.evaluate(&config, 20_000, anyone), Some(Vec::new()));
        assert_eq!(voice.next_deadline_ms(&config), None);
    }
}
