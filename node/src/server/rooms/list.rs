//! `room.list`: the cluster's live and scheduled rooms, newest first, from any node.
//!
//! Every node holds every room definition (they are in the Raft metadata), so the list
//! itself is local: a catalog of the open rooms (`rooms::catalog`), sorted by (creation
//! time descending, room id), rebuilt from the metadata when it has changed, at most once
//! a second (so a room created or ended shows within about a second). A
//! rebuild decodes the definitions once: O(rooms defined) per second at most, on the node
//! asked. A page is a binary search and at most [`ROOM_LIST_PAGE_MAX`] entries.
//!
//! Listener counts live with each room's owner: for a page, the listing node asks each
//! owner once for the counts of its rooms in the page (in parallel, at most
//! [`LISTENER_COUNTS_TIMEOUT_MS`]), and the owner answers from its running room actors
//! without starting any (a room not running has nobody in it). An owner that does not
//! answer in time leaves its rooms' counts `null`.

use std::collections::BTreeMap;
use std::time::Duration;

use chorus_actors::room::RoomDefinition;
use chorus_actors::room_actor::RoomMsg;
use chorus_cluster::metadata::NodeId;
use chorus_protocol::{
    ErrorBody, ErrorCode, RoomListEntry, RoomListRequest, RoomListResponse, RoomState,
    ROOM_LIST_PAGE_MAX,
};

use crate::server::common::codec::{decode, request, Domain};
use crate::server::rooms::catalog::{page, parse_cursor};
use crate::server::rooms::messages::RoomMessage;
use crate::server::rooms::service::Rooms;
/// How long the listing node waits for an owner's listener counts, ms.
pub const LISTENER_COUNTS_TIMEOUT_MS: u64 = 1_000;
/// Rooms in a page when the request names no limit.
pub const ROOM_LIST_PAGE_DEFAULT: u32 = 20;

impl Rooms {
    /// Answers `room.list` for the whole cluster.
    pub(crate) async fn list_rooms(
        &self,
        request: RoomListRequest,
    ) -> Result<RoomListResponse, ErrorBody> {
        if request.state == Some(RoomState::Ended) {
            return Err(ErrorBody::new(
                ErrorCode::InvalidArgument,
                "room.list lists live and scheduled rooms: state must be live or scheduled",
            ));
        }
        let after = match request.after.as_deref() {
            Some(after) => Some(parse_cursor(after).ok_or_else(|| {
                ErrorBody::new(
                    ErrorCode::InvalidArgument,
                    format!("after {after:?} is not a cursor from room.list's next"),
                )
            })?),
            None => None,
        };
        let limit = request
            .limit
            .unwrap_or(ROOM_LIST_PAGE_DEFAULT)
            .clamp(1, ROOM_LIST_PAGE_MAX) as usize;
        let rooms = self.catalog.rooms(self.ctx.cluster.metadata());
        let (taken, next) = page(&rooms, request.state, after, limit);
        let counts = self.listener_counts(&taken).await;
        let rooms = taken
            .into_iter()
            .map(|room| RoomListEntry {
                room_id: room.room_id.clone(),
                title: room.title.clone(),
                host: room.host.clone(),
                state: room.state,
                scheduled_start_ms: room.scheduled_start_ms,
                started_at_ms: room.started_at_ms,
                created_at_ms: room.created_at_ms,
                listener_count: counts.get(&room.room_id).copied().flatten(),
            })
            .collect();
        Ok(RoomListResponse { rooms, next })
    }

    /// The listener counts of `rooms`, each asked of its owner (one call per owner).
    async fn listener_counts(&self, rooms: &[&RoomDefinition]) -> BTreeMap<String, Option<u64>> {
        let mut by_owner: BTreeMap<NodeId, Vec<String>> = BTreeMap::new();
        for room in rooms {
            by_owner
                .entry(self.ctx.owner_of(&room.room_id))
                .or_default()
                .push(room.room_id.clone());
        }
        let self_id = self.ctx.cluster.node_id();
        let calls = by_owner.into_iter().map(|(owner, room_ids)| async move {
            let counts = if owner == self_id {
                self.listener_counts_here(&room_ids).await
            } else {
                let message = request(
                    Domain::Rooms,
                    &RoomMessage::ListenerCounts {
                        room_ids: room_ids.clone(),
                    },
                );
                let call = self.ctx.cluster.call_app(owner, message);
                match tokio::time::timeout(Duration::from_millis(LISTENER_COUNTS_TIMEOUT_MS), call)
                    .await
                {
                    Ok(Ok(reply)) => decode::<Vec<Option<u64>>>(&reply).unwrap_or_default(),
                    _ => Vec::new(),
                }
            };
            room_ids
                .into_iter()
                .zip(counts.into_iter().chain(std::iter::repeat(None)))
                .collect::<Vec<_>>()
        });
        futures_util::future::join_all(calls)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// This node's load: connections, sessions, running rooms.
    pub(crate) async fn load(&self) -> crate::server::rooms::messages::NodeLoad {
        crate::server::rooms::messages::NodeLoad {
            connections: self
                .ctx
                .connections
                .load(std::sync::atomic::Ordering::Acquire) as u64,
            sessions: self.ctx.sessions.len() as u64,
            rooms: self.directory.running().await as u64,
        }
    }

    /// Every member's load, this node's own and the others' asked in parallel (each at
    /// most [`LISTENER_COUNTS_TIMEOUT_MS`]; `None` for one that did not answer).
    pub(crate) async fn cluster_load(
        &self,
    ) -> Vec<(NodeId, Option<crate::server::rooms::messages::NodeLoad>)> {
        let self_id = self.ctx.cluster.node_id();
        let members: Vec<NodeId> = self.ctx.cluster.metadata().nodes.keys().copied().collect();
        let calls = members.into_iter().map(|id| async move {
            if id == self_id {
                return (id, Some(self.load().await));
            }
            let call = self
                .ctx
                .cluster
                .call_app(id, request(Domain::Rooms, &RoomMessage::NodeLoad));
            let load =
                match tokio::time::timeout(Duration::from_millis(LISTENER_COUNTS_TIMEOUT_MS), call)
                    .await
                {
                    Ok(Ok(reply)) => decode(&reply).ok(),
                    _ => None,
                };
            (id, load)
        });
        futures_util::future::join_all(calls).await
    }

    /// Listener counts of rooms this node owns, from their running actors (0 for a room
    /// not running here: nobody is in it); at most [`ROOM_LIST_PAGE_MAX`] rooms.
    pub(crate) async fn listener_counts_here(&self, room_ids: &[String]) -> Vec<Option<u64>> {
        let mut counts = Vec::with_capacity(room_ids.len().min(ROOM_LIST_PAGE_MAX as usize));
        for room_id in room_ids.iter().take(ROOM_LIST_PAGE_MAX as usize) {
            let count = match self.directory.find_running(room_id).await {
                None => Some(0),
                Some(actor) => ractor::call!(actor, |reply| RoomMsg::Info { reply })
                    .ok()
                    .map(|info| info.listener_count),
            };
            counts.push(count);
        }
        counts
    }
}
