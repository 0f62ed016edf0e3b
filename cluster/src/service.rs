//! The cluster service: one node's membership in the cluster.
//!
//! It owns the node's [`ClusterEndpoint`] (inter-node QUIC) and its [`MetadataRaft`]
//! member, carries Raft RPCs over QUIC, runs the join protocol and the failure detector,
//! and forwards metadata writes to the leader. The node's id is assigned by the metadata
//! on first join, kept in sled, and reused on restart (ids are never reused by another
//! node).
//!
//! # Joining
//!
//! Joining is safe when any number of nodes start at once (`chorus serve --join ADDR`,
//! ADDR any member's cluster address, or a node that is itself still joining: it points
//! the joiner at its own seed, so nodes may join through each other in a chain). The first
//! member registers itself as id 1 (`Bootstrap`, applied once); every joiner's id comes
//! from one Raft decision and is above 1, so a join that reaches the first member before
//! its own record is committed cannot take its id.
//!
//! 1. `Register` (forwarded to the leader): the leader appends `AddNode` with the joiner's
//!    random join token (flushed to the joiner's disk first) and answers the id. A retried
//!    `Register` with the same token (a lost answer, a restart half-way) gets the same id,
//!    while a new process at a known address (its data dir was lost) gets a new one. The
//!    joiner stores the id, starts its Raft member and serves RPCs.
//! 2. `Activate` (forwarded to the leader): the leader adds it as a learner (and waits
//!    until it caught up), makes it a voter while there are fewer than `voters_max` (3 or
//!    5), and marks it `Up`, which bumps the ring epoch.
//!
//! The leader runs one membership change at a time (join, removal, new addresses: a lock
//! across the Raft steps); a change Raft still refuses (a new leader finishing its
//! predecessor's) is answered `Retry`. The joiner retries each step with jittered backoff
//! (100 ms doubling to 2 s) until [`ClusterConfig::join_timeout`] (60 s); then the join
//! fails with [`ClusterError::JoinTimeout`], naming the seed and the last answer, and the
//! node exits non-zero. A certificate refused either way ([`LinkError::Certificate`]: the
//! nodes do not share a CA) ends the join at once with that error.
//!
//! # Addresses
//!
//! A member's addresses in the metadata are what it advertises (`--advertise-ip` with the
//! bound ports, else the bound addresses). A node restarted at other addresses (a pod with
//! a new IP) finds the leader through the members it knows and asks it to record them
//! (`SetAddresses` in the metadata, the new address in the Raft membership). The Raft
//! transport dials a member at its address in the applied metadata, so replication reaches
//! it at once. Raft RPCs and application messages name their target node, and a node
//! refuses those meant for another id, so an address that passed from one member to
//! another is never mistaken for the old member.
//!
//! # Failures and removal
//!
//! Every member probes every other every 500 ms; the leader marks a member `Down` after 4
//! failed probes in a row (about 2 s), which moves the ring. A running node that finds
//! itself `Down` (it was paused or cut off) asks to be `Up` again.
//!
//! Removal goes through the leader ([`ClusterService::remove_node`], retried for up to
//! 30 s while the leader is busy or an election runs); an `Up` learner is promoted when the
//! voters fall below `voters_max`. A leader asked to remove itself hands leadership to
//! another `Up` voter and answers `Retry`, and the caller asks the new leader: once its own
//! removal commits, a leader can propose nothing more, and openraft refuses a membership
//! change from it.
//!
//! A node whose Raft core stops on its own (a storage error, a library bug) cannot follow
//! the cluster any more: [`ClusterService::raft_failed`] resolves, and `chorus serve` stops
//! as on SIGTERM and exits 1, so its supervisor restarts it from its data dir.
//!
//! # Cut off
//!
//! Each probe round also counts the Raft voters this member reached, itself included.
//! After 4 rounds in a row without a majority it is cut off
//! ([`ClusterService::is_cut_off`]). With fewer than three voters no member counts as cut
//! off: neither side of a cut has a majority, and both keep serving the rooms they own
//! while Raft commits nothing. Once it reaches a majority again it asks the leader for a
//! read index (`ReadIndex`: the leader confirms its term with a quorum) and is no longer
//! cut off only after it has applied up to that index, so it is ready again only on the
//! current metadata. What the node does meanwhile is in `docs/design.md` ("Partitions").

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::link::{ClusterEndpoint, LinkError, RpcHandler};
use crate::metadata::{
    ClusterMetadata, MetadataCommand, MetadataResponse, NodeId, NodeRecord, NodeState,
    BOOTSTRAP_NODE_ID,
};
use crate::raft::{
    MetadataRaft, RaftConfig, RaftError, RaftMetrics, RaftNode, RaftRpc, RaftRpcHandler,
    RaftRpcReply, RaftTransport, TransportError,
};
use crate::ring::Ring;

/// sled tree holding this node's identity.
pub const IDENTITY_TREE: &str = "cluster/identity";
/// Attempts to reach a leader before a forwarded write gives up.
pub const FORWARD_ATTEMPTS_MAX: u32 = 40;
/// Pause between forwarding attempts while no leader is known.
pub const FORWARD_RETRY_MS: u64 = 250;
/// Leader redirects followed by one attempt to record a node's new addresses.
const FORWARD_HOPS_MAX: u32 = 3;
/// How often every member probes every other member.
pub const FAILURE_PROBE_INTERVAL_MS: u64 = 500;
/// How long one probe may take (under the interval, so a round never waits on a dead peer).
pub const FAILURE_PROBE_TIMEOUT_MS: u64 = 400;
/// Consecutive failed probes after which the leader marks a member `Down` (with the
/// interval and timeout above: detected within about 2 s).
pub const FAILURE_PROBES_MISSED_MAX: u32 = 4;
/// Probe rounds in a row in which a member reaches no majority of the voters (itself
/// included) after which it counts itself cut off: about 2 s with the interval above.
pub const CUT_OFF_ROUNDS: u32 = 4;
/// How long a member that reaches a majority again may take to catch up with the leader's
/// log before it tries again (it stays cut off meanwhile).
pub const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(5);

/// How this node takes part in the cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Node name.
    pub name: String,
    /// Inter-node address this node listens on and advertises.
    pub cluster_addr: SocketAddr,
    /// Client HTTP address (advertised).
    pub http_addr: SocketAddr,
    /// Client QUIC address (advertised).
    pub quic_addr: SocketAddr,
    /// A member's cluster address to join; `None` starts (or restarts) on its own.
    pub join: Option<SocketAddr>,
    /// Voters in the Raft group: 3 (default) or 5; further nodes are learners.
    pub voters_max: usize,
    /// How long a first join may take before the node gives up.
    pub join_timeout: Duration,
    /// Raft timing.
    pub raft: RaftConfig,
}

/// The default [`ClusterConfig::join_timeout`].
pub const JOIN_TIMEOUT_DEFAULT: Duration = Duration::from_secs(60);
/// First pause before a join step is tried again; it doubles up to [`JOIN_BACKOFF_MAX_MS`].
const JOIN_BACKOFF_MIN_MS: u64 = 100;
/// Longest pause between two tries of a join step.
const JOIN_BACKOFF_MAX_MS: u64 = 2_000;

/// How long [`ClusterService::remove_node`] keeps asking the leader.
pub const REMOVE_TIMEOUT: Duration = Duration::from_secs(30);

