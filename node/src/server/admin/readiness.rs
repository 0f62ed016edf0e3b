//! Liveness and readiness over HTTP.
//!
//! `/healthz` answers whether the process serves HTTP at all (liveness: 200 from the
//! moment the HTTP port is bound, also while the node is still joining; 503 once it is
//! stopping). `/readyz` answers whether the node is a working member (readiness: an `up`
//! member of the committed metadata, on the ring, with a known Raft leader). A load
//! balancer or Kubernetes sends clients only to ready nodes; `chorus admin status` shows
//! the same verdict.
//!
//! While the node joins, [`serve_while_starting`] holds the HTTP port and answers these two
//! (and 503 to everything else), so a slow join is visible rather than a port that hangs.

use std::convert::Infallible;
use std::sync::Arc;

use chorus_cluster::metadata::NodeState;
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::server::common::http::{json, text, HttpResponse};
use crate::server::context::NodeContext;

/// Whether this node is ready, and why not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    /// Ready to serve clients.
    pub ready: bool,
    /// Why not (empty when ready).
    pub reason: String,
    /// This node's state in its applied metadata (`None`: not a member there).
    pub state: Option<NodeState>,
    /// The ring epoch of that metadata.
    pub ring_epoch: u64,
    /// The Raft leader this node knows of.
    pub leader: Option<chorus_cluster::metadata::NodeId>,
}

/// This node's readiness: an `up` member of its applied (committed) metadata, on the
/// ring of that metadata, with a known Raft leader, not cut off from the cluster (see
/// `ClusterService::is_cut_off`: after a cut it is ready again only once it caught up with
/// the leader's log), and not stopping.
pub fn readiness(node: &NodeContext) -> Readiness {
    let metadata = node.cluster.metadata();
    let self_id = node.cluster.node_id();
    let state = metadata.nodes.get(&self_id).map(|n| n.state);
    let leader = node.cluster.raft_metrics().leader;
    let reason = if node.shutdown.is_cancelled() {
        "the node is stopping".to_string()
    } else {
        match state {
            None => format!("node {self_id} is not a member of the cluster metadata it holds"),
            Some(NodeState::Up) if !metadata.up_nodes().contains(&self_id) => {
                "not on the ring".to_string()
            }
            Some(NodeState::Up) if leader.is_none() => "no Raft leader known".to_string(),
            Some(NodeState::Up) if node.cluster.is_cut_off() => {
                "cut off: this node reaches no majority of the cluster".to_string()
            }
            Some(NodeState::Up) => String::new(),
            Some(other) => format!("member state is {}", state_name(other)),
        }
    };
    Readiness {
        ready: reason.is_empty(),
        reason,
        state,
        ring_epoch: metadata.ring_epoch,
        leader,
    }
}

/// A member state as the admin API names it.
pub fn state_name(state: NodeState) -> &'static str {
    match state {
        NodeState::Joining => "joining",
        NodeState::Up => "up",
        NodeState::Draining => "draining",
        NodeState::Down => "down",
    }
}

/// `GET /readyz` of a running node: 200 when ready, else 503; a JSON body either way
/// (`ready`, `member`, `node_id`, `state`, `ring_epoch`, `leader`, `reason`).
pub fn readyz(node: &NodeContext) -> HttpResponse {
    let verdict = readiness(node);
    let body = serde_json::json!({
        "ready": verdict.ready,
        "member": verdict.state.is_some(),
        "node_id": node.cluster.node_id(),
        "node_name": node.config.node_name,
        "state": verdict.state.map(state_name),
        "ring_epoch": verdict.ring_epoch,
        "leader": verdict.leader,
        "reason": verdict.reason,
    });
    let status = if verdict.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json(status, &body)
}

fn starting_response(request: &Request<Incoming>, node_name: &str) -> HttpResponse {
    let reason = "the node is joining the cluster";
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "starting\n"),
        (&Method::GET, "/readyz") => json(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({
                "ready": false,
                "member": false,
                "node_name": node_name,
                "state": "starting",
                "reason": reason,
            }),
        ),
        _ => json(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({ "error": reason }),
        ),
    }
}

/// Answers `/healthz` (200, `starting`), `/readyz` (503) and everything else (503) on
/// `listener` until `done` is cancelled, then hands the listener back for the node's own
/// HTTP service. Connections are not kept alive, so none outlives this phase.
pub async fn serve_while_starting(
    listener: TcpListener,
    node_name: String,
    tls: Option<tokio_rustls::TlsAcceptor>,
    done: CancellationToken,
) -> TcpListener {
    let tracker = TaskTracker::new();
    let node_name: Arc<str> = node_name.into();
    loop {
        let stream = tokio::select! {
            _ = done.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tracing::debug!(%error, "accept failed while starting");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let node_name = node_name.clone();
        let tls = tls.clone();
        // Bounded: a client that never shakes hands or sends its request does not hold
        // this task.
        tracker.spawn(tokio::time::timeout(
            std::time::Duration::from_secs(5),
            async move {
                match tls {
                    None => answer_starting(stream, node_name).await,
                    Some(acceptor) => {
                        if let Ok(stream) = acceptor.accept(stream).await {
                            answer_starting(stream, node_name).await;
                        }
                    }
                }
            },
        ));
    }
    tracker.close();
    listener
}

/// Answers one connection while the node starts (health, not ready).
async fn answer_starting<I>(io: I, node_name: Arc<str>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |request| {
        let response = starting_response(&request, &node_name);
        async move { Ok::<_, Infallible>(response) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .keep_alive(false)
        .serve_connection(TokioIo::new(io), service)
        .await;
}
