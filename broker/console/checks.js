// Test Connection: each check with its detail, hint and the matching section
// of the troubleshooting guide.

import { $, el, badge } from "./dom.js";
import { state, api, showError, TESTS_STORE } from "./api.js";
import { renderConnections } from "./connections.js";

// Test Connection check -> section of docs/troubleshooting.md.
export const CHECK_DOCS = {
  agent_connected: "the-agent-is-stopped-or-not-connected",
  gitlab_reachable: "upstream_unreachable--502",
  tls_trusted: "x509-certificate-signed-by-unknown-authority",
  token_valid: "the-token-has-expired-or-was-revoked",
  token_scopes: "the-token-lacks-scopes",
  projects_found: "the-token-sees-no-projects",
};

export async function runTest(id) {
  const panel = $("test-panel");
  panel.hidden = false;
  panel.dataset.connection = id;
  panel.dataset.state = "running";
  $("test-title").textContent = "Test Connection: " + id;
  $("test-summary").textContent = "Running the checks…";
  $("test-checks").replaceChildren();
  try {
    const r = await api("POST", "/v1/connections/" + encodeURIComponent(id) + "/test");
    state.lastTests[id] = { ok: r.ok, at: new Date().toISOString() };
    sessionStorage.setItem(TESTS_STORE, JSON.stringify(state.lastTests));
    $("test-summary").replaceChildren(badge(r.ok ? "pass" : "fail"), " ",
      r.ok ? "Every check passed." : "A check failed: its hint says what to do.");
    $("test-checks").replaceChildren(...r.checks.map((c) => el("li", { "data-check": c.name, "data-status": c.status },
      badge(c.status), el("span", { class: "name", text: c.name }), el("span", { class: "detail", text: c.detail }),
      c.hint ? el("p", { class: "hint" }, el("strong", { text: "Hint: " }), c.hint) : null,
      c.status === "fail" && CHECK_DOCS[c.name]
        ? el("p", {}, el("a", { class: "doc-link", href: "#docs/" + CHECK_DOCS[c.name], text: "Troubleshooting: " + c.name }))
        : null)));
    panel.dataset.state = r.ok ? "pass" : "fail";
    renderConnections();
  } catch (e) {
    panel.dataset.state = "error";
    showError("test-summary", e);
  }
}

export function wire() {
  $("test-close").addEventListener("click", () => { $("test-panel").hidden = true; });
}
