//! GitLab's two pagination styles, headers included.
//!
//! * Offset: `X-Page`, `X-Per-Page`, `X-Next-Page`, `X-Prev-Page`, `X-Total`,
//!   `X-Total-Pages` and `Link` (prev, next, first, last), every URL built on the
//!   **external URL** with the request's other parameters kept (sorted, as Rails'
//!   `to_query` does).
//! * Keyset (`pagination=keyset`): only `Link: <...>; rel="next"`, present while the
//!   page came back full, with `id_after` / `id_before` set to the last id.

use http::{HeaderMap, HeaderValue};

use super::ApiRequest;

/// Default and maximum `per_page`.
pub const DEFAULT_PER_PAGE: usize = 20;
pub const MAX_PER_PAGE: usize = 100;

fn int_param(req: &ApiRequest, name: &str) -> Option<i64> {
    req.param(name).and_then(|v| v.trim().parse::<i64>().ok())
}

/// `per_page` clamped to 1..=100 (default 20).
pub fn per_page(req: &ApiRequest) -> usize {
    match int_param(req, "per_page") {
        Some(n) if n >= 1 => (n as usize).min(MAX_PER_PAGE),
        _ => DEFAULT_PER_PAGE,
    }
}

/// Builds `<external><path>?<query>` with `overrides` replacing request parameters.
fn page_url(
    external: &str,
    req: &ApiRequest,
    overrides: &[(&str, String)],
    remove: &[&str],
) -> String {
    let mut pairs: Vec<(String, String)> = req
        .query
        .iter()
        .filter(|(k, _)| !overrides.iter().any(|(o, _)| o == k) && !remove.contains(&k.as_str()))
        .cloned()
        .collect();
    for (k, v) in overrides {
        pairs.push((k.to_string(), v.clone()));
    }
    pairs.sort_by(|a, b| a.0.cmp(&b.0));
    let query = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish();
    format!("{external}{}?{query}", req.raw_path)
}

fn set(headers: &mut HeaderMap, name: &'static str, value: String) {
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(name, v);
    }
}

/// Offset pagination of `items`: the page's items and the headers to send.
pub fn offset<T: Clone>(external: &str, req: &ApiRequest, items: &[T]) -> (Vec<T>, HeaderMap) {
    let per_page = per_page(req);
    let page = match int_param(req, "page") {
        Some(n) if n >= 1 => n as usize,
        _ => 1,
    };
    let total = items.len();
    let total_pages = total.div_ceil(per_page).max(1);
    let start = (page - 1).saturating_mul(per_page);
    let slice: Vec<T> = items.iter().skip(start).take(per_page).cloned().collect();
    let next = (page < total_pages).then_some(page + 1);
    let prev = (page > 1).then(|| (page - 1).min(total_pages));

    let mut h = HeaderMap::new();
    set(&mut h, "x-page", page.to_string());
    set(&mut h, "x-per-page", per_page.to_string());
    set(
        &mut h,
        "x-next-page",
        next.map(|n| n.to_string()).unwrap_or_default(),
    );
    set(
        &mut h,
        "x-prev-page",
        prev.map(|n| n.to_string()).unwrap_or_default(),
    );
    set(&mut h, "x-total", total.to_string());
    set(&mut h, "x-total-pages", total_pages.to_string());
    let pp = per_page.to_string();
    let link = |p: usize, rel: &str| {
        format!(
            "<{}>; rel=\"{rel}\"",
            page_url(
                external,
                req,
                &[("page", p.to_string()), ("per_page", pp.clone())],
                &[],
            )
        )
    };
    let mut links = Vec::new();
    if let Some(p) = prev {
        links.push(link(p, "prev"));
    }
    if let Some(n) = next {
        links.push(link(n, "next"));
    }
    links.push(link(1, "first"));
    links.push(link(total_pages, "last"));
    set(&mut h, "link", links.join(", "));
    (slice, h)
}

/// Keyset pagination by id over `items` already sorted by id in `desc` or asc order.
pub fn keyset<T: Clone>(
    external: &str,
    req: &ApiRequest,
    items: &[T],
    id_of: impl Fn(&T) -> u64,
    desc: bool,
) -> (Vec<T>, HeaderMap) {
    let per_page = per_page(req);
    let after = int_param(req, "id_after");
    let before = int_param(req, "id_before");
    let slice: Vec<T> = items
        .iter()
        .filter(|it| {
            let id = id_of(it) as i64;
            after.is_none_or(|a| id > a) && before.is_none_or(|b| id < b)
        })
        .take(per_page)
        .cloned()
        .collect();
    let mut h = HeaderMap::new();
    if slice.len() == per_page {
        if let Some(last) = slice.last() {
            let (key, drop) = if desc {
                ("id_before", "id_after")
            } else {
                ("id_after", "id_before")
            };
            let url = page_url(external, req, &[(key, id_of(last).to_string())], &[drop]);
            set(&mut h, "link", format!("<{url}>; rel=\"next\""));
        }
    }
    (slice, h)
}
