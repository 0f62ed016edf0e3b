//! The catalog behind `room.list`: the open rooms of the cluster's metadata, sorted by
//! (creation time descending, room id), rebuilt when the metadata changed and at most
//! once per [`CATALOG_REFRESH_MS`], and paged by cursor (see `rooms::list`).

use std::cmp::Reverse;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chorus_actors::room::RoomDefinition;
use chorus_cluster::metadata::ClusterMetadata;
use chorus_protocol::RoomState;

use crate::server::common::keys::{room_key, ActorKey};

/// Least time between two rebuilds of a node's catalog, ms.
pub const CATALOG_REFRESH_MS: u64 = 1_000;

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
    pub(crate) fn rooms(&self, metadata: Arc<ClusterMetadata>) -> Arc<Vec<RoomDefinition>> {
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
pub(crate) fn cursor(room: &RoomDefinition) -> String {
    format!("{}:{}", room.created_at_ms, room.room_id)
}

pub(crate) fn parse_cursor(after: &str) -> Option<(u64, &str)> {
    let (at, id) = after.split_once(':')?;
    Some((at.parse().ok()?, id))
}

/// One page of `rooms` (sorted by [`order`]) after `after`, in `state` if given.
pub(crate) fn page<'a>(
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
