//! Repository endpoints backed by the real bare repos: files, branches and commits.

use axum::body::Body;
use base64::Engine;
use http::{HeaderValue, Response, StatusCode};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::auth::{api_scopes, can_read_code, can_write, require_scope, Caller};
use super::projects::visible;
use super::{error, forbidden, json_response, message, pagination, ApiRequest};
use crate::sandbox::repo::{CommitError, CommitInfo, FileAction, Identity, Repo};
use crate::sandbox::state::{access, Project};
use crate::sandbox::Inner;

/// Runs blocking git work off the async runtime.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    tokio::task::spawn_blocking(f).await.ok()
}

fn internal() -> Response<Body> {
    message(
        StatusCode::INTERNAL_SERVER_ERROR,
        "500 Internal Server Error",
    )
}

/// Project readable as code by the caller (Reporter+, `api`/`read_api` scope).
pub fn for_read(
    inner: &Inner,
    id: &str,
    caller: Option<&Caller>,
) -> Result<(Project, u32), Response<Body>> {
    if caller.is_some() {
        require_scope(caller, api_scopes(false))?;
    }
    let (p, lvl) = visible(inner, id, caller)?;
    if !can_read_code(lvl) {
        return Err(forbidden());
    }
    Ok((p, lvl))
}

/// Project writable by the caller (Developer+, `api` scope).
pub fn for_write(
    inner: &Inner,
    id: &str,
    caller: Option<&Caller>,
) -> Result<(Project, u32, Caller), Response<Body>> {
    let c = require_scope(caller, api_scopes(true))?;
    let (p, lvl) = visible(inner, id, caller)?;
    // An archived project is read-only: `can?(:push_code)` is false for
    // everyone, so every write endpoint answers 403 (app/policies/project_policy.rb,
    // `rule { archived }.policy { prevent(*readonly_abilities) }`).
    if !can_write(lvl) || p.archived {
        return Err(forbidden());
    }
    Ok((p, lvl, c.clone()))
}

/// Commit JSON (`Entities::Commit`).
pub fn commit_json(inner: &Inner, p: &Project, c: &CommitInfo) -> Value {
    json!({
        "id": c.id,
        "short_id": c.id.get(..8).unwrap_or(&c.id),
        "created_at": c.committed_date,
        "parent_ids": c.parent_ids,
        "title": c.title(),
        "message": c.message,
        "author_name": c.author_name,
        "author_email": c.author_email,
        "authored_date": c.authored_date,
        "committer_name": c.committer_name,
        "committer_email": c.committer_email,
        "committed_date": c.committed_date,
        "trailers": {},
        "extended_trailers": {},
        "web_url": format!("{}/{}/-/commit/{}", inner.external_url, p.path_with_namespace(), c.id),
    })
}

fn branch_json(inner: &Inner, p: &Project, lvl: u32, name: &str, c: Option<&CommitInfo>) -> Value {
    let protected = name == p.default_branch;
    let can_push = if protected {
        lvl >= access::MAINTAINER
    } else {
        can_write(lvl)
    };
    json!({
        "name": name,
        "commit": c.map(|c| commit_json(inner, p, c)),
        "merged": false,
        "protected": protected,
        "developers_can_push": false,
        "developers_can_merge": false,
        "can_push": can_push,
        "default": protected,
        "web_url": format!("{}/{}/-/tree/{}", inner.external_url, p.path_with_namespace(), name),
    })
}

/// `GET /projects/:id/repository/files/:file_path[/raw]`.
pub async fn file(
    inner: &Inner,
    req: &ApiRequest,
    id: &str,
    path: &str,
    caller: Option<&Caller>,
    raw: bool,
) -> Response<Body> {
    let (p, _) = match for_read(inner, id, caller) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let rref = match req.param("ref") {
        Some(r) if !r.is_empty() => r,
        _ if raw => p.default_branch.clone(),
        _ => return error(StatusCode::BAD_REQUEST, "ref is missing"),
    };
    let repo = Repo::open(&p.repo_dir);
    let (r2, path2) = (rref.clone(), path.to_string());
    let Some((commit, blob)) = blocking(move || {
        let commit = repo.resolve(&r2);
        let blob = commit.as_ref().and_then(|c| repo.read_file(c, &path2));
        (commit, blob)
    })
    .await
    else {
        return internal();
    };
    if commit.is_none() {
        return message(StatusCode::NOT_FOUND, "404 Commit Not Found");
    }
    let Some(blob) = blob else {
        return message(StatusCode::NOT_FOUND, "404 File Not Found");
    };
    let sha = hex::encode(Sha256::digest(&blob.content));
    let file_name = path.rsplit('/').next().unwrap_or(path).to_string();
    let mut resp = if raw {
        let mut r = Response::new(Body::from(blob.content.clone()));
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    } else {
        json_response(
            StatusCode::OK,
            &json!({
                "file_name": file_name,
                "file_path": path,
                "size": blob.content.len(),
                "encoding": "base64",
                "content_sha256": sha,
                "ref": rref,
                "blob_id": blob.blob_id,
                "commit_id": blob.commit_id,
                "last_commit_id": blob.last_commit_id,
                "execute_filemode": false,
                "content": base64::engine::general_purpose::STANDARD.encode(&blob.content),
            }),
        )
    };
    for (k, v) in [
        ("x-gitlab-blob-id", blob.blob_id.clone()),
        ("x-gitlab-commit-id", blob.commit_id.clone()),
        ("x-gitlab-content-sha256", sha),
        ("x-gitlab-encoding", "base64".into()),
        ("x-gitlab-file-name", file_name),
        ("x-gitlab-file-path", path.to_string()),
        ("x-gitlab-last-commit-id", blob.last_commit_id.clone()),
        ("x-gitlab-ref", rref),
        ("x-gitlab-size", blob.content.len().to_string()),
        ("x-gitlab-execute-filemode", "false".into()),
    ] {
        if let Ok(v) = HeaderValue::from_str(&v) {
            resp.headers_mut().insert(k, v);
        }
    }
    resp
}

