//! Bullet comments (SPEC Q6), sans-IO: a room shows at most `rate_per_sec` of them, chosen
//! fairly from what viewers send; per-user rate limits and a word blocklist apply.
//!
//! Time is cut into windows of `window_ms`. In a window each user has at most one
//! candidate (its latest). When the window closes, up to `rate_per_sec × window_ms / 1000`
//! candidates are shown (the fraction carries over to the next window), picked by who was
//! shown longest ago (never shown first), ties broken by a hash of (user, window) so no
//! user is favoured by its name. So with many more senders than slots every sender is
//! shown in turn: fairness over time, not per window.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::rate::TokenBucket;

/// Limits of bullet comments. Every field has its unit last.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct BulletConfig {
    /// Bullets shown per second per room. Default 20.
    pub rate_per_sec: u32,
    /// Window length, ms. Default 250.
    pub window_ms: u64,
    /// Longest bullet, in characters. Default 50.
    pub chars_max: usize,
    /// Bullets a user may send per second, sustained. Default 2.
    pub user_rate_per_sec: u32,
    /// User burst. Default 4.
    pub user_burst: u32,
    /// Candidates held per window (distinct users); beyond, bullets are dropped. Default
    /// 100,000.
    pub candidates_max: usize,
    /// Users whose send rate and last showing are remembered; beyond, the least recently
    /// seen are forgotten. Default 200,000.
    pub users_max: usize,
    /// Words refused anywhere in a bullet, case-insensitive.
    pub blocklist: Vec<String>,
}

impl Default for BulletConfig {
    fn default() -> Self {
        BulletConfig {
            rate_per_sec: 20,
            window_ms: 250,
            chars_max: 50,
            user_rate_per_sec: 2,
            user_burst: 4,
            candidates_max: 100_000,
            users_max: 200_000,
            blocklist: Vec::new(),
        }
    }
}

/// Why a bullet was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BulletRefusal {
    /// Empty, too long, or control characters.
    #[error("invalid bullet: {0}")]
    Invalid(String),
    /// A blocked word.
    #[error("the bullet contains a blocked word")]
    Blocked,
    /// Faster than the user may send.
    #[error("too many bullets; slow down")]
    RateLimited,
}

/// A bullet shown in the room.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bullet {
    /// Who sent it.
    pub user_id: String,
    /// Its text.
    pub text: String,
    /// When it was sent, ms since the epoch.
    pub at_ms: u64,
}

#[derive(Debug, Clone)]
struct UserState {
    bucket: TokenBucket,
    /// The window in which the user was last shown (0: never).
    shown_window: u64,
    seen_at_ms: u64,
}

/// One room's bullet gate.
#[derive(Debug, Clone)]
pub struct BulletGate {
    config: BulletConfig,
    /// Lowercased blocklist.
    blocked: Vec<String>,
    users: HashMap<String, UserState>,
    /// This window's candidates, one per user.
    candidates: BTreeMap<String, Bullet>,
    /// The current window's number (from 1) and when it closes.
    window: u64,
    closes_at_ms: u64,
    /// Thousandths of a slot carried to the next window.
    carry_milli: u64,
}

fn mix(user: &str, window: u64) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(user.as_bytes(), window)
}

impl BulletGate {
    /// A gate whose first window starts at `now_ms`.
    pub fn new(config: BulletConfig, now_ms: u64) -> Self {
        let blocked = config
            .blocklist
            .iter()
            .map(|w| w.to_lowercase())
            .filter(|w| !w.is_empty())
            .collect();
        let window_ms = config.window_ms.max(1);
        BulletGate {
            config,
            blocked,
            users: HashMap::new(),
            candidates: BTreeMap::new(),
            window: 1,
            closes_at_ms: now_ms + window_ms,
            carry_milli: 0,
        }
    }

    /// A viewer sends a bullet: checked, rate limited, and made its candidate for this
    /// window (replacing an earlier one of the same window).
    ///
    /// # Errors
    ///
    /// [`BulletRefusal`]: nothing is kept.
    pub fn send(&mut self, now_ms: u64, user: &str, text: &str) -> Result<(), BulletRefusal> {
        let text = text.trim();
        if text.is_empty() {
            return Err(BulletRefusal::Invalid("empty".into()));
        }
        if text.chars().nth(self.config.chars_max).is_some() {
            return Err(BulletRefusal::Invalid(format!(
                "longer than {} characters",
                self.config.chars_max
            )));
        }
        if text.chars().any(char::is_control) {
            return Err(BulletRefusal::Invalid("control characters".into()));
        }
        let lower = text.to_lowercase();
        if self.blocked.iter().any(|w| lower.contains(w.as_str())) {
            return Err(BulletRefusal::Blocked);
        }
        if !self.users.contains_key(user) && self.users.len() >= self.config.users_max {
            self.forget_oldest_users();
        }
        let (burst, rate) = (self.config.user_burst, self.config.user_rate_per_sec);
        let state = self
            .users
            .entry(user.to_string())
            .or_insert_with(|| UserState {
                bucket: TokenBucket::new(burst, rate, now_ms),
                shown_window: 0,
                seen_at_ms: now_ms,
            });
        state.seen_at_ms = now_ms;
        if !state.bucket.try_take(now_ms) {
            return Err(BulletRefusal::RateLimited);
        }
        if !self.candidates.contains_key(user)
            && self.candidates.len() >= self.config.candidates_max
        {
            // Accepted from the sender's view, but this window is full: not shown.
            return Ok(());
        }
        self.candidates.insert(
            user.to_string(),
            Bullet {
                user_id: user.to_string(),
                text: text.to_string(),
                at_ms: now_ms,
            },
        );
        Ok(())
    }

