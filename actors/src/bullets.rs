//! Bullet comments (SPEC Q6), sans-IO: a room shows at most `rate_per_sec` of them, chosen
//! fairly from what viewers send; per-user rate limits and a word blocklist apply.
//!
//! Two parts, so that the work scales like reactions do:
//!
//! - [`BulletFilter`] runs where a bullet arrives (the edge node holding the viewer's
//!   connection): text rules, blocklist, and a token bucket per user. It answers the
//!   sender. A user with connections on two nodes has a bucket on each.
//! - [`BulletGate`] runs in the room (on its owner): it takes the candidates the edges
//!   pass on and decides which are shown.
//!
//! Time is cut into windows of `window_ms`. In a window each user has at most one
//! candidate (its latest). When the window closes, up to `rate_per_sec × window_ms / 1000`
//! candidates are shown (the fraction carries over to the next window), picked by who was
//! shown longest ago (never shown first), ties broken by a hash of (user, window) so no
//! user is favoured by its name. So with many more senders than slots every sender is
//! shown in turn: fairness over time, not per window. A window opens with the first
//! candidate after the previous one closed, and two windows close at least `window_ms`
//! apart: over any span of `t` ms a room shows at most `rate_per_sec × t / 1000` bullets
//! plus one window's share.
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

/// Most bullets one window may show: bounds the size of a `room.bullets` notification
/// ([`BulletConfig::validate`] refuses a rate and window that would exceed it).
pub const BULLETS_PER_WINDOW_MAX: u64 = 100;
/// Longest `chars_max` a configuration may set.
pub const BULLET_CHARS_MAX_LIMIT: usize = 200;
/// Most words a blocklist may hold (each bullet is checked against every word).
pub const BLOCKLIST_WORDS_MAX: usize = 1_000;

impl BulletConfig {
    /// Bullets shown per window, rounded up (the carried fraction makes up the rest).
    pub fn slots_per_window(&self) -> u64 {
        (u64::from(self.rate_per_sec) * self.window_ms.max(1)).div_ceil(1000)
    }

