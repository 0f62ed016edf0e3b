//! Room activation and recovery: claim the room, fence the other nodes, gather the copies,
//! continue from the most advanced, re-admit the members.
//!
//! A room's actor starts on its owner when a request needs it: the room was created, its
//! owner moved or died, it was released while idle, or it stopped after a failed
//! replication. Before it serves anything (`Rooms::activate_room`):
//!
//! 1. **Claim.** `ClaimOwnership` through Raft is granted only to the room's owner on the
//!    committed ring, at an epoch one above the previous claim, so every activation has a
//!    new, higher epoch. The new owner then waits (at most 5 s) until it has applied its
//!    own claim: a node that has just joined may still be applying old log entries that
//!    name members long gone, some of whose addresses now belong to others.
//! 2. **Fence and gather.** It tells every live node the epoch (`RoomMessage::Members`,
//!    all at once, 1 s each). From then on each node refuses copies from older owners, and
//!    a node still running the room stops it (`Rooms::recovery_for`). Each answers with its
//!    sessions in the room (with the latest comment id each has) and the most advanced copy
//!    it holds. A node that does not answer is skipped: its sessions re-join when they next
//!    act.
//! 3. **Recover.** The room continues from the most advanced copy by (epoch, revision,
//!    comment count) (`chorus_actors::replica::most_advanced`) and copies it to another
//!    node at the new epoch (best effort: the next change replicates again, and fails if it
//!    cannot).
//! 4. **Re-admit.** This node's sessions join as themselves, other nodes' through that
//!    node's relay, each asking for the comments after the latest it has.
//!
//! Replicas refuse a copy whose epoch is below the highest they have seen or below the
//! committed ownership in their metadata, and an owner refused that way stops at once
//! (fail-stop, see `chorus_actors::room_actor`). How this keeps one order of comments
//! across a failover, file by file, is in `docs/design.md` ("A room across a failover").
//!
//! `Rooms::activate` also settles "not found" on a node that may not have applied the
//! room's definition yet: after one ReadIndex through the leader, or at most 2 s of
//! metadata changes without a leader.

use std::time::Duration;

use chorus_actors::room_actor::{DirectoryError, RoomMsg};
use chorus_cluster::metadata::NodeId;
use chorus_protocol::ErrorBody;
use ractor::ActorRef;

use crate::server::common::codec::{decode, request, Domain};
use crate::server::common::keys::room_key;
use crate::server::rooms::messages::{RoomMessage, RoomRecovery};
use crate::server::rooms::relay::RemoteMember;
use crate::server::rooms::route::*;
use crate::server::rooms::service::Rooms;

impl Rooms {
    /// A room's actor was just started here (it was created, it moved, its owner died, or
    /// it stopped after a failed replication). Before it serves anything:
    ///
    /// 1. claim ownership through Raft (granted only to the room's owner on the committed
    ///    ring; each claim is a new, higher epoch);
    /// 2. tell every node the new epoch (they refuse older owners' writes from then on and
    ///    stop acting for the room) and gather its members and durable state, all nodes at
    ///    once, each within [`READMIT_QUERY_TIMEOUT_MS`] (a node that does not answer is
    ///    skipped: its sessions re-join when they next act);
    /// 3. continue from the most advanced state, by (epoch, revision, comment count), and
    ///    replicate it at the new epoch;
    /// 4. re-admit the members, so none misses what the room does next.
    pub(crate) async fn activate_room(
        &self,
        room_id: &str,
        actor: ActorRef<RoomMsg>,
    ) -> Result<(), DirectoryError> {
        // Activations run concurrently, each room on its own (see `RoomDirectory`).
        let gauge = metrics::gauge!("chorus_room_activations_in_progress");
        gauge.increment(1.0);
        let result = self.activate_room_inner(room_id, actor).await;
        gauge.decrement(1.0);
        result
    }

