//! Checks 5 and 6, `token_scopes` and `projects_found`: the token may read and
//! write repositories, and its user is Developer (or above) in some project.

use super::*;

pub(super) async fn check(
    state: &Arc<AppState>,
    conn: &Connection,
    scopes: Option<Vec<String>>,
    r: &mut Run,
) -> Step<()> {
    let id = conn.id.as_str();
    // 5. token_scopes (read from the token, or established by capability),
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
                    return Err("needs GitLab to answer");
                }
            },
        },
    }

    if !can_list {
        r.push(skip(
            "projects_found",
            "the token cannot read the API (needs scope api or read_api)",
        ));
        return Ok(());
    }
    match projects {
        Some(Ok(a)) if a.ok() => {
            let n = match &listed {
                Some(Ok(list)) => list.len(),
                Some(Err(e)) => {
                    r.push(fail("projects_found", e.to_string(), gitlab::NOT_API_HINT));
                    return Ok(());
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
    Ok(())
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
