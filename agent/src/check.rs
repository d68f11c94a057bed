//! `gitproxy-agent check`: walks the path a request takes, one step at a
//! time, and prints each step with ok / FAIL and the fix. Exit 0 only when
//! every step passes (steps that do not apply are `skip`).
//!
//! Steps: broker reachable (through the proxy when one applies), broker TLS
//! trusted, accessKey accepted, GitLab reachable, GitLab TLS trusted, and,
//! when the agent holds a token: token valid, token scopes, projects found
//! (those three in [`token`]). The handshake is the sessions' own.

use crate::config::AgentConfig;
use crate::dial;
use crate::session::{handshake, SessionError};
use gitproxy_proto::v1::AgentMessage;
use gitproxy_shared::errors::ErrorCode;
use gitproxy_shared::gitlab_probe;
use gitproxy_shared::tunnel::outbound::{Control, ControlFrame, Outbound};
use gitproxy_shared::upstream::{Upstream, UpstreamConfig};
use http::{HeaderMap, HeaderValue, Method};
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

mod token;

/// Scopes gitproxy needs (API calls, clone, push).

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Ok,
    Fail,
    Skip,
}

struct Report {
    failed: bool,
}

impl Report {
    fn line(&mut self, status: Status, step: &str, detail: &str, hint: &str) {
        let tag = match status {
            Status::Ok => "ok  ",
            Status::Fail => "FAIL",
            Status::Skip => "skip",
        };
        println!("{tag}  {step:<22} {detail}");
        if status == Status::Fail {
            self.failed = true;
            if !hint.is_empty() {
                println!("      hint: {hint}");
            }
        }
    }

    fn skip_rest(&mut self, steps: &[&str], why: &str) {
        for s in steps {
            self.line(Status::Skip, s, why, "");
        }
    }
}

const AFTER_BROKER: [&str; 4] = [
    "accessKey accepted",
    "GitLab reachable",
    "GitLab TLS trusted",
    "token valid",
];

/// Runs the checks; the process exit code.
pub async fn run(cfg: &AgentConfig) -> ExitCode {
    let mut r = Report { failed: false };
    let broker = format!(
        "{}:{}",
        cfg.broker_url.host_str().unwrap_or_default(),
        cfg.broker_url.port_or_known_default().unwrap_or(443)
    );

    // 1. TCP (and proxy CONNECT).
    let tcp = match dial::dial_tcp(cfg).await {
        Ok(io) => {
            r.line(
                Status::Ok,
                "broker reachable",
                &format!("{broker} ({})", dial::describe_route(cfg)),
                "",
            );
            io
        }
        Err(e) => {
            r.line(Status::Fail, "broker reachable", &e.to_string(), e.hint());
            r.skip_rest(&["broker TLS trusted"], "broker not reachable");
            r.skip_rest(&AFTER_BROKER, "broker not reachable");
            return exit(r);
        }
    };
    // 2. TLS.
    let io = if cfg.broker_url.scheme() == "https" {
        match dial::tls(cfg, tcp).await {
            Ok(io) => {
                r.line(
                    Status::Ok,
                    "broker TLS trusted",
                    &format!("certificate of {broker} verified"),
                    "",
                );
                io
            }
            Err(e) => {
                r.line(Status::Fail, "broker TLS trusted", &e.to_string(), e.hint());
                r.skip_rest(&AFTER_BROKER, "no TLS to the broker");
                return exit(r);
            }
        }
    } else {
        r.line(
            Status::Skip,
            "broker TLS trusted",
            "the broker URL is http:// (no TLS)",
            "",
        );
        tcp
    };
    // 3. accessKey, via the real handshake.
    let gitlab_url = match handshake(cfg, io).await {
        Ok(url) => {
            r.line(
                Status::Ok,
                "accessKey accepted",
                &format!("connection serves GitLab at {url}"),
                "",
            );
            url
        }
        Err((detail, hint)) => {
            r.line(Status::Fail, "accessKey accepted", &detail, &hint);
            r.skip_rest(&AFTER_BROKER[1..], "the broker did not accept this agent");
            return exit(r);
        }
    };
    // 4 and 5. GitLab, with the same client real requests use.
    let upstream = match gitproxy_shared::gitlab_url::parse_gitlab_url(&gitlab_url)
        .map_err(|e| e.to_string())
        .and_then(|u| {
            Upstream::with_resolve(
                UpstreamConfig {
                    base_url: u,
                    extra_ca_pem: cfg.extra_ca_pem.clone(),
                    proxy: cfg.proxy.clone(),
                    connect_timeout: cfg.connect_timeout,
                    policy: cfg.policy.clone(),
                },
                &cfg.resolve,
            )
            .map_err(|e| e.to_string())
        }) {
        Ok(u) => u,
        Err(e) => {
            r.line(
                Status::Fail,
                "GitLab reachable",
                &e,
                "Check the connection's GitLab URL.",
            );
            return exit(r);
        }
    };
    let route = match &upstream.route().proxy {
        Some(p) => format!("through proxy {p}"),
        None => "direct".into(),
    };
    let tls_applies = gitlab_url.starts_with("https://");
    let token = cfg.gitlab_token.as_ref();
    let mut headers = HeaderMap::new();
    if let Some(t) = token {
        if let Ok(mut v) = HeaderValue::from_str(t.expose()) {
            v.set_sensitive(true);
            headers.insert("private-token", v);
        }
    }
    let probe = upstream
        .send(Method::GET, "/api/v4/version", headers.clone(), None)
        .await;
    let probe = match probe {
        Ok(resp) => {
            let status = resp.status().as_u16();
            Ok((status, head_of_body(resp).await))
        }
        Err(e) => Err(e),
    };
    match probe {
        Ok((status, body)) if !gitlab_probe::is_gitlab_version_answer(status, &body) => {
            r.line(
                Status::Fail,
                "GitLab reachable",
                &format!(
                    "{} ({route}) answered {}",
                    upstream.base(),
                    gitlab_probe::describe(status, &body)
                ),
                gitlab_probe::NOT_GITLAB_HINT,
            );
            r.skip_rest(
                &["GitLab TLS trusted", "token valid"],
                "GitLab not reachable",
            );
            return exit(r);
        }
        Ok((status, _)) => {
            r.line(
                Status::Ok,
                "GitLab reachable",
                &format!("{} ({route}): HTTP {status}", upstream.base()),
                "",
            );
            if tls_applies {
                r.line(Status::Ok, "GitLab TLS trusted", "certificate verified", "");
            } else {
                r.line(
                    Status::Skip,
                    "GitLab TLS trusted",
                    "GitLab URL is http:// (no TLS)",
                    "",
                );
            }
        }
        Err(e) if e.error == ErrorCode::UpstreamTls => {
            r.line(
                Status::Ok,
                "GitLab reachable",
                &format!("{} ({route})", upstream.base()),
                "",
            );
            r.line(Status::Fail, "GitLab TLS trusted", &e.message, &e.hint);
            r.skip_rest(&["token valid"], "no TLS to GitLab");
            return exit(r);
        }
        Err(e) => {
            r.line(
                Status::Fail,
                "GitLab reachable",
                &format!("{}: {}", e.error, e.message),
                &e.hint,
            );
            r.skip_rest(
                &["GitLab TLS trusted", "token valid"],
                "GitLab not reachable",
            );
            return exit(r);
        }
    }
    // 6. The agent's own token.
    if token.is_none() {
        r.line(
            Status::Skip,
            "token valid",
            "the agent holds no GitLab token (the broker's is used)",
            "",
        );
        return exit(r);
    }
    if let Some(t) = token {
        token::check_token(&mut r, &upstream, headers, t.expose()).await;
    }
    exit(r)
}

