//! Merge requests: create (with GitLab's 409 for a duplicate open MR), list with
//! `state` / `source_branch` / `target_branch` filters, get, and state updates.

use axum::body::Body;
use http::{Response, StatusCode};
use serde_json::{json, Value};

use super::auth::Caller;
use super::meta::user_basic;
use super::repository::{for_read, for_write};
use super::{json_response, message, pagination, ApiRequest};
use crate::sandbox::repo::Repo;
use crate::sandbox::state::{MergeRequest, Project};
use crate::sandbox::{clock, Inner};

fn mr_json(inner: &Inner, p: &Project, mr: &MergeRequest) -> Value {
    let author = inner
        .lock()
        .user(mr.author_id)
        .cloned()
        .map(|u| user_basic(inner, &u))
        .unwrap_or(Value::Null);
    let closed = mr.state == "closed";
    let merged = mr.state == "merged";
    json!({
        "id": mr.id,
        "iid": mr.iid,
        "project_id": mr.project_id,
        "title": mr.title,
        "description": mr.description,
        "state": mr.state,
        "created_at": mr.created_at,
        "updated_at": mr.updated_at,
        "merged_at": if merged { json!(mr.updated_at) } else { Value::Null },
        "closed_at": if closed { json!(mr.updated_at) } else { Value::Null },
        "target_branch": mr.target_branch,
        "source_branch": mr.source_branch,
        "source_project_id": mr.project_id,
        "target_project_id": mr.project_id,
        "author": author,
        "assignees": [],
        "reviewers": [],
        "labels": [],
        "draft": false,
        "work_in_progress": false,
        "merge_when_pipeline_succeeds": false,
        "merge_status": "can_be_merged",
        "detailed_merge_status": "mergeable",
        "sha": null,
        "merge_commit_sha": null,
        "squash": false,
        "has_conflicts": false,
        "references": {
            "short": format!("!{}", mr.iid),
            "relative": format!("!{}", mr.iid),
            "full": format!("{}!{}", p.path_with_namespace(), mr.iid),
        },
        "web_url": format!("{}/{}/-/merge_requests/{}", inner.external_url, p.path_with_namespace(), mr.iid),
    })
}

/// `GET /projects/:id/merge_requests`.
pub fn list(inner: &Inner, req: &ApiRequest, id: &str, caller: Option<&Caller>) -> Response<Body> {
    let (p, _) = match for_read(inner, id, caller) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let state = req.param("state").unwrap_or_else(|| "all".into());
    let source = req.param("source_branch");
    let target = req.param("target_branch");
    let mut mrs: Vec<MergeRequest> = inner
        .lock()
        .merge_requests
        .iter()
        .filter(|m| m.project_id == p.id)
        .filter(|m| state == "all" || m.state == state)
        .filter(|m| source.as_ref().is_none_or(|s| &m.source_branch == s))
        .filter(|m| target.as_ref().is_none_or(|t| &m.target_branch == t))
        .cloned()
        .collect();
    mrs.sort_by_key(|m| std::cmp::Reverse(m.id));
    let (page, headers) = pagination::offset(&inner.external_url, req, &mrs);
    let body: Vec<Value> = page.iter().map(|m| mr_json(inner, &p, m)).collect();
    let mut resp = json_response(StatusCode::OK, &Value::Array(body));
    resp.headers_mut().extend(headers);
    resp
}

/// `GET /projects/:id/merge_requests/:iid`.
pub fn get(inner: &Inner, id: &str, iid: &str, caller: Option<&Caller>) -> Response<Body> {
    let (p, _) = match for_read(inner, id, caller) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let iid: u64 = iid.parse().unwrap_or(0);
    let mr = inner
        .lock()
        .merge_requests
        .iter()
        .find(|m| m.project_id == p.id && m.iid == iid)
        .cloned();
    match mr {
        Some(m) => json_response(StatusCode::OK, &mr_json(inner, &p, &m)),
        None => message(StatusCode::NOT_FOUND, "404 Not found"),
    }
}

