//! `gitproxy-agent check`: walks the path a request takes, one step at a
//! time, and prints each step with ok / FAIL and the fix. Exit 0 only when
//! every step passes (steps that do not apply are `skip`).
//!
//! Steps: broker reachable (through the proxy when one applies), broker TLS
//! trusted, accessKey accepted, GitLab reachable, GitLab TLS trusted, and,
//! when the agent holds a token: token valid, token scopes, projects found.

use crate::config::AgentConfig;
use crate::dial;
use crate::session::{handshake, SessionError};
use base64::Engine;
use gitproxy_proto::v1::AgentMessage;
use gitproxy_shared::errors::ErrorCode;
use gitproxy_shared::gitlab_probe;
use gitproxy_shared::scopes;
use gitproxy_shared::tunnel::outbound::{Control, ControlFrame, Outbound};
use gitproxy_shared::upstream::{Upstream, UpstreamConfig};
use http::{HeaderMap, HeaderValue, Method};
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

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
        check_token(&mut r, &upstream, headers, t.expose()).await;
    }
    exit(r)
}

async fn get_json(
    upstream: &Upstream,
    target: &str,
    headers: &HeaderMap,
) -> Result<(u16, HeaderMap, serde_json::Value), gitproxy_shared::errors::GitproxyError> {
    let resp = upstream
        .send(Method::GET, target, headers.clone(), None)
        .await?;
    let status = resp.status().as_u16();
    let h = resp.headers().clone();
    let body = resp.bytes().await.unwrap_or_default();
    Ok((status, h, serde_json::from_slice(&body).unwrap_or_default()))
}

fn refusal(v: &serde_json::Value) -> (String, &'static str) {
    let why = v["error_description"]
        .as_str()
        .or(v["message"].as_str())
        .unwrap_or("401 Unauthorized")
        .to_string();
    let hint = if why.contains("expired") {
        "The token has expired: create a new one and update GITPROXY_GITLAB_TOKEN (Helm gitproxy.gitlabToken)."
    } else if why.contains("revoked") {
        "The token was revoked: create a new one and update GITPROXY_GITLAB_TOKEN."
    } else {
        "GitLab does not know this token: check GITPROXY_GITLAB_TOKEN."
    };
    (format!("GitLab answered 401: {why}"), hint)
}

