//! Bullet comments at the edge (SPEC Q6), batched like reactions: a node checks a
//! member's `room.bullet` (text rules, blocklist, the user's token bucket; see
//! [`BulletFilter`]), answers at once, and keeps it as its user's candidate in a per-room
//! batch; every [`BULLET_BATCH_MS`] it sends each room's batch to the room's owner in one
//! message. The owner's room picks what is shown per window ([`chorus_actors::bullets`]),
//! so its cost grows with nodes and windows, not with senders.
//!
//! A batch holds one bullet per user (the latest): more in one batch would never be shown,
//! since a window takes one candidate per user. Bullets are passing remarks, not records:
//! one the owner cannot take (it moved or died) is lost, as its window would be.
//!
//! Per-user limits are per node: a user with connections on two nodes has a bucket on
//! each (so at most twice the rate); one connection, or several on one node, cannot exceed
//! them. The room's rate holds whatever the users do.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use chorus_actors::bullets::{Bullet, BulletConfig, BulletFilter, BulletRefusal};
use chorus_protocol::{ErrorBody, ErrorCode};

/// How often each room's batch goes to its owner.
pub const BULLET_BATCH_MS: u64 = 50;
/// Distinct users one room's batch holds; a bullet from a further user is refused as rate
/// limited until the batch leaves.
pub const BATCH_USERS_MAX: usize = 10_000;
/// Rooms with bullets waiting at once; bullets for further rooms are refused as rate
/// limited until the next batch.
pub const BATCH_ROOMS_MAX: usize = 10_000;

/// The node's bullet checks and the batches waiting for their owners.
pub struct BulletEdge {
    filter: Mutex<BulletFilter>,
    rooms: Mutex<HashMap<String, BTreeMap<String, Bullet>>>,
}

impl BulletEdge {
    /// An edge applying `config` (text bounds, blocklist, per-user rate).
    pub fn new(config: BulletConfig) -> Self {
        BulletEdge {
            filter: Mutex::new(BulletFilter::new(config)),
            rooms: Mutex::new(HashMap::new()),
        }
    }

    /// `user` (a member of `room_id`) sends `text` at `now_ms`: checked, rate limited and
    /// queued for the room's owner.
    ///
    /// # Errors
    ///
    /// `invalid_argument` for bad text or a blocked word, `rate_limited` for a user
    /// sending too fast or a full batch.
    pub fn send(
        &self,
        now_ms: u64,
        room_id: &str,
        user: &str,
        text: &str,
    ) -> Result<(), ErrorBody> {
        let bullet = self
            .filter
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .admit(now_ms, user, text)
            .map_err(|refusal| {
                let code = match refusal {
                    BulletRefusal::Invalid(_) | BulletRefusal::Blocked => {
                        ErrorCode::InvalidArgument
                    }
                    BulletRefusal::RateLimited => ErrorCode::RateLimited,
                };
                ErrorBody::new(code, refusal.to_string())
            })?;
        let mut rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
        if !rooms.contains_key(room_id) && rooms.len() >= BATCH_ROOMS_MAX {
            return Err(full());
        }
        let batch = rooms.entry(room_id.to_string()).or_default();
        if !batch.contains_key(user) && batch.len() >= BATCH_USERS_MAX {
            return Err(full());
        }
        batch.insert(user.to_string(), bullet);
        Ok(())
    }

    pub(crate) fn take(&self) -> HashMap<String, BTreeMap<String, Bullet>> {
        std::mem::take(&mut *self.rooms.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

fn full() -> ErrorBody {
    ErrorBody::new(
        ErrorCode::RateLimited,
        "too many bullets in this moment; retry",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_keeps_each_users_latest_bullet_and_refuses_with_codes() {
        let edge = BulletEdge::new(BulletConfig {
            blocklist: vec!["spam".into()],
            ..BulletConfig::default()
        });
        edge.send(0, "r1", "ann", "one").expect("sent");
        edge.send(10, "r1", "ann", "two").expect("sent");
        edge.send(10, "r2", "ann", "elsewhere").expect("sent");
        edge.send(20, "r1", "bob", "hi").expect("sent");
        let code = |r: Result<(), ErrorBody>| r.expect_err("refused").code;
        assert_eq!(
            code(edge.send(20, "r1", "cat", "SPAM!")),
            ErrorCode::InvalidArgument.as_u16()
        );
        assert_eq!(
            code(edge.send(20, "r1", "cat", &"x".repeat(51))),
            ErrorCode::InvalidArgument.as_u16()
        );
        edge.send(30, "r1", "ann", "three")
            .expect("the fourth is in the burst");
        assert_eq!(
            code(edge.send(30, "r1", "ann", "four")),
            ErrorCode::RateLimited.as_u16(),
            "the burst is per user, across rooms"
        );
        let taken = edge.take();
        assert_eq!(taken["r1"].len(), 2);
        assert_eq!(taken["r1"]["ann"].text, "three");
        assert_eq!(taken["r2"]["ann"].text, "elsewhere");
        assert!(edge.take().is_empty());
    }
}
