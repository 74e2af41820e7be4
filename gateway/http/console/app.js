// Passerelle console: reads the same /api the CLI uses. Every value is written with
// textContent (never as HTML), so nothing a message carries can run here. Plots are SVG drawn
// by the gateway, fetched with the token and shown as images (an image runs no script).
"use strict";

const KEY = "passerelle.token";
const VIEWS = ["overview", "problems", "rejections", "search", "message", "resource"];
const CHARTS = ["throughput", "latency", "depth", "errors"];
let timer = null;
let shown = null; // id of the message on screen
let locale = "fr-FR";
let dateFormat = null;

const $ = (sel) => document.querySelector(sel);

function el(tag, text, attrs) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  return node;
}

function row(cells, attrs) {
  const tr = el("tr", null, attrs);
  for (const cell of cells) {
    const td = document.createElement("td");
    if (cell instanceof Node) td.appendChild(cell);
    else td.textContent = cell === undefined || cell === null ? "" : String(cell);
    tr.appendChild(td);
  }
  return tr;
}

function setLocale(tag) {
  try {
    dateFormat = new Intl.DateTimeFormat(tag, { dateStyle: "short", timeStyle: "medium" });
    locale = tag;
  } catch (err) {
    dateFormat = new Intl.DateTimeFormat("fr-FR", { dateStyle: "short", timeStyle: "medium" });
  }
}

function when(ts) {
  if (!ts) return "";
  if (!dateFormat) setLocale(locale);
  return dateFormat.format(new Date(ts * 1000));
}

function count(n) {
  return new Intl.NumberFormat(locale).format(n || 0);
}

class ApiError extends Error {
  constructor(status, text) {
    super(text);
    this.status = status;
  }
}

async function request(method, path) {
  const token = sessionStorage.getItem(KEY);
  const resp = await fetch(path, { method, headers: { Authorization: "Bearer " + token } });
  if (!resp.ok) {
    const body = await resp.json().catch(() => null);
    const text = body && body.issue ? body.issue.map((i) => i.diagnostics).join("; ") : resp.statusText;
    if (resp.status === 401) logout(text);
    throw new ApiError(resp.status, text || "HTTP " + resp.status);
  }
  return resp;
}

async function api(method, path) {
  const resp = await request(method, path);
  return resp.json();
}

function show(view) {
  for (const section of document.querySelectorAll(".view")) section.hidden = section.id !== view;
  for (const link of document.querySelectorAll("nav a")) link.classList.toggle("active", link.dataset.view === view);
  clearInterval(timer);
  if (view === "overview") {
    refreshOverview();
    timer = setInterval(refreshOverview, 2000);
  } else if (view === "problems") {
    refreshProblems();
    timer = setInterval(refreshProblems, 5000);
  } else if (view === "rejections") {
    findRejections();
  }
}

function route() {
  if (!sessionStorage.getItem(KEY)) {
    $("#nav").hidden = true;
    show("login");
    return;
  }
  $("#nav").hidden = false;
  const [view, ...rest] = (location.hash || "#overview").slice(1).split("/");
  if (view === "message" && rest.length) {
    show("message");
    openMessage(decodeURIComponent(rest.join("/")), false);
  } else if (view === "resource" && rest.length === 2) {
    show("resource");
    openResource(rest[0], rest[1]);
  } else {
    show(VIEWS.includes(view) && view !== "message" && view !== "resource" ? view : "overview");
  }
}

function logout(reason) {
  sessionStorage.removeItem(KEY);
  $("#login-error").textContent = reason || "";
  route();
}

async function login(event) {
  event.preventDefault();
  const token = $("#token").value.trim();
  sessionStorage.setItem(KEY, token);
  let settings;
  try {
    settings = await api("GET", "/api/console/settings");
  } catch (err) {
    sessionStorage.removeItem(KEY);
    $("#login-error").textContent = err.status === 403 ? "This token may not use the console (operator role needed)." : err.message;
    return;
  }
  setLocale(settings.locale);
  $("#token").value = "";
  $("#login-error").textContent = "";
  if (!location.hash || location.hash === "#login") location.hash = "#overview";
  route();
}

// -- overview ---------------------------------------------------------------------------------

const chartUrls = {};

async function refreshChart(kind) {
  const img = $("#chart-" + kind);
  const channel = $("#chart-channel").value;
  const query = channel ? "?channel=" + encodeURIComponent(channel) : "";
  try {
    const resp = await request("GET", "/api/console/charts/" + kind + ".svg" + query);
    const blob = await resp.blob();
    const url = URL.createObjectURL(blob);
    img.src = url;
    img.dataset.samples = resp.headers.get("X-Chart-Samples") || "0";
    img.dataset.peak = resp.headers.get("X-Chart-Peak") || "0";
    img.dataset.last = resp.headers.get("X-Chart-Last") || "";
    if (chartUrls[kind]) URL.revokeObjectURL(chartUrls[kind]);
    chartUrls[kind] = url;
  } catch (err) {
    img.alt = "plot unavailable: " + err.message;
  }
}

