//! GitLab base URLs: the one strict validator every entry point uses (the
//! broker's config file and connection API, the agent's pin, the URL a broker
//! sends in Welcome, the HTTP client itself), and the join of a request target
//! onto a base.
//!
//! A base URL is where every request of a connection goes, so anything a URL
//! parser reads differently from how an operator reads it is refused rather
//! than normalised: a fragment (`https://gitlab/#` + `/api/v4/...` is a
//! request for `/`), a query (also a bare `?`), userinfo, `.`/`..` segments
//! (also percent-encoded), backslashes, whitespace and control characters, an
//! empty host or path segment. `url::Url::parse` silently resolves or drops
//! several of these, so the raw string is checked first, then the parsed URL.
//!
//! [`join`] builds the URL of one request with the URL library, keeping the
//! caller's percent-encoding (`projects/group%2Fproject` stays `%2F`), and
//! checks the result: same origin as the base, path under the base path,
//! exactly the target's path and query.

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, CONTROLS};
use std::borrow::Cow;
use url::Url;

/// How many characters of a refused URL an error message shows.
const SHOWN_CHARS: usize = 120;

/// Characters `url` percent-encodes in a path; encoding them first means
/// `Url::set_path` changes nothing, so the result can be compared exactly.
const PATH: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'`')
    .add(b'{')
    .add(b'}');

/// The same for the query of an `http(s)` URL.
const QUERY: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'<')
    .add(b'>')
    .add(b'\'');

/// A refused GitLab base URL. The message shows the URL only up to its query
/// or fragment, and not at all when it holds `@` (userinfo may be a
/// password), so it never echoes a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{shown} is not a usable GitLab base URL: {reason}")]
pub struct GitlabUrlError {
    shown: String,
    reason: String,
}

impl GitlabUrlError {
    fn new(raw: &str, reason: impl Into<String>) -> Self {
        GitlabUrlError {
            shown: shown(raw),
            reason: reason.into(),
        }
    }

