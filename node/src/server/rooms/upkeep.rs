//! The rooms' background work, each a loop that runs until the node stops.
//!
//! - **Following the ring** (`follow_ring`). When the ring epoch changes, this node stops
//!   the room actors it no longer owns, removes from the rooms it owns the members of nodes
//!   that are down or removed (not draining ones: they still serve their clients), and
//!   re-joins each local session to every room whose owner changed, asking for the comments
//!   after the latest it has; clients keep their connections. A node that comes back (it
//!   was paused or cut off and marked `Down`) re-joins all its sessions' rooms, since rooms
//!   that stayed put dropped its members meanwhile.
//! - **Handing off copies** (`hand_off_copies`). A draining node, when it sees itself
//!   `Draining` and again when it stops, sends every room state it holds to the room's
//!   owner and next node on the current ring, which keep it only if it is ahead of theirs
//!   and not fenced. A leaving node may be the only replica of a room whose owner crashes at
//!   the same moment; with its copies handed off, the next owner still finds every
//!   acknowledged change.
//! - **Re-joining after a cut** (`rejoin_after_cut`). While a node is cut off, re-joins on
//!   ring changes are refused and the rooms drop its members; once it is no longer cut off
//!   its sessions re-join every room they are in, asking for what they missed.
//! - **Gap repair** (`repair_gaps`). A session that dropped a comment arriving ahead of one
//!   it lacks re-joins the room asking for what came after its latest (one repair per
//!   session and room at a time, at most 5 tries); the catch-up brings the missing comments
//!   and the dropped one, in order. When the room's recent log (50 comments) no longer
//!   reaches back, the session goes on from the log's first comment and its client gets a
//!   `room.gap` notice naming the ids it will not receive: nothing is skipped silently.
//! - **Expiry** (`expire_rooms`). Every node forgets its copies and event-log parts of
//!   rooms that ended more than `ended_retention_ms` (72 h) ago; the Raft leader then
//!   deletes their definitions, after which the rooms answer `room_not_found`.
//! - **Idle release** (`release_idle_rooms`). A room no one has been in for
//!   `room_idle_release_ms` (10 min) has its actor stopped; its state stays stored and the
//!   next request activates it again as after a failover.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use chorus_actors::room::RoomDefinition;
use chorus_actors::room_actor::RoomMsg;
use chorus_cluster::metadata::NodeId;
use chorus_protocol::ErrorBody;

use crate::server::common::codec::{decode, request, Domain};
use crate::server::common::keys::room_key;
use crate::server::common::keys::{ActorKey, MEMBER_KEY_NODE_SHIFT};
use crate::server::rooms::messages::{RoomMessage, RoomOp, RoomOpReply};
use crate::server::rooms::replicate::REPLICATE_TIMEOUT_MS;
use crate::server::rooms::route::*;
use crate::server::rooms::service::Rooms;

