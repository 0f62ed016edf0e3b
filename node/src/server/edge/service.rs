//! The edge: what serves client connections on this node (WebSocket and QUIC), and the
//! places (`connections_max`) they hold. Sits above the rooms, rains and quizzes, whose
//! requests it routes.

use crate::server::voicemail::service::Voicemail;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use chorus_protocol::FrameLimits;

use crate::server::context::NodeContext;
use crate::server::edge::budget::{InboundBudget, ReadBudget};
use crate::server::quiz::Quiz;
use crate::server::rain::Rain;
use crate::server::rooms::service::Rooms;
use crate::token::TokenKeys;

/// The edge of this node.
pub struct Edge {
    /// What the whole node shares.
    pub ctx: Arc<NodeContext>,
    /// The rooms.
    pub rooms: Arc<Rooms>,
    /// Red-packet rains.
    pub rain: Arc<Rain>,
    /// Quiz shows.
    pub quiz: Arc<Quiz>,
    /// Voice messages and user actors.
    pub voicemail: Arc<Voicemail>,
    /// Checks clients' tokens.
    pub keys: TokenKeys,
    /// Frame bounds for clients.
    pub frame_limits: FrameLimits,
    /// Bytes held in partial inbound messages (see `budget`).
    pub inbound: Arc<InboundBudget>,
    next_attachment: AtomicU64,
}

impl Edge {
    /// The edge over these parts.
    pub fn new(
        ctx: Arc<NodeContext>,
        rooms: Arc<Rooms>,
        rain: Arc<Rain>,
        quiz: Arc<Quiz>,
        voicemail: Arc<Voicemail>,
        keys: TokenKeys,
        frame_limits: FrameLimits,
    ) -> Edge {
        let inbound = Arc::new(InboundBudget::new(
            ctx.config.limits.inbound_partial_bytes_max,
        ));
        Edge {
            ctx,
            rooms,
            rain,
            quiz,
            voicemail,
            keys,
            frame_limits,
            inbound,
            next_attachment: AtomicU64::new(1),
        }
    }

    /// A new id for a connection's attachment to a session.
    pub(crate) fn next_attachment_id(&self) -> u64 {
        self.next_attachment.fetch_add(1, Ordering::Relaxed)
    }

    /// Reserves a connection slot, released when the slot is dropped; `None` if the node
    /// is full.
    pub(crate) fn try_open_connection(self: &Arc<Self>) -> Option<ConnectionSlot> {
        let max = self.ctx.config.limits.connections_max;
        self.ctx
            .connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| ConnectionSlot { edge: self.clone() })
    }

    /// A connection's budget for partial messages (see `budget`).
    pub(crate) fn read_budget(&self) -> Arc<ReadBudget> {
        ReadBudget::new(
            self.inbound.clone(),
            self.ctx.config.limits.preauth_message_bytes_max,
        )
    }

    /// Current client connections.
    pub fn connection_count(&self) -> usize {
        self.ctx.connections.load(Ordering::Acquire)
    }
}

/// One of the node's `connections_max` places, held from the moment a client connection is
/// accepted (TCP accept, QUIC handshake) until it closes; unfinished HTTP upgrades hold one
/// too.
pub(crate) struct ConnectionSlot {
    edge: Arc<Edge>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.edge.ctx.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A [`ConnectionSlot`] shared by an HTTP connection's requests until one of them upgrades
/// to a WebSocket and takes it.
pub(crate) type SharedSlot = Arc<std::sync::Mutex<Option<ConnectionSlot>>>;

impl ConnectionSlot {
    /// The slot, to be taken by the request that upgrades.
    pub(crate) fn into_shared(self) -> SharedSlot {
        Arc::new(std::sync::Mutex::new(Some(self)))
    }
}
