//! Any-edge routing of room requests to the room's owner, history reads, session
//! takeover, announcements.
//!
//! - **Routing.** A session's room request runs on the owner of `room/<id>` on this node's
//!   ring: in the local room actor, or as `RoomMessage::Room` over the inter-node link. A
//!   call is raced against ring changes and follows the new owner, at most
//!   [`ROUTE_RETRIES_MAX`] times; a member the owner does not know (the room was just
//!   activated again there) re-joins once before the request is retried. A node that is
//!   cut off answers requests for rooms owned elsewhere with `unavailable` at once, those
//!   already waiting included.
//! - **Deadlines and retries.** A request that goes to a room carries a deadline
//!   [`REQUEST_DEADLINE_MS`] (10 s) after the edge started on it; an owner that gets it
//!   later refuses it (`5002 deadline_exceeded`) instead of running what its client has
//!   given up on. A comment carries a request id (the client's, or one the edge makes per
//!   connection and seq), remembered with the room's replicated state, so a retry (the
//!   client's, or the edge's on a new owner) is answered, not posted twice.
//! - **History.** `room.comments` reads every live node's part of the room's event log and
//!   the room states they hold (`RoomMessage::LogComments`), merged by id, consecutive
//!   from the requested one: this is how a client fetches what a `room.gap` named.
//! - **Takeover.** A node that does not hold a resumed session takes it over if the id was
//!   minted for the user (`SessionIds`). The home node, if up, is told to end its copy
//!   (over the actor mesh, an RPC as fallback). The new session, under a new id the client
//!   adopts, numbers on from the client's `last_seq` and re-joins each room asking for the
//!   comments after the id the client has, retrying for up to [`TAKEOVER_JOIN_WINDOW_MS`]
//!   while the room's owner is the node that just died. If a room's recent log no longer
//!   reaches back that far, the client must resync.
//! - **Announcements.** A notice for a room's members (a quiz question, a rain's start)
//!   goes through the room's owner and is fanned out like any room event.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chorus_actors::room::RoomError;
use chorus_actors::room_actor::{DirectoryError, Member, RoomMsg};
use chorus_cluster::metadata::NodeId;
use chorus_protocol::{EncodedBody, Encoding, ErrorBody, ErrorCode};
use ractor::{ActorRef, RpcReplyPort};

use crate::server::common::codec::{decode, request, Domain};
use crate::server::rooms::messages::{RoomMessage, RoomOp, RoomOpReply};
use crate::server::rooms::relay::EdgeRelay;
use crate::server::rooms::service::Rooms;
use crate::server::sessions::session::Session;

/// How long an owner waits for its metadata to catch up before it answers that a room
/// does not exist.
pub const DEFINITION_SETTLE_MS: u64 = 2_000;
/// How long an activating owner waits to apply its own ownership claim (a node that has
/// just joined may still be catching up with the log).
pub const CLAIM_APPLIED_TIMEOUT_MS: u64 = 5_000;
/// How long a history read (`room.comments`) waits for each other node's part.
pub const HISTORY_READ_TIMEOUT_MS: u64 = 2_000;
/// Time each node has to list its members of a room being activated.
pub const READMIT_QUERY_TIMEOUT_MS: u64 = 1_000;
/// How long a session takeover keeps trying to re-join a room whose owner is unavailable
/// (typically: the node that died, until it is marked down). Below the client library's
/// connect timeout.
pub const TAKEOVER_JOIN_WINDOW_MS: u64 = 4_000;
/// Pause between those tries, unless the metadata changes first.
pub const TAKEOVER_RETRY_PAUSE_MS: u64 = 200;
/// How long the node works on a request that goes to a room before it answers `5001`; the
/// room does not run a request that reaches it after this deadline (`5002`).
pub const REQUEST_DEADLINE_MS: u64 = 10_000;
/// Times a room request follows ownership to a new node before it gives up.
pub const ROUTE_RETRIES_MAX: u32 = 3;

/// Time a room has to answer a request before the client gets `unavailable`.
const ROOM_CALL_TIMEOUT_MS: u64 = 5_000;

