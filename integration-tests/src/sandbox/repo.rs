//! Real bare git repositories driven through the `git` CLI plumbing: creation
//! with an initial commit, reading blobs, listing and creating branches, and
//! committing a list of file actions without a worktree.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{anyhow, bail, Context, Result};

/// Author/committer identity used for sandbox-made commits.
#[derive(Debug, Clone)]
pub struct Identity {
    pub name: String,
    pub email: String,
}

impl Default for Identity {
    fn default() -> Self {
        Identity {
            name: "Sandbox Administrator".into(),
            email: "admin@sandbox.invalid".into(),
        }
    }
}

/// One change of a commit (`actions[]` of the commits API).
#[derive(Debug, Clone)]
pub enum FileAction {
    Create { path: String, content: Vec<u8> },
    Update { path: String, content: Vec<u8> },
    Delete { path: String },
}

/// Why a commit was refused (mapped to GitLab's 400 messages by the API).
#[derive(Debug)]
pub enum CommitError {
    FileExists,
    FileMissing,
    Git(anyhow::Error),
}

impl From<anyhow::Error> for CommitError {
    fn from(e: anyhow::Error) -> Self {
        CommitError::Git(e)
    }
}

/// Metadata of a commit as `git show` reports it.
#[derive(Debug, Clone)]
pub struct CommitInfo {
    pub id: String,
    pub author_name: String,
    pub author_email: String,
    pub authored_date: String,
    pub committer_name: String,
    pub committer_email: String,
    pub committed_date: String,
    pub parent_ids: Vec<String>,
    pub message: String,
}

impl CommitInfo {
    /// First line of the message.
    pub fn title(&self) -> &str {
        self.message.lines().next().unwrap_or("")
    }
}

/// A blob read at a ref.
#[derive(Debug, Clone)]
pub struct FileBlob {
    pub blob_id: String,
    pub commit_id: String,
    pub last_commit_id: String,
    pub content: Vec<u8>,
}

/// A bare repository on disk.
#[derive(Debug, Clone)]
pub struct Repo {
    dir: PathBuf,
}

