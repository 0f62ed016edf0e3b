//! The node's one remote-capable actor: what other nodes ask of this node over the actor
//! mesh (ractor_cluster over the inter-node QUIC links, see `chorus_cluster::mesh`).
//!
//! Today that is ending a session a client resumed on another node (a takeover while this,
//! its home, still holds it). Room traffic does not go through here: it has its own
//! bounded RPC and relay streams.

use std::sync::{Arc, Weak};
use std::time::Duration;

use chorus_cluster::mesh::{mesh_group, MeshMsg, MeshTarget};
use chorus_cluster::metadata::NodeId;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde::{Deserialize, Serialize};

use crate::server::rooms::service::Rooms;

/// The mesh service name of the control actor (its group is `chorus.control.<id>`).
pub const CONTROL_SERVICE: &str = "control";

/// A request to another node's control actor.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ControlRequest {
    /// End session `session_id` here: its client resumed it on the sending node.
    EndSession {
        /// The session's id.
        session_id: String,
    },
}

/// The control actor's reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlReply {
    /// The session was ended (`found`) or was not held here.
    SessionEnded {
        /// Whether this node held the session.
        found: bool,
    },
}

/// The control actor's message.
pub type ControlMsg = MeshMsg<ControlRequest, ControlReply>;

/// The control actor of one node.
pub struct NodeControl;

impl Actor for NodeControl {
    type Msg = ControlMsg;
    type State = Weak<Rooms>;
    type Arguments = Weak<Rooms>;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        node: Weak<Rooms>,
    ) -> Result<Self::State, ActorProcessingErr> {
        if let Some(node) = node.upgrade() {
            let group = mesh_group(CONTROL_SERVICE, node.ctx.cluster.node_id());
            ractor::pg::join(group, vec![myself.get_cell()]);
        }
        Ok(node)
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        node: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let Some(node) = node.upgrade() else {
            return Ok(());
        };
        match message {
            MeshMsg::Cast(request) => {
                answer(&node, request).await;
            }
            MeshMsg::Call(request, reply) => {
                let _ = reply.send(answer(&node, request).await);
            }
        }
        Ok(())
    }
}

async fn answer(node: &Arc<Rooms>, request: ControlRequest) -> ControlReply {
    metrics::counter!("chorus_mesh_requests_total", "kind" => "end_session").increment(1);
    match request {
        ControlRequest::EndSession { session_id } => {
            let found = node.end_session_resumed_elsewhere(&session_id).await;
            ControlReply::SessionEnded { found }
        }
    }
}

/// What became of an end-session notice sent over the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// The home answered.
    Answered,
    /// The mesh has a session to the home, but it did not answer in time (it is paused
    /// or dying; the notice may still arrive).
    NoAnswer,
    /// The mesh has no session to the home (yet): the caller may use another path.
    NoSession,
}

/// Asks node `home` to end `session_id`, over the actor mesh, waiting at most `timeout`.
pub async fn end_session_on(home: NodeId, session_id: &str, timeout: Duration) -> Delivery {
    let Some(target) = MeshTarget::<ControlRequest, ControlReply>::find(CONTROL_SERVICE, home)
        .filter(MeshTarget::is_remote)
    else {
        metrics::counter!("chorus_mesh_calls_total", "outcome" => "no_session").increment(1);
        return Delivery::NoSession;
    };
    let request = ControlRequest::EndSession {
        session_id: session_id.to_string(),
    };
    match target.call(request, timeout).await {
        Ok(_) => {
            metrics::counter!("chorus_mesh_calls_total", "outcome" => "ok").increment(1);
            Delivery::Answered
        }
        Err(error) => {
            tracing::debug!(home, %error, "end-session over the mesh failed");
            metrics::counter!("chorus_mesh_calls_total", "outcome" => "failed").increment(1);
            Delivery::NoAnswer
        }
    }
}
