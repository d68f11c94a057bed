//! GitLab writes its own external URL into `Link` (pagination) and
//! `Location` headers. Those naming the connection's GitLab are rewritten to
//! the front-door base, so clients that follow them keep going through the
//! broker; other origins (object storage redirects) are left alone. Bodies
//! are never rewritten.
//!
//! "Naming the connection's GitLab" means: the host of `gitlab_url` or
//! `external_url`, with **any scheme and port**, and a path under that URL's
//! path (GitLab's relative URL root). GitLab builds `Link` from the request's
//! scheme and path but `gitlab.yml`'s host and port, so an agent speaking
//! http to an in-cluster service gets `http://gitlab.corp:443/...` back; that
//! is still the connection's GitLab. A URL with userinfo is never ours.

use url::Url;

/// One GitLab base: its host (as the URL parser normalises it) and its path
/// prefix (`""` or `/gitlab`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Origin {
    host: String,
    path: String,
}

impl Origin {
    fn parse(base: &str) -> Option<Origin> {
        Origin::of(&Url::parse(base).ok()?)
    }

    fn of(u: &Url) -> Option<Origin> {
        Some(Origin {
            host: u.host_str()?.to_string(),
            path: u.path().trim_end_matches('/').to_string(),
        })
    }
}

/// Splits `scheme://authority<tail>` into the parsed authority's host and
/// the raw tail (path, query, fragment: kept byte-exact).
fn split(url: &str) -> Option<(String, &str)> {
    let (scheme, rest) = url.split_once("://")?;
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return None;
    }
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    if authority.contains(['@', '\\']) {
        return None;
    }
    let u = Url::parse(&format!("{scheme}://{authority}/")).ok()?;
    Some((u.host_str()?.to_string(), tail))
}

/// Rewrites URLs naming any of `origins` to `front`.
#[derive(Debug, Clone)]
pub struct Rewriter {
    origins: Vec<Origin>,
    front: String,
}

impl Rewriter {
    /// `origins` are GitLab base URLs (with any path prefix); `front` is the
    /// front-door base, e.g. `http://broker:8080/gitlab/acme`.
    pub fn new(origins: impl IntoIterator<Item = String>, front: String) -> Self {
        Self::build(
            origins
                .into_iter()
                .filter_map(|o| Origin::parse(&o))
                .collect(),
            front,
        )
    }

