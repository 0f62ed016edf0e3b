//! Replication of a room's durable state before a change is acknowledged.

use std::sync::{Arc, Weak};
use std::time::Duration;

use chorus_actors::room::RoomDurable;
use chorus_actors::room_actor::DirectoryError;
use chorus_cluster::metadata::NodeId;
use chorus_protocol::{EncodedBody, Encoding, ErrorBody, UserId};

use crate::server::common::codec::{decode, request, Domain};
use crate::server::common::keys::room_key;
use crate::server::context::NodeContext;
use crate::server::rooms::messages::{CopyReply, RoomMessage, USER_NOTICE_USERS_MAX};
use crate::server::rooms::replica::{DurableStates, SaveWhen};

/// Time a replica has to take a room's durable state.
pub const REPLICATE_TIMEOUT_MS: u64 = 1_000;
/// Other nodes tried, in ring preference order, before a change counts as not replicated.
pub const REPLICA_CANDIDATES_MAX: usize = 3;

/// Replicates a room's durable state to another node before the change is acknowledged:
/// the next node on the ring for the room's key (the node that becomes its owner if this
/// one dies), or if it does not answer, the one after it (a room's next owner gathers the
/// most advanced copy from every node). A copy is kept here too.
pub struct NodeReplicator {
    /// What the node shares (weak: the node owns the room directory that owns this).
    pub ctx: Weak<NodeContext>,
    /// The room states held here.
    pub durable: Arc<DurableStates>,
}

/// The nodes a room's state is replicated to, in order of preference: the ring's next
/// owners of the room's key after this node (at most [`REPLICA_CANDIDATES_MAX`]).
pub(crate) fn replica_candidates(ctx: &NodeContext, room_id: &str) -> Vec<NodeId> {
    let self_id = ctx.cluster.node_id();
    ctx.cluster
        .ring()
        .map(|ring| ring.owners_n(&room_key(room_id), REPLICA_CANDIDATES_MAX + 1))
        .unwrap_or_default()
        .into_iter()
        .filter(|id| *id != self_id)
        .take(REPLICA_CANDIDATES_MAX)
        .collect()
}

/// Waits until this node's copies written so far are flushed to its disk: what a node
/// with no other member acknowledges (see [`crate::server::common::group_commit`]).
async fn own_copy_durable(ctx: &NodeContext) -> Result<(), DirectoryError> {
    ctx.group_commit
        .durable()
        .await
        .map_err(|e| DirectoryError::Replication(format!("own copy: {e}")))
}

/// The ownership epoch of `room_id` committed in this node's metadata (0 if none).
pub(crate) fn committed_epoch(ctx: &NodeContext, room_id: &str) -> u64 {
    ctx.committed_epoch_of(&room_key(room_id))
}

/// Sends a delta (`message`: votes, or a change without polls) to the first of
/// `candidates` that answers; `Ok` once it kept it. A refusal, or no answer from any, is
/// an error: the room then replicates its whole state.
async fn send_delta(
    ctx: &NodeContext,
    candidates: Vec<NodeId>,
    message: bytes::Bytes,
    what: &str,
) -> Result<(), DirectoryError> {
    let refused = |why: String| DirectoryError::Replication(why);
    for replica in candidates {
        let call = ctx.cluster.call_app(replica, message.clone());
        match tokio::time::timeout(Duration::from_millis(REPLICATE_TIMEOUT_MS), call).await {
            Ok(Ok(reply)) => {
                return match decode::<Result<CopyReply, ErrorBody>>(&reply) {
                    Ok(Ok(CopyReply::Kept)) => Ok(()),
                    Ok(Ok(refusal)) => Err(refused(format!("{refusal:?}"))),
                    Ok(Err(refusal)) => Err(refused(refusal.message)),
                    Err(error) => Err(refused(error.message)),
                };
            }
            Ok(Err(error)) => tracing::debug!(replica, %error, "{what}: replica unreachable"),
            Err(_) => tracing::debug!(replica, "{what}: replica silent"),
        }
    }
    Err(refused("no replica answered".into()))
}

