//! The wiring of a node. [`start`] binds its sockets, joins (or starts) the cluster, and
//! builds the parts bottom-up into a [`Node`]: the shared context, the rooms, the rains and
//! quizzes over the rooms, the edge over them, the admin routes; then it spawns the
//! listeners and the background loops. While the node joins, `admin::readiness` holds the
//! HTTP port. Requests from other nodes arrive tagged with a `Domain` (`common::codec`) and
//! go to the part that owns it (rooms, rain, quiz); voice datagrams go to the rooms. No
//! domain rule lives here.
//!
//! # Stopping
//!
//! [`RunningNode::shutdown`] stops in this order, each step bounded by 5 s and all of them
//! together by the drain deadline (`drain_timeout_ms`, 30 s):
//!
//! 1. drain: mark this node `Draining` in Raft so its rooms move to the others, wait until
//!    none runs here, and hand off the room copies it holds (`rooms::upkeep`); a lone node
//!    has nothing to hand off, which counts as drained;
//! 2. stop accepting and close client connections (`unavailable`: they resume elsewhere);
//! 3. stop the room actors (an activation may be waiting on Raft, hence its own bound);
//! 4. stop Raft and the inter-node endpoint;
//! 5. flush sled;
//! 6. close the client QUIC endpoint.
//!
//! A step may wait on a Raft quorum that is gone. So past the deadline, or at a second
//! signal, the rest is abandoned: sled is flushed (at most [`STOP_NOW_FLUSH_TIMEOUT_MS`])
//! and both endpoints are closed without waiting; the runtime then gives leftover tasks
//! 1 s (`cli`). What was not handed off moves when the others mark the node `Down`.
//! `chorus serve` exits 0 when the drain completed, 3 when it did not ([`StopOutcome`]),
//! and 1 when the node's Raft member failed while it ran.

use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use chorus_actors::room_actor::unix_now_ms;
use chorus_actors::session::SessionConfig;
use chorus_actors::store::DefinitionStore;
use chorus_protocol::{ErrorBody, ErrorCode, FrameLimits, ALPN};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::NodeConfig;
use crate::server::admin::readiness;
use crate::server::admin::routes::Admin;
use crate::server::common::analytics::FileAnalytics;
use crate::server::common::client_tls::ReloadingCert;
use crate::server::common::codec::{encode, split_request, Domain};
use crate::server::common::group_commit::GroupCommit;
use crate::server::context::NodeContext;
use crate::server::edge::quic;
use crate::server::edge::service::Edge;
use crate::server::http::{accept_http, HttpListener, HttpService};
use crate::server::quiz::Quiz;
use crate::server::rain::{self, Rain};
use crate::server::rooms::control::{ControlMsg, NodeControl};
use crate::server::rooms::definitions::RaftDefinitions;
use crate::server::rooms::event_log::NodeEventLog;
use crate::server::rooms::replica::DurableStates;
use crate::server::rooms::service::Rooms;
use crate::server::rooms::{batches, upkeep};
use crate::server::sessions::session::{SessionIds, SessionRegistry};
use crate::server::sessions::users::UserBounds;
use crate::server::voicemail::service::Voicemail;
use crate::token::TokenKeys;

/// How often detached sessions are checked for expiry.
const SESSION_SWEEP_INTERVAL_MS: u64 = 1_000;
/// How often per-user creation bounds forget users with nothing left to bound.
const USER_BOUNDS_PRUNE_INTERVAL_MS: u64 = 30_000;
/// Bound on each shutdown step (the drain deadline bounds them all together).
const SHUTDOWN_STEP_TIMEOUT_MS: u64 = 5_000;
/// Bound on the sled flush when the ordered stop is abandoned (deadline passed, second
/// signal): long enough for a healthy disk, short enough to stop "at once".
pub const STOP_NOW_FLUSH_TIMEOUT_MS: u64 = 2_000;
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
    /// The client TLS certificate or key (`--tls-cert`, `--tls-key`) could not be used.
    #[error("client TLS: {0}")]
    ClientTls(String),
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

/// A running node's parts, from the bottom up: what they share, the rooms, the rains and
/// quizzes over the rooms, the edge that serves clients, and the admin routes.
pub struct Node {
    /// What every part shares (configuration, cluster, database, sessions).
    pub ctx: Arc<NodeContext>,
    /// The rooms.
    pub rooms: Arc<Rooms>,
    /// Red-packet rains.
    pub rain: Arc<Rain>,
    /// Quiz shows.
    pub quiz: Arc<Quiz>,
    /// Voice messages and user actors.
    pub voicemail: Arc<Voicemail>,
    /// Client connections.
    pub edge: Arc<Edge>,
    /// Admin routes and metrics.
    pub admin: Arc<Admin>,
}

/// The node's handler for messages from other nodes: each goes to the part whose
/// [`Domain`] it names.
struct NodeApp {
    rooms: Weak<Rooms>,
    rain: Weak<Rain>,
    quiz: Weak<Quiz>,
    voicemail: Weak<Voicemail>,
}

