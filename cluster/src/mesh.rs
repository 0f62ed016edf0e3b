//! Actor messages between nodes: ractor_cluster over the inter-node QUIC links.
//!
//! Every node runs one ractor_cluster `NodeServer`, named `chorus-<id>`. The node with the
//! lower id opens one actor stream ([`crate::link::ACTOR_STREAM_TAG`]) to every live member
//! with a higher id and hands it to its `NodeServer` as an external connection
//! (`client_connect_external`); the peer's `NodeServer` takes the other end
//! (`ConnectionOpenedExternal`, as the server). ractor_cluster's handshake runs over it with
//! a cookie derived from the cluster CA's private key; the stream itself is inside the
//! mutually authenticated QUIC connection, so its liveness is QUIC's (keep-alive, idle
//! timeout): a dead peer's session ends within the idle timeout, and the stream is opened
//! again once the peer answers. A reconciler compares the sessions with the members every
//! [`MESH_RECONCILE_MS`].
//!
//! Remote-capable actors take [`MeshMsg`] (requests and replies are MessagePack of the
//! application's own types) and join a process group named by [`mesh_group`]; ractor_cluster
//! mirrors group membership over the sessions, so [`MeshTarget::call`] and [`MeshTarget::cast`] reach an actor on
//! another node as a `RemoteActor` that serializes the message onto the stream. Keep few
//! actor types remote-capable: everything else stays local and typed.
//!
//! ractor_cluster's `NodeServer` also binds a TCP listener of its own; it is bound to
//! 127.0.0.1 on an ephemeral port, guarded by the cookie, and unused.

use std::collections::{BTreeSet, HashMap};
use std::marker::PhantomData;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use ractor::message::{BoxedDowncastErr, SerializedMessage};
use ractor::{Actor, ActorRef, RpcReplyPort};
use ractor_cluster::{BoxRead, BoxWrite, ClusterBidiStream, NodeServer, NodeServerMessage};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::metadata::{NodeId, NodeState};
use crate::service::{ClusterError, ClusterService};

/// How often the reconciler compares actor sessions with the members.
pub const MESH_RECONCILE_MS: u64 = 1_000;
/// A peer whose stream was just opened is not tried again for this long (its handshake
/// is under way).
pub const MESH_RETRY_MS: u64 = 3_000;
/// How long asking the `NodeServer` for its sessions may take.
const SESSIONS_QUERY_TIMEOUT_MS: u64 = 1_000;

/// The ractor_cluster node name of node `id`.
pub fn node_name(id: NodeId) -> String {
    format!("chorus-{id}")
}

/// The node id in a ractor_cluster peer name (`chorus-<id>@<host>`).
fn node_id_of(name: &str) -> Option<NodeId> {
    let name = name.split_once('@').map_or(name, |(name, _)| name);
    name.strip_prefix("chorus-")?.parse().ok()
}

/// The process group of `service` on node `node`: a remote-capable actor joins it with
/// `ractor::pg::join`, senders on every node find it there.
pub fn mesh_group(service: &str, node: NodeId) -> String {
    format!("chorus.{service}.{node}")
}

/// One QUIC bidirectional stream as a ractor_cluster transport.
struct QuicBidi {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    peer: SocketAddr,
}

impl ClusterBidiStream for QuicBidi {
    fn split(self: Box<Self>) -> (BoxRead, BoxWrite) {
        (Box::new(self.recv), Box::new(self.send))
    }

    fn peer_label(&self) -> Option<String> {
        Some(self.peer.to_string())
    }
}

/// This node's end of the actor mesh. Dropping it does not stop it; cancel the token
/// given to [`ActorMesh::start`].
#[derive(Clone)]
pub struct ActorMesh {
    server: ActorRef<NodeServerMessage>,
    /// The peers with a session, as of the reconciler's last look.
    peers: std::sync::Arc<std::sync::Mutex<BTreeSet<NodeId>>>,
}

