//! Header handling at the edges of the tunnel: hop-by-hop and `X-Gitproxy-*`
//! headers never travel, and headers convert to and from the wire form.

use gitproxy_proto::v1::Header;
use http::header::{HeaderMap, HeaderName, HeaderValue};

/// Headers that only describe one HTTP hop (RFC 9110 section 7.6.1).
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Headers in which a client or a proxy states who the client is or which
/// URL it used. A cloud caller's values would reach GitLab as the customer's
/// proxies' word (GitLab trusts them for its audit log, rate limits and
/// generated URLs), so they never travel to GitLab.
const CLIENT_IDENTITY: [&str; 12] = [
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-forwarded-scheme",
    "x-forwarded-ssl",
    "x-real-ip",
    "client-ip",
    "x-client-ip",
    "true-client-ip",
];

/// Prefix of gitproxy's own headers, stripped before anything reaches GitLab.
pub const GITPROXY_PREFIX: &str = "x-gitproxy-";

/// Largest total size of one head's headers, in bytes (names plus values).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Most headers in one head. GitLab sends about 30; the bound keeps a head
/// of many tiny headers (small in bytes) from costing more than a normal
/// one, and far from `HeaderMap`'s own capacity limit.
pub const MAX_HEADER_COUNT: usize = 256;

/// Whether a header must not be forwarded, given the names the `Connection`
/// header lists.
fn is_dropped(name: &str, connection_listed: &[String]) -> bool {
    HOP_BY_HOP.contains(&name)
        || name.starts_with(GITPROXY_PREFIX)
        || connection_listed.iter().any(|c| c == name)
}

fn connection_listed(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect()
}

/// Request headers as they travel to GitLab: without hop-by-hop,
/// `X-Gitproxy-*`, `Host` (the upstream client sets its own),
/// `Content-Length` (carried as the head's `content_length`) and the
/// client-identity headers (`Forwarded`, `X-Forwarded-*`, `X-Real-IP`, ...).
pub fn request_to_wire(headers: &HeaderMap) -> Vec<Header> {
    let listed = connection_listed(headers);
    headers
        .iter()
        .filter(|(n, _)| {
            let n = n.as_str();
            !is_dropped(n, &listed)
                && n != "host"
                && n != "content-length"
                && !CLIENT_IDENTITY.contains(&n)
        })
        .map(|(n, v)| Header {
            name: n.as_str().to_string(),
            value: v.as_bytes().to_vec(),
        })
        .collect()
}

/// Response headers as they travel back: without hop-by-hop and
/// `X-Gitproxy-*`. `Content-Length` stays, so a short body is detected.
pub fn response_to_wire(headers: &HeaderMap) -> Vec<Header> {
    let listed = connection_listed(headers);
    headers
        .iter()
        .filter(|(n, _)| !is_dropped(n.as_str(), &listed))
        .map(|(n, v)| Header {
            name: n.as_str().to_string(),
            value: v.as_bytes().to_vec(),
        })
        .collect()
}

/// A response head passed on as it is (another replica's answer): what
/// [`response_to_wire`] drops is removed in place, the rest is not copied.
pub fn strip_response(mut headers: HeaderMap) -> HeaderMap {
    let listed = connection_listed(&headers);
    let dropped: Vec<HeaderName> = headers
        .keys()
        .filter(|n| is_dropped(n.as_str(), &listed))
        .cloned()
        .collect();
    for n in dropped {
        headers.remove(n);
    }
    headers
}

/// Rebuilds a header map from the wire, dropping anything invalid or
/// hop-by-hop (the peer's filter is not trusted). Errors when there are more
/// than [`MAX_HEADER_COUNT`] headers or their total size exceeds
/// [`MAX_HEADER_BYTES`]; never panics, whatever the peer sent.
pub fn from_wire(headers: &[Header]) -> Result<HeaderMap, String> {
    if headers.len() > MAX_HEADER_COUNT {
        return Err(format!(
            "{} headers exceed the limit of {MAX_HEADER_COUNT}",
            headers.len()
        ));
    }
    let total: usize = headers.iter().map(|h| h.name.len() + h.value.len()).sum();
    if total > MAX_HEADER_BYTES {
        return Err(format!(
            "headers of {total} bytes exceed the limit of {MAX_HEADER_BYTES}"
        ));
    }
    let mut map = HeaderMap::try_with_capacity(headers.len()).map_err(|e| e.to_string())?;
    for h in headers {
        let Ok(name) = HeaderName::from_bytes(h.name.as_bytes()) else {
            continue;
        };
        if is_dropped(name.as_str(), &[]) {
            continue;
        }
        let Ok(value) = HeaderValue::from_bytes(&h.value) else {
            continue;
        };
        map.try_append(name, value).map_err(|e| e.to_string())?;
    }
    Ok(map)
}

