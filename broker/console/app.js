// gitproxy console: a thin view over the broker's /v1 API.
//
// Every call goes to /v1 with the X-Gitproxy-Key the operator typed in; the
// key lives in this tab's sessionStorage only. Nothing is loaded from outside
// the broker (the Content-Security-Policy forbids it). Text from the API is
// always put in the page with textContent, never parsed as HTML.
"use strict";

const KEY_STORE = "gitproxy.apiKey";
const TESTS_STORE = "gitproxy.lastTests";
const POLL_MS = 2000;
const EVENTS_KEPT = 200;
const PAGE_SIZE = 20;

// Test Connection check -> section of docs/troubleshooting.md.
const CHECK_DOCS = {
  agent_connected: "the-agent-is-stopped-or-not-connected",
  gitlab_reachable: "upstream_unreachable--502",
  tls_trusted: "x509-certificate-signed-by-unknown-authority",
  token_valid: "the-token-has-expired-or-was-revoked",
  token_scopes: "the-token-lacks-scopes",
  projects_found: "the-token-sees-no-projects",
};
const LEVELS = { 30: "Developer", 40: "Maintainer", 50: "Owner" };

const $ = (id) => document.getElementById(id);

// ---------------------------------------------------------------------------
// DOM helpers

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function badge(text, kind) {
  return el("span", { class: "badge " + (kind || text), text });
}

function timeOf(iso) {
  const d = new Date(iso);
  return isNaN(d) ? String(iso || "") : d.toLocaleString();
}

// ---------------------------------------------------------------------------
// The API

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.message) || "HTTP " + status);
    this.status = status;
    this.code = (body && body.error) || "";
    this.hint = (body && body.hint) || "";
  }
}
class Unreachable extends Error {}

const state = {
  key: sessionStorage.getItem(KEY_STORE) || "",
  connections: [],
  lastTests: JSON.parse(sessionStorage.getItem(TESTS_STORE) || "{}"),
  events: [],
  projects: [],
  projPage: 0,
  pollTimer: null,
  eventsAbort: null,
  linkUp: true,
  editing: null,
  keyFor: null,
  renderedSig: "",
};

async function api(method, path, body, key) {
  const headers = { "X-Gitproxy-Key": key || state.key };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let r;
  try {
    r = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
    });
  } catch (e) {
    linkDown();
    throw new Unreachable("the broker does not answer");
  }
  linkUp();
  let data = null;
  const text = await r.text();
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = { message: text }; }
  if (r.status === 401 && !key) {
    signOut("The broker refused the API key (401 unauthorized). Sign in again.");
  }
  if (!r.ok) throw new ApiError(r.status, data);
  return data;
}

function linkDown() {
  if (!state.linkUp) return;
  state.linkUp = false;
  const b = $("banner");
  b.textContent = "Disconnected: the broker at " + location.origin +
    " does not answer. The data shown is from the last successful refresh; retrying every 2 s.";
  b.hidden = false;
  $("link-state").textContent = "disconnected";
  $("link-state").className = "link-state down";
  document.body.dataset.link = "down";
}

function linkUp() {
  if (state.linkUp) return;
  state.linkUp = true;
  $("banner").hidden = true;
  $("link-state").textContent = "connected to the broker";
  $("link-state").className = "link-state up";
  document.body.dataset.link = "up";
}

function showError(target, e) {
  const t = $(target);
  if (e instanceof Unreachable) t.textContent = "The broker does not answer: is it running and reachable?";
  else if (e instanceof ApiError) t.textContent = e.message + (e.hint ? " — " + e.hint : "") + (e.code ? " (" + e.code + ")" : "");
  else t.textContent = String(e);
}

// ---------------------------------------------------------------------------
// Sign-in and views

function signedIn() { return !!state.key; }

async function signIn(ev) {
  ev.preventDefault();
  const key = $("signin-key").value.trim();
  const err = $("signin-error");
  err.textContent = "";
  if (!key) { err.textContent = "Enter an API key."; return; }
  try {
    await api("GET", "/v1/connections", undefined, key);
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) err.textContent = "Sign-in failed: the broker refused this API key (401 unauthorized).";
    else showError("signin-error", e);
    $("signin-key").setAttribute("aria-invalid", "true");
    $("signin-key").focus();
    return;
  }
  $("signin-key").removeAttribute("aria-invalid");
  $("signin-key").value = "";
  state.key = key;
  sessionStorage.setItem(KEY_STORE, key);
  start();
}

