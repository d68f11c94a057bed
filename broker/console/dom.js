// DOM helpers shared by every part of the console. Text is always set with
// textContent (or text nodes), never parsed as HTML.

export const $ = (id) => document.getElementById(id);

export function el(tag, attrs, ...children) {
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

export function badge(text, kind) {
  return el("span", { class: "badge " + (kind || text), text });
}

export function timeOf(iso) {
  const d = new Date(iso);
  return isNaN(d) ? String(iso || "") : d.toLocaleString();
}

// The view and its argument from the location hash: #view/arg.
export function currentView() {
  const h = location.hash.replace(/^#/, "");
  const [view, ...rest] = h.split("/");
  return { view: view || "connections", arg: rest.join("/") };
}
