//! Who may see a project, and at which level, through every route GitLab knows:
//! direct project membership, membership of the project's group or of any of its
//! ancestors, groups shared with groups, and projects shared with groups.
//!
//! This is GitLab's `project_authorizations` table as `Gitlab::ProjectAuthorizations`
//! computes it (lib/gitlab/project_authorizations.rb), which is what
//! `GET /projects?membership=true&min_access_level=N` filters on
//! (`ProjectsFinder` → `User#authorized_projects(min_access_level)`):
//!
//! 1. Group levels (the "namespaces CTE"): a user's direct membership of a group counts
//!    for that group and every descendant (https://docs.gitlab.com/user/group/subgroups/#subgroup-membership);
//!    a group G shared with a group H at `group_access` L gives H's *direct* members
//!    `min(their level in H, L)` on G and G's descendants
//!    (https://docs.gitlab.com/user/project/members/sharing_projects_groups/#invite-a-group-to-a-group;
//!    the SQL joins `members.source_id = group_group_links.shared_with_group_id`, so
//!    members H only inherits from its own ancestors get nothing through the share).
//!    Several rows for one group keep the highest.
//! 2. A project's level is the highest of: direct project membership; the level on
//!    its group (1.); for each group H the project is shared with at L,
//!    `min(level on H by 1., L)`.
//!
//! Members below Guest (`MINIMAL_ACCESS`, 5) give no project access, as in GitLab.
//! Bots (group access tokens' `project_bot` users, service accounts) are ordinary
//! members here: GitLab authorises them through the same table.

use std::collections::HashMap;

use super::state::{Project, State};

/// GitLab's `Gitlab::Access::MINIMAL_ACCESS`: membership that grants no project access.
const MINIMAL_ACCESS: u32 = 5;

/// The user's level on every group it reaches (step 1 above).
pub fn group_levels(st: &State, user_id: u64) -> HashMap<u64, u32> {
    // Seed rows: direct memberships, and groups shared with a group the user is a
    // direct member of (capped at the share's level).
    let mut seeds: Vec<(u64, u32)> = Vec::new();
    for g in &st.groups {
        if let Some(&l) = g.members.get(&user_id).filter(|l| **l > MINIMAL_ACCESS) {
            seeds.push((g.id, l));
        }
        for (&invited, &cap) in &g.shared_with {
            let direct = st
                .group(invited)
                .and_then(|h| h.members.get(&user_id).copied())
                .filter(|l| *l > MINIMAL_ACCESS);
            if let Some(l) = direct {
                seeds.push((g.id, l.min(cap)));
            }
        }
    }
    // Every row reaches the group's descendants; keep the highest per group.
    let mut out: HashMap<u64, u32> = HashMap::new();
    for g in &st.groups {
        let best = seeds
            .iter()
            .filter(|(sid, _)| is_self_or_ancestor(st, *sid, g.id))
            .map(|(_, l)| *l)
            .max();
        if let Some(l) = best {
            out.insert(g.id, l);
        }
    }
    out
}

/// Whether `ancestor` is `group` or one of its parents.
fn is_self_or_ancestor(st: &State, ancestor: u64, group: u64) -> bool {
    let mut cur = Some(group);
    // Bounded walk: GitLab caps nesting at 20 levels; a cycle cannot loop forever.
    for _ in 0..=20 {
        match cur {
            Some(id) if id == ancestor => return true,
            Some(id) => cur = st.group(id).and_then(|g| g.parent_id),
            None => return false,
        }
    }
    false
}

/// The group a project belongs to directly, if its namespace is a group.
pub fn project_group<'a>(st: &'a State, p: &Project) -> Option<&'a super::state::Group> {
    st.find_group(&p.namespace)
}

/// The user's effective level on a project (0 when none): step 2 above.
pub fn project_access(st: &State, p: &Project, user_id: u64) -> u32 {
    let groups = group_levels(st, user_id);
    project_access_with(st, p, user_id, &groups)
}

/// [`project_access`] with the group levels computed once (listing many projects).
pub fn project_access_with(
    st: &State,
    p: &Project,
    user_id: u64,
    groups: &HashMap<u64, u32>,
) -> u32 {
    let direct = p
        .access_of(user_id)
        .filter(|l| *l > MINIMAL_ACCESS)
        .unwrap_or(0);
    let via_group = project_group(st, p)
        .and_then(|g| groups.get(&g.id).copied())
        .unwrap_or(0);
    let via_share = p
        .shared_with
        .iter()
        .filter_map(|(h, cap)| groups.get(h).map(|l| (*l).min(*cap)))
        .max()
        .unwrap_or(0);
    direct.max(via_group).max(via_share)
}

/// `permissions.group_access` of the project entity: the user's highest *direct*
/// membership of the project's group or one of its ancestors (`Group#highest_group_member`,
/// lib/api/entities/project_with_access.rb); inherited-by-share levels never show here.
pub fn group_member_access(st: &State, p: &Project, user_id: u64) -> Option<u32> {
    let g = project_group(st, p)?;
    st.groups
        .iter()
        .filter(|a| is_self_or_ancestor(st, a.id, g.id))
        .filter_map(|a| a.members.get(&user_id).copied())
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::state::Group;
    use std::collections::BTreeMap;

    fn group(id: u64, path: &str, parent: Option<u64>) -> Group {
        Group {
            id,
            path: path.rsplit('/').next().unwrap_or(path).into(),
            full_path: path.into(),
            parent_id: parent,
            members: BTreeMap::new(),
            shared_with: BTreeMap::new(),
        }
    }

    #[test]
    fn inherited_and_shared_levels() {
        let mut st = State::default();
        let mut top = group(1, "top", None);
        top.members.insert(7, 30);
        let mut sub = group(2, "top/sub", Some(1));
        sub.members.insert(7, 40);
        let mut other = group(3, "other", None);
        // `other` shared with `team` at Reporter.
        other.shared_with.insert(4, 20);
        let mut team = group(4, "team", None);
        team.members.insert(7, 50);
        let teamparent = group(5, "tp", None);
        let mut g6 = group(6, "x", None);
        // Shared with `tp`, whose *members* only: 7 is not one.
        g6.shared_with.insert(5, 50);
        st.groups = vec![top, sub, other, team, teamparent, g6];
        let lv = group_levels(&st, 7);
        assert_eq!(lv.get(&1), Some(&30));
        assert_eq!(lv.get(&2), Some(&40));
        assert_eq!(lv.get(&3), Some(&20));
        assert_eq!(lv.get(&4), Some(&50));
        assert_eq!(lv.get(&6), None);
    }
}