/// `PUT /projects/:id/merge_requests/:iid` (`state_event`, `title`, `description`).
pub fn update(
    inner: &Inner,
    req: &ApiRequest,
    id: &str,
    iid: &str,
    caller: Option<&Caller>,
) -> Response<Body> {
    let (p, _, _) = match for_write(inner, id, caller) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let iid: u64 = iid.parse().unwrap_or(0);
    let updated = {
        let mut st = inner.lock();
        let Some(m) = st
            .merge_requests
            .iter_mut()
            .find(|m| m.project_id == p.id && m.iid == iid)
        else {
            return message(StatusCode::NOT_FOUND, "404 Not found");
        };
        match req.param("state_event").as_deref() {
            Some("close") if m.state == "opened" => m.state = "closed".into(),
            Some("reopen") if m.state == "closed" => m.state = "opened".into(),
            _ => {}
        }
        if let Some(t) = req.param("title") {
            m.title = t;
        }
        if let Some(d) = req.param("description") {
            m.description = d;
        }
        m.updated_at = clock::now_iso();
        m.clone()
    };
    json_response(StatusCode::OK, &mr_json(inner, &p, &updated))
}

/// `POST /projects/:id/merge_requests`.
pub async fn create(
    inner: &Inner,
    req: &ApiRequest,
    id: &str,
    caller: Option<&Caller>,
) -> Response<Body> {
    let (p, _, c) = match for_write(inner, id, caller) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let (source, target, title) = match req.require(&["source_branch", "target_branch", "title"]) {
        Ok(v) => (v[0].clone(), v[1].clone(), v[2].clone()),
        Err(r) => return *r,
    };
    if source == target {
        return message(
            StatusCode::UNPROCESSABLE_ENTITY,
            json!(["You can't use same project/branch for source and target"]),
        );
    }
    let repo = Repo::open(&p.repo_dir);
    let (s2, t2) = (source.clone(), target.clone());
    let missing = tokio::task::spawn_blocking(move || {
        [s2, t2]
            .into_iter()
            .find(|b| repo.resolve(&format!("refs/heads/{b}")).is_none())
    })
    .await
    .unwrap_or(None);
    if let Some(b) = missing {
        // MergeRequests::BuildService#validate_branches adds the error on `:base`;
        // the API answers every `:base` error with 422 `{"message": [...]}`
        // (lib/api/helpers/merge_requests_helpers.rb, UNPROCESSABLE_ERROR_KEYS).
        let which = if b == source { "Source" } else { "Target" };
        return message(
            StatusCode::UNPROCESSABLE_ENTITY,
            json!([format!("{which} branch \"{b}\" does not exist")]),
        );
    }
    let mr = {
        let mut st = inner.lock();
        if let Some(dup) = st.merge_requests.iter().find(|m| {
            m.project_id == p.id
                && m.state == "opened"
                && m.source_branch == source
                && m.target_branch == target
        }) {
            return message(
                StatusCode::CONFLICT,
                json!([format!(
                    "Another open merge request already exists for this source branch: !{}",
                    dup.iid
                )]),
            );
        }
        let iid = st
            .merge_requests
            .iter()
            .filter(|m| m.project_id == p.id)
            .map(|m| m.iid)
            .max()
            .unwrap_or(0)
            + 1;
        let now = clock::now_iso();
        let mr = MergeRequest {
            id: st.next_id(),
            iid,
            project_id: p.id,
            title,
            description: req.param("description").unwrap_or_default(),
            state: "opened".into(),
            source_branch: source,
            target_branch: target,
            author_id: c.user_id,
            created_at: now.clone(),
            updated_at: now,
        };
        st.merge_requests.push(mr.clone());
        mr
    };
    json_response(StatusCode::CREATED, &mr_json(inner, &p, &mr))
}