/// `GET /projects/:id/repository/branches` (`search`, offset pagination).
pub async fn list_branches(
    inner: &Inner,
    req: &ApiRequest,
    id: &str,
    caller: Option<&Caller>,
) -> Response<Body> {
    let (p, lvl) = match for_read(inner, id, caller) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let repo = Repo::open(&p.repo_dir);
    let search = req.param("search");
    let Some(heads) = blocking(move || {
        repo.branch_heads()
            .into_iter()
            .filter(|(n, _)| search.as_ref().is_none_or(|s| n.contains(s.as_str())))
            .map(|(n, sha)| {
                let info = repo.commit_info(&sha);
                (n, info)
            })
            .collect::<Vec<_>>()
    })
    .await
    else {
        return internal();
    };
    let (page, headers) = pagination::offset(&inner.external_url, req, &heads);
    let body: Vec<Value> = page
        .iter()
        .map(|(n, c)| branch_json(inner, &p, lvl, n, c.as_ref()))
        .collect();
    let mut resp = json_response(StatusCode::OK, &Value::Array(body));
    resp.headers_mut().extend(headers);
    resp
}

/// `GET /projects/:id/repository/branches/:branch`.
pub async fn get_branch(
    inner: &Inner,
    id: &str,
    name: &str,
    caller: Option<&Caller>,
) -> Response<Body> {
    let (p, lvl) = match for_read(inner, id, caller) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let repo = Repo::open(&p.repo_dir);
    let n = name.to_string();
    let info = blocking(move || {
        repo.resolve(&format!("refs/heads/{n}"))
            .and_then(|sha| repo.commit_info(&sha))
    })
    .await
    .flatten();
    match info {
        Some(c) => json_response(StatusCode::OK, &branch_json(inner, &p, lvl, name, Some(&c))),
        None => message(StatusCode::NOT_FOUND, "404 Branch Not Found"),
    }
}

/// `POST /projects/:id/repository/branches` (`branch`, `ref`).
pub async fn create_branch(
    inner: &Inner,
    req: &ApiRequest,
    id: &str,
    caller: Option<&Caller>,
) -> Response<Body> {
    let (p, lvl, _) = match for_write(inner, id, caller) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let (branch, rref) = match req.require(&["branch", "ref"]) {
        Ok(v) => (v[0].clone(), v[1].clone()),
        Err(r) => return *r,
    };
    let repo = Repo::open(&p.repo_dir);
    let (b, r) = (branch.clone(), rref.clone());
    let outcome = blocking(move || {
        if !Repo::valid_branch_name(&b) {
            return Err(message(StatusCode::BAD_REQUEST, "Branch name is invalid"));
        }
        if repo.resolve(&format!("refs/heads/{b}")).is_some() {
            return Err(message(StatusCode::BAD_REQUEST, "Branch already exists"));
        }
        let Some(sha) = repo.resolve(&r) else {
            return Err(message(
                StatusCode::BAD_REQUEST,
                format!("Invalid reference name: {r}"),
            ));
        };
        if repo.create_branch(&b, &sha).is_err() {
            return Err(message(StatusCode::BAD_REQUEST, "Branch already exists"));
        }
        Ok(repo.commit_info(&sha))
    })
    .await;
    match outcome {
        Some(Ok(info)) => json_response(
            StatusCode::CREATED,
            &branch_json(inner, &p, lvl, &branch, info.as_ref()),
        ),
        Some(Err(r)) => r,
        None => internal(),
    }
}

/// `GET /projects/:id/repository/commits/:sha`.
pub async fn get_commit(
    inner: &Inner,
    id: &str,
    sha: &str,
    caller: Option<&Caller>,
) -> Response<Body> {
    let (p, _) = match for_read(inner, id, caller) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let repo = Repo::open(&p.repo_dir);
    let s = sha.to_string();
    let info = blocking(move || repo.resolve(&s).and_then(|c| repo.commit_info(&c)))
        .await
        .flatten();
    match info {
        Some(c) => json_response(StatusCode::OK, &commit_json(inner, &p, &c)),
        None => message(StatusCode::NOT_FOUND, "404 Commit Not Found"),
    }
}