/// Cluster service errors.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// Raft failed.
    #[error(transparent)]
    Raft(#[from] RaftError),
    /// The inter-node link failed.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// Local storage failed.
    #[error("cluster identity storage: {0}")]
    Storage(#[from] sled::Error),
    /// A peer answered something unexpected or refused.
    #[error("peer refused: {0}")]
    Refused(String),
    /// A message could not be encoded or decoded.
    #[error("cluster message codec: {0}")]
    Codec(String),
    /// No leader could be reached in time.
    #[error("no leader reachable after {0} attempts")]
    NoLeader(u32),
    /// An operation did not finish in time.
    #[error("{0} did not finish in time")]
    Timeout(&'static str),
    /// The first join did not complete in time.
    #[error(
        "could not join the cluster through {seed} within {seconds} s (last: {last}); \
         check that --join names a running member's --cluster-addr and that both nodes \
         use the same CA"
    )]
    JoinTimeout {
        /// The `--join` address.
        seed: SocketAddr,
        /// The deadline.
        seconds: u64,
        /// The last answer or error.
        last: String,
    },
}

/// An inter-node request.
#[derive(Debug, Serialize, Deserialize)]
enum PeerRequest {
    /// A Raft RPC (encoded by the raft module) for member `target`: a node refuses RPCs
    /// meant for another id (an address can move from one member to another).
    Raft { target: NodeId, rpc: Vec<u8> },
    /// Join step 1: register a new member (leader only).
    Register {
        name: String,
        cluster_addr: String,
        http_addr: String,
        quic_addr: String,
        #[serde(default)]
        join_token: u64,
    },
    /// Join step 2: make a registered member a learner/voter and `Up` (leader only).
    Activate { node: NodeId, cluster_addr: String },
    /// A metadata write (leader only).
    Write(MetadataCommand),
    /// An application message (room routing, relay) for member `target`, handled by the
    /// node's [`AppHandler`]. A node refuses one meant for another id: an address can move
    /// from a removed member to a new one, which must not answer for it.
    App { target: NodeId, request: Vec<u8> },
    /// Liveness probe from the leader's failure detector.
    Ping,
    /// The leader's applied index after it confirmed its leadership with a quorum
    /// (ReadIndex): a member that has applied up to it has caught up (leader only).
    ReadIndex,
    /// Remove a member from the Raft group and the metadata (leader only); a learner is
    /// promoted if voters fall below `voters_max`.
    Remove { node: NodeId },
    /// A member restarted at other addresses: record them in the metadata and the Raft
    /// membership (leader only).
    UpdateAddresses {
        node: NodeId,
        cluster_addr: String,
        http_addr: String,
        quic_addr: String,
    },
}

/// An inter-node reply.
#[derive(Debug, Serialize, Deserialize)]
enum PeerReply {
    Raft(Vec<u8>),
    Registered(NodeId),
    Activated,
    Written(MetadataResponse),
    App(Vec<u8>),
    Pong,
    /// The answer to `ReadIndex`.
    ReadIndex(u64),
    /// Not the leader: ask this address (if known).
    NotLeader(Option<String>),
    Error(String),
    /// Not now, ask again (the node is starting, another membership change is in
    /// progress, …): the reason.
    Retry(String),
}

fn encode<T: Serialize>(value: &T) -> Result<Bytes, ClusterError> {
    rmp_serde::to_vec_named(value)
        .map(Bytes::from)
        .map_err(|e| ClusterError::Codec(e.to_string()))
}

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, ClusterError> {
    rmp_serde::from_slice(bytes).map_err(|e| ClusterError::Codec(e.to_string()))
}

/// Raft RPCs over the inter-node QUIC endpoint.
#[derive(Clone, Debug)]
pub struct QuicRaftTransport {
    endpoint: ClusterEndpoint,
    /// The applied metadata, once Raft runs: a member's address there wins over the one
    /// openraft holds for it (openraft keeps a replication stream's address until the
    /// stream is rebuilt, but a member that restarted elsewhere must be reached at once).
    metadata: Arc<std::sync::OnceLock<tokio::sync::watch::Receiver<Arc<ClusterMetadata>>>>,
}

impl QuicRaftTransport {
    fn address_of(&self, target: NodeId, membership_addr: &str) -> String {
        self.metadata
            .get()
            .and_then(|metadata| {
                metadata
                    .borrow()
                    .nodes
                    .get(&target)
                    .map(|n| n.cluster_addr.clone())
            })
            .unwrap_or_else(|| membership_addr.to_string())
    }
}

impl RaftTransport for QuicRaftTransport {
    async fn send(
        &self,
        target: NodeId,
        addr: &str,
        rpc: RaftRpc,
    ) -> Result<RaftRpcReply, TransportError> {
        let addr = self.address_of(target, addr);
        let unreachable = |reason: String| TransportError::Unreachable {
            target,
            addr: addr.clone(),
            reason,
        };
        let peer: SocketAddr = addr
            .parse()
            .map_err(|e| unreachable(format!("bad address: {e}")))?;
        let request = encode(&PeerRequest::Raft {
            target,
            rpc: rpc.encode()?,
        })
        .map_err(|e| TransportError::Codec(e.to_string()))?;
        let reply = self
            .endpoint
            .call(peer, request)
            .await
            .map_err(|e| match e {
                LinkError::Connect { reason, .. } => unreachable(reason),
                other => TransportError::Failed {
                    target,
                    reason: other.to_string(),
                },
            })?;
        match decode::<PeerReply>(&reply).map_err(|e| TransportError::Codec(e.to_string()))? {
            PeerReply::Raft(bytes) => RaftRpcReply::decode(&bytes),
            other => Err(TransportError::Failed {
                target,
                reason: format!("unexpected reply {other:?}"),
            }),
        }
    }
}

/// A member's view of the cluster, for `chorus admin status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// This node's id.
    #[serde(rename = "self")]
    pub self_id: NodeId,
    /// The Raft leader, if known.
    pub leader: Option<NodeId>,
    /// Current Raft term.
    pub term: u64,
    /// Placement ring epoch.
    pub ring_epoch: u64,
    /// Last applied log index.
    pub applied_index: Option<u64>,
    /// Voters.
    pub voters: Vec<NodeId>,
    /// Learners.
    pub learners: Vec<NodeId>,
    /// Members.
    pub members: Vec<NodeRecord>,
}

struct Inner {
    config: ClusterConfig,
    endpoint: ClusterEndpoint,
    raft: MetadataRaft,
    raft_rpc: RaftRpcHandler,
    node_id: NodeId,
    app: std::sync::OnceLock<Arc<dyn AppHandler>>,
    actor_streams: std::sync::OnceLock<ActorStreamAcceptor>,
    /// Held by the leader across one membership change (join, removal, new address), so
    /// that concurrent joins queue here instead of being refused by Raft.
    membership: tokio::sync::Mutex<()>,
    /// Whether this member is cut off: it has reached no majority of the voters for
    /// [`CUT_OFF_ROUNDS`] probe rounds in a row (and has not caught up since).
    cut_off: tokio::sync::watch::Sender<bool>,
}

/// Takes the actor-mesh streams peers open (see [`crate::mesh`]).
pub type ActorStreamAcceptor =
    Arc<dyn Fn(SocketAddr, quinn::SendStream, quinn::RecvStream) + Send + Sync>;

/// One node's membership in the cluster. Cheap to clone.
#[derive(Clone)]
pub struct ClusterService {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ClusterService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterService")
            .field("node_id", &self.inner.node_id)
            .finish()
    }
}

