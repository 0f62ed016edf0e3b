//! The node server: HTTP (WebSocket `/ws`, `/ws/echo`, `/healthz`, `/readyz`, `/metrics`) and QUIC
//! edges, the session registry and the room directory, and orderly shutdown.
//!
//! Shutdown order: drain (hand the rooms to other members), stop accepting and close client
//! connections (`unavailable`, they resume elsewhere), stop room actors, stop Raft, flush
//! sled, close the QUIC endpoints; each step bounded, and all of them together by the drain
//! deadline, after which (or at a second signal) only sled is flushed
//! ([`RunningNode::shutdown`]).

pub mod admin;
pub mod analytics;
pub mod budget;
pub mod bullets;
pub mod connection;
pub mod control;
pub mod event_log;
pub mod group_commit;
pub mod keyed;
pub mod quic;
pub mod quiz;
pub mod rain;
pub mod reactions;
pub mod readiness;
pub mod routing;
pub mod session;
pub mod users;
pub mod voice;
pub mod ws;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chorus_actors::room_actor::{unix_now_ms, RoomDirectory};
use chorus_actors::session::SessionConfig;
use chorus_protocol::{ErrorCode, FrameLimits, ALPN, WS_SUBPROTOCOL};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, UPGRADE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::NodeConfig;
use crate::token::TokenKeys;
use session::SessionRegistry;

/// How often detached sessions are checked for expiry.
const SESSION_SWEEP_INTERVAL_MS: u64 = 1_000;
/// How often per-user creation bounds forget users with nothing left to bound.
const USER_BOUNDS_PRUNE_INTERVAL_MS: u64 = 30_000;
/// Bound on each shutdown step (the drain deadline bounds them all together).
const SHUTDOWN_STEP_TIMEOUT_MS: u64 = 5_000;
/// Bound on the sled flush when the ordered stop is abandoned (deadline passed, second
/// signal): long enough for a healthy disk, short enough to stop "at once".
pub const STOP_NOW_FLUSH_TIMEOUT_MS: u64 = 2_000;
/// Message size accepted on `/ws/echo` (the Autobahn cases send up to 16 MiB).
const ECHO_MESSAGE_BYTES_MAX: usize = 64 * 1024 * 1024;

/// What to do about a failed bind, when the cause says.
fn bind_hint(error: &std::io::Error) -> &'static str {
    match error.kind() {
        std::io::ErrorKind::AddrInUse => {
            ": another process (another node?) uses it; give this node its own address \
             (each of --http-addr, --quic-addr and --cluster-addr is set on its own)"
        }
        std::io::ErrorKind::AddrNotAvailable => ": no interface of this machine has that IP",
        std::io::ErrorKind::PermissionDenied => ": ports below 1024 need privileges",
        _ => "",
    }
}

/// Why the data dir's database cannot be opened, in words.
fn storage_reason(error: &sled::Error) -> String {
    // sled reports a held lock as an I/O error whose message carries the OS error.
    match error {
        sled::Error::Io(io)
            if io.kind() == std::io::ErrorKind::WouldBlock
                || io.to_string().contains("could not acquire lock") =>
        {
            "another chorus node is using this data dir (its lock is held): stop it, or give \
             this node its own --data-dir"
                .to_string()
        }
        other => other.to_string(),
    }
}

/// Errors starting a node.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Invalid configuration.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// Binding a socket failed (the cause follows in the error chain).
    #[error("cannot listen on {addr} (--{flag}){}", bind_hint(source))]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The flag (and config key) that sets it.
        flag: &'static str,
        /// The cause.
        source: std::io::Error,
    },
    /// Certificates could not be prepared.
    #[error(transparent)]
    Tls(#[from] chorus_cluster::tls::TlsError),
    /// The QUIC endpoint could not be configured.
    #[error("QUIC setup: {0}")]
    Quic(String),
    /// The data directory or its database could not be opened.
    #[error("storage at {path}: {reason}")]
    Storage {
        /// The directory.
        path: std::path::PathBuf,
        /// The cause.
        reason: String,
    },
    /// The node could not join or start its cluster membership.
    #[error("cluster: {0}")]
    Cluster(String),
    /// The metrics recorder could not be installed.
    #[error("metrics: {0}")]
    Metrics(String),
}

