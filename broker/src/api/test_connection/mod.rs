//! Test Connection (`POST /v1/connections/{id}/test`, `Admin/TestConnection`).
//!
//! Every check that talks to GitLab sends an ordinary request through the
//! front door's code path ([`crate::frontdoor::internal`]): through the
//! agent's tunnel in agent mode (so the agent's proxy, CA and, when it holds
//! one, its own token are what is tested), or the direct client. gitproxy's
//! error codes and GitLab's answers are mapped to the check they fail, with
//! the fix an operator needs as hint. A check whose prerequisite failed, or
//! that does not apply, is `skip`.
//!
//! One file per check group, run in order by [`run`]: [`agent`], [`reach`],
//! [`token`], [`projects`].

use super::error::ApiError;
use super::gitlab;
use crate::config::{Connection, Mode};
use crate::frontdoor::internal::{self, Answer};
use crate::state::AppState;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::response::IntoResponse;
use axum::Json;
use gitproxy_shared::errors::{ErrorCode, GitproxyError};
use gitproxy_shared::gitlab_probe;
use gitproxy_shared::scopes;
use http::{Method, Response};
use serde::Serialize;
use std::sync::Arc;

/// Hint for token problems.
const TOKEN_HINT: &str = "Create a new personal, group or project access token with scopes api, read_repository and write_repository and set it: PUT /v1/connections/{id} {\"token\": \"...\"} (or token/token_file in the config file; or the agent's GITPROXY_GITLAB_TOKEN when the agent holds the token).";

/// One check.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// Name.
    pub name: &'static str,
    /// "pass", "fail" or "skip".
    pub status: &'static str,
    /// What was found.
    pub detail: String,
    /// What to do (failures).
    pub hint: String,
}

/// The result.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// No check failed.
    pub ok: bool,
    /// The checks, in order.
    pub checks: Vec<Check>,
}

fn pass(name: &'static str, detail: impl Into<String>) -> Check {
    Check {
        name,
        status: "pass",
        detail: detail.into(),
        hint: String::new(),
    }
}

fn fail(name: &'static str, detail: impl Into<String>, hint: impl Into<String>) -> Check {
    Check {
        name,
        status: "fail",
        detail: detail.into(),
        hint: hint.into(),
    }
}

fn skip(name: &'static str, detail: impl Into<String>) -> Check {
    Check {
        name,
        status: "skip",
        detail: detail.into(),
        hint: String::new(),
    }
}

const ORDER: [&str; 6] = [
    "agent_connected",
    "gitlab_reachable",
    "tls_trusted",
    "token_valid",
    "token_scopes",
    "projects_found",
];

struct Run {
    checks: Vec<Check>,
}

impl Run {
    fn push(&mut self, c: Check) {
        self.checks.push(c);
    }

    fn failed(&self) -> bool {
        self.checks.iter().any(|c| c.status == "fail")
    }

    /// Every remaining check skipped because of `why`.
    fn skip_rest(mut self, why: &str) -> Report {
        for name in ORDER.iter().skip(self.checks.len()) {
            self.checks.push(skip(name, why));
        }
        self.finish()
    }

    fn finish(self) -> Report {
        let ok = !self.failed();
        Report {
            ok,
            checks: self.checks,
        }
    }
}

/// What a check step returns: `Err(why)` skips every later check because of
/// `why` (its prerequisite failed).
type Step<T> = Result<T, &'static str>;

/// Runs every check for `conn`.
pub async fn run(state: &Arc<AppState>, conn: &Arc<Connection>) -> Report {
    let mut r = Run { checks: Vec::new() };
    match steps(state, conn, &mut r).await {
        Ok(()) => r.finish(),
        Err(why) => r.skip_rest(why),
    }
}

async fn steps(state: &Arc<AppState>, conn: &Connection, r: &mut Run) -> Step<()> {
    let agent_token = agent::check(state, conn, r)?;
    reach::check(state, conn, r).await?;
    let scopes = token::check(state, conn, agent_token, r).await?;
    projects::check(state, conn, scopes, r).await
}

fn reach_detail(e: &GitproxyError) -> String {
    format!("{}: {}", e.error.as_str(), e.message)
}

/// `POST /v1/connections/{id}/test`.
pub async fn handle(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Response<Body> {
    let Some(conn) = state.connections().get(&id) else {
        return ApiError::unknown(&id).into_response();
    };
    let report = run(&state, &conn).await;
    tracing::info!(connection = %id, ok = report.ok, failed = ?report.checks.iter().filter(|c| c.status == "fail").map(|c| c.name).collect::<Vec<_>>(), "test connection");
    Json(report).into_response()
}

mod agent;
mod projects;
mod reach;
mod token;
