//! The HTTP admin API (`/admin/…` on the node's HTTP port, or only on `--admin-addr` when
//! set), guarded by a bearer token. `chorus admin` is its client.
//!
//! - `GET /admin/status`: this node's view of the cluster (self, leader, term, ring epoch,
//!   voters, learners, members with their states, `mesh_peers`: the members this node has
//!   an actor session with).
//! - `GET /admin/nodes`: the members.
//! - `GET /admin/where?key=KEY`: the owner of an actor key on this node's ring and its
//!   replica candidates (a bare room id `r-…` means `room/r-…`).
//! - `POST /admin/drain?node=ID`: mark a member `Draining` (its rooms move to the others);
//!   `POST /admin/remove?node=ID`: remove it through the leader. Both answer 202 at once
//!   and run in the background.
//! - `POST /admin/rain?room=R&total=CENTS&count=N&duration_ms=MS[&cap=3][&start_in_ms=MS]`:
//!   create a red-packet rain (SPEC Q7): its definition, with the seed of its split, is
//!   committed in Raft; answers `{rain_id, …}`.
//! - `GET /admin/rain?id=ID`: a rain's definition, split totals, and what was granted and
//!   refunded (from the most advanced copy among the live nodes).
//! - `GET /admin/rain/audit?id=ID`: the audit of that copy (SPEC Q8): `ok`, `total`,
//!   `granted`, `refunded`, `unclaimed`, `grants`, `violations`.
//! - `GET /admin/rain/state?id=ID`: that copy itself (`{epoch, state}`), for audits with a
//!   client log (`chorus admin rain audit --client-log`).
//! - `GET /admin/rain/ledger?id=ID`: the ledger, one JSON line per grant then the refund.
//! - `POST /admin/quiz` with a JSON body `{room, prize_cents, questions: [{text, options,
//!   correct}], start_in_ms?, window_ms?, revive_cards?: {user: n}, shards?}`: create a
//!   quiz show (SPEC Q1), committed in Raft; answers `{quiz_id, …}`.
//! - `POST /admin/quiz/push?id=ID`, `/admin/quiz/announce?id=ID`, `/admin/quiz/finish?id=ID`:
//!   the operator's steps, run by the show's controller.
//! - `GET /admin/quiz?id=ID`: the show's phase and counts; `GET /admin/quiz/results?id=ID
//!   [&user=U]`: winners and cents (after `finish`), and a user's history.

use std::sync::Arc;

use bytes::Bytes;
use hyper::{Request, StatusCode};

use metrics_exporter_prometheus::PrometheusHandle;

use crate::server::admin::readiness;
use crate::server::common::http::{json, text, HttpResponse};
use crate::server::common::keys::{constant_time_eq, room_key, ActorKey};
use crate::server::context::NodeContext;
use crate::server::edge::service::Edge;
use crate::server::quiz::{self, Quiz};
use crate::server::rain::{self, rain_key, Rain};
use crate::server::rooms::service::Rooms;
use crate::server::sessions::session::random_id;

/// The admin side of the node: its HTTP routes (`/admin/*`), with what they read and
/// act on.
pub struct Admin {
    /// What the whole node shares.
    pub ctx: Arc<NodeContext>,
    /// The rooms.
    pub rooms: Arc<Rooms>,
    /// Red-packet rains.
    pub rain: Arc<Rain>,
    /// Quiz shows.
    pub quiz: Arc<Quiz>,
    /// Client connections.
    pub edge: Arc<Edge>,
    /// The bearer token admin routes require.
    pub admin_token: String,
    /// Renders `/metrics`.
    pub metrics: PrometheusHandle,
}

fn authorized<B>(node: &Admin, request: &Request<B>) -> bool {
    request
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|token| constant_time_eq(token.as_bytes(), node.admin_token.as_bytes()))
}

fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

/// The answer when a Raft write did not commit as asked.
fn not_committed(
    outcome: Result<
        chorus_cluster::metadata::MetadataResponse,
        chorus_cluster::service::ClusterError,
    >,
) -> HttpResponse {
    let why = match outcome {
        Ok(other) => format!("not committed: {other:?}"),
        Err(error) => format!("not committed: {error}"),
    };
    json(
        StatusCode::SERVICE_UNAVAILABLE,
        &serde_json::json!({ "error": why }),
    )
}

fn bad_request(why: impl Into<String>) -> HttpResponse {
    json(
        StatusCode::BAD_REQUEST,
        &serde_json::json!({"error": why.into()}),
    )
}