/// Asks a room actor and waits (bounded) for its answer.
pub(crate) async fn ask<T: Send + 'static>(
    actor: &ActorRef<RoomMsg>,
    message: impl FnOnce(RpcReplyPort<T>) -> RoomMsg,
) -> Result<T, ErrorBody> {
    match actor
        .call(message, Some(Duration::from_millis(ROOM_CALL_TIMEOUT_MS)))
        .await
    {
        Ok(ractor::rpc::CallResult::Success(value)) => Ok(value),
        Ok(ractor::rpc::CallResult::Timeout) => Err(ErrorBody::new(
            ErrorCode::Unavailable,
            "the room did not answer in time",
        )),
        Ok(ractor::rpc::CallResult::SenderError) | Err(_) => Err(ErrorBody::new(
            ErrorCode::Unavailable,
            "the room is not available (it may have ended)",
        )),
    }
}

/// A room refusal as a wire error.
pub(crate) fn room_error(error: RoomError) -> ErrorBody {
    ErrorBody::new(error.code(), error.to_string())
}

/// A directory failure as a wire error.
pub(crate) fn directory_error(error: DirectoryError) -> ErrorBody {
    let code = match &error {
        DirectoryError::NotFound(_) => ErrorCode::RoomNotFound,
        DirectoryError::Ended(_) => ErrorCode::RoomEnded,
        DirectoryError::Exists(_) => ErrorCode::Internal,
        DirectoryError::Activation { .. } | DirectoryError::Replication(_) => {
            tracing::warn!(%error, "room not available here");
            ErrorCode::Unavailable
        }
        DirectoryError::Store(_) | DirectoryError::Spawn(_) => {
            tracing::error!(%error, "room directory failure");
            ErrorCode::Internal
        }
    };
    ErrorBody::new(code, error.to_string())
}

impl Rooms {
    /// The comments of `room_id` with ids in `after + 1 ..= after + limit` that this node
    /// has: from its part of the room's event log and from the room's state it holds (the
    /// recent comments, as owner or replica).
    pub(crate) fn comments_held(
        &self,
        room_id: &str,
        after: u64,
        limit: u64,
    ) -> Vec<chorus_protocol::CommentEvent> {
        let mut comments = self
            .event_log()
            .map(|log| log.comments_after(room_id, after, limit))
            .unwrap_or_default();
        let wanted = after + 1..=after.saturating_add(limit);
        comments.extend(
            self.durable
                .held_states()
                .into_iter()
                .filter(|(id, _, _)| id == room_id)
                .flat_map(|(_, _, durable)| durable.recent_comments)
                .filter(|c| wanted.contains(&c.comment_id)),
        );
        comments
    }

    /// A page of `room_id`'s comments after `after` (`room.comments`): from every live
    /// node's event log part and held room states, merged by id, consecutive from
    /// `after + 1`; with the room's comment count from its owner.
    pub(crate) async fn room_comments(
        &self,
        session: &Arc<Session>,
        room_id: &str,
        after: u64,
        limit: u64,
    ) -> Result<chorus_protocol::RoomCommentsResponse, ErrorBody> {
        let comment_count = match self.room_op(session, room_id, RoomOp::Info).await? {
            RoomOpReply::Info(info) => info.comment_count,
            other => {
                return Err(ErrorBody::new(
                    ErrorCode::Internal,
                    format!("unexpected answer {other:?}"),
                ))
            }
        };
        let limit = limit.min(comment_count.saturating_sub(after));
        let mut found: BTreeMap<u64, chorus_protocol::CommentEvent> = self
            .comments_held(room_id, after, limit)
            .into_iter()
            .map(|c| (c.comment_id, c))
            .collect();
        if (found.len() as u64) < limit {
            let message = request(
                Domain::Rooms,
                &RoomMessage::LogComments {
                    room_id: room_id.to_string(),
                    after,
                    limit,
                },
            );
            let calls = self.ctx.live_peers().into_iter().map(|peer| {
                let call = self.ctx.cluster.call_app(peer, message.clone());
                async move {
                    match tokio::time::timeout(Duration::from_millis(HISTORY_READ_TIMEOUT_MS), call)
                        .await
                    {
                        Ok(Ok(reply)) => {
                            decode::<Vec<chorus_protocol::CommentEvent>>(&reply).unwrap_or_default()
                        }
                        _ => Vec::new(),
                    }
                }
            });
            for part in futures_util::future::join_all(calls).await {
                for comment in part {
                    found.entry(comment.comment_id).or_insert(comment);
                }
            }
        }
        let comments = found
            .into_values()
            .enumerate()
            .take_while(|(i, c)| c.comment_id == after + 1 + *i as u64)
            .map(|(_, c)| c)
            .collect();
        Ok(chorus_protocol::RoomCommentsResponse {
            comments,
            comment_count,
        })
    }