function signOut(message) {
  state.key = "";
  sessionStorage.removeItem(KEY_STORE);
  stopLive();
  $("signin-error").textContent = message || "";
  route();
}

function start() {
  $("link-state").textContent = "connected to the broker";
  $("link-state").className = "link-state up";
  document.body.dataset.link = "up";
  startLive();
  if (!location.hash || location.hash === "#signin") location.hash = "#connections";
  else route();
}

function currentView() {
  const h = location.hash.replace(/^#/, "");
  const [view, ...rest] = h.split("/");
  return { view: view || "connections", arg: rest.join("/") };
}

function route() {
  let { view, arg } = currentView();
  const known = ["connections", "projects", "merge-requests", "events", "docs"];
  if (!known.includes(view)) view = "connections";
  if (!signedIn() && view !== "docs") view = "signin";
  for (const s of document.querySelectorAll(".view")) s.hidden = s.id !== "view-" + view;
  $("nav").hidden = !signedIn();
  $("sign-out").hidden = !signedIn();
  if (!signedIn()) { $("link-state").textContent = ""; }
  for (const a of document.querySelectorAll("#nav a")) {
    if (a.dataset.view === view) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  document.body.dataset.view = view;
  if (view === "signin") $("signin-key").focus();
  if (view === "connections") refreshConnections();
  if (view === "projects") enterProjects();
  if (view === "merge-requests") enterMrs();
  if (view === "events") renderEvents();
  if (view === "docs") showDocs(arg);
}

// ---------------------------------------------------------------------------
// Connections

async function refreshConnections() {
  if (!signedIn()) return;
  try {
    const d = await api("GET", "/v1/connections");
    state.connections = d.connections || [];
    renderConnections();
    fillConnectionSelects();
  } catch (_) {
    // linkDown() or signOut() already said why; the table keeps its last state.
  }
}

function agentList(c) {
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

function lastTestCell(id) {
  const t = state.lastTests[id];
  if (!t) return el("span", { class: "note", text: "not run in this session" });
  return el("span", {}, badge(t.ok ? "pass" : "fail"), " ", timeOf(t.at));
}

function renderConnections() {
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

function fillConnectionSelects() {
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

function proxyHelp() {
  const on = $("f-proxy").checked;
  const was = state.editing && state.editing.mode;
  let t = on
    ? "On: requests go through the gitproxy agent inside your network (issue an accessKey and install the agent with Helm)."
    : "Off (direct): the broker calls GitLab itself; GitLab must be reachable from the broker.";
  if (was === "agent" && !on) t += " Switching to direct disconnects the agents connected for this connection.";
  if (was === "direct" && on) t += " After saving, requests wait for an agent: issue an accessKey and install one.";
  $("f-proxy-help").textContent = t;
}

function clearFieldErrors() {
  for (const id of ["f-id", "f-url", "f-token", "f-mode", "conn-form"]) {
    const e = $(id + "-error");
    if (e) e.textContent = "";
    const i = $(id);
    if (i && i.tagName === "INPUT") i.removeAttribute("aria-invalid");
  }
}

function openForm(c) {
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
function fieldOf(message) {
  const m = message.toLowerCase();
  if (m.includes("gitlab_url") || m.includes("url")) return "f-url";
  if (m.includes("token")) return "f-token";
  if (m.includes("connection id") || m.includes(" id ")) return "f-id";
  if (m.includes("mode")) return "f-mode";
  return "conn-form";
}

async function saveConnection(ev) {
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

async function deleteConnection(id) {
  if (!window.confirm("Delete connection " + id + "? Its agents are disconnected.")) return;
  try { await api("DELETE", "/v1/connections/" + encodeURIComponent(id)); } catch (e) { window.alert(e.message); }
  refreshConnections();
}

// ---------------------------------------------------------------------------
// Agent install

function openKeyPanel(c) {
  state.keyFor = c;
  $("key-title").textContent = "Agent install for " + c.id;
  $("key-result").hidden = true;
  $("key-value").value = "";
  $("key-error").textContent = "";
  $("copy-state").textContent = "";
  if (!$("k-broker").value) $("k-broker").value = location.protocol + "//" + location.hostname + ":8443";
  $("k-gitlab").value = c.gitlab_url.replace(/\/$/, "");
  try { $("k-noproxy").value = new URL(c.gitlab_url).hostname; } catch (_) { $("k-noproxy").value = ""; }
  $("key-panel").hidden = false;
  $("k-broker").focus();
}

function shellQuote(s) {
  return /^[A-Za-z0-9_.,:\/=@%+-]+$/.test(s) ? s : "'" + s.replace(/'/g, "'\\''") + "'";
}

function helmCommand(key) {
  const lines = ["helm upgrade --install gitproxy-agent ./helm/gitproxy-agent"];
  const set = (k, v) => lines.push("--set " + shellQuote(k + "=" + v));
  set("gitproxy.brokerUrl", $("k-broker").value.trim());
  set("gitproxy.accessKey", key);
  const gl = $("k-gitlab").value.trim();
  if (gl) set("gitproxy.gitlabUrl", gl);
  const proxy = $("k-proxy").value.trim();
  if (proxy) set("proxy.httpsProxy", proxy);
  const np = $("k-noproxy").value.split(",").map((s) => s.trim()).filter(Boolean);
  // Helm's list syntax; commas inside braces separate items.
  if (np.length) set("proxy.noProxy", "{" + np.join(",") + "}");
  const ca = $("k-ca").value.trim();
  if (ca) lines.push("--set-file customCaCert=<(base64 -w0 " + shellQuote(ca) + ")");
  return lines.join(" \\\n  ");
}

async function issueKey(ev) {
  ev.preventDefault();
  const c = state.keyFor;
  $("key-error").textContent = "";
  if (!$("k-broker").value.trim()) { $("key-error").textContent = "Enter the broker URL the agent dials."; $("k-broker").focus(); return; }
  $("key-issue").disabled = true;
  try {
    const r = await api("POST", "/v1/connections/" + encodeURIComponent(c.id) + "/access-key");
    $("key-value").value = r.access_key;
    $("helm-command").value = helmCommand(r.access_key);
    $("key-result").hidden = false;
    $("key-value").focus();
    $("key-value").select();
    refreshConnections();
  } catch (e) {
    showError("key-error", e);
  } finally {
    $("key-issue").disabled = false;
  }
}

function keyFormChanged() {
  const key = $("key-value").value;
  if (key) $("helm-command").value = helmCommand(key);
}

async function copy(from) {
  const text = $(from).value;
  try {
    await navigator.clipboard.writeText(text);
  } catch (_) {
    $(from).select();
    document.execCommand("copy");
  }
  $("copy-state").textContent = "Copied.";
}

function closeKeyPanel() {
  // The key is shown once: gone from the page when the panel closes.
  $("key-value").value = "";
  $("helm-command").value = "";
  $("key-result").hidden = true;
  $("key-panel").hidden = true;
}

// ---------------------------------------------------------------------------
// Test Connection

async function runTest(id) {
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

// ---------------------------------------------------------------------------
// Projects

async function enterProjects() {
  await refreshConnections();
  if (!$("proj-conn").value && state.connections.length) $("proj-conn").value = state.connections[0].id;
  loadProjects();
}

async function loadProjects() {
  const id = $("proj-conn").value;
  state.projects = [];
  state.projPage = 0;
  renderProjects();
  if (!id) { $("proj-state").textContent = "No connection yet."; return; }
  $("proj-state").textContent = "Loading the projects of " + id + " from GitLab…";
  $("view-projects").dataset.state = "loading";
  try {
    const r = await api("GET", "/v1/connections/" + encodeURIComponent(id) + "/projects");
    state.projects = r.projects || [];
    $("view-projects").dataset.state = "loaded";
    renderProjects();
  } catch (e) {
    $("view-projects").dataset.state = "error";
    showError("proj-state", e);
  }
}

function filteredProjects() {
  const q = $("proj-search").value.trim().toLowerCase();
  return state.projects.filter((p) => !q || p.path_with_namespace.toLowerCase().includes(q) || (p.name || "").toLowerCase().includes(q));
}

function renderProjects() {
  const list = filteredProjects();
  const pages = Math.max(1, Math.ceil(list.length / PAGE_SIZE));
  state.projPage = Math.min(state.projPage, pages - 1);
  const from = state.projPage * PAGE_SIZE;
  const page = list.slice(from, from + PAGE_SIZE);
  $("proj-table").tBodies[0].replaceChildren(...page.map((p) => el("tr", { "data-project": p.path_with_namespace },
    el("td", {}, p.web_url ? el("a", { href: p.web_url, target: "_blank", rel: "noopener noreferrer", text: p.path_with_namespace }) : p.path_with_namespace),
    el("td", { text: p.default_branch || "—" }),
    el("td", { text: LEVELS[p.access_level] || String(p.access_level) }),
    el("td", { text: [p.archived ? "archived" : "", p.empty_repo ? "empty repository" : ""].filter(Boolean).join(", ") })),
  ));
  if (state.projects.length || $("view-projects").dataset.state === "loaded") {
    $("proj-state").textContent = list.length + " of " + state.projects.length + " projects" +
      (list.length ? ", showing " + (from + 1) + "–" + (from + page.length) : "");
  }
  $("proj-page").textContent = "Page " + (state.projPage + 1) + " of " + pages;
  $("proj-prev").disabled = state.projPage === 0;
  $("proj-next").disabled = state.projPage >= pages - 1;
}

// ---------------------------------------------------------------------------
// Merge requests

async function enterMrs() {
  await refreshConnections();
  loadMrs();
}

async function loadMrs() {
  const only = $("mr-conn").value;
  const ids = only ? [only] : state.connections.map((c) => c.id);
  $("mr-state").textContent = "Asking GitLab for the current states…";
  $("view-merge-requests").dataset.state = "loading";
  try {
    const lists = await Promise.all(ids.map((id) => api("GET", "/v1/connections/" + encodeURIComponent(id) + "/merge-requests")));
    const mrs = lists.flatMap((l) => l.merge_requests || []);
    renderMrs(mrs);
    $("mr-state").textContent = mrs.length + " merge requests, as of " + new Date().toLocaleTimeString() + ".";
    $("view-merge-requests").dataset.state = "loaded";
  } catch (e) {
    $("view-merge-requests").dataset.state = "error";
    showError("mr-state", e);
  }
}

function renderMrs(mrs) {
  const counts = { opened: 0, merged: 0, closed: 0 };
  for (const m of mrs) counts[m.state] = (counts[m.state] || 0) + 1;
  $("mr-counts").replaceChildren(...Object.entries(counts).map(([s, n]) =>
    el("li", { "data-state": s }, el("strong", { class: "count", text: String(n) }), s)));
  $("mr-table").tBodies[0].replaceChildren(...mrs.map((m) => el("tr", { "data-mr": m.project + "!" + m.iid },
    el("td", { text: m.project }),
    el("td", {}, el("a", { href: m.web_url, target: "_blank", rel: "noopener noreferrer", text: "!" + m.iid + " " + m.title })),
    el("td", {}, el("code", { text: m.source_branch }), " → ", el("code", { text: m.target_branch })),
    el("td", { class: "state" }, badge(m.state), m.error ? el("span", { class: "note", text: " " + m.error }) : null),
    el("td", { text: m.connection }),
    el("td", { text: timeOf(m.created_at) }))));
}

// ---------------------------------------------------------------------------
// Live: polling and the event stream

function startLive() {
  stopLive();
  state.pollTimer = setInterval(() => {
    if (currentView().view === "connections" || !state.linkUp) refreshConnections();
  }, POLL_MS);
  streamEvents();
}

function stopLive() {
  if (state.pollTimer) clearInterval(state.pollTimer);
  state.pollTimer = null;
  if (state.eventsAbort) state.eventsAbort.abort();
  state.eventsAbort = null;
}

// fetch() with a streamed body rather than EventSource: the key goes in a
// header, never in the URL.
async function streamEvents() {
  const abort = new AbortController();
  state.eventsAbort = abort;
  $("ev-state").textContent = "Connecting to the event stream…";
  try {
    const r = await fetch("/v1/events", { headers: { "X-Gitproxy-Key": state.key }, signal: abort.signal, cache: "no-store" });
    if (r.status === 401) { signOut("The broker refused the API key (401 unauthorized). Sign in again."); return; }
    if (!r.ok || !r.body) throw new Error("HTTP " + r.status);
    linkUp();
    const reader = r.body.getReader();
    const dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        onFrame(buf.slice(0, i));
        buf = buf.slice(i + 2);
      }
    }
    $("ev-state").textContent = "The event stream ended; reconnecting…";
  } catch (e) {
    if (abort.signal.aborted) return;
    $("ev-state").textContent = "The event stream is interrupted; reconnecting…";
  }
  if (abort.signal.aborted || !signedIn()) return;
  setTimeout(() => { if (state.eventsAbort === abort) streamEvents(); }, POLL_MS);
}

function onFrame(frame) {
  let kind = "message", data = "";
  for (const line of frame.split("\n")) {
    if (line.startsWith("event: ")) kind = line.slice(7);
    else if (line.startsWith("data: ")) data += line.slice(6);
  }
  if (frame.startsWith(":")) return;
  if (kind === "hello") { $("ev-state").textContent = "Live: receiving events."; return; }
  if (kind === "lagged") { $("ev-state").textContent = "Too many events at once: some were skipped."; return; }
  let ev;
  try { ev = JSON.parse(data); } catch (_) { return; }
  ev.kind = kind;
  state.events.unshift(ev);
  if (state.events.length > EVENTS_KEPT) state.events.length = EVENTS_KEPT;
  if (kind === "agent_connected" || kind === "agent_disconnected") refreshConnections();
  if (currentView().view === "events") renderEvents();
}

function eventDetail(e) {
  switch (e.kind) {
    case "agent_connected": return e.instance + " (" + e.version + ")";
    case "agent_disconnected": return e.instance + ": " + e.reason;
    case "request_started": return "#" + e.request_id + " " + e.method + " " + e.path;
    case "request_finished": return "#" + e.request_id + " " + e.method + " " + e.path + " → " + e.status +
      " in " + e.duration_ms + " ms" + (e.error ? " (" + e.error + ")" : "") + (e.agent ? " via " + e.agent : "");
    default: return "";
  }
}

function renderEvents() {
  $("ev-table").tBodies[0].replaceChildren(...state.events.map((e) => el("tr", { "data-kind": e.kind },
    el("td", { text: timeOf(e.time) }), el("td", { text: e.connection }),
    el("td", { text: e.kind.replace("_", " ") }), el("td", { text: eventDetail(e) }))));
}

// ---------------------------------------------------------------------------
// Troubleshooting guide: a minimal Markdown renderer (headings with
// GitHub-style anchors, paragraphs, lists, code blocks, tables).

let docText = null;

function slug(text) {
  return text.toLowerCase().replace(/[^\p{L}\p{N} _-]/gu, "").replace(/ /g, "-");
}

function inline(text) {
  const out = [];
  const re = /`([^`]+)`|\*\*([^*]+)\*\*|\*([^*\s][^*]*)\*|\[([^\]]+)\]\(([^)]+)\)/g;
  let last = 0, m;
  while ((m = re.exec(text))) {
    if (m.index > last) out.push(text.slice(last, m.index));
    if (m[1] !== undefined) out.push(el("code", { text: m[1] }));
    else if (m[2] !== undefined) out.push(el("strong", {}, inline(m[2])));
    else if (m[3] !== undefined) out.push(el("em", {}, inline(m[3])));
    else {
      // Links within the guide stay in the page; others become plain text.
      const [label, target] = [m[4], m[5]];
      const href = target.startsWith("#") ? "#docs/" + target.slice(1) : null;
      out.push(href ? el("a", { href, text: label.replace(/`/g, "") }) : el("span", { text: label }));
    }
    last = re.lastIndex;
  }
  if (last < text.length) out.push(text.slice(last));
  return out;
}

