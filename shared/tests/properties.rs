//! Property tests of the classes of hole issue 10 closed: the request policy,
//! the credential filter, the GitLab URL validator and the URL join. Each is
//! compared with a reference written here independently (decode, normalise,
//! then decide), over inputs drawn from alphabets rich in the characters
//! parsers disagree on.
//!
//! Every test function is named `prop_*`. They use proptest's default
//! configuration, so `PROPTEST_CASES` sets the number of cases (256 by
//! default; `scripts/fuzz.sh` runs many more).

use gitproxy_shared::credentials::{
    has_credentials, is_cloud_credential_header, query_has_auth, strip_query_credentials,
};
use gitproxy_shared::gitlab_url::{join, parse_gitlab_url, relative_target};
use gitproxy_shared::policy::Policy;
use gitproxy_shared::upstream::{ProxySettings, Upstream, UpstreamConfig};
use proptest::prelude::*;
use proptest::sample::select;
use std::sync::OnceLock;
use std::time::Duration;
use url::Url;

// === reference implementations ===

/// Percent-decodes once, as a server does; malformed escapes stay.
fn decode(s: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' {
            if let (Some(h), Some(l)) = (
                s.get(i + 1).copied().and_then(hex),
                s.get(i + 2).copied().and_then(hex),
            ) {
                out.push(h * 16 + l);
                i += 3;
                continue;
            }
        }
        out.push(s[i]);
        i += 1;
    }
    out
}

/// The path a server ends up serving: decoded once, backslashes read as
/// slashes, dot segments resolved.
fn normalised_path(path: &str) -> Vec<Vec<u8>> {
    let decoded: Vec<u8> = decode(path.as_bytes())
        .into_iter()
        .map(|b| if b == b'\\' { b'/' } else { b })
        .collect();
    let mut out: Vec<Vec<u8>> = Vec::new();
    for seg in decoded.split(|b| *b == b'/').skip(1) {
        match seg {
            b"." => {}
            b".." => {
                out.pop();
            }
            s => out.push(s.to_vec()),
        }
    }
    out
}

/// Whether a request may reach GitLab: a method GitLab serves, origin form,
/// and a path that, once decoded and normalised, is in the REST API or git
/// smart HTTP (or the `.git`-less handshake GitLab redirects).
fn reference_allows(method: &str, target: &str) -> bool {
    let methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];
    if !methods.contains(&method) {
        return false;
    }
    if !target.starts_with('/') || target.starts_with("//") {
        return false;
    }
    let path = target.split('?').next().unwrap_or("");
    let segs = normalised_path(path);
    let s: Vec<&[u8]> = segs.iter().map(Vec::as_slice).collect();
    let api = s.len() >= 2 && s[0] == b"api" && s[1] == b"v4";
    let graphql = s == [b"api".as_slice(), b"graphql".as_slice()];
    let git = s.iter().enumerate().any(|(i, seg)| {
        let repo = seg.len() > ".git".len() && seg.ends_with(b".git");
        let smart_http = matches!(
            &s[i + 1..],
            [b"info", b"refs"] | [b"git-upload-pack"] | [b"git-receive-pack"]
        );
        let lfs = s.len() > i + 3 && s[i + 1] == b"info" && s[i + 2] == b"lfs";
        repo && (smart_http || lfs)
    });
    // The `.git`-less clone handshake, which GitLab answers with a redirect
    // to the `.git` path: GET/HEAD of /<namespace>/<project>/info/refs, no
    // query or exactly one git service.
    let query = target.split_once('?').map(|(_, q)| q).unwrap_or("");
    let n = s.len();
    let gitless = (method == "GET" || method == "HEAD")
        && n >= 4
        && s[n - 2] == b"info"
        && s[n - 1] == b"refs"
        && s[..n - 2].iter().all(|seg| !seg.is_empty())
        && matches!(
            query,
            "" | "service=git-upload-pack" | "service=git-receive-pack"
        );
    api || graphql || git || gitless
}

const AUTH_PARAMS: [&str; 7] = [
    "private_token",
    "access_token",
    "bearer_token",
    "job_token",
    "token",
    "feed_token",
    "rss_token",
];

