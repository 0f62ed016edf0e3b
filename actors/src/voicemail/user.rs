//! A user actor's state and its copies (SPEC M3, M5, M6), sans-IO: the inbox behind a
//! revision number, the operations that change it, and the fenced copies nodes keep.
//!
//! - [`UserState`] is what the user's owner holds: the [`Inbox`] and a revision raised by
//!   one for every operation that changed it. [`UserState::apply`] is deterministic, so
//!   the owner sends the replica the operation, not the state: the replica applies it to
//!   the same revision and reaches the same state.
//! - [`UserCopies`] is what every node keeps per user: the fence (the highest ownership
//!   epoch seen) and the most advanced copy. As with rooms (`crate::replica`), an owner
//!   writes at its epoch and a write from below the fence is refused with the fence; an
//!   operation for another revision than the one held is refused as out of step, and the
//!   owner then sends the whole state. A new owner continues from the most advanced copy
//!   by (epoch, revision).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::inbox::{
    Inbox, InboxEntry, InboxRefusal, MessageMeta, MessageState, Page, PlayPosition,
};
use super::upload::UploadStatus;

/// What changes a user's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum UserOp {
    /// A message to or from the user: it enters the inbox (once).
    Deliver {
        /// The message.
        meta: MessageMeta,
        /// Its upload status.
        upload: UploadStatus,
        /// Bytes stored.
        bytes: u64,
        /// Audio stored, ms.
        duration_ms: u64,
    },
    /// The message's upload ended or grew.
    Upload {
        /// The message.
        message_id: String,
        /// Its status.
        upload: UploadStatus,
        /// Bytes stored.
        bytes: u64,
        /// Audio stored, ms.
        duration_ms: u64,
    },
    /// A device read the message.
    Read {
        /// The message.
        message_id: String,
    },
    /// A device set the play position.
    Play {
        /// The message.
        message_id: String,
        /// The position.
        play: PlayPosition,
    },
    /// A device synced: what it has seen is recorded.
    Sync {
        /// The device.
        device: String,
        /// The last number it asked after.
        after: u64,
        /// At most this many entries.
        limit: usize,
    },
    /// Messages are gone (retention or deletion).
    Forget {
        /// The messages.
        message_ids: Vec<String>,
    },
}

/// What an operation gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserEffect {
    /// A new inbox entry (push `vm.message` to the user's devices).
    Delivered(InboxEntry),
    /// A message's state changed (push `vm.state`).
    State(String, MessageState),
    /// The message's state, unchanged.
    Unchanged(Option<MessageState>),
    /// A sync page.
    Page(Page),
    /// How many messages were forgotten.
    Forgot(usize),
}

impl UserEffect {
    /// Whether the operation changed the state (and so raised the revision).
    pub fn changed(&self) -> bool {
        match self {
            UserEffect::Delivered(_) | UserEffect::State(..) | UserEffect::Page(_) => true,
            UserEffect::Forgot(n) => *n > 0,
            UserEffect::Unchanged(_) => false,
        }
    }
}

/// A user's state on its owner.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserState {
    /// Operations that changed the state, counted.
    pub revision: u64,
    /// The inbox.
    pub inbox: Inbox,
}

impl UserState {
    /// Applies `op`; the revision goes up by one when it changed something.
    ///
    /// # Errors
    ///
    /// The inbox's refusal; nothing changed.
    pub fn apply(&mut self, op: &UserOp) -> Result<UserEffect, InboxRefusal> {
        let effect = match op {
            UserOp::Deliver {
                meta,
                upload,
                bytes,
                duration_ms,
            } => {
                let (entry, new) = self
                    .inbox
                    .deliver(meta.clone(), *upload, *bytes, *duration_ms);
                if new {
                    UserEffect::Delivered(entry.clone())
                } else {
                    UserEffect::Unchanged(Some(entry.state.clone()))
                }
            }
            UserOp::Upload {
                message_id,
                upload,
                bytes,
                duration_ms,
            } => match self
                .inbox
                .upload_changed(message_id, *upload, *bytes, *duration_ms)?
            {
                Some(state) => UserEffect::State(message_id.clone(), state),
                None => UserEffect::Unchanged(self.state_of(message_id)),
            },
            UserOp::Read { message_id } => match self.inbox.mark_read(message_id)? {
                Some(state) => UserEffect::State(message_id.clone(), state),
                None => UserEffect::Unchanged(self.state_of(message_id)),
            },
            UserOp::Play { message_id, play } => {
                match self.inbox.set_play(message_id, play.clone())? {
                    Some(state) => UserEffect::State(message_id.clone(), state),
                    None => UserEffect::Unchanged(self.state_of(message_id)),
                }
            }
            UserOp::Sync {
                device,
                after,
                limit,
            } => UserEffect::Page(self.inbox.sync(device, *after, *limit)?),
            UserOp::Forget { message_ids } => UserEffect::Forgot(self.inbox.forget(message_ids)),
        };
        if effect.changed() {
            self.revision += 1;
        }
        Ok(effect)
    }

