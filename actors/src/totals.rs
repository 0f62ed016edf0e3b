//! A room's running totals (SPEC R10): reactions per emoji, peak and unique listeners.
//! Sans-IO and bounded: unique listeners are estimated with a HyperLogLog of
//! [`HLL_REGISTERS`] one-byte registers (about 3% standard error), so a room of any size
//! costs the same 1 KiB; emoji kinds beyond [`REACTION_KINDS_MAX`] are counted under
//! [`OTHER_EMOJI`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Registers of the unique-listener estimate (2^10).
pub const HLL_REGISTERS: usize = 1 << HLL_BITS;
const HLL_BITS: u32 = 10;
/// Emoji kinds counted one by one; the rest go under [`OTHER_EMOJI`].
pub const REACTION_KINDS_MAX: usize = 256;
/// Where reactions beyond [`REACTION_KINDS_MAX`] kinds are counted.
pub const OTHER_EMOJI: &str = "other";

/// Totals of one room since it was created. Durable with the room (they travel with its
/// replicated state; a change that is not acknowledged by itself, such as a join, rides
/// along with the next replicated change).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomTotals {
    /// Reactions per emoji (at most [`REACTION_KINDS_MAX`] keys plus [`OTHER_EMOJI`]).
    pub reactions: BTreeMap<String, u64>,
    /// Most listeners (distinct users) in the room at once.
    pub peak_listeners: u64,
    /// HyperLogLog registers of the users who were ever in the room ([`HLL_REGISTERS`]).
    pub unique_registers: Vec<u8>,
}

impl Default for RoomTotals {
    fn default() -> Self {
        RoomTotals {
            reactions: BTreeMap::new(),
            peak_listeners: 0,
            unique_registers: vec![0; HLL_REGISTERS],
        }
    }
}

impl RoomTotals {
    /// `user` is in the room (again, perhaps).
    pub fn note_user(&mut self, user: &str) {
        if self.unique_registers.len() != HLL_REGISTERS {
            self.unique_registers = vec![0; HLL_REGISTERS];
        }
        let hash = xxhash_rust::xxh3::xxh3_64(user.as_bytes());
        let index = (hash >> (64 - HLL_BITS)) as usize;
        let rest = (hash << HLL_BITS) | (1 << (HLL_BITS - 1));
        let rank = u8::try_from(rest.leading_zeros() + 1).unwrap_or(u8::MAX);
        if let Some(register) = self.unique_registers.get_mut(index) {
            *register = (*register).max(rank);
        }
    }

    /// The room holds `listeners` distinct users now.
    pub fn note_listeners(&mut self, listeners: u64) {
        self.peak_listeners = self.peak_listeners.max(listeners);
    }

    /// A reaction window closed with these counts.
    pub fn add_reactions(&mut self, counts: &BTreeMap<String, u64>) {
        for (emoji, count) in counts {
            let key = if self.reactions.contains_key(emoji)
                || self.reactions.len() < REACTION_KINDS_MAX
            {
                emoji.as_str()
            } else {
                OTHER_EMOJI
            };
            *self.reactions.entry(key.to_string()).or_insert(0) += count;
        }
    }

    /// The estimated number of distinct users who were ever in the room.
    pub fn unique_listeners(&self) -> u64 {
        let m = HLL_REGISTERS as f64;
        if self.unique_registers.len() != HLL_REGISTERS {
            return 0;
        }
        let zeros = self.unique_registers.iter().filter(|r| **r == 0).count();
        let sum: f64 = self
            .unique_registers
            .iter()
            .map(|r| 2f64.powi(-i32::from(*r)))
            .sum();
        let alpha = 0.7213 / (1.0 + 1.079 / m);
        let raw = alpha * m * m / sum;
        let estimate = if raw <= 2.5 * m && zeros > 0 {
            // Linear counting is exact enough for small sets.
            m * (m / zeros as f64).ln()
        } else {
            raw
        };
        estimate.round() as u64
    }

    /// Keeps the more advanced of two copies' totals (a restore).
    pub fn merge(&mut self, other: &RoomTotals) {
        for (emoji, count) in &other.reactions {
            let entry = self.reactions.entry(emoji.clone()).or_insert(0);
            *entry = (*entry).max(*count);
        }
        self.peak_listeners = self.peak_listeners.max(other.peak_listeners);
        if other.unique_registers.len() == HLL_REGISTERS {
            if self.unique_registers.len() != HLL_REGISTERS {
                self.unique_registers = vec![0; HLL_REGISTERS];
            }
            for (mine, theirs) in self
                .unique_registers
                .iter_mut()
                .zip(&other.unique_registers)
            {
                *mine = (*mine).max(*theirs);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_listeners_are_estimated_within_a_few_percent() {
        let mut totals = RoomTotals::default();
        for i in 0..20_000 {
            totals.note_user(&format!("user-{i}"));
            totals.note_user(&format!("user-{i}"));
        }
        let estimate = totals.unique_listeners() as f64;
        assert!((estimate - 20_000.0).abs() / 20_000.0 < 0.1, "{estimate}");
        let mut small = RoomTotals::default();
        for user in ["a", "b", "c", "a"] {
            small.note_user(user);
        }
        assert_eq!(small.unique_listeners(), 3);
        // The registers round-trip through MessagePack.
        let bytes = rmp_serde::to_vec_named(&small).expect("encode");
        let back: RoomTotals = rmp_serde::from_slice(&bytes).expect("decode");
        assert_eq!(back, small);
    }

    #[test]
    fn emoji_kinds_are_bounded() {
        let mut totals = RoomTotals::default();
        let counts: BTreeMap<String, u64> = (0..REACTION_KINDS_MAX + 10)
            .map(|i| (format!("e{i:04}"), 1))
            .collect();
        totals.add_reactions(&counts);
        assert_eq!(totals.reactions.len(), REACTION_KINDS_MAX + 1);
        assert_eq!(totals.reactions.get(OTHER_EMOJI), Some(&10));
    }
}
