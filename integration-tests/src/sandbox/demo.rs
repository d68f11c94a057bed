//! Demo data for the `gitlab-sandbox --demo` binary and for tests that want a populated
//! instance: user `demo`, one token, ~250 projects under `demo-group/` with mixed access
//! levels, and `demo-group/webapp` with a vulnerable `package.json`.

use super::{access, ProjectSpec, Sandbox, TokenSpec};

/// Number of filler projects (plus `webapp`).
pub const FILLER_PROJECTS: usize = 250;

/// The `package.json` of `demo-group/webapp`.
pub const WEBAPP_PACKAGE_JSON: &str = r#"{
  "name": "webapp",
  "version": "1.0.0",
  "private": true,
  "dependencies": {
    "express": "4.17.1",
    "lodash": "4.17.15",
    "minimist": "1.2.0"
  }
}
"#;

/// What [`seed`] created.
#[derive(Debug, Clone)]
pub struct DemoData {
    pub user_id: u64,
    pub token: String,
    pub webapp_id: u64,
    pub project_ids: Vec<u64>,
}

/// Seeds the demo data; `token` gets scopes `api`, `read_repository`, `write_repository`.
pub fn seed(sb: &Sandbox, token: &str) -> anyhow::Result<DemoData> {
    let user_id = sb.add_user("demo");
    sb.add_token(TokenSpec::new(
        token,
        user_id,
        &["api", "read_repository", "write_repository"],
    ));
    let levels = [
        access::GUEST,
        access::REPORTER,
        access::DEVELOPER,
        access::MAINTAINER,
        access::OWNER,
    ];
    let mut specs = vec![ProjectSpec::new("demo-group/webapp")
        .member(user_id, access::DEVELOPER)
        .file("package.json", WEBAPP_PACKAGE_JSON)];
    // Customers' default branches are not all `main`.
    let branches = ["main", "master", "develop", "trunk"];
    for i in 1..=FILLER_PROJECTS {
        specs.push(
            ProjectSpec::new(format!("demo-group/service-{i:03}"))
                .member(user_id, levels[i % levels.len()])
                .default_branch(branches[(i / levels.len()) % branches.len()]),
        );
    }
    let workers = std::thread::available_parallelism()
        .map(|n| n.get() * 2)
        .unwrap_or(4);
    let project_ids = sb.prepare_many(&specs, workers)?;
    Ok(DemoData {
        user_id,
        token: token.to_string(),
        webapp_id: project_ids[0],
        project_ids,
    })
}

/// What [`seed_groups`] created: the three tokens and the catalogue each one's
/// user should see (`path -> effective access level`).
#[derive(Debug, Clone)]
pub struct GroupData {
    /// The person's token (`demo-dev`).
    pub token: String,
    /// A group access token of `platform` (Maintainer).
    pub group_token: String,
    /// A service account's token (Developer in `security`).
    pub service_token: String,
}

/// Seeds a group tree (`gitlab-sandbox --groups`): user `demo-dev`, subgroups,
/// a group shared with a group, a project shared with a group, an archived and
/// an empty project, a group access token and a service account. Tokens are
/// `<token>`, `<token>-group` and `<token>-service`.
///
/// ```text
/// platform                    demo-dev Developer; group token Maintainer
/// ├── platform/backend/api    (inherited two levels down)
/// ├── platform/web            demo-dev Maintainer (direct)
/// ├── platform/old            archived
/// └── platform/new            empty
/// security                    service account Developer; shared with platform at Reporter
/// └── security/audit          shared with platform at Maintainer
/// ```
/// `demo-dev` sees backend/api 30, web 40, old 30 (archived), new 30,
/// security/audit 30 (min(30, 40)); not security's other projects (Reporter by
/// the share). The group token's bot sees the platform projects at 40 and
/// security/audit at 40; the service account sees both security projects at 30.
pub fn seed_groups(sb: &Sandbox, token: &str) -> anyhow::Result<GroupData> {
    let scopes = ["api", "read_repository", "write_repository"];
    let dev = sb.add_user("demo-dev");
    sb.add_token(TokenSpec::new(token, dev, &scopes));
    let svc = sb.add_service_account("svc-demo");
    let service_token = format!("{token}-service");
    sb.add_token(TokenSpec::new(&service_token, svc, &scopes));
    let platform = sb.add_group("platform")?;
    sb.add_group("platform/backend")?;
    let security = sb.add_group("security")?;
    sb.add_group_member(platform, dev, access::DEVELOPER);
    sb.add_group_member(security, svc, access::DEVELOPER);
    sb.share_group(security, platform, access::REPORTER);
    let group_token = format!("{token}-group");
    sb.add_group_access_token(platform, &group_token, access::MAINTAINER, &scopes);
    let specs = [
        ProjectSpec::new("platform/backend/api"),
        ProjectSpec::new("platform/web").member(dev, access::MAINTAINER),
        ProjectSpec::new("platform/old").archived(),
        ProjectSpec::new("platform/new").empty(),
        ProjectSpec::new("security/audit"),
        ProjectSpec::new("security/internal"),
    ];
    let ids = sb.add_projects(&specs)?;
    sb.share_project(ids[4], platform, access::MAINTAINER);
    Ok(GroupData {
        token: token.to_string(),
        group_token,
        service_token,
    })
}
