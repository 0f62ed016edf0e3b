//! The web app, served by every node from files embedded in the binary (`node/web/`):
//! `GET /` is the page, `GET /app/<file>` its modules and style. No build step: the files
//! are standard ES modules, so a fresh clone serves the page after `cargo run`.
//!
//! `POST /dev/token {"user": NAME}` mints a token for NAME, for development only: it is
//! answered only while the node runs with the published development secret (loopback
//! addresses only, see `NodeConfig::check_secrets`); with a real secret it is 404 and the
//! page asks for a token instead. `GET /dev/token` says which (`{"available": bool}`).

use bytes::Bytes;
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Request, StatusCode};

use crate::server::common::http::{json, text, HttpResponse};
use crate::server::edge::service::Edge;
use crate::token::unix_now_secs;

/// The embedded files: name under `/app/`, content, content type.
const FILES: [(&str, &str, &str); 11] = [
    (
        "app.js",
        include_str!("../../web/app.js"),
        "text/javascript; charset=utf-8",
    ),
    (
        "capture-worklet.js",
        include_str!("../../web/capture-worklet.js"),
        "text/javascript; charset=utf-8",
    ),
    (
        "operator.js",
        include_str!("../../web/operator.js"),
        "text/javascript; charset=utf-8",
    ),
    (
        "seal.js",
        include_str!("../../web/seal.js"),
        "text/javascript; charset=utf-8",
    ),
    (
        "shows.js",
        include_str!("../../web/shows.js"),
        "text/javascript; charset=utf-8",
    ),
    (
        "ogg.js",
        include_str!("../../web/ogg.js"),
        "text/javascript; charset=utf-8",
    ),
    (
        "vm.js",
        include_str!("../../web/vm.js"),
        "text/javascript; charset=utf-8",
    ),
    (
        "voice.js",
        include_str!("../../web/voice.js"),
        "text/javascript; charset=utf-8",
    ),
    (
        "client.js",
        include_str!("../../web/client.js"),
        "text/javascript; charset=utf-8",
    ),
    (
        "msgpack.js",
        include_str!("../../web/msgpack.js"),
        "text/javascript; charset=utf-8",
    ),
    (
        "style.css",
        include_str!("../../web/style.css"),
        "text/css; charset=utf-8",
    ),
];

const INDEX: &str = include_str!("../../web/index.html");

/// Lifetime of a development token, seconds.
pub const DEV_TOKEN_TTL_SECS: u64 = 3600;
/// Largest `POST /dev/token` body, bytes.
const DEV_TOKEN_BODY_BYTES_MAX: usize = 1024;
/// Longest user name a development token is minted for, bytes.
const DEV_USER_BYTES_MAX: usize = 64;

/// What the page may load: itself, and WebSocket connections to this node.
const CSP: &str = "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; \
                   media-src 'self' blob:; style-src 'self'; script-src 'self'; \
                   object-src 'none'; base-uri 'none'; frame-ancestors 'none'";

fn with_headers(mut response: HttpResponse, content_type: &'static str) -> HttpResponse {
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    // Small files that change with the binary: revalidate every time.
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    headers.insert("content-security-policy", HeaderValue::from_static(CSP));
    headers.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    response
}

/// `GET /` and `GET /index.html`.
pub(crate) fn index() -> HttpResponse {
    with_headers(
        text(StatusCode::OK, Bytes::from_static(INDEX.as_bytes())),
        "text/html; charset=utf-8",
    )
}

/// `GET /app/<file>`.
pub(crate) fn asset(path: &str) -> HttpResponse {
    let name = path.trim_start_matches("/app/");
    match FILES.iter().find(|(file, _, _)| *file == name) {
        Some((_, body, content_type)) => with_headers(
            text(StatusCode::OK, Bytes::from_static(body.as_bytes())),
            content_type,
        ),
        None => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Whether this node mints development tokens (it runs with the development secret).
fn dev_tokens(edge: &Edge) -> bool {
    edge.ctx.config.effective_secret().1
}

/// `GET /dev/token`: whether development sign-in is offered.
pub(crate) fn dev_token_status(edge: &Edge) -> HttpResponse {
    json(
        StatusCode::OK,
        &serde_json::json!({ "available": dev_tokens(edge) }),
    )
}

/// `POST /dev/token {"user": NAME}`: a token for NAME, in development only.
pub(crate) async fn dev_token(edge: &Edge, request: Request<Incoming>) -> HttpResponse {
    if !dev_tokens(edge) {
        return json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({
                "error": "development tokens are off: this node has a real secret; sign in with a token"
            }),
        );
    }
    let refuse = |why: String| {
        json(
            StatusCode::BAD_REQUEST,
            &serde_json::json!({ "error": why }),
        )
    };
    let body = match http_body_util::Limited::new(request.into_body(), DEV_TOKEN_BODY_BYTES_MAX)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(_) => return refuse(format!("send at most {DEV_TOKEN_BODY_BYTES_MAX} bytes")),
    };
    let user = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["user"].as_str().map(str::to_string));
    let Some(user) = user else {
        return refuse("send {\"user\": \"NAME\"}".into());
    };
    let valid = !user.is_empty()
        && user.len() <= DEV_USER_BYTES_MAX
        && user
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if !valid {
        return refuse(format!(
            "a name is 1 to {DEV_USER_BYTES_MAX} letters, digits, '_', '.' or '-'"
        ));
    }
    match edge
        .keys
        .mint(&user, &[], unix_now_secs(), DEV_TOKEN_TTL_SECS)
    {
        Ok(token) => json(
            StatusCode::OK,
            &serde_json::json!({
                "token": token,
                "user": user,
                "development": true,
                "expires_in_secs": DEV_TOKEN_TTL_SECS,
            }),
        ),
        Err(error) => json(
            StatusCode::INTERNAL_SERVER_ERROR,
            &serde_json::json!({ "error": error.to_string() }),
        ),
    }
}
