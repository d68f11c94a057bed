//! Rate limiting as GitLab's Rack::Attack throttles answer it
//! (`lib/gitlab/rack_attack.rb`, `doc/security/rate_limits.md`,
//! `doc/administration/settings/user_and_ip_rate_limits.md`):
//! status 429, body `Retry later\n` (the default "plain-text response to send
//! to clients that hit a rate limit"), and the headers
//! `RateLimit-Name`, `RateLimit-Limit`, `RateLimit-Observed`,
//! `RateLimit-Remaining`, `RateLimit-Reset`, `RateLimit-ResetTime` (HTTP
//! date) and `Retry-After` (seconds until the period ends).
//!
//! Rack::Attack counts in fixed periods aligned to the Unix epoch; the
//! sandbox aligns them to its own start instead, so a test knows how long
//! the first period lasts (a throttle of 1 request per hour answers
//! `Retry-After` close to 3600, never 1 by bad luck).

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use axum::body::Body;
use http::{HeaderValue, Response, StatusCode};

/// A throttle: at most `limit` requests per `period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub limit: u32,
    pub period: Duration,
}

impl RateLimit {
    /// `limit` requests per `period_secs` seconds (period at least 1 s).
    pub fn per(limit: u32, period_secs: u64) -> RateLimit {
        RateLimit {
            limit,
            period: Duration::from_secs(period_secs.max(1)),
        }
    }
}

/// Counts requests in the current period.
#[derive(Debug)]
pub struct Throttle {
    limit: RateLimit,
    start: Instant,
    window: Mutex<(u64, u32)>,
}

/// A refused request: what the headers say.
#[derive(Debug, Clone, Copy)]
pub struct Refusal {
    pub limit: u32,
    pub observed: u32,
    pub reset_secs: u64,
}

impl Throttle {
    pub fn new(limit: RateLimit) -> Throttle {
        Throttle {
            limit,
            start: Instant::now(),
            window: Mutex::new((0, 0)),
        }
    }

    /// Counts one request; `Err` when it is over the limit.
    pub fn admit(&self) -> Result<(), Refusal> {
        let period = self.limit.period.as_millis().max(1);
        let elapsed = self.start.elapsed().as_millis();
        let index = (elapsed / period) as u64;
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        if w.0 != index {
            *w = (index, 0);
        }
        w.1 = w.1.saturating_add(1);
        if w.1 <= self.limit.limit {
            return Ok(());
        }
        let left_ms = period - elapsed % period;
        Err(Refusal {
            limit: self.limit.limit,
            observed: w.1,
            reset_secs: left_ms.div_ceil(1000) as u64,
        })
    }
}

impl Refusal {
    /// GitLab's 429.
    pub fn into_response(self) -> Response<Body> {
        let mut r = Response::new(Body::from("Retry later\n"));
        *r.status_mut() = StatusCode::TOO_MANY_REQUESTS;
        let reset_at = SystemTime::now() + Duration::from_secs(self.reset_secs);
        let h = r.headers_mut();
        let mut set = |k: &'static str, v: String| {
            if let Ok(v) = HeaderValue::from_str(&v) {
                h.insert(k, v);
            }
        };
        set("content-type", "text/plain".into());
        set("ratelimit-name", "throttle_authenticated_api".into());
        set("ratelimit-limit", self.limit.to_string());
        set("ratelimit-observed", self.observed.to_string());
        set(
            "ratelimit-remaining",
            self.limit.saturating_sub(self.observed).to_string(),
        );
        set("ratelimit-reset", self.reset_secs.to_string());
        set(
            "ratelimit-resettime",
            httpdate::fmt_http_date(reset_at).to_string(),
        );
        set("retry-after", self.reset_secs.to_string());
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_over_the_limit_with_gitlab_headers() {
        let t = Throttle::new(RateLimit::per(2, 3600));
        assert!(t.admit().is_ok());
        assert!(t.admit().is_ok());
        let r = t.admit().unwrap_err();
        assert_eq!((r.limit, r.observed), (2, 3));
        assert!(r.reset_secs > 3500 && r.reset_secs <= 3600, "{r:?}");
        let resp = r.into_response();
        assert_eq!(resp.status(), 429);
        assert_eq!(resp.headers()["ratelimit-remaining"], "0");
        assert_eq!(
            resp.headers()["retry-after"],
            resp.headers()["ratelimit-reset"]
        );
    }
}
