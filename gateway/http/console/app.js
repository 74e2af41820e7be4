// Passerelle console: reads the same /api the CLI uses. Every value is written with
// textContent (never as HTML), so nothing a message carries can run here.
"use strict";

const KEY = "passerelle.token";
const BACKLOG = ["RECEIVED", "TRANSFORMED", "QUEUED"];
let previous = null; // last stats sample, for rates
let timer = null;
let traced = null; // id of the message whose trace is shown

const $ = (sel) => document.querySelector(sel);

function el(tag, text, attrs) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  return node;
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const cell of cells) {
    const td = document.createElement("td");
    if (cell instanceof Node) td.appendChild(cell);
    else td.textContent = cell === undefined || cell === null ? "" : String(cell);
    tr.appendChild(td);
  }
  return tr;
}

function when(ts) {
  return ts ? new Date(ts * 1000).toLocaleString() : "";
}

class ApiError extends Error {
  constructor(status, text) {
    super(text);
    this.status = status;
  }
}

async function api(method, path) {
  const token = sessionStorage.getItem(KEY);
  const resp = await fetch(path, { method, headers: { Authorization: "Bearer " + token } });
  const body = await resp.json().catch(() => null);
  if (!resp.ok) {
    const text = body && body.issue ? body.issue.map((i) => i.diagnostics).join("; ") : resp.statusText;
    if (resp.status === 401) logout(text);
    throw new ApiError(resp.status, text);
  }
  return body;
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
  }
}

function route() {
  if (!sessionStorage.getItem(KEY)) {
    $("#nav").hidden = true;
    show("login");
    return;
  }
  $("#nav").hidden = false;
  const view = (location.hash || "#overview").slice(1);
  show(["overview", "problems", "search"].includes(view) ? view : "overview");
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
  try {
    await api("GET", "/api/stats");
  } catch (err) {
    sessionStorage.removeItem(KEY);
    $("#login-error").textContent = err.status === 403 ? "This token may not use the console (operator role needed)." : err.message;
    return;
  }
  $("#token").value = "";
  $("#login-error").textContent = "";
  if (!location.hash || location.hash === "#login") location.hash = "#overview";
  route();
}

async function refreshOverview() {
  let stats;
  try {
    stats = await api("GET", "/api/stats");
  } catch (err) {
    $("#updated").textContent = "update failed: " + err.message;
    return;
  }
  const now = Date.now() / 1000;
  const body = $("#channels tbody");
  body.replaceChildren();
  const snaps = (stats.runtime && stats.runtime.channels) || [];
  const names = new Set([...snaps.map((s) => s.name), ...Object.keys(stats.channels || {})]);
  for (const name of [...names].sort()) {
    const snap = snaps.find((s) => s.name === name);
    const counts = (stats.channels || {})[name] || {};
    const received = snap && snap.counters ? snap.counters.received || 0 : 0;
    let rate = "";
    if (previous && previous.received[name] !== undefined && now > previous.at) {
      rate = ((received - previous.received[name]) / (now - previous.at)).toFixed(1);
    }
    const state = !snap ? "stopped" : snap.recovering ? "recovering" : "running";
    const stateCell = el("span", state, { class: state === "running" ? "state-ok" : "state-bad" });
    const depth = BACKLOG.reduce((sum, s) => sum + (counts[s] || 0), 0);
    const tr = row([name, stateCell, received, rate, depth, counts.SENT || 0, counts.ERROR || 0, counts.DEAD || 0, counts.FILTERED || 0]);
    tr.dataset.channel = name;
    body.appendChild(tr);
  }
  previous = { at: now, received: Object.fromEntries(snaps.map((s) => [s.name, (s.counters || {}).received || 0])) };
  const dests = $("#destinations tbody");
  dests.replaceChildren();
  for (const [name, counts] of Object.entries(stats.destinations || {}).sort()) {
    dests.appendChild(row([name, Object.entries(counts).map(([k, v]) => k + ": " + v).join(", ")]));
  }
  const journal = stats.journal || {};
  $("#journal").textContent = "Journal: " + (journal.commits || 0) + " commits, " + (journal.queued_writes || 0) + " writes waiting.";
  $("#updated").textContent = "updated " + new Date().toLocaleTimeString();
}

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

