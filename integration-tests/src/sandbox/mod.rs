//! The sandbox GitLab: a faithful simulator of a GitLab Self-Managed server for tests
//! and demos.
//!
//! It serves a subset of the REST API v4 (auth and token errors, projects with offset and
//! keyset pagination, files, branches, commits, merge requests) and git smart HTTP via
//! the real `git http-backend`, over real bare repositories under `data_dir`. Access
//! follows GitLab's membership routes ([`groups`]): groups and subgroups, groups shared
//! with groups, projects shared with groups, group access tokens' bot users and
//! service accounts.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use gitproxy_integration_tests::sandbox::*;
//! let dir = tempfile::tempdir()?;
//! let (sb, addr) = Sandbox::start(SandboxConfig::new(dir.path())).await?;
//! let uid = sb.add_user("alice");
//! sb.add_token(TokenSpec::new("secret", uid, &["api"]));
//! let pid = sb.add_project(ProjectSpec::new("group/app").member(uid, 40));
//! # let _ = (addr, pid); Ok(()) }
//! ```
//! Serving stops when the last clone of the [`Sandbox`] handle is dropped, or on
//! [`Sandbox::shutdown`].

mod api;
mod clock;
pub mod demo;
mod git_http;
pub mod groups;
mod repo;
mod server;
pub mod state;
pub mod throttle;
pub mod version;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::Context;
use tokio_util::sync::{CancellationToken, DropGuard};

pub use state::access;
use state::{Group, Project, State, Token, User, UserKind};
pub use throttle::RateLimit;
pub use version::GitlabVersion;

/// How to run a sandbox.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// Where to listen; `127.0.0.1:0` picks a free port.
    pub listen: SocketAddr,
    /// What GitLab calls itself (Link/web_url/http_url_to_repo); default
    /// `http(s)://<bound addr><relative_url_root>`.
    pub external_url: Option<String>,
    /// GitLab's `relative_url_root` (e.g. `/gitlab`): everything, API and git smart
    /// HTTP, is served under it and other paths answer 404.
    pub relative_url_root: Option<String>,
    /// `gitlab.yml`'s `host`/`port` when they differ from the URL callers use: GitLab
    /// builds `Link` and `web_url` from the request's scheme but the configured host
    /// and port (e.g. `http://gitlab.corp:443/...` when the caller speaks http to an
    /// in-cluster service). Ignored when `external_url` is set.
    pub external_host: Option<String>,
    pub external_port: Option<u16>,
    /// Where the bare repositories live (the caller owns and cleans it).
    pub data_dir: PathBuf,
    /// Optional TLS: (certificate chain PEM, private key PEM).
    pub tls: Option<(Vec<u8>, Vec<u8>)>,
    /// The GitLab release imitated (`/version`, routes that came later).
    pub gitlab_version: GitlabVersion,
    /// A Rack::Attack-style throttle over every request, if any.
    pub rate_limit: Option<RateLimit>,
}

impl SandboxConfig {
    /// Plain HTTP on `127.0.0.1:0`, repositories under `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> SandboxConfig {
        SandboxConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            external_url: None,
            relative_url_root: None,
            external_host: None,
            external_port: None,
            data_dir: data_dir.into(),
            tls: None,
            gitlab_version: GitlabVersion::default(),
            rate_limit: None,
        }
    }

    /// Imitates another GitLab release.
    pub fn version(mut self, v: GitlabVersion) -> SandboxConfig {
        self.gitlab_version = v;
        self
    }

    /// Throttles every request.
    pub fn rate_limit(mut self, r: RateLimit) -> SandboxConfig {
        self.rate_limit = Some(r);
        self
    }
}

/// A personal access token to register.
#[derive(Debug, Clone)]
pub struct TokenSpec {
    pub token: String,
    pub user_id: u64,
    pub scopes: Vec<String>,
    /// `YYYY-MM-DD`; the token is expired from that day on.
    pub expires_at: Option<String>,
    pub revoked: bool,
    pub active: bool,
}