/// Largest `POST /admin/quiz` body, bytes.
pub const QUIZ_BODY_BYTES_MAX: usize = 8 * 1024 * 1024;

/// The body of `POST /admin/quiz`.
#[derive(Debug, serde::Deserialize)]
struct QuizCreate {
    room: String,
    prize_cents: u64,
    questions: Vec<chorus_actors::quiz::Question>,
    #[serde(default)]
    start_in_ms: u64,
    #[serde(default)]
    window_ms: Option<u64>,
    #[serde(default)]
    revive_cards: std::collections::BTreeMap<String, u32>,
    #[serde(default)]
    shards: Option<u32>,
}

/// Answers `/admin/quiz…` (reads the body of a create).
pub async fn route_quiz(node: &Admin, request: Request<hyper::body::Incoming>) -> HttpResponse {
    use http_body_util::BodyExt as _;
    if !authorized(node, &request) {
        return route(node, &request);
    }
    let query = request.uri().query().unwrap_or("").to_string();
    let post = request.method() == hyper::Method::POST;
    let path = request.uri().path().to_string();
    if path == "/admin/quiz" && post {
        let body = match http_body_util::Limited::new(request.into_body(), QUIZ_BODY_BYTES_MAX)
            .collect()
            .await
        {
            Ok(body) => body.to_bytes(),
            Err(error) => return bad_request(format!("reading the body: {error}")),
        };
        return match serde_json::from_slice::<QuizCreate>(&body) {
            Ok(create) => create_quiz(node, create).await,
            Err(error) => bad_request(format!("bad quiz: {error}")),
        };
    }
    let Some(quiz_id) = query_param(&query, "id").filter(|id| !id.is_empty()) else {
        return bad_request("missing ?id=");
    };
    let action = match (path.as_str(), post) {
        ("/admin/quiz/push", true) => quiz::QuizAction::Push,
        ("/admin/quiz/announce", true) => quiz::QuizAction::Announce,
        ("/admin/quiz/finish", true) => quiz::QuizAction::Finish,
        ("/admin/quiz", false) => quiz::QuizAction::Status,
        ("/admin/quiz/results", false) => quiz::QuizAction::Results {
            user: query_param(&query, "user")
                .filter(|u| !u.is_empty())
                .map(str::to_string),
        },
        _ => {
            return json(
                StatusCode::NOT_FOUND,
                &serde_json::json!({"error": "unknown quiz path or method"}),
            )
        }
    };
    match node.quiz.quiz_action(quiz_id, action).await {
        Ok(value) => json(StatusCode::OK, &value),
        Err(refusal) => {
            let status = match refusal.error_code() {
                Some(chorus_protocol::ErrorCode::QuizNotFound) => StatusCode::NOT_FOUND,
                Some(chorus_protocol::ErrorCode::InvalidArgument) => StatusCode::CONFLICT,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            json(status, &serde_json::json!({"error": refusal.message}))
        }
    }
}

async fn create_quiz(node: &Admin, create: QuizCreate) -> HttpResponse {
    let shards = create.shards.unwrap_or(quiz::SHARDS_DEFAULT);
    if !(1..=quiz::SHARDS_MAX).contains(&shards) {
        return bad_request(format!("shards must be 1-{}", quiz::SHARDS_MAX));
    }
    let metadata = node.ctx.cluster.metadata();
    let Some(room_definition) = metadata
        .definitions
        .get(&room_key(&create.room))
        .and_then(|bytes| rmp_serde::from_slice::<chorus_actors::room::RoomDefinition>(bytes).ok())
    else {
        return json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"error": format!("no room {:?}", create.room)}),
        );
    };
    if room_definition.state == chorus_protocol::RoomState::Ended {
        return bad_request(format!("room {:?} has ended", create.room));
    }
    let definition = chorus_actors::quiz::QuizDefinition {
        quiz_id: random_id("quiz-"),
        room_id: create.room,
        start_ms: chorus_actors::room_actor::unix_now_ms().saturating_add(create.start_in_ms),
        prize_cents: create.prize_cents,
        questions: create.questions,
        window_ms: create
            .window_ms
            .unwrap_or(chorus_actors::quiz::ANSWER_WINDOW_MS_DEFAULT),
        revive_cards: create.revive_cards,
    };
    if let Err(error) = definition.validate() {
        return bad_request(error.to_string());
    }
    let record = quiz::QuizRecord { definition, shards };
    let value = match rmp_serde::to_vec_named(&record) {
        Ok(value) => value,
        Err(error) => return bad_request(error.to_string()),
    };
    let command = chorus_cluster::metadata::MetadataCommand::PutDefinition {
        key: quiz::quiz_key(&record.definition.quiz_id),
        value,
    };
    let definition = &record.definition;
    match node.ctx.cluster.write(command).await {
        Ok(chorus_cluster::metadata::MetadataResponse::Ok) => json(
            StatusCode::OK,
            &serde_json::json!({
                "quiz_id": definition.quiz_id,
                "room_id": definition.room_id,
                "start_ms": definition.start_ms,
                "prize_cents": definition.prize_cents,
                "questions": definition.questions.len(),
                "window_ms": definition.window_ms,
                "shards": record.shards,
            }),
        ),
        other => not_committed(other),
    }
}

