//! Remediation merge requests: `POST /v1/connections/{id}/merge-requests`
//! opens one (branch + commit + MR), `GET` lists those gitproxy opened with
//! their current state read from GitLab.
//!
//! GitLab calls for a new MR (every one through the front door's path):
//! 1. `GET /projects/:id` — canonical id, path and default branch; an
//!    archived project (read-only) is refused as `project_archived` and an
//!    empty repository (nothing to branch from) as `empty_repository`,
//!    both before any write;
//! 2. `GET /projects/:id/merge_requests?state=opened&source_branch=...` — an
//!    open MR for the source branch is returned as is (idempotent);
//! 3. `HEAD /projects/:id/repository/files/:path?ref=<target>` per file —
//!    `create` or `update`;
//! 4. `POST /projects/:id/repository/commits` with `branch` = source and
//!    `start_branch` = target: the branch and the commit in one call;
//! 5. `POST /projects/:id/merge_requests`.
//!
//! When the source branch already exists (an earlier attempt stopped after
//! its commit), the files are compared on that branch and only what differs
//! is committed — nothing when all is there. That case is recognised by
//! structure, not by GitLab's wording: the commit was refused with 400 and
//! `GET /repository/branches/:source` answers 200 (GitLab's "A branch called
//! ... already exists" and "A file with this name already exists" share
//! their ending; only the first means an earlier attempt). A 409 on step 5 (GitLab's
//! "Another open merge request already exists") means a concurrent attempt
//! won: its MR is fetched and returned.
//!
//! GitLab's refusals are named by status and structure, never by wording: a
//! 403 to the commit whose source branch GitLab reports `protected` without
//! `can_push` is `branch_protected`; a 422 `{"message": [...]}` to the MR is
//! `merge_request_refused`; any other refusal is `gitlab_error` with GitLab's
//! status and message.

use super::error::ApiError;
use super::gitlab::{
    self, CommitAction, FileAction, MergeRequest, NewCommit, NewMergeRequest, Project,
};
use crate::frontdoor::internal::{self, query_value, segment, Answer};
use crate::state::AppState;
use crate::store::{StoreError, TrackedMr};
use axum::body::Body;
use axum::extract::{Path, State};
use axum::response::IntoResponse;
use axum::Json;
use base64::Engine;
use futures::StreamExt;
use http::{Method, Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::sync::Arc;
use steps::*;

/// One file to write.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Change {
    /// Path in the repository.
    pub path: String,
    /// The whole new content (text).
    pub content: String,
}

impl Change {
    fn action(&self, action: FileAction) -> CommitAction<'_> {
        CommitAction {
            action,
            file_path: &self.path,
            content: &self.content,
        }
    }
}

/// Body of the POST.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewMr {
    /// Project id or `group/name`.
    pub project: Value,
    /// Default: the project's default branch.
    pub target_branch: Option<String>,
    /// The branch to create (or reuse).
    pub source_branch: String,
    /// Title (also the commit message).
    pub title: String,
    /// Description.
    pub description: Option<String>,
    /// Files.
    pub changes: Vec<Change>,
}

/// An MR as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct MrView {
    /// Connection id.
    pub connection: String,
    /// GitLab project id.
    pub project_id: u64,
    /// `group/name`.
    pub project: String,
    /// iid, title, branches, state and URL as GitLab gave them (`state` is
    /// `unknown` when GitLab could not be asked).
    #[serde(flatten)]
    pub mr: MergeRequest,
    /// When gitproxy opened it.
    pub created_at: String,
    /// Why the state is unknown.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

fn view_of(conn: &str, p: &Project, mr: &MergeRequest, created_at: &str) -> MrView {
    MrView {
        connection: conn.to_string(),
        project_id: p.id,
        project: p.path_with_namespace.clone(),
        mr: mr.clone(),
        created_at: created_at.to_string(),
        error: None,
    }
}