function stateCell(state) {
  return el("span", state, { class: state === "running" ? "state-ok" : "state-bad" });
}

function retryCell(dest) {
  const box = el("div");
  if (!dest.retrying.length) {
    box.textContent = "up to " + dest.max_attempts + " attempts";
    return box;
  }
  for (const r of dest.retrying.slice(0, 5)) {
    const line = el("div", null, { class: "retry", "data-message": r.message_id });
    const next = r.next_attempt_at ? "next attempt " + when(r.next_attempt_at) : "no further attempt";
    line.textContent = (r.control_id || r.message_id) + ": attempt " + r.attempts + "/" + r.max_attempts + ", " + next;
    if (r.last_error) line.appendChild(el("div", r.last_error, { class: "error" }));
    box.appendChild(line);
  }
  if (dest.retrying.length > 5) box.appendChild(el("div", "… and " + (dest.retrying.length - 5) + " more (Errors view)"));
  return box;
}

async function refreshOverview() {
  let data;
  try {
    data = await api("GET", "/api/console/overview");
  } catch (err) {
    $("#updated").textContent = "update failed: " + err.message;
    return;
  }
  for (const kind of CHARTS) refreshChart(kind);
  const select = $("#chart-channel");
  for (const ch of data.channels) {
    if (![...select.options].some((o) => o.value === ch.name)) select.appendChild(el("option", ch.name, { value: ch.name }));
  }
  const body = $("#channels tbody");
  body.replaceChildren();
  for (const ch of data.channels) {
    const c = ch.counts;
    body.appendChild(
      row([el("strong", ch.name), stateCell(ch.state), count(ch.received), count(ch.depth), count(c.SENT), count(c.ERROR), count(c.DEAD), count(c.FILTERED), "fed by " + ch.source], {
        "data-channel": ch.name,
        class: "channel",
      }),
    );
    for (const d of ch.destinations) {
      const k = d.counts;
      const waiting = (k.QUEUED || 0) + (k.ERROR || 0);
      body.appendChild(
        row(["→ " + d.name + " (" + d.type + ")", "", "", count(waiting), count(k.SENT), count(k.ERROR), count(k.DEAD), "", retryCell(d)], {
          "data-destination": d.name,
          "data-of": ch.name,
          class: "destination",
        }),
      );
    }
  }
  const listeners = $("#listeners tbody");
  listeners.replaceChildren();
  for (const s of data.sources) {
    const listening = s.listening === null || s.listening === undefined ? "—" : s.listening ? "listening" : "stopped";
    const conns = el("div");
    for (const c of s.connections || []) {
      conns.appendChild(el("div", c.peer + " since " + when(c.since) + ", " + c.frames + " frames, last " + when(c.last_activity)));
    }
    if (!(s.connections || []).length) conns.textContent = s.type === "mllp" ? "none" : "";
    const address = s.port !== null && s.port !== undefined ? (s.host || "") + ":" + s.port : s.type;
    const rejected = el("a", count(s.stored_rejections), { href: "#rejections" });
    listeners.appendChild(
      row([s.name, el("span", listening, { class: s.listening === false ? "state-bad" : "state-ok" }), address, conns, count(s.acked), rejected], {
        "data-source": s.name,
      }),
    );
  }
  const senders = $("#senders tbody");
  senders.replaceChildren();
  for (const s of data.senders) {
    senders.appendChild(row([s.sender, when(s.last_at), s.rejected ? "rejected at intake" : s.channel, s.last_status], { "data-sender": s.sender }));
  }
  const journal = data.journal || {};
  $("#journal").textContent = "Journal: " + count(journal.commits) + " commits, " + count(journal.queued_writes) + " writes waiting.";
  $("#updated").textContent = "updated " + when(data.at);
}

// -- problems and rejections -------------------------------------------------------------------

function actionButton(label, method, path) {
  const button = el("button", label, { type: "button", "data-action": label.toLowerCase() });
  button.addEventListener("click", async (event) => {
    event.stopPropagation();
    button.disabled = true;
    try {
      await api(method, path);
      $("#action-result").textContent = label + " done.";
    } catch (err) {
      $("#action-result").textContent = label + " failed: " + err.message;
    }
    refreshProblems();
  });
  return button;
}

function openOnClick(tr, id) {
  tr.dataset.id = id;
  tr.classList.add("clickable");
  tr.addEventListener("click", () => {
    location.hash = "#message/" + encodeURIComponent(id);
  });
}