/// Follows the placement ring: when its epoch changes, rooms that moved away are stopped
/// here and every local session re-joins the rooms whose owner changed (on the new owner),
/// keeping its connection.
pub(crate) async fn follow_ring(node: Weak<Rooms>) {
    let Some(mut metadata) = node.upgrade().map(|n| n.ctx.cluster.subscribe_metadata()) else {
        return;
    };
    let mut ring = node.upgrade().and_then(|n| n.ctx.cluster.ring());
    loop {
        if metadata.changed().await.is_err() {
            return;
        }
        let Some(node) = node.upgrade() else { return };
        if node.ctx.shutdown.is_cancelled() {
            return;
        }
        let Some(next) = node.ctx.cluster.ring() else {
            continue;
        };
        if ring.as_ref().map(|r| r.epoch()) == Some(next.epoch()) {
            continue;
        }
        let previous = ring.replace(next.clone());
        let self_id = node.ctx.cluster.node_id();
        // Members on nodes that are gone (down or removed; not draining: those still
        // serve their clients) leave the rooms this node owns.
        let metadata = node.ctx.cluster.metadata();
        let gone: std::collections::BTreeSet<NodeId> = previous
            .as_ref()
            .map(|p| p.members().to_vec())
            .unwrap_or_default()
            .into_iter()
            .filter(|id| {
                metadata
                    .nodes
                    .get(id)
                    .is_none_or(|n| n.state == chorus_cluster::metadata::NodeState::Down)
            })
            .collect();
        if !gone.is_empty() {
            for (_, actor) in node.directory.running_actors().await {
                let gone = gone.clone();
                let _ = actor.cast(RoomMsg::Prune {
                    gone: Box::new(move |key| gone.contains(&(key >> MEMBER_KEY_NODE_SHIFT))),
                });
            }
        }
        // A node that was down (paused, cut off) and is back: rooms that stayed put may
        // have dropped its members meanwhile, so its sessions re-join every room (asking
        // for what they missed). The watch channel coalesces changes, so "down, then up"
        // may arrive as one jump of the epoch: any jump by more than one counts too (a
        // re-join is idempotent, so an unneeded one costs a round trip).
        let came_back = previous.as_ref().is_some_and(|p| {
            (!p.contains(self_id) && next.contains(self_id)) || next.epoch() > p.epoch() + 1
        }) && metadata.nodes.len() > 1;
        let stopped = node
            .directory
            .stop_unless(|room_id| next.owner(&room_key(room_id)) == Some(self_id))
            .await;
        // This node is leaving (draining): its copies go to the nodes that keep the rooms.
        let leaving = metadata
            .nodes
            .get(&self_id)
            .is_some_and(|n| n.state == chorus_cluster::metadata::NodeState::Draining);
        if leaving && previous.as_ref().is_none_or(|p| p.contains(self_id)) {
            let node = node.clone();
            tokio::spawn(async move {
                let (taken, untaken) = hand_off_copies(&node).await;
                tracing::info!(
                    taken,
                    untaken,
                    "draining: handed off the room copies held here"
                );
            });
        }
        let mut rejoined = 0;
        for session in node.ctx.sessions.all() {
            let rooms: Vec<String> = session.with_core(|core| core.rooms().cloned().collect());
            for room_id in rooms {
                let key = room_key(&room_id);
                let before = previous.as_ref().and_then(|r| r.owner(&key));
                let after = next.owner(&key);
                if before == after && !came_back {
                    continue;
                }
                // Keep the mirror in step with where the room now lives, whether or not the
                // join below succeeds at once: a room activated later re-admits the members
                // the edges list.
                let key = session.member().key();
                if after == Some(self_id) {
                    node.mirrors.remove(&room_id, key);
                } else {
                    node.mirrors.add(&room_id, key, session.clone());
                }
                match node.rejoin(&session, &room_id).await {
                    Ok(_) => rejoined += 1,
                    Err(error) => {
                        tracing::warn!(room = %room_id, %error, "re-join after a ring change failed")
                    }
                }
            }
        }
        tracing::info!(
            epoch = next.epoch(),
            stopped,
            rejoined,
            "followed a ring change"
        );
    }
}

/// Rooms whose copies a leaving node hands off at once.
const HAND_OFF_CONCURRENCY: usize = 16;

