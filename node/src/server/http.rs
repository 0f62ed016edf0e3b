//! The node's HTTP listeners: the public one (`--http-addr`: `/ws` and `/ws/echo`
//! upgrades, the web app at `/` (`web`), `/vm/<id>`, `/healthz`, `/readyz`, and `/admin/*`
//! and `/metrics` unless they have their own) and the admin one (`--admin-addr`: admin,
//! metrics and health).
//!
//! **Boundary:** budgets before trust. A client TCP connection holds one of
//! `connections_max` places (50,000) from its accept, so unfinished HTTP heads and
//! upgrades count like WebSocket clients; a connection with no place gets 503. Its head
//! must arrive within `http_header_timeout_ms` (10 s). An upgraded WebSocket keeps its
//! place and is read through a `BudgetedRead` (`edge::budget`). The admin listener is
//! outside `connections_max` and takes at most 256 connections at once.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chorus_protocol::WS_SUBPROTOCOL;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, UPGRADE};
use hyper::upgrade::Upgraded;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;
use tokio_util::task::TaskTracker;

use crate::server::admin::readiness::readyz;
use crate::server::admin::routes::{self, Admin};
use crate::server::common::http::{text, HttpResponse};
use crate::server::edge::budget::BudgetedRead;
use crate::server::edge::connection::Queued;
use crate::server::edge::service::{ConnectionSlot, Edge, SharedSlot};
use crate::server::edge::{connection, ws};
use crate::server::sessions::wire::Wire;
use crate::server::web;

/// Message size accepted on `/ws/echo` (the Autobahn cases send up to 16 MiB).
const ECHO_MESSAGE_BYTES_MAX: usize = 64 * 1024 * 1024;

/// What the HTTP listeners serve: client upgrades to the edge, admin routes to the admin.
pub(crate) struct HttpService {
    /// Client connections.
    pub edge: Arc<Edge>,
    /// Admin routes, metrics.
    pub admin: Arc<Admin>,
}

/// Which routes an HTTP listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HttpListener {
    /// `--http-addr`: `/ws`, health, and admin and metrics unless they have their own.
    Public,
    /// `--admin-addr`: admin, metrics and health.
    Admin,
}

/// Concurrent connections on the admin listener (operators and scrapers, not clients).
const ADMIN_CONNECTIONS_MAX: usize = 256;
/// Refused connections answered with a lingering close at once; past this many, a refused
/// connection gets its 503 and is closed without waiting for the client's request.
const LINGERING_REFUSALS_MAX: usize = 256;

/// Accepts connections on `listener` until shutdown, each served by its own task; with
/// `tls`, the TLS handshake comes first (within the same `http_header_timeout_ms` as the
/// request head).
pub(crate) async fn accept_http(
    node: Arc<HttpService>,
    listener: TcpListener,
    kind: HttpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    tracker: TaskTracker,
) {
    let admin_connections = Arc::new(tokio::sync::Semaphore::new(ADMIN_CONNECTIONS_MAX));
    let lingering = Arc::new(tokio::sync::Semaphore::new(LINGERING_REFUSALS_MAX));
    loop {
        let (stream, _peer) = tokio::select! {
            _ = node.edge.ctx.shutdown.cancelled() => return,
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
        // What the client does not read waits in the node's queue, not the kernel's: see
        // `socket_unsent_bytes_max`.
        let _ = socket2::SockRef::from(&stream)
            .set_tcp_notsent_lowat(node.edge.ctx.config.limits.socket_unsent_bytes_max);
        // Every client connection holds a place from its accept on, so unfinished HTTP
        // requests and upgrades count against `connections_max` like WebSocket clients.
        let slot = match kind {
            HttpListener::Public => match node.edge.try_open_connection() {
                Some(slot) => Some(ConnectionSlot::into_shared(slot)),
                None => {
                    tracker.spawn(refuse_http(stream, lingering.clone()));
                    continue;
                }
            },
            HttpListener::Admin => None,
        };
        let admin_permit = match kind {
            HttpListener::Admin => match admin_connections.clone().try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => {
                    tracker.spawn(refuse_http(stream, lingering.clone()));
                    continue;
                }
            },
            HttpListener::Public => None,
        };
        let node = node.clone();
        let conn_tracker = tracker.clone();
        let tls = tls.clone();
        tracker.spawn(async move {
            let _admin_permit = admin_permit;
            let header_timeout =
                Duration::from_millis(node.edge.ctx.config.limits.http_header_timeout_ms);
            match tls {
                None => {
                    Box::pin(serve_http(
                        node,
                        kind,
                        slot,
                        conn_tracker,
                        header_timeout,
                        stream,
                    ))
                    .await
                }
                Some(acceptor) => {
                    if let Some(stream) = handshake(&acceptor, stream, header_timeout).await {
                        Box::pin(serve_http(
                            node,
                            kind,
                            slot,
                            conn_tracker,
                            header_timeout,
                            stream,
                        ))
                        .await
                    }
                }
            }
        });
    }
}

