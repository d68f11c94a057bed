//! Instance and identity endpoints: `/version`, `/metadata`, `/user`,
//! `/personal_access_tokens/self`.

use axum::body::Body;
use http::{Response, StatusCode};
use serde_json::{json, Value};

use super::auth::{require_scope, AuthError, Caller};
use super::{json_response, route_not_found};
use crate::sandbox::state::User;
use crate::sandbox::version::TokenSelf;
use crate::sandbox::Inner;

/// The revision `/version` names.
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
pub fn version(inner: &Inner, caller: Option<&Caller>) -> Response<Body> {
    if let Err(r) = require_scope(caller, USER_SCOPES) {
        return r;
    }
    json_response(
        StatusCode::OK,
        &json!({"version": inner.version.full(), "revision": REVISION}),
    )
}

/// `GET /metadata`.
pub fn metadata(inner: &Inner, caller: Option<&Caller>) -> Response<Body> {
    if !inner.version.has_metadata() {
        return route_not_found();
    }
    if let Err(r) = require_scope(caller, USER_SCOPES) {
        return r;
    }
    json_response(
        StatusCode::OK,
        &json!({
            "version": inner.version.full(),
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
            ("bot", json!(user.kind.is_bot())),
        ] {
            m.insert(k.into(), val);
        }
    }
    json_response(StatusCode::OK, &v)
}

/// `GET /personal_access_tokens/self` (any scope may call it); see
/// [`crate::sandbox::version`] for what releases before 15.5 answer.
pub fn token_self(inner: &Inner, caller: Option<&Caller>) -> Response<Body> {
    match inner.version.token_self() {
        TokenSelf::Exists => {}
        TokenSelf::NoRoute => return route_not_found(),
        // `current_user.admin? ? not_found! : unauthorized!`: sandbox users are not admins.
        TokenSelf::Unauthorized => return AuthError::Unauthorized.into_response(),
    }
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