function renderMarkdown(md) {
  const root = document.createDocumentFragment();
  const lines = md.split("\n");
  let para = [], list = null;
  const flush = () => {
    if (para.length) root.append(el("p", {}, inline(para.join(" "))));
    para = [];
    list = null;
  };
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    const h = /^(#{1,4}) (.*)$/.exec(line);
    if (line.startsWith("```")) {
      flush();
      const code = [];
      while (++i < lines.length && !lines[i].startsWith("```")) code.push(lines[i]);
      root.append(el("pre", {}, el("code", { text: code.join("\n") })));
    } else if (h) {
      flush();
      root.append(el("h" + (h[1].length + 1), { id: slug(h[2]) }, inline(h[2])));
    } else if (line.startsWith("|")) {
      flush();
      const rows = [];
      for (; i < lines.length && lines[i].startsWith("|"); i++) rows.push(lines[i]);
      i--;
      const cells = (r) => r.replace(/^\||\|$/g, "").split("|").map((c) => c.trim());
      const table = el("table", {}, el("thead", {}, el("tr", {}, cells(rows[0]).map((c) => el("th", {}, inline(c))))),
        el("tbody", {}, rows.slice(2).map((r) => el("tr", {}, cells(r).map((c) => el("td", {}, inline(c)))))));
      root.append(table);
    } else if (/^\s*[-*] /.test(line) || /^\d+\. /.test(line)) {
      if (para.length) { root.append(el("p", {}, inline(para.join(" ")))); para = []; }
      if (!list) { list = el(/^\d/.test(line) ? "ol" : "ul"); root.append(list); }
      list.append(el("li", {}, inline(line.replace(/^\s*([-*]|\d+\.) /, ""))));
    } else if (!line.trim()) {
      flush();
    } else if (list && /^\s+/.test(line)) {
      list.lastChild.append(" ", ...inline(line.trim()));
    } else {
      para.push(line);
    }
  }
  flush();
  return root;
}

