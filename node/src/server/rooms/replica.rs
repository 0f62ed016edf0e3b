//! The room states this node holds for their owners (a shell over
//! `chorus_actors::replica`: a lock and sled).

use std::sync::{Mutex, MutexGuard};

use chorus_actors::polls::Polls;
use chorus_actors::room::RoomDurable;

/// The sled tree holding [`DurableStates`] (each room's copy without its polls).
pub const DURABLE_STATES_TREE: &str = "rooms/durable";
/// The sled tree holding each room's polls, apart from the rest of its copy so that a
/// change that leaves the polls alone (a comment) is saved without them. A room saved
/// before this tree existed has its polls in [`DURABLE_STATES_TREE`]; opening moves them.
pub const DURABLE_POLLS_TREE: &str = "rooms/durable-polls";

pub use chorus_actors::replica::VotesRefused;
use chorus_actors::replica::{HeldCopy, ReplicaStore};

/// Durable room states this node holds, as an owner or a replica, fenced by ownership
/// epoch: the shell over `chorus_actors::replica::ReplicaStore` (which decides), in
/// memory and written to sled. In a cluster a write is not flushed (the copy on another
/// node is what makes an acknowledged change survive this node's loss; sled's copy brings
/// the state back when every node restarts). On a node with no other member the
/// replicator waits for a flush ([`crate::server::common::group_commit`]) before the change is
/// acknowledged, so a killed and restarted single node keeps every acknowledged comment
/// and never gives a comment id twice. A room's next owner takes the most advanced copy
/// (`chorus_actors::replica::most_advanced`).
///
/// Comments replicated as deltas in a cluster are saved to sled in the background, at most
/// every [`DEFERRED_SAVE_MS`] per room ([`Self::save_deferred`]) and at shutdown, instead
/// of once per delta: a delta costs what its comments cost, and the copy a room needs when
/// this node is lost is the one in another node's memory.
#[derive(Default)]
pub struct DurableStates {
    store: Mutex<ReplicaStore>,
    /// (copies without polls, polls).
    trees: Option<(sled::Tree, sled::Tree)>,
    /// Rooms whose copy changed since it was last saved (deltas whose save was deferred).
    unsaved: Mutex<std::collections::BTreeSet<String>>,
}

/// How often copies changed by deferred deltas are saved to sled.
pub const DEFERRED_SAVE_MS: u64 = 100;

/// When a copy changed by a delta is written to sled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveWhen {
    /// Before the call returns (a lone node acknowledges only what is on its disk).
    Now,
    /// With the next [`DurableStates::save_deferred`].
    Deferred,
}

/// How much of a copy changed (what to write to sled).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Saved {
    /// All of it.
    Whole,
    /// Not the polls.
    WithoutPolls,
}

impl DurableStates {
    /// The states saved in `db` (an entry that does not decode is skipped and logged).
    ///
    /// # Errors
    ///
    /// sled's, opening or reading the tree.
    pub fn open(db: &sled::Db) -> Result<Self, sled::Error> {
        let tree = db.open_tree(DURABLE_STATES_TREE)?;
        let polls_tree = db.open_tree(DURABLE_POLLS_TREE)?;
        let mut copies = Vec::new();
        let mut earlier_format = Vec::new();
        for entry in tree.iter() {
            let (key, value) = entry?;
            let room_id = String::from_utf8_lossy(&key).into_owned();
            let mut held = match rmp_serde::from_slice::<HeldCopy>(&value) {
                Ok(held) => held,
                Err(error) => {
                    tracing::warn!(room = %room_id, %error, "skipping an undecodable saved room state");
                    continue;
                }
            };
            match polls_tree.get(&key)? {
                Some(bytes) => match rmp_serde::from_slice::<Polls>(&bytes) {
                    Ok(polls) => {
                        if let Some((_, state)) = &mut held.state {
                            state.polls = polls;
                        }
                    }
                    Err(error) => {
                        tracing::warn!(room = %room_id, %error, "skipping an undecodable saved room state");
                        continue;
                    }
                },
                // Saved with its polls inside (before the polls had their own tree).
                None => earlier_format.push(room_id.clone()),
            }
            copies.push((room_id, held));
        }
        let states = DurableStates {
            store: Mutex::new(ReplicaStore::from_copies(copies)),
            trees: Some((tree, polls_tree)),
            unsaved: Mutex::default(),
        };
        {
            let store = states.store();
            for room_id in &earlier_format {
                if let Some(copy) = store.copy(room_id) {
                    states.save(room_id, copy, Saved::Whole);
                }
            }
        }
        Ok(states)
    }

