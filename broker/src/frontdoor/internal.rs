//! Requests the broker makes itself (Test Connection, the project catalogue,
//! remediation merge requests), sent through the front door's own code path
//! — policy, in-flight slot, the agent's tunnel or the direct client,
//! credential injection (or the agent's own token), logging, metrics — so
//! they succeed or fail exactly as a cloud application's request would.

use super::serve;
use crate::state::AppState;
use axum::body::Body;
use bytes::Bytes;
use gitproxy_shared::errors::{ErrorCode, GitproxyError};
use http::{HeaderMap, HeaderValue, Method, Request};
use http_body_util::BodyExt;
use std::sync::Arc;
use std::time::Duration;

/// Host name internal requests carry (what `Link` headers are rewritten to).
pub const INTERNAL_HOST: &str = "gitproxy.internal";

/// Largest response body an internal request reads.
pub const MAX_BODY: usize = 32 * 1024 * 1024;

/// GitLab's answer to an internal request.
#[derive(Debug)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// Response headers (`Link` rewritten to the front door).
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
}

impl Answer {
    /// The body as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// Whether the status is 2xx.
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The target (path and query, relative to GitLab) of `Link: rel="next"`.
    pub fn next_target(&self, connection: &str) -> Option<String> {
        let base = format!("http://{INTERNAL_HOST}/gitlab/{connection}");
        for v in self.headers.get_all(http::header::LINK) {
            let Ok(v) = v.to_str() else { continue };
            for part in v.split(',') {
                let mut it = part.split(';');
                let url = it
                    .next()?
                    .trim()
                    .trim_start_matches('<')
                    .trim_end_matches('>');
                if it.any(|p| {
                    let p = p.trim().replace(' ', "");
                    p == "rel=\"next\"" || p == "rel=next"
                }) {
                    if let Some(t) = url.strip_prefix(&base) {
                        return Some(t.to_string());
                    }
                    // Not rewritten (GitLab names itself differently and no
                    // external_url is set): keep its path and query.
                    let u = url::Url::parse(url).ok()?;
                    let mut t = u.path().to_string();
                    if let Some(q) = u.query() {
                        t.push('?');
                        t.push_str(q);
                    }
                    return Some(t);
                }
            }
        }
        None
    }

    /// A short description of GitLab's error body, for messages.
    pub fn error_text(&self) -> String {
        let v = self.json();
        let pick = |k: &str| match v.get(k) {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(other) if !other.is_null() => Some(other.to_string()),
            _ => None,
        };
        pick("error_description")
            .or_else(|| pick("message"))
            .or_else(|| pick("error"))
            .unwrap_or_else(|| {
                String::from_utf8_lossy(&self.body[..self.body.len().min(200)]).into_owned()
            })
    }
}

/// Sends `method target` (path and query relative to GitLab's base URL)
/// through connection `connection`, with an optional JSON body, and reads
/// the whole answer. `Err` is an error made by gitproxy (agent not
/// connected, GitLab unreachable, TLS, proxy, ...) or `rate_limited` when
/// GitLab's 429s outlast the retry budget; GitLab's other errors are an
/// `Ok` answer with their status.
pub async fn call(
    state: &Arc<AppState>,
    connection: &str,
    method: Method,
    target: &str,
    json: Option<&serde_json::Value>,
) -> Result<Answer, GitproxyError> {
    let budget = state.config.gitlab_rate_limit_budget;
    let mut waited = Duration::ZERO;
    loop {
        let a = call_once(state, connection, method.clone(), target, json).await?;
        if a.status != 429 {
            return Ok(a);
        }
        let wait = retry_after(&a.headers);
        if waited + wait > budget {
            let path = target.split('?').next().unwrap_or(target);
            return Err(GitproxyError::new(
                ErrorCode::RateLimited,
                format!(
                    "GitLab answered 429 (rate limited) to {method} {path}{}; it asks to wait {}s, beyond what is left of the broker's {}s budget (waited {}s)",
                    a.headers
                        .get("ratelimit-name")
                        .and_then(|v| v.to_str().ok())
                        .map(|n| format!(" by throttle {n:?}"))
                        .unwrap_or_default(),
                    wait.as_secs(),
                    budget.as_secs(),
                    waited.as_secs()
                ),
            ));
        }
        tracing::info!(connection = %connection, wait_s = wait.as_secs(), "GitLab rate-limits the broker's request (429); retrying after Retry-After");
        tokio::time::sleep(wait).await;
        waited += wait;
    }
}

