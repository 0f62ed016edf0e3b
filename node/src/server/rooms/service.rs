//! The rooms of this node ([`Rooms`]): the room directory (the room actors running here)
//! and what serves them: the room states held for other owners, the mirrors of rooms owned
//! elsewhere, the relays to other nodes, the edge's reaction and bullet batches, the event
//! logs.
//!
//! **Boundary:** inside `rooms/` imports run one way: `messages`, `replica`, `reactions`,
//! `bullets`, `definitions` ← `relay`, `replicate`, `event_log` ← `service` ← `control`,
//! `batches`, `voice` ← `route` ← `activation`, `peer`, `upkeep`. The methods of `Rooms`
//! live in the modules above this one (`route`, `activation`, `peer`, `voice`, `batches`)
//! and its loops in `upkeep`, one concern per file. Nothing in `rooms/` imports `rain`,
//! `quiz`, `edge` or `admin`: they sit above the rooms.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use chorus_actors::room_actor::RoomDirectory;
use chorus_protocol::ErrorCode;

use crate::server::context::{NodeContext, Stopping};
use crate::server::rooms::bullets::BulletEdge;
use crate::server::rooms::event_log::NodeEventLog;
use crate::server::rooms::reactions::ReactionBatcher;
use crate::server::rooms::relay::{EdgeRelay, OwnedEpochs, RoomMirrors};
use crate::server::rooms::replica::DurableStates;
use crate::server::rooms::replicate::NodeReplicator;
use crate::server::sessions::session::Session;

/// The rooms of this node.
pub struct Rooms {
    /// What the whole node shares.
    pub ctx: Arc<NodeContext>,
    /// The room actors running here.
    pub directory: RoomDirectory,
    /// Per room owned elsewhere, the local sessions in it.
    pub mirrors: RoomMirrors,
    /// Room states held here (this node's own rooms and copies for other owners).
    pub durable: Arc<DurableStates>,
    /// Reactions counted here, waiting for their batch to the owners.
    pub reactions: ReactionBatcher,
    /// Bullet comments checked here, waiting for their batch to the owners.
    pub bullets: BulletEdge,
    /// Rooms' event logs (set once at start).
    pub event_log: OnceLock<Arc<NodeEventLog>>,
    /// Ownership epochs of the rooms this node activated.
    pub owned_epochs: Arc<OwnedEpochs>,
    /// The relay to each edge node with members of rooms owned here.
    pub relays: Mutex<HashMap<u64, Arc<EdgeRelay>>>,
    /// Replicates room states to other nodes (shared with the room directory).
    pub replicator: Arc<NodeReplicator>,
    /// The open rooms, for `room.list`.
    pub catalog: crate::server::rooms::catalog::RoomCatalog,
    /// This, for tasks that outlive a call.
    pub this: Weak<Rooms>,
}

impl Stopping for Rooms {
    fn stopping(&self) -> bool {
        self.ctx.shutdown.is_cancelled()
    }
}

impl Rooms {
    /// The rooms of a node: room definitions from `definitions`, states in `durable`.
    pub fn new(
        ctx: Arc<NodeContext>,
        definitions: Arc<dyn chorus_actors::store::DefinitionStore>,
        durable: DurableStates,
    ) -> Arc<Rooms> {
        let durable = Arc::new(durable);
        let owned_epochs = Arc::new(OwnedEpochs::default());
        let replicator = Arc::new(NodeReplicator {
            ctx: Arc::downgrade(&ctx),
            durable: durable.clone(),
        });
        Arc::new_cyclic(|this| Rooms {
            directory: RoomDirectory::new(
                definitions,
                Some(replicator.clone()),
                ctx.config.room.clone(),
            ),
            replicator,
            mirrors: RoomMirrors::default(),
            durable,
            reactions: ReactionBatcher::default(),
            bullets: BulletEdge::new(ctx.config.room.bullets.clone()),
            event_log: OnceLock::new(),
            owned_epochs,
            relays: Mutex::new(HashMap::new()),
            catalog: Default::default(),
            this: this.clone(),
            ctx,
        })
    }

    /// The rooms' event logs.
    pub(crate) fn event_log(&self) -> Option<&Arc<NodeEventLog>> {
        self.event_log.get()
    }

    /// Ends session `session_id` here, if this node holds it, because its client resumed
    /// it on another node: its connection is closed with `resume_failed`. Whether it was
    /// held. (Asked over the actor mesh, or by RPC while the mesh has no session.)
    pub(crate) async fn end_session_resumed_elsewhere(&self, session_id: &str) -> bool {
        let Some(session) = self.ctx.sessions.get(session_id) else {
            return false;
        };
        session.close_connection(ErrorCode::ResumeFailed, "session resumed on another node");
        self.end_session(&session).await;
        true
    }

    /// Ends a session now: it leaves its rooms and can no longer be resumed.
    pub(crate) async fn end_session(&self, session: &Arc<Session>) {
        self.ctx.sessions.remove(&session.id);
        self.leave_all_rooms(session).await;
        tracing::debug!(session = %session.id, "session ended by its client");
    }

    /// Takes a session out of every room it is in.
    pub(crate) async fn leave_all_rooms(&self, session: &Arc<Session>) {
        let rooms: Vec<String> = session.with_core(|core| core.rooms().cloned().collect());
        for room_id in rooms {
            if let Err(error) = self
                .room_op(
                    session,
                    &room_id,
                    crate::server::rooms::messages::RoomOp::Leave,
                )
                .await
            {
                tracing::debug!(room = %room_id, %error, "leave on session end failed");
            }
            session.with_core(|core| core.handle_room_left(&room_id));
        }
    }
}