    /// Re-joins `session` to `room_id`, asking for the comments after the latest it has:
    /// after a ring change, a cut, or a gap in the order.
    pub(crate) async fn rejoin(
        &self,
        session: &Arc<Session>,
        room_id: &str,
    ) -> Result<RoomOpReply, ErrorBody> {
        let user = session.user_id.clone();
        let since = session.with_core(|core| core.room_position(room_id));
        self.room_op(session, room_id, RoomOp::Join { user, since })
            .await
    }

    /// The relay from this node to `edge` (started on first use).
    pub(crate) fn relay_to(&self, edge: NodeId) -> Arc<EdgeRelay> {
        // Voice goes to the edge as datagrams, which need an open connection.
        self.ctx.cluster.ensure_connected(edge);
        let mut relays = self.relays.lock().unwrap_or_else(|e| e.into_inner());
        relays
            .entry(edge)
            .or_insert_with(|| {
                EdgeRelay::start(Arc::downgrade(&self.ctx), self.owned_epochs.clone(), edge)
            })
            .clone()
    }

    /// Refuses a comment at once (`5001`) while this node delivers behind what it takes
    /// (see [`delivery_behind`](crate::server::sessions::session::delivery_behind)): on
    /// the edge that took it and on the room's owner, so that under overload what is
    /// acknowledged is still delivered promptly.
    fn refuse_comment_if_behind(&self, op: &RoomOp) -> Result<(), ErrorBody> {
        if !matches!(op, RoomOp::Comment { .. }) {
            return Ok(());
        }
        let connections = self
            .ctx
            .connections
            .load(std::sync::atomic::Ordering::Relaxed);
        if crate::server::sessions::session::delivery_behind(connections) {
            metrics::counter!("chorus_comments_refused_total", "reason" => "delivery_behind")
                .increment(1);
            return Err(ErrorBody::new(
                ErrorCode::Unavailable,
                "the node delivers behind what it takes; retry later",
            ));
        }
        Ok(())
    }

    /// Runs `op` for `session` on the room's owner: here, or over the inter-node link.
    ///
    /// Ownership can move while a request is under way (a node joined, drained or died):
    /// a remote call is raced against ring changes and retried on the new owner, and a
    /// member the owner does not know (its room was just re-activated there) re-joins
    /// once before the request is retried.
    pub(crate) async fn room_op(
        &self,
        session: &Arc<Session>,
        room_id: &str,
        op: RoomOp,
    ) -> Result<RoomOpReply, ErrorBody> {
        self.refuse_comment_if_behind(&op)?;
        let deadline_ms = chorus_actors::room_actor::unix_now_ms() + REQUEST_DEADLINE_MS;
        let result = self
            .room_op_once(session, room_id, op.clone(), deadline_ms)
            .await;
        let rejoin = matches!(op, RoomOp::Comment { .. } | RoomOp::Vote { .. });
        match result {
            Err(error)
                if rejoin
                    && error.code == ErrorCode::NotInRoom.as_u16()
                    && session.with_core(|core| core.in_room(room_id)) =>
            {
                let user = session.user_id.clone();
                let since = session.with_core(|core| core.room_position(room_id));
                self.room_op_once(session, room_id, RoomOp::Join { user, since }, deadline_ms)
                    .await?;
                self.room_op_once(session, room_id, op, deadline_ms).await
            }
            other => other,
        }
    }

