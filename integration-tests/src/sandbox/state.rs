//! In-memory model of the simulated GitLab: users, tokens, projects, merge
//! requests, plus the audit trail (credentials seen, requests served).

use std::collections::BTreeMap;
use std::path::PathBuf;

/// GitLab access levels (`Gitlab::Access`).
pub mod access {
    /// Guest.
    pub const GUEST: u32 = 10;
    /// Reporter.
    pub const REPORTER: u32 = 20;
    /// Developer.
    pub const DEVELOPER: u32 = 30;
    /// Maintainer.
    pub const MAINTAINER: u32 = 40;
    /// Owner.
    pub const OWNER: u32 = 50;
}

/// What kind of account a user is (GitLab's `user_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UserKind {
    /// A person.
    #[default]
    Human,
    /// The bot user GitLab creates for a group or project access token
    /// (`user_type: project_bot`; https://docs.gitlab.com/user/group/settings/group_access_tokens/#bot-users-for-groups).
    ProjectBot,
    /// A service account (https://docs.gitlab.com/user/profile/service_accounts/).
    ServiceAccount,
}

impl UserKind {
    /// GitLab's `bot` flag on user entities: true for every non-human account.
    pub fn is_bot(self) -> bool {
        self != UserKind::Human
    }
}

/// A user account.
#[derive(Debug, Clone)]
pub struct User {
    pub id: u64,
    pub username: String,
    pub name: String,
    pub created_at: String,
    pub kind: UserKind,
}

/// A group (or subgroup: `parent_id` set), always `private`.
#[derive(Debug, Clone)]
pub struct Group {
    pub id: u64,
    /// The last path segment.
    pub path: String,
    /// `a/b/c`.
    pub full_path: String,
    pub parent_id: Option<u64>,
    /// Direct members: `user_id -> access_level`.
    pub members: BTreeMap<u64, u32>,
    /// This group shared with other groups (`group_group_links` where this group is
    /// the `shared_group`): `invited group id -> group_access`.
    pub shared_with: BTreeMap<u64, u32>,
}

/// A personal access token as stored by the sandbox.
#[derive(Debug, Clone)]
pub struct Token {
    pub id: u64,
    pub name: String,
    pub token: String,
    pub user_id: u64,
    pub scopes: Vec<String>,
    pub expires_at: Option<String>,
    pub revoked: bool,
    pub active: bool,
    pub created_at: String,
    pub last_used_at: Option<String>,
}

/// A project (always `private` visibility) backed by a bare repository.
#[derive(Debug, Clone)]
pub struct Project {
    pub id: u64,
    pub name: String,
    pub path: String,
    pub namespace: String,
    pub default_branch: String,
    pub members: BTreeMap<u64, u32>,
    /// The project shared with groups (`project_group_links`): `group id -> group_access`.
    pub shared_with: BTreeMap<u64, u32>,
    /// Archived: read-only, hidden by `archived=false`.
    pub archived: bool,
    /// Created without commits (`empty_repo`); a push fills it.
    pub empty: bool,
    pub repo_dir: PathBuf,
    pub created_at: String,
}

impl Project {
    /// `group/name`.
    pub fn path_with_namespace(&self) -> String {
        format!("{}/{}", self.namespace, self.path)
    }

    /// The access level `user_id` holds as a direct member, if one (the effective
    /// level over every route is [`crate::sandbox::groups::project_access`]).
    pub fn access_of(&self, user_id: u64) -> Option<u32> {
        self.members.get(&user_id).copied()
    }
}

/// A merge request.
#[derive(Debug, Clone)]
pub struct MergeRequest {
    pub id: u64,
    pub iid: u64,
    pub project_id: u64,
    pub title: String,
    pub description: String,
    pub state: String,
    pub source_branch: String,
    pub target_branch: String,
    pub author_id: u64,
    pub created_at: String,
    pub updated_at: String,
}

/// Everything the sandbox knows, behind one mutex.
#[derive(Debug, Default)]
pub struct State {
    pub users: Vec<User>,
    pub tokens: Vec<Token>,
    pub projects: Vec<Project>,
    pub groups: Vec<Group>,
    pub merge_requests: Vec<MergeRequest>,
    pub seen_tokens: Vec<String>,
    pub request_log: Vec<(String, String)>,
    /// Requests refused by the throttle.
    pub throttled: u64,
    next_id: u64,
}

impl State {
    /// A fresh id (shared sequence; GitLab ids only need to be unique per type).
    pub fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    pub fn user(&self, id: u64) -> Option<&User> {
        self.users.iter().find(|u| u.id == id)
    }

    pub fn token(&self, value: &str) -> Option<&Token> {
        self.tokens.iter().find(|t| t.token == value)
    }

    pub fn token_mut(&mut self, value: &str) -> Option<&mut Token> {
        self.tokens.iter_mut().find(|t| t.token == value)
    }

    pub fn group(&self, id: u64) -> Option<&Group> {
        self.groups.iter().find(|g| g.id == id)
    }

    /// A group by full path (case-insensitive, as GitLab).
    pub fn find_group(&self, full_path: &str) -> Option<&Group> {
        self.groups
            .iter()
            .find(|g| g.full_path.eq_ignore_ascii_case(full_path))
    }

    pub fn project(&self, id: u64) -> Option<&Project> {
        self.projects.iter().find(|p| p.id == id)
    }

    /// Looks a project up by numeric id or `namespace/path` (case-insensitive, as GitLab).
    pub fn find_project(&self, id_or_path: &str) -> Option<&Project> {
        if let Ok(id) = id_or_path.parse::<u64>() {
            return self.project(id);
        }
        let wanted = id_or_path.trim_end_matches(".git").to_ascii_lowercase();
        self.projects
            .iter()
            .find(|p| p.path_with_namespace().to_ascii_lowercase() == wanted)
    }
}
