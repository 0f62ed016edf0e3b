//! The edge's batches to room owners: reactions and bullet comments counted or checked
//! here go to each room's owner in one message per batch window (see `reactions` and
//! `bullets` for the batchers), and the owner's side that takes them.

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use chorus_actors::room_actor::RoomMsg;
use chorus_cluster::metadata::NodeId;
use chorus_protocol::ErrorBody;

use crate::server::common::codec::{decode, request, Domain};
use chorus_actors::bullets::Bullet;

use crate::server::rooms::bullets::{BATCH_USERS_MAX, BULLET_BATCH_MS};
use crate::server::rooms::messages::{RoomMessage, RoomOpReply};
use crate::server::rooms::reactions::REACTION_BATCH_MS;
use crate::server::rooms::service::Rooms;

/// Sends the batches until the node goes away.
pub(crate) async fn send_reaction_batches(node: Weak<Rooms>) {
    let mut ticker =
        crate::server::context::NodeTicker::new(node, Duration::from_millis(REACTION_BATCH_MS));
    while let Some(node) = ticker.next().await {
        for (room_id, counts) in node.reactions.take() {
            let owner = node.ctx.owner_of(&room_id);
            if owner == node.ctx.cluster.node_id() {
                node.react_batch_here(&room_id, counts).await;
                continue;
            }
            let message = request(Domain::Rooms, &RoomMessage::ReactBatch { room_id, counts });
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
    node: &Arc<Rooms>,
    owner: NodeId,
    message: bytes::Bytes,
    what: &'static str,
    lost_metric: &'static str,
) {
    let node = node.clone();
    tokio::spawn(async move {
        match node.ctx.cluster.call_app(owner, message).await {
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

impl Rooms {
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

/// Sends the batches until the node goes away.
pub(crate) async fn send_bullet_batches(node: Weak<Rooms>) {
    let mut ticker =
        crate::server::context::NodeTicker::new(node, Duration::from_millis(BULLET_BATCH_MS));
    while let Some(node) = ticker.next().await {
        for (room_id, batch) in node.bullets.take() {
            let bullets: Vec<Bullet> = batch.into_values().collect();
            let owner = node.ctx.owner_of(&room_id);
            if owner == node.ctx.cluster.node_id() {
                node.bullet_batch_here(&room_id, bullets).await;
                continue;
            }
            let message = request(
                Domain::Rooms,
                &RoomMessage::BulletBatch { room_id, bullets },
            );
            send_batch(
                &node,
                owner,
                message,
                "bullet",
                "chorus_bullet_batches_lost_total",
            );
        }
    }
}

impl Rooms {
    /// Hands a bullet batch to the room's actor here (activating it if this node owns it
    /// and it is not running). At most [`BATCH_USERS_MAX`] bullets are taken from a batch
    /// (it may come from another node).
    pub(crate) async fn bullet_batch_here(&self, room_id: &str, mut bullets: Vec<Bullet>) {
        bullets.truncate(BATCH_USERS_MAX);
        let batch = RoomMsg::BulletBatch { bullets };
        self.cast_batch_here(room_id, batch, "bullet", "chorus_bullet_batches_lost_total")
            .await;
    }
}
