//! The replica store's decisions, sans IO: which copy of a room's durable state a node
//! keeps, fencing by ownership epoch, vote deltas, and which copy a new owner recovers
//! from.
//!
//! Every node holds, per room it owns or replicates, a [`HeldCopy`]: the highest
//! ownership epoch it has seen (the fence) and the most advanced state written to it.
//! An owner writes at its epoch; a write from below the fence is refused with the fence,
//! which tells a stale owner that a newer one exists. Copies are ordered by
//! [`copy_rank`]: (epoch, revision, comment count). The shell (`DurableStates` in the
//! node) locks a [`ReplicaStore`], persists what it says changed, and does the IO.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::polls::VoteRecord;
use crate::room::{CommentsDelta, RoomDurable};

/// One room's copy on one node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldCopy {
    /// The highest ownership epoch seen for the room: writes from below it are refused.
    pub fence: u64,
    /// The most advanced state, with the epoch it was written at.
    pub state: Option<(u64, RoomDurable)>,
}

/// The order of copies: a copy is more advanced when its (epoch, revision, comment
/// count) is greater. A new owner recovers from the greatest.
pub fn copy_rank(epoch: u64, durable: &RoomDurable) -> (u64, u64, u64) {
    (epoch, durable.revision, durable.comment_count)
}

/// The most advanced of `copies` (each with the epoch it was written at), by
/// [`copy_rank`]; the last of equals (the shell lists its own copy last).
pub fn most_advanced<I>(copies: I) -> Option<(u64, RoomDurable)>
where
    I: IntoIterator<Item = (u64, RoomDurable)>,
{
    let mut best: Option<(u64, RoomDurable)> = None;
    for (epoch, durable) in copies {
        let ahead = match &best {
            None => true,
            Some((best_epoch, best_state)) => {
                copy_rank(epoch, &durable) >= copy_rank(*best_epoch, best_state)
            }
        };
        if ahead {
            best = Some((epoch, durable));
        }
    }
    best
}

/// Why replicated votes (or a change without polls) were not applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VotesRefused {
    /// A newer owner exists (its epoch).
    Stale(u64),
    /// The held state is not the one the votes follow.
    OutOfStep,
}

/// The copies one node holds, by room. Every method that changes a copy returns it (to
/// be persisted by the shell) or the refusal; nothing here reads a clock or does IO.
#[derive(Debug, Default)]
pub struct ReplicaStore {
    rooms: HashMap<String, HeldCopy>,
}

impl ReplicaStore {
    /// A store holding `copies` (e.g. read back from disk).
    pub fn from_copies(copies: impl IntoIterator<Item = (String, HeldCopy)>) -> Self {
        let store = ReplicaStore {
            rooms: copies.into_iter().collect(),
        };
        store.check_invariants();
        store
    }

    /// Keeps `durable`, written by the owner at `epoch`, if it is at least as advanced as
    /// the copy held; raises the fence to `epoch`. Returns the copy to persist.
    ///
    /// # Errors
    ///
    /// The fence, if `epoch` is below it: a newer owner exists and the writer must stop
    /// acting for the room. Nothing changes.
    pub fn keep(
        &mut self,
        room_id: &str,
        epoch: u64,
        durable: RoomDurable,
    ) -> Result<&HeldCopy, u64> {
        let held = self.rooms.entry(room_id.to_string()).or_default();
        if epoch < held.fence {
            return Err(held.fence);
        }
        held.fence = epoch;
        let ahead = match &held.state {
            None => true,
            Some((held_epoch, held_state)) => {
                copy_rank(epoch, &durable) >= copy_rank(*held_epoch, held_state)
            }
        };
        if ahead {
            held.state = Some((epoch, durable));
        }
        debug_assert!(held_ok(held));
        Ok(held)
    }

    /// Applies replicated votes to the copy of `room_id` if it is the one they follow:
    /// written at `epoch`, at `base_revision`; the copy is then at `revision`. Returns the
    /// copy to persist.
    ///
    /// # Errors
    ///
    /// [`VotesRefused::Stale`] with the fence if a newer owner exists;
    /// [`VotesRefused::OutOfStep`] if the copy is not the one the votes follow (the owner
    /// then sends its whole state). Nothing changes.
    pub fn apply_votes(
        &mut self,
        room_id: &str,
        epoch: u64,
        base_revision: u64,
        revision: u64,
        votes: &[VoteRecord],
    ) -> Result<&HeldCopy, VotesRefused> {
        self.apply_delta(room_id, epoch, base_revision, |state| {
            state.polls.apply(votes);
            state.revision = revision;
        })
    }

    /// Takes a change replicated without the polls (see
    /// `RoomCore::durable_without_polls`) over the copy of `room_id`, if it is the one
    /// the change follows: written at `epoch`, at `base_revision`. The copy keeps its
    /// polls (the owner's polls did not change since `base_revision`). Returns the copy to
    /// persist.
    ///
    /// # Errors
    ///
    /// As [`Self::apply_votes`]. Nothing changes.
    pub fn apply_change(
        &mut self,
        room_id: &str,
        epoch: u64,
        base_revision: u64,
        change: RoomDurable,
    ) -> Result<&HeldCopy, VotesRefused> {
        if change.revision < base_revision {
            return Err(VotesRefused::OutOfStep);
        }
        self.apply_delta(room_id, epoch, base_revision, |state| {
            state.take_change(change)
        })
    }