    async fn room_op_once(
        &self,
        session: &Arc<Session>,
        room_id: &str,
        op: RoomOp,
        deadline_ms: u64,
    ) -> Result<RoomOpReply, ErrorBody> {
        let mut attempts = 0;
        loop {
            let mut metadata = self.ctx.cluster.subscribe_metadata();
            let epoch = metadata.borrow().ring_epoch;
            let call = self.room_op_at_owner(session, room_id, op.clone(), deadline_ms);
            // A request waiting on another node is answered at once when this node finds
            // itself cut off (a local room answers on its own: it cannot replicate).
            let mut cut_off = self.ctx.cluster.subscribe_cut_off();
            let owner_remote = self.ctx.owner_of(room_id) != self.ctx.cluster.node_id();
            let cut = async {
                if !owner_remote || cut_off.wait_for(|cut| *cut).await.is_err() {
                    std::future::pending::<()>().await;
                }
            };
            let ring_changed = async {
                while metadata.changed().await.is_ok() {
                    if metadata.borrow().ring_epoch != epoch {
                        return;
                    }
                }
                std::future::pending::<()>().await
            };
            tokio::select! {
                result = call => return result,
                () = cut => {
                    return Err(ErrorBody::new(
                        ErrorCode::Unavailable,
                        "this node is cut off from the cluster and cannot reach the room's \
                         owner: reconnect to another node",
                    ));
                }
                _ = ring_changed, if attempts < ROUTE_RETRIES_MAX => {
                    attempts += 1;
                    tracing::debug!(room = %room_id, attempts, "ring changed during a room request; retrying on the new owner");
                }
            }
        }
    }

    async fn room_op_at_owner(
        &self,
        session: &Arc<Session>,
        room_id: &str,
        op: RoomOp,
        deadline_ms: u64,
    ) -> Result<RoomOpReply, ErrorBody> {
        let owner = self.ctx.owner_of(room_id);
        let member = session.member();
        if owner == self.ctx.cluster.node_id() {
            return self.local_room_op(room_id, member, op).await;
        }
        if self.ctx.cluster.is_cut_off() {
            return Err(ErrorBody::new(
                ErrorCode::Unavailable,
                "this node is cut off from the cluster and cannot reach the room's owner: \
                 reconnect to another node",
            ));
        }
        let key = member.key();
        let joining = matches!(op, RoomOp::Join { .. });
        let leaving = matches!(op, RoomOp::Leave);
        // Mirror first: the owner may broadcast (e.g. a listener count) as soon as the join
        // is applied, before its answer arrives here.
        if joining {
            self.mirrors.add(room_id, key, session.clone());
        }
        let message = RoomMessage::Room {
            from: self.ctx.cluster.node_id(),
            room_id: room_id.to_string(),
            member_key: key,
            op,
            deadline_ms: Some(deadline_ms),
        };
        let result = match self
            .ctx
            .cluster
            .call_app(owner, request(Domain::Rooms, &message))
            .await
        {
            Ok(reply) => decode::<Result<RoomOpReply, ErrorBody>>(&reply).and_then(|r| r),
            Err(error) => Err(ErrorBody::new(
                ErrorCode::Unavailable,
                format!("the room's owner (node {owner}) is unreachable: {error}"),
            )),
        };
        let rejoining = joining && session.with_core(|core| core.in_room(room_id));
        if (joining && result.is_err() && !rejoining) || leaving {
            self.mirrors.remove(room_id, key);
        }
        result
    }

