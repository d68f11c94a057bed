//! The `/api/v4` REST surface: request parsing (path segments, query, JSON or form
//! bodies), GitLab-shaped responses and the route table.

// Handlers short-circuit with a ready `Response` as their error value; it is the
// common path here, not an exceptional one, so boxing it would only add noise.
#![allow(clippy::result_large_err)]

mod auth;
mod merge_requests;
mod meta;
mod pagination;
mod projects;
mod repository;

use axum::body::Body;
use http::{HeaderValue, Method, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use percent_encoding::percent_decode_str;
use serde_json::{json, Map, Value};

use super::Inner;
pub use auth::{api_credential, authenticate, basic_credential, AuthError, Caller};

/// Largest request body the API accepts (commits API payloads).
const MAX_BODY: usize = 64 * 1024 * 1024;

/// One parsed API request.
pub struct ApiRequest {
    pub method: Method,
    /// Decoded path segments after `/api/v4/`.
    pub segments: Vec<String>,
    /// Decoded query pairs in request order.
    pub query: Vec<(String, String)>,
    /// Path as requested (still percent-encoded), for `Link` URLs.
    pub raw_path: String,
    /// Query and body parameters merged (body wins).
    pub params: Map<String, Value>,
}

impl ApiRequest {
    /// A parameter as a string (numbers and booleans stringified).
    pub fn param(&self, name: &str) -> Option<String> {
        match self.params.get(name)? {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => None,
        }
    }

    /// A boolean parameter (`true`/`1`/`yes`).
    pub fn flag(&self, name: &str) -> bool {
        matches!(
            self.param(name).as_deref(),
            Some("true") | Some("1") | Some("yes") | Some("t")
        )
    }

    /// Grape's 400 for missing required parameters: `{"error":"a is missing, b is missing"}`.
    pub fn require(&self, names: &[&str]) -> Result<Vec<String>, Box<Response<Body>>> {
        let mut missing = Vec::new();
        let mut values = Vec::new();
        for n in names {
            match self.param(n).filter(|v| !v.is_empty()) {
                Some(v) => values.push(v),
                None => missing.push(format!("{n} is missing")),
            }
        }
        if missing.is_empty() {
            Ok(values)
        } else {
            Err(Box::new(error(
                StatusCode::BAD_REQUEST,
                &missing.join(", "),
            )))
        }
    }
}

/// A JSON response.
pub fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
    let mut resp = Response::new(Body::from(body.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp.headers_mut()
        .insert("cache-control", HeaderValue::from_static("no-cache"));
    resp.headers_mut().insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    resp
}

/// GitLab's `render_api_error!`: `{"message": ...}`.
pub fn message(status: StatusCode, msg: impl Into<Value>) -> Response<Body> {
    json_response(status, &json!({ "message": msg.into() }))
}

/// Grape's `error!`: `{"error": ...}`.
pub fn error(status: StatusCode, msg: &str) -> Response<Body> {
    json_response(status, &json!({ "error": msg }))
}

/// The catch-all of GitLab's API: `{"error":"404 Not Found"}`.
pub fn route_not_found() -> Response<Body> {
    error(StatusCode::NOT_FOUND, "404 Not Found")
}

/// `{"message":"403 Forbidden"}`.
pub fn forbidden() -> Response<Body> {
    message(StatusCode::FORBIDDEN, "403 Forbidden")
}

fn decode(s: &str) -> String {
    percent_decode_str(s).decode_utf8_lossy().into_owned()
}

fn decode_form(s: &str) -> String {
    decode(&s.replace('+', " "))
}

/// Parses a query string into decoded pairs.
pub fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (decode_form(k), decode_form(v)),
            None => (decode_form(p), String::new()),
        })
        .collect()
}

async fn read_params(
    req: http::Request<Incoming>,
    query: &[(String, String)],
) -> Result<Map<String, Value>, Response<Body>> {
    let (parts, body) = req.into_parts();
    let mut params = Map::new();
    for (k, v) in query {
        params.insert(k.clone(), Value::String(v.clone()));
    }
    if parts.method == Method::GET || parts.method == Method::HEAD {
        return Ok(params);
    }
    let limited = http_body_util::Limited::new(body, MAX_BODY);
    let bytes = match limited.collect().await {
        Ok(c) => c.to_bytes(),
        Err(_) => {
            return Err(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "413 Request Entity Too Large",
            ))
        }
    };
    let ctype = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    if bytes.is_empty() {
        return Ok(params);
    }
    if ctype.starts_with("application/json") {
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Object(m)) => params.extend(m),
            Ok(_) => {}
            Err(_) => return Err(error(StatusCode::BAD_REQUEST, "400 Bad Request")),
        }
    } else {
        // application/x-www-form-urlencoded (curl --data, python-gitlab files=None)
        for (k, v) in parse_query(&String::from_utf8_lossy(&bytes)) {
            params.insert(k, Value::String(v));
        }
    }
    Ok(params)
}

