// The /v1 API: every call carries X-Gitproxy-Key; the page's shared state;
// whether the broker answers (the "disconnected" banner).

import { $ } from "./dom.js";

export const KEY_STORE = "gitproxy.apiKey";
export const TESTS_STORE = "gitproxy.lastTests";
export const POLL_MS = 2000;

// Set by app.js: what a 401 on a signed-in call does (sign out).
export const hooks = { unauthorized: () => {} };

export class ApiError extends Error {
  constructor(status, body) {
    super((body && body.message) || "HTTP " + status);
    this.status = status;
    this.code = (body && body.error) || "";
    this.hint = (body && body.hint) || "";
  }
}
export class Unreachable extends Error {}

export const state = {
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

export async function api(method, path, body, key) {
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
  if (r.status === 401 && !key) hooks.unauthorized();
  if (!r.ok) throw new ApiError(r.status, data);
  return data;
}

export function linkDown() {
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

export function linkUp() {
  if (state.linkUp) return;
  state.linkUp = true;
  $("banner").hidden = true;
  $("link-state").textContent = "connected to the broker";
  $("link-state").className = "link-state up";
  document.body.dataset.link = "up";
}

export function showError(target, e) {
  const t = $(target);
  if (e instanceof Unreachable) t.textContent = "The broker does not answer: is it running and reachable?";
  else if (e instanceof ApiError) t.textContent = e.message + (e.hint ? " — " + e.hint : "") + (e.code ? " (" + e.code + ")" : "");
  else t.textContent = String(e);
}