/// Handles application messages between nodes (what the node layers on the cluster:
/// room routing, event relay).
pub trait AppHandler: Send + Sync + 'static {
    /// Answers one message. The sender is a cluster member (mutual TLS); messages name
    /// their sender themselves where it matters.
    fn handle(
        &self,
        request: Bytes,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Bytes> + Send + '_>>;

    /// Takes one datagram from a member (voice), in arrival order per sending node. The
    /// default drops it.
    fn datagram(
        &self,
        datagram: Bytes,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        let _ = datagram;
        Box::pin(async {})
    }
}

struct Handler {
    service: tokio::sync::OnceCell<ClusterService>,
    /// This node's id and Raft RPC handler, once its id is known and Raft runs.
    raft: std::sync::OnceLock<(NodeId, RaftRpcHandler)>,
    /// The `--join` address: while this node is still joining, it sends joiners there.
    join_seed: Option<SocketAddr>,
}

impl Handler {
    /// The answer to a request this node cannot serve yet (it is still starting).
    fn starting(&self) -> PeerReply {
        match self.join_seed {
            Some(seed) => PeerReply::NotLeader(Some(seed.to_string())),
            None => PeerReply::Retry("node is starting".into()),
        }
    }
}

impl RpcHandler for Handler {
    async fn handle(&self, _peer: SocketAddr, request: Bytes) -> Bytes {
        let reply = match decode::<PeerRequest>(&request) {
            Err(error) => PeerReply::Error(error.to_string()),
            Ok(PeerRequest::Ping) => PeerReply::Pong,
            Ok(PeerRequest::App { target, request }) => match self.service.get() {
                Some(service) if service.inner.node_id != target => PeerReply::Error(format!(
                    "message for node {target} reached node {}",
                    service.inner.node_id
                )),
                Some(service) => match service.inner.app.get() {
                    Some(app) => PeerReply::App(app.handle(Bytes::from(request)).await.to_vec()),
                    None => PeerReply::Error("node is starting".into()),
                },
                None => PeerReply::Error("node is starting".into()),
            },
            Ok(PeerRequest::Raft { target, rpc }) => match self.raft.get() {
                None => PeerReply::Error("node is starting".into()),
                Some((node_id, _)) if target != *node_id => {
                    PeerReply::Error(format!("raft rpc for node {target} reached node {node_id}"))
                }
                Some((_, raft)) => match raft.handle_bytes(&rpc).await {
                    Ok(reply) => PeerReply::Raft(reply),
                    Err(error) => PeerReply::Error(error.to_string()),
                },
            },
            Ok(other) => match self.service.get() {
                Some(service) => service.handle_peer(other).await,
                None => self.starting(),
            },
        };
        encode(&reply).unwrap_or_default()
    }

    async fn datagram(&self, _peer: SocketAddr, datagram: Bytes) {
        if let Some(app) = self.service.get().and_then(|s| s.inner.app.get()) {
            app.datagram(datagram).await;
        }
    }

    fn actor_stream(&self, peer: SocketAddr, send: quinn::SendStream, recv: quinn::RecvStream) {
        match self
            .service
            .get()
            .and_then(|service| service.inner.actor_streams.get())
        {
            Some(accept) => accept(peer, send, recv),
            None => tracing::debug!(%peer, "actor stream refused: no actor mesh on this node"),
        }
    }
}

