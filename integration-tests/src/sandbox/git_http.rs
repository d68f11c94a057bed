//! git smart HTTP through the real `git http-backend` CGI, with GitLab's auth rules.
//!
//! The request body is streamed into the CGI's stdin and its stdout streamed back, so
//! memory stays flat whatever the pack size. Chunked bodies carry no `CONTENT_LENGTH`
//! (http-backend then reads to EOF); gzip bodies are passed through with
//! `HTTP_CONTENT_ENCODING` for http-backend to inflate.

use std::process::Stdio;

use axum::body::Body;
use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use super::api::{self, AuthError};
use super::groups;
use super::state::access;
use super::Inner;

/// Which git service a request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Service {
    UploadPack,
    ReceivePack,
}

/// A recognised git HTTP route: the project path and the suffix after `<project>.git`.
pub struct GitRoute {
    project: String,
    suffix: String,
}

/// Recognises `/<ns>/<project>.git/{info/refs,git-upload-pack,git-receive-pack}`.
/// Workhorse routes git only with the `.git` (a `.git`-less handshake is redirected
/// first, see `server::gitless_redirect`; other `.git`-less paths are not git).
pub fn match_route(path: &str) -> Option<GitRoute> {
    for suffix in ["/info/refs", "/git-upload-pack", "/git-receive-pack"] {
        if let Some(prefix) = path.strip_suffix(suffix) {
            let project = prefix.trim_start_matches('/');
            let Some(project) = project.strip_suffix(".git") else {
                continue;
            };
            if project.contains('/') && !project.split('/').any(|s| s == ".." || s.is_empty()) {
                return Some(GitRoute {
                    project: project.to_string(),
                    suffix: suffix.to_string(),
                });
            }
        }
    }
    None
}

fn text(status: StatusCode, body: &str) -> Response<Body> {
    let mut r = Response::new(Body::from(body.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn access_denied(inner: &Inner, with_message: bool) -> Response<Body> {
    let body = if with_message {
        format!(
            "HTTP Basic: Access denied. If a password was provided for Git authentication, the password was incorrect or you're required to use a token instead of a password. If a token was provided, it was either incorrect, expired, or improperly scoped. See {}/help/topics/git/troubleshooting_git.md#error-on-git-fetch-http-basic-access-denied\n",
            inner.external_url
        )
    } else {
        "HTTP Basic: Access denied\n".to_string()
    };
    let mut r = text(StatusCode::UNAUTHORIZED, &body);
    r.headers_mut().insert(
        http::header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"GitLab\""),
    );
    r
}

/// Serves one git HTTP request. `password` is the Basic password (the token), if any.
pub async fn serve(
    inner: &Inner,
    route: GitRoute,
    req: Request<Incoming>,
    password: Option<String>,
) -> Response<Body> {
    let query = req.uri().query().unwrap_or("").to_string();
    let service = if route.suffix == "/info/refs" {
        match api::parse_query(&query)
            .iter()
            .find(|(k, _)| k == "service")
            .map(|(_, v)| v.as_str())
        {
            Some("git-upload-pack") => Service::UploadPack,
            Some("git-receive-pack") => Service::ReceivePack,
            _ => return text(StatusCode::FORBIDDEN, "Unsupported service\n"),
        }
    } else if route.suffix == "/git-receive-pack" {
        Service::ReceivePack
    } else {
        Service::UploadPack
    };

    // GitLab: private projects need credentials; a bad token is a 401 with the long hint.
    let Some(password) = password else {
        return access_denied(inner, false);
    };
    let caller = match api::authenticate(inner, &password) {
        Ok(c) => c,
        Err(AuthError::InsufficientScope(_)) | Err(_) => return access_denied(inner, true),
    };
    let git_scope = |s: &[&str]| caller.has_any_scope(s);
    if !git_scope(&["api", "read_repository", "write_repository"]) {
        return access_denied(inner, true);
    }
    let (project, level) = {
        let st = inner.lock();
        match st.find_project(&route.project) {
            Some(p) => (
                Some(p.clone()),
                groups::project_access(&st, p, caller.user_id),
            ),
            None => (None, 0),
        }
    };
    let Some(project) = project else {
        return text(
            StatusCode::NOT_FOUND,
            "The project you were looking for could not be found or you don't have permission to view it.\n",
        );
    };
    if level == 0 {
        return text(
            StatusCode::NOT_FOUND,
            "The project you were looking for could not be found or you don't have permission to view it.\n",
        );
    }
    match service {
        Service::UploadPack => {
            if level < access::REPORTER || !git_scope(&["api", "read_repository"]) {
                return text(
                    StatusCode::FORBIDDEN,
                    "You are not allowed to download code from this project.\n",
                );
            }
        }
        Service::ReceivePack => {
            // lib/gitlab/git_access.rb: ERROR_MESSAGES[:archived].
            if project.archived {
                return text(
                    StatusCode::FORBIDDEN,
                    "You are not allowed to push code to an archived project.\n",
                );
            }
            if level < access::DEVELOPER || !git_scope(&["api", "write_repository"]) {
                return text(
                    StatusCode::FORBIDDEN,
                    "You are not allowed to push code to this project.\n",
                );
            }
        }
    }

    let rel = match project.repo_dir.strip_prefix(&inner.data_dir) {
        Ok(r) => r.to_string_lossy().into_owned(),
        Err(_) => {
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "repository outside root\n",
            )
        }
    };
    let path_info = format!("/{}{}", rel.trim_start_matches('/'), route.suffix);
    match run_cgi(inner, req, &path_info, &query, &caller.username, level).await {
        Ok(r) => r,
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("git http-backend: {e}\n"),
        ),
    }
}

