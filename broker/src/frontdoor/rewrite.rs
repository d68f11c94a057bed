//! GitLab writes its own external URL into `Link` (pagination) and
//! `Location` headers. Those naming the connection's GitLab are rewritten to
//! the front-door base, so clients that follow them keep going through the
//! broker; other origins (object storage redirects) are left alone. Bodies
//! are never rewritten.

/// Rewrites URLs starting with any of `origins` to `front`.
#[derive(Debug, Clone)]
pub struct Rewriter {
    origins: Vec<String>,
    front: String,
}

impl Rewriter {
    /// `origins` are GitLab base URLs (with any path prefix); `front` is the
    /// front-door base, e.g. `http://broker:8080/gitlab/acme`.
    pub fn new(origins: impl IntoIterator<Item = String>, front: String) -> Self {
        let mut origins: Vec<String> = origins
            .into_iter()
            .map(|o| o.trim_end_matches('/').to_string())
            .filter(|o| !o.is_empty())
            .collect();
        // Longest first, so a base with a path prefix wins over its origin.
        origins.sort_by_key(|o| std::cmp::Reverse(o.len()));
        origins.dedup();
        Rewriter {
            origins,
            front: front.trim_end_matches('/').to_string(),
        }
    }

    fn rewrite_url(&self, url: &str) -> Option<String> {
        for o in &self.origins {
            if let Some(rest) = url.strip_prefix(o.as_str()) {
                if rest.is_empty() || rest.starts_with('/') || rest.starts_with('?') {
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
    }
}
