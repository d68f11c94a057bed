// Remediation merge requests of one or every connection, with counts per state.

import { $, el, badge, timeOf } from "./dom.js";
import { state, api, showError } from "./api.js";
import { refreshConnections } from "./connections.js";

export async function enterMrs() {
  await refreshConnections();
  loadMrs();
}

export async function loadMrs() {
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

export function renderMrs(mrs) {
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

export function wire() {
  $("mr-conn").addEventListener("change", loadMrs);
  $("mr-refresh").addEventListener("click", loadMrs);
}
