//! Credentials and token validation as GitLab's `AuthFinders` / `APIGuard` do it:
//! where a token may be presented, the order of checks (expired, revoked, scope),
//! and the exact error bodies.

use axum::body::Body;
use base64::Engine;
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use serde_json::json;

use super::{json_response, message};
use crate::sandbox::groups;
use crate::sandbox::state::{access, Project, State, Token};
use crate::sandbox::{clock, Inner};

/// An authenticated caller: the user and the token used.
#[derive(Debug, Clone)]
pub struct Caller {
    pub user_id: u64,
    pub username: String,
    pub token: Token,
}

impl Caller {
    /// Whether the token carries any of `scopes`.
    pub fn has_any_scope(&self, scopes: &[&str]) -> bool {
        self.token
            .scopes
            .iter()
            .any(|s| scopes.contains(&s.as_str()))
    }
}

/// Why authentication or authorization failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    /// No or unknown token.
    Unauthorized,
    Expired,
    Revoked,
    /// The endpoint needs one of these scopes (space separated).
    InsufficientScope(String),
}

fn bearer_challenge(error: &str, description: &str, scope: Option<&str>) -> HeaderValue {
    let mut v = format!(
        "Bearer realm=\"Protected by OAuth 2.0\", error=\"{error}\", error_description=\"{description}\""
    );
    if let Some(s) = scope {
        v.push_str(&format!(", scope=\"{s}\""));
    }
    HeaderValue::from_str(&v).unwrap_or_else(|_| HeaderValue::from_static("Bearer"))
}

impl AuthError {
    /// The response GitLab's API sends for this failure.
    pub fn into_response(self) -> Response<Body> {
        match self {
            AuthError::Unauthorized => message(StatusCode::UNAUTHORIZED, "401 Unauthorized"),
            AuthError::Expired => {
                let d = "Token has expired.";
                let mut r = json_response(
                    StatusCode::UNAUTHORIZED,
                    &json!({"error": "invalid_token", "error_description": d}),
                );
                r.headers_mut().insert(
                    http::header::WWW_AUTHENTICATE,
                    bearer_challenge("invalid_token", d, None),
                );
                r
            }
            AuthError::Revoked => {
                let d = "Token was revoked. You have to re-authorize from the user.";
                let mut r = json_response(
                    StatusCode::UNAUTHORIZED,
                    &json!({"error": "invalid_token", "error_description": d}),
                );
                r.headers_mut().insert(
                    http::header::WWW_AUTHENTICATE,
                    bearer_challenge("invalid_token", d, None),
                );
                r
            }
            AuthError::InsufficientScope(scope) => {
                let d = "The request requires higher privileges than provided by the access token.";
                let mut r = json_response(
                    StatusCode::FORBIDDEN,
                    &json!({"error": "insufficient_scope", "error_description": d, "scope": scope}),
                );
                r.headers_mut().insert(
                    http::header::WWW_AUTHENTICATE,
                    bearer_challenge("insufficient_scope", d, Some(&scope)),
                );
                r
            }
        }
    }
}

/// The API credential of a request: `PRIVATE-TOKEN`, `Authorization: Bearer`, or the
/// `private_token` / `access_token` query parameters.
pub fn api_credential(headers: &HeaderMap, query: &[(String, String)]) -> Option<String> {
    if let Some(v) = headers.get("private-token").and_then(|v| v.to_str().ok()) {
        return Some(v.trim().to_string());
    }
    if let Some(v) = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let mut it = v.trim().splitn(2, ' ');
        if let (Some(kind), Some(tok)) = (it.next(), it.next()) {
            if kind.eq_ignore_ascii_case("bearer") {
                return Some(tok.trim().to_string());
            }
        }
    }
    query
        .iter()
        .find(|(k, _)| k == "private_token" || k == "access_token")
        .map(|(_, v)| v.clone())
}

/// HTTP Basic credentials `(username, password)`.
pub fn basic_credential(headers: &HeaderMap) -> Option<(String, String)> {
    let v = headers
        .get(http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .trim();
    let (kind, b64) = v.split_once(' ')?;
    if !kind.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let s = String::from_utf8(raw).ok()?;
    let (u, p) = s.split_once(':')?;
    Some((u.to_string(), p.to_string()))
}

/// Validates `token`: known, not expired, not revoked, active (in GitLab's order).
pub fn authenticate(inner: &Inner, token: &str) -> Result<Caller, AuthError> {
    let mut st = inner.lock();
    let today = clock::today();
    let tok = st.token(token).cloned().ok_or(AuthError::Unauthorized)?;
    if tok
        .expires_at
        .as_deref()
        .is_some_and(|e| e <= today.as_str())
    {
        return Err(AuthError::Expired);
    }
    if tok.revoked {
        return Err(AuthError::Revoked);
    }
    if !tok.active {
        return Err(AuthError::Unauthorized);
    }
    let username = st
        .user(tok.user_id)
        .map(|u| u.username.clone())
        .ok_or(AuthError::Unauthorized)?;
    if let Some(t) = st.token_mut(token) {
        t.last_used_at = Some(clock::now_iso());
    }
    Ok(Caller {
        user_id: tok.user_id,
        username,
        token: tok,
    })
}

/// Requires an authenticated caller holding one of `scopes`.
pub fn require_scope<'a>(
    caller: Option<&'a Caller>,
    scopes: &[&str],
) -> Result<&'a Caller, Response<Body>> {
    let c = caller.ok_or_else(|| AuthError::Unauthorized.into_response())?;
    if c.has_any_scope(scopes) {
        Ok(c)
    } else {
        Err(AuthError::InsufficientScope(scopes.join(" ")).into_response())
    }
}

/// Scopes that allow an API call: `api` always, `read_api` for reads.
pub fn api_scopes(write: bool) -> &'static [&'static str] {
    if write {
        &["api"]
    } else {
        &["api", "read_api"]
    }
}

/// The caller's effective access level on `project` over every route (0 when none).
pub fn level(st: &State, project: &Project, caller: Option<&Caller>) -> u32 {
    caller
        .map(|c| groups::project_access(st, project, c.user_id))
        .unwrap_or(0)
}

/// Whether the level may read code/MRs of a private project.
pub fn can_read_code(level: u32) -> bool {
    level >= access::REPORTER
}

/// Whether the level may push/create branches/MRs.
pub fn can_write(level: u32) -> bool {
    level >= access::DEVELOPER
}