async function showDocs(anchor) {
  const body = $("docs-body");
  if (docText === null) {
    try {
      const r = await fetch("docs/troubleshooting.md", { cache: "no-store" });
      if (!r.ok) throw new Error("HTTP " + r.status);
      docText = await r.text();
      linkUp();
    } catch (e) {
      linkDown();
      body.textContent = "The troubleshooting guide could not be loaded: the broker does not answer.";
      return;
    }
    body.replaceChildren(renderMarkdown(docText));
  }
  for (const t of body.querySelectorAll(".target")) t.classList.remove("target");
  const target = anchor ? document.getElementById(anchor) : null;
  if (target) {
    target.classList.add("target");
    target.setAttribute("tabindex", "-1");
    target.scrollIntoView();
    target.focus();
  } else {
    window.scrollTo(0, 0);
  }
}

// ---------------------------------------------------------------------------
// Wiring

function init() {
  $("signin-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", () => signOut(""));
  $("new-connection").addEventListener("click", () => openForm(null));
  $("conn-form").addEventListener("submit", saveConnection);
  $("conn-cancel").addEventListener("click", () => { $("conn-form-panel").hidden = true; });
  $("f-proxy").addEventListener("change", proxyHelp);
  $("key-form").addEventListener("submit", issueKey);
  $("key-form").addEventListener("input", keyFormChanged);
  $("key-close").addEventListener("click", closeKeyPanel);
  $("key-copy").addEventListener("click", () => copy("key-value"));
  $("helm-copy").addEventListener("click", () => copy("helm-command"));
  $("test-close").addEventListener("click", () => { $("test-panel").hidden = true; });
  $("proj-conn").addEventListener("change", loadProjects);
  $("proj-refresh").addEventListener("click", loadProjects);
  $("proj-search").addEventListener("input", () => { state.projPage = 0; renderProjects(); });
  $("proj-prev").addEventListener("click", () => { state.projPage--; renderProjects(); });
  $("proj-next").addEventListener("click", () => { state.projPage++; renderProjects(); });
  $("mr-conn").addEventListener("change", loadMrs);
  $("mr-refresh").addEventListener("click", loadMrs);
  window.addEventListener("hashchange", route);
  document.body.dataset.link = "up";
  if (signedIn()) start();
  else route();
}

document.addEventListener("DOMContentLoaded", init);