    fn state_of(&self, message_id: &str) -> Option<MessageState> {
        self.inbox.entry(message_id).map(|e| e.state.clone())
    }
}

/// One user's copy on one node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserCopy {
    /// The highest ownership epoch seen: writes from below it are refused.
    pub fence: u64,
    /// The most advanced state, with the epoch it was written at.
    pub state: Option<(u64, UserState)>,
}

/// Why a replicated write was not taken. Nothing changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CopyRefused {
    /// A newer owner exists (its epoch).
    Stale(u64),
    /// The held state is not the revision the operation follows: send the whole state.
    OutOfStep,
}

/// The order of copies: (epoch, revision). A new owner continues from the greatest.
pub fn copy_rank(epoch: u64, state: &UserState) -> (u64, u64) {
    (epoch, state.revision)
}

/// The most advanced of `copies` by [`copy_rank`] (the last of equals).
pub fn most_advanced<I>(copies: I) -> Option<(u64, UserState)>
where
    I: IntoIterator<Item = (u64, UserState)>,
{
    let mut best: Option<(u64, UserState)> = None;
    for (epoch, state) in copies {
        if best
            .as_ref()
            .is_none_or(|(e, s)| copy_rank(epoch, &state) >= copy_rank(*e, s))
        {
            best = Some((epoch, state));
        }
    }
    best
}

/// The user copies one node holds. Each method that changes a copy returns it, for the
/// shell to persist.
#[derive(Debug, Default)]
pub struct UserCopies {
    users: BTreeMap<String, UserCopy>,
}

impl UserCopies {
    /// A store holding `copies` (read back from disk).
    pub fn from_copies(copies: impl IntoIterator<Item = (String, UserCopy)>) -> Self {
        UserCopies {
            users: copies.into_iter().collect(),
        }
    }

    /// Keeps `state` written at `epoch` if it is not below the fence and is at least as
    /// advanced as the held copy; raises the fence to `epoch`.
    ///
    /// # Errors
    ///
    /// [`CopyRefused::Stale`] with the fence.
    pub fn keep(
        &mut self,
        user: &str,
        epoch: u64,
        state: UserState,
    ) -> Result<&UserCopy, CopyRefused> {
        let copy = self.users.entry(user.to_string()).or_default();
        if epoch < copy.fence {
            return Err(CopyRefused::Stale(copy.fence));
        }
        copy.fence = epoch;
        let ahead = copy
            .state
            .as_ref()
            .is_none_or(|(e, s)| copy_rank(epoch, &state) >= copy_rank(*e, s));
        if ahead {
            copy.state = Some((epoch, state));
        }
        Ok(copy)
    }

    /// Applies `op`, written at `epoch` on revision `base`, to the held copy.
    ///
    /// # Errors
    ///
    /// [`CopyRefused::Stale`] below the fence; [`CopyRefused::OutOfStep`] if the held copy
    /// is not at `base` (or the operation is refused: the owner then sends the state).
    pub fn apply(
        &mut self,
        user: &str,
        epoch: u64,
        base: u64,
        op: &UserOp,
    ) -> Result<&UserCopy, CopyRefused> {
        let copy = self.users.entry(user.to_string()).or_default();
        if epoch < copy.fence {
            return Err(CopyRefused::Stale(copy.fence));
        }
        let Some((held_epoch, state)) = copy.state.as_mut() else {
            return Err(CopyRefused::OutOfStep);
        };
        if state.revision != base {
            return Err(CopyRefused::OutOfStep);
        }
        let mut next = state.clone();
        if next.apply(op).is_err() {
            return Err(CopyRefused::OutOfStep);
        }
        *state = next;
        *held_epoch = epoch;
        copy.fence = epoch;
        Ok(copy)
    }

    /// Raises the fence to `epoch` (a new owner claimed the user); the copy held, and
    /// whether the fence moved.
    pub fn fence(&mut self, user: &str, epoch: u64) -> (Option<(u64, UserState)>, bool) {
        let copy = self.users.entry(user.to_string()).or_default();
        let moved = epoch > copy.fence;
        copy.fence = copy.fence.max(epoch);
        (copy.state.clone(), moved)
    }