    /// Takes over session `session_id` of `user` from another node (or from this node's
    /// previous run): if the id was minted for `user`, a session is created here (under a
    /// new id the client adopts), numbering on from `last_seq`, and re-joins `rooms`, each asking for the
    /// comments after the id the client has (they are buffered for the resume that
    /// follows). The home node, if it is up, is told to end its copy. `None` (the client
    /// must resync) if the id is not the user's, a room cannot be re-joined, or a room's
    /// recent log no longer reaches back to what the client has.
    pub(crate) async fn take_over_session(
        &self,
        session_id: &str,
        user: &str,
        last_seq: u64,
        rooms: &BTreeMap<String, u64>,
    ) -> Option<Arc<Session>> {
        let home = self.ctx.sessions.ids().verify(session_id, user)?;
        if rooms.len() > self.ctx.config.limits.rooms_per_session_max {
            return None;
        }
        let self_id = self.ctx.cluster.node_id();
        let home_up = self
            .ctx
            .cluster
            .metadata()
            .nodes
            .get(&home)
            .is_some_and(|n| n.state != chorus_cluster::metadata::NodeState::Down);
        if home != self_id && home_up {
            // The home still holds the session: tell it over the actor mesh, or, when the
            // mesh has no session to it yet (it just started), with an RPC.
            let timeout = Duration::from_millis(READMIT_QUERY_TIMEOUT_MS);
            let delivery =
                crate::server::rooms::control::end_session_on(home, session_id, timeout).await;
            if delivery == crate::server::rooms::control::Delivery::NoSession {
                let message = request(
                    Domain::Rooms,
                    &RoomMessage::EndSession {
                        session_id: session_id.to_string(),
                    },
                );
                let _ =
                    tokio::time::timeout(timeout, self.ctx.cluster.call_app(home, message)).await;
            }
        }
        let now_ms = chorus_actors::room_actor::unix_now_ms();
        let session = self
            .ctx
            .sessions
            .take_over(session_id, user, now_ms, last_seq)?;
        let mut complete = true;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(TAKEOVER_JOIN_WINDOW_MS);
        for (room_id, since) in rooms {
            let since = *since;
            let reserved = session.with_core(|core| {
                core.handle_room_joined(room_id)?;
                core.handle_room_join_answered(room_id, since);
                Ok::<(), ErrorCode>(())
            });
            if reserved.is_err() {
                complete = false;
                break;
            }
            let op = RoomOp::Join {
                user: user.to_string(),
                since: Some(since),
            };
            // The room's owner may be the node that just died: keep trying (its rooms move
            // once it is marked down) within the takeover window.
            let mut metadata = self.ctx.cluster.subscribe_metadata();
            let result = loop {
                let result = self.room_op(&session, room_id, op.clone()).await;
                match &result {
                    Err(error)
                        if error.code == ErrorCode::Unavailable.as_u16()
                            && tokio::time::Instant::now() < deadline =>
                    {
                        let pause = tokio::time::Instant::now()
                            + Duration::from_millis(TAKEOVER_RETRY_PAUSE_MS);
                        let _ =
                            tokio::time::timeout_at(pause.min(deadline), metadata.changed()).await;
                    }
                    _ => break result,
                }
            };
            match result {
                Ok(RoomOpReply::Joined(joined)) => {
                    let reaches_back = joined.room.comment_count <= since
                        || joined
                            .recent_comments
                            .first()
                            .is_some_and(|c| c.comment_id <= since + 1);
                    if !reaches_back {
                        tracing::info!(session = %session_id, room = %room_id, since, "takeover: the room's recent log does not reach back far enough");
                        complete = false;
                        break;
                    }
                }
                other => {
                    tracing::info!(session = %session_id, room = %room_id, outcome = ?other.err(), "takeover: cannot re-join");
                    complete = false;
                    break;
                }
            }
        }
        if !complete {
            self.end_session(&session).await;
            metrics::counter!("chorus_session_takeovers_total", "outcome" => "refused")
                .increment(1);
            return None;
        }
        metrics::counter!("chorus_session_takeovers_total", "outcome" => "taken_over").increment(1);
        tracing::info!(session = %session_id, home, rooms = rooms.len(), "session taken over");
        Some(session)
    }