fn parse_actions(v: Option<&Value>) -> Result<Vec<FileAction>, Response<Body>> {
    let bad = |m: &str| error(StatusCode::BAD_REQUEST, m);
    let Some(Value::Array(items)) = v else {
        return Err(bad("actions is missing"));
    };
    if items.is_empty() {
        return Err(bad("actions is empty"));
    }
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let field = |k: &str| item.get(k).and_then(Value::as_str).map(str::to_string);
        let Some(path) = field("file_path").filter(|p| !p.is_empty()) else {
            return Err(bad(&format!("actions[{i}][file_path] is missing")));
        };
        let content = field("content").unwrap_or_default();
        let content = if field("encoding").as_deref() == Some("base64") {
            match base64::engine::general_purpose::STANDARD.decode(content.trim()) {
                Ok(b) => b,
                Err(_) => return Err(bad(&format!("actions[{i}][content] is invalid"))),
            }
        } else {
            content.into_bytes()
        };
        let action = match field("action").as_deref() {
            Some("create") => FileAction::Create { path, content },
            Some("update") => FileAction::Update { path, content },
            Some("delete") => FileAction::Delete { path },
            Some(_) => {
                return Err(bad(&format!(
                    "actions[{i}][action] does not have a valid value"
                )))
            }
            None => return Err(bad(&format!("actions[{i}][action] is missing"))),
        };
        out.push(action);
    }
    Ok(out)
}

/// `POST /projects/:id/repository/commits`.
pub async fn create_commit(
    inner: &Inner,
    req: &ApiRequest,
    id: &str,
    caller: Option<&Caller>,
) -> Response<Body> {
    let (p, lvl, c) = match for_write(inner, id, caller) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let (branch, msg) = match req.require(&["branch", "commit_message"]) {
        Ok(v) => (v[0].clone(), v[1].clone()),
        Err(r) => return *r,
    };
    let actions = match parse_actions(req.params.get("actions")) {
        Ok(a) => a,
        Err(r) => return r,
    };
    if branch == p.default_branch && lvl < access::MAINTAINER {
        return message(
            StatusCode::FORBIDDEN,
            "You are not allowed to push into this branch",
        );
    }
    let start = req.param("start_branch").or_else(|| req.param("start_sha"));
    let force = req.flag("force");
    let who = Identity {
        name: req
            .param("author_name")
            .unwrap_or_else(|| c.username.clone()),
        email: req
            .param("author_email")
            .unwrap_or_else(|| format!("{}@sandbox.invalid", c.username)),
    };
    let repo = Repo::open(&p.repo_dir);
    let lock = inner.repo_lock(p.id);
    let outcome = blocking(move || {
        let _guard = lock.lock();
        if !Repo::valid_branch_name(&branch) {
            return Err(message(StatusCode::BAD_REQUEST, "Branch name is invalid"));
        }
        let exists = repo.resolve(&format!("refs/heads/{branch}")).is_some();
        let start = match start {
            Some(s) if exists && s != branch && !force => {
                return Err(message(
                    StatusCode::BAD_REQUEST,
                    format!("A branch called '{branch}' already exists. Switch to that branch in order to make changes"),
                ))
            }
            Some(s) if s == branch => None,
            other => other,
        };
        if !exists && start.is_none() {
            return Err(message(
                StatusCode::BAD_REQUEST,
                "You can only create or edit files when you are on a branch",
            ));
        }
        if let Some(s) = &start {
            if repo.resolve(s).is_none() {
                return Err(message(
                    StatusCode::BAD_REQUEST,
                    format!("Invalid reference name: {s}"),
                ));
            }
        }
        match repo.commit(&branch, start.as_deref(), &msg, &actions, &who) {
            Ok(sha) => Ok(repo.commit_info(&sha)),
            Err(CommitError::FileExists) => Err(message(
                StatusCode::BAD_REQUEST,
                "A file with this name already exists",
            )),
            Err(CommitError::FileMissing) => Err(message(
                StatusCode::BAD_REQUEST,
                "A file with this name doesn't exist",
            )),
            Err(CommitError::Git(e)) => Err(message(StatusCode::BAD_REQUEST, e.to_string())),
        }
    })
    .await;
    match outcome {
        Some(Ok(Some(info))) => {
            let mut v = commit_json(inner, &p, &info);
            if let Value::Object(m) = &mut v {
                m.insert(
                    "stats".into(),
                    json!({"additions": 0, "deletions": 0, "total": 0}),
                );
                m.insert("status".into(), Value::Null);
                m.insert("project_id".into(), json!(p.id));
                m.insert("last_pipeline".into(), Value::Null);
            }
            json_response(StatusCode::CREATED, &v)
        }
        Some(Ok(None)) | None => internal(),
        Some(Err(r)) => r,
    }
}