    /// The copy of `user`, if any.
    pub fn copy(&self, user: &str) -> Option<&UserCopy> {
        self.users.get(user)
    }

    /// Every user with a copy.
    pub fn users(&self) -> impl Iterator<Item = &String> {
        self.users.keys()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(id: &str) -> MessageMeta {
        MessageMeta {
            message_id: id.into(),
            sender: "alice".into(),
            conversation: "direct:alice:bob".into(),
            created_at_ms: 1,
            codec: "opus".into(),
        }
    }

    fn deliver(id: &str) -> UserOp {
        UserOp::Deliver {
            meta: meta(id),
            upload: UploadStatus::Uploading,
            bytes: 100,
            duration_ms: 20,
        }
    }

    #[test]
    fn the_revision_counts_only_operations_that_changed_something() {
        let mut user = UserState::default();
        assert!(matches!(
            user.apply(&deliver("m1")),
            Ok(UserEffect::Delivered(_))
        ));
        assert!(matches!(
            user.apply(&deliver("m1")),
            Ok(UserEffect::Unchanged(_))
        ));
        assert_eq!(user.revision, 1);
        let read = UserOp::Read {
            message_id: "m1".into(),
        };
        assert!(matches!(user.apply(&read), Ok(UserEffect::State(..))));
        assert!(matches!(
            user.apply(&read),
            Ok(UserEffect::Unchanged(Some(_)))
        ));
        assert_eq!(user.revision, 2);
        let unknown = UserOp::Read {
            message_id: "m9".into(),
        };
        assert!(user.apply(&unknown).is_err());
        assert_eq!(user.revision, 2);
    }

    #[test]
    fn a_replica_applying_the_same_operations_reaches_the_same_state() {
        let mut owner = UserState::default();
        let mut copies = UserCopies::default();
        copies.keep("bob", 1, owner.clone()).expect("keep");
        let ops = [
            deliver("m1"),
            deliver("m2"),
            UserOp::Read {
                message_id: "m1".into(),
            },
            UserOp::Play {
                message_id: "m2".into(),
                play: PlayPosition {
                    position_ms: 500,
                    at_ms: 10,
                    device: "phone".into(),
                },
            },
            UserOp::Sync {
                device: "phone".into(),
                after: 0,
                limit: 10,
            },
        ];
        for op in &ops {
            let base = owner.revision;
            let effect = owner.apply(op).expect("apply");
            if effect.changed() {
                copies.apply("bob", 1, base, op).expect("in step");
            }
        }
        assert_eq!(
            copies.copy("bob").and_then(|c| c.state.clone()),
            Some((1, owner))
        );
    }

    #[test]
    fn writes_from_below_the_fence_and_out_of_step_are_refused_and_change_nothing() {
        let mut copies = UserCopies::default();
        let mut state = UserState::default();
        state.apply(&deliver("m1")).expect("deliver");
        copies.keep("bob", 3, state.clone()).expect("keep");
        let before = copies.copy("bob").cloned();
        assert_eq!(
            copies.keep("bob", 2, UserState::default()).err(),
            Some(CopyRefused::Stale(3))
        );
        assert_eq!(
            copies.apply("bob", 2, 1, &deliver("m2")).err(),
            Some(CopyRefused::Stale(3))
        );
        assert_eq!(
            copies.apply("bob", 3, 0, &deliver("m2")).err(),
            Some(CopyRefused::OutOfStep)
        );
        assert_eq!(copies.copy("bob").cloned(), before);
        // A new owner fences; the old one's writes are refused from then on.
        let (held, moved) = copies.fence("bob", 4);
        assert!(moved);
        assert_eq!(held, Some((3, state)));
        assert_eq!(
            copies.apply("bob", 3, 1, &deliver("m2")).err(),
            Some(CopyRefused::Stale(4))
        );
    }

    #[test]
    fn a_new_owner_continues_from_the_most_advanced_copy() {
        let mut a = UserState::default();
        a.apply(&deliver("m1")).expect("deliver");
        let mut b = a.clone();
        b.apply(&deliver("m2")).expect("deliver");
        // A later epoch wins over a higher revision; within an epoch, the higher revision.
        let best = most_advanced([(2, b.clone()), (3, a.clone())]).expect("some");
        assert_eq!(best, (3, a.clone()));
        let best = most_advanced([(2, b.clone()), (2, a)]).expect("some");
        assert_eq!(best, (2, b));
    }
}