    fn store(&self) -> MutexGuard<'_, ReplicaStore> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes a changed copy to sled (called under the lock, so the saved copy is never
    /// older than the one in memory): the copy without its polls, and the polls too
    /// unless only the rest changed.
    fn save(&self, room_id: &str, held: &HeldCopy, what: Saved) {
        let Some((tree, polls_tree)) = &self.trees else {
            return;
        };
        let rest = HeldCopy {
            fence: held.fence,
            state: held
                .state
                .as_ref()
                .map(|(epoch, state)| (*epoch, state.without_polls())),
        };
        let mut saved = rmp_serde::to_vec_named(&rest)
            .map_err(|e| e.to_string())
            .and_then(|bytes| {
                tree.insert(room_id.as_bytes(), bytes)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            });
        if what == Saved::Whole {
            let polls = held.state.as_ref().map(|(_, state)| &state.polls);
            let empty = Polls::default();
            saved = saved.and_then(|()| {
                rmp_serde::to_vec_named(polls.unwrap_or(&empty))
                    .map_err(|e| e.to_string())
                    .and_then(|bytes| {
                        polls_tree
                            .insert(room_id.as_bytes(), bytes)
                            .map(|_| ())
                            .map_err(|e| e.to_string())
                    })
            });
        }
        if let Err(error) = saved {
            tracing::error!(room = %room_id, %error, "cannot save a room's state");
        }
    }

    /// Every state held: (room, epoch, state).
    pub fn held_states(&self) -> Vec<(String, u64, RoomDurable)> {
        self.store().states()
    }

    /// Forgets the states of `rooms` (expired), in memory and in sled; returns how many
    /// were held.
    pub fn forget(&self, rooms: &[String]) -> usize {
        let mut store = self.store();
        let mut forgotten = 0;
        for room_id in rooms {
            if store.forget(room_id) {
                forgotten += 1;
                if let Some((tree, polls_tree)) = &self.trees {
                    let removed = tree
                        .remove(room_id.as_bytes())
                        .and_then(|_| polls_tree.remove(room_id.as_bytes()));
                    if let Err(error) = removed {
                        tracing::error!(room = %room_id, %error, "cannot forget a room's state");
                    }
                }
            }
        }
        forgotten
    }

    /// Keeps `durable`, written by the owner at `epoch`, if it is ahead of what is held
    /// (see `ReplicaStore::keep`).
    ///
    /// # Errors
    ///
    /// The highest epoch seen, if `epoch` is below it: a newer owner exists and the writer
    /// must stop acting for the room.
    pub fn keep(&self, room_id: &str, epoch: u64, durable: RoomDurable) -> Result<(), u64> {
        let mut store = self.store();
        let held = store.keep(room_id, epoch, durable)?;
        self.save(room_id, held, Saved::Whole);
        Ok(())
    }

    /// Applies replicated votes to the state held for `room_id`, if it is the one they
    /// follow (see `ReplicaStore::apply_votes`).
    ///
    /// # Errors
    ///
    /// [`VotesRefused::Stale`] with the fence if a newer owner exists;
    /// [`VotesRefused::OutOfStep`] if the held state is not the one the votes follow.
    pub fn apply_votes(
        &self,
        room_id: &str,
        epoch: u64,
        base_revision: u64,
        revision: u64,
        votes: &[chorus_actors::polls::VoteRecord],
    ) -> Result<(), VotesRefused> {
        let mut store = self.store();
        let held = store.apply_votes(room_id, epoch, base_revision, revision, votes)?;
        self.save(room_id, held, Saved::Whole);
        Ok(())
    }

    /// Takes a change replicated without the polls over the state held for `room_id`, if
    /// it is the one the change follows (see `ReplicaStore::apply_change`); saves it
    /// without the polls.
    ///
    /// # Errors
    ///
    /// As [`Self::apply_votes`].
    pub fn apply_change(
        &self,
        room_id: &str,
        epoch: u64,
        base_revision: u64,
        change: RoomDurable,
    ) -> Result<(), VotesRefused> {
        let mut store = self.store();
        let held = store.apply_change(room_id, epoch, base_revision, change)?;
        self.save(room_id, held, Saved::WithoutPolls);
        Ok(())
    }

    /// Takes comments replicated as a delta into the state held for `room_id`, if it is
    /// the one they follow (see `ReplicaStore::apply_comments`); saves it without the
    /// polls.
    ///
    /// # Errors
    ///
    /// As [`Self::apply_votes`].
    pub fn apply_comments(
        &self,
        room_id: &str,
        epoch: u64,
        base_revision: u64,
        delta: chorus_actors::room::CommentsDelta,
        when: SaveWhen,
    ) -> Result<(), VotesRefused> {
        let mut store = self.store();
        let held = store.apply_comments(room_id, epoch, base_revision, delta)?;
        match when {
            SaveWhen::Now => self.save(room_id, held, Saved::WithoutPolls),
            SaveWhen::Deferred => {
                self.unsaved
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(room_id.to_string());
            }
        }
        Ok(())
    }