/// Copies every room state this node holds to the nodes that hold the room once this one
/// is gone: the owner and the next node for the room's key on the current ring (which no
/// longer names this node once it drains). A leaving node may be the only replica of a
/// room whose owner crashes at the same moment; with its copies handed off, the room's
/// next owner still finds every acknowledged change. Receivers keep a copy only if it is
/// ahead of theirs and not fenced by a newer owner, so handing off an old copy is
/// harmless. Returns (copies taken, rooms none of whose targets took it).
pub(crate) async fn hand_off_copies(node: &Rooms) -> (usize, usize) {
    use futures_util::StreamExt;
    let self_id = node.ctx.cluster.node_id();
    let Some(ring) = node.ctx.cluster.ring() else {
        return (0, 0);
    };
    let states = node.durable.held_states();
    let outcomes: Vec<(usize, bool)> = futures_util::stream::iter(states)
        .map(|(room_id, epoch, durable)| {
            let targets: Vec<NodeId> = ring
                .owners_n(&room_key(&room_id), 2 + 1)
                .into_iter()
                .filter(|id| *id != self_id)
                .take(2)
                .collect();
            let message = request(
                Domain::Rooms,
                &RoomMessage::Replicate {
                    room_id,
                    epoch,
                    durable,
                },
            );
            async move {
                let calls = targets.iter().map(|target| {
                    let call = node.ctx.cluster.call_app(*target, message.clone());
                    async move {
                        matches!(
                            tokio::time::timeout(Duration::from_millis(REPLICATE_TIMEOUT_MS), call)
                                .await,
                            Ok(Ok(reply)) if matches!(
                                decode::<Result<RoomOpReply, ErrorBody>>(&reply),
                                Ok(Ok(_))
                            )
                        )
                    }
                });
                let taken = futures_util::future::join_all(calls)
                    .await
                    .into_iter()
                    .filter(|taken| *taken)
                    .count();
                (taken, targets.is_empty() || taken == 0)
            }
        })
        .buffer_unordered(HAND_OFF_CONCURRENCY)
        .collect()
        .await;
    let taken = outcomes.iter().map(|(taken, _)| taken).sum();
    let untaken = outcomes.iter().filter(|(_, none)| *none).count();
    (taken, untaken)
}

/// When this node stops being cut off (it reaches a majority again and caught up), its
/// sessions re-join every room they are in, asking for what they missed: while it was
/// cut off, re-joins on ring changes were refused, and the rooms dropped its members when
/// the others marked it down. Runs until the node stops.
pub(crate) async fn rejoin_after_cut(node: Weak<Rooms>) {
    let Some(mut cut_off) = node.upgrade().map(|n| n.ctx.cluster.subscribe_cut_off()) else {
        return;
    };
    let mut was_cut_off = *cut_off.borrow_and_update();
    while cut_off.changed().await.is_ok() {
        let now_cut_off = *cut_off.borrow_and_update();
        let healed = was_cut_off && !now_cut_off;
        was_cut_off = now_cut_off;
        if !healed {
            continue;
        }
        let Some(node) = node.upgrade() else { return };
        let mut rejoined = 0;
        for session in node.ctx.sessions.all() {
            let rooms: Vec<String> = session.with_core(|core| core.rooms().cloned().collect());
            for room_id in rooms {
                match node.rejoin(&session, &room_id).await {
                    Ok(_) => rejoined += 1,
                    Err(error) => {
                        tracing::warn!(room = %room_id, %error, "re-join after a cut failed")
                    }
                }
            }
        }
        tracing::info!(
            rejoined,
            "no longer cut off: sessions re-joined their rooms"
        );
    }
}