/// Opens `Tunnel/Connect` over `io` with the sessions' own handshake
/// (Hello, Welcome and its validation); returns the connection's GitLab URL,
/// or the failure and its fix.
async fn handshake(cfg: &AgentConfig, io: Box<dyn dial::Io>) -> Result<String, (String, String)> {
    let fail = |e: SessionError| (e.to_string(), e.hint().to_string());
    let mut client = dial::over(io).await.map_err(|e| fail(e.into()))?;
    let (tx, rx) = gitproxy_shared::tunnel::queue::channel(4, 1024);
    let close = CancellationToken::new();
    let to_msg: fn(ControlFrame) -> AgentMessage = |_| AgentMessage { msg: None };
    let outbound = Outbound::new(Control::new(), rx, to_msg).closed_by(close.clone());
    let instance = format!("{}-check", cfg.instance);
    let opened = handshake::open(&mut client, cfg, &instance, &tx, outbound).await;
    close.cancel();
    drop(tx);
    Ok(opened.map_err(fail)?.gitlab_url.to_string())
}

fn exit(r: Report) -> ExitCode {
    if r.failed {
        println!(
            "\nsome checks failed: fix the first FAIL above, then run `gitproxy-agent check` again"
        );
        ExitCode::FAILURE
    } else {
        println!("\nall checks passed");
        ExitCode::SUCCESS
    }
}

/// The first 64 KiB of a probe's body (GitLab's `/version` answer is tiny;
/// whatever else answers is not read further). A body cut by an error is
/// what arrived so far.
async fn head_of_body(resp: gitproxy_shared::upstream::Response) -> Vec<u8> {
    const MAX: usize = 64 * 1024;
    let mut out = Vec::new();
    let mut body = resp.into_body();
    while out.len() < MAX {
        match gitproxy_shared::upstream::next_chunk(&mut body).await {
            Ok(Some(c)) => out.extend_from_slice(&c[..c.len().min(MAX - out.len())]),
            _ => break,
        }
    }
    out
}
