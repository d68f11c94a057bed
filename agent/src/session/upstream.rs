//! The GitLab client of a session: one per GitLab URL, reused across
//! sessions, and never for another origin than the first one accepted.

use super::{SessionContext, SessionError};
use gitproxy_shared::gitlab_url;
use gitproxy_shared::upstream::{Upstream, UpstreamConfig};
use tracing::info;

/// The GitLab client for the URL the broker sent (validated and checked
/// against the pin by the handshake), which, pinned or not, must be on the
/// origin of the first Welcome this agent accepted (an unpinned agent would
/// otherwise go wherever a compromised broker points it).
pub(super) fn upstream_for(
    ctx: &SessionContext,
    asked: url::Url,
) -> Result<Upstream, SessionError> {
    let asked_origin = gitlab_url::origin(&asked);
    let mut first = ctx.first_origin.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(f) = first.as_ref().filter(|f| **f != asked_origin) {
        return Err(SessionError::OriginChanged {
            first: f.clone(),
            asked: asked_origin,
        });
    }
    let mut cache = ctx.upstream_cache.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(u) = cache.as_ref() {
        if u.base() == asked.as_str().trim_end_matches('/') {
            return Ok(u.clone());
        }
    }
    let u = Upstream::with_resolve(
        UpstreamConfig {
            base_url: asked,
            extra_ca_pem: ctx.cfg.extra_ca_pem.clone(),
            proxy: ctx.cfg.proxy.clone(),
            connect_timeout: ctx.cfg.connect_timeout,
            policy: ctx.cfg.policy.clone(),
        },
        &ctx.cfg.resolve,
    )
    .map_err(|e| SessionError::Upstream(e.to_string()))?;
    if let Some(p) = &u.route().proxy {
        info!(proxy = %p, gitlab = %u.base(), "GitLab requests go through the proxy");
    }
    *cache = Some(u.clone());
    first.get_or_insert(asked_origin);
    Ok(u)
}