/// Answers an admin request, the ones that wait for Raft included (rains); the rest as
/// [`route`].
pub async fn route_async<B>(node: &Admin, request: &Request<B>) -> HttpResponse {
    let path = request.uri().path();
    if path == "/admin/cluster" && request.method() == hyper::Method::GET {
        if !authorized(node, request) {
            return route(node, request);
        }
        return cluster_overview(node).await;
    }
    if !path.starts_with("/admin/rain") || !authorized(node, request) {
        return route(node, request);
    }
    let query = request.uri().query().unwrap_or("");
    match (path, request.method() == hyper::Method::POST) {
        ("/admin/rain", true) => create_rain(node, query).await,
        ("/admin/rain", false) => rain_read(node, query, RainRead::Status).await,
        ("/admin/rain/audit", false) => rain_read(node, query, RainRead::Audit).await,
        ("/admin/rain/state", false) => rain_read(node, query, RainRead::State).await,
        ("/admin/rain/ledger", false) => rain_read(node, query, RainRead::Ledger).await,
        _ => json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"error": format!("no admin endpoint {path}")}),
        ),
    }
}

/// `GET /admin/cluster`: this node's view of the cluster with every member's load
/// (connections, sessions, running rooms; `null` for a member that did not answer within
/// a second), for the operator page.
async fn cluster_overview(node: &Admin) -> HttpResponse {
    let status = node.ctx.cluster.status();
    let loads: std::collections::BTreeMap<u64, _> =
        node.rooms.cluster_load().await.into_iter().collect();
    let mut value = serde_json::to_value(&status).unwrap_or_default();
    value["node_name"] = serde_json::json!(node.ctx.config.node_name);
    if let Some(members) = value["members"].as_array_mut() {
        for member in members {
            let load = member["id"]
                .as_u64()
                .and_then(|id| loads.get(&id).copied().flatten());
            member["load"] = serde_json::to_value(load).unwrap_or_default();
        }
    }
    json(StatusCode::OK, &value)
}

async fn create_rain(node: &Admin, query: &str) -> HttpResponse {
    let number = |name: &str| query_param(query, name).map(str::parse::<u64>);
    let (Some(room), Some(Ok(total)), Some(Ok(count)), Some(Ok(duration_ms))) = (
        query_param(query, "room").filter(|r| !r.is_empty()),
        number("total"),
        number("count"),
        number("duration_ms"),
    ) else {
        return bad_request("give room, total (cents), count and duration_ms as numbers");
    };
    let cap = match number("cap") {
        None => 3,
        Some(Ok(cap)) => cap,
        Some(Err(_)) => return bad_request("cap must be a number"),
    };
    let start_in_ms = match number("start_in_ms") {
        None => 0,
        Some(Ok(ms)) => ms,
        Some(Err(_)) => return bad_request("start_in_ms must be a number"),
    };
    let metadata = node.ctx.cluster.metadata();
    let Some(room_definition) = metadata
        .definitions
        .get(&room_key(room))
        .and_then(|bytes| rmp_serde::from_slice::<chorus_actors::room::RoomDefinition>(bytes).ok())
    else {
        return json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"error": format!("no room {room:?}")}),
        );
    };
    if room_definition.state == chorus_protocol::RoomState::Ended {
        return bad_request(format!("room {room:?} has ended"));
    }
    let definition = chorus_actors::rain::RainDefinition {
        rain_id: random_id("rain-"),
        room_id: room.to_string(),
        creator: room_definition.host.clone(),
        total_cents: total,
        count: u32::try_from(count).unwrap_or(u32::MAX),
        start_ms: chorus_actors::room_actor::unix_now_ms().saturating_add(start_in_ms),
        duration_ms,
        cap_per_user: u32::try_from(cap).unwrap_or(u32::MAX),
        seed: rand::random(),
    };
    if let Err(error) = definition.validate() {
        return bad_request(error.to_string());
    }
    let value = match rmp_serde::to_vec_named(&definition) {
        Ok(value) => value,
        Err(error) => return bad_request(error.to_string()),
    };
    let command = chorus_cluster::metadata::MetadataCommand::PutDefinition {
        key: rain_key(&definition.rain_id),
        value,
    };
    match node.ctx.cluster.write(command).await {
        Ok(chorus_cluster::metadata::MetadataResponse::Ok) => {
            json(StatusCode::OK, &rain_json(&definition))
        }
        other => not_committed(other),
    }
}