function messageRows(tbody, messages, withActions) {
  tbody.replaceChildren();
  for (const m of messages) {
    const actions = el("span");
    if (withActions) {
      actions.appendChild(actionButton("Replay", "POST", "/api/dlq/" + encodeURIComponent(m.id) + "/replay"));
      actions.appendChild(actionButton("Discard", "POST", "/api/dlq/" + encodeURIComponent(m.id) + "/discard"));
    } else if (!String(m.channel).startsWith("source:")) {
      // a refusal at intake belongs to no channel: the sender sends it again, nothing to replay
      actions.appendChild(actionButton("Replay", "POST", "/api/messages/" + encodeURIComponent(m.id) + "/replay"));
    }
    const tr = row([when(m.received_at), m.channel, m.control_id, m.message_type, m.error || "", actions]);
    tr.dataset.id = m.id;
    tr.classList.add("clickable");
    tr.addEventListener("click", () => {
      location.hash = "#search";
      trace(m.id, false);
    });
    tbody.appendChild(tr);
  }
}

async function refreshProblems() {
  try {
    const [dlq, errors] = await Promise.all([api("GET", "/api/dlq?limit=200"), api("GET", "/api/messages?status=ERROR&limit=200")]);
    messageRows($("#dlq tbody"), dlq.messages, true);
    messageRows($("#errors tbody"), errors.messages, false);
  } catch (err) {
    $("#action-result").textContent = "update failed: " + err.message;
  }
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
  const rows = found.messages;
  const tbody = $("#results tbody");
  tbody.replaceChildren();
  for (const m of rows) {
    const tr = row([when(m.received_at), m.channel, m.control_id, m.message_type, m.status]);
    tr.dataset.id = m.id;
    tr.classList.add("clickable");
    tr.addEventListener("click", () => trace(m.id, false));
    tbody.appendChild(tr);
  }
}

async function trace(id, reveal) {
  let msg;
  try {
    msg = await api("GET", "/api/messages/" + encodeURIComponent(id) + (reveal ? "?reveal=true" : ""));
  } catch (err) {
    $("#trace").hidden = false;
    $("#trace-masked").textContent = (reveal ? "Reveal" : "Trace") + " refused: " + err.message;
    return;
  }
  traced = id;
  $("#trace").hidden = false;
  $("#trace-id").textContent = msg.id;
  $("#trace-masked").textContent = msg.masked ? "Identifying data is masked." : "Shown in clear; this access was audited.";
  $("#reveal").hidden = !msg.masked;
  const meta = $("#trace-meta");
  meta.replaceChildren();
  for (const key of ["channel", "status", "control_id", "message_type", "sender", "received_at", "error"]) {
    meta.appendChild(el("dt", key));
    meta.appendChild(el("dd", key === "received_at" ? when(msg[key]) : msg[key]));
  }
  $("#trace-raw").textContent = (msg.raw || "").replace(/\r/g, "\n");
  const stages = $("#trace-stages");
  stages.replaceChildren();
  for (const s of msg.stages || []) {
    const li = el("li");
    li.appendChild(el("strong", s.stage + " — " + s.status));
    li.appendChild(el("span", " " + when(s.at) + (s.detail ? " " + JSON.stringify(s.detail) : "")));
    if (s.payload) li.appendChild(el("pre", s.payload.replace(/\r/g, "\n")));
    stages.appendChild(li);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("#login-form").addEventListener("submit", login);
  $("#logout").addEventListener("click", () => logout(""));
  $("#search-form").addEventListener("submit", search);
  $("#reveal").addEventListener("click", () => traced && trace(traced, true));
  window.addEventListener("hashchange", route);
  route();
});
