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
