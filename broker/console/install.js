// Agent install: a new accessKey, shown once, and the prefilled Helm command.

import { $ } from "./dom.js";
import { state, api, showError } from "./api.js";
import { refreshConnections } from "./connections.js";

export function openKeyPanel(c) {
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

export function shellQuote(s) {
  return /^[A-Za-z0-9_.,:\/=@%+-]+$/.test(s) ? s : "'" + s.replace(/'/g, "'\\''") + "'";
}

export function helmCommand(key) {
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

export async function issueKey(ev) {
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

export function keyFormChanged() {
  const key = $("key-value").value;
  if (key) $("helm-command").value = helmCommand(key);
}

export async function copy(from) {
  const text = $(from).value;
  try {
    await navigator.clipboard.writeText(text);
  } catch (_) {
    $(from).select();
    document.execCommand("copy");
  }
  $("copy-state").textContent = "Copied.";
}

export function closeKeyPanel() {
  // The key is shown once: gone from the page when the panel closes.
  $("key-value").value = "";
  $("helm-command").value = "";
  $("key-result").hidden = true;
  $("key-panel").hidden = true;
}

export function wire() {
  $("key-form").addEventListener("submit", issueKey);
  $("key-form").addEventListener("input", keyFormChanged);
  $("key-close").addEventListener("click", closeKeyPanel);
  $("key-copy").addEventListener("click", () => copy("key-value"));
  $("helm-copy").addEventListener("click", () => copy("helm-command"));
}
