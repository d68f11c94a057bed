// The connections table (live: polled, and refreshed on agent events) and
// the connection form.

import { $, el, badge, timeOf } from "./dom.js";
import { state, api, ApiError, showError } from "./api.js";
import { openKeyPanel } from "./install.js";
import { runTest } from "./checks.js";

export async function refreshConnections() {
  if (!state.key) return;
  try {
    const d = await api("GET", "/v1/connections");
    state.connections = d.connections || [];
    renderConnections();
    fillConnectionSelects();
  } catch (_) {
    // linkDown() or signOut() already said why; the table keeps its last state.
  }
}

export function agentList(c) {
  if (c.mode !== "agent") return "—";
  if (!c.has_access_key) return el("span", { class: "note", text: "no accessKey yet: use Agent install" });
  if (!c.agents.length) return el("span", { class: "note", text: "none connected" });
  return el("ul", { class: "agents" }, c.agents.map((a) =>
    el("li", { class: "agent", "data-instance": a.instance },
      el("strong", { text: a.instance }), " ", a.version,
      " · since ", timeOf(a.connected_since),
      a.in_flight !== undefined ? " · " + a.in_flight + " in flight" : "",
      a.replica ? " · replica " + a.replica : "",
      a.draining ? " · draining" : "")));
}

export function lastTestCell(id) {
  const t = state.lastTests[id];
  if (!t) return el("span", { class: "note", text: "not run in this session" });
  return el("span", {}, badge(t.ok ? "pass" : "fail"), " ", timeOf(t.at));
}

export function renderConnections() {
  // Re-rendered only when something changed, and the focused button keeps
  // its focus: a keyboard user is not thrown back to the top every 2 s.
  const sig = JSON.stringify([state.connections, state.lastTests]);
  if (sig === state.renderedSig) return;
  state.renderedSig = sig;
  const body = $("conn-table").tBodies[0];
  const active = document.activeElement;
  const row = active && active.closest ? active.closest("tr[data-id]") : null;
  const focusAgain = row && body.contains(row) ? [row.dataset.id, active.className] : null;
  body.replaceChildren(...state.connections.map((c) => el("tr", { "data-id": c.id },
    el("td", {}, el("strong", { text: c.id })),
    el("td", { class: "mode", text: c.mode === "agent" ? "via agent" : "direct" }),
    el("td", { class: "url", text: c.gitlab_url }),
    el("td", { class: "status" }, badge(c.status)),
    el("td", { class: "agents-cell" }, agentList(c)),
    el("td", { class: "last-test" }, lastTestCell(c.id)),
    el("td", {}, el("div", { class: "row-actions" },
      el("button", { type: "button", class: "act-test", onclick: () => runTest(c.id), "aria-label": "Test Connection " + c.id, text: "Test Connection" }),
      el("button", { type: "button", class: "act-edit", onclick: () => openForm(c), "aria-label": "Edit " + c.id, text: "Edit" }),
      c.mode === "agent" ? el("button", { type: "button", class: "act-key", onclick: () => openKeyPanel(c), "aria-label": "Agent install for " + c.id, text: "Agent install" }) : null,
      el("button", { type: "button", class: "act-projects", onclick: () => { $("proj-conn").value = c.id; location.hash = "#projects"; }, "aria-label": "Projects of " + c.id, text: "Projects" }),
      c.source === "api" ? el("button", { type: "button", class: "act-delete", onclick: () => deleteConnection(c.id), "aria-label": "Delete " + c.id, text: "Delete" }) : null)))));
  $("conn-empty").hidden = state.connections.length > 0;
  if (focusAgain) {
    const b = [...body.querySelectorAll("tr[data-id] button")].find((x) =>
      x.closest("tr").dataset.id === focusAgain[0] && x.className === focusAgain[1]);
    if (b) b.focus();
  }
}

export function fillConnectionSelects() {
  for (const [id, all] of [["proj-conn", false], ["mr-conn", true]]) {
    const s = $(id);
    const prev = s.value;
    const opts = state.connections.map((c) => el("option", { value: c.id, text: c.id }));
    if (all) opts.unshift(el("option", { value: "", text: "All connections" }));
    const same = s.options.length === opts.length && [...s.options].every((o, i) => o.value === opts[i].value);
    if (!same) {
      s.replaceChildren(...opts);
      if ([...s.options].some((o) => o.value === prev)) s.value = prev;
    }
  }
}

