//! GitLab's REST answers that the connection API reads, and the bodies it
//! sends, as typed structs.
//!
//! Answers hold only the fields gitproxy uses: GitLab adds fields in most
//! releases, so unknown ones are ignored (serde's default). A field GitLab
//! always sends is required, so an answer without it (a proxy's page, an
//! API of another shape) is a clear error naming the field instead of a
//! silent default; fields GitLab may omit or send as `null` are `Option` or
//! `#[serde(default)]`, with the reason beside them.

use super::error::ApiError;
use crate::frontdoor::internal::Answer;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// An answer that is not of the shape GitLab sends.
#[derive(Debug, thiserror::Error)]
#[error("GitLab's answer to {what} cannot be read: {source}")]
pub struct Unreadable {
    /// The step (`GET /projects/:id`, ...).
    pub what: String,
    /// What serde found (names a missing field, or the type it expected).
    pub source: serde_json::Error,
}

/// What to do about an [`Unreadable`] answer.
pub const NOT_API_HINT: &str = "The connection's GitLab URL may lead to a proxy or another service instead of GitLab's API: check the URL (the instance's root, without /api/v4) and run Test Connection.";

impl From<Unreadable> for ApiError {
    fn from(e: Unreadable) -> Self {
        ApiError::new(502, "gitlab_error", e.to_string(), NOT_API_HINT)
    }
}

/// Reads the body of `a`, GitLab's answer to step `what`, as `T`.
pub fn read<T: DeserializeOwned>(a: &Answer, what: &str) -> Result<T, Unreadable> {
    serde_json::from_slice(&a.body).map_err(|source| Unreadable {
        what: what.to_string(),
        source,
    })
}

/// A project (`Entities::ProjectWithAccess`, `GET /projects/:id` and the
/// items of `GET /projects`).
#[derive(Debug, Clone, Deserialize)]
pub struct Project {
    /// Numeric id.
    pub id: u64,
    /// `group/name`.
    pub path_with_namespace: String,
    /// Display name.
    pub name: String,
    /// `null` while the repository is empty.
    #[serde(default)]
    pub default_branch: Option<String>,
    /// GitLab's page of the project.
    #[serde(default)]
    pub web_url: Option<String>,
    /// Absent from `simple=true` listings.
    #[serde(default)]
    pub archived: bool,
    /// Absent from `simple=true` listings.
    #[serde(default)]
    pub empty_repo: bool,
    /// The user's direct memberships; absent from `simple=true` listings.
    #[serde(default)]
    pub permissions: Option<Permissions>,
}

/// `permissions` of a project: each `null` when there is no such membership.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Permissions {
    /// Membership of the project itself.
    #[serde(default)]
    pub project_access: Option<Access>,
    /// Membership of its group (or an ancestor).
    #[serde(default)]
    pub group_access: Option<Access>,
}

/// One membership.
#[derive(Debug, Clone, Deserialize)]
pub struct Access {
    /// `Gitlab::Access` (30 Developer, 40 Maintainer, 50 Owner).
    pub access_level: u64,
}

/// An item of a `simple=true` project listing when only the id matters.
#[derive(Debug, Clone, Deserialize)]
pub struct ProjectId {
    /// Numeric id.
    pub id: u64,
}

/// A merge request (`Entities::MergeRequest`); also the GitLab half of the
/// API's own view of one.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct MergeRequest {
    /// Number within the project.
    pub iid: u64,
    /// Title.
    pub title: String,
    /// Source branch.
    pub source_branch: String,
    /// Target branch.
    pub target_branch: String,
    /// `opened`, `closed`, `merged`, `locked`.
    pub state: String,
    /// GitLab's page of the merge request.
    pub web_url: String,
}

/// A 422 refusal of a merge request: `{"message": ["...", ...]}`.
#[derive(Debug, Clone, Deserialize)]
pub struct Refusal {
    /// GitLab's validation messages.
    pub message: Vec<String>,
}

/// A branch (`GET /repository/branches/:branch`).
#[derive(Debug, Clone, Deserialize)]
pub struct Branch {
    /// Protected against some pushes.
    pub protected: bool,
    /// Whether the token's user may push to it.
    pub can_push: bool,
}

/// A file (`GET /repository/files/:path`).
#[derive(Debug, Clone, Deserialize)]
pub struct RepoFile {
    /// The content, base64 (GitLab's default `encoding`).
    pub content: String,
}

/// The calling token (`GET /personal_access_tokens/self`, GitLab 15.5+).
#[derive(Debug, Clone, Deserialize)]
pub struct TokenSelf {
    /// The token's name.
    pub name: String,
    /// Neither revoked nor expired.
    pub active: bool,
    /// Revoked.
    pub revoked: bool,
    /// `null` for a token that never expires.
    #[serde(default)]
    pub expires_at: Option<String>,
    /// `api`, `read_repository`, ...
    pub scopes: Vec<String>,
}

/// The calling user (`GET /user`).
#[derive(Debug, Clone, Deserialize)]
pub struct User {
    /// Login name.
    pub username: String,
}

/// `GET /version`.
#[derive(Debug, Clone, Deserialize)]
pub struct Version {
    /// `16.11.0-ee`, ...
    pub version: String,
}

/// What a commit action does to its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FileAction {
    /// The file does not exist on the branch yet.
    Create,
    /// The file exists and gets new content.
    Update,
}