    async fn activate_room_inner(
        &self,
        room_id: &str,
        actor: ActorRef<RoomMsg>,
    ) -> Result<(), DirectoryError> {
        let key = room_key(room_id);
        let self_id = self.ctx.cluster.node_id();
        let activation_error = |reason: String| DirectoryError::Activation {
            room: room_id.to_string(),
            reason,
        };
        let claim = chorus_cluster::metadata::MetadataCommand::ClaimOwnership {
            key: key.clone(),
            node: self_id,
        };
        let epoch = match self.ctx.cluster.write(claim).await {
            Ok(chorus_cluster::metadata::MetadataResponse::OwnershipGranted(granted)) => {
                granted.epoch
            }
            Ok(other) => return Err(activation_error(format!("ownership claim: {other:?}"))),
            Err(error) => return Err(activation_error(format!("ownership claim: {error}"))),
        };
        // The claim was decided by the leader; wait until this node has applied it too, so
        // that the members asked below are the current ones (the log applies in order: a
        // node that has just joined may still be applying old entries, naming members long
        // gone, some of whose addresses now belong to others).
        let mut metadata = self.ctx.cluster.subscribe_metadata();
        let applied =
            tokio::time::timeout(Duration::from_millis(CLAIM_APPLIED_TIMEOUT_MS), async {
                while metadata
                    .borrow_and_update()
                    .owners
                    .get(&key)
                    .map_or(0, |o| o.epoch)
                    < epoch
                {
                    if metadata.changed().await.is_err() {
                        return false;
                    }
                }
                true
            })
            .await;
        if !matches!(applied, Ok(true)) {
            return Err(activation_error(format!(
                "the ownership claim at epoch {epoch} was not applied here within \
                 {CLAIM_APPLIED_TIMEOUT_MS} ms"
            )));
        }
        self.owned_epochs.set(room_id, epoch);
        let others = self.ctx.live_peers();
        let queries = others.into_iter().map(|node_id| {
            let query = request(Domain::Rooms, &RoomMessage::Members {
                room_id: room_id.to_string(),
                epoch,
            });
            async move {
                let call = self.ctx.cluster.call_app(node_id, query);
                let answer = tokio::time::timeout(
                    Duration::from_millis(READMIT_QUERY_TIMEOUT_MS),
                    call,
                )
                .await;
                match answer {
                    Ok(Ok(reply)) => match decode::<RoomRecovery>(&reply) {
                        Ok(recovery) => Some((node_id, recovery)),
                        Err(error) => {
                            tracing::warn!(room = %room_id, node = node_id, %error.message, "bad recovery answer");
                            None
                        }
                    },
                    _ => {
                        tracing::warn!(room = %room_id, node = node_id, "no recovery answer from node");
                        None
                    }
                }
            }
        });
        let mut recoveries: Vec<(NodeId, RoomRecovery)> = futures_util::future::join_all(queries)
            .await
            .into_iter()
            .flatten()
            .collect();
        let local = self.local_sessions(room_id);
        recoveries.push((
            self_id,
            RoomRecovery {
                members: Vec::new(),
                durable: self.durable.fence(room_id, epoch),
            },
        ));
        let durable = chorus_actors::replica::most_advanced(
            recoveries.iter().filter_map(|(_, r)| r.durable.clone()),
        )
        .map(|(_, d)| d);
        let restored = durable.as_ref().map(|d| d.comment_count).unwrap_or(0);
        let current = ask(&actor, |reply| RoomMsg::Restore {
            epoch,
            durable: durable.map(Box::new),
            reply,
        })
        .await
        .map_err(|e| activation_error(e.message))?;
        // The state at the new epoch on a second node (best effort: the next comment
        // replicates it again, and is refused if this fails for good).
        if let Err(error) = self
            .replicator
            .replicate_to_others(&self.ctx, room_id, epoch, current)
            .await
        {
            tracing::warn!(room = %room_id, epoch, %error, "replicating an activated room's state failed");
        }
        // This node's sessions as themselves, the others' through their node's relay.
        let local = local
            .into_iter()
            .map(|(session, since)| (session.member(), session.user_id.clone(), Some(since)));
        let remote = recoveries.into_iter().flat_map(|(node_id, recovery)| {
            let relay = (node_id != self_id).then(|| self.relay_to(node_id));
            recovery
                .members
                .into_iter()
                .filter_map(move |(key, user, since)| {
                    let member = RemoteMember::member(room_id, key, relay.clone()?);
                    Some((member, user, since))
                })
        });
        let mut readmitted = 0;
        for (member, user, since) in local.chain(remote) {
            let joined = ask(&actor, |reply| RoomMsg::Join {
                member,
                user,
                since,
                reply,
            })
            .await;
            if matches!(joined, Ok(Ok(_))) {
                readmitted += 1;
            }
        }
        tracing::info!(room = %room_id, epoch, readmitted, restored, "room activated");
        Ok(())
    }

    /// Another node activates `room_id` at `epoch`: refuse older writes from now on, stop
    /// acting for the room here if this node still did, and report what this node knows.
    pub(crate) fn recovery_for(&self, room_id: &str, epoch: u64) -> RoomRecovery {
        let durable = self.durable.fence(room_id, epoch);
        let owned = self.owned_epochs.of(room_id);
        if matches!(owned, Some(own) if own < epoch) {
            // Not awaited: the directory may be busy activating another room that waits
            // for this node's answer.
            if let Some(node) = self.this.upgrade() {
                let room_id = room_id.to_string();
                tokio::spawn(async move {
                    let stopped = node.directory.stop_unless(|id| id != room_id).await;
                    if stopped > 0 {
                        tracing::info!(room = %room_id, epoch, "a newer owner took the room: stopped here");
                    }
                });
            }
        }
        RoomRecovery {
            members: self.local_members(room_id),
            durable,
        }
    }

    /// The running actor of a room this node owns, activated (with its members re-admitted)
    /// if needed. A node that has just joined may not have applied the room's definition
    /// yet: "not found" is believed once this node caught up with what the leader had
    /// committed (one ReadIndex, see `ClusterService::catch_up`), or, with no leader to
    /// ask, after the metadata stops changing for a moment (at most
    /// [`DEFINITION_SETTLE_MS`]).
    pub(crate) async fn activate(&self, room_id: &str) -> Result<ActorRef<RoomMsg>, ErrorBody> {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(DEFINITION_SETTLE_MS);
        let mut metadata = self.ctx.cluster.subscribe_metadata();
        let (mut asked_leader, mut caught_up) = (false, false);
        loop {
            match self
                .directory
                .get_with(room_id, |actor| self.activate_room(room_id, actor))
                .await
            {
                Err(DirectoryError::NotFound(_)) if tokio::time::Instant::now() < deadline => {
                    // Catch up with what the leader has committed (one ReadIndex): then a
                    // definition still missing does not exist, and the answer is at once.
                    if !asked_leader {
                        asked_leader = true;
                        let caught = tokio::time::timeout_at(deadline, self.ctx.cluster.catch_up());
                        if matches!(caught.await, Ok(Ok(_))) {
                            caught_up = true;
                            continue;
                        }
                    } else if caught_up {
                        return Err(directory_error(DirectoryError::NotFound(
                            room_id.to_string(),
                        )));
                    }
                    let changed = tokio::time::timeout_at(deadline, metadata.changed()).await;
                    if !matches!(changed, Ok(Ok(()))) {
                        return Err(directory_error(DirectoryError::NotFound(
                            room_id.to_string(),
                        )));
                    }
                }
                other => return other.map_err(directory_error),
            }
        }
    }
}
