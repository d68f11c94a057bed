// The project catalogue of one connection: search and pages, in the page
// (the API answers the whole catalogue at once).

import { $, el } from "./dom.js";
import { state, api, showError } from "./api.js";
import { refreshConnections } from "./connections.js";

export const PAGE_SIZE = 20;
export const LEVELS = { 30: "Developer", 40: "Maintainer", 50: "Owner" };

export async function enterProjects() {
  await refreshConnections();
  if (!$("proj-conn").value && state.connections.length) $("proj-conn").value = state.connections[0].id;
  loadProjects();
}

export async function loadProjects() {
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

export function filteredProjects() {
  const q = $("proj-search").value.trim().toLowerCase();
  return state.projects.filter((p) => !q || p.path_with_namespace.toLowerCase().includes(q) || (p.name || "").toLowerCase().includes(q));
}

export function renderProjects() {
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

export function wire() {
  $("proj-conn").addEventListener("change", loadProjects);
  $("proj-refresh").addEventListener("click", loadProjects);
  $("proj-search").addEventListener("input", () => { state.projPage = 0; renderProjects(); });
  $("proj-prev").addEventListener("click", () => { state.projPage--; renderProjects(); });
  $("proj-next").addEventListener("click", () => { state.projPage++; renderProjects(); });
}