impl ClusterService {
    /// Starts (or restarts) this node's membership: binds nothing itself — `endpoint` is
    /// bound by the caller — serves inter-node RPCs until `shutdown`, and joins or
    /// initializes as needed.
    pub async fn start(
        config: ClusterConfig,
        db: &sled::Db,
        endpoint: ClusterEndpoint,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Result<Self, ClusterError> {
        let identity = db.open_tree(IDENTITY_TREE)?;
        let stored_id = stored_u64(&identity, "node_id")?;
        let transport = QuicRaftTransport {
            endpoint: endpoint.clone(),
            metadata: Arc::default(),
        };
        let transport_metadata = transport.metadata.clone();
        // Serve from the start: a node still joining answers pings and sends other joiners
        // to its own seed, so nodes may join through each other in any order.
        let handler = Arc::new(Handler {
            service: tokio::sync::OnceCell::new(),
            raft: std::sync::OnceLock::new(),
            join_seed: config.join,
        });
        let serving = endpoint.clone();
        let serving_handler = handler.clone();
        let shutdown_serving = shutdown.clone();
        tokio::spawn(async move {
            serving
                .serve(serving_handler, shutdown_serving.cancelled_owned())
                .await
        });
        let join_deadline = tokio::time::Instant::now() + config.join_timeout;

        let node_id = match (stored_id, config.join) {
            (Some(id), _) => id,
            (None, None) => BOOTSTRAP_NODE_ID,
            (None, Some(seed)) => {
                let join_token = join_token(&identity).await?;
                let request = PeerRequest::Register {
                    name: config.name.clone(),
                    cluster_addr: config.cluster_addr.to_string(),
                    http_addr: config.http_addr.to_string(),
                    quic_addr: config.quic_addr.to_string(),
                    join_token,
                };
                match join_step(&endpoint, seed, &request, join_deadline, &config).await? {
                    PeerReply::Registered(id) => id,
                    other => return Err(ClusterError::Refused(format!("{other:?}"))),
                }
            }
        };
        identity.insert("node_id", &node_id.to_be_bytes())?;
        identity.flush_async().await?;

        let raft = MetadataRaft::start(node_id, db, transport, &config.raft).await?;
        let _ = transport_metadata.set(raft.subscribe());
        let raft_rpc = raft.rpc_handler();
        let _ = handler.raft.set((node_id, raft_rpc.clone()));
        let service = ClusterService {
            inner: Arc::new(Inner {
                config: config.clone(),
                endpoint: endpoint.clone(),
                raft,
                raft_rpc,
                node_id,
                app: std::sync::OnceLock::new(),
                actor_streams: std::sync::OnceLock::new(),
                membership: tokio::sync::Mutex::new(()),
                cut_off: tokio::sync::watch::channel(false).0,
            }),
        };
        let _ = handler.service.set(service.clone());
        let shutdown_detector = shutdown.clone();

        match config.join {
            // The first member (a restart that stopped before the record was committed
            // registers it from `mark_self_up`).
            None if stored_id.is_none() => service.bootstrap().await?,
            None => {}
            Some(seed) => {
                // Also after a restart, until this node has been activated: a node that
                // stopped half-way through its join finishes it.
                let activated = service
                    .metadata()
                    .nodes
                    .get(&node_id)
                    .is_some_and(|n| n.state != NodeState::Joining);
                if stored_id.is_none() || !activated {
                    let request = PeerRequest::Activate {
                        node: node_id,
                        cluster_addr: config.cluster_addr.to_string(),
                    };
                    match join_step(&endpoint, seed, &request, join_deadline, &config).await? {
                        PeerReply::Activated => {}
                        other => return Err(ClusterError::Refused(format!("{other:?}"))),
                    }
                }
            }
        }
        tokio::spawn(service.clone().detect_failures(shutdown_detector.clone()));
        tokio::spawn(
            service
                .clone()
                .mark_self_up(shutdown_detector, stored_id.is_some()),
        );
        tracing::info!(node_id, "cluster member running");
        Ok(service)
    }

    /// Keeps this running node `Up`: whenever the applied metadata shows it `Down` (the
    /// failure detector saw it silent: it was paused, partitioned, or restarted), it asks
    /// to be `Up` again, at most once per [`FORWARD_RETRY_MS`]. After a restart it also
    /// leaves `Joining`/`Draining` (a restarted node serves; an operator who wants it gone
    /// removes it). Runs until shutdown.
    async fn mark_self_up(self, shutdown: tokio_util::sync::CancellationToken, restarted: bool) {
        let mut metadata = self.inner.raft.subscribe();
        let mut leave_other_states = restarted;
        loop {
            let state = metadata
                .borrow()
                .nodes
                .get(&self.inner.node_id)
                .map(|n| n.state);
            let unregistered_first = state.is_none()
                && self.inner.config.join.is_none()
                && self.inner.node_id == BOOTSTRAP_NODE_ID
                && !metadata.borrow().bootstrapped;
            let wanted = match state {
                Some(NodeState::Down) => true,
                Some(NodeState::Joining) | Some(NodeState::Draining) => leave_other_states,
                Some(NodeState::Up) => {
                    // Seen as up once the log has caught up; from now on only Down is undone.
                    leave_other_states = false;
                    false
                }
                None => false,
            };
            let moved = metadata
                .borrow()
                .nodes
                .get(&self.inner.node_id)
                .is_some_and(|record| !self.is_at_own_addresses(record));
            if moved && !shutdown.is_cancelled() {
                match self.update_own_addresses().await {
                    Ok(()) => tracing::info!(
                        cluster_addr = %self.inner.config.cluster_addr,
                        "recorded this node's new addresses"
                    ),
                    Err(error) => tracing::debug!(%error, "cannot record new addresses yet"),
                }
            }
            if unregistered_first && !shutdown.is_cancelled() {
                // The first member stopped between initializing Raft and registering
                // itself: register it now (refused harmlessly if it was, after all).
                match self.write(self.bootstrap_command()).await {
                    Ok(response) => tracing::info!(?response, "registered the first member"),
                    Err(error) => tracing::debug!(%error, "cannot register the first member yet"),
                }
            }
            if wanted && !moved && !shutdown.is_cancelled() {
                let command = MetadataCommand::SetNodeState {
                    node: self.inner.node_id,
                    state: NodeState::Up,
                };
                match self.write(command).await {
                    Ok(_) => tracing::info!(from = ?state, "marked self up"),
                    Err(error) => tracing::debug!(%error, "cannot mark self up yet"),
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = metadata.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(Duration::from_millis(FORWARD_RETRY_MS)), if wanted || moved || unregistered_first => {}
            }
        }
    }

    fn is_at_own_addresses(&self, record: &NodeRecord) -> bool {
        let config = &self.inner.config;
        record.cluster_addr == config.cluster_addr.to_string()
            && record.http_addr == config.http_addr.to_string()
            && record.quic_addr == config.quic_addr.to_string()
    }

    /// Asks the leader to record this node's current addresses (it restarted elsewhere).
    /// The leader cannot reach this node at its old address, so this node finds it: the
    /// leader it knows of, else every other member and the join seed, each asked once
    /// (a follower answers with the leader's address).
    async fn update_own_addresses(&self) -> Result<(), ClusterError> {
        let config = &self.inner.config;
        let request = encode(&PeerRequest::UpdateAddresses {
            node: self.inner.node_id,
            cluster_addr: config.cluster_addr.to_string(),
            http_addr: config.http_addr.to_string(),
            quic_addr: config.quic_addr.to_string(),
        })?;
        let metadata = self.metadata();
        let leader = self
            .inner
            .raft
            .leader()
            .filter(|id| *id != self.inner.node_id);
        let mut targets: std::collections::VecDeque<SocketAddr> = leader
            .into_iter()
            .chain(metadata.nodes.keys().copied())
            .filter(|id| *id != self.inner.node_id)
            .filter_map(|id| metadata.nodes.get(&id)?.cluster_addr.parse().ok())
            .chain(config.join)
            .collect();
        let mut last_error = ClusterError::NoLeader(0);
        let mut hops = 0;
        while let Some(target) = targets.pop_front() {
            let reply = match self.inner.endpoint.call(target, request.clone()).await {
                Ok(reply) => decode::<PeerReply>(&reply)?,
                Err(error) => {
                    last_error = error.into();
                    continue;
                }
            };
            match reply {
                PeerReply::Activated => return Ok(()),
                PeerReply::NotLeader(Some(leader)) if hops < FORWARD_HOPS_MAX => {
                    hops += 1;
                    if let Ok(leader) = leader.parse() {
                        targets.push_front(leader);
                    }
                }
                other => last_error = ClusterError::Refused(format!("{other:?}")),
            }
        }
        Err(last_error)
    }

    /// The failure detector: probes every member; the leader marks one `Down` after
    /// [`FAILURE_PROBES_MISSED_MAX`] failed probes in a row (counted by every member, so a
    /// new leader acts on what it saw as a follower).
    async fn detect_failures(self, shutdown: tokio_util::sync::CancellationToken) {
        let mut missed: std::collections::BTreeMap<NodeId, u32> = Default::default();
        let mut lonely_rounds = 0u32;
        let mut interval = tokio::time::interval(Duration::from_millis(FAILURE_PROBE_INTERVAL_MS));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = interval.tick() => {}
            }
            // Every member probes every other one, so that a member that becomes leader
            // (its predecessor died) already knows who stopped answering; only the leader
            // writes the verdict.
            let metadata = self.metadata();
            missed.retain(|id, _| {
                metadata
                    .nodes
                    .get(id)
                    .is_some_and(|n| n.state != NodeState::Down)
            });
            let probes = metadata
                .nodes
                .values()
                .filter(|n| n.id != self.inner.node_id && n.state != NodeState::Down)
                .map(|n| {
                    let endpoint = self.inner.endpoint.clone();
                    let id = n.id;
                    let addr = n.cluster_addr.clone();
                    async move {
                        let ok = match addr.parse::<SocketAddr>() {
                            Ok(peer) => {
                                let probe = async {
                                    let request = encode(&PeerRequest::Ping).ok()?;
                                    let reply = endpoint.call(peer, request).await.ok()?;
                                    matches!(decode::<PeerReply>(&reply), Ok(PeerReply::Pong))
                                        .then_some(())
                                };
                                tokio::time::timeout(
                                    Duration::from_millis(FAILURE_PROBE_TIMEOUT_MS),
                                    probe,
                                )
                                .await
                                .ok()
                                .flatten()
                                .is_some()
                            }
                            Err(_) => false,
                        };
                        (id, ok)
                    }
                });
            let results = futures_util::future::join_all(probes).await;
            self.note_reach(&results, &mut lonely_rounds).await;
            for (id, ok) in results {
                if ok {
                    missed.remove(&id);
                    continue;
                }
                let count = missed.entry(id).or_default();
                *count = count.saturating_add(1);
                if *count >= FAILURE_PROBES_MISSED_MAX
                    && self.inner.raft.leader() == Some(self.inner.node_id)
                {
                    tracing::warn!(node = id, "member stopped answering: marking it down");
                    let command = MetadataCommand::SetNodeState {
                        node: id,
                        state: NodeState::Down,
                    };
                    if let Err(error) = self.inner.raft.write(command).await {
                        tracing::warn!(node = id, %error, "cannot mark member down");
                    }
                    missed.remove(&id);
                }
            }
        }
    }