    /// Takes the comments of `delta` into the copy of `room_id`, if it is the one they
    /// follow: written at `epoch`, at `base_revision`, its latest comment the one before
    /// the delta's first. Returns the copy to persist.
    ///
    /// # Errors
    ///
    /// As [`Self::apply_votes`]. Nothing changes.
    pub fn apply_comments(
        &mut self,
        room_id: &str,
        epoch: u64,
        base_revision: u64,
        delta: CommentsDelta,
    ) -> Result<&HeldCopy, VotesRefused> {
        let mut refused = false;
        let held = self.apply_delta(room_id, epoch, base_revision, |state| {
            refused = state.take_comments(delta).is_err();
        })?;
        if refused {
            return Err(VotesRefused::OutOfStep);
        }
        Ok(held)
    }

    /// Applies a delta (votes, a change without polls) to the copy of `room_id` if it is
    /// the one the delta follows: written at `epoch`, at `base_revision`, and not fenced
    /// by a newer owner. Returns the copy to persist; a refusal changes nothing.
    fn apply_delta(
        &mut self,
        room_id: &str,
        epoch: u64,
        base_revision: u64,
        apply: impl FnOnce(&mut RoomDurable),
    ) -> Result<&HeldCopy, VotesRefused> {
        let held = self.rooms.entry(room_id.to_string()).or_default();
        if epoch < held.fence {
            return Err(VotesRefused::Stale(held.fence));
        }
        match &mut held.state {
            Some((held_epoch, state))
                if *held_epoch == epoch && state.revision == base_revision =>
            {
                apply(state);
            }
            _ => return Err(VotesRefused::OutOfStep),
        }
        debug_assert!(held_ok(held));
        Ok(held)
    }

    /// A new owner activates the room at `epoch`: the fence rises to it (if higher), so
    /// the previous owner's writes are refused from now on. Returns the copy held, and
    /// whether the fence changed (then the copy is to be persisted).
    pub fn fence(&mut self, room_id: &str, epoch: u64) -> (Option<(u64, RoomDurable)>, bool) {
        let held = self.rooms.entry(room_id.to_string()).or_default();
        let raised = epoch > held.fence;
        if raised {
            held.fence = epoch;
        }
        (held.state.clone(), raised)
    }

    /// The copy of `room_id`, if any.
    pub fn copy(&self, room_id: &str) -> Option<&HeldCopy> {
        self.rooms.get(room_id)
    }

    /// The highest ownership epoch seen for `room_id` (0 if none).
    pub fn fence_of(&self, room_id: &str) -> u64 {
        self.rooms.get(room_id).map_or(0, |h| h.fence)
    }

    /// The state held for `room_id`, with its epoch.
    pub fn get(&self, room_id: &str) -> Option<(u64, RoomDurable)> {
        self.rooms.get(room_id).and_then(|h| h.state.clone())
    }

    /// Every state held: (room, epoch, state).
    pub fn states(&self) -> Vec<(String, u64, RoomDurable)> {
        self.rooms
            .iter()
            .filter_map(|(room_id, held)| {
                held.state
                    .as_ref()
                    .map(|(epoch, durable)| (room_id.clone(), *epoch, durable.clone()))
            })
            .collect()
    }

    /// Forgets `room_id`; whether a copy was held.
    pub fn forget(&mut self, room_id: &str) -> bool {
        self.rooms.remove(room_id).is_some()
    }

    /// Panics if a copy's state was written above its fence (the fence only rises, and
    /// a state is kept only at or above it).
    pub fn check_invariants(&self) {
        for (room_id, held) in &self.rooms {
            assert!(held_ok(held), "room {room_id}: state above its fence");
        }
    }
}

