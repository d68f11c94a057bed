//! Errors of the connection API: the same shape as the front door's
//! (`X-Gitproxy-Error` header, `{"error", "message", "hint"}`), with a few
//! codes of its own:
//!
//! | code | status | when |
//! |---|---|---|
//! | `invalid_request` | 400 | the body or the id is unusable; `message` says why |
//! | `persistence_disabled` | 409 | a connection write without `--data-dir` |
//! | `not_agent_mode` | 409 | an accessKey asked for a direct-mode connection |
//! | `gitlab_error` | 502 | GitLab refused a step of an operation (status and GitLab's message in `message`) |
//! | `storage_error` | 500 | the data directory could not be written |
//! | `project_archived` | 409 | merge request on an archived (read-only) project |
//! | `empty_repository` | 409 | merge request on a project without commits |
//! | `branch_protected` | 409 | merge request whose `source_branch` is protected against the token's user |
//! | `merge_request_refused` | 422 | GitLab refused the merge request itself (e.g. a branch deleted meanwhile) |

use axum::body::Body;
use axum::response::IntoResponse;
use gitproxy_shared::errors::{ErrorCode, GitproxyError};
use http::{HeaderValue, Response, StatusCode};

/// An error answer of the API.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Code (a gitproxy error code or one of this module's).
    pub code: String,
    /// What happened.
    pub message: String,
    /// What to do.
    pub hint: String,
}

impl ApiError {
    /// A new error.
    pub fn new(
        status: u16,
        code: &str,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) -> Self {
        ApiError {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            code: code.to_string(),
            message: message.into(),
            hint: hint.into(),
        }
    }

    /// `invalid_request`.
    pub fn invalid(message: impl Into<String>) -> Self {
        ApiError::new(
            400,
            "invalid_request",
            message,
            "Fix the request as the message says.",
        )
    }

    /// `unknown_connection`.
    pub fn unknown(id: &str) -> Self {
        GitproxyError::new(
            gitproxy_shared::errors::ErrorCode::UnknownConnection,
            format!("no connection named {id:?}"),
        )
        .into()
    }

    /// `gitlab_error`: GitLab answered `status` to step `what`.
    pub fn gitlab(what: &str, status: u16, text: &str) -> Self {
        ApiError::new(
            502,
            "gitlab_error",
            format!("GitLab answered {status} to {what}: {text}"),
            "Check the token's scopes and its user's role on the project (Developer or above), or run Test Connection.",
        )
    }
}

impl From<GitproxyError> for ApiError {
    fn from(e: GitproxyError) -> Self {
        ApiError::new(e.error.http_status(), e.error.as_str(), e.message, e.hint)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response<Body> {
        let body =
            serde_json::json!({"error": self.code, "message": self.message, "hint": self.hint});
        let mut r = Response::new(Body::from(body.to_string()));
        *r.status_mut() = self.status;
        let h = r.headers_mut();
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Ok(v) = HeaderValue::from_str(&self.code) {
            h.insert("x-gitproxy-error", v);
        }
        // The API's own codes parse as `Internal`, which has no Retry-After.
        if let Some(s) = ErrorCode::parse(&self.code).retry_after_secs() {
            h.insert(http::header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}