impl std::fmt::Debug for ActorMesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActorMesh").finish_non_exhaustive()
    }
}

impl ActorMesh {
    /// Starts the `NodeServer`, takes the actor streams peers open and keeps one session
    /// to every live member until `shutdown`. `cookie` must be equal on every node
    /// (see [`crate::tls::NodeIdentity::cluster_secret`]).
    pub async fn start(
        service: &ClusterService,
        cookie: String,
        shutdown: CancellationToken,
    ) -> Result<ActorMesh, ClusterError> {
        let self_id = service.node_id();
        let server = NodeServer::new(
            0,
            cookie,
            node_name(self_id),
            Ipv4Addr::LOCALHOST.to_string(),
            None,
            Some(ractor_cluster::node::NodeConnectionMode::Isolated),
        )
        .with_listen_addr(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let (server, handle) = Actor::spawn(None, server, ())
            .await
            .map_err(|e| ClusterError::Refused(format!("actor mesh did not start: {e}")))?;
        let accepting = server.clone();
        service.set_actor_stream_acceptor(std::sync::Arc::new(move |peer, send, recv| {
            let stream = Box::new(QuicBidi { send, recv, peer });
            if accepting
                .cast(NodeServerMessage::ConnectionOpenedExternal {
                    stream,
                    is_server: true,
                })
                .is_err()
            {
                tracing::debug!(%peer, "actor stream dropped: the mesh has stopped");
            }
        }));
        let mesh = ActorMesh {
            server,
            peers: Default::default(),
        };
        let reconciling = mesh.clone();
        let service = service.clone();
        tokio::spawn(async move {
            reconciling.reconcile(service, shutdown).await;
            reconciling.server.stop(Some("node shutting down".into()));
            let _ = handle.await;
        });
        Ok(mesh)
    }

    /// The members this node had an actor session with at the reconciler's last look (at
    /// most [`MESH_RECONCILE_MS`] ago).
    pub fn peers(&self) -> BTreeSet<NodeId> {
        self.peers.lock().map(|p| p.clone()).unwrap_or_default()
    }

    /// The members this node has an actor session with (named by the handshake).
    async fn current_peers(&self) -> BTreeSet<NodeId> {
        let sessions = self
            .server
            .call(
                NodeServerMessage::GetSessions,
                Some(Duration::from_millis(SESSIONS_QUERY_TIMEOUT_MS)),
            )
            .await;
        match sessions {
            Ok(ractor::rpc::CallResult::Success(sessions)) => sessions
                .values()
                .filter_map(|s| s.peer_name.as_ref())
                .filter_map(|name| node_id_of(&name.name))
                .collect(),
            _ => BTreeSet::new(),
        }
    }

    async fn reconcile(&self, service: ClusterService, shutdown: CancellationToken) {
        let self_id = service.node_id();
        let mut metadata = service.subscribe_metadata();
        let mut tried: HashMap<NodeId, tokio::time::Instant> = HashMap::new();
        let mut tick = tokio::time::interval(Duration::from_millis(MESH_RECONCILE_MS));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
                changed = metadata.changed() => if changed.is_err() { return },
            }
            let connected = self.current_peers().await;
            if let Ok(mut peers) = self.peers.lock() {
                peers.clone_from(&connected);
            }
            let now = tokio::time::Instant::now();
            let wanted: Vec<(NodeId, SocketAddr)> = service
                .metadata()
                .nodes
                .values()
                .filter(|n| n.id > self_id && n.state != NodeState::Down)
                .filter(|n| !connected.contains(&n.id))
                .filter_map(|n| Some((n.id, n.cluster_addr.parse().ok()?)))
                .collect();
            tried.retain(|id, at| {
                now.duration_since(*at) < Duration::from_millis(MESH_RETRY_MS)
                    && !connected.contains(id)
            });
            for (id, addr) in wanted {
                if tried.contains_key(&id) {
                    continue;
                }
                tried.insert(id, now);
                let server = self.server.clone();
                let endpoint = service.endpoint().clone();
                tokio::spawn(async move {
                    match endpoint.open_actor_stream(addr).await {
                        Ok((send, recv)) => {
                            let stream = Box::new(QuicBidi {
                                send,
                                recv,
                                peer: addr,
                            });
                            if let Err(error) =
                                ractor_cluster::client_connect_external(&server, stream).await
                            {
                                tracing::debug!(node = id, %error, "actor session not opened");
                            }
                        }
                        Err(error) => tracing::debug!(node = id, %error, "no actor stream"),
                    }
                });
            }
        }
    }
}

