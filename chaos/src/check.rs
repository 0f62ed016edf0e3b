//! The end-of-run checks over the clients' logs (SPEC S2, the parts a black-box client can
//! see). Pure functions of the logs; no I/O.
//!
//! - `same_order`: one total order per room — no two different texts with the same comment
//!   id anywhere (live notifications, join responses, acknowledgements), and every client
//!   receives a room's live comments with strictly increasing ids.
//! - `no_loss`: an acknowledged comment reaches every *continuous member* of its room. A
//!   client is a continuous member for a comment when one membership of its (join
//!   acknowledged, session never lost: a reconnect that `Resumed` does not end it, one that
//!   had to `Resync` does) began before the comment was sent and lasted to the end of the
//!   run. Within any membership, even one that ended, an acknowledged comment whose id lies
//!   between the first and last ids that membership received must have been received too
//!   (no holes in a session's stream).
//! - `clients_resumed`: every client is connected at the end (it never gave up).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::workload::{ClientLog, ClientSpec};

/// Violations kept in the report; further ones are only counted.
pub const VIOLATIONS_LISTED_MAX: usize = 200;

/// One invariant violation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Violation {
    /// `same_order`, `no_loss`, `clients_resumed`, `cluster_healthy`, `one_owner`,
    /// `one_leader`.
    pub invariant: String,
    /// What was seen, with room, client, ids and texts.
    pub detail: String,
}

/// What the checks counted, besides violations.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckCounts {
    /// Comment requests sent.
    pub comments_sent: usize,
    /// Of those, acknowledged.
    pub comments_acked: usize,
    /// Comments received live, over all clients.
    pub comments_received: usize,
    /// (acknowledged comment, continuous member) pairs checked for delivery.
    pub deliveries_checked: usize,
    /// Ids no client ever saw that no acknowledgement names either (ordered by an owner
    /// that died before broadcasting: not a violation, since nobody was told it happened).
    pub unacknowledged_gaps: usize,
    /// `Disconnected` events over all clients.
    pub disconnects: usize,
    /// Reconnects that resumed the session.
    pub reconnects_resumed: usize,
    /// Reconnects that had to start a new session and re-join.
    pub reconnects_resynced: usize,
    /// Clients connected at the end.
    pub clients_connected_at_end: usize,
}

/// Collects violations, listing at most [`VIOLATIONS_LISTED_MAX`].
#[derive(Debug, Default)]
pub struct Violations {
    /// Listed ones.
    pub listed: Vec<Violation>,
    /// All, listed or not.
    pub total: usize,
}

impl Violations {
    /// Records one.
    pub fn push(&mut self, invariant: &str, detail: String) {
        self.total += 1;
        if self.listed.len() < VIOLATIONS_LISTED_MAX {
            self.listed.push(Violation {
                invariant: invariant.to_string(),
                detail,
            });
        }
    }
}

/// Scheduling slack allowed on top of the request deadline by the `deadline` check.
const DEADLINE_SLACK_MS: u64 = 1_000;

