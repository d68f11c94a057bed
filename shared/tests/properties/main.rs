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
use gitproxy_shared::gitlab_url::{join, parse_gitlab_url, relative_target, JoinBase};
use gitproxy_shared::policy::Policy;
use gitproxy_shared::upstream::{ProxySettings, Upstream, UpstreamConfig};
use proptest::prelude::*;
use proptest::sample::select;
use std::sync::OnceLock;
use std::time::Duration;
use url::Url;

mod reference;
mod strategies;

use reference::*;
use strategies::*;

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
        if let Ok(uri) = up.request_uri(&method, &t) {
            let url = Url::parse(&uri.to_string()).expect("a URI the client sends is a URL");
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

    /// The client's cheap join (`JoinBase`) accepts, refuses and builds
    /// exactly what `join` does (and the URI a client made of its URL).
    #[test]
    fn prop_join_base_agrees_with_join(s in url_candidate(), t in policy_target()) {
        let Ok(base) = parse_gitlab_url(&s) else { return Ok(()) };
        let old = join(&base, &t)
            .ok()
            .and_then(|u| u.as_str().parse::<http::Uri>().ok().map(|x| (x, u)));
        let new = JoinBase::new(&base).map_err(TestCaseError::fail)?.join(&t).ok();
        match (old, new) {
            (None, None) => {}
            (Some((uri, url)), Some((nuri, rel))) => {
                prop_assert_eq!(&uri, &nuri, "{} + {}", base, t);
                prop_assert_eq!(relative_target(&base, &url).unwrap_or_default(), rel);
            }
            (o, n) => prop_assert!(false, "{} + {}: join {:?}, JoinBase {:?}", base, t, o, n),
        }
    }
}