/// Shared node state.
pub struct Node {
    /// The configuration in force.
    pub config: NodeConfig,
    keys: TokenKeys,
    rooms: RoomDirectory,
    sessions: SessionRegistry,
    frame_limits: FrameLimits,
    metrics: PrometheusHandle,
    shutdown: CancellationToken,
    connections: AtomicUsize,
    /// Bytes held in partial inbound messages (see `budget`).
    inbound: Arc<budget::InboundBudget>,
    /// Per-user bounds kept on this node (sessions, creations).
    users: users::UserBounds,
    next_attachment: AtomicU64,
    db: sled::Db,
    cluster: chorus_cluster::service::ClusterService,
    mesh: chorus_cluster::mesh::ActorMesh,
    admin_token: String,
    mirrors: routing::RoomMirrors,
    durable: routing::DurableStates,
    /// Flushes this node's sled for changes acknowledged without a copy on another node.
    group_commit: group_commit::GroupCommit,
    /// Copies of red-packet rains (the pools' own included).
    rain_copies: rain::RainCopies,
    /// The rain pools this node runs.
    rain_pools: rain::RainPools,
    /// Reactions counted here, waiting for their batch to the owners.
    reactions: reactions::ReactionBatcher,
    /// Bullet comments checked here, waiting for their batch to the owners.
    bullets: bullets::BulletEdge,
    /// Rooms' event logs (set once at start).
    event_log: std::sync::OnceLock<Arc<event_log::NodeEventLog>>,
    /// Ownership epochs of the rooms this node activated.
    owned_epochs: std::sync::Mutex<std::collections::HashMap<String, u64>>,
    relays: std::sync::Mutex<std::collections::HashMap<u64, Arc<routing::EdgeRelay>>>,
    /// Quiz shows: decoded definitions, answer shards held here, answer queues.
    quiz: quiz::QuizService,
    this: std::sync::Weak<Node>,
}

/// The clock of a node's background loop: one tick per period (a late tick delays the
/// next, never bunches them), and the node for as long as it runs.
pub(crate) struct NodeTicker {
    node: std::sync::Weak<Node>,
    tick: tokio::time::Interval,
}

impl NodeTicker {
    /// Ticks every `period`, the first at once.
    pub(crate) fn new(node: std::sync::Weak<Node>, period: Duration) -> Self {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        NodeTicker { node, tick }
    }

    /// Waits for the next tick: the node, or `None` once it is gone or shutting down.
    pub(crate) async fn next(&mut self) -> Option<Arc<Node>> {
        self.tick.tick().await;
        self.node
            .upgrade()
            .filter(|node| !node.shutdown.is_cancelled())
    }
}

impl Node {
    fn next_attachment_id(&self) -> u64 {
        self.next_attachment.fetch_add(1, Ordering::Relaxed)
    }

    /// Reserves a connection slot, released when the slot is dropped; `None` if the node
    /// is full.
    fn try_open_connection(self: &Arc<Self>) -> Option<ConnectionSlot> {
        let max = self.config.limits.connections_max;
        self.connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| ConnectionSlot { node: self.clone() })
    }

    /// Whether `room_id` exists and has not ended (from the applied metadata).
    fn room_is_open(&self, room_id: &str) -> bool {
        let metadata = self.cluster.metadata();
        metadata
            .definitions
            .get(&admin::room_key(room_id))
            .and_then(|bytes| {
                rmp_serde::from_slice::<chorus_actors::room::RoomDefinition>(bytes).ok()
            })
            .is_some_and(|definition| definition.ended_at_ms.is_none())
    }

    /// A connection's budget for partial messages (see `budget`).
    fn read_budget(&self) -> Arc<budget::ReadBudget> {
        budget::ReadBudget::new(
            self.inbound.clone(),
            self.config.limits.preauth_message_bytes_max,
        )
    }

    /// The rooms' event logs.
    fn event_log(&self) -> Option<&Arc<event_log::NodeEventLog>> {
        self.event_log.get()
    }

    /// Ends session `session_id` here, if this node holds it, because its client resumed
    /// it on another node: its connection is closed with `resume_failed`. Whether it was
    /// held. (Asked over the actor mesh, or by RPC while the mesh has no session.)
    async fn end_session_resumed_elsewhere(&self, session_id: &str) -> bool {
        let Some(session) = self.sessions.get(session_id) else {
            return false;
        };
        session.close_connection(ErrorCode::ResumeFailed, "session resumed on another node");
        self.end_session(&session).await;
        true
    }

    /// Delivers `body` to every session here of one of `users`. O(sessions here).
    fn deliver_to_users(&self, users: &[String], body: &Arc<chorus_protocol::EncodedBody>) {
        use chorus_actors::room_actor::MemberSink as _;
        let users: std::collections::HashSet<&str> = users.iter().map(String::as_str).collect();
        for session in self.sessions.all() {
            if users.contains(session.user_id.as_str()) {
                session.deliver(body);
            }
        }
    }

    /// Ends a session now: it leaves its rooms and can no longer be resumed.
    async fn end_session(&self, session: &Arc<session::Session>) {
        self.sessions.remove(&session.id);
        self.leave_all_rooms(session).await;
        tracing::debug!(session = %session.id, "session ended by its client");
    }

    async fn leave_all_rooms(&self, session: &Arc<session::Session>) {
        let rooms: Vec<String> = session.with_core(|core| core.rooms().cloned().collect());
        for room_id in rooms {
            if let Err(error) = self
                .room_op(session, &room_id, routing::RoomOp::Leave)
                .await
            {
                tracing::debug!(room = %room_id, %error, "leave on session end failed");
            }
            session.with_core(|core| core.handle_room_left(&room_id));
        }
    }

    /// Current client connections.
    pub fn connection_count(&self) -> usize {
        self.connections.load(Ordering::Acquire)
    }
}

/// Room definitions in the cluster's Raft metadata (key `room/<id>`), so any node can
/// activate a room after its owner is gone.
struct RaftDefinitions {
    cluster: chorus_cluster::service::ClusterService,
}

