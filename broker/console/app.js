// gitproxy console: a thin view over the broker's /v1 API.
//
// Every call goes to /v1 with the X-Gitproxy-Key the operator typed in; the
// key lives in this tab's sessionStorage only. Nothing is loaded from outside
// the broker (the Content-Security-Policy forbids it). Text from the API is
// always put in the page with textContent, never parsed as HTML.
//
// Modules: dom.js (helpers), api.js (calls, shared state, link state),
// connections.js, install.js (accessKey, Helm), checks.js (Test Connection),
// projects.js, merge-requests.js, live.js (poll, event stream), guide.js
// (troubleshooting guide). This one: sign-in and the views.

import { $, currentView } from "./dom.js";
import { state, api, ApiError, showError, hooks, KEY_STORE } from "./api.js";
import * as connections from "./connections.js";
import * as install from "./install.js";
import * as checks from "./checks.js";
import * as projects from "./projects.js";
import * as mrs from "./merge-requests.js";
import * as live from "./live.js";
import { showDocs } from "./guide.js";

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
  live.stopLive();
  $("signin-error").textContent = message || "";
  route();
}

function start() {
  $("link-state").textContent = "connected to the broker";
  $("link-state").className = "link-state up";
  document.body.dataset.link = "up";
  live.startLive();
  if (!location.hash || location.hash === "#signin") location.hash = "#connections";
  else route();
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
  if (view === "connections") connections.refreshConnections();
  if (view === "projects") projects.enterProjects();
  if (view === "merge-requests") mrs.enterMrs();
  if (view === "events") live.renderEvents();
  if (view === "docs") showDocs(arg);
}

function init() {
  hooks.unauthorized = () => signOut("The broker refused the API key (401 unauthorized). Sign in again.");
  $("signin-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", () => signOut(""));
  for (const m of [connections, install, checks, projects, mrs]) m.wire();
  window.addEventListener("hashchange", route);
  document.body.dataset.link = "up";
  if (signedIn()) start();
  else route();
}

document.addEventListener("DOMContentLoaded", init);
