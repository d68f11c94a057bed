//! Test Connection (`POST /v1/connections/{id}/test`, `Admin/TestConnection`).
//!
//! Every check that talks to GitLab sends an ordinary request through the
//! front door's code path ([`crate::frontdoor::internal`]): through the
//! agent's tunnel in agent mode (so the agent's proxy, CA and, when it holds
//! one, its own token are what is tested), or the direct client. gitproxy's
//! error codes and GitLab's answers are mapped to the check they fail, with
//! the fix an operator needs as hint. A check whose prerequisite failed, or
//! that does not apply, is `skip`.

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

/// Why a token was refused, from GitLab's 401 body.
fn token_refusal(a: &Answer) -> String {
    let text = a.error_text();
    let low = text.to_ascii_lowercase();
    if low.contains("expired") {
        format!("the token has expired (GitLab: {text})")
    } else if low.contains("revoked") {
        format!("the token was revoked (GitLab: {text})")
    } else {
        format!(
            "GitLab does not accept the token: it is unknown, deleted or inactive (GitLab: {text})"
        )
    }
}

/// Runs every check for `conn`.
pub async fn run(state: &Arc<AppState>, conn: &Arc<Connection>) -> Report {
    let id = conn.id.as_str();
    let mut r = Run { checks: Vec::new() };
    // 1. agent_connected
    let mut agent_token = false;
    match conn.mode {
        Mode::Direct => r.push(skip(
            "agent_connected",
            "direct mode: the broker calls GitLab itself",
        )),
        Mode::Agent => match state.registry.pick(id) {
            Some(s) => {
                agent_token = s.holds_token;
                let n = state
                    .registry
                    .sessions(id)
                    .iter()
                    .filter(|s| !s.is_closed())
                    .count();
                r.push(pass(
                    "agent_connected",
                    format!(
                        "{n} agent stream(s) connected; this test goes through {} (version {}){}",
                        s.instance,
                        s.version,
                        if s.holds_token {
                            ", which holds its own GitLab token"
                        } else {
                            ""
                        }
                    ),
                ));
            }
            None => {
                let hint = if conn.access_key_sha256.is_none() {
                    format!("Issue an accessKey (POST /v1/connections/{id}/access-key) and deploy the agent with it (Helm value accessKey).")
                } else {
                    "Start the agent (Helm chart) with this connection's accessKey and check its logs: it must reach the broker's agent listener (through the corporate proxy if there is one).".to_string()
                };
                r.push(fail(
                    "agent_connected",
                    format!("no agent is connected for connection {id}"),
                    hint,
                ));
                return r.skip_rest("needs a connected agent");
            }
        },
    }

    // 2. gitlab_reachable, 3. tls_trusted
    let https = conn.gitlab_url.scheme() == "https";
    let version = internal::call(state, id, Method::GET, "/api/v4/version", None).await;
    match &version {
        Ok(a) if !gitlab_probe::is_gitlab_version_answer(a.status, &a.body) => {
            r.push(fail(
                "gitlab_reachable",
                format!(
                    "{} answered {}",
                    conn.gitlab_url,
                    gitlab_probe::describe(a.status, &a.body)
                ),
                gitlab_probe::NOT_GITLAB_HINT,
            ));
            return r.skip_rest("needs GitLab to be reachable");
        }
        Ok(a) => {
            let detail = match gitlab::read::<gitlab::Version>(a, "GET /version") {
                Ok(v) => format!("GitLab {} answered at {}", v.version, conn.gitlab_url),
                Err(_) => format!("GitLab answered {} at {}", a.status, conn.gitlab_url),
            };
            r.push(pass("gitlab_reachable", detail));
            r.push(if https {
                pass("tls_trusted", "GitLab's certificate is trusted")
            } else {
                skip("tls_trusted", "GitLab is reached over http://")
            });
        }
        Err(e) if e.error == ErrorCode::UpstreamTls => {
            r.push(pass(
                "gitlab_reachable",
                "GitLab's host answered (the TLS handshake failed: see tls_trusted)",
            ));
            r.push(fail("tls_trusted", e.message.clone(), e.hint.clone()));
            return r.skip_rest("needs a trusted TLS connection to GitLab");
        }
        Err(e) => {
            r.push(fail("gitlab_reachable", reach_detail(e), e.hint.clone()));
            return r.skip_rest("needs GitLab to be reachable");
        }
    }

    // 4. token_valid
    if conn.token.is_none() && !agent_token {
        r.push(fail(
            "token_valid",
            "no GitLab token is configured for this connection (and the agent holds none)",
            TOKEN_HINT.replace("{id}", id),
        ));
        return r.skip_rest("needs a valid token");
    }
    let me = internal::call(
        state,
        id,
        Method::GET,
        "/api/v4/personal_access_tokens/self",
        None,
    )
    .await;
    let me = match me {
        Err(e) => {
            r.push(fail("token_valid", reach_detail(&e), e.hint.clone()));
            return r.skip_rest("needs a valid token");
        }
        Ok(a) => a,
    };
    let mut scopes: Option<Vec<String>> = None;
    match me.status {
        200 => {
            let t = match gitlab::read::<gitlab::TokenSelf>(&me, "GET /personal_access_tokens/self")
            {
                Ok(t) => t,
                Err(e) => {
                    r.push(fail("token_valid", e.to_string(), gitlab::NOT_API_HINT));
                    return r.skip_rest("needs a valid token");
                }
            };
            if t.revoked || !t.active {
                r.push(fail(
                    "token_valid",
                    format!(
                        "the token is {}",
                        if t.revoked { "revoked" } else { "inactive" }
                    ),
                    TOKEN_HINT.replace("{id}", id),
                ));
                return r.skip_rest("needs a valid token");
            }
            let expires = t
                .expires_at
                .map(|d| format!(", expires {d}"))
                .unwrap_or_else(|| ", never expires".into());
            r.push(pass(
                "token_valid",
                format!("token {:?} is active{expires}", t.name),
            ));
            scopes = Some(t.scopes);
        }
        // GitLab before 15.5 has no /personal_access_tokens/self: 14.x answers
        // 404, 15.1–15.4 route "self" to /personal_access_tokens/:id and answer
        // a non-administrator 401 although the token is good. /user decides.
        401 | 404 => match internal::call(state, id, Method::GET, "/api/v4/user", None).await {
            Ok(a) if a.ok() => {
                let who = gitlab::read::<gitlab::User>(&a, "GET /user")
                    .map(|u| format!(" (user {})", u.username))
                    .unwrap_or_default();
                r.push(pass(
                        "token_valid",
                        format!("GitLab accepts the token{who}; this GitLab has no /personal_access_tokens/self (before 15.5), so its expiry and scopes cannot be read"),
                    ))
            }
            Ok(a) if a.status == 401 => {
                r.push(fail(
                    "token_valid",
                    token_refusal(&a),
                    TOKEN_HINT.replace("{id}", id),
                ));
                return r.skip_rest("needs a valid token");
            }
            Ok(a) => {
                r.push(fail(
                    "token_valid",
                    format!(
                        "GitLab answered {} to GET /user: {}",
                        a.status,
                        a.error_text()
                    ),
                    TOKEN_HINT.replace("{id}", id),
                ));
                return r.skip_rest("needs a valid token");
            }
            Err(e) => {
                r.push(fail("token_valid", reach_detail(&e), e.hint.clone()));
                return r.skip_rest("needs a valid token");
            }
        },
        s => {
            r.push(fail(
                "token_valid",
                format!(
                    "GitLab answered {s} to GET /personal_access_tokens/self: {}",
                    me.error_text()
                ),
                TOKEN_HINT.replace("{id}", id),
            ));
            return r.skip_rest("needs a valid token");
        }
    }

    // 5. token_scopes (read from the token, or established by capability),
    // 6. projects_found.
    let can_list = scopes
        .as_ref()
        .is_none_or(|have| have.iter().any(|h| h == "api" || h == "read_api"));
    let projects = if can_list {
        Some(
            internal::call(
                state,
                id,
                Method::GET,
                "/api/v4/projects?membership=true&min_access_level=30&archived=false&per_page=1&simple=true",
                None,
            )
            .await,
        )
    } else {
        None
    };
    let listed = match &projects {
        Some(Ok(a)) if a.ok() => Some(gitlab::read::<Vec<gitlab::Project>>(a, "GET /projects")),
        _ => None,
    };
    let first_project = match &listed {
        Some(Ok(list)) => list.first().map(|p| p.path_with_namespace.clone()),
        _ => None,
    };
    match &scopes {
        Some(have) => {
            let v = scopes::judge(have);
            if v.ok {
                let detail = if v.note.is_empty() {
                    v.detail
                } else {
                    format!("{}; {}", v.detail, v.note)
                };
                r.push(pass("token_scopes", detail));
            } else {
                r.push(fail(
                    "token_scopes",
                    v.detail,
                    format!("{} (PUT /v1/connections/{id} {{\"token\": \"...\"}})", v.note),
                ));
            }
        }
        None => match &first_project {
            None => r.push(skip(
                "token_scopes",
                "this GitLab does not show a token's scopes, and there is no project to try git access on (see projects_found)",
            )),
            Some(pwn) => match git_capability(state, id, pwn).await {
                Ok(c) => r.push(c),
                Err(e) => {
                    r.push(fail("token_scopes", reach_detail(&e), e.hint.clone()));
                    return r.skip_rest("needs GitLab to answer");
                }
            },
        },
    }

    if !can_list {
        r.push(skip(
            "projects_found",
            "the token cannot read the API (needs scope api or read_api)",
        ));
        return r.finish();
    }
    match projects {
        Some(Ok(a)) if a.ok() => {
            let n = match &listed {
                Some(Ok(list)) => list.len(),
                Some(Err(e)) => {
                    r.push(fail("projects_found", e.to_string(), gitlab::NOT_API_HINT));
                    return r.finish();
                }
                None => 0,
            };
            if n == 0 {
                r.push(fail(
                    "projects_found",
                    "the token's user is Developer (or above) in no project that is not archived",
                    "Create the token at group level, or add its user to the projects as Developer (or above).",
                ));
            } else {
                let total = a
                    .headers
                    .get("x-total")
                    .and_then(|v| v.to_str().ok())
                    .map(|t| format!("{t} project(s)"))
                    .unwrap_or_else(|| "at least one project".into());
                r.push(pass(
                    "projects_found",
                    format!("{total} with Developer role or above (archived projects not counted)"),
                ));
            }
        }
        Some(Ok(a)) => r.push(fail(
            "projects_found",
            format!(
                "GitLab answered {} to GET /projects: {}",
                a.status,
                a.error_text()
            ),
            "Check the token's scopes (api) and its user's memberships.",
        )),
        Some(Err(e)) => r.push(fail("projects_found", reach_detail(&e), e.hint.clone())),
        None => {}
    }
    r.finish()
}

