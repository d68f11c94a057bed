//! The GitLab calls one new merge request is made of (see the parent
//! module for their order), and how their refusals are named.

use super::*;

pub(super) async fn get_project(
    state: &Arc<AppState>,
    conn: &str,
    project: &str,
) -> Result<Project, ApiError> {
    let a = internal::call(
        state,
        conn,
        Method::GET,
        &format!("/api/v4/projects/{}", segment(project)),
        None,
    )
    .await?;
    if a.status == 404 {
        return Err(ApiError::new(
            404,
            "project_not_found",
            format!("GitLab has no project {project:?} visible to the connection's token"),
            "Check the project's path or id, and that the token's user is a member (Developer or above).",
        ));
    }
    if !a.ok() {
        return Err(ApiError::gitlab(
            "GET /projects/:id",
            a.status,
            &a.error_text(),
        ));
    }
    Ok(gitlab::read(&a, "GET /projects/:id")?)
}

/// Whether branch `name` exists in project `pid`.
pub(super) async fn branch_exists(
    state: &Arc<AppState>,
    conn: &str,
    pid: u64,
    name: &str,
) -> Result<bool, ApiError> {
    let a = internal::call(
        state,
        conn,
        Method::GET,
        &format!(
            "/api/v4/projects/{pid}/repository/branches/{}",
            segment(name)
        ),
        None,
    )
    .await?;
    match a.status {
        200 => Ok(true),
        404 => Ok(false),
        s => Err(ApiError::gitlab(
            "GET /repository/branches/:branch",
            s,
            &a.error_text(),
        )),
    }
}

pub(super) async fn open_mr_for(
    state: &Arc<AppState>,
    conn: &str,
    pid: u64,
    source: &str,
) -> Result<Option<MergeRequest>, ApiError> {
    let a = internal::call(
        state,
        conn,
        Method::GET,
        &format!(
            "/api/v4/projects/{pid}/merge_requests?state=opened&source_branch={}&per_page=20",
            query_value(source)
        ),
        None,
    )
    .await?;
    if !a.ok() {
        return Err(ApiError::gitlab(
            "GET /projects/:id/merge_requests",
            a.status,
            &a.error_text(),
        ));
    }
    let open: Vec<MergeRequest> = gitlab::read(&a, "GET /projects/:id/merge_requests")?;
    Ok(open.into_iter().next())
}

pub(super) fn file_target(pid: u64, path: &str, r#ref: &str) -> String {
    format!(
        "/api/v4/projects/{pid}/repository/files/{}?ref={}",
        segment(path.trim_start_matches('/')),
        query_value(r#ref)
    )
}

/// Actions for a new branch started from `target`: create or update.
pub(super) async fn actions_from<'a>(
    state: &Arc<AppState>,
    conn: &str,
    pid: u64,
    target: &str,
    changes: &'a [Change],
) -> Result<Vec<CommitAction<'a>>, ApiError> {
    let mut actions = Vec::new();
    for c in changes {
        let a = internal::call(
            state,
            conn,
            Method::HEAD,
            &file_target(pid, &c.path, target),
            None,
        )
        .await?;
        let action = match a.status {
            200 => FileAction::Update,
            404 => FileAction::Create,
            s => return Err(ApiError::gitlab("HEAD /repository/files/:path", s, "")),
        };
        actions.push(c.action(action));
    }
    Ok(actions)
}

/// Actions for an existing branch: only files whose content differs.
pub(super) async fn actions_on_existing<'a>(
    state: &Arc<AppState>,
    conn: &str,
    pid: u64,
    branch: &str,
    changes: &'a [Change],
) -> Result<Vec<CommitAction<'a>>, ApiError> {
    let mut actions = Vec::new();
    for c in changes {
        let a = internal::call(
            state,
            conn,
            Method::GET,
            &file_target(pid, &c.path, branch),
            None,
        )
        .await?;
        let action = match a.status {
            200 => {
                let file: gitlab::RepoFile = gitlab::read(&a, "GET /repository/files/:path")?;
                let current = base64::engine::general_purpose::STANDARD
                    .decode(file.content.replace('\n', ""))
                    .ok();
                if current.as_deref() == Some(c.content.as_bytes()) {
                    continue;
                }
                FileAction::Update
            }
            404 => FileAction::Create,
            s => {
                return Err(ApiError::gitlab(
                    "GET /repository/files/:path",
                    s,
                    &a.error_text(),
                ))
            }
        };
        actions.push(c.action(action));
    }
    Ok(actions)
}

pub(super) async fn commit(
    state: &Arc<AppState>,
    conn: &str,
    pid: u64,
    body: &NewCommit<'_>,
) -> Result<Answer, ApiError> {
    Ok(internal::call(
        state,
        conn,
        Method::POST,
        &format!("/api/v4/projects/{pid}/repository/commits"),
        Some(&json!(body)),
    )
    .await?)
}

/// A 403 to the commit: GitLab refuses pushes to a protected branch with the
/// same status as a missing role, so the branch itself is asked (its
/// `protected` and `can_push` fields) rather than the wording read.
pub(super) async fn push_refused(
    state: &Arc<AppState>,
    conn: &str,
    p: &Project,
    branch: &str,
    text: &str,
) -> Result<ApiError, ApiError> {
    let a = internal::call(
        state,
        conn,
        Method::GET,
        &format!(
            "/api/v4/projects/{}/repository/branches/{}",
            p.id,
            segment(branch)
        ),
        None,
    )
    .await?;
    let branch_state = (a.status == 200)
        .then(|| gitlab::read::<gitlab::Branch>(&a, "GET /repository/branches/:branch").ok())
        .flatten();
    if branch_state.is_some_and(|b| b.protected && !b.can_push) {
        return Ok(ApiError::new(
            409,
            "branch_protected",
            format!("{branch} is a protected branch of {}: GitLab refuses commits to it from the token's user", p.path_with_namespace),
            "Give a new source_branch for the merge request (gitproxy creates it); protected branches take changes through merge requests, or ask a Maintainer to allow pushes in Settings > Repository > Protected branches.",
        ));
    }
    Ok(ApiError::gitlab("POST /repository/commits", 403, text))
}

/// GitLab's refusal of a merge request by validation: 422 with
/// `{"message": ["...", ...]}` (`unprocessable_entity!` over the MR's
/// `:base`, `:validate_fork`, ... errors, e.g. a branch that does not exist).
pub(super) fn mr_refused(status: u16, body: &[u8]) -> Option<ApiError> {
    if status != 422 {
        return None;
    }
    let msgs = serde_json::from_slice::<gitlab::Refusal>(body)
        .ok()?
        .message;
    Some(ApiError::new(
        422,
        "merge_request_refused",
        format!("GitLab refused the merge request: {}", msgs.join("; ")),
        "Check that the source and target branches exist in the project (a branch deleted while the merge request was prepared), then retry.",
    ))
}