    fn forget_oldest_users(&mut self) {
        // Drop the least recently seen tenth (amortised O(1) per new user).
        let mut seen: Vec<(u64, String)> = self
            .users
            .iter()
            .map(|(u, s)| (s.seen_at_ms, u.clone()))
            .collect();
        seen.sort_unstable();
        for (_, user) in seen.into_iter().take(self.config.users_max / 10 + 1) {
            self.users.remove(&user);
        }
    }

    /// When the current window closes.
    pub fn next_deadline_ms(&self) -> u64 {
        self.closes_at_ms
    }

    /// Closes the window if due: returns the bullets to show, in send order (at most the
    /// window's share of `rate_per_sec`).
    pub fn tick(&mut self, now_ms: u64) -> Vec<Bullet> {
        if now_ms < self.closes_at_ms {
            return Vec::new();
        }
        let window_ms = self.config.window_ms.max(1);
        let milli = u64::from(self.config.rate_per_sec) * window_ms + self.carry_milli;
        let slots = (milli / 1000) as usize;
        self.carry_milli = milli % 1000;
        let window = self.window;
        let candidates = std::mem::take(&mut self.candidates);
        let mut ranked: Vec<(u64, u64, Bullet)> = candidates
            .into_values()
            .map(|bullet| {
                let shown = self
                    .users
                    .get(&bullet.user_id)
                    .map_or(0, |u| u.shown_window);
                (shown, mix(&bullet.user_id, window), bullet)
            })
            .collect();
        ranked.sort_unstable_by_key(|(shown, tie, _)| (*shown, *tie));
        ranked.truncate(slots);
        let mut shown: Vec<Bullet> = ranked.into_iter().map(|(_, _, b)| b).collect();
        for bullet in &shown {
            if let Some(user) = self.users.get_mut(&bullet.user_id) {
                user.shown_window = window;
            }
        }
        shown.sort_by(|a, b| (a.at_ms, &a.user_id).cmp(&(b.at_ms, &b.user_id)));
        self.window += 1;
        // A late tick does not merge windows: the next one starts now.
        self.closes_at_ms = now_ms.max(self.closes_at_ms) + window_ms;
        shown
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn a_room_shows_at_most_its_rate_and_every_sender_in_turn() {
        let mut gate = BulletGate::new(BulletConfig::default(), 0);
        let mut shown_users = BTreeSet::new();
        let mut now = 0;
        let mut shown_total = 0;
        // 1,000 senders at 10/s each, joining at different times in the first half second
        // (their own limit lets 2/s through), for 60 s, in 10 ms steps.
        for step in 0..6_000u64 {
            now += 10;
            for u in (0..1_000u64).filter(|u| u % 10 == step % 10 && step >= (u * 7) % 50) {
                let _ = gate.send(now, &format!("u{u}"), "hi");
            }
            if now >= gate.next_deadline_ms() {
                let shown = gate.tick(now);
                assert!(shown.len() <= 5, "a 250 ms window shows at most 5 of 20/s");
                shown_total += shown.len();
                shown_users.extend(shown.into_iter().map(|b| b.user_id));
            }
        }
        assert!(shown_total <= 20 * 60 + 5, "{shown_total} in 60 s");
        assert!(shown_total >= 20 * 55, "the slots are used: {shown_total}");
        assert_eq!(shown_users.len(), 1_000, "every sender was shown in 60 s");
    }

    #[test]
    fn bad_bullets_and_fast_senders_are_refused() {
        let config = BulletConfig {
            blocklist: vec!["Spam".into()],
            ..BulletConfig::default()
        };
        let mut gate = BulletGate::new(config, 0);
        assert_eq!(
            gate.send(0, "ann", "  "),
            Err(BulletRefusal::Invalid("empty".into()))
        );
        assert!(matches!(
            gate.send(0, "ann", &"x".repeat(51)),
            Err(BulletRefusal::Invalid(_))
        ));
        assert_eq!(
            gate.send(0, "ann", "buy SPAM now"),
            Err(BulletRefusal::Blocked)
        );
        for _ in 0..4 {
            gate.send(0, "bob", "hello").expect("within the burst");
        }
        assert_eq!(
            gate.send(0, "bob", "hello"),
            Err(BulletRefusal::RateLimited)
        );
        gate.send(600, "bob", "again").expect("refilled");
        let shown = gate.tick(600);
        assert_eq!(shown.len(), 1, "one candidate per user per window");
        assert_eq!(shown[0].text, "again", "its latest");
    }
}