    /// Counts this round's reach: the voters answering, this member included. After
    /// [`CUT_OFF_ROUNDS`] rounds without a majority this member is cut off; once it
    /// reaches a majority again it catches up with the leader's log first, and only then
    /// is it no longer cut off.
    async fn note_reach(&self, results: &[(NodeId, bool)], lonely_rounds: &mut u32) {
        let voters = self.inner.raft.voter_ids();
        // With two voters neither side of a cut has a majority, nor does a survivor whose
        // peer died: both go on serving the rooms they own (Raft commits nothing until
        // both are back, so no room moves); only a minority among three or more is cut off.
        if voters.len() < 3 {
            *lonely_rounds = 0;
            self.inner
                .cut_off
                .send_if_modified(|cut| std::mem::replace(cut, false));
            return;
        }
        let reached = voters
            .iter()
            .filter(|id| {
                **id == self.inner.node_id || results.iter().any(|(peer, ok)| peer == *id && *ok)
            })
            .count();
        let majority = reached * 2 > voters.len();
        let cut_off = *self.inner.cut_off.borrow();
        if !majority {
            *lonely_rounds = lonely_rounds.saturating_add(1);
            if *lonely_rounds >= CUT_OFF_ROUNDS && !cut_off {
                tracing::warn!(
                    reached,
                    voters = voters.len(),
                    "cut off: this node reaches no majority of the Raft voters"
                );
                self.inner.cut_off.send_replace(true);
            }
            return;
        }
        *lonely_rounds = 0;
        if !cut_off {
            return;
        }
        match tokio::time::timeout(CATCH_UP_TIMEOUT, self.catch_up()).await {
            Ok(Ok(index)) => {
                tracing::info!(
                    index,
                    "reaches a majority again and caught up: no longer cut off"
                );
                self.inner.cut_off.send_replace(false);
            }
            Ok(Err(error)) => tracing::info!(%error, "reaches a majority again; catching up"),
            Err(_) => tracing::info!("reaches a majority again; still catching up"),
        }
    }

