//! Rooms' event logs (SPEC R10): while it owns a room, a node appends every notification
//! the room broadcasts (except `room.speaking`) to a sled tree, keyed by room, ownership
//! epoch and sequence. When the room ends, its owner gathers the log: its own part and,
//! from every other live node, the part that node logged while it owned the room (a room
//! that moved has several); merged in (epoch, sequence) order and handed with the summary
//! to the analytics sink. The parts are removed as they are gathered. A part on a node
//! that cannot be reached (one marked down included) is named in the export as missing;
//! the expiry sweep (`upkeep`, `ended_retention_ms` after the end) removes parts left
//! behind. The parts also serve history reads (`room.comments`, see `route`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use chorus_actors::room_actor::{AnalyticsSink, EventLog, LoggedEvent};
use chorus_protocol::RoomSummary;

use crate::server::common::codec::{decode, request, Domain};
use crate::server::context::NodeContext;
use crate::server::rooms::messages::RoomMessage;

/// The sled tree of the logs.
pub const EVENT_LOG_TREE: &str = "rooms/log";
/// Entries one node logs for one room (per activation of its node process); beyond it the
/// entries are dropped and counted (`chorus_event_log_dropped_total`).
pub const EVENT_LOG_ENTRIES_MAX: u64 = 200_000;
/// Time one node has to hand over its part of a log.
const GATHER_TIMEOUT_MS: u64 = 10_000;
/// Byte that separates the room id from the epoch in a key (never in UTF-8).
const KEY_SEPARATOR: u8 = 0xff;

fn prefix(room_id: &str) -> Vec<u8> {
    let mut key = room_id.as_bytes().to_vec();
    key.push(KEY_SEPARATOR);
    key
}

