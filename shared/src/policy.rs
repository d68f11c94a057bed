//! The request policy: the agent is not an open proxy.
//!
//! Only requests for GitLab's REST API (`/api/v4/...`, `/api/graphql`) and git
//! smart HTTP (`/<project>.git/info/refs`, `git-upload-pack`,
//! `git-receive-pack`, plus git LFS under `.git/info/lfs/`; the `.git`-less
//! handshake `GET /<project>/info/refs`, which GitLab redirects to the `.git`
//! path so that a clone URL copied from its UI works) may travel, in
//! origin form, relative to the GitLab base URL, with a method GitLab serves.
//! The agent enforces it on every request; the broker runs the same check
//! before a request travels, and the GitLab client once more on the final
//! URL.

use percent_encoding::percent_decode_str;

/// The methods GitLab serves (Rails routes and Grape endpoints, git smart
/// HTTP, LFS); anything else (`CONNECT`, `TRACE`, WebDAV, made-up ones) is
/// never forwarded. Methods are case-sensitive (RFC 9110 section 9.1): `get`
/// is not `GET`.
const ALLOWED_METHODS: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];

/// Which paths may reach GitLab.
#[derive(Debug, Clone)]
pub struct Policy {
    allow_api: bool,
    allow_git: bool,
    extra_prefixes: Vec<String>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            allow_api: true,
            allow_git: true,
            extra_prefixes: Vec::new(),
        }
    }
}

impl Policy {
    /// The default policy plus extra allowed path prefixes (each must start
    /// with `/`).
    pub fn with_extra_prefixes(prefixes: Vec<String>) -> Result<Self, String> {
        for p in &prefixes {
            if !p.starts_with('/') || p.contains("..") {
                return Err(format!(
                    "allowed path prefix {p:?} must start with '/' and contain no '..'"
                ));
            }
        }
        Ok(Policy {
            extra_prefixes: prefixes,
            ..Policy::default()
        })
    }

    /// Checks a request. `target` is the origin-form path and query relative to
    /// the GitLab base URL. The error says why, for the log and the caller.
    pub fn check(&self, method: &str, target: &str) -> Result<(), String> {
        if !ALLOWED_METHODS.contains(&method) {
            return Err(
                if !method.is_empty() && method.bytes().all(|b| b.is_ascii_alphabetic()) {
                    format!(
                        "method {} is not one GitLab serves (only {})",
                        truncate(method, 20),
                        ALLOWED_METHODS.join(", ")
                    )
                } else {
                    "malformed method".into()
                },
            );
        }
        if !target.starts_with('/') || target.starts_with("//") {
            return Err("only origin-form request targets (\"/path?query\") are forwarded, not absolute or authority form".into());
        }
        if target
            .bytes()
            .any(|b| b.is_ascii_control() || b == b' ' || b == b'\\' || b == b'#')
        {
            return Err("the request target contains forbidden characters".into());
        }
        let path = target.split('?').next().unwrap_or("");
        let decoded = percent_decode_str(path).decode_utf8_lossy();
        if decoded.contains('\\') || decoded.contains('\0') {
            return Err("the path contains forbidden characters once decoded".into());
        }
        if decoded.split('/').any(|seg| seg == ".." || seg == ".") {
            return Err("the path contains '.' or '..' segments".into());
        }
        let query = target.split_once('?').map(|(_, q)| q).unwrap_or("");
        if self.allowed_path(path, &decoded)
            || (self.allow_git
                && (method == "GET" || method == "HEAD")
                && is_gitless_handshake(&decoded, query))
        {
            Ok(())
        } else {
            Err(format!(
                "path {} is neither GitLab's REST API nor git smart HTTP",
                truncate(path, 200)
            ))
        }
    }

    /// `path` as sent and `decoded` once percent-decoded: a git path must be
    /// one both ways (`/g%2F.git/...` is `/g/.git/...` to a server that
    /// decodes: no repository name before `.git`).
    fn allowed_path(&self, path: &str, decoded: &str) -> bool {
        if self.allow_api
            && (path == "/api/v4" || path.starts_with("/api/v4/") || path == "/api/graphql")
        {
            return true;
        }
        if self.allow_git && is_git_path(path) && is_git_path(decoded) {
            return true;
        }
        self.extra_prefixes
            .iter()
            .any(|p| path.starts_with(p.as_str()))
    }
}

/// `/<namespace>/<project>.git/<smart HTTP endpoint>`: `.git` ends a
/// non-empty path segment.
fn is_git_path(path: &str) -> bool {
    let Some(idx) = path.find(".git/") else {
        return false;
    };
    if idx <= 1 || path.as_bytes().get(idx - 1) == Some(&b'/') {
        return false;
    }
    let rest = &path[idx + ".git".len()..];
    matches!(
        rest,
        "/info/refs" | "/git-upload-pack" | "/git-receive-pack"
    ) || rest.starts_with("/info/lfs/")
}

