//! `/projects` and `/projects/:id`: visibility (all sandbox projects are private, so a
//! caller sees the projects it is authorised on by any route, see
//! [`crate::sandbox::groups`]), filters, ordering, both pagination styles, and the
//! project JSON.

use axum::body::Body;
use http::{Response, StatusCode};
use serde_json::{json, Value};

use super::auth::{api_scopes, level, require_scope, Caller};
use super::{error, json_response, message, pagination, ApiRequest};
use crate::sandbox::groups;
use crate::sandbox::state::{Project, State};
use crate::sandbox::Inner;

/// The `permissions` of `Entities::ProjectWithAccess` (lib/api/entities/project_with_access.rb):
/// `project_access` is the caller's *direct* project membership, `group_access` its highest
/// *direct* membership of the project's group or an ancestor. Neither shows access that
/// comes through a share, so both may be null on a project the caller reaches (GitLab
/// documents `permissions` as membership, not as the effective level). This is the
/// newest release's list preload (`GroupMember.max_access_members` matched over the
/// group's `traversal_ids`); older releases filled `group_access` in lists from the
/// project's own group only.
#[derive(Debug, Clone, Copy, Default)]
pub struct Permissions {
    pub project_access: Option<u32>,
    pub group_access: Option<u32>,
}

impl Permissions {
    /// What GitLab shows `user_id` on `p`.
    pub fn of(st: &State, p: &Project, user_id: Option<u64>) -> Permissions {
        let Some(u) = user_id else {
            return Permissions::default();
        };
        Permissions {
            project_access: p.access_of(u),
            group_access: groups::group_member_access(st, p, u),
        }
    }
}

/// Project JSON (`Entities::ProjectWithAccess`); `simple` gives `BasicProjectDetails`.
pub fn project_json(inner: &Inner, p: &Project, perms: Permissions, simple: bool) -> Value {
    let ext = &inner.external_url;
    let pwn = p.path_with_namespace();
    let host = url::Url::parse(ext)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string))
        .unwrap_or_else(|| "localhost".into());
    let mut v = json!({
        "id": p.id,
        "description": "",
        "name": p.name,
        "name_with_namespace": format!("{} / {}", p.namespace, p.name),
        "path": p.path,
        "path_with_namespace": pwn,
        "created_at": p.created_at,
        // GitLab: an empty repository has no default branch yet.
        "default_branch": if p.empty { Value::Null } else { json!(p.default_branch) },
        "tag_list": [],
        "topics": [],
        "ssh_url_to_repo": format!("git@{host}:{pwn}.git"),
        "http_url_to_repo": format!("{ext}/{pwn}.git"),
        "web_url": format!("{ext}/{pwn}"),
        "readme_url": null,
        "forks_count": 0,
        "avatar_url": null,
        "star_count": 0,
        "last_activity_at": p.created_at,
        "namespace": {
            "id": 1,
            "name": p.namespace,
            "path": p.namespace,
            "kind": "group",
            "full_path": p.namespace,
            "parent_id": null,
            "avatar_url": null,
            "web_url": format!("{ext}/groups/{}", p.namespace),
        },
    });
    if !simple {
        if let Value::Object(m) = &mut v {
            m.insert("visibility".into(), json!("private"));
            m.insert("archived".into(), json!(p.archived));
            m.insert("empty_repo".into(), json!(p.empty));
            m.insert("merge_requests_enabled".into(), json!(true));
            m.insert("issues_enabled".into(), json!(true));
            m.insert(
                "_links".into(),
                json!({
                    "self": format!("{ext}/api/v4/projects/{}", p.id),
                    "merge_requests": format!("{ext}/api/v4/projects/{}/merge_requests", p.id),
                    "repo_branches": format!("{ext}/api/v4/projects/{}/repository/branches", p.id),
                }),
            );
            // Entities::ProjectAccess / GroupAccess: `notification_level` 3 is `global`.
            let access = |l: Option<u32>| match l {
                Some(l) => json!({"access_level": l, "notification_level": 3}),
                None => Value::Null,
            };
            m.insert(
                "permissions".into(),
                json!({
                    "project_access": access(perms.project_access),
                    "group_access": access(perms.group_access),
                }),
            );
        }
    }
    v
}

/// The 404 GitLab answers for a project that does not exist or is not visible.
pub fn not_found() -> Response<Body> {
    message(StatusCode::NOT_FOUND, "404 Project Not Found")
}

