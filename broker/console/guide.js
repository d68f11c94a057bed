// The troubleshooting guide: a minimal Markdown renderer (headings with
// GitHub-style anchors, paragraphs, lists, code blocks, tables).

import { $, el } from "./dom.js";
import { linkUp, linkDown } from "./api.js";

export let docText = null;

export function slug(text) {
  return text.toLowerCase().replace(/[^\p{L}\p{N} _-]/gu, "").replace(/ /g, "-");
}

export function inline(text) {
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

export function renderMarkdown(md) {
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

export async function showDocs(anchor) {
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
