//! Reactions batched at the edge (SPEC R7): a node acknowledges a member's reaction at
//! once and counts it per room and emoji; every [`REACTION_BATCH_MS`] it sends each room's
//! counts to the room's owner in one message. So 50,000 reactions a second cost the owner
//! a few messages per node and window, not one request each; the owner's window then
//! aggregates them for the members as before.
//!
//! Reactions are counts, not records: one the owner cannot take (it moved or died between
//! the acknowledgment and the batch) is lost, as the window it would have been in is.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

/// How often each room's counted reactions go to its owner.
pub const REACTION_BATCH_MS: u64 = 50;
/// Distinct emojis one room's batch holds; a reaction with a new emoji beyond it is
/// refused as rate limited until the batch leaves (the owner's window has the same bound).
pub const BATCH_EMOJIS_MAX: usize = 64;
/// Rooms with reactions waiting at once; reactions for further rooms are refused as rate
/// limited until the next batch.
pub const BATCH_ROOMS_MAX: usize = 100_000;

/// Counted reactions per room, waiting for the next batch.
#[derive(Default)]
pub struct ReactionBatcher {
    rooms: Mutex<HashMap<String, BTreeMap<String, u64>>>,
}

impl ReactionBatcher {
    /// Counts one reaction; false if the batch is full (too many emojis or rooms).
    pub fn add(&self, room_id: &str, emoji: &str) -> bool {
        let mut rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
        if !rooms.contains_key(room_id) && rooms.len() >= BATCH_ROOMS_MAX {
            return false;
        }
        let counts = rooms.entry(room_id.to_string()).or_default();
        let kinds = counts.len();
        match counts.get_mut(emoji) {
            Some(count) => *count = count.saturating_add(1),
            None if kinds >= BATCH_EMOJIS_MAX => return false,
            None => {
                counts.insert(emoji.to_string(), 1);
            }
        }
        true
    }

    pub(crate) fn take(&self) -> HashMap<String, BTreeMap<String, u64>> {
        std::mem::take(&mut *self.rooms.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_count_per_room_and_emoji_and_are_bounded() {
        let batcher = ReactionBatcher::default();
        for _ in 0..1000 {
            assert!(batcher.add("r1", "👏"));
        }
        assert!(batcher.add("r2", "🔥"));
        for i in 1..BATCH_EMOJIS_MAX {
            assert!(batcher.add("r1", &format!("e{i}")));
        }
        assert!(!batcher.add("r1", "one too many"));
        assert!(batcher.add("r1", "👏"), "known emojis still count");
        let taken = batcher.take();
        assert_eq!(taken["r1"]["👏"], 1001);
        assert_eq!(taken["r1"].len(), BATCH_EMOJIS_MAX);
        assert_eq!(taken["r2"]["🔥"], 1);
        assert!(batcher.take().is_empty());
    }
}