fn git(dir: &Path) -> Command {
    let mut cmd = Command::new("git");
    cmd.arg("--git-dir")
        .arg(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_TERMINAL_PROMPT", "0")
        .stdin(Stdio::null());
    cmd
}

fn run(mut cmd: Command) -> Result<String> {
    let out = cmd.output().context("spawning git")?;
    if !out.status.success() {
        bail!(
            "git failed ({:?}): {}",
            cmd.get_args().collect::<Vec<_>>(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_string())
}

fn run_with_input(mut cmd: Command, input: &[u8]) -> Result<String> {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().context("spawning git")?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input).context("writing to git")?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "git failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_string())
}

/// GitLab protects the default branch: only Maintainers (40) and above may push to it.
/// The git HTTP layer exports the caller's level as `GL_ACCESS_LEVEL`.
const PRE_RECEIVE_HOOK: &str = r#"#!/bin/sh
# gitlab-sandbox: the default branch is protected (Maintainer+ may push).
default=$(git symbolic-ref --short HEAD 2>/dev/null)
level=${GL_ACCESS_LEVEL:-0}
while read -r old new ref; do
  if [ "$ref" = "refs/heads/$default" ] && [ "$level" -lt 40 ]; then
    echo "GitLab: You are not allowed to push code to protected branches on this project."
    exit 1
  fi
done
exit 0
"#;

fn install_pre_receive_hook(dir: &Path) -> Result<()> {
    let hooks = dir.join("hooks");
    std::fs::create_dir_all(&hooks)?;
    let path = hooks.join("pre-receive");
    std::fs::write(&path, PRE_RECEIVE_HOOK)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(())
}

/// A ref or revision safe to hand to git (no option injection, no revision ranges).
fn safe_rev(rev: &str) -> bool {
    !rev.is_empty()
        && !rev.starts_with('-')
        && !rev.contains("..")
        && !rev.contains(':')
        && !rev.chars().any(|c| c.is_control() || c == ' ')
}

impl Repo {
    /// Opens an existing bare repository.
    pub fn open(dir: impl Into<PathBuf>) -> Repo {
        Repo { dir: dir.into() }
    }

    /// `git init --bare` with `default_branch` as HEAD, receive-pack enabled over HTTP,
    /// then an initial commit holding `files`.
    pub fn create(
        dir: &Path,
        default_branch: &str,
        files: Option<&[(String, Vec<u8>)]>,
        who: &Identity,
    ) -> Result<Repo> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut init = Command::new("git");
        init.arg("init")
            .arg("--bare")
            .arg("--quiet")
            .arg(format!("--initial-branch={default_branch}"))
            .arg(dir)
            .env("GIT_CONFIG_NOSYSTEM", "1");
        run(init)?;
        let repo = Repo::open(dir);
        for (k, v) in [
            ("http.receivepack", "true"),
            ("http.uploadpack", "true"),
            ("uploadpack.allowFilter", "true"),
            ("uploadpack.allowAnySHA1InWant", "true"),
            ("receive.advertisePushOptions", "true"),
        ] {
            let mut c = git(dir);
            c.args(["config", k, v]);
            run(c)?;
        }
        install_pre_receive_hook(dir)?;
        // An empty repository: HEAD names the default branch, which has no commit.
        let Some(files) = files else {
            return Ok(repo);
        };
        let actions: Vec<FileAction> = files
            .iter()
            .map(|(p, c)| FileAction::Create {
                path: p.clone(),
                content: c.clone(),
            })
            .collect();
        repo.commit(default_branch, None, "Initial commit", &actions, who)
            .map_err(|e| match e {
                CommitError::Git(e) => e,
                other => anyhow!("initial commit: {other:?}"),
            })?;
        Ok(repo)
    }

    /// Resolves a branch, tag or sha to a commit id.
    pub fn resolve(&self, rev: &str) -> Option<String> {
        if !safe_rev(rev) {
            return None;
        }
        let mut c = git(&self.dir);
        c.args(["rev-parse", "--verify", "--quiet", "--end-of-options"])
            .arg(format!("{rev}^{{commit}}"));
        run(c).ok().filter(|s| !s.is_empty())
    }

    /// Local branch names, sorted.
    pub fn branches(&self) -> Vec<String> {
        let mut c = git(&self.dir);
        c.args(["for-each-ref", "--format=%(refname:short)", "refs/heads/"]);
        run(c)
            .map(|s| s.lines().map(str::to_string).collect())
            .unwrap_or_default()
    }

    /// `(branch, commit id)` for every branch.
    pub fn branch_heads(&self) -> Vec<(String, String)> {
        let mut c = git(&self.dir);
        c.args([
            "for-each-ref",
            "--format=%(refname:short) %(objectname)",
            "refs/heads/",
        ]);
        run(c)
            .map(|s| {
                s.lines()
                    .filter_map(|l| l.split_once(' '))
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Whether `name` is a valid branch name for git.
    pub fn valid_branch_name(name: &str) -> bool {
        if name.starts_with('-') || name.is_empty() {
            return false;
        }
        let mut c = Command::new("git");
        c.args(["check-ref-format", "--branch", name])
            .stdin(Stdio::null());
        run(c).is_ok()
    }

    /// Creates `refs/heads/<name>` at `commit`, failing if it exists.
    pub fn create_branch(&self, name: &str, commit: &str) -> Result<()> {
        let mut c = git(&self.dir);
        c.args(["update-ref", "--no-deref"])
            .arg(format!("refs/heads/{name}"))
            .arg(commit)
            .arg("");
        run(c).map(|_| ())
    }

    /// Metadata of one commit.
    pub fn commit_info(&self, sha: &str) -> Option<CommitInfo> {
        if !safe_rev(sha) {
            return None;
        }
        let mut c = git(&self.dir);
        c.args([
            "show",
            "-s",
            "--format=%H%x00%an%x00%ae%x00%aI%x00%cn%x00%ce%x00%cI%x00%P%x00%B",
            "--end-of-options",
            sha,
        ]);
        let out = run(c).ok()?;
        let f: Vec<&str> = out.splitn(9, '\0').collect();
        if f.len() < 9 {
            return None;
        }
        Some(CommitInfo {
            id: f[0].to_string(),
            author_name: f[1].to_string(),
            author_email: f[2].to_string(),
            authored_date: f[3].to_string(),
            committer_name: f[4].to_string(),
            committer_email: f[5].to_string(),
            committed_date: f[6].to_string(),
            parent_ids: f[7].split_whitespace().map(str::to_string).collect(),
            message: f[8].to_string(),
        })
    }

    /// Reads `path` at `rev`; `None` if the ref or the file does not exist.
    pub fn read_file(&self, rev: &str, path: &str) -> Option<FileBlob> {
        let commit_id = self.resolve(rev)?;
        let path = path.trim_start_matches('/');
        if path.is_empty() {
            return None;
        }
        let mut c = git(&self.dir);
        c.args(["rev-parse", "--verify", "--quiet"])
            .arg(format!("{commit_id}:{path}"));
        let blob_id = run(c).ok().filter(|s| !s.is_empty())?;
        let mut t = git(&self.dir);
        t.args(["cat-file", "-t", &blob_id]);
        if run(t).ok()? != "blob" {
            return None;
        }
        let mut c = git(&self.dir);
        c.args(["cat-file", "blob", &blob_id]);
        let out = c.output().ok()?;
        if !out.status.success() {
            return None;
        }
        let mut l = git(&self.dir);
        l.args(["log", "-1", "--format=%H", &commit_id, "--", path]);
        let last_commit_id = run(l).unwrap_or_else(|_| commit_id.clone());
        Some(FileBlob {
            blob_id,
            commit_id,
            last_commit_id,
            content: out.stdout,
        })
    }

    fn path_exists(&self, index: &Path, path: &str) -> Result<bool> {
        let mut c = git(&self.dir);
        c.env("GIT_INDEX_FILE", index)
            .env("GIT_LITERAL_PATHSPECS", "1")
            .args(["ls-files", "--cached", "-z", "--"])
            .arg(path);
        let out = run(c)?;
        Ok(out.split('\0').any(|p| p == path))
    }

    /// Commits `actions` on top of `start` (or the branch itself when `None`; or no parent
    /// when neither exists) and moves `refs/heads/<branch>` to it. Returns the new commit id.
    pub fn commit(
        &self,
        branch: &str,
        start: Option<&str>,
        message: &str,
        actions: &[FileAction],
        who: &Identity,
    ) -> Result<String, CommitError> {
        let old = self.resolve(&format!("refs/heads/{branch}"));
        let parent = match start {
            Some(s) => Some(
                self.resolve(s)
                    .ok_or_else(|| anyhow!("unknown start ref {s}"))?,
            ),
            None => old.clone(),
        };
        let tmp = tempfile::tempdir().map_err(anyhow::Error::from)?;
        let index = tmp.path().join("index");
        let mut rt = git(&self.dir);
        rt.env("GIT_INDEX_FILE", &index).arg("read-tree");
        match &parent {
            Some(p) => rt.arg(p),
            None => rt.arg("--empty"),
        };
        run(rt)?;
        for action in actions {
            match action {
                FileAction::Create { path, content } | FileAction::Update { path, content } => {
                    let exists = self.path_exists(&index, path)?;
                    if matches!(action, FileAction::Create { .. }) && exists {
                        return Err(CommitError::FileExists);
                    }
                    if matches!(action, FileAction::Update { .. }) && !exists {
                        return Err(CommitError::FileMissing);
                    }
                    let mut h = git(&self.dir);
                    h.args(["hash-object", "-w", "--stdin"]);
                    let sha = run_with_input(h, content)?;
                    let mut u = git(&self.dir);
                    u.env("GIT_INDEX_FILE", &index)
                        .args(["update-index", "--add", "--cacheinfo"])
                        .arg(format!("100644,{sha},{path}"));
                    run(u)?;
                }
                FileAction::Delete { path } => {
                    if !self.path_exists(&index, path)? {
                        return Err(CommitError::FileMissing);
                    }
                    let mut u = git(&self.dir);
                    u.env("GIT_INDEX_FILE", &index)
                        .args(["update-index", "--force-remove", "--"])
                        .arg(path);
                    run(u)?;
                }
            }
        }
        let mut wt = git(&self.dir);
        wt.env("GIT_INDEX_FILE", &index).arg("write-tree");
        let tree = run(wt)?;
        let mut ct = git(&self.dir);
        ct.env("GIT_AUTHOR_NAME", &who.name)
            .env("GIT_AUTHOR_EMAIL", &who.email)
            .env("GIT_COMMITTER_NAME", &who.name)
            .env("GIT_COMMITTER_EMAIL", &who.email)
            .args(["commit-tree", &tree]);
        if let Some(p) = &parent {
            ct.args(["-p", p]);
        }
        let commit = run_with_input(ct, message.as_bytes())?;
        let mut ur = git(&self.dir);
        ur.args(["update-ref", "-m", "sandbox commit"])
            .arg(format!("refs/heads/{branch}"))
            .arg(&commit)
            .arg(old.as_deref().unwrap_or(""));
        run(ur)?;
        Ok(commit)
    }
}
