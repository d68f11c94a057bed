//! Adds the connection's GitLab token when the caller sent no credentials of
//! its own: `PRIVATE-TOKEN` for the API, HTTP Basic `oauth2:<token>` for git
//! (what GitLab expects from a personal or group access token over HTTP).

use base64::Engine;
use gitproxy_proto::v1::Header;
use gitproxy_shared::Secret;

const CREDENTIAL_HEADERS: [&str; 4] = [
    "private-token",
    "authorization",
    "job-token",
    "deploy-token",
];
const CREDENTIAL_PARAMS: [&str; 3] = ["private_token", "access_token", "job_token"];

/// Whether the caller brought its own GitLab credentials.
pub fn caller_has_credentials(headers: &[Header], target: &str) -> bool {
    if headers
        .iter()
        .any(|h| CREDENTIAL_HEADERS.contains(&h.name.as_str()))
    {
        return true;
    }
    target
        .split_once('?')
        .map(|(_, q)| {
            q.split('&')
                .any(|kv| CREDENTIAL_PARAMS.contains(&kv.split('=').next().unwrap_or("")))
        })
        .unwrap_or(false)
}

/// Appends the connection token to `headers` in the form `target` needs.
pub fn inject(headers: &mut Vec<Header>, target: &str, token: &Secret) {
    if target.starts_with("/api/") {
        headers.push(Header {
            name: "private-token".into(),
            value: token.expose().as_bytes().to_vec(),
        });
    } else {
        let basic =
            base64::engine::general_purpose::STANDARD.encode(format!("oauth2:{}", token.expose()));
        headers.push(Header {
            name: "authorization".into(),
            value: format!("Basic {basic}").into_bytes(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_and_injects() {
        let h = vec![Header {
            name: "private-token".into(),
            value: b"x".to_vec(),
        }];
        assert!(caller_has_credentials(&h, "/api/v4/user"));
        assert!(caller_has_credentials(&[], "/api/v4/user?private_token=x"));
        assert!(!caller_has_credentials(&[], "/api/v4/user?page=1"));
        let mut h = Vec::new();
        inject(&mut h, "/api/v4/user", &Secret::new("t"));
        assert_eq!(h[0].name, "private-token");
        let mut h = Vec::new();
        inject(&mut h, "/g/p.git/info/refs", &Secret::new("t"));
        assert_eq!(h[0].name, "authorization");
        assert!(String::from_utf8_lossy(&h[0].value).starts_with("Basic "));
    }
}
