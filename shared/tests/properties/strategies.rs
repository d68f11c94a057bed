//! Strategies: inputs drawn from alphabets rich in the characters parsers
//! disagree on.

use super::*;

/// Percent-encodes some characters of `s` (upper or lower hex, `%` too).
pub(super) fn encode_some(s: String) -> impl Strategy<Value = String> {
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

pub(super) fn policy_target() -> impl Strategy<Value = String> {
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

pub(super) fn method() -> impl Strategy<Value = String> {
    select(vec![
        "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "get", "Post", "PROPFIND",
        "CONNECT", "TRACE", "TRACK", "FOO", "",
    ])
    .prop_map(String::from)
}

pub(super) fn credential_piece() -> impl Strategy<Value = String> {
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

pub(super) fn plain_piece() -> impl Strategy<Value = String> {
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

pub(super) fn query() -> impl Strategy<Value = String> {
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

pub(super) fn header_name() -> impl Strategy<Value = String> {
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

pub(super) fn url_candidate() -> impl Strategy<Value = String> {
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

pub(super) fn bases() -> &'static [(Url, Upstream)] {
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

pub(super) fn has_dot_segment(path: &str) -> bool {
    path.split('/')
        .any(|seg| matches!(decode(seg.as_bytes()).as_slice(), b"." | b".."))
}
