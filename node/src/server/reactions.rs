//! Reactions batched at the edge (SPEC R7): a node acknowledges a member's reaction at
//! once and counts it per room and emoji; every [`REACTION_BATCH_MS`] it sends each room's
//! counts to the room's owner in one message. So 50,000 reactions a second cost the owner
//! a few messages per node and window, not one request each; the owner's window then
//! aggregates them for the members as before.
//!
//! Reactions are counts, not records: one the owner cannot take (it moved or died between
//! the acknowledgment and the batch) is lost, as the window it would have been in is.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use chorus_actors::room_actor::RoomMsg;

use super::routing::{decode, encode, NodeMessage, RoomOpReply};
use super::Node;
use chorus_cluster::metadata::NodeId;
use chorus_protocol::ErrorBody;

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

    fn take(&self) -> HashMap<String, BTreeMap<String, u64>> {
        std::mem::take(&mut *self.rooms.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Sends the batches until the node goes away.
pub(crate) async fn send_batches(node: Weak<Node>) {
    let mut ticker = super::NodeTicker::new(node, Duration::from_millis(REACTION_BATCH_MS));
    while let Some(node) = ticker.next().await {
        for (room_id, counts) in node.reactions.take() {
            let owner = node.owner_of(&room_id);
            if owner == node.cluster.node_id() {
                node.react_batch_here(&room_id, counts).await;
                continue;
            }
            let message = encode(&NodeMessage::ReactBatch { room_id, counts });
            send_batch(
                &node,
                owner,
                message,
                "reaction",
                "chorus_reaction_batches_lost_total",
            );
        }
    }
}

/// Sends an edge batch (`message`) to `owner` in its own task, so a slow owner delays only
/// its own rooms; a lost batch counts in `lost_metric`.
pub(crate) fn send_batch(
    node: &Arc<Node>,
    owner: NodeId,
    message: bytes::Bytes,
    what: &'static str,
    lost_metric: &'static str,
) {
    let node = node.clone();
    tokio::spawn(async move {
        match node.cluster.call_app(owner, message).await {
            Ok(reply) => {
                if let Ok(Err(error)) = decode::<Result<RoomOpReply, ErrorBody>>(&reply) {
                    tracing::debug!(owner, what, %error.message, "edge batch refused");
                }
            }
            Err(error) => {
                metrics::counter!(lost_metric).increment(1);
                tracing::debug!(owner, what, %error, "edge batch lost");
            }
        }
    });
}

impl Node {
    /// Hands a reaction batch to the room's actor here (activating it if this node owns
    /// it and it is not running).
    pub(crate) async fn react_batch_here(&self, room_id: &str, counts: BTreeMap<String, u64>) {
        let batch = RoomMsg::ReactBatch { counts };
        self.cast_batch_here(
            room_id,
            batch,
            "reaction",
            "chorus_reaction_batches_lost_total",
        )
        .await;
    }

    /// Hands an edge batch to the room's actor here, activating it if this node owns it
    /// and it is not running; a batch the room cannot take counts in `lost_metric`.
    pub(crate) async fn cast_batch_here(
        &self,
        room_id: &str,
        batch: RoomMsg,
        what: &'static str,
        lost_metric: &'static str,
    ) {
        match self.activate(room_id).await {
            Ok(actor) => {
                let _ = actor.cast(batch);
            }
            Err(error) => {
                metrics::counter!(lost_metric).increment(1);
                tracing::debug!(room = %room_id, what, %error.message, "edge batch not taken");
            }
        }
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