    /// Why the URL was refused, without the URL.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

fn shown(raw: &str) -> String {
    if raw.contains('@') {
        return "the URL (not shown: it holds '@', which may carry credentials)".into();
    }
    let cut = raw.find(['?', '#']).unwrap_or(raw.len());
    let mut s: String = raw[..cut].chars().take(SHOWN_CHARS).collect();
    if s.len() < raw.len() {
        s.push_str("...");
    }
    format!("{s:?}")
}

/// Validates a GitLab base URL: `http` or `https`, a host, an optional port,
/// an optional path (a trailing `/` is fine), nothing else.
pub fn parse_gitlab_url(raw: &str) -> Result<Url, GitlabUrlError> {
    let refuse = |why: &str| Err(GitlabUrlError::new(raw, why));
    if raw.is_empty() {
        return refuse("it is empty");
    }
    if raw.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return refuse("it holds whitespace or a control character");
    }
    if raw.contains('\\') {
        return refuse("it holds a backslash");
    }
    if raw.contains('@') {
        return refuse(
            "it holds '@': credentials (userinfo) do not belong in the URL, give the token separately",
        );
    }
    if raw.contains('#') {
        return refuse("it holds '#' (a fragment), which would swallow the request path");
    }
    if raw.contains('?') {
        return refuse("it holds '?' (a query)");
    }
    let Some((scheme, rest)) = raw.split_once("://") else {
        return refuse("it must start with http:// or https://");
    };
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return refuse("it must start with http:// or https://");
    }
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    if authority.is_empty() || authority.starts_with(':') {
        return refuse("it has no host");
    }
    if let Err(why) = check_raw_path(path) {
        return refuse(why);
    }
    let url = Url::parse(raw).or_else(|e| refuse(&format!("it does not parse: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") || url.cannot_be_a_base() {
        return refuse("it must start with http:// or https://");
    }
    if url.host_str().is_none_or(str::is_empty) {
        return refuse("it has no host");
    }
    if url.port() == Some(0) {
        return refuse("port 0 is not a port");
    }
    if !url.username().is_empty()
        || url.password().is_some()
        || url.query().is_some()
        || url.fragment().is_some()
    {
        return refuse("it must carry no credentials, query or fragment");
    }
    // The parser must not have rewritten the path (resolved a segment,
    // encoded a character): what the operator wrote is what is used.
    let want = if path.is_empty() { "/" } else { path };
    if url.path() != want {
        return refuse(
            "its path is not in normal form (non-ASCII characters must be percent-encoded)",
        );
    }
    Ok(url)
}

/// The path as written: no empty, `.` or `..` segment (also percent-encoded),
/// no encoded separator, well-formed percent-encoding.
fn check_raw_path(path: &str) -> Result<(), &'static str> {
    if path.is_empty() || path == "/" {
        return Ok(());
    }
    let body = path.strip_suffix('/').unwrap_or(path);
    for seg in body.split('/').skip(1) {
        if seg.is_empty() {
            return Err("it has an empty path segment ('//')");
        }
        let bytes = seg.as_bytes();
        for (i, b) in bytes.iter().enumerate() {
            if *b == b'%'
                && !(bytes.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                    && bytes.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
            {
                return Err("it holds a '%' that does not start a percent-encoded byte");
            }
        }
        let decoded: Vec<u8> = percent_decode_str(seg).collect();
        if decoded == b"." || decoded == b".." {
            return Err("it has a '.' or '..' path segment");
        }
        if decoded
            .iter()
            .any(|b| matches!(b, b'/' | b'\\' | b'?' | b'#' | b'@') || b.is_ascii_control())
        {
            return Err(
                "its path holds a percent-encoded '/', '\\', '?', '#', '@' or control character",
            );
        }
    }
    Ok(())
}

/// The scheme, host and port of a URL (`https://gitlab.example:8443`).
pub fn origin(url: &Url) -> String {
    url.origin().ascii_serialization()
}

/// The URL of one request: `target` (origin form, `/path?query`, relative to
/// the base) appended to the base path. Fails, saying why, when the base is
/// not a plain base URL or the result would leave it.
pub fn join(base: &Url, target: &str) -> Result<Url, String> {
    if !matches!(base.scheme(), "http" | "https")
        || base.cannot_be_a_base()
        || base.host_str().is_none_or(str::is_empty)
        || !base.username().is_empty()
        || base.password().is_some()
        || base.query().is_some()
        || base.fragment().is_some()
    {
        return Err("the GitLab base URL has userinfo, a query or a fragment".into());
    }
    if !target.starts_with('/') || target.starts_with("//") {
        return Err("the request target is not in origin form".into());
    }
    if target.contains('#') {
        return Err("the request target holds '#'".into());
    }
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let prefix = base.path().trim_end_matches('/');
    let want_path = format!("{prefix}{}", utf8_percent_encode(path, PATH));
    let want_query = query.map(|q| utf8_percent_encode(q, QUERY).to_string());
    let mut url = base.clone();
    url.set_path(&want_path);
    url.set_query(want_query.as_deref());
    let same_origin = url.scheme() == base.scheme()
        && url.host() == base.host()
        && url.port_or_known_default() == base.port_or_known_default()
        && url.username().is_empty()
        && url.password().is_none()
        && url.fragment().is_none();
    if !same_origin {
        return Err("the request URL would leave the GitLab origin".into());
    }
    if url.path() != want_path || url.query() != want_query.as_deref() {
        return Err(
            "the request path would be rewritten (dot segments, backslashes or odd characters)"
                .into(),
        );
    }
    if relative_target(base, &url).is_none() {
        return Err("the request path would leave the GitLab base path".into());
    }
    Ok(url)
}

/// A base URL prepared to join many targets: [`JoinBase::join`] accepts and
/// refuses exactly what [`join`] does and gives the same URL (the test
/// `join_base_agrees_with_join` checks that over generated targets), without
/// parsing a URL per request: the origin and path prefix are serialised
/// once, the target is percent-encoded the way `url` would, and the one
/// rewrite `url` could still make to an encoded path (backslashes as
/// separators, `.`/`..` segments also as `%2e`) is refused.
#[derive(Debug, Clone)]
pub struct JoinBase {
    /// `scheme://authority` and the base path without its trailing `/`.
    prefix: String,
}

impl JoinBase {
    /// Prepares `base`; fails as [`join`] would for any target.
    pub fn new(base: &Url) -> Result<Self, String> {
        join(base, "/")?;
        let mut prefix = base[..url::Position::BeforePath].to_string();
        prefix.push_str(base.path().trim_end_matches('/'));
        Ok(JoinBase { prefix })
    }

    /// The URI of one request for `target` (origin form, relative to the
    /// base), and the target as sent (relative to the base, encoded).
    pub fn join<'t>(&self, target: &'t str) -> Result<(http::Uri, Cow<'t, str>), String> {
        if !target.starts_with('/') || target.starts_with("//") {
            return Err("the request target is not in origin form".into());
        }
        if target.contains('#') {
            return Err("the request target holds '#'".into());
        }
        let (raw_path, raw_query) = match target.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (target, None),
        };
        // A borrowed `Cow` may still differ from the input (a lone encoded
        // byte), so "unchanged" is decided by comparing.
        let path: Cow<'t, str> = utf8_percent_encode(raw_path, PATH).into();
        if path.contains('\\') || path.split('/').any(is_dot_segment) {
            return Err(
                "the request path would be rewritten (dot segments, backslashes or odd characters)"
                    .into(),
            );
        }
        let query: Option<Cow<'t, str>> = raw_query.map(|q| utf8_percent_encode(q, QUERY).into());
        let relative = if *path == *raw_path && query.as_deref() == raw_query {
            Cow::Borrowed(target)
        } else {
            match query {
                None => Cow::Owned(path.into_owned()),
                Some(q) => Cow::Owned(format!("{path}?{q}")),
            }
        };
        let mut s = String::with_capacity(self.prefix.len() + relative.len());
        s.push_str(&self.prefix);
        s.push_str(&relative);
        let uri =
            http::Uri::try_from(s).map_err(|_| "the request URL is not a valid URI".to_string())?;
        Ok((uri, relative))
    }
}