/// The client's TLS handshake, within `timeout`; a failure is counted and logged.
async fn handshake(
    acceptor: &tokio_rustls::TlsAcceptor,
    stream: tokio::net::TcpStream,
    timeout: Duration,
) -> Option<tokio_rustls::server::TlsStream<tokio::net::TcpStream>> {
    let why = match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => return Some(stream),
        Ok(Err(error)) => error.to_string(),
        Err(_) => "timed out".to_string(),
    };
    metrics::counter!("chorus_tls_handshakes_failed_total").increment(1);
    tracing::debug!(why, "client TLS handshake failed");
    None
}

/// Serves one HTTP/1.1 connection (plain or TLS) with upgrades.
async fn serve_http<I>(
    node: Arc<HttpService>,
    kind: HttpListener,
    slot: Option<SharedSlot>,
    tracker: TaskTracker,
    header_timeout: Duration,
    io: I,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |request| {
        let node = node.clone();
        let tracker = tracker.clone();
        let slot = slot.clone();
        // Boxed: the route's future is deep, and this one is built for two stream types.
        async move { Ok::<_, Infallible>(Box::pin(route(node, kind, slot, tracker, request)).await) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    if let Err(error) = connection.await {
        tracing::debug!(%error, "http connection ended with error");
    }
}

/// Answers a connection the node has no place for with 503 and closes it.
///
/// The close lingers: the node stops writing and reads (and drops) what the client sends
/// for up to a second, so the client's request, unread, does not turn the close into a
/// reset that would throw away the 503 before the client reads it.
async fn refuse_http(mut stream: tokio::net::TcpStream, lingering: Arc<tokio::sync::Semaphore>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const FULL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\n\
        content-length: 13\r\nretry-after: 5\r\nconnection: close\r\n\r\nnode is full\n";
    const LINGER: Duration = Duration::from_secs(1);
    const LINGER_BYTES_MAX: usize = 64 * 1024;
    let Ok(_permit) = lingering.try_acquire_owned() else {
        let _ = tokio::time::timeout(LINGER, stream.write_all(FULL)).await;
        return;
    };
    let written = tokio::time::timeout(LINGER, async {
        stream.write_all(FULL).await?;
        stream.shutdown().await
    })
    .await;
    if !matches!(written, Ok(Ok(()))) {
        return;
    }
    let _ = tokio::time::timeout(LINGER, async {
        let mut buffer = [0u8; 4096];
        let mut read = 0;
        while read < LINGER_BYTES_MAX {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => read += n,
            }
        }
    })
    .await;
}

async fn route(
    node: Arc<HttpService>,
    kind: HttpListener,
    slot: Option<SharedSlot>,
    tracker: TaskTracker,
    request: Request<Incoming>,
) -> HttpResponse {
    let path = request.uri().path();
    // With an admin listener, admin and metrics are served only there; clients only here.
    let admin_here = kind == HttpListener::Admin || node.edge.ctx.config.admin_addr.is_none();
    let is_admin_route = path == "/metrics" || path.starts_with("/admin/");
    // The page itself (`/`, `/app/*`) is on both listeners: its operator view reaches the
    // admin API from wherever that is served.
    let is_client_route =
        path == "/ws" || path == "/ws/echo" || path.starts_with("/vm/") || path == "/dev/token";
    if (is_admin_route && !admin_here) || (is_client_route && kind == HttpListener::Admin) {
        return text(StatusCode::NOT_FOUND, "not found\n");
    }
    match (request.method(), path) {
        (&Method::GET, "/healthz") => {
            if node.edge.ctx.shutdown.is_cancelled() {
                text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
            } else {
                text(StatusCode::OK, "ok\n")
            }
        }
        (&Method::GET, "/readyz") => readyz(&node.edge.ctx),
        (&Method::GET, "/metrics") => {
            let mut response = text(StatusCode::OK, node.admin.metrics.render());
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        (&Method::GET, "/" | "/index.html") => web::index(),
        (&Method::GET, path) if path.starts_with("/app/") => web::asset(path),
        (&Method::GET, "/dev/token") => web::dev_token_status(&node.edge),
        (&Method::POST, "/dev/token") => web::dev_token(&node.edge, request).await,
        (&Method::GET, "/ws") => upgrade(node, tracker, slot, request, false),
        (&Method::GET, "/ws/echo") => upgrade(node, tracker, slot, request, true),
        (&Method::GET, path) if path.starts_with("/vm/") => voice_message(&node, &request).await,
        (_, path) if path == "/admin/quiz" || path.starts_with("/admin/quiz/") => {
            routes::route_quiz(&node.admin, request).await
        }
        (_, path) if path.starts_with("/admin/") => {
            routes::route_async(&node.admin, &request).await
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// `GET /vm/<message_id>` (see `voicemail::http`): the bearer token names the user.
async fn voice_message(node: &HttpService, request: &Request<Incoming>) -> HttpResponse {
    let message_id = request.uri().path().trim_start_matches("/vm/");
    let token = request
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let Some(token) = token else {
        let mut response = text(
            StatusCode::UNAUTHORIZED,
            "send the user's token as Authorization: Bearer <token>\n",
        );
        response.headers_mut().insert(
            hyper::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer"),
        );
        return response;
    };
    let now_secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let claims = match node.edge.keys.verify(token.trim(), now_secs) {
        Ok(claims) => claims,
        Err(error) => return text(StatusCode::UNAUTHORIZED, format!("{error}\n")),
    };
    let range = request
        .headers()
        .get(hyper::header::RANGE)
        .and_then(|v| v.to_str().ok());
    crate::server::voicemail::http::serve(&node.edge.voicemail, &claims.sub, message_id, range)
        .await
}

fn upgrade(
    node: Arc<HttpService>,
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
    tracker.spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(error) => {
                tracing::debug!(%error, "upgrade failed");
                return;
            }
        };
        if echo {
            Box::pin(serve_echo(upgraded)).await;
            drop(slot);
            return;
        }
        // Plain TCP: the node writes frames to the socket itself (`sessions::wire`). This
        // path stays inline, the others are boxed: the task is as big as its biggest
        // path, and most connections take this one.
        match upgraded.downcast::<TokioIo<tokio::net::TcpStream>>() {
            Ok(parts) => serve_plain(node, parts, slot).await,
            Err(upgraded) => Box::pin(serve_tls(node, upgraded, slot)).await,
        }
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

/// A plain WebSocket (`ws://`) on its TCP socket, until it closes.
async fn serve_plain(
    node: Arc<HttpService>,
    parts: hyper::upgrade::Parts<TokioIo<tokio::net::TcpStream>>,
    slot: ConnectionSlot,
) {
    let limits = &node.edge.ctx.config.limits;
    let budget = node.edge.read_budget();
    let socket = Arc::new(parts.io.into_inner());
    let wire = Arc::new(Wire::new(
        socket.clone(),
        limits.outgoing_queue_frames_max,
        limits.audio_queue_frames_max,
    ));
    let io = ws::WireIo::new(socket, parts.read_buf, wire.clone());
    let io = BudgetedRead::new(io, budget.clone());
    let config = ws::config(limits.transport_message_bytes_max);
    let stream = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
    let reader = ws::direct(stream, wire.clone(), limits.frame_bytes_max, budget);
    connection::drive(node.edge.clone(), "ws", reader, wire, slot).await;
}

/// A WebSocket over TLS (`wss://`): a writer task feeds the library.
async fn serve_tls(node: Arc<HttpService>, upgraded: Upgraded, slot: ConnectionSlot) {
    let limits = &node.edge.ctx.config.limits;
    let budget = node.edge.read_budget();
    let config = ws::config(limits.transport_message_bytes_max);
    let io = BudgetedRead::new(TokioIo::new(upgraded), budget.clone());
    let socket = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
    let (reader, writer) = ws::split(socket, limits.frame_bytes_max, budget);
    connection::drive(node.edge.clone(), "ws", reader, Queued(writer), slot).await;
}

/// The echo endpoint for the Autobahn conformance cases.
async fn serve_echo(upgraded: Upgraded) {
    let config = ws::config(ECHO_MESSAGE_BYTES_MAX);
    let io = TokioIo::new(upgraded);
    let socket = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
    ws::echo(socket).await;
}