fn held_ok(held: &HeldCopy) -> bool {
    held.state
        .as_ref()
        .is_none_or(|(epoch, _)| *epoch <= held.fence)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(revision: u64, comments: u64) -> RoomDurable {
        RoomDurable {
            revision,
            comment_count: comments,
            ..RoomDurable::default()
        }
    }

    #[test]
    fn a_write_from_below_the_fence_is_refused_and_changes_nothing() {
        let mut store = ReplicaStore::default();
        store.keep("r", 2, state(5, 5)).expect("first write");
        // A new owner at epoch 3 fences the room.
        let (held, raised) = store.fence("r", 3);
        assert!(raised);
        assert_eq!(held, Some((2, state(5, 5))));
        // The old owner's write is refused with the fence.
        assert_eq!(store.keep("r", 2, state(9, 9)), Err(3));
        assert_eq!(store.get("r"), Some((2, state(5, 5))));
        // The new owner's write goes in, even at a lower revision (a new epoch wins).
        store.keep("r", 3, state(1, 5)).expect("new owner");
        assert_eq!(store.get("r"), Some((3, state(1, 5))));
        store.check_invariants();
    }

    #[test]
    fn a_change_without_polls_keeps_the_held_polls_and_needs_the_base_revision() {
        use crate::polls::{Polls, VoteRecord};
        let mut store = ReplicaStore::default();
        let mut with_polls = state(4, 2);
        with_polls.polls = Polls::default();
        with_polls.polls.last_poll_id = 7;
        store.keep("r", 2, with_polls).expect("keep");
        // A comment: revision 5, three comments, no polls in the change.
        store.apply_change("r", 2, 4, state(5, 3)).expect("in step");
        let (epoch, held) = store.get("r").expect("held");
        assert_eq!((epoch, held.revision, held.comment_count), (2, 5, 3));
        assert_eq!(held.polls.last_poll_id, 7, "the held polls stay");
        // Not at the base revision, or another epoch: refused, nothing changes.
        assert_eq!(
            store.apply_change("r", 2, 4, state(6, 4)).err(),
            Some(VotesRefused::OutOfStep)
        );
        assert_eq!(
            store.apply_change("r", 3, 5, state(6, 4)).err(),
            Some(VotesRefused::OutOfStep)
        );
        store.fence("r", 3);
        assert_eq!(
            store.apply_change("r", 2, 5, state(6, 4)).err(),
            Some(VotesRefused::Stale(3))
        );
        assert_eq!(store.get("r").map(|(_, d)| d.revision), Some(5));
        // Votes and changes interleave on the same revision line.
        store.keep("r", 3, state(6, 4)).expect("new owner");
        let vote = VoteRecord {
            poll_id: 1,
            user: "u".into(),
            option: 0,
        };
        assert!(store.apply_votes("r", 3, 6, 7, &[vote]).is_ok());
        store
            .apply_change("r", 3, 7, state(8, 5))
            .expect("after the votes");
        store.check_invariants();
    }

    #[test]
    fn a_lower_fence_does_not_lower_it_and_a_stale_copy_is_not_kept() {
        let mut store = ReplicaStore::default();
        store.keep("r", 4, state(7, 3)).expect("write");
        let (_, raised) = store.fence("r", 2);
        assert!(!raised);
        assert_eq!(store.fence_of("r"), 4);
        // Same epoch, older revision (a reordered message): the held copy stays.
        store.keep("r", 4, state(6, 3)).expect("accepted, not kept");
        assert_eq!(store.get("r"), Some((4, state(7, 3))));
    }

    #[test]
    fn votes_apply_only_to_the_copy_they_follow() {
        let mut store = ReplicaStore::default();
        store.keep("r", 1, state(10, 0)).expect("write");
        assert_eq!(
            store.apply_votes("r", 1, 9, 11, &[]).err(),
            Some(VotesRefused::OutOfStep),
            "wrong base revision"
        );
        assert_eq!(
            store.apply_votes("r", 2, 10, 11, &[]).err(),
            Some(VotesRefused::OutOfStep),
            "another epoch's copy"
        );
        store.apply_votes("r", 1, 10, 11, &[]).expect("in step");
        assert_eq!(store.get("r").map(|(_, s)| s.revision), Some(11));
        store.fence("r", 5);
        assert_eq!(
            store.apply_votes("r", 1, 11, 12, &[]).err(),
            Some(VotesRefused::Stale(5))
        );
    }

    #[test]
    fn recovery_takes_the_highest_epoch_then_revision_then_comments() {
        let copies = vec![
            (2, state(50, 40)),
            (3, state(1, 1)),
            (3, state(4, 2)),
            (3, state(4, 3)),
            (1, state(99, 99)),
        ];
        assert_eq!(most_advanced(copies), Some((3, state(4, 3))));
        assert_eq!(most_advanced(Vec::new()), None);
        // Equals: the last is taken.
        let mut last = state(1, 1);
        last.interested.insert("a".into());
        let copies = vec![(1, state(1, 1)), (1, last.clone())];
        assert_eq!(most_advanced(copies), Some((1, last)));
    }

    #[test]
    fn invariants_hold_through_any_sequence_of_writes_and_fences() {
        // A small exhaustive walk: every order of these operations keeps the fence at
        // least the epoch of the state held.
        let ops: [(bool, u64, u64); 5] = [
            (true, 1, 3),
            (false, 2, 0),
            (true, 2, 1),
            (true, 1, 9),
            (false, 4, 0),
        ];
        let mut order: Vec<usize> = (0..ops.len()).collect();
        let mut walks = 0;
        permute(&mut order, 0, &mut |order| {
            let mut store = ReplicaStore::default();
            for &i in order {
                let (write, epoch, revision) = ops[i];
                if write {
                    let _ = store.keep("r", epoch, state(revision, revision));
                } else {
                    store.fence("r", epoch);
                }
                store.check_invariants();
            }
            walks += 1;
        });
        assert_eq!(walks, 120);
    }

    fn permute(items: &mut Vec<usize>, k: usize, visit: &mut impl FnMut(&[usize])) {
        if k == items.len() {
            visit(items);
            return;
        }
        for i in k..items.len() {
            items.swap(k, i);
            permute(items, k + 1, visit);
            items.swap(k, i);
        }
    }
}