    /// Waits until this member has applied everything the leader had committed when asked
    /// (a ReadIndex through the leader); returns that index.
    pub async fn catch_up(&self) -> Result<u64, ClusterError> {
        let raft = &self.inner.raft;
        let index = if raft.leader() == Some(self.inner.node_id) {
            raft.linearizable_read().await?;
            raft.metrics().applied_index.unwrap_or(0)
        } else {
            let leader = raft
                .leader()
                .and_then(|id| self.cluster_addr(id).ok())
                .unwrap_or(self.inner.config.cluster_addr);
            match forward(&self.inner.endpoint, leader, PeerRequest::ReadIndex).await? {
                PeerReply::ReadIndex(index) => index,
                other => return Err(ClusterError::Refused(format!("{other:?}"))),
            }
        };
        while raft.metrics().applied_index.unwrap_or(0) < index {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(index)
    }

    /// Whether this member is cut off from the cluster: for [`CUT_OFF_ROUNDS`] probe
    /// rounds it reached no majority of the Raft voters, and it has not caught up since.
    /// A cut-off node is not ready, answers requests for rooms owned elsewhere at once
    /// with `unavailable`, and sends its clients to other nodes.
    pub fn is_cut_off(&self) -> bool {
        *self.inner.cut_off.borrow()
    }

    /// Watches [`is_cut_off`](Self::is_cut_off).
    pub fn subscribe_cut_off(&self) -> tokio::sync::watch::Receiver<bool> {
        self.inner.cut_off.subscribe()
    }

    async fn bootstrap(&self) -> Result<(), ClusterError> {
        let config = &self.inner.config;
        let raft = &self.inner.raft;
        if !raft.is_initialized().await? {
            raft.initialize(RaftNode::new(config.cluster_addr.to_string()))
                .await?;
        }
        match self.write(self.bootstrap_command()).await? {
            MetadataResponse::Ok => Ok(()),
            // Written before (this node stopped after its record was committed).
            _ if self.metadata().nodes.contains_key(&self.inner.node_id) => Ok(()),
            other => Err(ClusterError::Refused(format!(
                "cannot register the first member: {other:?}"
            ))),
        }
    }

    fn bootstrap_command(&self) -> MetadataCommand {
        let config = &self.inner.config;
        MetadataCommand::Bootstrap {
            node: NodeRecord {
                id: self.inner.node_id,
                name: config.name.clone(),
                cluster_addr: config.cluster_addr.to_string(),
                http_addr: config.http_addr.to_string(),
                quic_addr: config.quic_addr.to_string(),
                state: NodeState::Up,
                join_token: 0,
            },
        }
    }

    async fn handle_peer(&self, request: PeerRequest) -> PeerReply {
        let raft = &self.inner.raft;
        let changes_membership = matches!(
            request,
            PeerRequest::Activate { .. }
                | PeerRequest::Remove { .. }
                | PeerRequest::UpdateAddresses { .. }
        );
        let _membership = if changes_membership && raft.leader() == Some(self.inner.node_id) {
            Some(self.inner.membership.lock().await)
        } else {
            None
        };
        let result: Result<PeerReply, RaftError> = async {
            match request {
                PeerRequest::Remove { node } => {
                    let metrics = raft.metrics();
                    if node == self.inner.node_id {
                        // A leader never removes itself: once its own removal commits it
                        // cannot propose the follow-up changes (promoting a learner, the
                        // metadata write), and openraft refuses membership changes from a
                        // leader that is no longer a voter. Hand over, and the caller asks
                        // the new leader.
                        let metadata = raft.metadata();
                        let up = |id: &NodeId| {
                            metadata
                                .nodes
                                .get(id)
                                .is_some_and(|n| n.state == NodeState::Up)
                        };
                        let Some(successor) = metrics
                            .voters
                            .iter()
                            .copied()
                            .find(|id| *id != node && up(id))
                        else {
                            return Ok(PeerReply::Error(format!(
                                "member {node} is the only voter that is up; add or restore \
                                 another member before removing it"
                            )));
                        };
                        raft.transfer_leadership(successor).await?;
                        return Ok(PeerReply::Retry(format!(
                            "member {node} leads the cluster; leadership is moving to \
                             member {successor} before the removal"
                        )));
                    }
                    if metrics.voters.contains(&node) || metrics.learners.contains(&node) {
                        raft.remove_member(node).await?;
                    }
                    let metrics = raft.metrics();
                    let metadata = raft.metadata();
                    if metrics.voters.len() < self.inner.config.voters_max {
                        // Promote an up learner to keep the group at its size.
                        let learner = metrics.learners.iter().copied().find(|id| {
                            metadata
                                .nodes
                                .get(id)
                                .is_some_and(|n| n.state == NodeState::Up)
                        });
                        if let Some(learner) = learner {
                            raft.add_voter(learner).await?;
                        }
                    }
                    Ok(
                        match raft.write(MetadataCommand::RemoveNode { node }).await? {
                            response @ MetadataResponse::Refused(_) => PeerReply::Written(response),
                            _ => PeerReply::Activated,
                        },
                    )
                }
                PeerRequest::UpdateAddresses {
                    node,
                    cluster_addr,
                    http_addr,
                    quic_addr,
                } => {
                    let response = raft
                        .write(MetadataCommand::SetAddresses {
                            node,
                            cluster_addr: cluster_addr.clone(),
                            http_addr,
                            quic_addr,
                        })
                        .await?;
                    if let MetadataResponse::Refused(_) = response {
                        return Ok(PeerReply::Written(response));
                    }
                    let metrics = raft.metrics();
                    if metrics.voters.contains(&node) || metrics.learners.contains(&node) {
                        raft.set_member_address(node, RaftNode::new(cluster_addr))
                            .await?;
                    }
                    Ok(PeerReply::Activated)
                }
                PeerRequest::Raft { .. } | PeerRequest::App { .. } | PeerRequest::Ping => {
                    Ok(PeerReply::Error("handled elsewhere".into()))
                }
                PeerRequest::ReadIndex => {
                    raft.linearizable_read().await?;
                    Ok(PeerReply::ReadIndex(
                        raft.metrics().applied_index.unwrap_or(0),
                    ))
                }
                PeerRequest::Write(command) => raft.write(command).await.map(PeerReply::Written),
                PeerRequest::Register {
                    name,
                    cluster_addr,
                    http_addr,
                    quic_addr,
                    join_token,
                } => {
                    let response = raft
                        .write(MetadataCommand::AddNode {
                            name,
                            cluster_addr,
                            http_addr,
                            quic_addr,
                            join_token,
                        })
                        .await?;
                    Ok(match response {
                        MetadataResponse::NodeAdded(id) => PeerReply::Registered(id),
                        other => PeerReply::Error(format!("{other:?}")),
                    })
                }
                PeerRequest::Activate { node, cluster_addr } => {
                    if !raft.metadata().nodes.contains_key(&node) {
                        return Ok(PeerReply::Error(format!(
                            "node {node} is not registered (it was removed?)"
                        )));
                    }
                    raft.add_learner(node, RaftNode::new(cluster_addr)).await?;
                    let voters = raft.voter_ids();
                    if voters.len() < self.inner.config.voters_max && !voters.contains(&node) {
                        raft.add_voter(node).await?;
                    }
                    raft.write(MetadataCommand::SetNodeState {
                        node,
                        state: NodeState::Up,
                    })
                    .await?;
                    Ok(PeerReply::Activated)
                }
            }
        }
        .await;
        match result {
            Ok(reply) => reply,
            // Unknown leader: a node still joining knows its seed.
            Err(RaftError::ForwardToLeader { leader_addr, .. }) => PeerReply::NotLeader(
                leader_addr.or_else(|| self.inner.config.join.map(|seed| seed.to_string())),
            ),
            // Another change in flight (e.g. a new leader finishing its predecessor's),
            // an election, a slow learner: the joiner asks again.
            Err(error) if changes_membership => PeerReply::Retry(error.to_string()),
            Err(error) => PeerReply::Error(error.to_string()),
        }
    }

    /// Applies a metadata command through the leader (forwarding if this node is not it).
    pub async fn write(&self, command: MetadataCommand) -> Result<MetadataResponse, ClusterError> {
        match self.inner.raft.write(command.clone()).await {
            Ok(response) => Ok(response),
            Err(RaftError::ForwardToLeader { leader_addr, .. }) => {
                let start = leader_addr
                    .and_then(|a| a.parse().ok())
                    .unwrap_or(self.inner.config.cluster_addr);
                match forward(&self.inner.endpoint, start, PeerRequest::Write(command)).await? {
                    PeerReply::Written(response) => Ok(response),
                    other => Err(ClusterError::Refused(format!("{other:?}"))),
                }
            }
            Err(error) => Err(error.into()),
        }
    }

    /// Installs the handler for application messages (once; later calls are ignored).
    pub fn set_app_handler(&self, handler: Arc<dyn AppHandler>) {
        let _ = self.inner.app.set(handler);
    }

    /// Installs the taker of actor-mesh streams (once; later calls are ignored).
    pub fn set_actor_stream_acceptor(&self, accept: ActorStreamAcceptor) {
        let _ = self.inner.actor_streams.set(accept);
    }

    /// The inter-node endpoint.
    pub fn endpoint(&self) -> &ClusterEndpoint {
        &self.inner.endpoint
    }

    /// Sends an application message to member `node` and returns its reply.
    pub async fn call_app(&self, node: NodeId, request: Bytes) -> Result<Bytes, ClusterError> {
        let addr = self.cluster_addr(node)?;
        let reply = self
            .inner
            .endpoint
            .call(
                addr,
                encode(&PeerRequest::App {
                    target: node,
                    request: request.to_vec(),
                })?,
            )
            .await?;
        match decode::<PeerReply>(&reply)? {
            PeerReply::App(bytes) => Ok(Bytes::from(bytes)),
            other => Err(ClusterError::Refused(format!("{other:?}"))),
        }
    }

    /// Sends a datagram to member `node` without waiting (voice; see
    /// [`ClusterEndpoint::try_send_datagram`]).
    ///
    /// # Errors
    ///
    /// The node is unknown, not connected yet, or the datagram cannot be sent.
    pub fn send_app_datagram(&self, node: NodeId, datagram: Bytes) -> Result<(), ClusterError> {
        let addr = self.cluster_addr(node)?;
        Ok(self.inner.endpoint.try_send_datagram(addr, datagram)?)
    }

    /// Opens a connection to member `node` in the background unless one is open, so that
    /// datagrams to it (voice) are not lost while it opens.
    pub fn ensure_connected(&self, node: NodeId) {
        if let Ok(addr) = self.cluster_addr(node) {
            self.inner.endpoint.ensure_connected(addr);
        }
    }

    fn cluster_addr(&self, node: NodeId) -> Result<SocketAddr, ClusterError> {
        let addr = self
            .metadata()
            .nodes
            .get(&node)
            .map(|n| n.cluster_addr.clone())
            .ok_or_else(|| ClusterError::Refused(format!("no node {node}")))?;
        addr.parse()
            .map_err(|e| ClusterError::Codec(format!("bad address {addr:?}: {e}")))
    }

    /// Removes member `node` from the Raft group and the metadata (through the leader).
    /// Its id is never reused; drain it first so its rooms have moved.
    ///
    /// Retries (for up to [`REMOVE_TIMEOUT`]) while the leader is busy with another
    /// membership change, an election runs, or the member to remove is the leader and is
    /// handing over first.
    pub async fn remove_node(&self, node: NodeId) -> Result<(), ClusterError> {
        let deadline = tokio::time::Instant::now() + REMOVE_TIMEOUT;
        let mut backoff_ms = JOIN_BACKOFF_MIN_MS;
        loop {
            let leader = self
                .inner
                .raft
                .leader()
                .and_then(|id| {
                    self.metadata()
                        .nodes
                        .get(&id)
                        .map(|n| n.cluster_addr.clone())
                })
                .and_then(|addr| addr.parse().ok())
                .unwrap_or(self.inner.config.cluster_addr);
            let why =
                match forward(&self.inner.endpoint, leader, PeerRequest::Remove { node }).await? {
                    PeerReply::Activated => return Ok(()),
                    PeerReply::Retry(why) => why,
                    PeerReply::Error(why) => return Err(ClusterError::Refused(why)),
                    other => return Err(ClusterError::Refused(format!("{other:?}"))),
                };
            if tokio::time::Instant::now() >= deadline {
                return Err(ClusterError::Refused(format!(
                    "removing member {node} did not complete within {} s (last: {why})",
                    REMOVE_TIMEOUT.as_secs()
                )));
            }
            tracing::debug!(node, %why, backoff_ms, "removal not done yet; retrying");
            let jitter = jitter_ms(backoff_ms / 2);
            tokio::time::sleep(Duration::from_millis(backoff_ms / 2 + jitter)).await;
            backoff_ms = (backoff_ms * 2).min(JOIN_BACKOFF_MAX_MS);
        }
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.inner.node_id
    }

    /// The latest applied metadata on this node (may lag the leader slightly).
    pub fn metadata(&self) -> Arc<ClusterMetadata> {
        self.inner.raft.metadata()
    }

    /// Watches the applied metadata.
    pub fn subscribe_metadata(&self) -> tokio::sync::watch::Receiver<Arc<ClusterMetadata>> {
        self.inner.raft.subscribe()
    }

    /// The placement ring of the latest applied metadata.
    pub fn ring(&self) -> Option<Ring> {
        Ring::from_metadata(&self.metadata()).ok()
    }

    /// Resolves if this member's Raft core stops on its own (not through
    /// [`shutdown`](Self::shutdown)), with why; see [`MetadataRaft::failed`].
    pub async fn raft_failed(&self) -> String {
        self.inner.raft.failed().await
    }

    /// Raft metrics.
    pub fn raft_metrics(&self) -> RaftMetrics {
        self.inner.raft.metrics()
    }

    /// This node's view, for admin.
    pub fn status(&self) -> ClusterStatus {
        let metadata = self.metadata();
        let metrics = self.inner.raft.metrics();
        ClusterStatus {
            self_id: self.inner.node_id,
            leader: metrics.leader,
            term: metrics.term,
            ring_epoch: metadata.ring_epoch,
            applied_index: metrics.applied_index,
            voters: metrics.voters.iter().copied().collect(),
            learners: metrics.learners.iter().copied().collect(),
            members: metadata.nodes.values().cloned().collect(),
        }
    }

    /// The Raft RPC handler (for tests that route RPCs themselves).
    pub fn raft_rpc(&self) -> &RaftRpcHandler {
        &self.inner.raft_rpc
    }

    /// Drains this node before it stops: marks it `Draining` (it leaves the ring, its rooms
    /// move to the others) and waits, at most `timeout`, until its applied ring excludes it.
    /// A lone node has nowhere to move rooms to and returns `false` at once; `true` means
    /// the ring no longer includes this node.
    pub async fn drain_self(&self, timeout: Duration) -> Result<bool, ClusterError> {
        let self_id = self.inner.node_id;
        let others_up = self
            .metadata()
            .nodes
            .values()
            .any(|n| n.id != self_id && n.state == NodeState::Up);
        if !others_up {
            return Ok(false);
        }
        let drain = async {
            self.write(MetadataCommand::SetNodeState {
                node: self_id,
                state: NodeState::Draining,
            })
            .await?;
            let mut metadata = self.subscribe_metadata();
            while metadata.borrow().up_nodes().contains(&self_id) {
                if metadata.changed().await.is_err() {
                    break;
                }
            }
            Ok::<_, ClusterError>(true)
        };
        tokio::time::timeout(timeout, drain)
            .await
            .map_err(|_| ClusterError::Timeout("drain"))?
    }

    /// Stops the Raft member and the endpoint.
    pub async fn shutdown(&self) {
        if let Err(error) = self.inner.raft.shutdown().await {
            tracing::warn!(%error, "raft shutdown");
        }
        self.inner.endpoint.close();
    }
}

/// This node's join token: random, kept in `identity` (flushed) before it is first sent,
/// so a join retried after a lost answer or a restart gets the same id.
async fn join_token(identity: &sled::Tree) -> Result<u64, ClusterError> {
    if let Some(token) = stored_u64(identity, "join_token")? {
        return Ok(token);
    }
    let token = random_u64()
        .ok_or_else(|| ClusterError::Codec("no randomness for the join token".into()))?
        .max(1);
    identity.insert("join_token", &token.to_be_bytes())?;
    identity.flush_async().await?;
    Ok(token)
}

/// One join step (`Register`, `Activate`) sent through `seed` until the leader answers
/// it, or `deadline` passes: redirects are followed (a node still joining points at its
/// own seed), and everything transient (unreachable, no leader yet, another membership
/// change in progress, the node starting) is retried with a growing, jittered pause. A
/// refusal (`Error`) is retried too, since it may come from a node that is not ready; if
/// it persists, the deadline ends the join with it as the reason.
async fn join_step(
    endpoint: &ClusterEndpoint,
    seed: SocketAddr,
    request: &PeerRequest,
    deadline: tokio::time::Instant,
    config: &ClusterConfig,
) -> Result<PeerReply, ClusterError> {
    let bytes = encode(request)?;
    let mut target = seed;
    let mut backoff_ms = JOIN_BACKOFF_MIN_MS;
    let mut hops = 0u32;
    let mut last = String::from("no answer yet");
    loop {
        let call = tokio::time::timeout_at(deadline, endpoint.call(target, bytes.clone()));
        let pause = match call.await {
            Err(_) => true,
            // Not transient: the nodes do not share a CA. Say so now rather than after
            // the join timeout.
            Ok(Err(error @ LinkError::Certificate { .. })) => return Err(error.into()),
            Ok(Err(error)) => {
                last = format!("{target}: {error}");
                target = seed;
                true
            }
            Ok(Ok(reply)) => match decode::<PeerReply>(&reply)? {
                PeerReply::NotLeader(Some(addr)) => {
                    last = format!("{target}: not the leader, ask {addr}");
                    match addr.parse::<SocketAddr>() {
                        // Follow a few redirects at once; a longer chain (nodes pointing
                        // at each other while no leader is known) waits between hops.
                        Ok(next) if next != target && hops < FORWARD_HOPS_MAX => {
                            hops += 1;
                            target = next;
                            false
                        }
                        Ok(next) => {
                            target = next;
                            true
                        }
                        Err(_) => {
                            target = seed;
                            true
                        }
                    }
                }
                PeerReply::NotLeader(None) => {
                    last = format!("{target}: no leader known");
                    true
                }
                PeerReply::Retry(why) => {
                    last = format!("{target}: {why}");
                    true
                }
                PeerReply::Error(why) => {
                    last = format!("{target}: {why}");
                    target = seed;
                    true
                }
                answer => return Ok(answer),
            },
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(ClusterError::JoinTimeout {
                seed,
                seconds: config.join_timeout.as_secs(),
                last,
            });
        }
        if pause {
            hops = 0;
            tracing::debug!(%last, backoff_ms, "join step not done yet; retrying");
            // Jitter (half to full), so nodes started together do not retry in step.
            let jitter = jitter_ms(backoff_ms / 2);
            let sleep = tokio::time::sleep(Duration::from_millis(backoff_ms / 2 + jitter));
            tokio::time::timeout_at(deadline, sleep).await.ok();
            backoff_ms = (backoff_ms * 2).min(JOIN_BACKOFF_MAX_MS);
        }
    }
}

/// A pseudo-random pause in `0..=max_ms` for backoff jitter.
fn jitter_ms(max_ms: u64) -> u64 {
    random_u64().map_or(max_ms / 2, |r| r % (max_ms + 1))
}

/// A random u64 from the system's generator (`None` if it fails).
fn random_u64() -> Option<u64> {
    let mut bytes = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).ok()?;
    Some(u64::from_be_bytes(bytes))
}