function messageRows(tbody, messages, dead) {
  tbody.replaceChildren();
  for (const m of messages) {
    const actions = el("span");
    if (dead) {
      actions.appendChild(actionButton("Replay", "POST", "/api/dlq/" + encodeURIComponent(m.id) + "/replay"));
      actions.appendChild(actionButton("Discard", "POST", "/api/dlq/" + encodeURIComponent(m.id) + "/discard"));
    } else {
      actions.appendChild(actionButton("Replay", "POST", "/api/messages/" + encodeURIComponent(m.id) + "/replay"));
    }
    const tr = row([when(m.received_at), m.channel, m.control_id, m.message_type, m.reason || "", actions]);
    openOnClick(tr, m.id);
    tbody.appendChild(tr);
  }
}

async function refreshProblems() {
  try {
    const found = await api("GET", "/api/console/problems?limit=200");
    messageRows($("#dlq tbody"), found.dead, true);
    messageRows($("#errors tbody"), found.errors, false);
  } catch (err) {
    $("#action-result").textContent = "update failed: " + err.message;
  }
}

async function findRejections(event) {
  if (event) event.preventDefault();
  const form = new FormData($("#rejections-form"));
  const params = new URLSearchParams({ limit: "200" });
  if (form.get("control_id")) params.set("control_id", form.get("control_id").trim());
  const tbody = $("#rejections-table tbody");
  let found;
  try {
    found = await api("GET", "/api/console/rejections?" + params.toString());
  } catch (err) {
    tbody.replaceChildren(row(["search failed: " + err.message]));
    return;
  }
  tbody.replaceChildren();
  for (const m of found.rejections) {
    const tr = row([when(m.received_at), m.source, m.sender, m.control_id || "(none)", m.message_type, m.code, m.location, m.reason]);
    openOnClick(tr, m.id);
    tbody.appendChild(tr);
  }
  if (!found.rejections.length) tbody.appendChild(row(["no rejection found"]));
}

async function search(event) {
  if (event) event.preventDefault();
  const form = new FormData($("#search-form"));
  const params = new URLSearchParams({ limit: "500" });
  for (const key of ["control_id", "status", "channel"]) if (form.get(key)) params.set(key, form.get(key));
  // The store filters on the time window too: datetime-local is local time, sent as a UTC instant.
  if (form.get("from")) params.set("since", new Date(form.get("from")).toISOString());
  if (form.get("to")) params.set("until", new Date(form.get("to")).toISOString());
  let found;
  try {
    found = await api("GET", "/api/messages?" + params.toString());
  } catch (err) {
    $("#results tbody").replaceChildren(row(["search failed: " + err.message]));
    return;
  }
  const tbody = $("#results tbody");
  tbody.replaceChildren();
  for (const m of found.messages) {
    const tr = row([when(m.received_at), m.channel, m.control_id, m.message_type, m.status]);
    openOnClick(tr, m.id);
    tbody.appendChild(tr);
  }
}

// -- one message ---------------------------------------------------------------------------------

// A JSON value as nested <details>: objects and arrays fold, leaves show their value.
function tree(value, label, links, depth) {
  if (value === null || typeof value !== "object") {
    const leaf = el("div", null, { class: "leaf" });
    leaf.appendChild(el("span", label + ": ", { class: "key" }));
    leaf.appendChild(el("span", JSON.stringify(value), { class: value === "***" ? "value masked" : "value" }));
    return leaf;
  }
  const details = el("details", null, { class: "node" });
  if (depth < 1) details.open = true;
  const summary = el("summary");
  const kind = Array.isArray(value) ? "[" + value.length + "]" : value.resourceType || (value.resource && value.resource.resourceType) || "{…}";
  summary.appendChild(el("span", label, { class: "key" }));
  summary.appendChild(el("span", " " + kind, { class: "kind" }));
  details.appendChild(summary);
  const entries = Array.isArray(value) ? value.map((v, i) => [String(i), v]) : Object.entries(value);
  for (const [k, v] of entries) {
    const child = tree(v, k, k === "entry" && !Array.isArray(value) ? links : null, depth + 1);
    if (links && label === "entry" && links[Number(k)]) {
      const path = links[Number(k)];
      const [, , type, id] = path.split("/");
      const link = el("a", "stored as " + path, { href: "#resource/" + type + "/" + id, class: "stored", "data-fhir-path": path });
      child.querySelector("summary").appendChild(link);
    }
    details.appendChild(child);
  }
  return details;
}

