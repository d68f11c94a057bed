//! Instance and identity endpoints: `/version`, `/metadata`, `/user`,
//! `/personal_access_tokens/self`.

use axum::body::Body;
use http::{Response, StatusCode};
use serde_json::{json, Value};

use super::auth::{require_scope, AuthError, Caller};
use super::json_response;
use crate::sandbox::state::User;
use crate::sandbox::Inner;

/// The GitLab version the sandbox claims to be.
pub const VERSION: &str = "17.5.0-ee";
/// The matching revision.
pub const REVISION: &str = "5a1b2c3d4e5";

const USER_SCOPES: &[&str] = &["api", "read_api", "read_user"];

/// The public part of a user (`UserBasic`).
pub fn user_basic(inner: &Inner, user: &User) -> Value {
    json!({
        "id": user.id,
        "username": user.username,
        "name": user.name,
        "state": "active",
        "locked": false,
        "avatar_url": format!("https://www.gravatar.com/avatar/{:x}?s=80&d=identicon", user.id),
        "web_url": format!("{}/{}", inner.external_url, user.username),
    })
}

/// `GET /version`.
pub fn version(caller: Option<&Caller>) -> Response<Body> {
    if let Err(r) = require_scope(caller, USER_SCOPES) {
        return r;
    }
    json_response(
        StatusCode::OK,
        &json!({"version": VERSION, "revision": REVISION}),
    )
}

/// `GET /metadata`.
pub fn metadata(caller: Option<&Caller>) -> Response<Body> {
    if let Err(r) = require_scope(caller, USER_SCOPES) {
        return r;
    }
    json_response(
        StatusCode::OK,
        &json!({
            "version": VERSION,
            "revision": REVISION,
            "kas": {
                "enabled": false,
                "externalUrl": null,
                "externalK8sProxyUrl": null,
                "version": null
            },
            "enterprise": true
        }),
    )
}

/// `GET /user`.
pub fn user(inner: &Inner, caller: Option<&Caller>) -> Response<Body> {
    let c = match require_scope(caller, USER_SCOPES) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let Some(user) = inner.lock().user(c.user_id).cloned() else {
        return AuthError::Unauthorized.into_response();
    };
    let mut v = user_basic(inner, &user);
    if let Value::Object(m) = &mut v {
        for (k, val) in [
            ("created_at", json!(user.created_at)),
            ("bio", json!("")),
            ("location", json!("")),
            ("public_email", Value::Null),
            ("email", json!(format!("{}@sandbox.invalid", user.username))),
            (
                "commit_email",
                json!(format!("{}@sandbox.invalid", user.username)),
            ),
            ("is_admin", json!(false)),
            ("can_create_group", json!(true)),
            ("can_create_project", json!(true)),
            ("two_factor_enabled", json!(false)),
            ("external", json!(false)),
            ("private_profile", json!(false)),
            ("bot", json!(false)),
        ] {
            m.insert(k.into(), val);
        }
    }
    json_response(StatusCode::OK, &v)
}

/// `GET /personal_access_tokens/self` (any scope may call it).
pub fn token_self(caller: Option<&Caller>) -> Response<Body> {
    let Some(c) = caller else {
        return AuthError::Unauthorized.into_response();
    };
    let t = &c.token;
    json_response(
        StatusCode::OK,
        &json!({
            "id": t.id,
            "name": t.name,
            "revoked": t.revoked,
            "created_at": t.created_at,
            "description": null,
            "scopes": t.scopes,
            "user_id": t.user_id,
            "last_used_at": t.last_used_at,
            "active": t.active && !t.revoked,
            "expires_at": t.expires_at,
        }),
    )
}