/// Re-joins, asking for what they missed, the rooms in which a session saw a gap in the
/// order (an event that overtook one it lacks, e.g. a live comment from a new owner
/// arriving before the catch-up of the comments a failover kept from it). The session
/// dropped the early event; the catch-up brings everything after its latest, in order. If
/// the room's recent log no longer reaches back, the session goes on from what the log
/// has (counted in `chorus_catch_up_skipped_total`). Runs until the node stops.
pub(crate) async fn repair_gaps(
    node: Weak<Rooms>,
    mut repairs: tokio::sync::mpsc::Receiver<(String, String)>,
) {
    while let Some((session_id, room_id)) = repairs.recv().await {
        let Some(node) = node.upgrade() else { return };
        let Some(session) = node.ctx.sessions.get(&session_id) else {
            continue;
        };
        tokio::spawn(async move {
            for _ in 0..REPAIR_ATTEMPTS_MAX {
                let Some(since) = session.with_core(|core| core.room_position(&room_id)) else {
                    break;
                };
                let op = RoomOp::Join {
                    user: session.user_id.clone(),
                    since: Some(since),
                };
                match node.room_op(&session, &room_id, op).await {
                    Ok(RoomOpReply::Joined(joined)) => {
                        let first = joined.recent_comments.first().map(|c| c.comment_id);
                        match first {
                            Some(first)
                                if first > since + 1 && joined.room.comment_count > since =>
                            {
                                // The log starts after what the session has: take what
                                // it has, from its start.
                                metrics::counter!("chorus_catch_up_skipped_total")
                                    .increment(first - since - 1);
                                session.with_core(|core| {
                                    core.handle_positions_skipped(&room_id, first)
                                });
                                // Said, never silent: the client fetches the missing ones
                                // with `room.comments`.
                                let gap = chorus_protocol::Event::Gap(chorus_protocol::GapEvent {
                                    room_id: room_id.clone(),
                                    after: since,
                                    next: first,
                                });
                                if let Ok(body) = gap.encode_body() {
                                    chorus_actors::room_actor::MemberSink::deliver(
                                        &*session,
                                        &Arc::new(body),
                                    );
                                }
                            }
                            _ => {
                                metrics::counter!("chorus_order_repairs_total").increment(1);
                                tracing::info!(room = %room_id, session = %session.id, since, "repaired a gap in the room's order");
                                break;
                            }
                        }
                    }
                    Ok(_) => break,
                    Err(error) => {
                        tracing::debug!(room = %room_id, session = %session.id, %error, "gap repair failed; retrying");
                        tokio::time::sleep(Duration::from_millis(REPAIR_RETRY_MS)).await;
                    }
                }
            }
            session.with_core(|core| core.handle_repair_done(&room_id));
        });
    }
}

/// Removes what is left of rooms that ended longer ago than `ended_retention_ms` (R10:
/// 72 h by default). Every node forgets its replicated states of such rooms; the Raft
/// leader then deletes their definitions (and ownership), a little later so that every
/// node has swept first, after which the rooms answer `room_not_found`. At most
/// [`EXPIRE_DELETES_PER_SWEEP`] definitions go per sweep. Runs until the node stops.
pub(crate) async fn expire_rooms(node: Weak<Rooms>) {
    let Some(retention_ms) = node.upgrade().map(|n| n.ctx.config.room.ended_retention_ms) else {
        return;
    };
    let every_ms = (retention_ms / 4).clamp(EXPIRE_SWEEP_MIN_MS, EXPIRE_SWEEP_MAX_MS);
    let mut ticker = crate::server::context::NodeTicker::new(node, Duration::from_millis(every_ms));
    while let Some(node) = ticker.next().await {
        let now_ms = chorus_actors::room_actor::unix_now_ms();
        let metadata = node.ctx.cluster.metadata();
        let mut expired = Vec::new();
        let mut deletable = Vec::new();
        for (key, bytes) in &metadata.definitions {
            let Some(room_id) = ActorKey::parse(key).and_then(ActorKey::room) else {
                continue;
            };
            let Ok(definition) = rmp_serde::from_slice::<RoomDefinition>(bytes) else {
                continue;
            };
            let Some(ended_at_ms) = definition.ended_at_ms else {
                continue;
            };
            let expires_at = ended_at_ms.saturating_add(retention_ms);
            if now_ms >= expires_at {
                expired.push(room_id.to_string());
                if now_ms >= expires_at.saturating_add(2 * every_ms) {
                    deletable.push(key.clone());
                }
            }
        }
        let forgotten = node.durable.forget(&expired);
        if let Some(log) = node.event_log() {
            log.forget(&expired);
        }
        if forgotten > 0 {
            tracing::info!(forgotten, "forgot the states of expired rooms");
        }
        if node.ctx.cluster.raft_metrics().leader == Some(node.ctx.cluster.node_id()) {
            for key in deletable.into_iter().take(EXPIRE_DELETES_PER_SWEEP) {
                let command = chorus_cluster::metadata::MetadataCommand::DeleteDefinition {
                    key: key.clone(),
                };
                match node.ctx.cluster.write(command).await {
                    Ok(_) => {
                        metrics::counter!("chorus_rooms_expired_total").increment(1);
                        tracing::info!(%key, "expired an ended room");
                    }
                    Err(error) => tracing::warn!(%key, %error, "cannot expire an ended room"),
                }
            }
        }
    }
}

