//! gitproxy's own answers: status, `X-Gitproxy-Error`, `Retry-After` and the
//! JSON body `{"error", "message", "hint"}`.

use axum::body::Body;
use gitproxy_shared::errors::GitproxyError;
use http::{HeaderValue, Response, StatusCode};

/// The response for an error made by gitproxy.
pub fn error_response(e: &GitproxyError) -> Response<Body> {
    let mut r = Response::new(Body::from(e.to_json()));
    *r.status_mut() =
        StatusCode::from_u16(e.error.http_status()).unwrap_or(StatusCode::BAD_GATEWAY);
    let h = r.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(
        "x-gitproxy-error",
        HeaderValue::from_static(e.error.as_str()),
    );
    if let Some(s) = e.error.retry_after_secs() {
        h.insert(http::header::RETRY_AFTER, HeaderValue::from(s));
    }
    r
}