impl TokenSpec {
    /// An active, non-expiring token.
    pub fn new(token: impl Into<String>, user_id: u64, scopes: &[&str]) -> TokenSpec {
        TokenSpec {
            token: token.into(),
            user_id,
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            expires_at: None,
            revoked: false,
            active: true,
        }
    }
}

/// A project to create (with a real bare repository).
#[derive(Debug, Clone)]
pub struct ProjectSpec {
    /// `group/name` (subgroups allowed: `a/b/name`).
    pub path_with_namespace: String,
    pub default_branch: String,
    /// `(user_id, access_level)`: 10 Guest, 20 Reporter, 30 Developer, 40 Maintainer, 50 Owner.
    pub members: Vec<(u64, u32)>,
    /// Files of the initial commit: `(path, content)`.
    pub files: Vec<(String, Vec<u8>)>,
    /// Archived: listed unless `archived=false`, read-only.
    pub archived: bool,
    /// No commit at all (GitLab's `empty_repo`, `default_branch: null`).
    pub empty: bool,
}

impl ProjectSpec {
    /// A project with default branch `main`, a README and no members.
    pub fn new(path_with_namespace: impl Into<String>) -> ProjectSpec {
        let pwn = path_with_namespace.into();
        ProjectSpec {
            files: vec![("README.md".into(), format!("# {pwn}\n").into_bytes())],
            path_with_namespace: pwn,
            default_branch: "main".into(),
            members: Vec::new(),
            archived: false,
            empty: false,
        }
    }

    /// With another default branch (`master`, `develop`, `trunk`, ...).
    pub fn default_branch(mut self, name: impl Into<String>) -> ProjectSpec {
        self.default_branch = name.into();
        self
    }

    /// Archived (read-only).
    pub fn archived(mut self) -> ProjectSpec {
        self.archived = true;
        self
    }

    /// An empty repository: no commit, no branch.
    pub fn empty(mut self) -> ProjectSpec {
        self.empty = true;
        self.files.clear();
        self
    }

    /// Adds a member.
    pub fn member(mut self, user_id: u64, access_level: u32) -> ProjectSpec {
        self.members.push((user_id, access_level));
        self
    }

    /// Adds a file to the initial commit.
    pub fn file(mut self, path: impl Into<String>, content: impl Into<Vec<u8>>) -> ProjectSpec {
        self.files.push((path.into(), content.into()));
        self
    }
}

/// Shared state of a running sandbox.
#[derive(Debug)]
pub(crate) struct Inner {
    state: Mutex<State>,
    data_dir: PathBuf,
    external_url: String,
    /// `""` or `/prefix` (no trailing slash).
    relative_url_root: String,
    /// `http` or `https`: the scheme requests arrive with.
    scheme: &'static str,
    repo_locks: Mutex<HashMap<u64, Arc<Mutex<()>>>>,
    pub(crate) version: GitlabVersion,
    pub(crate) throttle: Option<throttle::Throttle>,
}

impl Inner {
    /// The state, even if a panicking thread poisoned the lock.
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Serialises writes to one repository.
    pub(crate) fn repo_lock(&self, project_id: u64) -> Arc<Mutex<()>> {
        self.repo_locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(project_id)
            .or_default()
            .clone()
    }
}

/// Normalises a relative URL root to `""` or `/a/b`.
fn relative_url_root(root: Option<&str>) -> anyhow::Result<String> {
    let root = root.unwrap_or("").trim_end_matches('/');
    if root.is_empty() {
        return Ok(String::new());
    }
    if !root.starts_with('/')
        || root.contains(['?', '#', ' '])
        || root
            .split('/')
            .skip(1)
            .any(|s| s.is_empty() || s == "." || s == "..")
    {
        anyhow::bail!("relative URL root {root:?} must look like /gitlab");
    }
    Ok(root.to_string())
}