impl NodeReplicator {
    pub(crate) async fn replicate_to_others(
        &self,
        ctx: &NodeContext,
        room_id: &str,
        epoch: u64,
        durable: RoomDurable,
    ) -> Result<(), DirectoryError> {
        let stale = |fence: u64| {
            DirectoryError::Replication(format!(
                "stale ownership epoch: room {room_id:?} is owned at epoch {fence}, this node holds epoch {epoch}"
            ))
        };
        let fence = self.durable.fence_of(room_id);
        if epoch < fence {
            return Err(stale(fence));
        }
        let candidates = replica_candidates(ctx, room_id);
        if candidates.is_empty() {
            // No other node exists: this node's disk is the only copy, so the change is
            // acknowledged only once a flush covers it (group commit).
            self.durable.keep(room_id, epoch, durable).map_err(stale)?;
            return own_copy_durable(ctx).await;
        }
        let message = request(
            Domain::Rooms,
            &RoomMessage::Replicate {
                room_id: room_id.to_string(),
                epoch,
                durable: durable.clone(),
            },
        );
        let mut failures = Vec::new();
        for replica in candidates {
            let call = ctx.cluster.call_app(replica, message.clone());
            match tokio::time::timeout(Duration::from_millis(REPLICATE_TIMEOUT_MS), call).await {
                Ok(Ok(reply)) => match decode::<Result<CopyReply, ErrorBody>>(&reply) {
                    Ok(Ok(CopyReply::Kept)) => {
                        return self.durable.keep(room_id, epoch, durable).map_err(stale);
                    }
                    Ok(Ok(CopyReply::Stale { fence })) => {
                        self.durable.fence(room_id, fence.max(epoch + 1));
                        return Err(stale(fence));
                    }
                    Ok(Ok(CopyReply::OutOfStep)) => {
                        failures.push(format!("node {replica}: out of step"))
                    }
                    Ok(Err(refusal)) => {
                        failures.push(format!("node {replica}: {}", refusal.message))
                    }
                    Err(error) => failures.push(format!("node {replica}: {}", error.message)),
                },
                Ok(Err(error)) => failures.push(format!("node {replica}: {error}")),
                Err(_) => failures.push(format!(
                    "node {replica}: no answer in {REPLICATE_TIMEOUT_MS} ms"
                )),
            }
            metrics::counter!("chorus_replication_failures_total").increment(1);
        }
        Err(DirectoryError::Replication(format!(
            "no other node took the room's state ({})",
            failures.join("; ")
        )))
    }
}

impl NodeReplicator {
    /// Sends a vote delta to the first replica candidate that answers (the one that took
    /// the last whole state, unless it failed since). Any refusal (out of step, a newer
    /// owner) or silence is an `Err`: the room then replicates its whole state, which
    /// handles every case as for any change.
    async fn replicate_votes_to_others(
        &self,
        ctx: &NodeContext,
        room_id: &str,
        epoch: u64,
        base_revision: u64,
        revision: u64,
        votes: Vec<chorus_actors::polls::VoteRecord>,
    ) -> Result<(), DirectoryError> {
        let candidates = replica_candidates(ctx, room_id);
        let refused = |why: String| DirectoryError::Replication(why);
        let apply_here = || {
            self.durable
                .apply_votes(room_id, epoch, base_revision, revision, &votes)
                .map_err(|e| refused(format!("own copy: {e:?}")))
        };
        if candidates.is_empty() {
            // As for a whole state: on disk before the votes are answered.
            apply_here()?;
            return own_copy_durable(ctx).await;
        }
        let message = request(
            Domain::Rooms,
            &RoomMessage::ReplicateVotes {
                room_id: room_id.to_string(),
                epoch,
                base_revision,
                revision,
                votes: votes.clone(),
            },
        );
        send_delta(ctx, candidates, message, "vote delta").await?;
        // The local copy follows; if it cannot, the next whole state brings it up to date.
        let _ = apply_here();
        Ok(())
    }

    /// Replicates a change that left the polls alone as the state without them, against
    /// `base_revision` (see `DurableSink::replicate_change`): its cost does not grow with
    /// the polls' votes. A refusal or no answer makes the room send its whole state.
    async fn replicate_change_to_others(
        &self,
        ctx: &NodeContext,
        room_id: &str,
        epoch: u64,
        base_revision: u64,
        change: RoomDurable,
    ) -> Result<(), DirectoryError> {
        let candidates = replica_candidates(ctx, room_id);
        let refused = |why: String| DirectoryError::Replication(why);
        if candidates.is_empty() {
            // As for a whole state: on disk before the change is acknowledged.
            self.durable
                .apply_change(room_id, epoch, base_revision, change)
                .map_err(|e| refused(format!("own copy: {e:?}")))?;
            return own_copy_durable(ctx).await;
        }
        let message = request(
            Domain::Rooms,
            &RoomMessage::ReplicateChange {
                room_id: room_id.to_string(),
                epoch,
                base_revision,
                durable: change.clone(),
            },
        );
        send_delta(ctx, candidates, message, "change").await?;
        // The local copy follows; if it cannot, the next whole state brings it up to date.
        let _ = self
            .durable
            .apply_change(room_id, epoch, base_revision, change);
        Ok(())
    }
}