async function openMessage(id, reveal) {
  let msg;
  try {
    msg = await api("GET", "/api/console/messages/" + encodeURIComponent(id) + (reveal ? "?reveal=true" : ""));
  } catch (err) {
    $("#message-masked").textContent = (reveal ? "Reveal" : "Message") + " refused: " + err.message;
    return;
  }
  shown = id;
  $("#message-id").textContent = msg.id;
  $("#message-masked").textContent = msg.masked ? "Identifying values are masked (codes stay readable)." : "Shown in clear; this access was audited.";
  $("#reveal").hidden = !msg.masked;
  const meta = $("#message-meta");
  meta.replaceChildren();
  const facts = [
    ["channel", msg.rejected_at_intake ? msg.channel + " (refused at intake, not replayable)" : msg.channel],
    ["status", msg.status],
    ["control id", msg.control_id],
    ["type", msg.message_type],
    ["sender", msg.sender],
    ["peer", msg.peer],
    ["received", when(msg.received_at)],
    ["error", msg.error],
  ];
  for (const [k, v] of facts) {
    meta.appendChild(el("dt", k));
    meta.appendChild(el("dd", v));
  }
  const body = $("#segments tbody");
  body.replaceChildren();
  for (const seg of msg.segments || []) {
    body.appendChild(row([el("strong", seg.name), ""], { class: "segment", "data-segment": seg.name }));
    for (const f of seg.fields) {
      const value = el("span", f.value, { class: f.masked ? "masked" : "" });
      body.appendChild(row([seg.name + "-" + f.n, value], { "data-field": seg.name + "-" + f.n }));
    }
  }
  $("#message-raw").hidden = !msg.unreadable;
  $("#message-raw").textContent = msg.unreadable ? "The received bytes are not readable HL7v2; they are kept as evidence." : "";
  $("#fhir-block").hidden = !msg.fhir;
  if (!msg.fhir && msg.status === "RECEIVED") {
    // not processed yet: show it again once its steps have run
    setTimeout(() => { if (shown === id && !$("#message").hidden) openMessage(id, reveal); }, 1000);
  }
  $("#fhir-tree").replaceChildren(msg.fhir ? tree(msg.fhir.resource, msg.fhir.resource.resourceType || "FHIR", msg.fhir.links, 0) : "");
  if (msg.fhir) {
    // the entries are where the links are: open them one level
    const entry = [...$("#fhir-tree").querySelectorAll("details")].find((d) => d.querySelector("summary .key").textContent === "entry");
    if (entry) entry.open = true;
  }
  $("#notes-block").hidden = !(msg.warnings.length || msg.unmapped.length);
  $("#warnings").replaceChildren(...msg.warnings.map((w) => el("li", w)));
  $("#unmapped").replaceChildren(...msg.unmapped.map((p) => el("li", p)));
  const deliveries = $("#deliveries tbody");
  deliveries.replaceChildren();
  for (const d of msg.deliveries || []) {
    deliveries.appendChild(row([d.destination, d.status, d.attempts, when(d.updated_at), d.last_error]));
  }
  const stages = $("#stages");
  stages.replaceChildren();
  for (const s of msg.stages || []) {
    const li = el("li");
    li.appendChild(el("strong", s.stage + " — " + s.status));
    const detail = Object.entries(s.detail || {})
      .filter(([k]) => k !== "unmapped" && k !== "warnings")
      .map(([k, v]) => k + ": " + (typeof v === "object" ? JSON.stringify(v) : v))
      .join(", ");
    li.appendChild(el("span", " " + when(s.at) + (detail ? " — " + detail : "")));
    if (s.payload) li.appendChild(el("pre", s.payload.replace(/\r/g, "\n")));
    stages.appendChild(li);
  }
}

async function openResource(type, id) {
  $("#resource-path").textContent = "/fhir/" + type + "/" + id;
  const box = $("#resource-tree");
  box.replaceChildren();
  try {
    const found = await api("GET", "/api/console/fhir/" + encodeURIComponent(type) + "/" + encodeURIComponent(id));
    box.appendChild(tree(found.resource, type, null, 0));
    box.dataset.loaded = found.path;
  } catch (err) {
    box.appendChild(el("p", "cannot read it: " + err.message, { class: "error" }));
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("#login-form").addEventListener("submit", login);
  $("#logout").addEventListener("click", () => logout(""));
  $("#search-form").addEventListener("submit", search);
  $("#rejections-form").addEventListener("submit", findRejections);
  $("#chart-channel").addEventListener("change", () => CHARTS.forEach(refreshChart));
  $("#reveal").addEventListener("click", () => shown && openMessage(shown, true));
  window.addEventListener("hashchange", route);
  if (sessionStorage.getItem(KEY)) {
    api("GET", "/api/console/settings").then((s) => setLocale(s.locale), () => setLocale(locale));
  }
  route();
});