/// Handle on a running sandbox GitLab; cheap to clone. Serving stops when the last
/// clone is dropped (or [`Sandbox::shutdown`] is called).
#[derive(Clone)]
pub struct Sandbox {
    inner: Arc<Inner>,
    stop: CancellationToken,
    closed: CancellationToken,
    _guard: Arc<DropGuard>,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("external_url", &self.inner.external_url)
            .finish()
    }
}

impl Sandbox {
    /// Binds, starts serving, and returns the handle and the bound address.
    pub async fn start(cfg: SandboxConfig) -> anyhow::Result<(Sandbox, SocketAddr)> {
        std::fs::create_dir_all(&cfg.data_dir)
            .with_context(|| format!("creating {}", cfg.data_dir.display()))?;
        let data_dir = cfg.data_dir.canonicalize()?;
        let tls = match &cfg.tls {
            Some((cert, key)) => Some(server::tls_acceptor(cert, key)?),
            None => None,
        };
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .with_context(|| format!("binding {}", cfg.listen))?;
        let addr = listener.local_addr()?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let root = relative_url_root(cfg.relative_url_root.as_deref())?;
        let external_url = match (&cfg.external_url, &cfg.external_host, cfg.external_port) {
            (Some(u), _, _) => u.trim_end_matches('/').to_string(),
            (None, None, None) => format!("{scheme}://{addr}{root}"),
            (None, host, port) => {
                let host = host.clone().unwrap_or_else(|| match addr.ip() {
                    std::net::IpAddr::V6(ip) => format!("[{ip}]"),
                    ip => ip.to_string(),
                });
                let port = port.unwrap_or(addr.port());
                format!("{scheme}://{host}:{port}{root}")
            }
        };
        let inner = Arc::new(Inner {
            state: Mutex::new(State::default()),
            data_dir,
            external_url,
            relative_url_root: root,
            scheme,
            repo_locks: Mutex::new(HashMap::new()),
            version: cfg.gitlab_version,
            throttle: cfg.rate_limit.map(throttle::Throttle::new),
        });
        let stop = CancellationToken::new();
        let closed = CancellationToken::new();
        tokio::spawn(server::accept_loop(
            inner.clone(),
            listener,
            tls,
            stop.clone(),
            closed.clone(),
        ));
        let sb = Sandbox {
            inner,
            closed,
            _guard: Arc::new(stop.clone().drop_guard()),
            stop,
        };
        Ok((sb, addr))
    }

    /// Stops serving now (all clones).
    pub fn shutdown(&self) {
        self.stop.cancel();
    }

    /// Stops serving and waits until the listening socket is closed.
    pub async fn shutdown_and_wait(&self) {
        self.stop.cancel();
        self.closed.cancelled().await;
    }

    /// A token cancelled when the sandbox stops.
    pub fn stopped(&self) -> CancellationToken {
        self.stop.child_token()
    }

    /// The URL GitLab calls itself (no trailing slash).
    pub fn external_url(&self) -> String {
        self.inner.external_url.clone()
    }

    /// Where the bare repositories live.
    pub fn data_dir(&self) -> PathBuf {
        self.inner.data_dir.clone()
    }

    /// Adds a user; returns its id.
    pub fn add_user(&self, username: &str) -> u64 {
        let mut st = self.inner.lock();
        let id = st.next_id();
        st.users.push(User {
            id,
            username: username.to_string(),
            name: username.to_string(),
            created_at: clock::now_iso(),
            kind: UserKind::Human,
        });
        id
    }

    /// Adds a service account (a bot user, https://docs.gitlab.com/user/profile/service_accounts/);
    /// it gets access like any user, by membership of groups and projects.
    pub fn add_service_account(&self, username: &str) -> u64 {
        let id = self.add_user(username);
        if let Some(u) = self.inner.lock().users.iter_mut().find(|u| u.id == id) {
            u.kind = UserKind::ServiceAccount;
        }
        id
    }