/// Serves one `/api/v4/...` request. `credential` was already extracted and recorded.
pub async fn serve(
    inner: &Inner,
    req: http::Request<Incoming>,
    credential: Option<String>,
) -> Response<Body> {
    let method = req.method().clone();
    let raw_path = req.uri().path().to_string();
    let query = parse_query(req.uri().query().unwrap_or(""));
    let segments: Vec<String> = raw_path
        .trim_start_matches("/api/v4")
        .split('/')
        .filter(|s| !s.is_empty())
        .map(decode)
        .collect();
    let params = match read_params(req, &query).await {
        Ok(x) => x,
        Err(resp) => return resp,
    };
    let api = ApiRequest {
        method,
        segments,
        query,
        raw_path,
        params,
    };
    // Unknown routes are 404 without auth; on known ones a presented credential must be valid.
    let caller = match credential {
        None => None,
        Some(tok) => match auth::authenticate(inner, &tok) {
            Ok(c) => Some(c),
            Err(_) if !known_route(inner, &api) => return route_not_found(),
            Err(e) => return e.into_response(),
        },
    };
    route(inner, &api, caller.as_ref()).await
}

/// Whether a request matches a route of the table below (any method).
fn known_route(inner: &Inner, req: &ApiRequest) -> bool {
    let segs: Vec<&str> = req.segments.iter().map(String::as_str).collect();
    if segs == ["personal_access_tokens", "self"]
        && inner.version.token_self() == super::version::TokenSelf::NoRoute
    {
        return false;
    }
    matches!(
        segs.as_slice(),
        ["version"]
            | ["metadata"]
            | ["user"]
            | ["personal_access_tokens", "self"]
            | ["projects"]
            | ["projects", _]
            | ["projects", _, "repository", "files", _]
            | ["projects", _, "repository", "files", _, "raw"]
            | ["projects", _, "repository", "branches"]
            | ["projects", _, "repository", "branches", _]
            | ["projects", _, "repository", "commits"]
            | ["projects", _, "repository", "commits", _]
            | ["projects", _, "merge_requests"]
            | ["projects", _, "merge_requests", _]
    )
}

async fn route(inner: &Inner, req: &ApiRequest, caller: Option<&Caller>) -> Response<Body> {
    let segs: Vec<&str> = req.segments.iter().map(String::as_str).collect();
    let m = &req.method;
    let get = *m == Method::GET || *m == Method::HEAD;
    let post = *m == Method::POST;
    match segs.as_slice() {
        ["version"] if get => meta::version(inner, caller),
        ["metadata"] if get => meta::metadata(inner, caller),
        ["user"] if get => meta::user(inner, caller),
        ["personal_access_tokens", "self"] if get => meta::token_self(inner, caller),
        ["projects"] if get => projects::list(inner, req, caller),
        ["projects", id] if get => projects::get(inner, id, caller),
        ["projects", id, "repository", "files", path] if get => {
            repository::file(inner, req, id, path, caller, false).await
        }
        ["projects", id, "repository", "files", path, "raw"] if get => {
            repository::file(inner, req, id, path, caller, true).await
        }
        ["projects", id, "repository", "branches"] if get => {
            repository::list_branches(inner, req, id, caller).await
        }
        ["projects", id, "repository", "branches"] if post => {
            repository::create_branch(inner, req, id, caller).await
        }
        ["projects", id, "repository", "branches", name] if get => {
            repository::get_branch(inner, id, name, caller).await
        }
        ["projects", id, "repository", "commits"] if post => {
            repository::create_commit(inner, req, id, caller).await
        }
        ["projects", id, "repository", "commits", sha] if get => {
            repository::get_commit(inner, id, sha, caller).await
        }
        ["projects", id, "merge_requests"] if get => merge_requests::list(inner, req, id, caller),
        ["projects", id, "merge_requests"] if post => {
            merge_requests::create(inner, req, id, caller).await
        }
        ["projects", id, "merge_requests", iid] if get => {
            merge_requests::get(inner, id, iid, caller)
        }
        ["projects", id, "merge_requests", iid] if *m == Method::PUT => {
            merge_requests::update(inner, req, id, iid, caller)
        }
        _ => route_not_found(),
    }
}