/// Runs the client-side checks; `start` is the run's start (times in messages count from it).
pub fn check_logs(
    clients: &[(ClientSpec, &ClientLog)],
    start: tokio::time::Instant,
    start_unix_ms: u64,
    violations: &mut Violations,
) -> CheckCounts {
    let mut counts = CheckCounts::default();

    // same_order: one text per (room, id), from every source.
    let mut texts: BTreeMap<(&str, u64), (&str, String)> = BTreeMap::new();
    let mut order_conflicts = BTreeSet::new();
    for (spec, log) in clients {
        for sent in &log.sent {
            counts.comments_sent += 1;
            if let Some(id) = sent.acked_id {
                counts.comments_acked += 1;
                remember(
                    &mut texts,
                    &mut order_conflicts,
                    (&sent.room, id),
                    &sent.text,
                    format!("ack to client {}", spec.index),
                    violations,
                );
            }
        }
        for received in &log.received {
            if !received.from_join {
                counts.comments_received += 1;
            }
            let source = if received.from_join {
                format!("join response to client {}", spec.index)
            } else {
                format!("notification to client {}", spec.index)
            };
            remember(
                &mut texts,
                &mut order_conflicts,
                (&received.room, received.comment_id),
                &received.text,
                source,
                violations,
            );
        }
        // Strictly increasing live ids per room, over the client's whole life.
        let mut last: HashMap<&str, u64> = HashMap::new();
        for received in log.received.iter().filter(|r| !r.from_join && !r.fetched) {
            if let Some(previous) = last.get(received.room.as_str()) {
                if received.comment_id <= *previous {
                    violations.push(
                        "same_order",
                        format!(
                            "client {} in room {}: comment id {} ({:?}) after id {previous}",
                            spec.index, received.room, received.comment_id, received.text
                        ),
                    );
                }
            }
            last.insert(&received.room, received.comment_id);
        }
    }

    // at_most_once: every comment text is unique per send, so one text under two ids is a
    // request the cluster ran twice.
    let mut ids_of_text: BTreeMap<(&str, &str), BTreeSet<u64>> = BTreeMap::new();
    for ((room, id), (text, _)) in &texts {
        ids_of_text.entry((room, text)).or_default().insert(*id);
    }
    for ((room, text), ids) in &ids_of_text {
        if ids.len() > 1 {
            violations.push(
                "at_most_once",
                format!(
                    "room {room}: comment {text:?} was posted {} times, as ids {ids:?}",
                    ids.len()
                ),
            );
        }
    }

    // deadline: a room runs a comment at most the node's request deadline after it was
    // sent (server and clients share this machine's clock; 1 s of slack for scheduling).
    let deadline_ms = chorus_node::server::rooms::route::REQUEST_DEADLINE_MS + DEADLINE_SLACK_MS;
    let sent_at_ms: HashMap<(&str, &str), u64> = clients
        .iter()
        .flat_map(|(_, log)| log.sent.iter())
        .map(|s| {
            let offset = s.sent_at.saturating_duration_since(start).as_millis() as u64;
            ((s.room.as_str(), s.text.as_str()), start_unix_ms + offset)
        })
        .collect();
    let mut late = BTreeSet::new();
    for (_, log) in clients {
        for received in &log.received {
            let Some(sent) = sent_at_ms.get(&(received.room.as_str(), received.text.as_str()))
            else {
                continue;
            };
            if received.ordered_at_ms > sent + deadline_ms && late.insert(&received.text) {
                violations.push(
                    "deadline",
                    format!(
                        "room {}: comment {:?} was posted {} ms after it was sent (deadline {} ms)",
                        received.room,
                        received.text,
                        received.ordered_at_ms - sent,
                        chorus_node::server::rooms::route::REQUEST_DEADLINE_MS
                    ),
                );
            }
        }
    }

    // no_loss.
    let acked: Vec<(&str, u64, &str, tokio::time::Instant)> = clients
        .iter()
        .flat_map(|(_, log)| log.sent.iter())
        .filter_map(|s| {
            s.acked_id
                .map(|id| (s.room.as_str(), id, s.text.as_str(), s.sent_at))
        })
        .collect();
    let mut acked_by_room: HashMap<&str, Vec<(u64, &str, tokio::time::Instant)>> = HashMap::new();
    for (room, id, text, at) in &acked {
        acked_by_room
            .entry(room)
            .or_default()
            .push((*id, text, *at));
    }
    for (spec, log) in clients {
        let live: HashSet<(&str, &str)> = log
            .received
            .iter()
            .filter(|r| !r.from_join)
            .map(|r| (r.room.as_str(), r.text.as_str()))
            .collect();
        for (index, membership) in log.memberships.iter().enumerate() {
            let got: HashSet<&str> = log
                .received
                .iter()
                .filter(|r| r.membership == Some(index))
                .map(|r| r.text.as_str())
                .collect();
            let got_ids: Vec<u64> = log
                .received
                .iter()
                .filter(|r| r.membership == Some(index))
                .map(|r| r.comment_id)
                .collect();
            let first = got_ids.iter().min().copied();
            let last = got_ids.iter().max().copied();
            let Some(room_acked) = acked_by_room.get(membership.room.as_str()) else {
                continue;
            };
            for (id, text, sent_at) in room_acked {
                let continuous = membership.end.is_none() && *sent_at >= membership.start;
                let inside = matches!((first, last), (Some(f), Some(l)) if f < *id && *id < l);
                if !(continuous || inside) {
                    continue;
                }
                counts.deliveries_checked += 1;
                // A continuous member may have received it just before the join's
                // acknowledgement was recorded: any live receipt in the room counts.
                let received = if continuous {
                    live.contains(&(membership.room.as_str(), *text))
                } else {
                    got.contains(text)
                };
                if !received {
                    let why = if continuous {
                        "sent while it was a continuous member until the end"
                    } else {
                        "inside the id range that membership received"
                    };
                    violations.push(
                        "no_loss",
                        format!(
                            "client {} never received acknowledged comment {id} {text:?} in room {} ({why}; membership {index} from {} ms after start, ended: {})",
                            spec.index,
                            membership.room,
                            membership.start.saturating_duration_since(start).as_millis(),
                            membership.end.is_some()
                        ),
                    );
                }
            }
        }
    }

    // Gaps nobody saw and nobody was told about.
    let mut seen_ids: BTreeMap<&str, BTreeSet<u64>> = BTreeMap::new();
    for (room, id) in texts.keys() {
        seen_ids.entry(room).or_default().insert(*id);
    }
    for ids in seen_ids.values() {
        if let Some(max) = ids.iter().next_back() {
            counts.unacknowledged_gaps += (1..=*max).filter(|id| !ids.contains(id)).count();
        }
    }

    // clients_resumed.
    for (spec, log) in clients {
        counts.disconnects += log.disconnects.len();
        counts.reconnects_resumed += log.resumed;
        counts.reconnects_resynced += log.resynced;
        if log.connected && log.gave_up.is_none() {
            counts.clients_connected_at_end += 1;
        } else {
            violations.push(
                "clients_resumed",
                format!(
                    "client {} is not connected at the end: {}",
                    spec.index,
                    log.gave_up
                        .as_deref()
                        .unwrap_or("disconnected, never reconnected")
                ),
            );
        }
    }
    counts
}

fn remember<'a>(
    texts: &mut BTreeMap<(&'a str, u64), (&'a str, String)>,
    conflicts: &mut BTreeSet<(String, u64)>,
    key: (&'a str, u64),
    text: &'a str,
    source: String,
    violations: &mut Violations,
) {
    match texts.get(&key) {
        None => {
            texts.insert(key, (text, source));
        }
        Some((known, known_source)) => {
            if *known != text && conflicts.insert((key.0.to_string(), key.1)) {
                violations.push(
                    "same_order",
                    format!(
                        "room {} comment id {} is {known:?} ({known_source}) and {text:?} ({source})",
                        key.0, key.1
                    ),
                );
            }
        }
    }
}
