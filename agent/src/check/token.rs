//! The token steps of `check`: token valid (known, active, not revoked,
//! not expired), token scopes (or, on GitLab before 15.5, repository access
//! proven by capability) and projects found.

use super::{Report, Status};
use base64::Engine;
use gitproxy_shared::scopes;
use gitproxy_shared::upstream::Upstream;
use http::{HeaderMap, HeaderValue, Method};

async fn get_json(
    upstream: &Upstream,
    target: &str,
    headers: &HeaderMap,
) -> Result<(u16, HeaderMap, serde_json::Value), gitproxy_shared::errors::GitproxyError> {
    let resp = upstream
        .send(Method::GET, target, headers.clone(), None)
        .await?;
    let status = resp.status().as_u16();
    let h = resp.headers().clone();
    let body = gitproxy_shared::upstream::collect(resp.into_body())
        .await
        .unwrap_or_default();
    Ok((status, h, serde_json::from_slice(&body).unwrap_or_default()))
}

fn refusal(v: &serde_json::Value) -> (String, &'static str) {
    let why = v["error_description"]
        .as_str()
        .or(v["message"].as_str())
        .unwrap_or("401 Unauthorized")
        .to_string();
    let hint = if why.contains("expired") {
        "The token has expired: create a new one and update GITPROXY_GITLAB_TOKEN (Helm gitproxy.gitlabToken)."
    } else if why.contains("revoked") {
        "The token was revoked: create a new one and update GITPROXY_GITLAB_TOKEN."
    } else {
        "GitLab does not know this token: check GITPROXY_GITLAB_TOKEN."
    };
    (format!("GitLab answered 401: {why}"), hint)
}

pub(super) async fn check_token(
    r: &mut Report,
    upstream: &Upstream,
    headers: HeaderMap,
    token: &str,
) {
    let (status, _, v) =
        match get_json(upstream, "/api/v4/personal_access_tokens/self", &headers).await {
            Ok(x) => x,
            Err(e) => {
                r.line(Status::Fail, "token valid", &e.message, &e.hint);
                return;
            }
        };
    let scopes: Option<Vec<String>> = match status {
        200 => {
            r.line(
                Status::Ok,
                "token valid",
                &format!(
                    "active, expires {}",
                    v["expires_at"].as_str().unwrap_or("never")
                ),
                "",
            );
            Some(
                v["scopes"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|s| s.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default(),
            )
        }
        // Before GitLab 15.5 there is no /personal_access_tokens/self (14.x:
        // 404; 15.1-15.4: 401 to non-administrators): /user decides.
        401 | 404 => match get_json(upstream, "/api/v4/user", &headers).await {
            Ok((200, _, u)) => {
                r.line(
                    Status::Ok,
                    "token valid",
                    &format!(
                        "accepted (user {}); this GitLab has no /personal_access_tokens/self (before 15.5): expiry and scopes cannot be read",
                        u["username"].as_str().unwrap_or("?")
                    ),
                    "",
                );
                None
            }
            Ok((401, _, u)) => {
                let (detail, hint) = refusal(&u);
                r.line(Status::Fail, "token valid", &detail, hint);
                r.skip_rest(&["token scopes", "projects found"], "token not valid");
                return;
            }
            Ok((s, _, _)) => {
                r.line(
                    Status::Fail,
                    "token valid",
                    &format!("GitLab answered {s} to GET /user"),
                    "Check GITPROXY_GITLAB_TOKEN.",
                );
                return;
            }
            Err(e) => {
                r.line(Status::Fail, "token valid", &e.message, &e.hint);
                return;
            }
        },
        _ => {
            r.line(
                Status::Fail,
                "token valid",
                &format!("GitLab answered {status}"),
                "Check GITPROXY_GITLAB_TOKEN.",
            );
            return;
        }
    };
    let projects = get_json(
        upstream,
        "/api/v4/projects?membership=true&min_access_level=30&archived=false&per_page=1&simple=true",
        &headers,
    )
    .await;
    let first = match &projects {
        Ok((200, _, list)) => list[0]["path_with_namespace"].as_str().map(str::to_string),
        _ => None,
    };
    match (&scopes, &first) {
        (Some(have), _) => {
            let v = scopes::judge(have);
            if v.ok {
                let detail = if v.note.is_empty() {
                    v.detail
                } else {
                    format!("{}; {}", v.detail, v.note)
                };
                r.line(Status::Ok, "token scopes", &detail, "");
            } else {
                r.line(Status::Fail, "token scopes", &v.detail, &v.note);
            }
        }
        (None, None) => r.line(
            Status::Skip,
            "token scopes",
            "this GitLab does not show a token's scopes, and there is no project to try git access on",
            "",
        ),
        (None, Some(pwn)) => {
            let (status, detail, hint) = git_capability(upstream, token, pwn).await;
            r.line(status, "token scopes", &detail, &hint);
        }
    }
    match projects {
        Ok((200, h, list)) => {
            let total = h
                .get("x-total")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            if list.as_array().is_some_and(|a| !a.is_empty()) {
                r.line(
                    Status::Ok,
                    "projects found",
                    &format!(
                        "{} with Developer role or above (archived projects not counted)",
                        total.unwrap_or_else(|| "at least 1".into())
                    ),
                    "",
                );
            } else {
                r.line(
                    Status::Fail,
                    "projects found",
                    "the token is a member of no project (not archived) with Developer role or above",
                    "Create the token at group level (a group access token), or add its user to the projects as Developer or above.",
                );
            }
        }
        Ok((s, _, _)) => r.line(
            Status::Fail,
            "projects found",
            &format!("GitLab answered {s}"),
            "",
        ),
        Err(e) => r.line(Status::Fail, "projects found", &e.message, &e.hint),
    }
}

/// Repository access established by capability (GitLab before 15.5 does not
/// show scopes): the smart HTTP advertisements of `pwn`, upload-pack for
/// read and receive-pack for write, which GitLab grants only to a token
/// whose scope and role allow them.
async fn git_capability(upstream: &Upstream, token: &str, pwn: &str) -> (Status, String, String) {
    let mut headers = HeaderMap::new();
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("oauth2:{token}"));
    if let Ok(mut v) = HeaderValue::from_str(&format!("Basic {basic}")) {
        v.set_sensitive(true);
        headers.insert(http::header::AUTHORIZATION, v);
    }
    let mut can = Vec::new();
    for (service, what) in [("git-upload-pack", "read"), ("git-receive-pack", "write")] {
        let target = format!("/{pwn}.git/info/refs?service={service}");
        match upstream.send(Method::GET, &target, headers.clone(), None).await {
            Ok(resp) if resp.status().is_success() => can.push(what),
            Ok(resp) if matches!(resp.status().as_u16(), 401 | 403) => {
                return (
                    Status::Fail,
                    format!(
                        "the token cannot {what} the repository of {pwn}: GitLab answered {} to {service}",
                        resp.status().as_u16()
                    ),
                    "Create a token with scope api (read_repository and write_repository recommended) and update GITPROXY_GITLAB_TOKEN.".into(),
                )
            }
            Ok(resp) => {
                return (
                    Status::Skip,
                    format!(
                        "this GitLab does not show a token's scopes, and {service} on {pwn} answered {}: repository access could not be determined",
                        resp.status().as_u16()
                    ),
                    String::new(),
                )
            }
            Err(e) => return (Status::Fail, e.message, e.hint),
        }
    }
    (
        Status::Ok,
        format!(
            "this GitLab does not show a token's scopes; the token can {} the repository of {pwn} over git",
            can.join(" and ")
        ),
        String::new(),
    )
}
