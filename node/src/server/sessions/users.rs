//! Bounds per user on this node: how fast a user may create rooms and polls, and how many
//! rooms created through this node a user may hold open.
//!
//! Counted on the node the user is connected to (the edge), so a user who connects to
//! several nodes gets each node's allowance; the sessions-per-user bound lives in the
//! session registry, memberships per user are counted over the user's sessions here.
//!
//! The map holds an entry per user who created something recently (until the buckets are
//! full again) or holds open rooms; [`UserBounds::prune`] drops the rest.

use std::collections::HashMap;
use std::sync::Mutex;

use chorus_actors::rate::TokenBucket;

use crate::config::LimitsConfig;

/// Why a creation was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateRefusal {
    /// The user's creation rate is used up.
    Rate,
    /// The user holds the maximum number of open rooms (the bound is given).
    OpenRooms(usize),
}

#[derive(Debug)]
struct UserEntry {
    /// Fed minutes as if they were seconds: `refill_per_sec` is then per minute.
    room_creates: TokenBucket,
    poll_creates: TokenBucket,
    /// Rooms created through this node, not known to have ended.
    open_rooms: Vec<String>,
}

/// Poll creation burst per user.
const POLL_CREATES_BURST: u32 = 5;

/// A token bucket clock that runs 60 times slower: rates per second become per minute.
fn minute_clock(now_ms: u64) -> u64 {
    now_ms / 60
}

/// Per-user creation bounds on this node.
#[derive(Debug)]
pub struct UserBounds {
    room_creates_per_min: u32,
    room_creates_burst: u32,
    open_rooms_max: usize,
    poll_creates_per_min: u32,
    users: Mutex<HashMap<String, UserEntry>>,
}

impl UserBounds {
    /// Bounds from the node's limits.
    pub fn new(limits: &LimitsConfig) -> Self {
        UserBounds {
            room_creates_per_min: limits.room_creates_per_min,
            room_creates_burst: limits.room_creates_burst,
            open_rooms_max: limits.open_rooms_per_user_max,
            poll_creates_per_min: limits.poll_creates_per_min,
            users: Mutex::new(HashMap::new()),
        }
    }

    fn with_entry<T>(&self, user: &str, now_ms: u64, f: impl FnOnce(&mut UserEntry) -> T) -> T {
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        let entry = users.entry(user.to_string()).or_insert_with(|| UserEntry {
            room_creates: TokenBucket::new(
                self.room_creates_burst,
                self.room_creates_per_min,
                minute_clock(now_ms),
            ),
            poll_creates: TokenBucket::new(
                POLL_CREATES_BURST,
                self.poll_creates_per_min,
                minute_clock(now_ms),
            ),
            open_rooms: Vec::new(),
        });
        f(entry)
    }

    /// Whether `user` may create a room now (spends one from the rate when yes).
    /// `is_open` says whether a room the user created is still open.
    pub fn try_room_create(
        &self,
        user: &str,
        now_ms: u64,
        is_open: impl Fn(&str) -> bool,
    ) -> Result<(), CreateRefusal> {
        let open_rooms_max = self.open_rooms_max;
        self.with_entry(user, now_ms, |entry| {
            entry.open_rooms.retain(|room| is_open(room));
            if entry.open_rooms.len() >= open_rooms_max {
                return Err(CreateRefusal::OpenRooms(open_rooms_max));
            }
            if !entry.room_creates.try_take(minute_clock(now_ms)) {
                return Err(CreateRefusal::Rate);
            }
            Ok(())
        })
    }

    /// `user` created `room_id` through this node.
    pub fn room_created(&self, user: &str, room_id: &str, now_ms: u64) {
        self.with_entry(user, now_ms, |entry| {
            entry.open_rooms.push(room_id.to_string())
        });
    }

    /// Whether `user` may create a poll now (spends one from the rate when yes).
    pub fn try_poll_create(&self, user: &str, now_ms: u64) -> Result<(), CreateRefusal> {
        self.with_entry(user, now_ms, |entry| {
            if entry.poll_creates.try_take(minute_clock(now_ms)) {
                Ok(())
            } else {
                Err(CreateRefusal::Rate)
            }
        })
    }

    /// Drops what no longer bounds anything: ended rooms, and users whose rates are
    /// full again and who hold no open room.
    pub fn prune(&self, now_ms: u64, is_open: impl Fn(&str) -> bool) {
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        let minute = minute_clock(now_ms);
        users.retain(|_, entry| {
            entry.open_rooms.retain(|room| is_open(room));
            !(entry.open_rooms.is_empty()
                && entry.room_creates.is_full(minute)
                && entry.poll_creates.is_full(minute))
        });
    }

    /// Users with an entry (for tests and metrics).
    pub fn tracked(&self) -> usize {
        self.users.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounds() -> UserBounds {
        UserBounds::new(&LimitsConfig {
            room_creates_per_min: 6,
            room_creates_burst: 2,
            open_rooms_per_user_max: 3,
            ..LimitsConfig::default()
        })
    }

    #[test]
    fn room_creation_is_bounded_by_rate_and_by_open_rooms() {
        let b = bounds();
        let open = |_: &str| true;
        assert_eq!(b.try_room_create("u", 0, open), Ok(()));
        b.room_created("u", "r1", 0);
        assert_eq!(b.try_room_create("u", 0, open), Ok(()));
        b.room_created("u", "r2", 0);
        assert_eq!(b.try_room_create("u", 0, open), Err(CreateRefusal::Rate));
        assert_eq!(
            b.try_room_create("v", 0, open),
            Ok(()),
            "other users unaffected"
        );
        // 6 a minute: one more after 10 s (a token is whole after 10,000 ms: 166 of
        // the bucket's minute-clock ms give 996 of 1000 units, 167 give 1002).
        assert_eq!(
            b.try_room_create("u", 9_900, open),
            Err(CreateRefusal::Rate)
        );
        assert_eq!(b.try_room_create("u", 10_020, open), Ok(()));
        b.room_created("u", "r3", 10_020);
        assert_eq!(
            b.try_room_create("u", 60_000, open),
            Err(CreateRefusal::OpenRooms(3))
        );
        // r1 ended: room for one more.
        assert_eq!(b.try_room_create("u", 60_000, |r: &str| r != "r1"), Ok(()));
    }

    #[test]
    fn prune_forgets_users_with_full_buckets_and_no_open_rooms() {
        let b = bounds();
        b.try_room_create("u", 0, |_: &str| true).unwrap();
        b.room_created("u", "r1", 0);
        b.try_poll_create("w", 0).unwrap();
        b.prune(0, |_: &str| true);
        assert_eq!(b.tracked(), 2);
        b.prune(600_000, |_: &str| true);
        assert_eq!(b.tracked(), 1, "u still holds an open room");
        b.prune(600_000, |_: &str| false);
        assert_eq!(b.tracked(), 0);
    }
}
