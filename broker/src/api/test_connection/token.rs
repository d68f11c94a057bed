//! Check 4, `token_valid`: GitLab accepts the token (and, from 15.5, says
//! whether it is active, when it expires and its scopes).

use super::*;

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

/// The token's scopes when GitLab shows them.
pub(super) async fn check(
    state: &Arc<AppState>,
    conn: &Connection,
    agent_token: bool,
    r: &mut Run,
) -> Step<Option<Vec<String>>> {
    let id = conn.id.as_str();
    if conn.token.is_none() && !agent_token {
        r.push(fail(
            "token_valid",
            "no GitLab token is configured for this connection (and the agent holds none)",
            TOKEN_HINT.replace("{id}", id),
        ));
        return Err("needs a valid token");
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
            return Err("needs a valid token");
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
                    return Err("needs a valid token");
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
                return Err("needs a valid token");
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
                return Err("needs a valid token");
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
                return Err("needs a valid token");
            }
            Err(e) => {
                r.push(fail("token_valid", reach_detail(&e), e.hint.clone()));
                return Err("needs a valid token");
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
            return Err("needs a valid token");
        }
    }
    Ok(scopes)
}