    /// Creates a group or, for `a/b`, subgroup `b` of the existing group `a`; returns its id.
    pub fn add_group(&self, full_path: &str) -> anyhow::Result<u64> {
        let full_path = full_path.trim_matches('/');
        let (parent, path) = match full_path.rsplit_once('/') {
            Some((parent, path)) => (Some(parent), path),
            None => (None, full_path),
        };
        let mut st = self.inner.lock();
        if st.find_group(full_path).is_some() {
            anyhow::bail!("group {full_path} already exists");
        }
        let parent_id = match parent {
            Some(pp) => Some(
                st.find_group(pp)
                    .map(|g| g.id)
                    .with_context(|| format!("parent group {pp} does not exist"))?,
            ),
            None => None,
        };
        let id = st.next_id();
        st.groups.push(Group {
            id,
            path: path.to_string(),
            full_path: full_path.to_string(),
            parent_id,
            members: Default::default(),
            shared_with: Default::default(),
        });
        Ok(id)
    }

    /// Adds or changes a direct member of a group (inherited by its subgroups and projects).
    pub fn add_group_member(&self, group_id: u64, user_id: u64, access_level: u32) {
        self.with_group(group_id, |g| {
            g.members.insert(user_id, access_level);
        });
    }

    /// Changes a group, if it exists.
    fn with_group(&self, group_id: u64, f: impl FnOnce(&mut Group)) {
        if let Some(g) = self
            .inner
            .lock()
            .groups
            .iter_mut()
            .find(|g| g.id == group_id)
        {
            f(g);
        }
    }

    /// Shares group `group_id` with group `with_group_id` at `group_access`
    /// (https://docs.gitlab.com/user/project/members/sharing_projects_groups/#invite-a-group-to-a-group).
    pub fn share_group(&self, group_id: u64, with_group_id: u64, group_access: u32) {
        self.with_group(group_id, |g| {
            g.shared_with.insert(with_group_id, group_access);
        });
    }

    /// Shares a project with a group at `group_access`
    /// (https://docs.gitlab.com/user/project/members/sharing_projects_groups/#invite-a-group-to-a-project).
    pub fn share_project(&self, project_id: u64, with_group_id: u64, group_access: u32) {
        let mut st = self.inner.lock();
        if let Some(p) = st.projects.iter_mut().find(|p| p.id == project_id) {
            p.shared_with.insert(with_group_id, group_access);
        }
    }

    /// Creates a group access token: GitLab makes a bot user (`group_<id>_bot_<n>`,
    /// `user_type: project_bot`) a member of the group at the token's level and
    /// issues the token to it
    /// (https://docs.gitlab.com/user/group/settings/group_access_tokens/#bot-users-for-groups).
    /// Returns the bot user's id.
    pub fn add_group_access_token(
        &self,
        group_id: u64,
        token: &str,
        access_level: u32,
        scopes: &[&str],
    ) -> u64 {
        let bot = {
            let mut st = self.inner.lock();
            let n = st.users.len() + 1;
            let id = st.next_id();
            st.users.push(User {
                id,
                username: format!("group_{group_id}_bot_{n}"),
                name: format!("group{group_id}_bot"),
                created_at: clock::now_iso(),
                kind: UserKind::ProjectBot,
            });
            id
        };
        self.add_group_member(group_id, bot, access_level);
        self.add_token(TokenSpec::new(token, bot, scopes));
        bot
    }

    /// Registers a personal access token; returns the token's id.
    pub fn add_token(&self, spec: TokenSpec) -> u64 {
        let mut st = self.inner.lock();
        let id = st.next_id();
        st.tokens.retain(|t| t.token != spec.token);
        st.tokens.push(Token {
            id,
            name: format!("token-{id}"),
            token: spec.token,
            user_id: spec.user_id,
            scopes: spec.scopes,
            expires_at: spec.expires_at,
            revoked: spec.revoked,
            active: spec.active,
            created_at: clock::now_iso(),
            last_used_at: None,
        });
        id
    }