    /// The same from the connection's already parsed URLs (per request: no
    /// re-serialising and re-parsing).
    pub fn for_urls<'a>(origins: impl IntoIterator<Item = &'a Url>, front: String) -> Self {
        Self::build(origins.into_iter().filter_map(Origin::of).collect(), front)
    }

    fn build(mut origins: Vec<Origin>, front: String) -> Self {
        // Longest path first, so a base with a path prefix wins over its host.
        origins.sort_by_key(|o| std::cmp::Reverse(o.path.len()));
        origins.dedup();
        Rewriter {
            origins,
            front: front.trim_end_matches('/').to_string(),
        }
    }

    fn rewrite_url(&self, url: &str) -> Option<String> {
        let (host, tail) = split(url)?;
        for o in &self.origins {
            if o.host != host {
                continue;
            }
            if let Some(rest) = tail.strip_prefix(o.path.as_str()) {
                if rest.is_empty() || rest.starts_with(['/', '?', '#']) {
                    return Some(format!("{}{rest}", self.front));
                }
            }
        }
        None
    }

    /// A `Location` value.
    pub fn location(&self, value: &str) -> Option<String> {
        self.rewrite_url(value)
    }

    /// A `Link` value: every `<url>` is considered.
    pub fn link(&self, value: &str) -> Option<String> {
        let mut out = String::with_capacity(value.len());
        let mut changed = false;
        let mut rest = value;
        while let Some(start) = rest.find('<') {
            out.push_str(&rest[..=start]);
            let after = &rest[start + 1..];
            let Some(end) = after.find('>') else {
                rest = after;
                break;
            };
            let url = &after[..end];
            match self.rewrite_url(url) {
                Some(u) => {
                    out.push_str(&u);
                    changed = true;
                }
                None => out.push_str(url),
            }
            rest = &after[end..];
        }
        out.push_str(rest);
        changed.then_some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rw() -> Rewriter {
        Rewriter::new(
            [
                "https://gitlab.acme.internal/".to_string(),
                "https://git.acme.com".to_string(),
            ],
            "http://broker:8080/gitlab/acme".into(),
        )
    }

    #[test]
    fn rewrites_gitlab_links_only() {
        let link = r#"<https://git.acme.com/api/v4/projects?page=2&per_page=100>; rel="next", <https://git.acme.com/api/v4/projects?page=1>; rel="first""#;
        assert_eq!(
            rw().link(link).unwrap(),
            r#"<http://broker:8080/gitlab/acme/api/v4/projects?page=2&per_page=100>; rel="next", <http://broker:8080/gitlab/acme/api/v4/projects?page=1>; rel="first""#
        );
        assert!(rw().link(r#"<https://s3.example/x>; rel="next""#).is_none());
        assert_eq!(
            rw().location("https://gitlab.acme.internal/group/p.git/info/refs")
                .unwrap(),
            "http://broker:8080/gitlab/acme/group/p.git/info/refs"
        );
        assert!(rw()
            .location("https://gitlab.acme.internal.evil.com/x")
            .is_none());
        assert!(rw().location("https://storage.acme.com/bucket/x").is_none());
        assert!(rw().location("https://user@git.acme.com/x").is_none());
    }

    #[test]
    fn any_scheme_and_port_of_the_host_under_the_base_path() {
        let rw = Rewriter::new(
            ["http://gitlab.corp/gitlab".to_string()],
            "http://broker:8080/gitlab/acme".into(),
        );
        // GitLab's gitlab.yml host and port, the request's scheme.
        assert_eq!(
            rw.link(r#"<http://gitlab.corp:443/gitlab/api/v4/projects?page=2>; rel="next""#)
                .unwrap(),
            r#"<http://broker:8080/gitlab/acme/api/v4/projects?page=2>; rel="next""#
        );
        assert_eq!(
            rw.location("HTTPS://GitLab.Corp/gitlab/g/p.git/info/refs?service=git-upload-pack")
                .unwrap(),
            "http://broker:8080/gitlab/acme/g/p.git/info/refs?service=git-upload-pack"
        );
        // Same host, outside the relative URL root: not GitLab's.
        assert!(rw.location("http://gitlab.corp/other/x").is_none());
        assert!(rw.location("http://gitlab.corp/gitlabx/x").is_none());
        assert!(rw.location("ftp://gitlab.corp/gitlab/x").is_none());
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        const FRONT: &str = "http://broker:8080/gitlab/acme";

        fn origin() -> impl Strategy<Value = String> {
            prop::sample::select(vec![
                "https://gitlab.acme.internal".to_string(),
                "http://gitlab.acme.internal:8080".to_string(),
                "https://acme.example/gitlab".to_string(),
            ])
        }

        /// What follows an origin in a URL GitLab writes: a path, a query,
        /// or nothing.
        fn tail() -> impl Strategy<Value = String> {
            prop_oneof![
                Just(String::new()),
                "/[a-zA-Z0-9%/._~-]{0,40}",
                "/api/v4/projects\\?[a-z_=&0-9%]{0,30}",
                "\\?[a-z_=&0-9]{0,20}",
            ]
        }

        /// Suffixes that make another origin out of a GitLab origin.
        fn confusable() -> impl Strategy<Value = String> {
            prop_oneof![
                "\\.evil\\.com(/[a-z]{0,8})?",
                "@evil\\.com/[a-z]{0,8}",
                "[a-z0-9-]{1,8}/x",
                "%2e[a-z]{1,8}",
            ]
        }

        /// The same GitLab named with another scheme and port, as GitLab
        /// does when gitlab.yml's port differs from the one the agent used.
        fn same_gitlab(o: &str, scheme: &str, port: u16) -> String {
            let u = Url::parse(o).unwrap();
            let path = u.path().trim_end_matches('/');
            format!("{scheme}://{}:{port}{path}", u.host_str().unwrap())
        }

        proptest! {
            /// URLs under a GitLab origin move to the front door with their
            /// tail byte-exact; anything else stays.
            #[test]
            fn prop_rewrites_exactly_gitlab_urls(
                o in origin(),
                t in tail(),
                c in confusable(),
                scheme in prop::sample::select(vec!["http", "https"]),
                port in 1u16..,
            ) {
                let rw = Rewriter::new([o.clone()], FRONT.to_string());
                prop_assert_eq!(rw.location(&format!("{o}{t}")), Some(format!("{FRONT}{t}")));
                let other = same_gitlab(&o, scheme, port);
                prop_assert_eq!(rw.location(&format!("{other}{t}")), Some(format!("{FRONT}{t}")));
                prop_assert_eq!(rw.location(&format!("{o}{c}")), None);
                prop_assert_eq!(rw.location(&format!("https://storage.example{t}")), None);
            }

            /// A Link value made of GitLab and foreign URLs: GitLab's are
            /// rewritten, every other byte is kept.
            #[test]
            fn prop_link_keeps_structure(
                o in origin(),
                parts in prop::collection::vec((any::<bool>(), tail(), "[a-z]{1,6}"), 1..6),
            ) {
                let rw = Rewriter::new([o.clone()], FRONT.to_string());
                let mut input = Vec::new();
                let mut expected = Vec::new();
                for (ours, t, rel) in &parts {
                    let (from, to) = if *ours {
                        (format!("{o}{t}"), format!("{FRONT}{t}"))
                    } else {
                        let u = format!("https://s3.example{t}");
                        (u.clone(), u)
                    };
                    input.push(format!("<{from}>; rel=\"{rel}\""));
                    expected.push(format!("<{to}>; rel=\"{rel}\""));
                }
                let input = input.join(", ");
                let expected = expected.join(", ");
                let any_ours = parts.iter().any(|p| p.0);
                match rw.link(&input) {
                    Some(out) => {
                        prop_assert!(any_ours);
                        prop_assert_eq!(out, expected);
                    }
                    None => prop_assert!(!any_ours),
                }
            }

            /// Any header text: no panic, and an unchanged value is `None`.
            #[test]
            fn prop_link_takes_any_text(v in any::<String>()) {
                let rw = Rewriter::new(["https://gitlab.acme.internal".to_string()], FRONT.to_string());
                if let Some(out) = rw.link(&v) {
                    prop_assert_ne!(&out, &v);
                }
                let _ = rw.location(&v);
            }
        }
    }
}
