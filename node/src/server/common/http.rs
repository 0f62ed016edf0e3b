//! HTTP responses the node's listeners build.

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};

/// A response with a whole body.
pub type HttpResponse = Response<Full<Bytes>>;

/// A response of `status` with `body`.
pub fn text(status: StatusCode, body: impl Into<Bytes>) -> HttpResponse {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
}

/// A JSON response with its content type.
pub fn json(status: StatusCode, value: &serde_json::Value) -> HttpResponse {
    let mut response = text(status, Bytes::from(value.to_string()));
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}