    /// Checks ranges.
    ///
    /// # Errors
    ///
    /// A message naming the field out of range.
    pub fn validate(&self) -> Result<(), String> {
        if self.rate_per_sec == 0 {
            return Err("bullets.rate_per_sec must be positive".into());
        }
        if !(10..=10_000).contains(&self.window_ms) {
            return Err("bullets.window_ms must be 10-10000".into());
        }
        if self.slots_per_window() > BULLETS_PER_WINDOW_MAX {
            return Err(format!(
                "bullets.rate_per_sec × bullets.window_ms / 1000 must be at most {BULLETS_PER_WINDOW_MAX}"
            ));
        }
        if !(1..=BULLET_CHARS_MAX_LIMIT).contains(&self.chars_max) {
            return Err(format!(
                "bullets.chars_max must be 1-{BULLET_CHARS_MAX_LIMIT}"
            ));
        }
        if self.user_rate_per_sec == 0 || self.user_burst == 0 {
            return Err("bullets.user_rate_per_sec and user_burst must be positive".into());
        }
        if self.candidates_max == 0 || self.users_max == 0 {
            return Err("bullets.candidates_max and users_max must be positive".into());
        }
        if self.blocklist.len() > BLOCKLIST_WORDS_MAX {
            return Err(format!(
                "bullets.blocklist holds at most {BLOCKLIST_WORDS_MAX} words"
            ));
        }
        Ok(())
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

pub use chorus_protocol::Bullet;

/// Checks a bullet's text against the length and character rules (not the blocklist):
/// returns it trimmed.
///
/// # Errors
///
/// [`BulletRefusal::Invalid`] saying which rule it breaks.
pub fn check_text(chars_max: usize, text: &str) -> Result<&str, BulletRefusal> {
    let text = text.trim();
    if text.is_empty() {
        return Err(BulletRefusal::Invalid("empty".into()));
    }
    if text.chars().nth(chars_max).is_some() {
        return Err(BulletRefusal::Invalid(format!(
            "longer than {chars_max} characters"
        )));
    }
    if text.chars().any(char::is_control) {
        return Err(BulletRefusal::Invalid("control characters".into()));
    }
    Ok(text)
}

/// Forgets the least recently seen tenth of `users` (by `seen_at_ms`, ties by name, so
/// the result does not depend on the map's order). Amortised O(log n) per new user.
fn forget_oldest<T>(
    users: &mut HashMap<String, T>,
    users_max: usize,
    seen_at_ms: impl Fn(&T) -> u64,
) {
    let mut seen: Vec<(u64, String)> = users
        .iter()
        .map(|(u, s)| (seen_at_ms(s), u.clone()))
        .collect();
    seen.sort_unstable();
    for (_, user) in seen.into_iter().take(users_max / 10 + 1) {
        users.remove(&user);
    }
}

#[derive(Debug, Clone)]
struct SenderState {
    bucket: TokenBucket,
    seen_at_ms: u64,
}

/// The checks made where a bullet arrives: text rules, blocklist, and each user's token
/// bucket (`user_rate_per_sec`, burst `user_burst`). One per node, shared by its
/// connections, so a user's devices on one node share a bucket. Remembers at most
/// `users_max` users; forgetting one lets it burst again, harmless once its bucket has
/// refilled (`user_burst / user_rate_per_sec` seconds of silence).
#[derive(Debug, Clone)]
pub struct BulletFilter {
    config: BulletConfig,
    /// Lowercased blocklist.
    blocked: Vec<String>,
    users: HashMap<String, SenderState>,
}

impl BulletFilter {
    /// A filter with no users yet.
    pub fn new(config: BulletConfig) -> Self {
        let blocked = config
            .blocklist
            .iter()
            .map(|w| w.trim().to_lowercase())
            .filter(|w| !w.is_empty())
            .collect();
        BulletFilter {
            config,
            blocked,
            users: HashMap::new(),
        }
    }

    /// `user` sends `text` at `now_ms`: checked, then rate limited; the bullet to pass on
    /// to the room (trimmed, stamped `now_ms`).
    ///
    /// # Errors
    ///
    /// [`BulletRefusal`]; a refused bullet spends no token unless it was refused for the
    /// rate.
    pub fn admit(&mut self, now_ms: u64, user: &str, text: &str) -> Result<Bullet, BulletRefusal> {
        let text = check_text(self.config.chars_max, text)?;
        if !self.blocked.is_empty() {
            let lower = text.to_lowercase();
            if self.blocked.iter().any(|w| lower.contains(w.as_str())) {
                return Err(BulletRefusal::Blocked);
            }
        }
        if !self.users.contains_key(user) && self.users.len() >= self.config.users_max {
            forget_oldest(&mut self.users, self.config.users_max, |s| s.seen_at_ms);
        }
        let (burst, rate) = (self.config.user_burst, self.config.user_rate_per_sec);
        let state = self
            .users
            .entry(user.to_string())
            .or_insert_with(|| SenderState {
                bucket: TokenBucket::new(burst, rate, now_ms),
                seen_at_ms: now_ms,
            });
        state.seen_at_ms = state.seen_at_ms.max(now_ms);
        if !state.bucket.try_take(now_ms) {
            return Err(BulletRefusal::RateLimited);
        }
        Ok(Bullet {
            user_id: user.to_string(),
            text: text.to_string(),
            at_ms: now_ms,
        })
    }

    /// Users remembered now.
    pub fn users(&self) -> usize {
        self.users.len()
    }
}

#[derive(Debug, Clone)]
struct ShownState {
    /// The window in which the user was last shown (0: never).
    shown_window: u64,
    seen_at_ms: u64,
}

/// One room's bullet selection: candidates per window, the fair pick when it closes.
#[derive(Debug, Clone)]
pub struct BulletGate {
    config: BulletConfig,
    /// When each user was last shown; at most `users_max` users.
    users: HashMap<String, ShownState>,
    /// This window's candidates, one per user, at most `candidates_max`.
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
        let window_ms = config.window_ms.max(1);
        BulletGate {
            config,
            users: HashMap::new(),
            candidates: BTreeMap::new(),
            window: 1,
            closes_at_ms: now_ms.saturating_add(window_ms),
            carry_milli: 0,
        }
    }

    /// A bullet an edge admitted (see [`BulletFilter::admit`]) becomes its user's
    /// candidate for this window, replacing an earlier one of the same window. Returns
    /// false if it was dropped: its text breaks the length rules or its user id is empty
    /// or longer than [`crate::room::USER_ID_BYTES_MAX`] (the edge is another node, so
    /// this is checked again; the blocklist is not), or the window holds
    /// `candidates_max` other users already. A first candidate after an idle spell opens a
    /// window of its own.
    pub fn offer(&mut self, now_ms: u64, bullet: Bullet) -> bool {
        if check_text(self.config.chars_max, &bullet.text).is_err()
            || bullet.user_id.is_empty()
            || bullet.user_id.len() > crate::room::USER_ID_BYTES_MAX
        {
            return false;
        }
        let window_ms = self.config.window_ms.max(1);
        if self.candidates.is_empty() && now_ms >= self.closes_at_ms {
            self.closes_at_ms = now_ms.saturating_add(window_ms);
        }
        if !self.candidates.contains_key(&bullet.user_id)
            && self.candidates.len() >= self.config.candidates_max
        {
            return false;
        }
        if !self.users.contains_key(&bullet.user_id) && self.users.len() >= self.config.users_max {
            forget_oldest(&mut self.users, self.config.users_max, |s| s.seen_at_ms);
        }
        let state = self
            .users
            .entry(bullet.user_id.clone())
            .or_insert(ShownState {
                shown_window: 0,
                seen_at_ms: now_ms,
            });
        state.seen_at_ms = state.seen_at_ms.max(now_ms);
        self.candidates.insert(bullet.user_id.clone(), bullet);
        true
    }

    /// When the current window closes, if it holds candidates (else nothing is due).
    pub fn next_deadline_ms(&self) -> Option<u64> {
        (!self.candidates.is_empty()).then_some(self.closes_at_ms)
    }

    /// Candidates waiting in the current window.
    pub fn candidates(&self) -> usize {
        self.candidates.len()
    }

    /// Drops the current window's candidates (the room ended).
    pub fn clear(&mut self) {
        self.candidates.clear();
    }

    /// Closes the window if due: returns the bullets to show, in send order (at most the
    /// window's share of `rate_per_sec`). Nothing before the window closes.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Bullet> {
        if now_ms < self.closes_at_ms || self.candidates.is_empty() {
            return Vec::new();
        }
        let window_ms = self.config.window_ms.max(1);
        let milli = u64::from(self.config.rate_per_sec) * window_ms + self.carry_milli;
        let slots = usize::try_from(milli / 1000).unwrap_or(usize::MAX);
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
        self.closes_at_ms = now_ms.max(self.closes_at_ms).saturating_add(window_ms);
        self.check_invariants();
        shown
    }