export function proxyHelp() {
  const on = $("f-proxy").checked;
  const was = state.editing && state.editing.mode;
  let t = on
    ? "On: requests go through the gitproxy agent inside your network (issue an accessKey and install the agent with Helm)."
    : "Off (direct): the broker calls GitLab itself; GitLab must be reachable from the broker.";
  if (was === "agent" && !on) t += " Switching to direct disconnects the agents connected for this connection.";
  if (was === "direct" && on) t += " After saving, requests wait for an agent: issue an accessKey and install one.";
  $("f-proxy-help").textContent = t;
}

export function clearFieldErrors() {
  for (const id of ["f-id", "f-url", "f-token", "f-mode", "conn-form"]) {
    const e = $(id + "-error");
    if (e) e.textContent = "";
    const i = $(id);
    if (i && i.tagName === "INPUT") i.removeAttribute("aria-invalid");
  }
}

export function openForm(c) {
  state.editing = c || null;
  clearFieldErrors();
  $("conn-form-title").textContent = c ? "Edit connection " + c.id : "New connection";
  $("f-id").value = c ? c.id : "";
  $("f-id").readOnly = !!c;
  $("f-url").value = c ? c.gitlab_url.replace(/\/$/, "") : "";
  $("f-token").value = "";
  $("f-token").placeholder = c && c.has_token ? "unchanged (set)" : "";
  $("f-proxy").checked = c ? c.mode === "agent" : true;
  proxyHelp();
  $("conn-form-panel").hidden = false;
  (c ? $("f-url") : $("f-id")).focus();
}

// The API names the field in its message ("gitlab_url ...", "token ...").
export function fieldOf(message) {
  const m = message.toLowerCase();
  if (m.includes("gitlab_url") || m.includes("url")) return "f-url";
  if (m.includes("token")) return "f-token";
  if (m.includes("connection id") || m.includes(" id ")) return "f-id";
  if (m.includes("mode")) return "f-mode";
  return "conn-form";
}

export async function saveConnection(ev) {
  ev.preventDefault();
  clearFieldErrors();
  const id = $("f-id").value.trim();
  const url = $("f-url").value.trim();
  const token = $("f-token").value;
  if (!id) { $("f-id-error").textContent = "Give the connection an id."; $("f-id").setAttribute("aria-invalid", "true"); $("f-id").focus(); return; }
  if (!url) { $("f-url-error").textContent = "Enter the GitLab instance URL."; $("f-url").setAttribute("aria-invalid", "true"); $("f-url").focus(); return; }
  const body = { mode: $("f-proxy").checked ? "agent" : "direct", gitlab_url: url };
  if (token) body.token = token;
  $("conn-save").disabled = true;
  try {
    const v = await api("PUT", "/v1/connections/" + encodeURIComponent(id), body);
    $("f-token").value = "";
    $("conn-form-panel").hidden = true;
    await refreshConnections();
    if (v.mode === "agent" && !v.has_access_key) openKeyPanel(v);
  } catch (e) {
    const target = e instanceof ApiError ? fieldOf(e.message) : "conn-form";
    // Next to a field the message says it all; the generic hint is noise there.
    if (target === "conn-form") showError("conn-form-error", e);
    else $(target + "-error").textContent = e.message;
    const input = $(target);
    if (input && input.tagName === "INPUT") { input.setAttribute("aria-invalid", "true"); input.focus(); }
  } finally {
    $("conn-save").disabled = false;
  }
}

export async function deleteConnection(id) {
  if (!window.confirm("Delete connection " + id + "? Its agents are disconnected.")) return;
  try { await api("DELETE", "/v1/connections/" + encodeURIComponent(id)); } catch (e) { window.alert(e.message); }
  refreshConnections();
}

export function wire() {
  $("new-connection").addEventListener("click", () => openForm(null));
  $("conn-form").addEventListener("submit", saveConnection);
  $("conn-cancel").addEventListener("click", () => { $("conn-form-panel").hidden = true; });
  $("f-proxy").addEventListener("change", proxyHelp);
}
