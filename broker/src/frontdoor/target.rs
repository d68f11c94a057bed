//! Splits a front-door URI into the connection id and the GitLab target,
//! using the raw path: percent-encoding (`group%2Fproject`) is kept exactly
//! as the caller sent it.
//!
//! HTTP/1.x callers must send origin-form (`GET /gitlab/acme/... HTTP/1.1`);
//! absolute-form (`GET http://host/...`) is how a client talks to a proxy,
//! and the front door is not one. HTTP/2 requests always carry `:scheme` and
//! `:authority`, so hyper gives them an absolute URI: for them only the path
//! and query count.

use gitproxy_shared::errors::{ErrorCode, GitproxyError};
use http::{Uri, Version};

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

/// Parses `/gitlab/{connection}/{path...}` of a request of HTTP `version`.
pub fn parse(version: Version, uri: &Uri) -> Result<Target, GitproxyError> {
    let http1 = matches!(
        version,
        Version::HTTP_09 | Version::HTTP_10 | Version::HTTP_11
    );
    if http1 && (uri.scheme().is_some() || uri.authority().is_some()) {
        return Err(GitproxyError::new(
            ErrorCode::BlockedByPolicy,
            "absolute-form request targets are not forwarded",
        ));
    }
    if uri.path_and_query().is_none() {
        // Authority-form (CONNECT host:port), whatever the version.
        return Err(GitproxyError::new(
            ErrorCode::BlockedByPolicy,
            "authority-form request targets are not forwarded",
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
    use proptest::prelude::*;

    fn uri(s: &str) -> Uri {
        s.parse().unwrap()
    }

    #[test]
    fn keeps_encoding_and_query() {
        let t = parse(
            Version::HTTP_11,
            &uri("/gitlab/acme/api/v4/projects/g%2Fp/repository/files/a%2Fb?ref=main"),
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
    fn refuses_absolute_form_over_http1_only() {
        for v in [Version::HTTP_10, Version::HTTP_11] {
            let e = parse(v, &uri("http://evil/gitlab/acme/api/v4/x")).unwrap_err();
            assert_eq!(e.error, ErrorCode::BlockedByPolicy);
        }
        // HTTP/2: hyper builds the URI from :scheme, :authority and :path.
        let t = parse(
            Version::HTTP_2,
            &uri("https://broker.example:8443/gitlab/acme/api/v4/x?a=1"),
        )
        .unwrap();
        assert_eq!(
            (t.connection.as_str(), t.target.as_str()),
            ("acme", "/api/v4/x?a=1")
        );
        assert_eq!(
            parse(Version::HTTP_11, &uri("/other")).unwrap_err().error,
            ErrorCode::UnknownConnection
        );
        assert_eq!(
            parse(Version::HTTP_2, &uri("https://b/other"))
                .unwrap_err()
                .error,
            ErrorCode::UnknownConnection
        );
    }

    #[test]
    fn refuses_authority_form_whatever_the_version() {
        for v in [Version::HTTP_11, Version::HTTP_2] {
            let e = parse(v, &uri("gitlab.example:443")).unwrap_err();
            assert_eq!(e.error, ErrorCode::BlockedByPolicy, "{v:?}");
        }
    }

    /// Path or query text as clients send it: unreserved characters,
    /// sub-delims, `:@/`, percent-encodings (valid or not), and bytes hyper
    /// may refuse (the property then has nothing to check). Never `?` or
    /// `#`, which would end the piece.
    fn piece() -> impl Strategy<Value = String> {
        let odd = prop::sample::select(vec![
            " ", "\\", "[", "]", "{", "}", "|", "^", "`", "\"", "<", ">", "\u{e9}",
        ]);
        prop::collection::vec(
            prop_oneof![
                6 => "[a-zA-Z0-9._~-]{1,4}",
                2 => prop::sample::select(vec!["!", "$", "&", "'", "(", ")", "*", "+", ",", ";", "=", ":", "@", "/"]).prop_map(String::from),
                2 => "%[0-9a-fA-F]{2}",
                1 => "%[0-9a-zA-Z]{0,1}",
                1 => odd.prop_map(String::from),
            ],
            0..16,
        )
        .prop_map(|v| v.concat())
    }

    proptest! {
        /// For any front-door URI hyper accepts: origin-form (any version)
        /// and the absolute URI of an HTTP/2 request give the same target;
        /// the connection is what precedes the first `/` after `/gitlab/`;
        /// the rest of the path and the query are kept byte-exact (raw
        /// percent-encoding included); HTTP/1.1 absolute-form is refused.
        #[test]
        fn prop_front_door_targets(
            conn in "[a-z0-9%-]{0,10}",
            tail in prop::option::of(piece()),
            query in prop::option::of(piece()),
            authority in "[a-z0-9.-]{1,12}(:[0-9]{1,5})?",
        ) {
            let mut origin = format!("{PREFIX}{conn}");
            let mut expected = String::from("/");
            if let Some(t) = &tail {
                origin.push('/');
                origin.push_str(t);
                expected.push_str(t);
            }
            if let Some(q) = &query {
                origin.push('?');
                origin.push_str(q);
                expected.push('?');
                expected.push_str(q);
            }
            let absolute = format!("https://{authority}{origin}");
            let (Ok(o), Ok(a)) = (origin.parse::<Uri>(), absolute.parse::<Uri>()) else {
                // hyper refuses such a request; nothing reaches `parse`.
                return Ok(());
            };
            let t = parse(Version::HTTP_11, &o).expect("origin-form parses");
            prop_assert_eq!(&t.connection, &conn);
            prop_assert_eq!(&t.target, &expected);
            prop_assert_eq!(t.path_only(), expected.split('?').next().unwrap_or(""));
            prop_assert_eq!(&t, &parse(Version::HTTP_2, &o).expect("h2, origin"));
            prop_assert_eq!(&t, &parse(Version::HTTP_2, &a).expect("h2, absolute"));
            prop_assert_eq!(
                parse(Version::HTTP_11, &a).unwrap_err().error,
                ErrorCode::BlockedByPolicy
            );
        }

        /// Any string hyper accepts as a URI: no panic, whatever the version.
        #[test]
        fn prop_parse_never_panics(s in "\\PC{0,64}") {
            if let Ok(u) = s.parse::<Uri>() {
                for v in [Version::HTTP_10, Version::HTTP_11, Version::HTTP_2] {
                    let _ = parse(v, &u);
                }
            }
        }
    }
}