/// A u64 kept big-endian under `key` in `tree` (`None` if absent or not 8 bytes).
fn stored_u64(tree: &sled::Tree, key: &str) -> Result<Option<u64>, ClusterError> {
    Ok(tree
        .get(key)?
        .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
        .map(u64::from_be_bytes))
}

/// Sends `request` to `first`, following `NotLeader` redirects and retrying while no
/// leader is known, at most [`FORWARD_ATTEMPTS_MAX`] times.
async fn forward(
    endpoint: &ClusterEndpoint,
    first: SocketAddr,
    request: PeerRequest,
) -> Result<PeerReply, ClusterError> {
    let bytes = encode(&request)?;
    let mut target = first;
    for _ in 0..FORWARD_ATTEMPTS_MAX {
        let reply = match endpoint.call(target, bytes.clone()).await {
            Ok(reply) => decode::<PeerReply>(&reply)?,
            // Not transient, and the reason rather than "no leader reachable".
            Err(error @ LinkError::Certificate { .. }) => return Err(error.into()),
            Err(error) => {
                tracing::debug!(%target, %error, "forward failed; retrying");
                tokio::time::sleep(Duration::from_millis(FORWARD_RETRY_MS)).await;
                target = first;
                continue;
            }
        };
        match reply {
            PeerReply::NotLeader(Some(addr)) => match addr.parse() {
                Ok(addr) if addr != target => target = addr,
                _ => tokio::time::sleep(Duration::from_millis(FORWARD_RETRY_MS)).await,
            },
            PeerReply::NotLeader(None) => {
                tokio::time::sleep(Duration::from_millis(FORWARD_RETRY_MS)).await
            }
            other => return Ok(other),
        }
    }
    Err(ClusterError::NoLeader(FORWARD_ATTEMPTS_MAX))
}