/// A segment `url` resolves as `.` or `..` (also percent-encoded, any case).
fn is_dot_segment(seg: &str) -> bool {
    [".", "%2e", "..", ".%2e", "%2e.", "%2e%2e"]
        .iter()
        .any(|d| seg.eq_ignore_ascii_case(d))
}

/// The origin-form target of `url` relative to `base` (`/api/v4/...?query`),
/// or `None` when `url` is not under the base's origin and path.
pub fn relative_target(base: &Url, url: &Url) -> Option<String> {
    if origin(base) != origin(url) {
        return None;
    }
    let prefix = base.path().trim_end_matches('/');
    let rest = url.path().strip_prefix(prefix)?;
    if !rest.starts_with('/') {
        return None;
    }
    Some(match url.query() {
        Some(q) => format!("{rest}?{q}"),
        None => rest.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_base_urls() {
        for (raw, want) in [
            ("https://gitlab.example", "https://gitlab.example/"),
            ("https://gitlab.example/", "https://gitlab.example/"),
            (
                "HTTPS://GitLab.Example:443/gitlab",
                "https://gitlab.example/gitlab",
            ),
            (
                "http://127.0.0.1:8080/gitlab/",
                "http://127.0.0.1:8080/gitlab/",
            ),
            (
                "https://[::1]:8443/a/b.c/%7Euser",
                "https://[::1]:8443/a/b.c/%7Euser",
            ),
        ] {
            let u = parse_gitlab_url(raw).unwrap_or_else(|e| panic!("{raw}: {e}"));
            assert_eq!(u.as_str(), want);
            assert_eq!(parse_gitlab_url(u.as_str()).unwrap(), u);
        }
    }

    #[test]
    fn refuses_everything_else_without_echoing_secrets() {
        for raw in [
            "",
            "https://gitlab.example/#",
            "https://gitlab.example#",
            "https://gitlab.example/base#x",
            "https://gitlab.example/?",
            "https://gitlab.example?private_token=glpat-SECRET",
            "https://user:SECRET@gitlab.example",
            "https://SECRET@gitlab.example",
            "https://gitlab.example/a/../b",
            "https://gitlab.example/..",
            "https://gitlab.example/.",
            "https://gitlab.example/a/%2e%2E/b",
            "https://gitlab.example/a/.%2e",
            "https://gitlab.example/a%2Fb",
            "https://gitlab.example/a%zz",
            "https://gitlab.example//a",
            "https://gitlab.example\\a",
            "https://gitlab.example/a b",
            " https://gitlab.example",
            "https://gitlab.example/\u{7f}",
            "http:gitlab.example",
            "http:///gitlab.example",
            "http://:80/",
            "http://gitlab.example:0/",
            "http://gitlab.example:99999/",
            "ftp://gitlab.example",
            "gitlab.example",
            "https://gitläb.example/gitläb",
        ] {
            let e = parse_gitlab_url(raw).expect_err(raw).to_string();
            assert!(!e.contains("SECRET"), "{raw}: {e}");
        }
    }

    fn base(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    #[test]
    fn joins_keeping_the_callers_encoding() {
        let b = base("https://gitlab.example/gitlab/");
        let u = join(&b, "/api/v4/projects/group%2Fproject?ref=a%2Fb&x=1;y=2").unwrap();
        assert_eq!(
            u.as_str(),
            "https://gitlab.example/gitlab/api/v4/projects/group%2Fproject?ref=a%2Fb&x=1;y=2"
        );
        assert_eq!(
            relative_target(&b, &u).unwrap(),
            "/api/v4/projects/group%2Fproject?ref=a%2Fb&x=1;y=2"
        );
        let b = base("http://127.0.0.1:8080");
        assert_eq!(
            join(&b, "/g/p.git/info/refs").unwrap().as_str(),
            "http://127.0.0.1:8080/g/p.git/info/refs"
        );
    }

    /// [`JoinBase::join`] agrees with [`join`] (and the `Uri` a client
    /// would make of its URL) on every target, hostile or not.
    #[test]
    fn join_base_agrees_with_join() {
        use proptest::prelude::*;
        let bases = [
            base("http://127.0.0.1:1/gitlab"),
            base("https://gitlab.example/"),
            base("https://gitlab.example:8443/a/b/"),
        ];
        let check = |t: &str| {
            for b in &bases {
                let old = join(b, t)
                    .ok()
                    .and_then(|u| u.as_str().parse::<http::Uri>().ok().map(|x| (x, u)));
                let new = JoinBase::new(b).unwrap().join(t).ok();
                match (old, new) {
                    (None, None) => {}
                    (Some((uri, url)), Some((nuri, rel))) => {
                        assert_eq!(uri, nuri, "{b} + {t:?}");
                        assert_eq!(uri.to_string(), url.as_str(), "{b} + {t:?}");
                        assert_eq!(relative_target(b, &url).unwrap(), rel, "{b} + {t:?}");
                    }
                    (o, n) => panic!("{b} + {t:?}: join {o:?}, JoinBase {n:?}"),
                }
            }
        };
        for t in [
            "/api/v4/projects/g%2Fp?ref=a%2Fb&x=1;y=2",
            "/api/v4/x y\"{}",
            "/api/%2e%2e/%2E%2E/admin",
            "/api/.%2E/x",
            "/api/%2e./x",
            "/api/./x",
            "/api\\..\\x",
            "/a//b",
            "/a?",
            "/a?b?c=é&d='\"<>",
            "/é/ü?%zz",
            "/%",
            "/x#y",
            "//evil/x",
            "/",
            "",
        ] {
            check(t);
        }
        proptest!(ProptestConfig::with_cases(4000), |(t in "/[a./%2eE\\\\?#\" {}<>`'~|^\\[\\]é\t;=&+:@-]{0,14}")| {
            check(&t);
        });
    }

    /// Hand-built hostile bases (which the validator refuses) and hostile
    /// targets never give a URL outside the base.
    #[test]
    fn join_refuses_to_leave_the_base() {
        for b in [
            "http://127.0.0.1:1/#",
            "http://127.0.0.1:1/base#x",
            "http://127.0.0.1:1/?",
            "http://127.0.0.1:1/?a=b",
            "http://u:p@127.0.0.1:1/",
        ] {
            assert!(join(&base(b), "/api/v4/version").is_err(), "{b}");
        }
        let b = base("http://127.0.0.1:1/gitlab");
        for t in [
            "/../admin",
            "/api/v4/../../admin",
            "/api/%2e%2e/%2E%2E/admin",
            "/api\\..\\..\\admin",
            "//evil.example/x",
            "http://evil.example/x",
            "/x#frag",
            "api/v4",
            "",
        ] {
            match join(&b, t) {
                Err(_) => {}
                Ok(u) => panic!("{t} joined to {u}"),
            }
        }
        // Bytes url would encode are encoded the same way, so they pass.
        assert_eq!(
            join(&b, "/api/v4/x y\"{}").unwrap().path(),
            "/gitlab/api/v4/x%20y%22%7B%7D"
        );
    }
}