impl chorus_actors::store::DefinitionStore for RaftDefinitions {
    fn get(
        &self,
        room_id: &str,
    ) -> Result<Option<chorus_actors::room::RoomDefinition>, chorus_actors::store::StoreError> {
        let metadata = self.cluster.metadata();
        match metadata.definitions.get(&admin::room_key(room_id)) {
            None => Ok(None),
            Some(bytes) => rmp_serde::from_slice(bytes).map(Some).map_err(|e| {
                chorus_actors::store::StoreError::Decode {
                    room_id: room_id.to_string(),
                    reason: e.to_string(),
                }
            }),
        }
    }

    fn put<'a>(
        &'a self,
        definition: &'a chorus_actors::room::RoomDefinition,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<Output = Result<(), chorus_actors::store::StoreError>>
                + Send
                + 'a,
        >,
    > {
        Box::pin(async move {
            let value = rmp_serde::to_vec_named(definition)
                .map_err(|e| chorus_actors::store::StoreError::Encode(e.to_string()))?;
            let command = chorus_cluster::metadata::MetadataCommand::PutDefinition {
                key: admin::room_key(&definition.room_id),
                value,
            };
            match self.cluster.write(command).await {
                Ok(chorus_cluster::metadata::MetadataResponse::Ok) => Ok(()),
                Ok(other) => Err(chorus_actors::store::StoreError::Replication(format!(
                    "{other:?}"
                ))),
                Err(error) => Err(chorus_actors::store::StoreError::Replication(
                    error.to_string(),
                )),
            }
        })
    }
}

/// One of the node's `connections_max` places, held from the moment a client connection is
/// accepted (TCP accept, QUIC handshake) until it closes; unfinished HTTP upgrades hold one
/// too.
pub(crate) struct ConnectionSlot {
    node: Arc<Node>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.node.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A started node; [`RunningNode::shutdown`] stops it in order.
pub struct RunningNode {
    node: Arc<Node>,
    tracker: TaskTracker,
    endpoint: quinn::Endpoint,
    control: ractor::ActorRef<control::ControlMsg>,
    /// The bound HTTP address.
    pub http_addr: SocketAddr,
    /// The bound admin HTTP address, if the node has one.
    pub admin_addr: Option<SocketAddr>,
    /// The bound QUIC address.
    pub quic_addr: SocketAddr,
    /// The bound inter-node address.
    pub cluster_addr: SocketAddr,
}

static METRICS: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();

fn metrics_handle() -> Result<PrometheusHandle, ServeError> {
    if let Some(handle) = METRICS.get() {
        return Ok(handle.clone());
    }
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full("chorus_fanout_seconds".into()),
            &[
                0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05,
                0.1, 0.25, 1.0,
            ],
        )
        .map_err(|e| ServeError::Metrics(e.to_string()))?
        .install_recorder()
        .map_err(|e| ServeError::Metrics(e.to_string()))?;
    describe_metrics();
    Ok(METRICS.get_or_init(|| handle).clone())
}

/// The metric reference (`docs/metrics.md`): every metric's HELP text comes from it, so
/// every exported metric has one (`tests/metrics.rs` checks the reference covers the code).
const METRICS_REFERENCE: &str = include_str!("../../../docs/metrics.md");

fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    for line in METRICS_REFERENCE.lines() {
        // `| name | type | labels | meaning |` (no cell holds a `|`).
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let ["", name, kind, _labels, meaning, ""] = cells[..] else {
            continue;
        };
        let Some(name) = name
            .strip_prefix('`')
            .and_then(|n| n.strip_suffix('`'))
            .filter(|n| n.starts_with("chorus_"))
        else {
            continue;
        };
        let help = meaning.replace('`', "");
        let name = name.to_string();
        match kind {
            "counter" => describe_counter!(name, help),
            "gauge" => describe_gauge!(name, help),
            "histogram" if name.ends_with("_seconds") => {
                describe_histogram!(name, Unit::Seconds, help)
            }
            "histogram" => describe_histogram!(name, help),
            _ => {}
        }
    }
    metrics::gauge!("chorus_connections", "transport" => "ws").set(0.0);
    metrics::gauge!("chorus_connections", "transport" => "quic").set(0.0);
    metrics::gauge!("chorus_sessions").set(0.0);
    metrics::gauge!("chorus_rooms_active").set(0.0);
    metrics::counter!("chorus_frames_in_total", "transport" => "ws").absolute(0);
    metrics::counter!("chorus_frames_out_total").absolute(0);
}

