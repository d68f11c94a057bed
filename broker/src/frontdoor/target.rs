//! Splits a front-door URI into the connection id and the GitLab target,
//! using the raw path: percent-encoding (`group%2Fproject`) is kept exactly
//! as the caller sent it.

use gitproxy_shared::errors::{ErrorCode, GitproxyError};
use http::Uri;

/// Where a front-door request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Connection id.
    pub connection: String,
    /// Origin-form path and query relative to the GitLab base URL.
    pub target: String,
}

impl Target {
    /// The target without its query, for logs (queries may hold tokens).
    pub fn path_only(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }
}

/// Prefix of the front door.
pub const PREFIX: &str = "/gitlab/";

/// Parses `/gitlab/{connection}/{path...}`.
pub fn parse(uri: &Uri) -> Result<Target, GitproxyError> {
    if uri.scheme().is_some() || uri.authority().is_some() {
        return Err(GitproxyError::new(
            ErrorCode::BlockedByPolicy,
            "absolute-form request targets are not forwarded",
        ));
    }
    let path = uri.path();
    let rest = path.strip_prefix(PREFIX).ok_or_else(|| {
        GitproxyError::new(
            ErrorCode::UnknownConnection,
            "front-door paths are /gitlab/{connection}/{path}",
        )
    })?;
    let (connection, tail) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let mut target = tail.to_string();
    if let Some(q) = uri.query() {
        target.push('?');
        target.push_str(q);
    }
    Ok(Target {
        connection: connection.to_string(),
        target,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_encoding_and_query() {
        let t = parse(
            &"/gitlab/acme/api/v4/projects/g%2Fp/repository/files/a%2Fb?ref=main"
                .parse()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(t.connection, "acme");
        assert_eq!(
            t.target,
            "/api/v4/projects/g%2Fp/repository/files/a%2Fb?ref=main"
        );
        assert_eq!(
            t.path_only(),
            "/api/v4/projects/g%2Fp/repository/files/a%2Fb"
        );
    }

    #[test]
    fn refuses_absolute_form() {
        let e = parse(&"http://evil/gitlab/acme/api/v4/x".parse().unwrap()).unwrap_err();
        assert_eq!(e.error, ErrorCode::BlockedByPolicy);
        assert_eq!(
            parse(&"/other".parse().unwrap()).unwrap_err().error,
            ErrorCode::UnknownConnection
        );
    }
}