fn rain_json(definition: &chorus_actors::rain::RainDefinition) -> serde_json::Value {
    let split =
        chorus_actors::rain::split(definition.total_cents, definition.count, definition.seed)
            .unwrap_or_default();
    serde_json::json!({
        "rain_id": definition.rain_id,
        "room_id": definition.room_id,
        "creator": definition.creator,
        "total": definition.total_cents,
        "count": definition.count,
        "cap": definition.cap_per_user,
        "start_ms": definition.start_ms,
        "end_ms": definition.end_ms(),
        "split_sum": split.iter().sum::<u64>(),
        "smallest": split.iter().min(),
        "largest": split.iter().max(),
    })
}

/// What a rain read answers.
enum RainRead {
    /// The definition, split totals and grants so far.
    Status,
    /// The audit of the most advanced copy (without a client log).
    Audit,
    /// The most advanced copy: definition, grants, refund (for `chorus admin rain audit`
    /// with a client log).
    State,
    /// The ledger as JSON lines.
    Ledger,
}

async fn rain_read(node: &Admin, query: &str, read: RainRead) -> HttpResponse {
    let Some(rain_id) = query_param(query, "id").filter(|id| !id.is_empty()) else {
        return bad_request("missing ?id=");
    };
    let Some(definition) = node
        .ctx
        .cluster
        .metadata()
        .definitions
        .get(&rain_key(rain_id))
        .and_then(|bytes| rmp_serde::from_slice::<chorus_actors::rain::RainDefinition>(bytes).ok())
    else {
        return json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"error": format!("no rain {rain_id:?}")}),
        );
    };
    let copy = match node.rain.rain_best_copy(rain_id).await {
        Ok(copy) => copy,
        Err(error) => {
            return json(
                StatusCode::SERVICE_UNAVAILABLE,
                &serde_json::json!({"error": error.message}),
            )
        }
    };
    // No copy yet: the rain has not been served; its state is the split alone.
    let (epoch, state) = copy.unwrap_or_else(|| {
        let packets =
            chorus_actors::rain::split(definition.total_cents, definition.count, definition.seed)
                .unwrap_or_default();
        (
            0,
            chorus_actors::rain::RainState {
                definition: definition.clone(),
                packets,
                grants: Vec::new(),
                refunded_cents: None,
            },
        )
    });
    match read {
        RainRead::Status => {
            let mut status = rain_json(&definition);
            let report = chorus_actors::rain::audit(&state, &[]);
            status["epoch"] = epoch.into();
            status["grants"] = report.grants.into();
            status["granted"] = report.granted.into();
            status["refunded"] = report.refunded.into();
            status["ended"] = state.refunded_cents.is_some().into();
            json(StatusCode::OK, &status)
        }
        RainRead::Audit => json(
            StatusCode::OK,
            &serde_json::to_value(chorus_actors::rain::audit(&state, &[])).unwrap_or_default(),
        ),
        RainRead::State => json(
            StatusCode::OK,
            &serde_json::json!({"epoch": epoch, "state": state}),
        ),
        RainRead::Ledger => {
            let mut lines = rain::ledger_lines(&state).join("\n");
            lines.push('\n');
            let mut response = text(StatusCode::OK, Bytes::from(lines));
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/x-ndjson"),
            );
            response
        }
    }
}