    /// Bounds hold (debug builds).
    pub fn check_invariants(&self) {
        debug_assert!(self.candidates.len() <= self.config.candidates_max);
        debug_assert!(self.users.len() <= self.config.users_max);
        debug_assert!(self.carry_milli < 1000);
        debug_assert!(self
            .candidates
            .iter()
            .all(|(user, bullet)| *user == bullet.user_id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn a_room_shows_at_most_its_rate_and_every_sender_in_turn() {
        let config = BulletConfig::default();
        // Three edges, each with its own filter; senders spread over them.
        let mut edges: Vec<BulletFilter> =
            (0..3).map(|_| BulletFilter::new(config.clone())).collect();
        let mut gate = BulletGate::new(config, 0);
        let mut shown_users = BTreeSet::new();
        let mut now = 0;
        let mut shown_total = 0;
        let mut last_close = None;
        // 1,000 senders at 10/s each, joining at different times in the first half second
        // (their own limit lets 2/s through), for 60 s, in 10 ms steps.
        for step in 0..6_000u64 {
            now += 10;
            for u in (0..1_000u64).filter(|u| u % 10 == step % 10 && step >= (u * 7) % 50) {
                let edge = &mut edges[(u % 3) as usize];
                if let Ok(bullet) = edge.admit(now, &format!("u{u}"), "hi") {
                    assert!(gate.offer(now, bullet));
                }
            }
            if gate.next_deadline_ms().is_some_and(|due| now >= due) {
                let shown = gate.tick(now);
                assert!(shown.len() <= 5, "a 250 ms window shows at most 5 of 20/s");
                if let Some(last) = last_close {
                    assert!(now - last >= 250, "windows close at least 250 ms apart");
                }
                last_close = Some(now);
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
        let mut filter = BulletFilter::new(config.clone());
        assert_eq!(
            filter.admit(0, "ann", "  "),
            Err(BulletRefusal::Invalid("empty".into()))
        );
        assert!(matches!(
            filter.admit(0, "ann", &"x".repeat(51)),
            Err(BulletRefusal::Invalid(_))
        ));
        assert!(matches!(
            filter.admit(0, "ann", "a\u{7}b"),
            Err(BulletRefusal::Invalid(_))
        ));
        assert_eq!(
            filter.admit(0, "ann", "buy SPAM now"),
            Err(BulletRefusal::Blocked)
        );
        for _ in 0..4 {
            filter.admit(0, "bob", "hello").expect("within the burst");
        }
        assert_eq!(
            filter.admit(0, "bob", "hello"),
            Err(BulletRefusal::RateLimited)
        );
        filter
            .admit(0, "cat", " hi ")
            .expect("another user has her own bucket");
        let again = filter.admit(600, "bob", " again ").expect("refilled");
        assert_eq!(again.text, "again", "trimmed");

        let mut gate = BulletGate::new(config, 0);
        let first = Bullet {
            user_id: "bob".into(),
            text: "first".into(),
            at_ms: 500,
        };
        assert!(gate.offer(500, first));
        assert!(gate.offer(600, again));
        let too_long = Bullet {
            user_id: "eve".into(),
            text: "x".repeat(51),
            at_ms: 600,
        };
        assert!(
            !gate.offer(600, too_long),
            "the owner checks the bounds again"
        );
        assert_eq!(
            gate.next_deadline_ms(),
            Some(750),
            "the window opened at 500"
        );
        assert!(gate.tick(700).is_empty(), "not before the window closes");
        let shown = gate.tick(750);
        assert_eq!(shown.len(), 1, "one candidate per user per window");
        assert_eq!(shown[0].text, "again", "its latest");
        assert_eq!(gate.next_deadline_ms(), None, "nothing waits");
    }

    #[test]
    fn bounds_hold_when_users_and_candidates_overflow() {
        let config = BulletConfig {
            candidates_max: 10,
            users_max: 20,
            ..BulletConfig::default()
        };
        let mut filter = BulletFilter::new(config.clone());
        let mut gate = BulletGate::new(config.clone(), 0);
        let mut offered = 0;
        for u in 0..100u64 {
            let bullet = filter.admit(u, &format!("u{u}"), "hi").expect("admitted");
            assert!(filter.users() <= 20);
            if gate.offer(u, bullet) {
                offered += 1;
            }
        }
        assert_eq!(offered, 10, "a window holds candidates_max users");
        assert_eq!(gate.candidates(), 10);
        assert!(gate.tick(1_000).len() <= 5);
        assert!(config.validate().is_ok());
        let too_fast = BulletConfig {
            rate_per_sec: 1_000,
            ..BulletConfig::default()
        };
        assert!(
            too_fast.validate().is_err(),
            "250 bullets a window is too many"
        );
    }
}