    /// Revokes a token (GitLab: `revoked: true, active: false`).
    pub fn revoke_token(&self, token: &str) {
        if let Some(t) = self.inner.lock().token_mut(token) {
            t.revoked = true;
            t.active = false;
        }
    }

    /// Expires a token (its `expires_at` becomes yesterday).
    pub fn expire_token(&self, token: &str) {
        if let Some(t) = self.inner.lock().token_mut(token) {
            t.expires_at = Some(clock::date(-1));
            t.active = false;
        }
    }

    /// Creates a project and its bare repository; panics if git fails (test helper,
    /// see [`Sandbox::try_add_project`]).
    pub fn add_project(&self, spec: ProjectSpec) -> u64 {
        match self.try_add_project(spec) {
            Ok(id) => id,
            Err(e) => panic!("sandbox: creating project failed: {e:#}"),
        }
    }

    /// Creates a project and its bare repository with an initial commit on the default
    /// branch holding `spec.files`.
    pub fn try_add_project(&self, spec: ProjectSpec) -> anyhow::Result<u64> {
        let dir = self.prepare_repo(&spec)?;
        Ok(self.register_project(&spec, dir))
    }

    fn repo_dir(&self, pwn: &str) -> anyhow::Result<PathBuf> {
        let clean = pwn.trim_matches('/');
        let ok = clean.contains('/')
            && clean.split('/').all(|s| {
                !s.is_empty()
                    && s != "."
                    && s != ".."
                    && s.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            });
        if !ok {
            anyhow::bail!("invalid project path {pwn:?} (want group/name)");
        }
        Ok(self.inner.data_dir.join(format!("{clean}.git")))
    }

    fn prepare_repo(&self, spec: &ProjectSpec) -> anyhow::Result<PathBuf> {
        let dir = self.repo_dir(&spec.path_with_namespace)?;
        if self
            .inner
            .lock()
            .find_project(&spec.path_with_namespace)
            .is_some()
            || dir.exists()
        {
            anyhow::bail!("project {} already exists", spec.path_with_namespace);
        }
        repo::Repo::create(
            &dir,
            &spec.default_branch,
            if spec.empty { None } else { Some(&spec.files) },
            &repo::Identity::default(),
        )?;
        Ok(dir)
    }

    fn register_project(&self, spec: &ProjectSpec, dir: PathBuf) -> u64 {
        let pwn = spec.path_with_namespace.trim_matches('/');
        let (namespace, path) = pwn.rsplit_once('/').unwrap_or(("", pwn));
        let mut st = self.inner.lock();
        let id = st.next_id();
        st.projects.push(Project {
            id,
            name: path.to_string(),
            path: path.to_string(),
            namespace: namespace.to_string(),
            default_branch: spec.default_branch.clone(),
            members: spec.members.iter().copied().collect(),
            shared_with: Default::default(),
            archived: spec.archived,
            empty: spec.empty,
            repo_dir: dir,
            created_at: clock::now_iso(),
        });
        id
    }

    /// Adds or changes a member of a project.
    pub fn add_member(&self, project_id: u64, user_id: u64, access_level: u32) {
        let mut st = self.inner.lock();
        if let Some(p) = st.projects.iter_mut().find(|p| p.id == project_id) {
            p.members.insert(user_id, access_level);
        }
    }

    /// Archives (or unarchives) a project.
    pub fn set_archived(&self, project_id: u64, archived: bool) {
        let mut st = self.inner.lock();
        if let Some(p) = st.projects.iter_mut().find(|p| p.id == project_id) {
            p.archived = archived;
        }
    }

    /// Creates many projects at once (repositories prepared in parallel).
    pub fn add_projects(&self, specs: &[ProjectSpec]) -> anyhow::Result<Vec<u64>> {
        let workers = std::thread::available_parallelism()
            .map(|n| n.get() * 2)
            .unwrap_or(4);
        self.prepare_many(specs, workers)
    }

