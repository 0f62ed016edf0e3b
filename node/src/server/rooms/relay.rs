//! Any-edge routing: a room request from a client on any node goes to the room's owner
//! (placement ring), and the owner's fan-out reaches other nodes' members through one relay
//! per node.
//!
//! - Owner side: a remote session is a room member whose sink is a [`RemoteMember`]; all
//!   remote members on one node share that node's [`EdgeRelay`] (relay group = node id), so
//!   a broadcast crosses to each node once. The relay is a bounded queue drained in order
//!   by one task, in batches, over the inter-node link. The owner opens the inter-node
//!   connection to an edge when it first needs a relay there (`Rooms::relay_to`), so that
//!   voice datagrams, which are never retried, have a path.
//! - Edge side: [`RoomMirrors`] holds, per remote room, the local sessions that joined it;
//!   relayed events are delivered to them.
//!
//! **Stale owners.** Each relayed event carries the sender's ownership epoch
//! ([`OwnedEpochs`]). An edge drops unordered events (reactions, listener counts) from an
//! owner whose epoch is below the committed one. Comments pass: a stale owner can only
//! have broadcast a comment it replicated before it was fenced, which the newer owner holds
//! too, and sessions drop the repeat by its position (see [`RoomMirrors::apply`]).
//!
//! **Boundary:** relay queues are bounded ([`RELAY_QUEUE_ITEMS_MAX`]). A batch an edge does
//! not take (paused, partitioned) is retried in order for [`RELAY_RETRY_WINDOW_MS`] while
//! later events wait in the queue; past the window, or when the queue overflows, events
//! for that edge are dropped and counted (`chorus_relay_dropped_total`).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use bytes::Bytes;
use chorus_actors::room_actor::{Member, MemberSink};
use chorus_cluster::metadata::NodeId;
use chorus_protocol::{EncodedBody, Encoding};
use tokio::sync::mpsc;

use crate::server::common::codec::{request, Domain};
use crate::server::common::keys::room_key;
use crate::server::context::NodeContext;
use crate::server::rooms::messages::{RelayItem, RoomMessage};
use crate::server::sessions::session::Session;

/// Events queued per destination node before the relay drops.
pub const RELAY_QUEUE_ITEMS_MAX: usize = 65_536;
/// How long a relay keeps retrying one batch for an edge that does not answer (longer
/// than a paused process or a short partition usually lasts).
pub const RELAY_RETRY_WINDOW_MS: u64 = 30_000;
/// First pause between relay retries.
pub const RELAY_RETRY_BACKOFF_MIN_MS: u64 = 50;
/// Longest pause between relay retries.
pub const RELAY_RETRY_BACKOFF_MAX_MS: u64 = 2_000;
/// Items sent in one relay message.
pub const RELAY_BATCH_ITEMS_MAX: usize = 512;

/// Ownership epochs of the rooms this node activated: what a relayed event carries, so
/// that an edge drops events from a stale owner.
#[derive(Default)]
pub struct OwnedEpochs(Mutex<HashMap<String, u64>>);

impl OwnedEpochs {
    /// This node's ownership epoch for `room_id` (0 if it never activated it).
    pub fn get(&self, room_id: &str) -> u64 {
        self.map().get(room_id).copied().unwrap_or(0)
    }

    /// This node's ownership epoch for `room_id`, if it activated it.
    pub fn of(&self, room_id: &str) -> Option<u64> {
        self.map().get(room_id).copied()
    }

    /// Records that this node activated `room_id` at `epoch`.
    pub fn set(&self, room_id: &str, epoch: u64) {
        self.map().insert(room_id.to_string(), epoch);
    }

    fn map(&self) -> MutexGuard<'_, HashMap<String, u64>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Relays one room's events from this (owner) node to one edge node, in order.
///
/// Its task is watched: if it ends while the node runs (a panic), the next item pushed
/// starts a new one (`chorus_relay_restarted_total`) instead of finding the queue closed
/// for good.
pub struct EdgeRelay {
    edge: NodeId,
    tx: std::sync::Mutex<mpsc::Sender<RelayItem>>,
    node: Weak<NodeContext>,
    owned_epochs: Arc<OwnedEpochs>,
}

impl EdgeRelay {
    /// Starts the relay task toward `edge`.
    pub fn start(
        node: Weak<NodeContext>,
        owned_epochs: Arc<OwnedEpochs>,
        edge: NodeId,
    ) -> Arc<Self> {
        Arc::new(EdgeRelay {
            edge,
            tx: std::sync::Mutex::new(Self::spawn_task(node.clone(), edge)),
            node,
            owned_epochs,
        })
    }

