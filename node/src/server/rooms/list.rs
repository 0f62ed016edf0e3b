//! `room.list`: the cluster's live and scheduled rooms, newest first, from any node.
//!
//! Every node holds every room definition (they are in the Raft metadata), so the list
//! itself is local: a catalog of the open rooms, sorted by (creation time descending,
//! room id), rebuilt from the metadata when it has changed, at most once per
//! [`CATALOG_REFRESH_MS`] (so a room created or ended shows within about a second). A
//! rebuild decodes the definitions once: O(rooms defined) per second at most, on the node
//! asked. A page is a binary search and at most [`ROOM_LIST_PAGE_MAX`] entries.
//!
//! Listener counts live with each room's owner: for a page, the listing node asks each
//! owner once for the counts of its rooms in the page (in parallel, at most
//! [`LISTENER_COUNTS_TIMEOUT_MS`]), and the owner answers from its running room actors
//! without starting any (a room not running has nobody in it). An owner that does not
//! answer in time leaves its rooms' counts `null`.

use std::cmp::Reverse;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chorus_actors::room::RoomDefinition;
use chorus_actors::room_actor::RoomMsg;
use chorus_cluster::metadata::{ClusterMetadata, NodeId};
use chorus_protocol::{
    ErrorBody, ErrorCode, RoomListEntry, RoomListRequest, RoomListResponse, RoomState,
    ROOM_LIST_PAGE_MAX,
};

use crate::server::common::codec::{decode, request, Domain};
use crate::server::common::keys::{room_key, ActorKey};
use crate::server::rooms::messages::RoomMessage;
use crate::server::rooms::service::Rooms;

/// Least time between two rebuilds of a node's catalog, ms.
pub const CATALOG_REFRESH_MS: u64 = 1_000;
/// How long the listing node waits for an owner's listener counts, ms.
pub const LISTENER_COUNTS_TIMEOUT_MS: u64 = 1_000;
/// Rooms in a page when the request names no limit.
pub const ROOM_LIST_PAGE_DEFAULT: u32 = 20;

/// The open rooms, sorted for `room.list`.
#[derive(Default)]
pub struct RoomCatalog {
    cached: Mutex<Option<Cached>>,
}

struct Cached {
    metadata: Arc<ClusterMetadata>,
    built: Instant,
    rooms: Arc<Vec<RoomDefinition>>,
}

/// The sort key: newest first, then by id.
fn order(room: &RoomDefinition) -> (Reverse<u64>, &str) {
    (Reverse(room.created_at_ms), room.room_id.as_str())
}

impl RoomCatalog {
    /// The open rooms as of `metadata` (or of a build less than a refresh ago).
    fn rooms(&self, metadata: Arc<ClusterMetadata>) -> Arc<Vec<RoomDefinition>> {
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = cached.as_ref() {
            let fresh = c.built.elapsed() < Duration::from_millis(CATALOG_REFRESH_MS);
            if Arc::ptr_eq(&c.metadata, &metadata) || fresh {
                return c.rooms.clone();
            }
        }
        let mut rooms: Vec<RoomDefinition> = metadata
            .definitions
            .range(room_key("")..)
            .take_while(|(key, _)| matches!(ActorKey::parse(key), Some(ActorKey::Room(_))))
            .filter_map(|(_, bytes)| rmp_serde::from_slice::<RoomDefinition>(bytes).ok())
            .filter(|room| room.state != RoomState::Ended)
            .collect();
        rooms.sort_by(|a, b| order(a).cmp(&order(b)));
        let rooms = Arc::new(rooms);
        *cached = Some(Cached {
            metadata,
            built: Instant::now(),
            rooms: rooms.clone(),
        });
        rooms
    }
}

/// The cursor of the entry `room`: `<created_at_ms>:<room_id>`.
fn cursor(room: &RoomDefinition) -> String {
    format!("{}:{}", room.created_at_ms, room.room_id)
}

fn parse_cursor(after: &str) -> Option<(u64, &str)> {
    let (at, id) = after.split_once(':')?;
    Some((at.parse().ok()?, id))
}

/// One page of `rooms` (sorted by [`order`]) after `after`, in `state` if given.
fn page<'a>(
    rooms: &'a [RoomDefinition],
    state: Option<RoomState>,
    after: Option<(u64, &str)>,
    limit: usize,
) -> (Vec<&'a RoomDefinition>, Option<String>) {
    let start = match after {
        Some((at, id)) => rooms.partition_point(|r| order(r) <= (Reverse(at), id)),
        None => 0,
    };
    let mut taken = Vec::with_capacity(limit);
    let mut more = false;
    for room in rooms[start..]
        .iter()
        .filter(|r| state.is_none_or(|s| r.state == s))
    {
        if taken.len() == limit {
            more = true;
            break;
        }
        taken.push(room);
    }
    let next = if more {
        taken.last().map(|r| cursor(r))
    } else {
        None
    };
    (taken, next)
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn room(id: &str, at: u64, state: RoomState) -> RoomDefinition {
        RoomDefinition {
            room_id: id.into(),
            title: id.into(),
            host: "h".into(),
            scheduled_start_ms: None,
            created_at_ms: at,
            state,
            ended_at_ms: None,
            started_at_ms: None,
        }
    }

    #[test]
    fn pages_walk_newest_first_without_gaps_or_repeats() {
        let mut rooms: Vec<RoomDefinition> = (0..25)
            .map(|i| {
                let state = if i % 3 == 0 {
                    RoomState::Scheduled
                } else {
                    RoomState::Live
                };
                // Two rooms per millisecond: ties go by id.
                room(&format!("r-{i:02}"), 1_000 + i / 2, state)
            })
            .collect();
        rooms.sort_by(|a, b| order(a).cmp(&order(b)));
        for state in [None, Some(RoomState::Live), Some(RoomState::Scheduled)] {
            let mut seen = Vec::new();
            let mut after = None;
            loop {
                let parsed = after.as_deref().and_then(parse_cursor);
                let (taken, next) = page(&rooms, state, parsed, 4);
                seen.extend(taken.iter().map(|r| r.room_id.clone()));
                match next {
                    Some(next) => after = Some(next),
                    None => break,
                }
            }
            let expected: Vec<String> = rooms
                .iter()
                .filter(|r| state.is_none_or(|s| r.state == s))
                .map(|r| r.room_id.clone())
                .collect();
            assert_eq!(seen, expected, "{state:?}");
        }
        assert_eq!(rooms[0].room_id, "r-24", "the newest first");
    }
}