/// One action of a commit.
#[derive(Debug, Clone, Serialize)]
pub struct CommitAction<'a> {
    /// Create or update.
    pub action: FileAction,
    /// Path in the repository.
    pub file_path: &'a str,
    /// The whole new content (text).
    pub content: &'a str,
}

/// Body of `POST /projects/:id/repository/commits`.
#[derive(Debug, Clone, Serialize)]
pub struct NewCommit<'a> {
    /// The branch to commit to (created from `start_branch` when given).
    pub branch: &'a str,
    /// Where a new branch starts; `None` commits to an existing branch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_branch: Option<&'a str>,
    /// Commit message.
    pub commit_message: &'a str,
    /// The file changes.
    pub actions: Vec<CommitAction<'a>>,
}

/// Body of `POST /projects/:id/merge_requests`.
#[derive(Debug, Clone, Serialize)]
pub struct NewMergeRequest<'a> {
    /// Source branch.
    pub source_branch: &'a str,
    /// Target branch.
    pub target_branch: &'a str,
    /// Title.
    pub title: &'a str,
    /// Description, left out when none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<&'a str>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn answer(v: serde_json::Value) -> Answer {
        Answer {
            status: 200,
            headers: http::HeaderMap::new(),
            body: serde_json::to_vec(&v).unwrap().into(),
        }
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let p: Project = read(
            &answer(json!({
                "id": 7, "path_with_namespace": "g/p", "name": "p",
                "default_branch": null, "archived": true, "a_field_of_gitlab_99": {"x": 1},
                "permissions": {"project_access": null, "group_access": {"access_level": 40, "notification_level": 3}},
            })),
            "GET /projects/:id",
        )
        .unwrap();
        assert_eq!((p.id, p.path_with_namespace.as_str()), (7, "g/p"));
        assert!(p.archived && !p.empty_repo && p.default_branch.is_none());
        let perms = p.permissions.unwrap();
        assert!(perms.project_access.is_none());
        assert_eq!(perms.group_access.unwrap().access_level, 40);

        let simple: Vec<ProjectId> = read(
            &answer(json!([{"id": 1, "name": "a"}, {"id": 2}])),
            "GET /projects",
        )
        .unwrap();
        assert_eq!(simple.iter().map(|p| p.id).collect::<Vec<_>>(), [1, 2]);

        let mr: MergeRequest = read(
            &answer(json!({
                "id": 100, "iid": 3, "title": "t", "source_branch": "s", "target_branch": "main",
                "state": "opened", "web_url": "https://gitlab.example/g/p/-/merge_requests/3",
                "references": {"full": "g/p!3"}, "draft": false,
            })),
            "merge request",
        )
        .unwrap();
        assert_eq!((mr.iid, mr.state.as_str()), (3, "opened"));

        let t: TokenSelf = read(
            &answer(json!({
                "id": 1, "name": "ci", "revoked": false, "active": true, "expires_at": null,
                "scopes": ["api"], "user_id": 2, "last_used_at": null, "created_at": "2026-01-01",
            })),
            "GET /personal_access_tokens/self",
        )
        .unwrap();
        assert_eq!((t.name.as_str(), t.expires_at), ("ci", None));
    }

    #[test]
    fn a_missing_required_field_is_named() {
        let e = read::<MergeRequest>(
            &answer(
                json!({"title": "t", "source_branch": "s", "target_branch": "main",
                           "state": "opened", "web_url": "u"}),
            ),
            "POST /merge_requests",
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with(
                "GitLab's answer to POST /merge_requests cannot be read: missing field `iid`"
            ),
            "{msg}"
        );
        let api: ApiError = e.into();
        assert_eq!(
            (api.status.as_u16(), api.code.as_str()),
            (502, "gitlab_error")
        );

        let msg = read::<TokenSelf>(
            &answer(json!({"name": "ci", "active": true, "revoked": false})),
            "GET /personal_access_tokens/self",
        )
        .unwrap_err()
        .to_string();
        assert!(msg.contains("missing field `scopes`"), "{msg}");

        let msg = read::<Vec<Project>>(&answer(json!([{"id": 1, "name": "a"}])), "GET /projects")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("missing field `path_with_namespace`"), "{msg}");

        // Not JSON at all (an HTML page of a proxy).
        let html = Answer {
            status: 200,
            headers: http::HeaderMap::new(),
            body: bytes::Bytes::from_static(b"<html>sign in</html>"),
        };
        let msg = read::<Project>(&html, "GET /projects/:id")
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with("GitLab's answer to GET /projects/:id cannot be read: expected value"),
            "{msg}"
        );
    }

    #[test]
    fn bodies_have_gitlab_field_names() {
        let c = NewCommit {
            branch: "fix",
            start_branch: None,
            commit_message: "m",
            actions: vec![CommitAction {
                action: FileAction::Create,
                file_path: "a.txt",
                content: "x",
            }],
        };
        assert_eq!(
            serde_json::to_value(&c).unwrap(),
            json!({"branch": "fix", "commit_message": "m",
                   "actions": [{"action": "create", "file_path": "a.txt", "content": "x"}]})
        );
        let m = NewMergeRequest {
            source_branch: "fix",
            target_branch: "main",
            title: "t",
            description: Some("d"),
        };
        assert_eq!(
            serde_json::to_value(&m).unwrap(),
            json!({"source_branch": "fix", "target_branch": "main", "title": "t", "description": "d"})
        );
    }
}
