//! The rooms' side of the inter-node channel: what another node asks of this one about
//! rooms.

use std::sync::Arc;

use bytes::Bytes;
use chorus_actors::room::RoomError;
use chorus_protocol::{EncodedBody, ErrorBody, ErrorCode};

use crate::server::common::codec::{decode, encode};
use crate::server::rooms::messages::{CopyReply, RoomMessage, RoomOpReply, USER_NOTICE_USERS_MAX};
use crate::server::rooms::relay::RemoteMember;
use crate::server::rooms::replica::{SaveWhen, VotesRefused};
use crate::server::rooms::replicate::committed_epoch;
use crate::server::rooms::route::*;
use crate::server::rooms::service::Rooms;

impl Rooms {
    /// Answers a request from another node about rooms ([`Domain::Rooms`]).
    pub(crate) async fn handle_peer(&self, message: Bytes) -> Bytes {
        let node = self;
        match decode::<RoomMessage>(&message) {
            Ok(RoomMessage::Members { room_id, epoch }) => {
                encode(&node.recovery_for(&room_id, epoch))
            }
            Ok(RoomMessage::Replicate {
                room_id,
                epoch,
                durable,
            }) => copy_reply(node, &room_id, epoch, || {
                node.durable
                    .keep(&room_id, epoch, durable)
                    .map_err(VotesRefused::Stale)
            }),
            Ok(RoomMessage::ReplicateVotes {
                room_id,
                epoch,
                base_revision,
                revision,
                votes,
            }) => copy_reply(node, &room_id, epoch, || {
                node.durable
                    .apply_votes(&room_id, epoch, base_revision, revision, &votes)
            }),
            Ok(RoomMessage::ReplicateChange {
                room_id,
                epoch,
                base_revision,
                durable,
            }) => copy_reply(node, &room_id, epoch, || {
                node.durable
                    .apply_change(&room_id, epoch, base_revision, durable)
            }),
            Ok(RoomMessage::ReplicateComments {
                room_id,
                epoch,
                base_revision,
                delta,
            }) => copy_reply(node, &room_id, epoch, || {
                node.durable.apply_comments(
                    &room_id,
                    epoch,
                    base_revision,
                    delta,
                    SaveWhen::Deferred,
                )
            }),
            Ok(RoomMessage::ReactBatch { room_id, counts }) => {
                node.react_batch_here(&room_id, counts).await;
                encode(&Ok::<RoomOpReply, ErrorBody>(RoomOpReply::Done))
            }
            Ok(RoomMessage::BulletBatch { room_id, bullets }) => {
                node.bullet_batch_here(&room_id, bullets).await;
                encode(&Ok::<RoomOpReply, ErrorBody>(RoomOpReply::Done))
            }
            Ok(RoomMessage::LogComments {
                room_id,
                after,
                limit,
            }) => encode(&node.comments_held(&room_id, after, limit)),
            Ok(RoomMessage::LogTake { room_id }) => encode(
                &node
                    .event_log()
                    .map(|log| log.take(&room_id))
                    .unwrap_or_default(),
            ),
            Ok(RoomMessage::NodeLoad) => encode(&node.load().await),
            Ok(RoomMessage::ListenerCounts { room_ids }) => {
                encode(&node.listener_counts_here(&room_ids).await)
            }
            Ok(RoomMessage::EndSession { session_id }) => {
                node.end_session_resumed_elsewhere(&session_id).await;
                encode(&Ok::<RoomOpReply, ErrorBody>(RoomOpReply::Done))
            }
            Ok(RoomMessage::NotifyUsers {
                users,
                kind,
                msgpack,
                json,
            }) => {
                if let Some(body) = EncodedBody::from_parts(&kind, msgpack, json) {
                    let users = &users[..users.len().min(USER_NOTICE_USERS_MAX)];
                    node.ctx.deliver_to_users(users, &Arc::new(body));
                }
                encode(&Ok::<RoomOpReply, ErrorBody>(RoomOpReply::Done))
            }
            Ok(RoomMessage::Announce {
                room_id,
                kind,
                msgpack,
                json,
            }) => match EncodedBody::from_parts(&kind, msgpack, json) {
                Some(body) => encode(
                    &node
                        .announce_local(&room_id, Arc::new(body))
                        .await
                        .map(|()| RoomOpReply::Done),
                ),
                None => encode(&Err::<RoomOpReply, _>(ErrorBody::new(
                    ErrorCode::UnknownKind,
                    format!("unknown notification kind {kind:?}"),
                ))),
            },
            Ok(RoomMessage::Relay { items, .. }) => {
                node.mirrors.apply(items, &node.ctx.cluster.metadata());
                encode(&Ok::<RoomOpReply, ErrorBody>(RoomOpReply::Done))
            }
            Ok(RoomMessage::Room {
                from,
                room_id,
                member_key,
                op,
                deadline_ms,
            }) => {
                if deadline_ms.is_some_and(|d| chorus_actors::room_actor::unix_now_ms() > d) {
                    metrics::counter!("chorus_requests_past_deadline_total").increment(1);
                    return encode(&Err::<RoomOpReply, _>(room_error(
                        RoomError::DeadlineExceeded,
                    )));
                }
                let relay = node.relay_to(from);
                let member = RemoteMember::member(&room_id, member_key, relay);
                encode(&node.local_room_op(&room_id, member, op).await)
            }
            Err(error) => encode(&Err::<RoomOpReply, _>(error)),
        }
    }
}

/// Answers a copy of `room_id` written by its owner at `epoch` (whole, votes, or a change
/// without polls): fenced twice, by the epochs this node has seen (in `apply`) and by the
/// committed ownership in its metadata (here, before `apply` runs).
fn copy_reply(
    node: &Rooms,
    room_id: &str,
    epoch: u64,
    apply: impl FnOnce() -> Result<(), VotesRefused>,
) -> Bytes {
    let committed = committed_epoch(&node.ctx, room_id);
    let applied = if epoch < committed {
        Err(VotesRefused::Stale(committed))
    } else {
        apply()
    };
    encode(&Ok::<CopyReply, ErrorBody>(CopyReply::of(applied)))
}