/// Opens (or finds) the MR; `true` when it was created now.
pub async fn open(
    state: &Arc<AppState>,
    conn: &str,
    req: NewMr,
) -> Result<(bool, MrView), ApiError> {
    let project = match &req.project {
        Value::String(s) if !s.trim().is_empty() => s.trim().to_string(),
        Value::Number(n) => n.to_string(),
        _ => {
            return Err(ApiError::invalid(
                "project must be a project id or \"group/name\"",
            ))
        }
    };
    if req.source_branch.trim().is_empty() || req.title.trim().is_empty() {
        return Err(ApiError::invalid("source_branch and title are required"));
    }
    if req.changes.is_empty() || req.changes.iter().any(|c| c.path.trim().is_empty()) {
        return Err(ApiError::invalid(
            "changes must list at least one {\"path\", \"content\"} with a path",
        ));
    }
    let p = get_project(state, conn, &project).await?;
    if p.archived {
        return Err(ApiError::new(
            409,
            "project_archived",
            format!("{} is archived: GitLab makes archived projects read-only", p.path_with_namespace),
            "Unarchive the project in GitLab (Settings > General > Advanced > Unarchive project) to open a merge request, or leave it out: the catalogue lists archived projects only with ?include_archived=true.",
        ));
    }
    if p.empty_repo {
        return Err(ApiError::new(
            409,
            "empty_repository",
            format!("{} has an empty repository: there is no branch to open a merge request against", p.path_with_namespace),
            "Push a first commit to the project's default branch, then retry; the catalogue marks such projects with empty_repo: true.",
        ));
    }
    let target = match req.target_branch.clone().filter(|t| !t.is_empty()) {
        Some(t) => t,
        None => p.default_branch.clone().ok_or_else(|| {
            ApiError::invalid("the project has no default branch: give target_branch")
        })?,
    };
    if target == req.source_branch {
        return Err(ApiError::invalid(
            "source_branch must differ from target_branch",
        ));
    }
    if let Some(mr) = open_mr_for(state, conn, p.id, &req.source_branch).await? {
        let v = track(state, conn, &p, &mr).await?;
        return Ok((false, v));
    }
    // Branch and commit in one call.
    let actions = actions_from(state, conn, p.id, &target, &req.changes).await?;
    let body = NewCommit {
        branch: &req.source_branch,
        start_branch: Some(&target),
        commit_message: &req.title,
        actions,
    };
    let a = commit(state, conn, p.id, &body).await?;
    if !a.ok() {
        let text = a.error_text();
        if a.status == 400 && branch_exists(state, conn, p.id, &req.source_branch).await? {
            // The branch exists: commit only what is missing there.
            let actions =
                actions_on_existing(state, conn, p.id, &req.source_branch, &req.changes).await?;
            if !actions.is_empty() {
                let body = NewCommit {
                    branch: &req.source_branch,
                    start_branch: None,
                    commit_message: &req.title,
                    actions,
                };
                let a = commit(state, conn, p.id, &body).await?;
                if !a.ok() {
                    return Err(ApiError::gitlab(
                        "POST /repository/commits",
                        a.status,
                        &a.error_text(),
                    ));
                }
            }
        } else if a.status == 403 {
            return Err(push_refused(state, conn, &p, &req.source_branch, &text).await?);
        } else {
            return Err(ApiError::gitlab(
                "POST /repository/commits",
                a.status,
                &text,
            ));
        }
    }
    let mr_body = json!(NewMergeRequest {
        source_branch: &req.source_branch,
        target_branch: &target,
        title: &req.title,
        description: req.description.as_deref(),
    });
    let a = internal::call(
        state,
        conn,
        Method::POST,
        &format!("/api/v4/projects/{}/merge_requests", p.id),
        Some(&mr_body),
    )
    .await?;
    match a.status {
        200 | 201 => {
            let mr: MergeRequest = gitlab::read(&a, "POST /merge_requests")?;
            let v = track(state, conn, &p, &mr).await?;
            tracing::info!(connection = %conn, project = %p.path_with_namespace, iid = v.mr.iid, source_branch = %v.mr.source_branch, "merge request opened");
            Ok((true, v))
        }
        409 => match open_mr_for(state, conn, p.id, &req.source_branch).await? {
            Some(mr) => Ok((false, track(state, conn, &p, &mr).await?)),
            None => Err(ApiError::gitlab(
                "POST /merge_requests",
                409,
                &a.error_text(),
            )),
        },
        s => Err(mr_refused(s, &a.body)
            .unwrap_or_else(|| ApiError::gitlab("POST /merge_requests", s, &a.error_text()))),
    }
}