/// Shortest and longest pause between two sweeps for expired rooms.
const EXPIRE_SWEEP_MIN_MS: u64 = 100;
const EXPIRE_SWEEP_MAX_MS: u64 = 60_000;
/// Definitions of expired rooms deleted per sweep (the rest wait for the next).
const EXPIRE_DELETES_PER_SWEEP: usize = 100;

/// Re-joins one gap repair tries before it gives up (the next gap starts another).
const REPAIR_ATTEMPTS_MAX: u32 = 5;
/// Pause between two tries of a gap repair.
const REPAIR_RETRY_MS: u64 = 200;

/// How long the idle sweep waits for a room to say how many are in it.
const IDLE_INFO_TIMEOUT_MS: u64 = 1_000;

/// Stops the actors of rooms no one has been in for `room_idle_release_ms` (sampled a
/// few times per period), so that rooms created and left empty do not stay resident.
/// Their state stays stored; the next request for one starts it again through the
/// usual activation (claim, recover, re-admit).
pub(crate) async fn release_idle_rooms(node: Weak<Rooms>) {
    let Some(idle_ms) = node
        .upgrade()
        .map(|n| n.ctx.config.limits.room_idle_release_ms)
    else {
        return;
    };
    let every_ms = (idle_ms / 4).clamp(50, 60_000);
    let mut ticker = crate::server::context::NodeTicker::new(node, Duration::from_millis(every_ms));
    let mut empty_since: HashMap<String, u64> = HashMap::new();
    while let Some(node) = ticker.next().await {
        let running = node.directory.running_actors().await;
        metrics::gauge!("chorus_rooms_running").set(running.len() as f64);
        let now_ms = chorus_actors::room_actor::unix_now_ms();
        let mut seen = std::collections::HashSet::with_capacity(running.len());
        for (room_id, actor) in running {
            let Ok(info) = ask(&actor, |reply| RoomMsg::Info { reply }).await else {
                continue;
            };
            seen.insert(room_id.clone());
            if info.listener_count > 0 {
                empty_since.remove(&room_id);
                continue;
            }
            let since = *empty_since.entry(room_id.clone()).or_insert(now_ms);
            if now_ms.saturating_sub(since) < idle_ms {
                continue;
            }
            let timeout = Duration::from_millis(IDLE_INFO_TIMEOUT_MS);
            if node.directory.release_if_empty(&room_id, timeout).await {
                empty_since.remove(&room_id);
                metrics::counter!("chorus_rooms_released_idle_total").increment(1);
                tracing::debug!(room = %room_id, "released an idle room");
            }
        }
        empty_since.retain(|room_id, _| seen.contains(room_id));
    }
}

/// Saves the room copies changed by deferred deltas to sled every
/// [`DEFERRED_SAVE_MS`](crate::server::rooms::replica::DEFERRED_SAVE_MS), until the node
/// goes away (its shutdown saves the rest before sled's last flush).
pub(crate) async fn save_deferred_copies(node: Weak<Rooms>) {
    let every = Duration::from_millis(crate::server::rooms::replica::DEFERRED_SAVE_MS);
    let mut ticker = crate::server::context::NodeTicker::new(node, every);
    while let Some(node) = ticker.next().await {
        let durable = node.durable.clone();
        // sled's writes may block briefly: off the async workers.
        let _ = tokio::task::spawn_blocking(move || durable.save_deferred()).await;
    }
}
