//! GitLab credentials in a request, recognised the way GitLab reads them.
//!
//! The broker asks [`has_credentials`] whether a caller brought its own
//! GitLab credentials (then the connection's token is not added); an agent
//! holding its own token calls [`strip_header_credentials`] and
//! [`strip_query_credentials`] so that nothing the cloud sent can
//! authenticate, impersonate or ride a session at GitLab.
//!
//! What GitLab accepts, from its source:
//! - `lib/gitlab/auth/auth_finders.rb`: query parameters `private_token`,
//!   `job_token`, `token` (runner, job and static-object tokens),
//!   `feed_token` and `rss_token`; headers `PRIVATE-TOKEN`, `JOB-TOKEN`,
//!   `DEPLOY-TOKEN`, `X-Gitlab-Static-Object-Token`, `Authorization` (Basic,
//!   and Bearer through Doorkeeper), the KAS agent headers
//!   (`Gitlab-Agentk-Api-Request`, `Gitlab-Agent-Api-Request`); the Rails
//!   session through Warden (the `_gitlab_session` cookie).
//! - `config/initializers/doorkeeper.rb`: `access_token_methods
//!   :from_access_token_param, :from_bearer_authorization, :from_bearer_param`,
//!   i.e. Doorkeeper's `OAuth::Token::Methods` read `params[:access_token]`,
//!   `Authorization: Bearer` and `params[:bearer_token]`.
//! - `lib/api/helpers.rb`: `SUDO_PARAM = :sudo` and `SUDO_HEADER =
//!   "HTTP_SUDO"` (impersonation with an admin token: with the agent's own
//!   token the cloud must not choose whom it acts as), and the internal
//!   `Gitlab-Shared-Secret`; `lib/gitlab/kas.rb`: `Gitlab-Kas-Api-Request`;
//!   `Gitlab-Shell-Api-Request` and `Gitlab-Workhorse-Api-Request` are the
//!   other internal JWT headers.
//!
//! How Rack turns a request into those names:
//! - Headers reach Rails as `HTTP_` + the name upper-cased with `-` turned
//!   into `_`, so `Private-Token`, `PRIVATE_TOKEN` and `private_token` are
//!   all `HTTP_PRIVATE_TOKEN`: header names are compared case-insensitively
//!   with `_` and `-` equal.
//! - `Rack::QueryParser#parse_nested_query` (and Rails'
//!   `ActionDispatch::QueryParser`) split the query on `&` and, in the
//!   versions GitLab has shipped, `;`; each name is unescaped with
//!   `URI.decode_www_form_component` (`+` is a space, `%XX` a byte); a nested
//!   name (`private_token[]`, `private_token[a][b]`) sets the parameter of its
//!   base name. Rack 2 takes the base name after leading brackets
//!   (`[private_token]` is `private_token`), Rack 3 the part before the first
//!   `[` after the first character; both are checked. Names are
//!   case-sensitive.
//!
//! Credentials in request bodies (form or JSON parameters) are not seen here:
//! the body streams through untouched.

use percent_encoding::percent_decode;

/// Header names (lower case, `-` form) that authenticate at GitLab.
const AUTH_HEADERS: [&str; 11] = [
    "private-token",
    "authorization",
    "job-token",
    "deploy-token",
    "x-gitlab-static-object-token",
    "gitlab-agentk-api-request",
    "gitlab-agent-api-request",
    "gitlab-kas-api-request",
    "gitlab-shell-api-request",
    "gitlab-workhorse-api-request",
    "gitlab-shared-secret",
];

/// Headers an agent holding its own token drops besides [`AUTH_HEADERS`]:
/// impersonation and the session.
const CLOUD_ONLY_HEADERS: [&str; 2] = ["sudo", "cookie"];

/// Query parameters (Rack base names) that authenticate at GitLab.
const AUTH_PARAMS: [&str; 7] = [
    "private_token",
    "access_token",
    "bearer_token",
    "job_token",
    "token",
    "feed_token",
    "rss_token",
];

/// Query parameters an agent holding its own token drops besides
/// [`AUTH_PARAMS`].
const CLOUD_ONLY_PARAMS: [&str; 1] = ["sudo"];

