//! Check 1, `agent_connected`: an agent stream of the connection is up (agent
//! mode only).

use super::*;

/// True when the agent that will carry the next checks holds its own token.
pub(super) fn check(state: &AppState, conn: &Connection, r: &mut Run) -> Step<bool> {
    let id = conn.id.as_str();
    let mut agent_token = false;
    match conn.mode {
        Mode::Direct => r.push(skip(
            "agent_connected",
            "direct mode: the broker calls GitLab itself",
        )),
        Mode::Agent => match state.registry.pick(id) {
            Some(s) => {
                agent_token = s.holds_token;
                let n = state
                    .registry
                    .sessions(id)
                    .iter()
                    .filter(|s| !s.is_closed())
                    .count();
                r.push(pass(
                    "agent_connected",
                    format!(
                        "{n} agent stream(s) connected; this test goes through {} (version {}){}",
                        s.instance,
                        s.version,
                        if s.holds_token {
                            ", which holds its own GitLab token"
                        } else {
                            ""
                        }
                    ),
                ));
            }
            None => {
                let hint = if conn.access_key_sha256.is_none() {
                    format!("Issue an accessKey (POST /v1/connections/{id}/access-key) and deploy the agent with it (Helm value accessKey).")
                } else {
                    "Start the agent (Helm chart) with this connection's accessKey and check its logs: it must reach the broker's agent listener (through the corporate proxy if there is one).".to_string()
                };
                r.push(fail(
                    "agent_connected",
                    format!("no agent is connected for connection {id}"),
                    hint,
                ));
                return Err("needs a connected agent");
            }
        },
    }
    Ok(agent_token)
}