/// Starts a node: binds its sockets and spawns its tasks.
pub async fn start(config: NodeConfig) -> Result<RunningNode, ServeError> {
    config.validate()?;
    let metrics = metrics_handle()?;
    let (secret, is_dev_secret) = config.effective_secret();
    if is_dev_secret {
        tracing::warn!(
            "no secret configured: using the development secret; anyone can mint tokens"
        );
    }

    let data_dir = config.data_dir.clone();
    if data_dir.exists() && !data_dir.is_dir() {
        return Err(ServeError::Storage {
            path: data_dir.clone(),
            reason: "this is a file, not a directory: give --data-dir a directory (it is created if missing)".into(),
        });
    }
    std::fs::create_dir_all(&data_dir).map_err(|e| ServeError::Storage {
        path: data_dir.clone(),
        reason: e.to_string(),
    })?;
    let db = sled::open(data_dir.join("db")).map_err(|e| ServeError::Storage {
        path: data_dir.clone(),
        reason: storage_reason(&e),
    })?;

    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    for ip in [config.quic_addr.ip(), config.cluster_addr.ip()]
        .into_iter()
        .chain(config.advertise_ip)
    {
        if !ip.is_unspecified() {
            names.push(ip.to_string());
        }
    }
    names.extend(config.tls_names.iter().cloned());
    names.sort();
    names.dedup();
    let identity = chorus_cluster::tls::ensure_node_identity(
        &config.ca_dir(),
        &data_dir,
        &config.node_name,
        &names,
    )?;
    let tls = chorus_cluster::tls::server_config(&identity, ALPN)?;
    let quic_config = quic::server_config(tls).map_err(|e| ServeError::Quic(e.to_string()))?;
    // Reset secrets kept across restarts: a client or peer still sending on a connection
    // to this node's previous run gets a reset it accepts and reconnects at once.
    let reset_secret = |purpose| {
        chorus_cluster::link::stateless_reset_secret(&db, purpose).map_err(|e| {
            ServeError::Storage {
                path: data_dir.clone(),
                reason: e.to_string(),
            }
        })
    };
    let client_reset_secret = reset_secret("clients")?;
    let cluster_reset_secret = reset_secret("cluster")?;
    let endpoint = crate::client::udp_socket(config.quic_addr)
        .and_then(|socket| {
            quinn::Endpoint::new(
                chorus_cluster::link::endpoint_config(Some(client_reset_secret)),
                Some(quic_config),
                socket,
                Arc::new(quinn::TokioRuntime),
            )
        })
        .map_err(|source| ServeError::Bind {
            addr: config.quic_addr,
            flag: "quic-addr",
            source,
        })?;
    let quic_addr = endpoint.local_addr().map_err(|source| ServeError::Bind {
        addr: config.quic_addr,
        flag: "quic-addr",
        source,
    })?;
    let listener = TcpListener::bind(config.http_addr)
        .await
        .map_err(|source| ServeError::Bind {
            addr: config.http_addr,
            flag: "http-addr",
            source,
        })?;
    let http_addr = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: config.http_addr,
        flag: "http-addr",
        source,
    })?;
    let admin_listener = match config.admin_addr {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Bind {
                    addr,
                    flag: "admin-addr",
                    source,
                })?,
        ),
        None => None,
    };
    let admin_addr = match &admin_listener {
        Some(listener) => Some(listener.local_addr().map_err(|source| ServeError::Bind {
            addr: config.admin_addr.unwrap_or(config.http_addr),
            flag: "admin-addr",
            source,
        })?),
        None => None,
    };

    let (admin_token, is_dev_admin) = config.effective_admin_token();
    if is_dev_admin {
        tracing::warn!("no admin token configured: using the development admin token");
    }
    let shutdown = CancellationToken::new();
    let link = chorus_cluster::link::ClusterEndpoint::bind(
        config.cluster_addr,
        &identity,
        chorus_cluster::link::LinkConfig {
            stateless_reset_secret: Some(cluster_reset_secret),
            ..chorus_cluster::link::LinkConfig::default()
        },
    )
    .map_err(|e| match e {
        chorus_cluster::link::LinkError::Bind { addr, source } => ServeError::Bind {
            addr,
            flag: "cluster-addr",
            source,
        },
        other => ServeError::Cluster(other.to_string()),
    })?;
    let cluster_addr = link.local_addr().unwrap_or(config.cluster_addr);
    // While the node joins (which may wait on peers), /healthz answers and /readyz says
    // not yet; the node's own HTTP service takes the port over afterwards.
    let starting = CancellationToken::new();
    let starting_http = tokio::spawn(readiness::serve_while_starting(
        listener,
        config.node_name.clone(),
        starting.clone(),
    ));
    let starting_admin = admin_listener.map(|listener| {
        tokio::spawn(readiness::serve_while_starting(
            listener,
            config.node_name.clone(),
            starting.clone(),
        ))
    });
    let cluster = chorus_cluster::service::ClusterService::start(
        chorus_cluster::service::ClusterConfig {
            name: config.node_name.clone(),
            cluster_addr: config.advertised(cluster_addr),
            http_addr: config.advertised(http_addr),
            quic_addr: config.advertised(quic_addr),
            join: config.join,
            voters_max: config.voters_max,
            join_timeout: Duration::from_millis(config.join_timeout_ms),
            raft: chorus_cluster::raft::RaftConfig::default(),
        },
        &db,
        link,
        shutdown.child_token(),
    )
    .await
    .map_err(|e| ServeError::Cluster(e.to_string()))?;
    starting.cancel();
    let listener = starting_http
        .await
        .map_err(|e| ServeError::Cluster(format!("start-up HTTP task: {e}")))?;
    let admin_listener = match starting_admin {
        Some(task) => Some(
            task.await
                .map_err(|e| ServeError::Cluster(format!("start-up admin HTTP task: {e}")))?,
        ),
        None => None,
    };
    let mesh = chorus_cluster::mesh::ActorMesh::start(
        &cluster,
        identity.cluster_secret.clone(),
        shutdown.child_token(),
    )
    .await
    .map_err(|e| ServeError::Cluster(e.to_string()))?;

    let limits = &config.limits;
    let session_config = SessionConfig {
        resume_window_ms: limits.resume_window_ms,
        resume_buffer_frames_max: limits.resume_buffer_frames_max,
        rooms_max: limits.rooms_per_session_max,
    };
    let frame_limits = FrameLimits {
        frame_bytes_max: limits.frame_bytes_max,
        ..FrameLimits::default()
    };
    let node_id = cluster.node_id();
    let sessions_max = limits.sessions_max;
    let definitions: Arc<dyn chorus_actors::store::DefinitionStore> = Arc::new(RaftDefinitions {
        cluster: cluster.clone(),
    });
    let durable = routing::DurableStates::open(&db).map_err(|e| ServeError::Storage {
        path: data_dir.clone(),
        reason: e.to_string(),
    })?;
    let rain_copies = rain::RainCopies::open(&db).map_err(|e| ServeError::Storage {
        path: data_dir.clone(),
        reason: e.to_string(),
    })?;
    let quiz = quiz::QuizService::open(&db).map_err(|e| ServeError::Storage {
        path: data_dir.clone(),
        reason: e.to_string(),
    })?;
    let node = Arc::new_cyclic(|this| Node {
        keys: TokenKeys::new(secret.as_bytes()),
        rooms: RoomDirectory::new(
            definitions,
            Some(Arc::new(routing::NodeReplicator { node: this.clone() })),
            config.room.clone(),
        ),
        sessions: SessionRegistry::new(
            session_config,
            sessions_max,
            config.limits.sessions_per_user_max,
            node_id,
            session::SessionIds::new(secret.as_bytes()),
        ),
        frame_limits,
        metrics,
        shutdown,
        cluster,
        mesh,
        admin_token,
        mirrors: routing::RoomMirrors::default(),
        durable,
        group_commit: group_commit::GroupCommit::for_db(db.clone()),
        rain_copies,
        rain_pools: rain::RainPools::default(),
        event_log: std::sync::OnceLock::new(),
        reactions: reactions::ReactionBatcher::default(),
        bullets: bullets::BulletEdge::new(config.room.bullets.clone()),
        owned_epochs: std::sync::Mutex::new(std::collections::HashMap::new()),
        relays: std::sync::Mutex::new(std::collections::HashMap::new()),
        quiz,
        this: this.clone(),
        connections: AtomicUsize::new(0),
        inbound: Arc::new(budget::InboundBudget::new(
            config.limits.inbound_partial_bytes_max,
        )),
        users: users::UserBounds::new(&config.limits),
        next_attachment: AtomicU64::new(1),
        db,
        config,
    });
    let analytics: Arc<dyn chorus_actors::room_actor::AnalyticsSink> =
        Arc::new(analytics::FileAnalytics {
            dir: data_dir.join("analytics"),
        });
    node.rooms.set_analytics(analytics.clone());
    let log =
        event_log::NodeEventLog::open(&node.db, Arc::downgrade(&node), analytics).map_err(|e| {
            ServeError::Storage {
                path: data_dir.clone(),
                reason: e.to_string(),
            }
        })?;
    let log = Arc::new(log);
    let _ = node.event_log.set(log.clone());
    node.rooms.set_event_log(log);
    node.cluster.set_app_handler(Arc::new(routing::NodeApp {
        node: Arc::downgrade(&node),
    }));

    let (control, _) = ractor::Actor::spawn(None, control::NodeControl, Arc::downgrade(&node))
        .await
        .map_err(|e| ServeError::Cluster(format!("control actor: {e}")))?;

    let tracker = TaskTracker::new();
    tracker.spawn(accept_http(
        node.clone(),
        listener,
        HttpListener::Public,
        tracker.clone(),
    ));
    if let Some(listener) = admin_listener {
        tracker.spawn(accept_http(
            node.clone(),
            listener,
            HttpListener::Admin,
            tracker.clone(),
        ));
    }
    tracker.spawn(accept_quic(node.clone(), endpoint.clone(), tracker.clone()));
    tracker.spawn(sweep_sessions(node.clone()));
    tokio::spawn(routing::follow_ring(Arc::downgrade(&node)));
    tokio::spawn(routing::rejoin_after_cut(Arc::downgrade(&node)));
    tokio::spawn(routing::expire_rooms(Arc::downgrade(&node)));
    tokio::spawn(routing::release_idle_rooms(Arc::downgrade(&node)));
    tokio::spawn(reactions::send_batches(Arc::downgrade(&node)));
    tokio::spawn(rain::run_rains(Arc::downgrade(&node)));
    tokio::spawn(bullets::send_batches(Arc::downgrade(&node)));
    if let Some(repairs) = node.sessions.take_repairs() {
        tokio::spawn(routing::repair_gaps(Arc::downgrade(&node), repairs));
    }
    tracing::info!(%http_addr, ?admin_addr, %quic_addr, node = %node.config.node_name, "node serving");
    Ok(RunningNode {
        node,
        tracker,
        endpoint,
        control,
        http_addr,
        admin_addr,
        quic_addr,
        cluster_addr,
    })
}