/// Total size of a wire head's headers.
pub fn wire_size(headers: &[Header]) -> usize {
    headers.iter().map(|h| h.name.len() + h.value.len()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header map from name/value pairs (a repeated name is appended).
    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(*n, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn strips_hop_by_hop_and_own_headers() {
        let h = map(&[
            ("connection", "keep-alive, x-custom"),
            ("x-custom", "1"),
            ("transfer-encoding", "chunked"),
            ("x-gitproxy-key", "secret"),
            ("host", "broker"),
            ("content-length", "3"),
            ("private-token", "t"),
            ("accept", "application/json"),
            ("x-forwarded-for", "10.0.0.1"),
            ("forwarded", "for=10.0.0.1"),
            ("x-real-ip", "10.0.0.1"),
            ("x-forwarded-host", "evil"),
        ]);
        let wire = request_to_wire(&h);
        let names: Vec<_> = wire.iter().map(|h| h.name.as_str()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(names.contains(&"private-token") && names.contains(&"accept"));
    }

    #[test]
    fn strip_response_drops_what_response_to_wire_drops() {
        let h = map(&[
            ("connection", "close, x-custom"),
            ("x-custom", "1"),
            ("transfer-encoding", "chunked"),
            ("x-gitproxy-replica", "r0"),
            ("content-length", "3"),
            ("link", "<a>; rel=\"next\""),
            ("link", "<b>; rel=\"last\""),
        ]);
        let mut wire: Vec<_> = response_to_wire(&h)
            .into_iter()
            .map(|h| (h.name, h.value))
            .collect();
        let mut kept: Vec<_> = strip_response(h)
            .iter()
            .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec()))
            .collect();
        // Same headers; the map may order names differently.
        wire.sort();
        kept.sort();
        assert_eq!(kept, wire);
        assert_eq!(kept.len(), 3, "{kept:?}");
    }

    #[test]
    fn from_wire_rejects_oversized_and_drops_invalid() {
        let big = vec![Header {
            name: "x".into(),
            value: vec![b'a'; MAX_HEADER_BYTES + 1],
        }];
        assert!(from_wire(&big).is_err());
        let odd = vec![
            Header {
                name: "bad name".into(),
                value: b"1".to_vec(),
            },
            Header {
                name: "x-ok".into(),
                value: b"1".to_vec(),
            },
            Header {
                name: "x-bad".into(),
                value: b"a\nb".to_vec(),
            },
            Header {
                name: "upgrade".into(),
                value: b"h2c".to_vec(),
            },
        ];
        let map = from_wire(&odd).unwrap();
        assert_eq!(map.len(), 1);
        assert!(map.contains_key("x-ok"));
    }

    #[test]
    fn from_wire_bounds_the_header_count() {
        let tiny = |n: usize| -> Vec<Header> {
            (0..n)
                .map(|_| Header {
                    name: "x".into(),
                    value: vec![],
                })
                .collect()
        };
        assert_eq!(
            from_wire(&tiny(MAX_HEADER_COUNT)).unwrap().len(),
            MAX_HEADER_COUNT
        );
        // 30,000 tiny headers pass the byte limit; they once made
        // `HeaderMap::with_capacity` panic.
        let e = from_wire(&tiny(30_000)).unwrap_err();
        assert!(e.contains("30000 headers"), "{e}");
    }

    proptest::proptest! {
        #[test]
        fn prop_from_wire_never_panics(
            headers in proptest::collection::vec(
                (".{0,12}", proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40)),
                0..400,
            )
        ) {
            let wire: Vec<Header> = headers
                .into_iter()
                .map(|(name, value)| Header { name, value })
                .collect();
            if let Ok(map) = from_wire(&wire) {
                proptest::prop_assert!(map.len() <= MAX_HEADER_COUNT);
            } else {
                proptest::prop_assert!(
                    wire.len() > MAX_HEADER_COUNT || wire_size(&wire) > MAX_HEADER_BYTES
                );
            }
        }
    }
}
