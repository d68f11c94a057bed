//! The operator console: a single-page web UI on the api listener under
//! `/ui/`, and the live feed it reads (`GET /v1/events`).
//!
//! The page is plain HTML, CSS and JavaScript embedded in the binary
//! ([`assets`]): no build step, no CDN, nothing fetched from outside the
//! broker (networks that run it may have no internet). It holds no logic of
//! its own beyond display: every read and write goes to the `/v1` API with
//! the operator's `X-Gitproxy-Key`, so the console can do nothing the API
//! does not allow.
//!
//! Layout:
//! - [`assets`]: the embedded files and how they are served (content type,
//!   Content-Security-Policy `default-src 'self'`).
//! - [`events`]: `GET /v1/events`, server-sent events from the same broadcast
//!   as `Admin/WatchTunnel`.

pub mod assets;
pub mod events;

use crate::state::AppState;
use axum::routing::get;
use axum::Router;
use std::sync::Arc;

/// The console's routes (no API key: the page itself holds no data; it asks
/// for the key and sends it with every `/v1` call).
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/ui", get(assets::redirect))
        .route("/ui/", get(assets::index))
        .route("/ui/{*path}", get(assets::file))
}