/// GitLab's `Retry-After` in seconds (at least 1 s; 1 s when absent or not
/// a number, as Rack::Attack always sends seconds).
fn retry_after(h: &HeaderMap) -> Duration {
    let secs = h
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(1)
        .max(1);
    Duration::from_secs(secs)
}

async fn call_once(
    state: &Arc<AppState>,
    connection: &str,
    method: Method,
    target: &str,
    json: Option<&serde_json::Value>,
) -> Result<Answer, GitproxyError> {
    let uri = format!("/gitlab/{connection}{target}");
    let mut b = Request::builder()
        .method(method)
        .uri(&uri)
        .header(http::header::HOST, INTERNAL_HOST)
        .header(
            http::header::USER_AGENT,
            concat!("gitproxy-broker/", env!("CARGO_PKG_VERSION")),
        )
        .header(http::header::ACCEPT, "application/json");
    let body = match json {
        Some(v) => {
            let bytes = serde_json::to_vec(v).unwrap_or_default();
            b = b
                .header(
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                )
                .header(http::header::CONTENT_LENGTH, bytes.len());
            Body::from(bytes)
        }
        None => Body::empty(),
    };
    let req = b
        .body(body)
        .map_err(|e| GitproxyError::new(ErrorCode::BadRequest, format!("bad request: {e}")))?;
    let resp = serve(state, req, true).await?;
    let (parts, body) = resp.into_parts();
    let bytes = http_body_util::Limited::new(body, MAX_BODY)
        .collect()
        .await
        .map_err(|e| match e.downcast::<GitproxyError>() {
            Ok(g) => *g,
            Err(e) => GitproxyError::new(
                ErrorCode::UpstreamUnreachable,
                format!("GitLab's answer could not be read: {e}"),
            ),
        })?
        .to_bytes();
    Ok(Answer {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: bytes,
    })
}

/// Percent-encodes one path segment (`group/name` → `group%2Fname`).
pub fn segment(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC)
        .to_string()
        .replace("%2D", "-")
        .replace("%2E", ".")
        .replace("%5F", "_")
}

/// Percent-encodes a query value.
pub fn query_value(s: &str) -> String {
    segment(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_rewritten_and_raw_links() {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::LINK,
            HeaderValue::from_static(
                "<http://gitproxy.internal/gitlab/acme/api/v4/projects?id_after=5&per_page=100>; rel=\"next\", <http://x/y>; rel=\"first\"",
            ),
        );
        let a = Answer {
            status: 200,
            headers: h,
            body: Bytes::new(),
        };
        assert_eq!(
            a.next_target("acme").as_deref(),
            Some("/api/v4/projects?id_after=5&per_page=100")
        );
        assert_eq!(segment("group/my-app_1.x"), "group%2Fmy-app_1.x");
    }

    #[test]
    fn retry_after_is_seconds_at_least_one() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), Duration::from_secs(1));
        h.insert(http::header::RETRY_AFTER, HeaderValue::from_static("17"));
        assert_eq!(retry_after(&h), Duration::from_secs(17));
        h.insert(http::header::RETRY_AFTER, HeaderValue::from_static("0"));
        assert_eq!(retry_after(&h), Duration::from_secs(1));
        h.insert(
            http::header::RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&h), Duration::from_secs(1));
    }
}