/// Rack's reading of one query piece's name: `+` is a space, `%XX` a byte,
/// spaces after the separator skipped; the base names Rack 2 and Rack 3 give
/// a nested name.
fn rack_base_names(piece: &str) -> Vec<Vec<u8>> {
    let name = piece.split('=').next().unwrap_or("");
    let name: Vec<u8> = decode(name.replace('+', " ").as_bytes());
    let name: Vec<u8> = name.into_iter().skip_while(|b| *b == b' ').collect();
    let rack2: Vec<u8> = name
        .iter()
        .copied()
        .skip_while(|b| *b == b'[' || *b == b']')
        .take_while(|b| *b != b'[' && *b != b']')
        .collect();
    let rack3: Vec<u8> = match name.iter().skip(1).position(|b| *b == b'[') {
        Some(i) => name[..=i].to_vec(),
        None => name.clone(),
    };
    vec![rack2, rack3]
}

fn reference_is_credential(piece: &str, with_sudo: bool) -> bool {
    rack_base_names(piece).iter().any(|n| {
        AUTH_PARAMS.iter().any(|a| a.as_bytes() == n.as_slice())
            || (with_sudo && n.as_slice() == b"sudo")
    })
}

fn split_pieces(q: &str) -> Vec<&str> {
    q.split(['&', ';']).collect()
}

// === strategies ===

/// Percent-encodes some characters of `s` (upper or lower hex, `%` too).
fn encode_some(s: String) -> impl Strategy<Value = String> {
    let n = s.len();
    prop::collection::vec(0u8..6, n).prop_map(move |modes| {
        let mut out = String::new();
        for (b, m) in s.bytes().zip(modes) {
            match m {
                0 => out.push_str(&format!("%{b:02X}")),
                1 => out.push_str(&format!("%{b:02x}")),
                _ => out.push(b as char),
            }
        }
        out
    })
}

fn policy_target() -> impl Strategy<Value = String> {
    let prefixes = select(vec![
        "/api/v4",
        "/api/v4/",
        "/api/graphql",
        "/api/",
        "/g/p.git/",
        "/g/p.git/info/refs",
        "/g/p.git/info/lfs/",
        "/g/p/info/refs",
        "/g/p/info/refs?service=git-upload-pack",
        "/",
        "",
        "//",
    ]);
    let tokens = select(vec![
        "/",
        ".",
        "..",
        "%",
        "2",
        "e",
        "E",
        "f",
        "F",
        "5",
        "c",
        "C",
        "\\",
        "?",
        "#",
        ";",
        "a",
        "api",
        "v4",
        "graphql",
        ".git",
        "info",
        "refs",
        "lfs",
        "git-upload-pack",
        "git-receive-pack",
        "admin",
        "%2e",
        "%2E",
        "%2f",
        "%2F",
        "%5c",
        "%00",
        "%25",
        "/..",
        "/.",
        "../",
        "p.git",
        "/.git",
        ".git/",
        "/info/refs",
        "/git-upload-pack",
        "/git-receive-pack",
        "/info/lfs/",
        "/api/v4/",
        "/api/graphql",
        "%2e%2e",
        "/%2e%2e",
        "%2F..",
        "..%2F",
        "%5C..",
        "/x",
    ]);
    (prefixes, prop::collection::vec(tokens, 0..12))
        .prop_map(|(p, t)| format!("{p}{}", t.concat()))
        .prop_flat_map(|s| {
            // Either as built, or with some characters percent-encoded.
            (Just(s.clone()), encode_some(s), any::<bool>()).prop_map(|(plain, enc, pick)| {
                if pick {
                    plain
                } else {
                    enc
                }
            })
        })
}

fn method() -> impl Strategy<Value = String> {
    select(vec![
        "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "get", "Post", "PROPFIND",
        "CONNECT", "TRACE", "TRACK", "FOO", "",
    ])
    .prop_map(String::from)
}

fn credential_piece() -> impl Strategy<Value = String> {
    let names = select(vec![
        "private_token",
        "access_token",
        "bearer_token",
        "job_token",
        "token",
        "feed_token",
        "rss_token",
        "sudo",
    ]);
    let nest = select(vec!["", "", "[]", "[a]", "[a][b]", "%5B%5D", "%5b0%5d"]);
    let lead = select(vec!["", "", "[", "+", "%20"]);
    (names, nest, lead, any::<bool>())
        .prop_flat_map(|(n, nest, lead, has_value)| {
            (
                encode_some(n.to_string()),
                Just(nest),
                Just(lead),
                Just(has_value),
            )
        })
        .prop_map(|(n, nest, lead, has_value)| {
            let value = if has_value { "=v%2F+1" } else { "" };
            format!("{lead}{n}{nest}{value}")
        })
}