impl RunningNode {
    /// Shared state (for tests and admin).
    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// Resolves if the node's Raft member stops working on its own (see
    /// `ClusterService::raft_failed`), with why: the node cannot follow the cluster any
    /// more and should stop, so that its supervisor restarts it from its data dir.
    pub async fn raft_failed(&self) -> String {
        self.node.cluster.raft_failed().await
    }

    /// Resolves when shutdown has been requested.
    pub async fn stopping(&self) {
        self.node.shutdown.cancelled().await
    }

    /// Stops the node: drains it and stops every part in order, all within `deadline`,
    /// unless `stop_now` resolves first (a second signal).
    ///
    /// Each step is also bounded on its own. When the deadline passes or `stop_now`
    /// resolves, what is left of the ordered stop is abandoned (a step may be waiting on
    /// Raft or on peers that will not answer: no quorum) and only what is quick and safe
    /// is done: sled is flushed (bounded by [`STOP_NOW_FLUSH_TIMEOUT_MS`]) and both QUIC
    /// endpoints are closed without waiting. The caller then exits; the runtime drops
    /// the abandoned tasks.
    pub async fn shutdown(
        self,
        deadline: Duration,
        stop_now: impl std::future::Future<Output = ()>,
    ) -> StopOutcome {
        let outcome = tokio::select! {
            drained = self.stop_in_order() => {
                if drained {
                    StopOutcome::Drained
                } else {
                    StopOutcome::DrainFailed
                }
            }
            () = tokio::time::sleep(deadline) => {
                tracing::warn!(
                    "drain deadline of {} passed; stopping anyway",
                    humantime::format_duration(deadline)
                );
                StopOutcome::DeadlinePassed
            }
            () = stop_now => {
                tracing::warn!("second signal: stopping now");
                StopOutcome::Interrupted
            }
        };
        if matches!(
            outcome,
            StopOutcome::DeadlinePassed | StopOutcome::Interrupted
        ) {
            self.stop_now().await;
        }
        if outcome.drain_completed() {
            tracing::info!("node stopped");
        } else {
            tracing::warn!(?outcome, "node stopped without a completed drain");
        }
        outcome
    }