async fn run_cgi(
    inner: &Inner,
    req: Request<Incoming>,
    path_info: &str,
    query: &str,
    user: &str,
    level: u32,
) -> anyhow::Result<Response<Body>> {
    let (parts, body) = req.into_parts();
    let header = |n: &str| {
        parts
            .headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let mut cmd = tokio::process::Command::new("git");
    cmd.arg("http-backend")
        .env_remove("CONTENT_LENGTH")
        .env_remove("HTTP_CONTENT_ENCODING")
        .env_remove("GIT_PROTOCOL")
        .env("GIT_PROJECT_ROOT", &inner.data_dir)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("GIT_HTTP_MAX_REQUEST_BUFFER", "1000M")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("PATH_INFO", path_info)
        .env("QUERY_STRING", query)
        .env("REQUEST_METHOD", parts.method.as_str())
        .env("REMOTE_USER", user)
        .env("REMOTE_ADDR", "127.0.0.1")
        .env("GL_ACCESS_LEVEL", level.to_string())
        .env("CONTENT_TYPE", header("content-type").unwrap_or_default())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(len) = header("content-length") {
        cmd.env("CONTENT_LENGTH", len);
    }
    if let Some(enc) = header("content-encoding") {
        cmd.env("HTTP_CONTENT_ENCODING", enc);
    }
    if let Some(proto) = header("git-protocol") {
        cmd.env("GIT_PROTOCOL", proto);
    }
    let mut child = cmd.spawn()?;
    let mut stdin = child.stdin.take();
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let stderr = child.stderr.take();

    // Request body -> stdin, streamed; EOF when the body ends.
    tokio::spawn(async move {
        let mut body = body;
        if let Some(stdin) = stdin.as_mut() {
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else { break };
                if let Ok(data) = frame.into_data() {
                    if stdin.write_all(&data).await.is_err() {
                        break;
                    }
                }
            }
            let _ = stdin.shutdown().await;
        }
        drop(stdin);
    });
    // stderr -> log.
    if let Some(mut err) = stderr {
        tokio::spawn(async move {
            let mut buf = String::new();
            let _ = err.read_to_string(&mut buf).await;
            if !buf.trim().is_empty() {
                tracing::debug!(target: "gitlab_sandbox", "git http-backend: {}", buf.trim());
            }
        });
    }
    // Reap the child when it exits (kill_on_drop covers aborted responses).
    tokio::spawn(async move {
        let _ = child.wait().await;
    });

    let mut reader = BufReader::new(stdout);
    let mut resp = Response::new(Body::empty());
    loop {
        let mut line = String::new();
        let n = reader.read_line(&mut line).await?;
        let line = line.trim_end_matches(['\r', '\n']);
        if n == 0 || line.is_empty() {
            break;
        }
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let v = v.trim();
        if k.eq_ignore_ascii_case("status") {
            let code = v.split_whitespace().next().unwrap_or("200");
            *resp.status_mut() = code
                .parse::<u16>()
                .ok()
                .and_then(|c| StatusCode::from_u16(c).ok())
                .unwrap_or(StatusCode::OK);
        } else if let (Ok(name), Ok(val)) = (
            http::HeaderName::from_bytes(k.trim().as_bytes()),
            HeaderValue::from_str(v),
        ) {
            resp.headers_mut().append(name, val);
        }
    }
    let stream = futures::stream::unfold(Some(reader), |state| async move {
        let mut r = state?;
        let mut buf = BytesMut::with_capacity(64 * 1024);
        match r.read_buf(&mut buf).await {
            Ok(0) => None,
            Ok(_) => Some((Ok::<Bytes, std::io::Error>(buf.freeze()), Some(r))),
            Err(e) => Some((Err(e), None)),
        }
    });
    *resp.body_mut() = Body::from_stream(stream);
    Ok(resp)
}