/// `name` lower-cased with `_` turned into `-` (how Rack sees it, modulo
/// case and the `HTTP_` prefix).
fn header_key(name: &str) -> String {
    name.chars()
        .map(|c| match c {
            '_' => '-',
            c => c.to_ascii_lowercase(),
        })
        .collect()
}

/// Whether a header authenticates at GitLab, in any spelling.
pub fn is_auth_header(name: &str) -> bool {
    AUTH_HEADERS.contains(&header_key(name).as_str())
}

/// Whether an agent holding its own token must drop this header: it
/// authenticates, impersonates (`Sudo`) or carries a session (`Cookie`).
pub fn is_cloud_credential_header(name: &str) -> bool {
    let key = header_key(name);
    AUTH_HEADERS.contains(&key.as_str()) || CLOUD_ONLY_HEADERS.contains(&key.as_str())
}

/// The query's pieces as Rack splits them: each with the separator before it
/// (`None` for the first).
fn pieces(query: &str) -> impl Iterator<Item = (Option<char>, &str)> {
    let mut rest = Some(query);
    let mut sep = None;
    std::iter::from_fn(move || {
        let q = rest?;
        let (piece, next) = match q.find(['&', ';']) {
            Some(i) => (&q[..i], Some((q[i..].chars().next(), &q[i + 1..]))),
            None => (q, None),
        };
        let this = (sep, piece);
        match next {
            Some((s, r)) => {
                sep = s;
                rest = Some(r);
            }
            None => rest = None,
        }
        Some(this)
    })
}

/// A piece's parameter name, decoded as Rack does (`+` is a space, `%XX` a
/// byte; invalid escapes are kept, where Rack would refuse the request).
fn decoded_name(piece: &str) -> Vec<u8> {
    let raw = piece.split('=').next().unwrap_or("");
    let plus: Vec<u8> = raw
        .bytes()
        .map(|b| if b == b'+' { b' ' } else { b })
        .collect();
    let name: Vec<u8> = percent_decode(&plus).collect();
    // Rack's separator pattern `[&;] *` swallows spaces after a separator.
    let start = name.iter().position(|b| *b != b' ').unwrap_or(name.len());
    name[start..].to_vec()
}

/// The base names Rack 2 and Rack 3 give a (decoded) parameter name.
fn base_names(name: &[u8]) -> [&[u8]; 2] {
    // Rack 2: `\A[\[\]]*([^\[\]]+)\]*`.
    let lead = name
        .iter()
        .position(|b| *b != b'[' && *b != b']')
        .unwrap_or(name.len());
    let after = &name[lead..];
    let end = after
        .iter()
        .position(|b| *b == b'[' || *b == b']')
        .unwrap_or(after.len());
    let rack2 = &after[..end];
    // Rack 3: up to the first `[` at index 1 or later.
    let rack3 = match name.iter().skip(1).position(|b| *b == b'[') {
        Some(i) => &name[..i + 1],
        None => name,
    };
    [rack2, rack3]
}

fn piece_in(piece: &str, names: &[&[&str]]) -> bool {
    let name = decoded_name(piece);
    base_names(&name).iter().any(|base| {
        names
            .iter()
            .any(|set| set.iter().any(|n| n.as_bytes() == *base))
    })
}

/// Whether a query holds a parameter that authenticates at GitLab.
pub fn query_has_auth(query: &str) -> bool {
    pieces(query).any(|(_, p)| piece_in(p, &[&AUTH_PARAMS]))
}

/// The query without the parameters an agent holding its own token drops
/// (credentials and `sudo`), rebuilt from the untouched original pieces;
/// `None` when nothing is left. A query without such parameters is returned
/// as it came.
pub fn strip_query_credentials(query: &str) -> Option<String> {
    let drop = |p: &str| piece_in(p, &[&AUTH_PARAMS, &CLOUD_ONLY_PARAMS]);
    if !pieces(query).any(|(_, p)| drop(p)) {
        return (!query.is_empty()).then(|| query.to_string());
    }
    let mut out = String::with_capacity(query.len());
    let mut first = true;
    for (sep, piece) in pieces(query) {
        if drop(piece) {
            continue;
        }
        if !first {
            out.push(sep.unwrap_or('&'));
        }
        first = false;
        out.push_str(piece);
    }
    (!out.is_empty()).then_some(out)
}