    /// Saves the copies whose save was deferred (see [`SaveWhen::Deferred`]); returns
    /// how many.
    pub fn save_deferred(&self) -> usize {
        let rooms = std::mem::take(&mut *self.unsaved.lock().unwrap_or_else(|e| e.into_inner()));
        for room_id in &rooms {
            let store = self.store();
            if let Some(copy) = store.copy(room_id) {
                self.save(room_id, copy, Saved::WithoutPolls);
            }
        }
        rooms.len()
    }

    /// Raises the room's fence to `epoch` (a new owner is activating it) and returns the
    /// state held.
    pub fn fence(&self, room_id: &str, epoch: u64) -> Option<(u64, RoomDurable)> {
        let mut store = self.store();
        let (held, raised) = store.fence(room_id, epoch);
        if raised {
            if let Some(copy) = store.copy(room_id) {
                self.save(room_id, copy, Saved::WithoutPolls);
            }
        }
        held
    }

    /// The highest ownership epoch seen for `room_id` (0 if none).
    pub fn fence_of(&self, room_id: &str) -> u64 {
        self.store().fence_of(room_id)
    }

    /// The state held for `room_id`, with its epoch.
    pub fn get(&self, room_id: &str) -> Option<(u64, RoomDurable)> {
        self.store().get(room_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chorus_actors::polls::PollConfig;

    fn with_votes(votes: usize) -> RoomDurable {
        let mut polls = Polls::default();
        let config = PollConfig::default();
        let options = vec!["yes".to_string(), "no".to_string()];
        polls
            .create(&config, 1, "host", "ok?", &options)
            .expect("poll");
        for user in 0..votes {
            polls.vote(&format!("u{user}"), 1, 0).expect("vote");
        }
        RoomDurable {
            revision: 3,
            comment_count: 1,
            polls,
            ..RoomDurable::default()
        }
    }

    #[test]
    fn a_change_is_saved_without_the_polls_and_both_come_back() {
        let dir = tempfile::tempdir().expect("dir");
        let db = sled::open(dir.path()).expect("db");
        let states = DurableStates::open(&db).expect("open");
        states.keep("r", 1, with_votes(100)).expect("keep");
        let polls_bytes = |db: &sled::Db| {
            db.open_tree(DURABLE_POLLS_TREE)
                .expect("tree")
                .get("r")
                .expect("get")
                .expect("polls saved")
        };
        let before = polls_bytes(&db);
        let rest = |db: &sled::Db| {
            db.open_tree(DURABLE_STATES_TREE)
                .expect("tree")
                .get("r")
                .expect("get")
                .expect("rest saved")
                .len()
        };
        let rest_size = rest(&db);
        let change = RoomDurable {
            revision: 4,
            comment_count: 2,
            ..RoomDurable::default()
        };
        states.apply_change("r", 1, 3, change).expect("in step");
        assert_eq!(polls_bytes(&db), before, "the polls were not written again");
        assert!(rest(&db) < rest_size + 64, "the rest holds no votes");
        drop(states);
        let states = DurableStates::open(&db).expect("reopen");
        let (epoch, held) = states.get("r").expect("held");
        assert_eq!((epoch, held.revision, held.comment_count), (1, 4, 2));
        assert_eq!(held.polls, with_votes(100).polls);
    }

    #[test]
    fn a_copy_saved_with_its_polls_inside_is_read_and_moved() {
        let dir = tempfile::tempdir().expect("dir");
        let db = sled::open(dir.path()).expect("db");
        let copy = HeldCopy {
            fence: 2,
            state: Some((2, with_votes(10))),
        };
        db.open_tree(DURABLE_STATES_TREE)
            .expect("tree")
            .insert("r", rmp_serde::to_vec_named(&copy).expect("encode"))
            .expect("insert");
        let states = DurableStates::open(&db).expect("open");
        assert_eq!(states.get("r"), Some((2, with_votes(10))));
        assert!(db
            .open_tree(DURABLE_POLLS_TREE)
            .expect("tree")
            .contains_key("r")
            .expect("read"));
        // A change then keeps the polls.
        let change = RoomDurable {
            revision: 4,
            ..RoomDurable::default()
        };
        states.apply_change("r", 2, 3, change).expect("in step");
        drop(states);
        let states = DurableStates::open(&db).expect("reopen");
        assert_eq!(
            states.get("r").map(|(_, d)| d.polls),
            Some(with_votes(10).polls)
        );
    }
}