    /// The ordered stop, each step bounded by [`SHUTDOWN_STEP_TIMEOUT_MS`]. Whether the
    /// drain completed: this node's rooms moved to other members, or there was no other
    /// member to move them to.
    async fn stop_in_order(&self) -> bool {
        let step = Duration::from_millis(SHUTDOWN_STEP_TIMEOUT_MS);
        tracing::info!("shutting down: draining (rooms move to other nodes)");
        let drained = match self.node.cluster.drain_self(step).await {
            // Our rooms stop as this node follows the ring; wait for that (bounded).
            Ok(true) => {
                let moved = tokio::time::timeout(step, async {
                    while self.node.rooms.running().await > 0 {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                })
                .await;
                if moved.is_err() {
                    tracing::warn!("some rooms did not move off this node in time");
                }
                moved.is_ok()
            }
            // No other member is up: nothing to hand off to, so nothing left to drain.
            Ok(false) => true,
            Err(error) => {
                tracing::warn!(%error, "drain did not complete; stopping anyway");
                false
            }
        };
        if drained {
            // Again, in case the copies changed since the drain began (bounded).
            match tokio::time::timeout(step, routing::hand_off_copies(&self.node)).await {
                Ok((taken, untaken)) => {
                    tracing::info!(taken, untaken, "handed off the room copies held here")
                }
                Err(_) => tracing::warn!("handing off the room copies did not finish in time"),
            }
            tracing::info!("drain completed");
        }
        tracing::info!("closing client connections");
        self.node.shutdown.cancel();
        self.tracker.close();
        if tokio::time::timeout(step, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("some connections did not close in time");
        }
        tracing::info!("stopping rooms");
        // The room directory's lock is held while a room activates, which claims the room
        // through Raft: without a quorum that waits, so this step has its own bound.
        if tokio::time::timeout(step, self.node.rooms.stop_all())
            .await
            .is_err()
        {
            tracing::warn!("rooms did not stop in time (an activation waits on Raft)");
        }
        self.control.stop(None);
        tracing::info!("stopping raft");
        if tokio::time::timeout(step, self.node.cluster.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("raft did not stop in time");
            self.node.cluster.endpoint().close();
        }
        self.flush_storage(step).await;
        self.endpoint
            .close(quinn::VarInt::from_u32(0), b"node shutting down");
        if tokio::time::timeout(step, self.endpoint.wait_idle())
            .await
            .is_err()
        {
            tracing::warn!("the QUIC endpoint did not go idle in time");
        }
        drained
    }

    /// Flushes sled, at most `timeout`; a failure is logged (the node stops either way).
    async fn flush_storage(&self, timeout: Duration) {
        tracing::info!("flushing storage");
        match tokio::time::timeout(timeout, self.node.db.flush_async()).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => tracing::error!(%error, "storage flush failed"),
            Err(_) => tracing::error!("storage flush did not finish in time"),
        }
    }

