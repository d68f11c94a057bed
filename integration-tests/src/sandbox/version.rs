//! Which GitLab release the sandbox imitates, and what differs between the
//! releases gitproxy meets at customers (14.10, 15.x, 16.x, 17.x).
//!
//! Sources (GitLab's `doc/api/*.md` history notes and `lib/api/*.rb`):
//! * `GET /personal_access_tokens/self` was introduced in 15.5
//!   (`doc/api/personal_access_tokens.md`, "Using a request header").
//! * 15.1 added `GET /personal_access_tokens/:id`; before 15.5 a request for
//!   `.../self` reaches that route with `id=self`, finds no token and answers a
//!   non-administrator with `unauthorized!` (`current_user.admin? ? not_found! :
//!   unauthorized!` in `lib/api/personal_access_tokens.rb`): a **401** although
//!   the token is good. Before 15.1 the route does not exist: Grape's
//!   catch-all `{"error":"404 Not Found"}`.
//! * `GET /metadata` was introduced in 15.2 (`doc/api/metadata.md`).
//! * Keyset pagination of `GET /projects` (`order_by=id`) exists since 13.0
//!   (`doc/api/rest/index.md`, "Keyset-based pagination"): every release
//!   modelled here has it; older ones answer 405.

use std::fmt;
use std::str::FromStr;

/// A GitLab release `major.minor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct GitlabVersion {
    pub major: u32,
    pub minor: u32,
}

impl GitlabVersion {
    /// The newest release the sandbox models (its default).
    pub const LATEST: GitlabVersion = GitlabVersion::new(17, 5);

    pub const fn new(major: u32, minor: u32) -> GitlabVersion {
        GitlabVersion { major, minor }
    }

    fn at_least(self, major: u32, minor: u32) -> bool {
        self >= GitlabVersion::new(major, minor)
    }

    /// What `/version` answers: `"16.11.0-ee"`.
    pub fn full(self) -> String {
        format!("{}.{}.0-ee", self.major, self.minor)
    }

    /// How `GET /personal_access_tokens/self` is answered on this release.
    pub fn token_self(self) -> TokenSelf {
        if self.at_least(15, 5) {
            TokenSelf::Exists
        } else if self.at_least(15, 1) {
            TokenSelf::Unauthorized
        } else {
            TokenSelf::NoRoute
        }
    }

    /// Whether `GET /metadata` exists.
    pub fn has_metadata(self) -> bool {
        self.at_least(15, 2)
    }

    /// Whether `GET /projects?pagination=keyset` is available.
    pub fn projects_keyset(self) -> bool {
        self.at_least(13, 0)
    }
}

/// The three behaviours of `GET /personal_access_tokens/self` across releases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSelf {
    /// 15.5 and later: the token's details.
    Exists,
    /// 15.1–15.4: the `:id` route answers a non-admin 401.
    Unauthorized,
    /// Before 15.1: no such route, 404.
    NoRoute,
}

impl Default for GitlabVersion {
    fn default() -> Self {
        GitlabVersion::LATEST
    }
}

impl fmt::Display for GitlabVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

impl FromStr for GitlabVersion {
    type Err = String;

    /// `16.11`, `16.11.3`, `17.5.0-ee`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let core = s.trim().split(['-', '+']).next().unwrap_or("");
        let mut it = core.split('.');
        let num = |p: Option<&str>| p.and_then(|x| x.parse::<u32>().ok());
        match (num(it.next()), num(it.next())) {
            (Some(major), Some(minor)) if major >= 1 => Ok(GitlabVersion::new(major, minor)),
            _ => Err(format!("not a GitLab version (want MAJOR.MINOR): {s:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_differ_as_gitlab_did() {
        let v = |s: &str| s.parse::<GitlabVersion>().unwrap();
        assert_eq!(v("14.10").token_self(), TokenSelf::NoRoute);
        assert_eq!(v("15.3").token_self(), TokenSelf::Unauthorized);
        assert_eq!(v("15.5.1").token_self(), TokenSelf::Exists);
        assert_eq!(v("17.5.0-ee").token_self(), TokenSelf::Exists);
        assert!(v("16.11") > v("16.9"));
        assert!(!v("14.10").has_metadata());
        assert_eq!(v("16.11").full(), "16.11.0-ee");
        assert!("x".parse::<GitlabVersion>().is_err());
    }
}