/// Answers an admin request (drain and remove run in the background and answer at once
/// with `accepted`; watch `status`).
pub fn route<B>(node: &Admin, request: &Request<B>) -> HttpResponse {
    if !authorized(node, request) {
        return json(
            StatusCode::UNAUTHORIZED,
            &serde_json::json!({"error": "missing or wrong admin token (Authorization: Bearer …)"}),
        );
    }
    let cluster = &node.ctx.cluster;
    let post = request.method() == hyper::Method::POST;
    if !post && request.method() != hyper::Method::GET {
        return json(
            StatusCode::METHOD_NOT_ALLOWED,
            &serde_json::json!({"error": "use GET, or POST for drain and remove"}),
        );
    }
    match request.uri().path() {
        "/admin/status" => {
            let status = cluster.status();
            let mut value = serde_json::to_value(&status).unwrap_or_default();
            value["node_name"] = serde_json::json!(node.ctx.config.node_name);
            value["connections"] = serde_json::json!(node.edge.connection_count());
            value["mesh_peers"] = serde_json::json!(node.ctx.mesh.peers());
            let verdict = readiness::readiness(&node.ctx);
            value["ready"] = serde_json::json!(verdict.ready);
            value["self_state"] = serde_json::json!(verdict.state.map(readiness::state_name));
            if !verdict.ready {
                value["not_ready"] = serde_json::json!(verdict.reason);
            }
            json(StatusCode::OK, &value)
        }
        "/admin/nodes" => json(
            StatusCode::OK,
            &serde_json::to_value(cluster.status().members).unwrap_or_default(),
        ),
        "/admin/where" => {
            let query = request.uri().query().unwrap_or("");
            let Some(key) = query_param(query, "key").filter(|k| !k.is_empty()) else {
                return json(
                    StatusCode::BAD_REQUEST,
                    &serde_json::json!({"error": "missing ?key="}),
                );
            };
            let key = if key.contains('/') {
                key.to_string()
            } else {
                room_key(key)
            };
            let metadata = cluster.metadata();
            let ring = cluster.ring();
            let owner = ring.as_ref().and_then(|r| r.owner(&key));
            let owner_record = owner.and_then(|id| metadata.nodes.get(&id));
            json(
                StatusCode::OK,
                &serde_json::json!({
                    "key": key,
                    "owner": owner,
                    "owner_name": owner_record.map(|n| n.name.clone()),
                    "owner_http_addr": owner_record.map(|n| n.http_addr.clone()),
                    "ring_epoch": metadata.ring_epoch,
                    "ownership": metadata.owners.get(&key),
                    // Whether this node runs the room's actor now.
                    "running_here": ActorKey::parse(&key)
                        .and_then(ActorKey::room)
                        .is_some_and(|room_id| node.rooms.directory.is_running(room_id))
                        || node.edge.voicemail.is_active(&key),
                    // Where the owner replicates the key's state, in order of preference.
                    "replicas": ring.as_ref().map(|r| {
                        r.owners_n(&key, crate::server::rooms::replicate::REPLICA_CANDIDATES_MAX + 1)
                            .into_iter()
                            .skip(1)
                            .collect::<Vec<_>>()
                    }),
                }),
            )
        }
        path @ ("/admin/drain" | "/admin/remove") if post => {
            let query = request.uri().query().unwrap_or("");
            let Some(target) = query_param(query, "node").and_then(|n| n.parse::<u64>().ok())
            else {
                return json(
                    StatusCode::BAD_REQUEST,
                    &serde_json::json!({"error": "missing or bad ?node=ID"}),
                );
            };
            if !cluster.metadata().nodes.contains_key(&target) {
                return json(
                    StatusCode::NOT_FOUND,
                    &serde_json::json!({"error": format!("no member {target}")}),
                );
            }
            let cluster = cluster.clone();
            let drain = path == "/admin/drain";
            tokio::spawn(async move {
                let result = if drain {
                    cluster
                        .write(chorus_cluster::metadata::MetadataCommand::SetNodeState {
                            node: target,
                            state: chorus_cluster::metadata::NodeState::Draining,
                        })
                        .await
                        .map(|_| ())
                } else {
                    cluster.remove_node(target).await
                };
                if let Err(error) = result {
                    tracing::warn!(node = target, drain, %error, "admin operation failed");
                }
            });
            json(
                StatusCode::ACCEPTED,
                &serde_json::json!({"accepted": if drain { "drain" } else { "remove" }, "node": target}),
            )
        }
        _ => json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"error": "unknown admin path"}),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_exactly() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }

    #[test]
    fn query_parameters_are_found() {
        assert_eq!(query_param("a=1&key=r-9", "key"), Some("r-9"));
        assert_eq!(query_param("a=1", "key"), None);
    }
}