    /// What is safe and quick once the ordered stop is abandoned: stop the node's loops,
    /// flush sled (bounded), close both endpoints without waiting for peers.
    async fn stop_now(&self) {
        self.node.shutdown.cancel();
        self.tracker.close();
        self.flush_storage(Duration::from_millis(STOP_NOW_FLUSH_TIMEOUT_MS))
            .await;
        self.endpoint
            .close(quinn::VarInt::from_u32(0), b"node shutting down");
        self.node.cluster.endpoint().close();
    }
}

/// How [`RunningNode::shutdown`] ended; `chorus serve` makes it its exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopOutcome {
    /// The drain completed (this node's rooms moved to other members, or there was no
    /// other member to move them to) and every part stopped in order, within the
    /// deadline.
    Drained,
    /// Every part stopped in order within the deadline, but the rooms could not be
    /// handed off (no Raft quorum, no answer): they move when the others find this node
    /// gone.
    DrainFailed,
    /// The drain deadline passed: storage was flushed and the rest abandoned.
    DeadlinePassed,
    /// A second signal cut the drain short: storage was flushed and the rest abandoned.
    Interrupted,
}

impl StopOutcome {
    /// Whether the drain completed ([`StopOutcome::Drained`]).
    pub fn drain_completed(self) -> bool {
        self == StopOutcome::Drained
    }
}

async fn sweep_sessions(node: Arc<Node>) {
    let mut interval = tokio::time::interval(Duration::from_millis(SESSION_SWEEP_INTERVAL_MS));
    let mut users_pruned_at_ms = unix_now_ms();
    loop {
        tokio::select! {
            _ = node.shutdown.cancelled() => return,
            _ = interval.tick() => {}
        }
        if unix_now_ms() >= users_pruned_at_ms + USER_BOUNDS_PRUNE_INTERVAL_MS {
            users_pruned_at_ms = unix_now_ms();
            node.users
                .prune(users_pruned_at_ms, |room| node.room_is_open(room));
        }
        for session in node.sessions.take_expired(unix_now_ms()) {
            node.leave_all_rooms(&session).await;
            tracing::debug!(session = %session.id, "session expired");
        }
    }
}

async fn accept_quic(node: Arc<Node>, endpoint: quinn::Endpoint, tracker: TaskTracker) {
    loop {
        let incoming = tokio::select! {
            _ = node.shutdown.cancelled() => return,
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => return,
            },
        };
        let node = node.clone();
        tracker.spawn(async move {
            let connection = match incoming.await {
                Ok(connection) => connection,
                Err(error) => {
                    tracing::debug!(%error, "QUIC handshake failed");
                    return;
                }
            };
            let Some(slot) = node.try_open_connection() else {
                quic::refuse(&connection, ErrorCode::TooManyConnections, "node is full");
                return;
            };
            let accepted = tokio::select! {
                _ = node.shutdown.cancelled() => None,
                stream = connection.accept_bi() => stream.ok(),
                _ = tokio::time::sleep(Duration::from_millis(node.config.limits.auth_timeout_ms)) => None,
            };
            let Some((send, recv)) = accepted else {
                quic::refuse(&connection, ErrorCode::Unauthenticated, "no stream opened");
                return;
            };
            let (reader, writer) = quic::split(
                connection,
                send,
                recv,
                &node.config.limits,
                node.read_budget(),
            );
            connection::drive(node.clone(), "quic", reader, writer, slot).await;
        });
    }
}

/// Which routes an HTTP listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HttpListener {
    /// `--http-addr`: `/ws`, health, and admin and metrics unless they have their own.
    Public,
    /// `--admin-addr`: admin, metrics and health.
    Admin,
}

/// Concurrent connections on the admin listener (operators and scrapers, not clients).
const ADMIN_CONNECTIONS_MAX: usize = 256;