impl chorus_cluster::service::AppHandler for NodeApp {
    fn datagram(
        &self,
        datagram: Bytes,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            if let Some(rooms) = self.rooms.upgrade() {
                rooms.audio_datagram(datagram).await;
            }
        })
    }

    fn handle(
        &self,
        request: Bytes,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Bytes> + Send + '_>> {
        Box::pin(async move {
            let shutting_down = || {
                encode(&Err::<(), _>(ErrorBody::new(
                    ErrorCode::Unavailable,
                    "node shutting down",
                )))
            };
            match split_request(&request) {
                Ok((Domain::Rooms, message)) => match self.rooms.upgrade() {
                    Some(rooms) => rooms.handle_peer(message).await,
                    None => shutting_down(),
                },
                Ok((Domain::Rain, message)) => match self.rain.upgrade() {
                    Some(rain) => rain.handle_peer(message).await,
                    None => shutting_down(),
                },
                Ok((Domain::Quiz, message)) => match self.quiz.upgrade() {
                    Some(quiz) => quiz.handle_peer(message).await,
                    None => shutting_down(),
                },
                Ok((Domain::Voice, message)) => match self.voicemail.upgrade() {
                    Some(voicemail) => voicemail.handle_peer(message).await,
                    None => shutting_down(),
                },
                Err(error) => encode(&Err::<(), _>(error)),
            }
        })
    }
}