    /// The relay task: batches the queue and sends each batch to `edge`, in order.
    fn spawn_task(node: Weak<NodeContext>, edge: NodeId) -> mpsc::Sender<RelayItem> {
        let (tx, mut rx) = mpsc::channel::<RelayItem>(RELAY_QUEUE_ITEMS_MAX);
        let node_weak = node.clone();
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(RELAY_BATCH_ITEMS_MAX);
            while let Some(item) = rx.recv().await {
                batch.push(item);
                while batch.len() < RELAY_BATCH_ITEMS_MAX {
                    match rx.try_recv() {
                        Ok(item) => batch.push(item),
                        Err(_) => break,
                    }
                }
                let Some(node) = node.upgrade() else { return };
                let message = request(
                    Domain::Rooms,
                    &RoomMessage::Relay {
                        from: node.cluster.node_id(),
                        items: std::mem::take(&mut batch),
                    },
                );
                drop(node);
                // An edge that is slow or paused gets the batch when it answers again (in
                // order: nothing after it is sent meanwhile); new events wait in the
                // bounded queue. Only after RELAY_RETRY_WINDOW_MS is the batch given up.
                let started = tokio::time::Instant::now();
                let mut backoff_ms = RELAY_RETRY_BACKOFF_MIN_MS;
                loop {
                    let Some(node) = node_weak.upgrade() else {
                        return;
                    };
                    match node.cluster.call_app(edge, message.clone()).await {
                        Ok(_) => break,
                        Err(error) => {
                            if started.elapsed() >= Duration::from_millis(RELAY_RETRY_WINDOW_MS)
                                || node.shutdown.is_cancelled()
                            {
                                metrics::counter!("chorus_relay_dropped_total").increment(1);
                                tracing::warn!(edge, %error, "relay batch given up");
                                break;
                            }
                            tracing::debug!(edge, %error, backoff_ms, "relay batch failed; retrying");
                        }
                    }
                    drop(node);
                    tokio::time::sleep(Duration::from_millis(backoff_ms)).await;
                    backoff_ms = (backoff_ms * 2).min(RELAY_RETRY_BACKOFF_MAX_MS);
                }
            }
        });
        tx
    }

    /// This node's ownership epoch for `room_id` (0 if it never activated it).
    fn owned_epoch(&self, room_id: &str) -> u64 {
        self.owned_epochs.get(room_id)
    }

    /// Sends a relayed voice frame to this relay's node as one datagram.
    pub fn send_audio(&self, node: &NodeContext, frame: &Bytes) {
        if let Err(error) = node.cluster.send_app_datagram(self.edge(), frame.clone()) {
            tracing::debug!(edge = self.edge(), %error, "voice frame not relayed");
            metrics::counter!("chorus_audio_dropped_total", "reason" => "relay").increment(1);
        }
    }

    /// The node this relay sends to.
    pub fn edge(&self) -> NodeId {
        self.edge
    }

    fn push(&self, item: RelayItem) {
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match tx.try_send(item) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                metrics::counter!("chorus_relay_dropped_total").increment(1);
                tracing::warn!(edge = self.edge, "relay queue full: dropping");
            }
            Err(mpsc::error::TrySendError::Closed(item)) => {
                // The task ended: the node is stopping, or the task died. Restart it.
                let Some(node) = self.node.upgrade() else {
                    return;
                };
                if node.shutdown.is_cancelled() {
                    return;
                }
                let mut current = self.tx.lock().unwrap_or_else(|e| e.into_inner());
                if current.same_channel(&tx) {
                    *current = Self::spawn_task(self.node.clone(), self.edge);
                    metrics::counter!("chorus_relay_restarted_total").increment(1);
                    tracing::error!(edge = self.edge, "the relay task had ended: restarted");
                }
                // (Or another push restarted it already.)
                let _ = current.try_send(item);
            }
        }
    }
}

/// A member of a room on this (owner) node whose session lives on another node.
pub struct RemoteMember {
    room_id: String,
    member_key: u64,
    relay: Arc<EdgeRelay>,
}

impl RemoteMember {
    /// The member handle for `member_key` in `room_id`, relayed through `relay`.
    pub fn member(room_id: &str, member_key: u64, relay: Arc<EdgeRelay>) -> Member {
        Member::new(
            member_key,
            Arc::new(RemoteMember {
                room_id: room_id.to_string(),
                member_key,
                relay,
            }),
        )
    }
}

impl RemoteMember {
    fn relay_event(&self, body: &Arc<EncodedBody>, member_key: Option<u64>) {
        // The edge finds its members by room id, so it travels alongside the body.
        self.relay.push(RelayItem::Event {
            room_id: self.room_id.clone(),
            kind: body.kind().to_string(),
            msgpack: body.body_bytes(Encoding::MsgPack).clone(),
            json: body.body_bytes(Encoding::Json).clone(),
            position: body.position().map(|(_, position)| position),
            epoch: self.relay.owned_epoch(&self.room_id),
            member_key,
        });
    }
}

impl MemberSink for RemoteMember {
    fn deliver(&self, body: &Arc<EncodedBody>) {
        self.relay_event(body, None);
    }

    fn deliver_one(&self, body: &Arc<EncodedBody>) {
        self.relay_event(body, Some(self.member_key));
    }

    fn removed_from_room(&self, room_id: &str) {
        self.relay.push(RelayItem::Removed {
            room_id: room_id.to_string(),
            member_key: self.member_key,
        });
    }