async fn accept_http(
    node: Arc<Node>,
    listener: TcpListener,
    kind: HttpListener,
    tracker: TaskTracker,
) {
    let admin_connections = Arc::new(tokio::sync::Semaphore::new(ADMIN_CONNECTIONS_MAX));
    loop {
        let (stream, _peer) = tokio::select! {
            _ = node.shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        // Every client connection holds a place from its accept on, so unfinished HTTP
        // requests and upgrades count against `connections_max` like WebSocket clients.
        let slot = match kind {
            HttpListener::Public => match node.try_open_connection() {
                Some(slot) => Some(ConnectionSlot::into_shared(slot)),
                None => {
                    tracker.spawn(refuse_http(stream));
                    continue;
                }
            },
            HttpListener::Admin => None,
        };
        let admin_permit = match kind {
            HttpListener::Admin => match admin_connections.clone().try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => {
                    tracker.spawn(refuse_http(stream));
                    continue;
                }
            },
            HttpListener::Public => None,
        };
        let node = node.clone();
        let conn_tracker = tracker.clone();
        tracker.spawn(async move {
            let _admin_permit = admin_permit;
            let header_timeout = Duration::from_millis(node.config.limits.http_header_timeout_ms);
            let service = hyper::service::service_fn(move |request| {
                let node = node.clone();
                let tracker = conn_tracker.clone();
                let slot = slot.clone();
                async move { Ok::<_, Infallible>(route(node, kind, slot, tracker, request).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            if let Err(error) = connection.await {
                tracing::debug!(%error, "http connection ended with error");
            }
        });
    }
}

/// Answers a connection the node has no place for with 503 and closes it.
async fn refuse_http(mut stream: tokio::net::TcpStream) {
    use tokio::io::AsyncWriteExt;
    const FULL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\n\
        content-length: 13\r\nretry-after: 5\r\nconnection: close\r\n\r\nnode is full\n";
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(FULL)).await;
}

/// A [`ConnectionSlot`] shared by an HTTP connection's requests until one of them upgrades
/// to a WebSocket and takes it.
type SharedSlot = Arc<std::sync::Mutex<Option<ConnectionSlot>>>;

impl ConnectionSlot {
    fn into_shared(self) -> SharedSlot {
        Arc::new(std::sync::Mutex::new(Some(self)))
    }
}

type HttpResponse = Response<Full<Bytes>>;

fn text(status: StatusCode, body: impl Into<Bytes>) -> HttpResponse {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
}

async fn route(
    node: Arc<Node>,
    kind: HttpListener,
    slot: Option<SharedSlot>,
    tracker: TaskTracker,
    request: Request<Incoming>,
) -> HttpResponse {
    let path = request.uri().path();
    // With an admin listener, admin and metrics are served only there; clients only here.
    let admin_here = kind == HttpListener::Admin || node.config.admin_addr.is_none();
    let is_admin_route = path == "/metrics" || path.starts_with("/admin/");
    let is_client_route = path == "/ws" || path == "/ws/echo";
    if (is_admin_route && !admin_here) || (is_client_route && kind == HttpListener::Admin) {
        return text(StatusCode::NOT_FOUND, "not found\n");
    }
    match (request.method(), path) {
        (&Method::GET, "/healthz") => {
            if node.shutdown.is_cancelled() {
                text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
            } else {
                text(StatusCode::OK, "ok\n")
            }
        }
        (&Method::GET, "/readyz") => readiness::readyz(&node),
        (&Method::GET, "/metrics") => {
            let mut response = text(StatusCode::OK, node.metrics.render());
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        (&Method::GET, "/ws") => upgrade(node, tracker, slot, request, false),
        (&Method::GET, "/ws/echo") => upgrade(node, tracker, slot, request, true),
        (_, path) if path == "/admin/quiz" || path.starts_with("/admin/quiz/") => {
            admin::route_quiz(&node, request).await
        }
        (_, path) if path.starts_with("/admin/") => admin::route_async(&node, &request).await,
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn upgrade(
    node: Arc<Node>,
    tracker: TaskTracker,
    slot: Option<SharedSlot>,
    mut request: Request<Incoming>,
    echo: bool,
) -> HttpResponse {
    // The connection's place goes with the WebSocket.
    let slot = slot.and_then(|slot| slot.lock().ok()?.take());
    let Some(slot) = slot else {
        return text(StatusCode::SERVICE_UNAVAILABLE, "node is full\n");
    };
    let headers = request.headers();
    let is_upgrade = headers
        .get(UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let Some(key) = headers.get(SEC_WEBSOCKET_KEY).filter(|_| is_upgrade) else {
        return text(
            StatusCode::BAD_REQUEST,
            "expected a WebSocket upgrade request\n",
        );
    };
    let accept = derive_accept_key(key.as_bytes());
    let offers_subprotocol = headers
        .get(hyper::header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|p| p.trim() == WS_SUBPROTOCOL));
    let on_upgrade = hyper::upgrade::on(&mut request);
    let limits = node.config.limits.clone();
    tracker.spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(error) => {
                tracing::debug!(%error, "upgrade failed");
                return;
            }
        };
        let io = TokioIo::new(upgraded);
        if echo {
            let config = ws::config(ECHO_MESSAGE_BYTES_MAX);
            let socket = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
            ws::echo(socket).await;
            drop(slot);
            return;
        }
        let budget = node.read_budget();
        let io = budget::BudgetedRead::new(io, budget.clone());
        let config = ws::config(limits.transport_message_bytes_max);
        let socket = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
        let (reader, writer) = ws::split(socket, limits.frame_bytes_max, budget);
        connection::drive(node, "ws", reader, writer, slot).await;
    });
    let mut response = text(StatusCode::SWITCHING_PROTOCOLS, Bytes::new());
    let headers = response.headers_mut();
    headers.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(value) = HeaderValue::from_str(&accept) {
        headers.insert(SEC_WEBSOCKET_ACCEPT, value);
    }
    if offers_subprotocol {
        headers.insert(
            hyper::header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(WS_SUBPROTOCOL),
        );
    }
    response
}
