// Live: the connections poll and the event stream (GET /v1/events).

import { $, el, timeOf, currentView } from "./dom.js";
import { state, hooks, linkUp, POLL_MS } from "./api.js";
import { refreshConnections } from "./connections.js";

export const EVENTS_KEPT = 200;

export function startLive() {
  stopLive();
  state.pollTimer = setInterval(() => {
    if (currentView().view === "connections" || !state.linkUp) refreshConnections();
  }, POLL_MS);
  streamEvents();
}

export function stopLive() {
  if (state.pollTimer) clearInterval(state.pollTimer);
  state.pollTimer = null;
  if (state.eventsAbort) state.eventsAbort.abort();
  state.eventsAbort = null;
}

// fetch() with a streamed body rather than EventSource: the key goes in a
// header, never in the URL.
export async function streamEvents() {
  const abort = new AbortController();
  state.eventsAbort = abort;
  $("ev-state").textContent = "Connecting to the event stream…";
  try {
    const r = await fetch("/v1/events", { headers: { "X-Gitproxy-Key": state.key }, signal: abort.signal, cache: "no-store" });
    if (r.status === 401) { hooks.unauthorized(); return; }
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
  if (abort.signal.aborted || !state.key) return;
  setTimeout(() => { if (state.eventsAbort === abort) streamEvents(); }, POLL_MS);
}

export function onFrame(frame) {
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

export function eventDetail(e) {
  switch (e.kind) {
    case "agent_connected": return e.instance + " (" + e.version + ")";
    case "agent_disconnected": return e.instance + ": " + e.reason;
    case "request_started": return "#" + e.request_id + " " + e.method + " " + e.path;
    case "request_finished": return "#" + e.request_id + " " + e.method + " " + e.path + " → " + e.status +
      " in " + e.duration_ms + " ms" + (e.error ? " (" + e.error + ")" : "") + (e.agent ? " via " + e.agent : "");
    default: return "";
  }
}

export function renderEvents() {
  $("ev-table").tBodies[0].replaceChildren(...state.events.map((e) => el("tr", { "data-kind": e.kind },
    el("td", { text: timeOf(e.time) }), el("td", { text: e.connection }),
    el("td", { text: e.kind.replace("_", " ") }), el("td", { text: eventDetail(e) }))));
}