    fn relay_group(&self) -> Option<u64> {
        Some(self.relay.edge)
    }

    fn deliver_audio(&self, frame: &Bytes) {
        if let Some(node) = self.relay.node.upgrade() {
            self.relay.send_audio(&node, frame);
        }
    }
}

/// Local sessions in rooms owned by other nodes.
#[derive(Default)]
pub struct RoomMirrors {
    rooms: Mutex<HashMap<String, BTreeMap<u64, Arc<Session>>>>,
}

impl RoomMirrors {
    fn map(&self) -> MutexGuard<'_, HashMap<String, BTreeMap<u64, Arc<Session>>>> {
        self.rooms.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `session` (member key `key`) joined remote room `room_id`.
    pub fn add(&self, room_id: &str, key: u64, session: Arc<Session>) {
        self.map()
            .entry(room_id.to_string())
            .or_default()
            .insert(key, session);
    }

    /// The session with member key `key` left `room_id`.
    pub fn remove(&self, room_id: &str, key: u64) -> Option<Arc<Session>> {
        let mut map = self.map();
        let members = map.get_mut(room_id)?;
        let removed = members.remove(&key);
        if members.is_empty() {
            map.remove(room_id);
        }
        removed
    }

    /// The sessions of this node in `room_id`.
    pub fn sessions(&self, room_id: &str) -> Vec<Arc<Session>> {
        self.map()
            .get(room_id)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// The members of `room_id` on this node: (member key, user).
    pub fn members(&self, room_id: &str) -> Vec<(u64, String)> {
        self.map()
            .get(room_id)
            .map(|m| m.iter().map(|(k, s)| (*k, s.user_id.clone())).collect())
            .unwrap_or_default()
    }

    /// Delivers relayed items to the local members.
    /// Unordered events (reactions, listener counts) from an owner whose epoch is below
    /// the committed ownership in `metadata` are dropped (counted in
    /// `chorus_relay_stale_total`). Comments are not: one a stale owner broadcast was
    /// replicated and acknowledged before the newer owner fenced its replica (fencing
    /// refuses the rest), so it is in the newer owner's state too, and sessions drop the
    /// copy they already have by its position. Dropping it here lost acknowledged comments
    /// when it raced the newer owner's catch-up.
    pub fn apply(
        &self,
        items: Vec<RelayItem>,
        metadata: &chorus_cluster::metadata::ClusterMetadata,
    ) {
        // Consecutive events of one room go to each member together (one write each).
        let mut run: Option<Run> = None;
        for item in items {
            if !matches!(item, RelayItem::Event { .. }) {
                self.deliver_run(run.take());
            }
            match item {
                RelayItem::Event {
                    ref room_id,
                    epoch,
                    position: None,
                    ..
                } if metadata
                    .owners
                    .get(&room_key(room_id))
                    .is_some_and(|o| epoch < o.epoch) =>
                {
                    metrics::counter!("chorus_relay_stale_total").increment(1);
                    tracing::debug!(room = %room_id, epoch, "event from a stale owner dropped");
                }
                RelayItem::Event {
                    room_id,
                    kind,
                    msgpack,
                    json,
                    position,
                    epoch: _,
                    member_key,
                } => {
                    let Some(mut body) = EncodedBody::from_parts(&kind, msgpack, json) else {
                        tracing::warn!(%kind, "relayed event of unknown kind");
                        continue;
                    };
                    if run.as_ref().is_some_and(|(room, _, _)| **room != *room_id)
                        || member_key.is_some()
                    {
                        self.deliver_run(run.take());
                    }
                    let (room, _, bodies) = run.get_or_insert_with(|| {
                        (Arc::from(room_id.as_str()), member_key, Vec::new())
                    });
                    if let Some(position) = position {
                        body = body.with_room_position(room.clone(), position);
                    }
                    bodies.push(Arc::new(body));
                    if member_key.is_some() {
                        self.deliver_run(run.take());
                    }
                }
                RelayItem::Removed {
                    room_id,
                    member_key,
                } => {
                    if let Some(session) = self.remove(&room_id, member_key) {
                        session.removed_from_room(&room_id);
                    }
                }
            }
        }
        self.deliver_run(run);
    }

    /// Delivers a run of one room's relayed events to its local members (or to the one
    /// member they are for).
    fn deliver_run(&self, run: Option<Run>) {
        let Some((room_id, member_key, bodies)) = run else {
            return;
        };
        let members: Vec<Arc<Session>> = self
            .map()
            .get(&*room_id)
            .map(|m| match member_key {
                Some(key) => m.get(&key).cloned().into_iter().collect(),
                None => m.values().cloned().collect(),
            })
            .unwrap_or_default();
        if members.is_empty() {
            tracing::debug!(room = %room_id, "relayed event for a room with no local members");
        }
        for session in members {
            session.deliver_all(&bodies);
        }
    }
}

/// A run of one room's relayed events: the room (its shared name), the member key when
/// they are for one member, and the events in order.
type Run = (Arc<str>, Option<u64>, Vec<Arc<EncodedBody>>);
