//! The console's files, embedded at build time, and their answers.
//!
//! Every answer carries a Content-Security-Policy that lets the page load
//! and call nothing but the broker itself (`default-src 'self'`, no inline
//! script or style), plus `nosniff` and no referrer. `Cache-Control:
//! no-cache` makes a browser revalidate after a broker upgrade instead of
//! mixing old and new files.

use axum::body::Body;
use axum::extract::Path;
use http::{header, HeaderValue, Response, StatusCode};

/// The policy of every console answer.
pub const CSP: &str = "default-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'; object-src 'none'";

/// One embedded file.
#[derive(Debug, Clone, Copy)]
pub struct Asset {
    /// Path under `/ui/`.
    pub path: &'static str,
    /// Content type.
    pub content_type: &'static str,
    /// The bytes.
    pub body: &'static str,
}

const JS: &str = "text/javascript; charset=utf-8";

/// An embedded file of `broker/console/`.
macro_rules! asset {
    ($path:literal, $content_type:expr) => {
        Asset {
            path: $path,
            content_type: $content_type,
            body: include_str!(concat!("../../console/", $path)),
        }
    };
}

/// Every file the console serves: the page, its style, its script as ES
/// modules (one per part of the page; `app.js` loads the others). The
/// troubleshooting guide is served too, so Test Connection's hints link to
/// its sections.
pub const ASSETS: &[Asset] = &[
    asset!("index.html", "text/html; charset=utf-8"),
    asset!("app.css", "text/css; charset=utf-8"),
    asset!("favicon.svg", "image/svg+xml"),
    asset!("app.js", JS),
    asset!("dom.js", JS),
    asset!("api.js", JS),
    asset!("connections.js", JS),
    asset!("install.js", JS),
    asset!("checks.js", JS),
    asset!("projects.js", JS),
    asset!("merge-requests.js", JS),
    asset!("live.js", JS),
    asset!("guide.js", JS),
    Asset {
        path: "docs/troubleshooting.md",
        content_type: "text/markdown; charset=utf-8",
        body: include_str!("../../../docs/troubleshooting.md"),
    },
];

/// Bytes the console adds to the binary.
pub fn total_bytes() -> usize {
    ASSETS.iter().map(|a| a.body.len()).sum()
}

/// The file at `path` (under `/ui/`).
pub fn find(path: &str) -> Option<&'static Asset> {
    ASSETS.iter().find(|a| a.path == path)
}

fn secured(mut r: Response<Body>) -> Response<Body> {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

fn serve(a: &Asset) -> Response<Body> {
    let mut r = Response::new(Body::from(a.body));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(a.content_type),
    );
    secured(r)
}

/// `GET /ui`: to `/ui/`, so relative asset paths resolve.
pub async fn redirect() -> Response<Body> {
    let mut r = Response::new(Body::empty());
    *r.status_mut() = StatusCode::PERMANENT_REDIRECT;
    r.headers_mut()
        .insert(header::LOCATION, HeaderValue::from_static("/ui/"));
    r
}

/// `GET /ui/`: the page.
pub async fn index() -> Response<Body> {
    match find("index.html") {
        Some(a) => serve(a),
        None => not_found(),
    }
}

/// `GET /ui/{path}`: a file, or 404.
pub async fn file(Path(path): Path<String>) -> Response<Body> {
    match find(&path) {
        Some(a) => serve(a),
        None => not_found(),
    }
}

fn not_found() -> Response<Body> {
    let mut r = Response::new(Body::from("not found\n"));
    *r.status_mut() = StatusCode::NOT_FOUND;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    secured(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_console_adds_less_than_300_kib() {
        let n = total_bytes();
        assert!(n < 300 * 1024, "console assets are {n} bytes");
    }

    #[test]
    fn every_module_import_is_embedded() {
        let mut imports = 0;
        for a in ASSETS.iter().filter(|a| a.path.ends_with(".js")) {
            for part in a.body.split(" from \"./").skip(1) {
                let name = part.split('"').next().unwrap_or_default();
                assert!(
                    find(name).is_some(),
                    "{} imports {name}: not embedded",
                    a.path
                );
                imports += 1;
            }
        }
        assert!(imports > 10, "{imports} imports found");
        // And every embedded module is imported somewhere (or is the entry).
        for a in ASSETS
            .iter()
            .filter(|a| a.path.ends_with(".js") && a.path != "app.js")
        {
            let wanted = format!(" from \"./{}\"", a.path);
            assert!(
                ASSETS.iter().any(|b| b.body.contains(&wanted)),
                "{} is never imported",
                a.path
            );
        }
    }

    #[test]
    fn the_page_names_only_embedded_files_and_nothing_inline() {
        let html = find("index.html").expect("index").body;
        for a in ["app.js", "app.css", "favicon.svg"] {
            assert!(html.contains(a), "index.html loads {a}");
            assert!(find(a).is_some());
        }
        // The policy forbids inline code: the page must not depend on it.
        assert!(!html.contains("<script>"), "no inline script");
        assert!(!html.contains("style="), "no inline style");
        assert!(!html.contains("src=\"http") && !html.contains("href=\"http"));
    }

    /// GitHub's heading anchors, as the page computes them (`slug` in guide.js).
    fn slug(heading: &str) -> String {
        heading
            .to_lowercase()
            .chars()
            .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '_' | '-'))
            .map(|c| if c == ' ' { '-' } else { c })
            .collect()
    }

    #[test]
    fn every_check_links_to_a_section_of_the_guide() {
        let guide = find("docs/troubleshooting.md").expect("guide").body;
        let anchors: Vec<String> = guide
            .lines()
            .filter_map(|l| {
                l.trim_start_matches('#')
                    .strip_prefix(' ')
                    .filter(|_| l.starts_with('#'))
            })
            .map(slug)
            .collect();
        let js = find("checks.js").expect("checks.js").body;
        let map = js
            .split("const CHECK_DOCS = {")
            .nth(1)
            .and_then(|r| r.split("};").next())
            .expect("CHECK_DOCS in checks.js");
        let mut checks = 0;
        for line in map.lines().filter(|l| l.contains(':')) {
            let (check, anchor) = line.split_once(':').expect("check: anchor");
            let anchor = anchor.trim().trim_end_matches(',').trim_matches('"');
            assert!(
                anchors.iter().any(|a| a == anchor),
                "{}: no section #{anchor} in docs/troubleshooting.md",
                check.trim()
            );
            checks += 1;
        }
        assert_eq!(checks, 6, "one link per Test Connection check");
    }

    #[tokio::test]
    async fn unknown_files_are_404_with_the_policy() {
        let r = file(Path("../Cargo.toml".into())).await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        assert_eq!(r.headers()[header::CONTENT_SECURITY_POLICY], CSP);
        let r = index().await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()[header::CONTENT_SECURITY_POLICY], CSP);
    }
}