/// The message of every remote-capable actor: a request, with a reply port for calls.
/// Across nodes the request and reply travel as MessagePack; locally they are moved.
pub enum MeshMsg<Req, Rep> {
    /// A request that wants no reply.
    Cast(Req),
    /// A request and where to send its reply.
    Call(Req, RpcReplyPort<Rep>),
}

impl<Req, Rep> std::fmt::Debug for MeshMsg<Req, Rep> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MeshMsg::Cast(_) => f.write_str("MeshMsg::Cast"),
            MeshMsg::Call(..) => f.write_str("MeshMsg::Call"),
        }
    }
}

const CAST_VARIANT: &str = "cast";
const CALL_VARIANT: &str = "call";

/// Moves what arrives on `rx` to `tx`, converted; the port keeps `timeout`.
fn bridge_port<A, B>(
    tx: RpcReplyPort<B>,
    convert: impl FnOnce(A) -> Option<B> + Send + 'static,
) -> RpcReplyPort<A>
where
    A: Send + 'static,
    B: Send + 'static,
{
    let timeout = tx.get_timeout();
    let (bridge_tx, bridge_rx) = ractor::concurrency::oneshot::<A>();
    tokio::spawn(async move {
        if let Ok(value) = bridge_rx.await {
            if let Some(converted) = convert(value) {
                let _ = tx.send(converted);
            }
        }
    });
    match timeout {
        Some(timeout) => RpcReplyPort::from((bridge_tx, timeout)),
        None => RpcReplyPort::from(bridge_tx),
    }
}

impl<Req, Rep> ractor::Message for MeshMsg<Req, Rep>
where
    Req: Serialize + DeserializeOwned + Send + 'static,
    Rep: Serialize + DeserializeOwned + Send + 'static,
{
    fn serializable() -> bool {
        true
    }

    fn serialize(self) -> Result<SerializedMessage, BoxedDowncastErr> {
        match self {
            MeshMsg::Cast(request) => Ok(SerializedMessage::Cast {
                variant: CAST_VARIANT.into(),
                args: rmp_serde::to_vec_named(&request).map_err(|_| BoxedDowncastErr)?,
                metadata: None,
            }),
            MeshMsg::Call(request, reply) => Ok(SerializedMessage::Call {
                variant: CALL_VARIANT.into(),
                args: rmp_serde::to_vec_named(&request).map_err(|_| BoxedDowncastErr)?,
                reply: bridge_port(reply, |bytes: Vec<u8>| {
                    rmp_serde::from_slice::<Rep>(&bytes).ok()
                }),
                metadata: None,
            }),
        }
    }

    fn deserialize(message: SerializedMessage) -> Result<Self, BoxedDowncastErr> {
        match message {
            SerializedMessage::Cast { variant, args, .. } if variant == CAST_VARIANT => Ok(
                MeshMsg::Cast(rmp_serde::from_slice(&args).map_err(|_| BoxedDowncastErr)?),
            ),
            SerializedMessage::Call {
                variant,
                args,
                reply,
                ..
            } if variant == CALL_VARIANT => {
                let request = rmp_serde::from_slice(&args).map_err(|_| BoxedDowncastErr)?;
                let reply = bridge_port(reply, |value: Rep| rmp_serde::to_vec_named(&value).ok());
                Ok(MeshMsg::Call(request, reply))
            }
            _ => Err(BoxedDowncastErr),
        }
    }
}