impl NodeReplicator {
    /// Replicates the comments posted since `base_revision` as a delta (see
    /// `DurableSink::replicate_comments`): its cost is the new comments'. A refusal or no
    /// answer makes the room send its whole state.
    async fn replicate_comments_to_others(
        &self,
        ctx: &NodeContext,
        room_id: &str,
        epoch: u64,
        base_revision: u64,
        delta: chorus_actors::room::CommentsDelta,
    ) -> Result<(), DirectoryError> {
        let candidates = replica_candidates(ctx, room_id);
        let refused = |why: String| DirectoryError::Replication(why);
        if candidates.is_empty() {
            // As for a whole state: on disk before the comments are acknowledged.
            self.durable
                .apply_comments(room_id, epoch, base_revision, delta, SaveWhen::Now)
                .map_err(|e| refused(format!("own copy: {e:?}")))?;
            return own_copy_durable(ctx).await;
        }
        let message = request(
            Domain::Rooms,
            &RoomMessage::ReplicateComments {
                room_id: room_id.to_string(),
                epoch,
                base_revision,
                delta: delta.clone(),
            },
        );
        send_delta(ctx, candidates, message, "comments").await?;
        // The local copy follows; if it cannot, the next whole state brings it up to date.
        let _ =
            self.durable
                .apply_comments(room_id, epoch, base_revision, delta, SaveWhen::Deferred);
        Ok(())
    }
}

impl chorus_actors::room_actor::DurableSink for NodeReplicator {
    fn notify_users(&self, users: Vec<UserId>, body: Arc<EncodedBody>) {
        let Some(ctx) = self.ctx.upgrade() else {
            return;
        };
        ctx.deliver_to_users(&users, &body);
        let others = ctx.live_peers();
        for chunk in users.chunks(USER_NOTICE_USERS_MAX) {
            let message = request(
                Domain::Rooms,
                &RoomMessage::NotifyUsers {
                    users: chunk.to_vec(),
                    kind: body.kind().to_string(),
                    msgpack: body.body_bytes(Encoding::MsgPack).clone(),
                    json: body.body_bytes(Encoding::Json).clone(),
                },
            );
            for &peer in &others {
                let ctx = ctx.clone();
                let message = message.clone();
                tokio::spawn(async move {
                    if let Err(error) = ctx.cluster.call_app(peer, message).await {
                        tracing::debug!(peer, %error, "user notice not delivered");
                    }
                });
            }
        }
    }

    fn replicate<'a>(
        &'a self,
        room_id: &'a str,
        epoch: u64,
        durable: RoomDurable,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), DirectoryError>> + Send + 'a>>
    {
        Box::pin(async move {
            let Some(ctx) = self.ctx.upgrade() else {
                return Err(DirectoryError::Replication("node shutting down".into()));
            };
            self.replicate_to_others(&ctx, room_id, epoch, durable)
                .await
        })
    }

    fn replicate_votes<'a>(
        &'a self,
        room_id: &'a str,
        epoch: u64,
        base_revision: u64,
        revision: u64,
        votes: Vec<chorus_actors::polls::VoteRecord>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), DirectoryError>> + Send + 'a>>
    {
        Box::pin(async move {
            let Some(ctx) = self.ctx.upgrade() else {
                return Err(DirectoryError::Replication("node shutting down".into()));
            };
            self.replicate_votes_to_others(&ctx, room_id, epoch, base_revision, revision, votes)
                .await
        })
    }

    fn replicate_comments<'a>(
        &'a self,
        room_id: &'a str,
        epoch: u64,
        base_revision: u64,
        delta: chorus_actors::room::CommentsDelta,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), DirectoryError>> + Send + 'a>>
    {
        Box::pin(async move {
            let Some(ctx) = self.ctx.upgrade() else {
                return Err(DirectoryError::Replication("node shutting down".into()));
            };
            self.replicate_comments_to_others(&ctx, room_id, epoch, base_revision, delta)
                .await
        })
    }

    fn replicate_change<'a>(
        &'a self,
        room_id: &'a str,
        epoch: u64,
        base_revision: u64,
        change: RoomDurable,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), DirectoryError>> + Send + 'a>>
    {
        Box::pin(async move {
            let Some(ctx) = self.ctx.upgrade() else {
                return Err(DirectoryError::Replication("node shutting down".into()));
            };
            self.replicate_change_to_others(&ctx, room_id, epoch, base_revision, change)
                .await
        })
    }
}