/// `/<namespace>/<project>/info/refs` (the path once decoded, so that an
/// encoded `/` cannot hide an empty segment) with no query or exactly
/// `service=git-upload-pack|git-receive-pack`: the one `.git`-less git
/// request GitLab answers (with a redirect to the `.git` path; its routes in
/// `config/routes/git_http.rb` allow nothing else).
fn is_gitless_handshake(path: &str, query: &str) -> bool {
    let Some(project) = path.strip_suffix("/info/refs") else {
        return false;
    };
    let Some(project) = project.strip_prefix('/') else {
        return false;
    };
    let segments: Vec<&str> = project.split('/').collect();
    segments.len() >= 2
        && segments.iter().all(|s| !s.is_empty())
        && !project.ends_with(".git")
        && matches!(
            query,
            "" | "service=git-upload-pack" | "service=git-receive-pack"
        )
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(m: &str, t: &str) -> bool {
        Policy::default().check(m, t).is_ok()
    }

    #[test]
    fn allows_gitlab_api_and_git() {
        assert!(ok("GET", "/api/v4/projects?membership=true&page=2"));
        assert!(ok(
            "GET",
            "/api/v4/projects/group%2Fproject/repository/files/a%2Fb.json?ref=main"
        ));
        assert!(ok("POST", "/api/graphql"));
        assert!(ok(
            "GET",
            "/group/sub/project.git/info/refs?service=git-upload-pack"
        ));
        assert!(ok("POST", "/group/project.git/git-upload-pack"));
        assert!(ok("POST", "/group/project.git/git-receive-pack"));
        assert!(ok("POST", "/group/project.git/info/lfs/objects/batch"));
    }

    #[test]
    fn refuses_traversal_absolute_form_and_methods() {
        assert!(!ok("GET", "/../../etc/passwd"));
        assert!(!ok("GET", "/api/v4/../../etc/passwd"));
        assert!(!ok("GET", "/api/v4/%2e%2e/%2E%2e/etc/passwd"));
        assert!(!ok("GET", "/api/v4/projects/..%2F..%2Fadmin"));
        assert!(!ok("GET", "http://evil.example/api/v4/projects"));
        assert!(!ok("GET", "//evil.example/api/v4/projects"));
        assert!(!ok("CONNECT", "/api/v4/projects"));
        assert!(!ok("TRACE", "/api/v4/projects"));
        assert!(!ok("GET", "/admin/users"));
        assert!(!ok("GET", "/users/sign_in"));
        assert!(!ok("GET", "/.git/info/refs"));
        assert!(!ok("GET", "/group/.git/info/refs"));
        assert!(!ok("POST", "/api/graphql%2F.git/git-upload-pack"));
        assert!(!ok("GET", "/group%2F.git/info/refs"));
        assert!(!ok("GET", "/api/v4\\..\\x"));
        assert!(!ok("GET", "/api/v4/x y"));
        assert!(!ok("G ET", "/api/v4/x"));
        assert!(!ok("GET", "/api/v5/projects"));
    }

    #[test]
    fn only_the_methods_gitlab_serves() {
        for m in ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"] {
            assert!(ok(m, "/api/v4/projects"), "{m}");
        }
        // Methods are case-sensitive (RFC 9110): `get` is not GET.
        for m in [
            "PROPFIND", "FOO", "get", "Get", "MKCOL", "LOCK", "TRACK", "CONNECT", "TRACE", "",
        ] {
            let e = Policy::default().check(m, "/api/v4/projects").unwrap_err();
            assert!(e.contains("method"), "{m}: {e}");
        }
    }

    #[test]
    fn gitless_clone_handshake_only() {
        assert!(ok(
            "GET",
            "/group/project/info/refs?service=git-upload-pack"
        ));
        assert!(ok(
            "GET",
            "/group/sub/project/info/refs?service=git-receive-pack"
        ));
        assert!(ok("GET", "/group/project/info/refs"));
        // Only the handshake, only the two services, only reads.
        assert!(!ok(
            "POST",
            "/group/project/info/refs?service=git-upload-pack"
        ));
        assert!(!ok(
            "GET",
            "/group/project/info/refs?service=git-upload-archive"
        ));
        assert!(!ok(
            "GET",
            "/group/project/info/refs?service=git-upload-pack&x=1"
        ));
        assert!(!ok("POST", "/group/project/git-upload-pack"));
        assert!(!ok("POST", "/group/project/git-receive-pack"));
        assert!(!ok("GET", "/project/info/refs?service=git-upload-pack"));
        assert!(!ok("GET", "/group//info/refs?service=git-upload-pack"));
        assert!(!ok("GET", "/group/../info/refs?service=git-upload-pack"));
    }

    #[test]
    fn extra_prefixes() {
        let p = Policy::with_extra_prefixes(vec!["/-/health".into()]).unwrap();
        assert!(p.check("GET", "/-/health").is_ok());
        assert!(Policy::with_extra_prefixes(vec!["nope".into()]).is_err());
    }
}