/// A handle on the remote-capable actor of `service` on `node`, if the mesh knows one.
pub struct MeshTarget<Req, Rep> {
    actor: ActorRef<MeshMsg<Req, Rep>>,
    _types: PhantomData<fn(Req) -> Rep>,
}

impl<Req, Rep> MeshTarget<Req, Rep>
where
    Req: Serialize + DeserializeOwned + Send + 'static,
    Rep: Serialize + DeserializeOwned + Send + 'static,
{
    /// The actor of `service` on `node` (a `RemoteActor` when `node` is another node), or
    /// `None` when no session to `node` has announced it (yet).
    pub fn find(service: &str, node: NodeId) -> Option<Self> {
        let cell = ractor::pg::get_members(&mesh_group(service, node))
            .into_iter()
            .next()?;
        Some(MeshTarget {
            actor: cell.into(),
            _types: PhantomData,
        })
    }

    /// Whether the actor lives on another node (its messages cross the mesh).
    pub fn is_remote(&self) -> bool {
        !self.actor.get_id().is_local()
    }

    /// Sends `request` and waits at most `timeout` for the reply.
    pub async fn call(&self, request: Req, timeout: Duration) -> Result<Rep, ClusterError> {
        match self
            .actor
            .call(|reply| MeshMsg::Call(request, reply), Some(timeout))
            .await
        {
            Ok(ractor::rpc::CallResult::Success(reply)) => Ok(reply),
            Ok(ractor::rpc::CallResult::Timeout) => Err(ClusterError::Timeout("mesh call")),
            Ok(ractor::rpc::CallResult::SenderError) => Err(ClusterError::Refused(
                "the remote actor dropped the call".into(),
            )),
            Err(_) => Err(ClusterError::Refused("the mesh actor is gone".into())),
        }
    }

    /// Sends `request` without waiting.
    pub fn cast(&self, request: Req) -> Result<(), ClusterError> {
        self.actor
            .cast(MeshMsg::Cast(request))
            .map_err(|_| ClusterError::Refused("the mesh actor is gone".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_names_give_node_ids() {
        assert_eq!(node_id_of(&node_name(7)), Some(7));
        assert_eq!(node_id_of("chorus-12@127.0.0.1"), Some(12));
        assert_eq!(node_id_of("other-1@host"), None);
        assert_eq!(node_id_of("chorus-x@host"), None);
    }

    #[tokio::test]
    async fn mesh_messages_survive_their_wire_form() {
        type Msg = MeshMsg<String, u64>;
        let cast = <Msg as ractor::Message>::serialize(MeshMsg::Cast("hello".into()))
            .expect("serializable");
        match <Msg as ractor::Message>::deserialize(cast) {
            Ok(MeshMsg::Cast(text)) => assert_eq!(text, "hello"),
            other => panic!("{other:?}"),
        }
        // A call: the reply travels back through both bridges.
        let (tx, rx) = ractor::concurrency::oneshot::<u64>();
        let call = <Msg as ractor::Message>::serialize(MeshMsg::Call(
            "len".into(),
            RpcReplyPort::from(tx),
        ))
        .expect("serializable");
        match <Msg as ractor::Message>::deserialize(call) {
            Ok(MeshMsg::Call(text, reply)) => {
                assert_eq!(text, "len");
                reply.send(3).expect("reply port open");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(rx.await.expect("reply"), 3);
        // Garbage from the network is refused, not a panic.
        let bad = SerializedMessage::Cast {
            variant: CAST_VARIANT.into(),
            args: vec![0xc1, 0xff],
            metadata: None,
        };
        assert!(<Msg as ractor::Message>::deserialize(bad).is_err());
    }
}