/// A started node; [`RunningNode::shutdown`] stops it in order.
pub struct RunningNode {
    node: Arc<Node>,
    tracker: TaskTracker,
    endpoint: quinn::Endpoint,
    control: ractor::ActorRef<ControlMsg>,
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
    // Client TLS first: a bad certificate or key stops the start with its reason.
    let client_tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Some(Arc::new(
            ReloadingCert::load(cert, key).map_err(ServeError::ClientTls)?,
        )),
        _ => None,
    };
    let tls_acceptor = client_tls
        .as_ref()
        .map(|cert| tokio_rustls::TlsAcceptor::from(Arc::new(cert.server_config())));
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
        tls_acceptor.clone(),
        starting.clone(),
    ));
    let starting_admin = admin_listener.map(|listener| {
        tokio::spawn(readiness::serve_while_starting(
            listener,
            config.node_name.clone(),
            None,
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
    let definitions: Arc<dyn DefinitionStore> = Arc::new(RaftDefinitions {
        cluster: cluster.clone(),
    });
    let durable = DurableStates::open(&db).map_err(|e| ServeError::Storage {
        path: data_dir.clone(),
        reason: e.to_string(),
    })?;
    let ctx = Arc::new(NodeContext {
        sessions: SessionRegistry::new(
            session_config,
            sessions_max,
            config.limits.sessions_per_user_max,
            node_id,
            SessionIds::new(secret.as_bytes()),
        ),
        shutdown,
        cluster,
        mesh,
        group_commit: GroupCommit::for_db(db.clone()),
        users: UserBounds::new(&config.limits),
        connections: std::sync::atomic::AtomicUsize::new(0),
        db,
        config,
    });
    let storage = |e: sled::Error| ServeError::Storage {
        path: data_dir.clone(),
        reason: e.to_string(),
    };
    let rooms = Rooms::new(ctx.clone(), definitions, durable);
    let rain = Rain::open(ctx.clone(), rooms.clone()).map_err(storage)?;
    let quiz = Quiz::open(ctx.clone(), rooms.clone()).map_err(storage)?;
    let voicemail = Voicemail::open(ctx.clone()).map_err(storage)?;
    let edge = Arc::new(Edge::new(
        ctx.clone(),
        rooms.clone(),
        rain.clone(),
        quiz.clone(),
        voicemail.clone(),
        TokenKeys::new(secret.as_bytes()),
        frame_limits,
    ));
    let admin = Arc::new(Admin {
        ctx: ctx.clone(),
        rooms: rooms.clone(),
        rain: rain.clone(),
        quiz: quiz.clone(),
        edge: edge.clone(),
        admin_token,
        metrics,
    });
    let node = Arc::new(Node {
        ctx,
        rooms,
        rain,
        quiz,
        voicemail,
        edge,
        admin,
    });
    let analytics: Arc<dyn chorus_actors::room_actor::AnalyticsSink> = Arc::new(FileAnalytics {
        dir: data_dir.join("analytics"),
    });
    node.rooms.directory.set_analytics(analytics.clone());
    let log =
        NodeEventLog::open(&node.ctx.db, Arc::downgrade(&node.ctx), analytics).map_err(storage)?;
    let log = Arc::new(log);
    let _ = node.rooms.event_log.set(log.clone());
    node.rooms.directory.set_event_log(log);
    node.ctx.cluster.set_app_handler(Arc::new(NodeApp {
        rooms: Arc::downgrade(&node.rooms),
        rain: Arc::downgrade(&node.rain),
        quiz: Arc::downgrade(&node.quiz),
        voicemail: Arc::downgrade(&node.voicemail),
    }));

    let (control, _) = ractor::Actor::spawn(None, NodeControl, Arc::downgrade(&node.rooms))
        .await
        .map_err(|e| ServeError::Cluster(format!("control actor: {e}")))?;

    let tracker = TaskTracker::new();
    let http = Arc::new(HttpService {
        edge: node.edge.clone(),
        admin: node.admin.clone(),
    });
    tracker.spawn(accept_http(
        http.clone(),
        listener,
        HttpListener::Public,
        tls_acceptor,
        tracker.clone(),
    ));
    if let Some(cert) = client_tls {
        let interval = Duration::from_millis(node.ctx.config.tls_reload_interval_ms);
        tracker.spawn(cert.watch(interval, node.ctx.shutdown.clone()));
    }
    if let Some(listener) = admin_listener {
        tracker.spawn(accept_http(
            http.clone(),
            listener,
            HttpListener::Admin,
            None,
            tracker.clone(),
        ));
    }
    tracker.spawn(quic::accept(
        node.edge.clone(),
        endpoint.clone(),
        tracker.clone(),
    ));
    tracker.spawn(sweep_sessions(node.rooms.clone()));
    node.voicemail.start_upkeep(&tracker);
    let rooms = Arc::downgrade(&node.rooms);
    tokio::spawn(upkeep::follow_ring(rooms.clone()));
    tokio::spawn(upkeep::rejoin_after_cut(rooms.clone()));
    tokio::spawn(upkeep::expire_rooms(rooms.clone()));
    tokio::spawn(upkeep::release_idle_rooms(rooms.clone()));
    tokio::spawn(upkeep::save_deferred_copies(rooms.clone()));
    tokio::spawn(batches::send_reaction_batches(rooms.clone()));
    tokio::spawn(batches::send_bullet_batches(rooms.clone()));
    tokio::spawn(rain::run_rains(Arc::downgrade(&node.rain)));
    if let Some(repairs) = node.ctx.sessions.take_repairs() {
        tokio::spawn(upkeep::repair_gaps(rooms, repairs));
    }
    let name = &node.ctx.config.node_name;
    tracing::info!(%http_addr, ?admin_addr, %quic_addr, node = %name, "node serving");
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
        self.node.ctx.cluster.raft_failed().await
    }

    /// Resolves when shutdown has been requested.
    pub async fn stopping(&self) {
        self.node.ctx.shutdown.cancelled().await
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
        let drained = match self.node.ctx.cluster.drain_self(step).await {
            // Our rooms stop as this node follows the ring; wait for that (bounded).
            Ok(true) => {
                let moved = tokio::time::timeout(step, async {
                    while self.node.rooms.directory.running().await > 0 {
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
            match tokio::time::timeout(step, upkeep::hand_off_copies(&self.node.rooms)).await {
                Ok((taken, untaken)) => {
                    tracing::info!(taken, untaken, "handed off the room copies held here")
                }
                Err(_) => tracing::warn!("handing off the room copies did not finish in time"),
            }
            tracing::info!("drain completed");
        }
        tracing::info!("closing client connections");
        self.node.ctx.shutdown.cancel();
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
        if tokio::time::timeout(step, self.node.rooms.directory.stop_all())
            .await
            .is_err()
        {
            tracing::warn!("rooms did not stop in time (an activation waits on Raft)");
        }
        self.control.stop(None);
        tracing::info!("stopping raft");
        if tokio::time::timeout(step, self.node.ctx.cluster.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("raft did not stop in time");
            self.node.ctx.cluster.endpoint().close();
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
        self.node.rooms.durable.save_deferred();
        match tokio::time::timeout(timeout, self.node.ctx.db.flush_async()).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => tracing::error!(%error, "storage flush failed"),
            Err(_) => tracing::error!("storage flush did not finish in time"),
        }
    }

    /// What is safe and quick once the ordered stop is abandoned: stop the node's loops,
    /// flush sled (bounded), close both endpoints without waiting for peers.
    async fn stop_now(&self) {
        self.node.ctx.shutdown.cancel();
        self.tracker.close();
        self.flush_storage(Duration::from_millis(STOP_NOW_FLUSH_TIMEOUT_MS))
            .await;
        self.endpoint
            .close(quinn::VarInt::from_u32(0), b"node shutting down");
        self.node.ctx.cluster.endpoint().close();
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

/// Expires detached sessions and prunes per-user bounds until the node stops.
async fn sweep_sessions(node: Arc<Rooms>) {
    let mut interval = tokio::time::interval(Duration::from_millis(SESSION_SWEEP_INTERVAL_MS));
    let mut users_pruned_at_ms = unix_now_ms();
    loop {
        tokio::select! {
            _ = node.ctx.shutdown.cancelled() => return,
            _ = interval.tick() => {}
        }
        if unix_now_ms() >= users_pruned_at_ms + USER_BOUNDS_PRUNE_INTERVAL_MS {
            users_pruned_at_ms = unix_now_ms();
            node.ctx
                .users
                .prune(users_pruned_at_ms, |room| node.ctx.room_is_open(room));
        }
        for session in node.ctx.sessions.take_expired(unix_now_ms()) {
            node.leave_all_rooms(&session).await;
            tracing::debug!(session = %session.id, "session expired");
        }
    }
}