fn plain_piece() -> impl Strategy<Value = String> {
    let names = select(vec![
        "page",
        "per_page",
        "ref",
        "x",
        "tokens",
        "private",
        "id",
        "a%5Fb",
        "tok%65",
        "PRIVATE_TOKEN",
        "private-token",
        "",
        "%zz",
    ]);
    let values = select(vec![
        "",
        "=",
        "=1",
        "=a%2Fb",
        "=a+b",
        "=private_token",
        "=%E2%9C%93",
        "=[x]",
    ]);
    (names, values).prop_map(|(n, v)| format!("{n}{v}"))
}

fn query() -> impl Strategy<Value = String> {
    let piece = prop_oneof![credential_piece(), plain_piece()];
    (
        prop::collection::vec(piece, 0..8),
        prop::collection::vec(select(vec!['&', ';']), 8),
    )
        .prop_map(|(pieces, seps)| {
            let mut q = String::new();
            for (i, p) in pieces.iter().enumerate() {
                if i > 0 {
                    q.push(seps[i]);
                }
                q.push_str(p);
            }
            q
        })
}

fn header_name() -> impl Strategy<Value = String> {
    let names = select(vec![
        "private-token",
        "authorization",
        "job-token",
        "deploy-token",
        "x-gitlab-static-object-token",
        "sudo",
        "cookie",
        "gitlab-kas-api-request",
        "accept",
        "content-type",
        "x-private-token",
        "private-tokens",
        "user-agent",
    ]);
    (names, prop::collection::vec(any::<(bool, bool)>(), 32)).prop_map(|(n, flips)| {
        n.chars()
            .zip(flips)
            .map(|(c, (upper, underscore))| match c {
                '-' if underscore => '_',
                c if upper => c.to_ascii_uppercase(),
                c => c,
            })
            .collect()
    })
}

fn url_candidate() -> impl Strategy<Value = String> {
    let schemes = select(vec![
        "http://",
        "https://",
        "HTTPS://",
        "ftp://",
        "http:",
        "http:///",
        "",
        "http:\\\\",
    ]);
    let hosts = select(vec![
        "gitlab.example",
        "GitLab.Example",
        "127.0.0.1",
        "[::1]",
        "",
        "a..b",
        "user:pw@h",
        "h@",
        "xn--gitlb-gra.example",
    ]);
    let ports = select(vec!["", "", ":8080", ":443", ":0", ":99999", ":"]);
    let tokens = select(vec![
        "/", "gitlab", ".", "..", "%2e", "%2E", "%2f", "%5C", "#", "?", "@", "\\", " ", "a", "b.c",
        "~", "%", "x=y", ";", "%41", "\t", "//",
    ]);
    (schemes, hosts, ports, prop::collection::vec(tokens, 0..6))
        .prop_map(|(s, h, p, t)| format!("{s}{h}{p}{}", t.concat()))
}

fn bases() -> &'static [(Url, Upstream)] {
    static BASES: OnceLock<Vec<(Url, Upstream)>> = OnceLock::new();
    BASES.get_or_init(|| {
        gitproxy_shared::tls::install_default_provider();
        [
            "http://127.0.0.1:1",
            "https://gitlab.example/gitlab/",
            "http://[::1]:8080/a/b.c",
        ]
        .iter()
        .map(|b| {
            let url = parse_gitlab_url(b).expect("a valid base");
            let up = Upstream::new(UpstreamConfig {
                base_url: url.clone(),
                extra_ca_pem: Vec::new(),
                proxy: ProxySettings::default(),
                connect_timeout: Duration::from_secs(1),
                policy: Policy::default(),
            })
            .expect("an upstream");
            (url, up)
        })
        .collect()
    })
}

fn has_dot_segment(path: &str) -> bool {
    path.split('/')
        .any(|seg| matches!(decode(seg.as_bytes()).as_slice(), b"." | b".."))
}

// === properties ===