/// Finds a project visible to `caller` (any route) and the caller's effective level.
pub fn visible(
    inner: &Inner,
    id: &str,
    caller: Option<&Caller>,
) -> Result<(Project, u32), Response<Body>> {
    visible_with_permissions(inner, id, caller).map(|(p, l, _)| (p, l))
}

fn visible_with_permissions(
    inner: &Inner,
    id: &str,
    caller: Option<&Caller>,
) -> Result<(Project, u32, Permissions), Response<Body>> {
    let st = inner.lock();
    let p = st.find_project(id).cloned().ok_or_else(not_found)?;
    let lvl = level(&st, &p, caller);
    if lvl == 0 {
        return Err(not_found());
    }
    let perms = Permissions::of(&st, &p, caller.map(|c| c.user_id));
    Ok((p, lvl, perms))
}

/// `GET /projects`.
pub fn list(inner: &Inner, req: &ApiRequest, caller: Option<&Caller>) -> Response<Body> {
    if caller.is_some() {
        if let Err(r) = require_scope(caller, api_scopes(false)) {
            return r;
        }
    }
    let keyset = req.param("pagination").as_deref() == Some("keyset");
    let order_by = req.param("order_by").unwrap_or_else(|| "created_at".into());
    let desc = req.param("sort").as_deref() != Some("asc");
    if keyset && (order_by != "id" || !inner.version.projects_keyset()) {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            "Keyset pagination is not yet available for this type of request",
        );
    }
    let min_level = req
        .param("min_access_level")
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(0);
    let search = req.param("search").map(|s| s.to_ascii_lowercase());
    // `archived` (doc/api/projects.md, "List all projects"): absent lists both.
    let archived = match req.param("archived").as_deref() {
        Some("true") | Some("1") | Some("yes") | Some("t") => Some(true),
        Some("false") | Some("0") | Some("no") | Some("f") => Some(false),
        _ => None,
    };
    let simple = req.flag("simple");
    // `min_access_level` and `membership` both read `project_authorizations`
    // (ProjectsFinder#collection_with_user → User#authorized_projects): the
    // effective level over every route, not the `permissions` shown.
    let mut rows: Vec<(Project, Permissions)> = {
        let st = inner.lock();
        let user = caller.map(|c| c.user_id);
        let group_levels = user
            .map(|u| groups::group_levels(&st, u))
            .unwrap_or_default();
        st.projects
            .iter()
            .map(|p| {
                let l = user
                    .map(|u| groups::project_access_with(&st, p, u, &group_levels))
                    .unwrap_or(0);
                (p, l)
            })
            .filter(|(_, l)| *l > 0 && *l >= min_level)
            .map(|(p, _)| (p.clone(), Permissions::of(&st, p, user)))
            .filter(|(p, _)| archived.is_none_or(|a| p.archived == a))
            .filter(|(p, _)| match &search {
                Some(s) => {
                    p.name.to_ascii_lowercase().contains(s)
                        || p.path.to_ascii_lowercase().contains(s)
                }
                None => true,
            })
            .collect()
    };
    match order_by.as_str() {
        "name" => rows.sort_by(|a, b| a.0.name.cmp(&b.0.name).then(a.0.id.cmp(&b.0.id))),
        "path" => rows.sort_by(|a, b| a.0.path.cmp(&b.0.path).then(a.0.id.cmp(&b.0.id))),
        // id, created_at, last_activity_at, updated_at: creation order is id order here.
        _ => rows.sort_by_key(|r| r.0.id),
    }
    if desc {
        rows.reverse();
    }
    let ext = inner.external_url.as_str();
    let (page, headers) = if keyset {
        pagination::keyset(ext, req, &rows, |r| r.0.id, desc)
    } else {
        pagination::offset(ext, req, &rows)
    };
    let body: Vec<Value> = page
        .iter()
        .map(|(p, perms)| project_json(inner, p, *perms, simple))
        .collect();
    let mut resp = json_response(StatusCode::OK, &Value::Array(body));
    resp.headers_mut().extend(headers);
    resp
}

/// `GET /projects/:id`.
pub fn get(inner: &Inner, id: &str, caller: Option<&Caller>) -> Response<Body> {
    if caller.is_some() {
        if let Err(r) = require_scope(caller, api_scopes(false)) {
            return r;
        }
    }
    match visible_with_permissions(inner, id, caller) {
        Ok((p, _, perms)) => json_response(StatusCode::OK, &project_json(inner, &p, perms, false)),
        Err(r) => r,
    }
}