/// Whether a request (header names and origin-form target) carries GitLab
/// credentials of its own.
pub fn has_credentials<'a>(mut names: impl Iterator<Item = &'a str>, target: &str) -> bool {
    names.any(is_auth_header)
        || target
            .split_once('?')
            .is_some_and(|(_, q)| query_has_auth(q))
}

/// Removes every header an agent holding its own token must not pass on.
pub fn strip_header_credentials(headers: &mut http::HeaderMap) {
    let names: Vec<http::HeaderName> = headers
        .keys()
        .filter(|n| is_cloud_credential_header(n.as_str()))
        .cloned()
        .collect();
    for n in names {
        headers.remove(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_in_every_spelling() {
        for n in [
            "PRIVATE-TOKEN",
            "private_token",
            "Private_Token",
            "authorization",
            "JOB_TOKEN",
            "deploy_token",
            "X-Gitlab-Static-Object-Token",
            "gitlab_kas_api_request",
        ] {
            assert!(is_auth_header(n), "{n}");
            assert!(is_cloud_credential_header(n), "{n}");
        }
        for n in ["cookie", "Cookie", "sudo", "SUDO"] {
            assert!(!is_auth_header(n), "{n}");
            assert!(is_cloud_credential_header(n), "{n}");
        }
        for n in [
            "content-type",
            "private-tokens",
            "x-private-token",
            "accept",
        ] {
            assert!(!is_cloud_credential_header(n), "{n}");
        }
    }

    #[test]
    fn strips_header_credentials() {
        let mut h = http::HeaderMap::new();
        for (n, v) in [
            ("private_token", "a"),
            ("private-token", "b"),
            ("cookie", "_gitlab_session=c"),
            ("sudo", "root"),
            ("authorization", "Bearer d"),
            ("accept", "application/json"),
        ] {
            h.append(
                http::HeaderName::from_bytes(n.as_bytes()).unwrap(),
                http::HeaderValue::from_static(v),
            );
        }
        strip_header_credentials(&mut h);
        assert_eq!(h.len(), 1);
        assert_eq!(h["accept"], "application/json");
    }

    #[test]
    fn query_forms_rack_reads() {
        for q in [
            "private_token=x",
            "private%5Ftoken=x",
            "private%5ftoken=x",
            "%70%72%69%76%61%74%65%5F%74%6F%6B%65%6E=x",
            "a=1;private_token=x",
            "a=1&private_token",
            "bearer_token=x",
            "access_token=x",
            "job_token=x",
            "token=x",
            "feed_token=x",
            "rss_token=x",
            "private_token[]=x",
            "private_token%5B%5D=x",
            "private_token[a][b]=x",
            "[private_token]=x",
            "%5Bprivate_token%5D=x",
            "a=1&+private_token=x",
        ] {
            assert!(query_has_auth(q), "{q}");
            let want = q.starts_with("a=1").then(|| "a=1".to_string());
            assert_eq!(strip_query_credentials(q), want, "{q}");
        }
        for q in [
            "PRIVATE_TOKEN=x",
            "tokens=x",
            "private-token=x",
            "page=1&private%255Ftoken=x",
            "x=private_token",
        ] {
            assert!(!query_has_auth(q), "{q}");
        }
        assert!(!query_has_auth("sudo=root"));
    }

    #[test]
    fn keeps_the_rest_byte_exact() {
        assert_eq!(
            strip_query_credentials("page=2&private_token=x&per_page=5&ref=a%2Fb").as_deref(),
            Some("page=2&per_page=5&ref=a%2Fb")
        );
        assert_eq!(
            strip_query_credentials("a=1;sudo=root;b=%20+&c").as_deref(),
            Some("a=1;b=%20+&c")
        );
        assert_eq!(strip_query_credentials("private_token=x&sudo=1"), None);
        assert_eq!(
            strip_query_credentials("a=1&&b=2").as_deref(),
            Some("a=1&&b=2")
        );
        assert_eq!(strip_query_credentials(""), None);
    }

    #[test]
    fn has_credentials_looks_at_headers_and_query() {
        assert!(has_credentials(["job_token"].into_iter(), "/api/v4/user"));
        assert!(has_credentials(
            std::iter::empty(),
            "/api/v4/user?x=1;private%5Ftoken=t"
        ));
        assert!(!has_credentials(
            ["cookie", "sudo"].into_iter(),
            "/api/v4/user?sudo=1"
        ));
    }
}