    /// The sessions on this node that are in `room_id`: (member key, user).
    pub(crate) fn local_members(&self, room_id: &str) -> Vec<(u64, String, Option<u64>)> {
        self.local_sessions(room_id)
            .into_iter()
            .map(|(session, since)| (session.member().key(), session.user_id.clone(), Some(since)))
            .collect()
    }

    /// The sessions on this node that are in `room_id`, each with the latest comment id
    /// it has from the room.
    pub(crate) fn local_sessions(&self, room_id: &str) -> Vec<(Arc<Session>, u64)> {
        self.ctx
            .sessions
            .all()
            .into_iter()
            .filter_map(|session| {
                let since = session.with_core(|core| core.room_position(room_id))?;
                Some((session, since))
            })
            .collect()
    }

    /// `session` is no longer in remote room `room_id`: its events stop here.
    pub(crate) fn forget_mirror(&self, room_id: &str, session: &Arc<Session>) {
        self.mirrors.remove(room_id, session.member().key());
    }

    /// Sends a notice to every member of `room_id` through its owner (a quiz question, a
    /// rain starting, bullet comments). Retried once on the new owner if the ring moves.
    pub(crate) async fn announce(
        &self,
        room_id: &str,
        body: Arc<EncodedBody>,
    ) -> Result<(), ErrorBody> {
        let mut result = Ok(());
        for _ in 0..2 {
            let owner = self.ctx.owner_of(room_id);
            result = if owner == self.ctx.cluster.node_id() {
                self.announce_local(room_id, body.clone()).await
            } else {
                let message = request(
                    Domain::Rooms,
                    &RoomMessage::Announce {
                        room_id: room_id.to_string(),
                        kind: body.kind().to_string(),
                        msgpack: body.body_bytes(Encoding::MsgPack).clone(),
                        json: body.body_bytes(Encoding::Json).clone(),
                    },
                );
                match self.ctx.cluster.call_app(owner, message).await {
                    Ok(reply) => decode::<Result<RoomOpReply, ErrorBody>>(&reply)
                        .and_then(|r| r)
                        .map(|_| ()),
                    Err(error) => Err(ErrorBody::new(
                        ErrorCode::Unavailable,
                        format!("the room's owner (node {owner}) is unreachable: {error}"),
                    )),
                }
            };
            if result.is_ok() || self.ctx.owner_of(room_id) == owner {
                break;
            }
        }
        result
    }

    /// How many members `room_id` has (0 if it cannot be asked): the audience a rain's
    /// throttle is computed from.
    pub(crate) async fn room_audience(&self, room_id: &str) -> u64 {
        let owner = self.ctx.owner_of(room_id);
        let info = if owner == self.ctx.cluster.node_id() {
            match self.activate(room_id).await {
                Ok(actor) => ask(&actor, |reply| RoomMsg::Info { reply }).await.ok(),
                Err(_) => None,
            }
        } else {
            let message = request(
                Domain::Rooms,
                &RoomMessage::Room {
                    from: self.ctx.cluster.node_id(),
                    room_id: room_id.to_string(),
                    member_key: 0,
                    op: RoomOp::Info,
                    deadline_ms: None,
                },
            );
            match self.ctx.cluster.call_app(owner, message).await {
                Ok(reply) => match decode::<Result<RoomOpReply, ErrorBody>>(&reply) {
                    Ok(Ok(RoomOpReply::Info(info))) => Some(info),
                    _ => None,
                },
                Err(_) => None,
            }
        };
        info.map(|info| info.listener_count).unwrap_or(0)
    }

    /// [`Rooms::announce`] on the owner.
    pub(crate) async fn announce_local(
        &self,
        room_id: &str,
        body: Arc<EncodedBody>,
    ) -> Result<(), ErrorBody> {
        let actor = self.activate(room_id).await?;
        actor
            .cast(chorus_actors::room_actor::RoomMsg::Announce { body })
            .map_err(|_| ErrorBody::new(ErrorCode::Unavailable, "the room stopped"))
    }