    /// The id of a project by `group/name`.
    pub fn project_id(&self, path_with_namespace: &str) -> Option<u64> {
        self.inner
            .lock()
            .find_project(path_with_namespace)
            .map(|p| p.id)
    }

    /// Sets a merge request's state (`opened`, `closed`, `merged`); false if unknown.
    pub fn set_mr_state(&self, project_id: u64, iid: u64, state: &str) -> bool {
        let mut st = self.inner.lock();
        match st
            .merge_requests
            .iter_mut()
            .find(|m| m.project_id == project_id && m.iid == iid)
        {
            Some(m) => {
                m.state = state.to_string();
                m.updated_at = clock::now_iso();
                true
            }
            None => false,
        }
    }

    /// `(iid, source_branch, target_branch, state, title)` of a project's merge requests.
    pub fn merge_requests(&self, project_id: u64) -> Vec<(u64, String, String, String, String)> {
        self.inner
            .lock()
            .merge_requests
            .iter()
            .filter(|m| m.project_id == project_id)
            .map(|m| {
                (
                    m.iid,
                    m.source_branch.clone(),
                    m.target_branch.clone(),
                    m.state.clone(),
                    m.title.clone(),
                )
            })
            .collect()
    }

    /// Every credential the sandbox saw, in order (PRIVATE-TOKEN, Bearer, Basic password,
    /// `private_token` query).
    pub fn seen_tokens(&self) -> Vec<String> {
        self.inner.lock().seen_tokens.clone()
    }

    /// `(method, path+query)` of every request served, in order.
    pub fn request_log(&self) -> Vec<(String, String)> {
        self.inner.lock().request_log.clone()
    }

    /// How many requests the throttle refused with 429.
    pub fn throttled(&self) -> u64 {
        self.inner.lock().throttled
    }

    /// The GitLab release imitated.
    pub fn gitlab_version(&self) -> GitlabVersion {
        self.inner.version
    }

    /// Forgets the request log and seen credentials.
    pub fn clear_logs(&self) {
        let mut st = self.inner.lock();
        st.request_log.clear();
        st.seen_tokens.clear();
    }

    /// Branch names of a project, read from its bare repository.
    pub fn branches(&self, project_id: u64) -> Vec<String> {
        let dir = self
            .inner
            .lock()
            .project(project_id)
            .map(|p| p.repo_dir.clone());
        dir.map(|d| repo::Repo::open(d).branches())
            .unwrap_or_default()
    }

    /// Reads a file of a project at `rev` from the bare repository.
    pub fn read_file(&self, project_id: u64, rev: &str, path: &str) -> Option<Vec<u8>> {
        let dir = self
            .inner
            .lock()
            .project(project_id)
            .map(|p| p.repo_dir.clone())?;
        repo::Repo::open(dir)
            .read_file(rev, path)
            .map(|b| b.content)
    }

    /// The bare repository of a project.
    pub fn repo_path(&self, project_id: u64) -> Option<PathBuf> {
        self.inner
            .lock()
            .project(project_id)
            .map(|p| p.repo_dir.clone())
    }

    pub(crate) fn prepare_many(
        &self,
        specs: &[ProjectSpec],
        workers: usize,
    ) -> anyhow::Result<Vec<u64>> {
        let chunks: Vec<&[ProjectSpec]> = specs
            .chunks(specs.len().div_ceil(workers.max(1)).max(1))
            .collect();
        let dirs: Vec<anyhow::Result<Vec<PathBuf>>> = std::thread::scope(|s| {
            let handles: Vec<_> = chunks
                .iter()
                .map(|chunk| {
                    s.spawn(move || chunk.iter().map(|sp| self.prepare_repo(sp)).collect())
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("worker panicked")))
                })
                .collect()
        });
        let mut ids = Vec::new();
        let mut it = specs.iter();
        for chunk in dirs {
            for dir in chunk? {
                if let Some(spec) = it.next() {
                    ids.push(self.register_project(spec, dir));
                }
            }
        }
        Ok(ids)
    }
}
