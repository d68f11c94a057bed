//! Adds the connection's GitLab token when the caller sent no credentials of
//! its own: `PRIVATE-TOKEN` for the API, HTTP Basic `oauth2:<token>` for git
//! (what GitLab expects from a personal or group access token over HTTP).

use base64::Engine;
use gitproxy_proto::v1::Header;
use gitproxy_shared::Secret;

/// Whether the caller brought its own GitLab credentials, in any form GitLab
/// reads (see `gitproxy_shared::credentials`: header spellings with `_`,
/// percent-encoded, nested and `;`-separated query names, `bearer_token`,
/// ...). Sessions (`Cookie`) and `Sudo` do not count: they do not
/// authenticate on their own.
pub fn caller_has_credentials(headers: &[Header], target: &str) -> bool {
    gitproxy_shared::credentials::has_credentials(headers.iter().map(|h| h.name.as_str()), target)
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

    /// Every spelling GitLab (Rack) reads as a credential counts as the
    /// caller's own, so the connection's token is not added on top.
    #[test]
    fn recognises_every_credential_form() {
        let h = |name: &str| {
            vec![Header {
                name: name.into(),
                value: b"x".to_vec(),
            }]
        };
        for name in [
            "private_token",
            "job_token",
            "deploy_token",
            "x-gitlab-static-object-token",
        ] {
            assert!(caller_has_credentials(&h(name), "/api/v4/user"), "{name}");
        }
        for q in [
            "private%5Ftoken=x",
            "%70rivate_token=x",
            "page=1;private_token=x",
            "bearer_token=x",
            "private_token[]=x",
            "private_token%5Bx%5D=x",
            "token=x",
            "feed_token=x",
        ] {
            assert!(
                caller_has_credentials(&[], &format!("/api/v4/user?{q}")),
                "{q}"
            );
        }
        assert!(!caller_has_credentials(
            &[],
            "/api/v4/user?per_page=1&tokens=2"
        ));
    }
}
