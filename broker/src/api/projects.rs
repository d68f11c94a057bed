//! `GET /v1/connections/{id}/projects`: every project the connection's token
//! can work on (Developer role or above by any route: direct, inherited from
//! a parent group, through a group shared with a group, through a project
//! shared with a group), across all pages, with the effective `access_level`. Archived projects are read-only and left out unless
//! `?include_archived=true`; each project says whether it is `archived` and
//! whether its repository is empty.
//!
//! Pages are read with keyset pagination (`pagination=keyset&order_by=id`),
//! which stays fast and consistent on large instances, following
//! `Link: rel="next"` until there is none; a GitLab that refuses keyset
//! pagination (405) is read with offset pagination instead.

use super::error::ApiError;
use super::gitlab;
use crate::frontdoor::internal;
use crate::state::AppState;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::response::IntoResponse;
use axum::Json;
use http::{Method, Response};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::sync::Arc;

/// Most pages read for one listing (100 projects each).
pub const MAX_PAGES: usize = 1000;

/// GitLab's access levels (`Gitlab::Access`).
const DEVELOPER: u64 = 30;
const MAINTAINER: u64 = 40;
const OWNER: u64 = 50;

/// One project of the catalogue.
#[derive(Debug, Clone, Serialize)]
pub struct ProjectView {
    /// GitLab id.
    pub id: u64,
    /// `group/name`.
    pub path_with_namespace: String,
    /// Display name.
    pub name: String,
    /// Default branch.
    pub default_branch: Option<String>,
    /// GitLab's URL.
    pub web_url: Option<String>,
    /// The token user's effective access level over every route (30 Developer,
    /// 40 Maintainer, 50 Owner).
    pub access_level: u64,
    /// Archived (read-only: no merge request can be opened).
    pub archived: bool,
    /// The repository has no commit yet (no merge request can be opened).
    pub empty_repo: bool,
}

/// Query of `GET /v1/connections/{id}/projects`.
#[derive(Debug, Default, serde::Deserialize)]
pub struct CatalogueQuery {
    /// List archived projects too.
    #[serde(default)]
    pub include_archived: bool,
}

fn project_view(p: gitlab::Project) -> ProjectView {
    let perms = p.permissions.unwrap_or_default();
    // A lower bound: every listed project is Developer or above by some route.
    let access_level = [perms.project_access, perms.group_access]
        .into_iter()
        .flatten()
        .map(|a| a.access_level)
        .fold(DEVELOPER, u64::max);
    ProjectView {
        id: p.id,
        path_with_namespace: p.path_with_namespace,
        name: p.name,
        default_branch: p.default_branch,
        web_url: p.web_url,
        access_level,
        archived: p.archived,
        empty_repo: p.empty_repo,
    }
}

/// Reads every page of `GET /api/v4/projects?{query}` (keyset pagination, or
/// offset pagination when GitLab refuses keyset with 405).
async fn list_all<T: DeserializeOwned>(
    state: &Arc<AppState>,
    id: &str,
    query: &str,
) -> Result<Vec<T>, ApiError> {
    let first_keyset =
        format!("/api/v4/projects?{query}&pagination=keyset&order_by=id&sort=asc&per_page=100");
    let first_offset = format!("/api/v4/projects?{query}&order_by=id&sort=asc&per_page=100");
    let mut out = Vec::new();
    let mut next = Some(first_keyset);
    let mut pages = 0;
    let mut tried_offset = false;
    while let Some(target) = next.take() {
        pages += 1;
        if pages > MAX_PAGES {
            return Err(ApiError::gitlab(
                "GET /projects",
                200,
                &format!("more than {MAX_PAGES} pages"),
            ));
        }
        let a = internal::call(state, id, Method::GET, &target, None).await?;
        if a.status == 405 && !tried_offset && out.is_empty() {
            tried_offset = true;
            next = Some(first_offset.clone());
            continue;
        }
        if !a.ok() {
            return Err(ApiError::gitlab("GET /projects", a.status, &a.error_text()));
        }
        let items: Vec<T> = gitlab::read(&a, "GET /projects")?;
        out.extend(items);
        next = a.next_target(id);
    }
    Ok(out)
}

/// Reads the whole catalogue.
///
/// The projects are those of `membership=true&min_access_level=30`: GitLab filters
/// on its `project_authorizations`, which hold the user's highest level over every
/// route (direct, inherited from a parent group, through a group shared with a
/// group, through a project shared with a group). The `permissions` of each
/// project only show *direct* memberships (of the project, of its group or an
/// ancestor), so they are a lower bound; the exact level comes from listing again
/// with `min_access_level=40` and `=50` (ids only, `simple=true`), skipped when
/// the lower bounds already settle it.
pub async fn catalogue(
    state: &Arc<AppState>,
    id: &str,
    include_archived: bool,
) -> Result<Vec<ProjectView>, ApiError> {
    // GitLab lists archived projects unless asked `archived=false`.
    let archived = if include_archived {
        ""
    } else {
        "&archived=false"
    };
    let items: Vec<gitlab::Project> = list_all(
        state,
        id,
        &format!("membership=true&min_access_level={DEVELOPER}{archived}"),
    )
    .await?;
    let mut out: Vec<ProjectView> = items.into_iter().map(project_view).collect();
    out.sort_by_key(|p| p.id);
    out.dedup_by_key(|p| p.id);
    for band in [MAINTAINER, OWNER] {
        if out.iter().all(|p| p.access_level >= band) {
            continue;
        }
        let ids: std::collections::HashSet<u64> = list_all::<gitlab::ProjectId>(
            state,
            id,
            &format!("membership=true&min_access_level={band}{archived}&simple=true"),
        )
        .await?
        .into_iter()
        .map(|p| p.id)
        .collect();
        for p in out.iter_mut().filter(|p| ids.contains(&p.id)) {
            p.access_level = p.access_level.max(band);
        }
    }
    Ok(out)
}

/// `GET /v1/connections/{id}/projects`.
pub async fn handle(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    q: Result<Query<CatalogueQuery>, axum::extract::rejection::QueryRejection>,
) -> Response<Body> {
    if state.connections().get(&id).is_none() {
        return ApiError::unknown(&id).into_response();
    }
    let Ok(Query(q)) = q else {
        return ApiError::invalid("include_archived must be true or false").into_response();
    };
    match catalogue(&state, &id, q.include_archived).await {
        Ok(p) => Json(serde_json::json!({"count": p.len(), "projects": p})).into_response(),
        Err(e) => e.into_response(),
    }
}