    /// Runs `op` on a room this node owns.
    pub(crate) async fn local_room_op(
        &self,
        room_id: &str,
        member: Member,
        op: RoomOp,
    ) -> Result<RoomOpReply, ErrorBody> {
        use chorus_actors::room_actor::RoomMsg;
        self.refuse_comment_if_behind(&op)?;
        if let RoomOp::Create(definition) = op {
            let room_id = definition.room_id.clone();
            let info = self
                .directory
                .create_with(definition, |actor| self.activate_room(&room_id, actor))
                .await
                .map_err(directory_error)?;
            return Ok(RoomOpReply::Created(info));
        }
        let actor = self.activate(room_id).await?;
        Ok(match op {
            RoomOp::Create(_) => RoomOpReply::Done,
            RoomOp::Join { user, since } => RoomOpReply::Joined(
                ask(&actor, |reply| RoomMsg::Join {
                    member,
                    user,
                    since,
                    reply,
                })
                .await?
                .map_err(room_error)?,
            ),
            RoomOp::Leave => {
                ask(&actor, |reply| RoomMsg::Leave {
                    member,
                    reply: Some(reply),
                })
                .await?
                .map_err(room_error)?;
                RoomOpReply::Done
            }
            RoomOp::Comment {
                text,
                request_id,
                deadline_ms,
            } => RoomOpReply::Commented(
                ask(&actor, |reply| RoomMsg::Comment {
                    member,
                    text,
                    request_id,
                    deadline_ms,
                    reply,
                })
                .await?
                .map_err(room_error)?,
            ),
            RoomOp::Start { user } => {
                ask(&actor, |reply| RoomMsg::Start { user, reply })
                    .await?
                    .map_err(room_error)?;
                RoomOpReply::Done
            }
            RoomOp::End { user } => {
                ask(&actor, |reply| RoomMsg::End { user, reply })
                    .await?
                    .map_err(room_error)?;
                RoomOpReply::Done
            }
            RoomOp::Stage { user, command } => {
                ask(&actor, |reply| RoomMsg::Stage {
                    user,
                    command,
                    reply,
                })
                .await?
                .map_err(room_error)?;
                RoomOpReply::Done
            }
            RoomOp::InviteUsers { user, users } => {
                ask(&actor, |reply| RoomMsg::InviteUsers { user, users, reply })
                    .await?
                    .map_err(room_error)?;
                RoomOpReply::Done
            }
            RoomOp::Summary => {
                RoomOpReply::Summary(ask(&actor, |reply| RoomMsg::Summary { reply }).await?)
            }
            RoomOp::Interest { user, interested } => RoomOpReply::Interested(
                ask(&actor, |reply| RoomMsg::Interest {
                    user,
                    interested,
                    reply,
                })
                .await?
                .map_err(room_error)?,
            ),
            RoomOp::Members { after, limit } => RoomOpReply::Members(
                ask(&actor, |reply| RoomMsg::Members {
                    after,
                    limit,
                    reply,
                })
                .await?,
            ),
            RoomOp::StageInfo { user } => {
                RoomOpReply::Stage(ask(&actor, |reply| RoomMsg::StageInfo { user, reply }).await?)
            }
            RoomOp::Info => RoomOpReply::Info(ask(&actor, |reply| RoomMsg::Info { reply }).await?),
            RoomOp::PollCreate {
                user,
                question,
                options,
            } => RoomOpReply::Poll(
                ask(&actor, |reply| RoomMsg::PollCreate {
                    user,
                    question,
                    options,
                    reply,
                })
                .await?
                .map_err(room_error)?,
            ),
            RoomOp::Vote { poll_id, option } => {
                ask(&actor, |reply| RoomMsg::Vote {
                    member,
                    poll_id,
                    option,
                    reply,
                })
                .await?
                .map_err(room_error)?;
                RoomOpReply::Done
            }
            RoomOp::PollClose { user, poll_id } => RoomOpReply::Poll(
                ask(&actor, |reply| RoomMsg::PollClose {
                    user,
                    poll_id,
                    reply,
                })
                .await?
                .map_err(room_error)?,
            ),
        })
    }
}