/// Where `/personal_access_tokens/self` is missing: what the token may do
/// with repositories, from the smart HTTP advertisements of project `pwn`
/// (`info/refs?service=git-upload-pack` for read, `git-receive-pack` for
/// write; GitLab checks scope and role before advertising either).
async fn git_capability(
    state: &Arc<AppState>,
    id: &str,
    pwn: &str,
) -> Result<Check, GitproxyError> {
    let path: String = pwn
        .split('/')
        .map(internal::segment)
        .collect::<Vec<_>>()
        .join("/");
    let mut can = Vec::new();
    for (service, what) in [("git-upload-pack", "read"), ("git-receive-pack", "write")] {
        let a = internal::call(
            state,
            id,
            Method::GET,
            &format!("/{path}.git/info/refs?service={service}"),
            None,
        )
        .await?;
        match a.status {
            200 => can.push(what),
            401 | 403 => {
                return Ok(fail(
                    "token_scopes",
                    format!(
                        "the token cannot {what} the repository of {pwn}: GitLab answered {} to {service} ({})",
                        a.status,
                        String::from_utf8_lossy(&a.body[..a.body.len().min(120)]).trim()
                    ),
                    format!("Create a token with scope api (read_repository and write_repository recommended) and set it (PUT /v1/connections/{id} {{\"token\": \"...\"}})."),
                ))
            }
            s => {
                return Ok(skip(
                    "token_scopes",
                    format!("this GitLab does not show a token's scopes, and {service} on {pwn} answered {s}: repository access could not be determined"),
                ))
            }
        }
    }
    Ok(pass(
        "token_scopes",
        format!(
            "this GitLab does not show a token's scopes; the token can {} the repository of {pwn} over git (whether it may write through the API, scope api, cannot be read before GitLab 15.5)",
            can.join(" and ")
        ),
    ))
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
