//! Checks 2 and 3, `gitlab_reachable` and `tls_trusted`: `GET /api/v4/version`
//! answers as GitLab does, over a TLS connection the broker (or agent) trusts.

use super::*;

pub(super) async fn check(state: &Arc<AppState>, conn: &Connection, r: &mut Run) -> Step<()> {
    let id = conn.id.as_str();
    let https = conn.gitlab_url.scheme() == "https";
    let version = internal::call(state, id, Method::GET, "/api/v4/version", None).await;
    match &version {
        Ok(a) if !gitlab_probe::is_gitlab_version_answer(a.status, &a.body) => {
            r.push(fail(
                "gitlab_reachable",
                format!(
                    "{} answered {}",
                    conn.gitlab_url,
                    gitlab_probe::describe(a.status, &a.body)
                ),
                gitlab_probe::NOT_GITLAB_HINT,
            ));
            return Err("needs GitLab to be reachable");
        }
        Ok(a) => {
            let detail = match gitlab::read::<gitlab::Version>(a, "GET /version") {
                Ok(v) => format!("GitLab {} answered at {}", v.version, conn.gitlab_url),
                Err(_) => format!("GitLab answered {} at {}", a.status, conn.gitlab_url),
            };
            r.push(pass("gitlab_reachable", detail));
            r.push(if https {
                pass("tls_trusted", "GitLab's certificate is trusted")
            } else {
                skip("tls_trusted", "GitLab is reached over http://")
            });
        }
        Err(e) if e.error == ErrorCode::UpstreamTls => {
            r.push(pass(
                "gitlab_reachable",
                "GitLab's host answered (the TLS handshake failed: see tls_trusted)",
            ));
            r.push(fail("tls_trusted", e.message.clone(), e.hint.clone()));
            return Err("needs a trusted TLS connection to GitLab");
        }
        Err(e) => {
            r.push(fail("gitlab_reachable", reach_detail(e), e.hint.clone()));
            return Err("needs GitLab to be reachable");
        }
    }
    Ok(())
}
