//! Is this GitLab? The answer to `GET /api/v4/version` tells a GitLab from
//! anything else living at a URL (a web server's 404 page, a sign-in portal,
//! the root of a host whose GitLab is served under a relative URL root).
//!
//! Test Connection and `gitproxy-agent check` use it so that a `gitlab_url`
//! missing its path prefix fails `gitlab_reachable` with a hint about the URL,
//! instead of passing and then having every token check blame the token.

/// The hint for a URL that answers, but not as GitLab.
pub const NOT_GITLAB_HINT: &str = "The URL answers, but not as GitLab's API. Check the path of the GitLab URL: when GitLab is served under a path (relative_url_root), include it, e.g. https://host/gitlab (the URL you open GitLab's sign-in page with, without /users/sign_in).";

/// Whether `status` and `body`, GitLab's answer to `GET /api/v4/version`
/// with the connection's token, come from GitLab:
/// - `200` with a JSON object holding a string `version`;
/// - `401`/`403` with GitLab's JSON error shape (`{"message": ...}` or
///   `{"error": ...}`): GitLab, refusing the token (the token checks say why);
/// - `429`: GitLab's rate limiter (its body is plain `Retry later`).
pub fn is_gitlab_version_answer(status: u16, body: &[u8]) -> bool {
    let json = serde_json::from_slice::<serde_json::Value>(body).ok();
    let field = |k: &str| json.as_ref().and_then(|v| v.get(k));
    match status {
        200 => field("version").is_some_and(|v| v.is_string()),
        401 | 403 => field("message").is_some() || field("error").is_some(),
        429 => true,
        _ => false,
    }
}

/// What a non-GitLab answer looked like, for the check's detail: the status
/// and, for a short text body, its first line (never a header).
pub fn describe(status: u16, body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let first: String = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("")
        .chars()
        .filter(|c| !c.is_control())
        .take(80)
        .collect();
    if first.is_empty() {
        format!("HTTP {status} to GET /api/v4/version")
    } else {
        format!("HTTP {status} to GET /api/v4/version ({first:?})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_gitlab() {
        assert!(is_gitlab_version_answer(
            200,
            br#"{"version":"16.11.2","revision":"abc"}"#
        ));
        assert!(is_gitlab_version_answer(
            401,
            br#"{"message":"401 Unauthorized"}"#
        ));
        assert!(is_gitlab_version_answer(
            403,
            br#"{"error":"insufficient_scope","error_description":"..."}"#
        ));
        assert!(is_gitlab_version_answer(429, b"Retry later\n"));
    }

    #[test]
    fn refuses_other_servers() {
        assert!(!is_gitlab_version_answer(404, b"404 Not Found\n"));
        assert!(!is_gitlab_version_answer(
            404,
            br#"{"message":"404 Not Found"}"#
        ));
        assert!(!is_gitlab_version_answer(200, b"<html>sign in</html>"));
        assert!(!is_gitlab_version_answer(200, br#"{"status":"ok"}"#));
        assert!(!is_gitlab_version_answer(401, b"Unauthorized"));
        assert_eq!(
            describe(404, b"\n404 Not Found\n"),
            "HTTP 404 to GET /api/v4/version (\"404 Not Found\")"
        );
    }
}