#[cfg(test)]
mod tests_support {
    use super::*;
    use crate::link::LinkConfig;
    use crate::tls::{ensure_node_identity, CertificateAuthority};

    pub(super) async fn member(
        dir: &std::path::Path,
        name: &str,
        join: Option<SocketAddr>,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> ClusterService {
        let ca = dir.join("ca");
        CertificateAuthority::load_or_create(&ca, "test CA").expect("ca");
        let data = dir.join(name);
        let identity =
            ensure_node_identity(&ca, &data, name, &["127.0.0.1".to_string()]).expect("identity");
        let endpoint = ClusterEndpoint::bind(
            "127.0.0.1:0".parse().expect("addr"),
            &identity,
            LinkConfig::default(),
        )
        .expect("bind");
        let cluster_addr = endpoint.local_addr().expect("addr");
        let db = sled::open(data.join("db")).expect("sled");
        let config = ClusterConfig {
            name: name.into(),
            cluster_addr,
            http_addr: "127.0.0.1:1".parse().expect("addr"),
            quic_addr: "127.0.0.1:2".parse().expect("addr"),
            join,
            voters_max: 3,
            join_timeout: JOIN_TIMEOUT_DEFAULT,
            raft: RaftConfig::default(),
        };
        ClusterService::start(config, &db, endpoint, shutdown.child_token())
            .await
            .expect("start member")
    }

    /// Three members over real QUIC: `a` starts the cluster, `b` and `c` join through it.
    pub(super) async fn three_members(
        dir: &std::path::Path,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> [ClusterService; 3] {
        let a = member(dir, "a", None, shutdown).await;
        let seed = a.inner.config.cluster_addr;
        let b = member(dir, "b", Some(seed), shutdown).await;
        let c = member(dir, "c", Some(seed), shutdown).await;
        [a, b, c]
    }

    /// Waits (at most 20 s) until every member sees all of them up, the same ring epoch,
    /// the same leader and three voters.
    pub(super) async fn converged(members: &[&ClusterService]) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let statuses: Vec<ClusterStatus> = members.iter().map(|m| m.status()).collect();
            let agreed = statuses.iter().all(|s| {
                s.members.len() == members.len()
                    && s.members.iter().all(|m| m.state == NodeState::Up)
                    && s.ring_epoch == statuses[0].ring_epoch
                    && s.leader.is_some()
                    && s.leader == statuses[0].leader
                    && s.voters.len() == members.len().min(3)
            });
            if agreed {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "members did not converge: {statuses:#?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::three_members;
    use super::*;

    #[tokio::test]
    async fn three_members_join_over_quic_and_agree_on_the_ring() {
        let dir = tempfile::tempdir().expect("tempdir");
        let shutdown = tokio_util::sync::CancellationToken::new();
        let [a, b, c] = three_members(dir.path(), &shutdown).await;
        let ids = [a.node_id(), b.node_id(), c.node_id()];
        assert_eq!(
            ids.iter().collect::<std::collections::BTreeSet<_>>().len(),
            3,
            "distinct ids {ids:?}"
        );

        super::tests_support::converged(&[&a, &b, &c]).await;
        // A write through a follower is forwarded to the leader.
        let follower = [&a, &b, &c]
            .into_iter()
            .find(|m| m.status().leader != Some(m.node_id()))
            .expect("a follower");
        let response = follower
            .write(MetadataCommand::PutDefinition {
                key: "room/r-1".into(),
                value: b"def".to_vec(),
            })
            .await
            .expect("forwarded write");
        assert_eq!(response, MetadataResponse::Ok);
        shutdown.cancel();
        for m in [&a, &b, &c] {
            m.shutdown().await;
        }
    }
}

#[cfg(test)]
mod throughput {
    use super::tests_support::three_members;
    use super::*;

    /// Metadata writes per second through a 3-member group over real QUIC and sled.
    /// Run: `cargo test -p chorus-cluster --release service::throughput -- --ignored --nocapture`
    /// (`CHORUS_WRITERS`, default 16, and `CHORUS_WRITES_PER_WRITER`, default 250).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "a measurement, not a check"]
    async fn report_metadata_write_throughput() {
        let dir = tempfile::tempdir().expect("tempdir");
        let shutdown = tokio_util::sync::CancellationToken::new();
        let [a, b, c] = three_members(dir.path(), &shutdown).await;
        super::tests_support::converged(&[&a, &b, &c]).await;
        let leader = [&a, &b, &c]
            .into_iter()
            .find(|m| m.status().leader == Some(m.node_id()))
            .expect("a leader");
        let follower = [&a, &b, &c]
            .into_iter()
            .find(|m| m.status().leader != Some(m.node_id()))
            .expect("a follower");
        let env = |name: &str, default: usize| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        let writers = env("CHORUS_WRITERS", 16);
        let writes_per_writer = env("CHORUS_WRITES_PER_WRITER", 250);
        for (label, via) in [("leader", leader), ("follower (forwarded)", follower)] {
            let started = std::time::Instant::now();
            let mut tasks = Vec::new();
            for w in 0..writers {
                let service = via.clone();
                let label = label.to_string();
                tasks.push(tokio::spawn(async move {
                    for i in 0..writes_per_writer {
                        service
                            .write(MetadataCommand::PutDefinition {
                                key: format!("room/{label}-{w}-{i}"),
                                value: vec![0u8; 200],
                            })
                            .await
                            .expect("write");
                    }
                }));
            }
            for task in tasks {
                task.await.expect("writer");
            }
            let writes = writers * writes_per_writer;
            let secs = started.elapsed().as_secs_f64();
            eprintln!(
                "{writes} metadata writes via the {label}, {writers} concurrent writers: {:.0} writes/s",
                writes as f64 / secs
            );
        }
        shutdown.cancel();
        for m in [&a, &b, &c] {
            m.shutdown().await;
        }
    }
}