async fn track(
    state: &AppState,
    conn: &str,
    p: &Project,
    mr: &MergeRequest,
) -> Result<MrView, ApiError> {
    let created_at = now();
    let v = view_of(conn, p, mr, &created_at);
    let existing = state
        .store
        .snapshot()
        .merge_requests
        .into_iter()
        .find(|m| m.connection == conn && m.project_id == p.id && m.iid == v.mr.iid);
    if let Some(m) = existing {
        return Ok(MrView {
            created_at: m.created_at,
            ..v
        });
    }
    let written = state
        .store
        .track_mr(TrackedMr {
            connection: conn.to_string(),
            project_id: p.id,
            project: p.path_with_namespace.clone(),
            iid: v.mr.iid,
            source_branch: v.mr.source_branch.clone(),
            target_branch: v.mr.target_branch.clone(),
            title: v.mr.title.clone(),
            web_url: v.mr.web_url.clone(),
            created_at,
        })
        .await
        .map_err(|e| match e {
            StoreError::NoDataDir | StoreError::Io { .. } => ApiError::new(
                500,
                "storage_error",
                e.to_string(),
                "Check that the data directory is writable and not full.",
            ),
            e => super::connections::store_error(e),
        })?;
    state.store.wait_applied(written).await;
    Ok(v)
}

/// `POST /v1/connections/{id}/merge-requests`.
pub async fn create(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    body: bytes::Bytes,
) -> Response<Body> {
    if state.connections().get(&id).is_none() {
        return ApiError::unknown(&id).into_response();
    }
    let req: NewMr = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return ApiError::invalid(format!("the body is not a merge request: {e}"))
                .into_response()
        }
    };
    match open(&state, &id, req).await {
        Ok((created, v)) => {
            let mut r = Json(json!({"created": created, "merge_request": v})).into_response();
            if created {
                *r.status_mut() = StatusCode::CREATED;
            }
            r
        }
        Err(e) => e.into_response(),
    }
}

/// `GET /v1/connections/{id}/merge-requests`: the tracked MRs, newest
/// first, each with its state as GitLab says now.
pub async fn list(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Response<Body> {
    if state.connections().get(&id).is_none() {
        return ApiError::unknown(&id).into_response();
    }
    let mut tracked: Vec<TrackedMr> = state
        .store
        .snapshot()
        .merge_requests
        .into_iter()
        .filter(|m| m.connection == id)
        .collect();
    tracked.reverse();
    let views: Vec<MrView> = futures::stream::iter(tracked)
        .map(|m| {
            let state = state.clone();
            let id = id.clone();
            async move {
                let mut v = MrView {
                    connection: id.clone(),
                    project_id: m.project_id,
                    project: m.project.clone(),
                    mr: MergeRequest {
                        iid: m.iid,
                        title: m.title.clone(),
                        source_branch: m.source_branch.clone(),
                        target_branch: m.target_branch.clone(),
                        state: "unknown".into(),
                        web_url: m.web_url.clone(),
                    },
                    created_at: m.created_at.clone(),
                    error: None,
                };
                let target = format!("/api/v4/projects/{}/merge_requests/{}", m.project_id, m.iid);
                match internal::call(&state, &id, Method::GET, &target, None).await {
                    Ok(a) if a.ok() => {
                        match gitlab::read::<MergeRequest>(&a, "GET /merge_requests/:iid") {
                            Ok(mr) => {
                                v.mr.state = mr.state;
                                v.mr.title = mr.title;
                            }
                            Err(e) => v.error = Some(e.to_string()),
                        }
                    }
                    Ok(a) => {
                        v.error = Some(format!("GitLab answered {}: {}", a.status, a.error_text()))
                    }
                    Err(e) => v.error = Some(format!("{}: {}", e.error.as_str(), e.message)),
                }
                v
            }
        })
        .buffered(8)
        .collect()
        .await;
    Json(json!({"merge_requests": views})).into_response()
}

mod steps;
#[cfg(test)]
mod tests;
