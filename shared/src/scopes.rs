//! What a GitLab token's scopes allow gitproxy to do, as GitLab grants them
//! (`doc/user/profile/personal_access_tokens.md`, "Personal access token
//! scopes"): `api` is complete read/write access to the API *and* to
//! repositories over Git HTTP (GitLab kept repository access inside `api`
//! when it split `read_repository`/`write_repository` out), so `api` alone is
//! enough; remediation merge requests need `api` (commits and merge requests
//! are API writes).

/// The verdict on a token's scopes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScopeVerdict {
    /// The token can do everything gitproxy needs.
    pub ok: bool,
    /// What was found (the scopes, and what is missing).
    pub detail: String,
    /// A recommendation when `ok` (e.g. add the repository scopes), or the fix.
    pub note: String,
}

/// The scopes gitproxy recommends.
pub const RECOMMENDED: [&str; 3] = ["api", "read_repository", "write_repository"];

/// Judges `scopes` (as `/personal_access_tokens/self` lists them).
pub fn judge(scopes: &[String]) -> ScopeVerdict {
    let has = |s: &str| scopes.iter().any(|h| h == s);
    let list = if scopes.is_empty() {
        "none".to_string()
    } else {
        scopes.join(", ")
    };
    if has("api") {
        let missing: Vec<&str> = RECOMMENDED.iter().copied().filter(|s| !has(s)).collect();
        let note = match missing.as_slice() {
            [] => String::new(),
            m => format!(
                "api alone is enough (it includes repository access); {} {} recommended so that git access survives if api is ever narrowed",
                m.join(" and "),
                if m.len() > 1 { "are" } else { "is" }
            ),
        };
        return ScopeVerdict {
            ok: true,
            detail: format!("scopes: {list}"),
            note,
        };
    }
    let mut cannot = Vec::new();
    if !has("write_repository") {
        cannot.push("push branches (needs api or write_repository)");
    }
    cannot.push("create commits and merge requests through the API (needs api)");
    ScopeVerdict {
        ok: false,
        detail: format!(
            "the token lacks api (it has: {list}): it cannot {}",
            cannot.join(", nor ")
        ),
        note: "GitLab cannot add scopes to a token: create a new one with scope api (read_repository and write_repository recommended) and set it.".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn api_alone_passes_with_a_note() {
        let v = judge(&s(&["api"]));
        assert!(v.ok);
        assert!(
            v.note
                .contains("read_repository and write_repository are recommended"),
            "{}",
            v.note
        );
        let v = judge(&s(&["api", "read_repository", "write_repository"]));
        assert!(v.ok && v.note.is_empty());
    }

    #[test]
    fn without_api_fails_naming_what_is_impossible() {
        let v = judge(&s(&["read_api", "read_repository"]));
        assert!(!v.ok);
        assert!(
            v.detail.contains("lacks api") && v.detail.contains("write_repository"),
            "{}",
            v.detail
        );
        let v = judge(&s(&["read_api", "write_repository"]));
        assert!(!v.ok && !v.detail.contains("push branches"));
        assert!(judge(&[]).detail.contains("it has: none"));
    }
}