proptest! {
    /// Nothing the policy allows is outside the API / git space once decoded
    /// and normalised, and only GitLab's methods pass.
    #[test]
    fn prop_policy_allows_nothing_outside_the_api_and_git(m in method(), t in policy_target()) {
        if Policy::default().check(&m, &t).is_ok() {
            prop_assert!(reference_allows(&m, &t), "{m} {t} allowed");
        }
    }

    /// The GitLab client refuses what the policy refuses, and what it sends
    /// stays under the base and inside the policy.
    #[test]
    fn prop_request_urls_stay_under_the_base(m in method(), t in policy_target(), i in 0usize..3) {
        let (base, up) = &bases()[i];
        let Ok(method) = http::Method::from_bytes(m.as_bytes()) else { return Ok(()) };
        if let Ok(url) = up.request_url(&method, &t) {
            prop_assert!(Policy::default().check(&m, &t).is_ok());
            let rel = relative_target(base, &url);
            prop_assert!(rel.is_some(), "{url} is outside {base}");
            let rel = rel.unwrap_or_default();
            prop_assert!(reference_allows(&m, &rel), "{m} {t} sent as {url}");
        }
    }

    /// After filtering, no piece of the query is a credential (or `sudo`) as
    /// Rack reads it, and every other piece survives byte for byte, in order.
    #[test]
    fn prop_query_filter_leaves_no_credential(q in query()) {
        let out = strip_query_credentials(&q).unwrap_or_default();
        let kept: Vec<&str> = if out.is_empty() { vec![] } else { split_pieces(&out) };
        for p in &kept {
            prop_assert!(!reference_is_credential(p, true), "{p:?} survived in {out:?} from {q:?}");
        }
        let want: Vec<&str> = if q.is_empty() {
            vec![]
        } else {
            split_pieces(&q).into_iter().filter(|p| !reference_is_credential(p, true)).collect()
        };
        let want: Vec<&str> = if want.iter().all(|p| p.is_empty()) && kept.is_empty() { vec![] } else { want };
        prop_assert_eq!(kept, want, "from {:?}", q);
        let any_auth = split_pieces(&q).iter().any(|p| reference_is_credential(p, false));
        prop_assert_eq!(query_has_auth(&q), any_auth, "{:?}", q);
        prop_assert_eq!(has_credentials(std::iter::empty(), &format!("/api/v4/x?{q}")), any_auth);
    }

    /// Header names: every spelling of a credential header is dropped,
    /// nothing else is.
    #[test]
    fn prop_header_filter_matches_rack(names in prop::collection::vec(header_name(), 0..8)) {
        let mut h = http::HeaderMap::new();
        for n in &names {
            h.append(
                http::HeaderName::from_bytes(n.as_bytes()).expect("a header name"),
                http::HeaderValue::from_static("v"),
            );
        }
        gitproxy_shared::credentials::strip_header_credentials(&mut h);
        for n in &names {
            let rack = format!("HTTP_{}", n.to_ascii_uppercase().replace('-', "_"));
            let credential = [
                "HTTP_PRIVATE_TOKEN", "HTTP_AUTHORIZATION", "HTTP_JOB_TOKEN", "HTTP_DEPLOY_TOKEN",
                "HTTP_X_GITLAB_STATIC_OBJECT_TOKEN", "HTTP_SUDO", "HTTP_COOKIE",
                "HTTP_GITLAB_KAS_API_REQUEST",
            ]
            .contains(&rack.as_str());
            prop_assert_eq!(is_cloud_credential_header(n), credential, "{}", n);
            prop_assert_eq!(h.contains_key(n.to_ascii_lowercase().as_str()), !credential, "{}", n);
        }
    }

    /// What the validator accepts round-trips and has no query, fragment,
    /// userinfo or dot segment.
    #[test]
    fn prop_accepted_gitlab_urls_are_plain(s in url_candidate()) {
        if let Ok(u) = parse_gitlab_url(&s) {
            prop_assert!(matches!(u.scheme(), "http" | "https"), "{}", s);
            prop_assert!(u.host_str().is_some_and(|h| !h.is_empty()), "{}", s);
            prop_assert!(u.query().is_none() && u.fragment().is_none(), "{}", s);
            prop_assert!(u.username().is_empty() && u.password().is_none(), "{}", s);
            prop_assert!(!has_dot_segment(u.path()), "{}", s);
            prop_assert!(!s.contains(['#', '?', '@', '\\', ' ']), "{}", s);
            prop_assert_eq!(parse_gitlab_url(u.as_str()), Ok(u.clone()));
        }
    }

    /// Joining any target onto any accepted base stays on the base's origin
    /// and under its path, and keeps the target's bytes.
    #[test]
    fn prop_join_never_leaves_the_base(s in url_candidate(), t in policy_target()) {
        let Ok(base) = parse_gitlab_url(&s) else { return Ok(()) };
        if let Ok(url) = join(&base, &t) {
            prop_assert_eq!(url.origin(), base.origin());
            let prefix = base.path().trim_end_matches('/');
            prop_assert!(url.path().starts_with(&format!("{prefix}/")), "{} from {} + {}", url, base, t);
            prop_assert!(url.fragment().is_none() && url.username().is_empty());
            let rel = relative_target(&base, &url);
            prop_assert!(rel.is_some());
            if !t.contains([' ', '"', '<', '>', '`', '{', '}', '\'']) && !t.contains(|c: char| c.is_control()) {
                prop_assert_eq!(rel.unwrap_or_default(), t);
            }
        }
    }
}