fn key(room_id: &str, epoch: u64, seq: u64) -> Vec<u8> {
    let mut key = prefix(room_id);
    key.extend_from_slice(&epoch.to_be_bytes());
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// The node's event logs.
pub struct NodeEventLog {
    node: Weak<NodeContext>,
    tree: sled::Tree,
    /// Next sequence number per (room, epoch): the logs of rooms this node owns now.
    next_seq: Mutex<HashMap<(String, u64), u64>>,
    sink: Arc<dyn AnalyticsSink>,
}

impl NodeEventLog {
    /// The logs in `db`, exported through `sink`.
    ///
    /// # Errors
    ///
    /// sled's, opening the tree.
    pub fn open(
        db: &sled::Db,
        node: Weak<NodeContext>,
        sink: Arc<dyn AnalyticsSink>,
    ) -> Result<Self, sled::Error> {
        Ok(NodeEventLog {
            node,
            tree: db.open_tree(EVENT_LOG_TREE)?,
            next_seq: Mutex::new(HashMap::new()),
            sink,
        })
    }

    /// Removes and returns this node's part of `room_id`'s log, in order.
    pub fn take(&self, room_id: &str) -> Vec<LoggedEvent> {
        let mut events = Vec::new();
        for entry in self.tree.scan_prefix(prefix(room_id)) {
            let Ok((key, value)) = entry else { continue };
            match rmp_serde::from_slice::<LoggedEvent>(&value) {
                Ok(event) => events.push(event),
                Err(error) => tracing::warn!(room = %room_id, %error, "undecodable log entry"),
            }
            let _ = self.tree.remove(key);
        }
        self.next_seq
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(room, _), _| room != room_id);
        events
    }

    /// The comments of `room_id` in this node's part of its log with ids in
    /// `after + 1 ..= after + limit` (a history read for `room.comments`; nothing removed).
    pub fn comments_after(
        &self,
        room_id: &str,
        after: u64,
        limit: u64,
    ) -> Vec<chorus_protocol::CommentEvent> {
        let mut comments = Vec::new();
        for entry in self.tree.scan_prefix(prefix(room_id)) {
            let Ok((_, value)) = entry else { continue };
            let Ok(event) = rmp_serde::from_slice::<LoggedEvent>(&value) else {
                continue;
            };
            if event.kind != "room.comment" {
                continue;
            }
            match serde_json::from_slice::<chorus_protocol::CommentEvent>(&event.json) {
                Ok(comment)
                    if comment.comment_id > after
                        && comment.comment_id <= after.saturating_add(limit) =>
                {
                    comments.push(comment)
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(room = %room_id, %error, "undecodable logged comment"),
            }
        }
        comments
    }

    /// Forgets the parts of `rooms` (expired).
    pub fn forget(&self, rooms: &[String]) {
        for room_id in rooms {
            let _ = self.take(room_id);
        }
    }

    /// The next sequence number for (`room_id`, `epoch`): after the last one stored (a
    /// restarted node continues its part).
    fn next(&self, room_id: &str, epoch: u64) -> u64 {
        let mut next = self.next_seq.lock().unwrap_or_else(|e| e.into_inner());
        let seq = next.entry((room_id.to_string(), epoch)).or_insert_with(|| {
            let mut from = prefix(room_id);
            from.extend_from_slice(&epoch.to_be_bytes());
            self.tree
                .scan_prefix(from)
                .keys()
                .next_back()
                .and_then(Result::ok)
                .and_then(|k| k.get(k.len() - 8..).map(|b| b.to_vec()))
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(|b| u64::from_be_bytes(b) + 1)
                .unwrap_or(0)
        });
        let this = *seq;
        *seq += 1;
        this
    }

    /// This node's part `own` of `room_id`'s log, with every other node's.
    async fn gather(
        node: &NodeContext,
        own: Vec<LoggedEvent>,
        room_id: &str,
    ) -> (Vec<LoggedEvent>, Vec<String>) {
        let mut events = own;
        let mut missing = Vec::new();
        // A member marked down cannot answer: its part is missing without a wait.
        let live = node.live_peers();
        let self_id = node.cluster.node_id();
        for peer in node.cluster.metadata().nodes.keys() {
            if *peer != self_id && !live.contains(peer) {
                missing.push(format!("node {peer}: down"));
            }
        }
        let others = live;
        let message = request(
            Domain::Rooms,
            &RoomMessage::LogTake {
                room_id: room_id.to_string(),
            },
        );
        for peer in others {
            let call = node.cluster.call_app(peer, message.clone());
            match tokio::time::timeout(Duration::from_millis(GATHER_TIMEOUT_MS), call).await {
                Ok(Ok(reply)) => match decode::<Vec<LoggedEvent>>(&reply) {
                    Ok(part) => events.extend(part),
                    Err(error) => missing.push(format!("node {peer}: {}", error.message)),
                },
                Ok(Err(error)) => missing.push(format!("node {peer}: {error}")),
                Err(_) => missing.push(format!("node {peer}: no answer in {GATHER_TIMEOUT_MS} ms")),
            }
        }
        events.sort_by_key(|e| (e.epoch, e.seq));
        (events, missing)
    }
}

impl EventLog for NodeEventLog {
    fn append(&self, room_id: &str, epoch: u64, at_ms: u64, kind: &str, json: Bytes) {
        let seq = self.next(room_id, epoch);
        if seq >= EVENT_LOG_ENTRIES_MAX {
            metrics::counter!("chorus_event_log_dropped_total").increment(1);
            return;
        }
        let event = LoggedEvent {
            epoch,
            seq,
            at_ms,
            kind: kind.to_string(),
            json,
        };
        let stored = rmp_serde::to_vec_named(&event)
            .map_err(|e| e.to_string())
            .and_then(|bytes| {
                self.tree
                    .insert(key(room_id, epoch, seq), bytes)
                    .map_err(|e| e.to_string())
            });
        if let Err(error) = stored {
            tracing::error!(room = %room_id, %error, "cannot log a room event");
        }
    }

    fn finish(&self, summary: RoomSummary) {
        let node = self.node.clone();
        let sink = self.sink.clone();
        let own = self.take(&summary.room_id);
        tokio::spawn(async move {
            let Some(node) = node.upgrade() else { return };
            let (events, missing) = Self::gather(&node, own, &summary.room_id).await;
            if !missing.is_empty() {
                tracing::warn!(room = %summary.room_id, ?missing, "parts of the event log could not be gathered");
            }
            sink.export(summary, events, missing);
        });
    }
}