async fn check_token(r: &mut Report, upstream: &Upstream, headers: HeaderMap, token: &str) {
    let (status, _, v) =
        match get_json(upstream, "/api/v4/personal_access_tokens/self", &headers).await {
            Ok(x) => x,
            Err(e) => {
                r.line(Status::Fail, "token valid", &e.message, &e.hint);
                return;
            }
        };
    let scopes: Option<Vec<String>> = match status {
        200 => {
            r.line(
                Status::Ok,
                "token valid",
                &format!(
                    "active, expires {}",
                    v["expires_at"].as_str().unwrap_or("never")
                ),
                "",
            );
            Some(
                v["scopes"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|s| s.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default(),
            )
        }
        // Before GitLab 15.5 there is no /personal_access_tokens/self (14.x:
        // 404; 15.1-15.4: 401 to non-administrators): /user decides.
        401 | 404 => match get_json(upstream, "/api/v4/user", &headers).await {
            Ok((200, _, u)) => {
                r.line(
                    Status::Ok,
                    "token valid",
                    &format!(
                        "accepted (user {}); this GitLab has no /personal_access_tokens/self (before 15.5): expiry and scopes cannot be read",
                        u["username"].as_str().unwrap_or("?")
                    ),
                    "",
                );
                None
            }
            Ok((401, _, u)) => {
                let (detail, hint) = refusal(&u);
                r.line(Status::Fail, "token valid", &detail, hint);
                r.skip_rest(&["token scopes", "projects found"], "token not valid");
                return;
            }
            Ok((s, _, _)) => {
                r.line(
                    Status::Fail,
                    "token valid",
                    &format!("GitLab answered {s} to GET /user"),
                    "Check GITPROXY_GITLAB_TOKEN.",
                );
                return;
            }
            Err(e) => {
                r.line(Status::Fail, "token valid", &e.message, &e.hint);
                return;
            }
        },
        _ => {
            r.line(
                Status::Fail,
                "token valid",
                &format!("GitLab answered {status}"),
                "Check GITPROXY_GITLAB_TOKEN.",
            );
            return;
        }
    };
    let projects = get_json(
        upstream,
        "/api/v4/projects?membership=true&min_access_level=30&archived=false&per_page=1&simple=true",
        &headers,
    )
    .await;
    let first = match &projects {
        Ok((200, _, list)) => list[0]["path_with_namespace"].as_str().map(str::to_string),
        _ => None,
    };
    match (&scopes, &first) {
        (Some(have), _) => {
            let v = scopes::judge(have);
            if v.ok {
                let detail = if v.note.is_empty() {
                    v.detail
                } else {
                    format!("{}; {}", v.detail, v.note)
                };
                r.line(Status::Ok, "token scopes", &detail, "");
            } else {
                r.line(Status::Fail, "token scopes", &v.detail, &v.note);
            }
        }
        (None, None) => r.line(
            Status::Skip,
            "token scopes",
            "this GitLab does not show a token's scopes, and there is no project to try git access on",
            "",
        ),
        (None, Some(pwn)) => {
            let (status, detail, hint) = git_capability(upstream, token, pwn).await;
            r.line(status, "token scopes", &detail, &hint);
        }
    }
    match projects {
        Ok((200, h, list)) => {
            let total = h
                .get("x-total")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            if list.as_array().is_some_and(|a| !a.is_empty()) {
                r.line(
                    Status::Ok,
                    "projects found",
                    &format!(
                        "{} with Developer role or above (archived projects not counted)",
                        total.unwrap_or_else(|| "at least 1".into())
                    ),
                    "",
                );
            } else {
                r.line(
                    Status::Fail,
                    "projects found",
                    "the token is a member of no project (not archived) with Developer role or above",
                    "Create the token at group level (a group access token), or add its user to the projects as Developer or above.",
                );
            }
        }
        Ok((s, _, _)) => r.line(
            Status::Fail,
            "projects found",
            &format!("GitLab answered {s}"),
            "",
        ),
        Err(e) => r.line(Status::Fail, "projects found", &e.message, &e.hint),
    }
}

/// Repository access established by capability (GitLab before 15.5 does not
/// show scopes): the smart HTTP advertisements of `pwn`, upload-pack for
/// read and receive-pack for write, which GitLab grants only to a token
/// whose scope and role allow them.
async fn git_capability(upstream: &Upstream, token: &str, pwn: &str) -> (Status, String, String) {
    let mut headers = HeaderMap::new();
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("oauth2:{token}"));
    if let Ok(mut v) = HeaderValue::from_str(&format!("Basic {basic}")) {
        v.set_sensitive(true);
        headers.insert(http::header::AUTHORIZATION, v);
    }
    let mut can = Vec::new();
    for (service, what) in [("git-upload-pack", "read"), ("git-receive-pack", "write")] {
        let target = format!("/{pwn}.git/info/refs?service={service}");
        match upstream.send(Method::GET, &target, headers.clone(), None).await {
            Ok(resp) if resp.status().is_success() => can.push(what),
            Ok(resp) if matches!(resp.status().as_u16(), 401 | 403) => {
                return (
                    Status::Fail,
                    format!(
                        "the token cannot {what} the repository of {pwn}: GitLab answered {} to {service}",
                        resp.status().as_u16()
                    ),
                    "Create a token with scope api (read_repository and write_repository recommended) and update GITPROXY_GITLAB_TOKEN.".into(),
                )
            }
            Ok(resp) => {
                return (
                    Status::Skip,
                    format!(
                        "this GitLab does not show a token's scopes, and {service} on {pwn} answered {}: repository access could not be determined",
                        resp.status().as_u16()
                    ),
                    String::new(),
                )
            }
            Err(e) => return (Status::Fail, e.message, e.hint),
        }
    }
    (
        Status::Ok,
        format!(
            "this GitLab does not show a token's scopes; the token can {} the repository of {pwn} over git",
            can.join(" and ")
        ),
        String::new(),
    )
}

/// Opens `Tunnel/Connect` over `io` with the sessions' own handshake
/// (Hello, Welcome and its validation); returns the connection's GitLab URL,
/// or the failure and its fix.
async fn handshake(cfg: &AgentConfig, io: Box<dyn dial::Io>) -> Result<String, (String, String)> {
    let fail = |e: SessionError| (e.to_string(), e.hint().to_string());
    let mut client = dial::over(io).await.map_err(|e| fail(e.into()))?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
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
async fn head_of_body(mut resp: reqwest::Response) -> Vec<u8> {
    const MAX: usize = 64 * 1024;
    let mut out = Vec::new();
    while out.len() < MAX {
        match resp.chunk().await {
            Ok(Some(c)) => out.extend_from_slice(&c[..c.len().min(MAX - out.len())]),
            _ => break,
        }
    }
    out
}
