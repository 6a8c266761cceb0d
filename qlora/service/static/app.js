// The qlora service page: the job list, and one job's live loss curve, log, cancel and download.
// Plain script, no build step, nothing fetched from elsewhere. Every data request carries the
// bearer token; the page itself is public because a browser navigation cannot send one.
"use strict";

const TOKEN_KEY = "qlora-token";
const FINISHED = ["succeeded", "failed", "cancelled"];
const LOG_LINES = 400;
const $ = (id) => document.getElementById(id);

let selected = null;      // the job shown below the list
let stream = null;        // AbortController of its event stream
let rows = new Map();     // step -> metrics row of the selected job

// A link /#token=...&job=... hands over the token; the fragment never reaches the server, and
// is removed from the address bar (and history) at once.
function readFragment() {
  const params = new URLSearchParams(location.hash.slice(1));
  if (params.get("token")) sessionStorage.setItem(TOKEN_KEY, params.get("token"));
  params.delete("token");
  history.replaceState(null, "", params.toString() ? "#" + params.toString() : location.pathname);
  return params.get("job");
}

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}), Authorization: "Bearer " + sessionStorage.getItem(TOKEN_KEY) };
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) {
    sessionStorage.removeItem(TOKEN_KEY);
    showLogin();
    throw new Error("the token was refused");
  }
  return response;
}

function showLogin() {
  $("login").hidden = false;
  $("main").hidden = true;
  $("forget").hidden = true;
}

function showMain() {
  $("login").hidden = true;
  $("main").hidden = false;
  $("forget").hidden = false;
}

const number = (value, digits = 4) => (value === null || value === undefined ? "–" : Number(value).toFixed(digits));

async function refreshJobs() {
  if (!sessionStorage.getItem(TOKEN_KEY)) return;
  const [jobs, health] = await Promise.all([api("/v1/jobs").then((r) => r.json()), api("/healthz").then((r) => r.json())]);
  $("health").textContent = `${health.busy} of ${health.slots} slot(s) busy, ${health.waiting} waiting`;
  const body = document.querySelector("#jobs tbody");
  body.replaceChildren(...jobs.jobs.slice().reverse().map(jobRow));
  $("no-jobs").hidden = jobs.jobs.length > 0;
  const shown = jobs.jobs.find((job) => job.id === selected);
  if (shown) showJob(shown);
}

function jobRow(job) {
  const row = document.createElement("tr");
  row.dataset.job = job.id;
  row.className = job.id === selected ? "selected" : "";
  const cells = [job.id, job.name || "", job.state, String(job.gpus), `${job.step}/${job.total_steps ?? "?"}`,
                 number(job.latest && job.latest.loss), number(job.eval_loss)];
  for (const [index, text] of cells.entries()) {
    const cell = document.createElement("td");
    cell.textContent = text;
    if (index === 2) cell.className = "state " + job.state;
    if (index === 3) cell.className = "gpus";
    row.append(cell);
  }
  row.addEventListener("click", () => select(job.id));
  return row;
}

function select(id) {
  if (stream) stream.abort();
  selected = id;
  rows = new Map();
  history.replaceState(null, "", "#job=" + id);
  $("log").textContent = "";
  $("job").hidden = false;
  $("job-id").textContent = id;
  for (const row of document.querySelectorAll("#jobs tbody tr")) row.className = row.dataset.job === id ? "selected" : "";
  drawCurve();
  follow(id, null);
}

function showJob(job) {
  $("job-state").textContent = job.state;
  $("job-state").className = "state " + job.state;
  const latest = job.latest ? `, loss ${number(job.latest.loss)}` : "";
  const evalLoss = job.eval_loss !== null ? `, eval loss ${number(job.eval_loss)}` : "";
  $("job-progress").textContent = `step ${job.step} of ${job.total_steps ?? "?"}${latest}${evalLoss}; attempt ${job.attempts}`;
  // The world size: one process per GPU slot (torchrun when more than one); the slots while it runs.
  const slots = job.slot ? ` (slot${job.gpus > 1 ? "s" : ""} ${job.slot})` : "";
  $("job-gpus").textContent = `${job.gpus} GPU${job.gpus > 1 ? "s" : ""}${slots}`;
  $("job-gpus").dataset.gpus = job.gpus;
  $("job-error").hidden = !job.error;
  $("job-error").textContent = job.error || "";
  $("cancel").disabled = FINISHED.includes(job.state) || job.cancel_requested === 1;
  $("download").disabled = !job.adapter;
  $("curve").dataset.total = job.total_steps ?? "";
}

// Server-sent events read with fetch (EventSource cannot send a bearer header). On a dropped
// connection it reconnects with Last-Event-ID and gets exactly what it missed.
async function follow(id, lastEventId) {
  const controller = new AbortController();
  stream = controller;
  const headers = lastEventId ? { "Last-Event-ID": lastEventId } : {};
  let finished = false;
  try {
    const response = await api(`/v1/jobs/${id}/events`, { headers, signal: controller.signal });
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = parseEvent(buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
        if (event.id) lastEventId = event.id;
        if (event.type) finished = handle(event.type, event.data) || finished;
      }
    }
  } catch (error) {
    if (controller.signal.aborted) return;
  }
  if (!finished && selected === id && !controller.signal.aborted) setTimeout(() => follow(id, lastEventId), 2000);
}

function parseEvent(block) {
  const event = {};
  for (const line of block.split("\n")) {
    const colon = line.indexOf(": ");
    if (line.startsWith(":") || colon < 0) continue;
    const field = line.slice(0, colon);
    const value = line.slice(colon + 2);
    if (field === "event") event.type = value;
    else if (field === "id") event.id = value;
    else if (field === "data") event.data = JSON.parse(value);
  }
  return event;
}

function handle(type, data) {
  if (type === "metrics") {
    rows.set(data.step, { ...(rows.get(data.step) || {}), ...data });
    drawCurve();
  } else if (type === "log") {
    const log = $("log");
    const lines = (log.textContent ? log.textContent.split("\n") : []).concat(data.line);
    log.textContent = lines.slice(-LOG_LINES).join("\n");
    log.scrollTop = log.scrollHeight;
  } else if (type === "state" || type === "end") {
    showJob(data);
    $("curve").dataset.state = data.state;
  }
  return type === "end";
}

// The curve, drawn by hand: x = optimizer step, y = loss on a linear scale.
function drawCurve() {
  const svg = $("curve");
  const [width, height, left, right, top, bottom] = [640, 300, 56, 16, 16, 32];
  const all = [...rows.values()].sort((a, b) => a.step - b.step);
  const train = all.filter((row) => typeof row.loss === "number");
  const evals = all.filter((row) => typeof row.eval_loss === "number");
  const values = train.map((row) => row.loss).concat(evals.map((row) => row.eval_loss));
  const lastStep = Math.max(1, Number(svg.dataset.total) || 0, ...all.map((row) => row.step));
  const low = values.length ? Math.min(...values) : 0;
  const high = values.length ? Math.max(...values) : 1;
  const span = high - low || 1;
  const x = (step) => left + (step / lastStep) * (width - left - right);
  const y = (value) => top + (1 - (value - low) / span) * (height - top - bottom);
  const path = (points, key) => points.map((row, index) => `${index ? "L" : "M"}${x(row.step).toFixed(1)},${y(row[key]).toFixed(1)}`).join(" ");

  $("loss-path").setAttribute("d", path(train, "loss"));
  $("loss-path").dataset.points = train.length;
  $("eval-path").setAttribute("d", path(evals, "eval_loss"));
  $("eval-path").dataset.points = evals.length;
  $("eval-points").replaceChildren(...evals.map((row) => svgElement("circle", { cx: x(row.step), cy: y(row.eval_loss), r: 3 })));

  const grid = [svgElement("line", { class: "axis", x1: left, y1: height - bottom, x2: width - right, y2: height - bottom }),
                svgElement("line", { class: "axis", x1: left, y1: top, x2: left, y2: height - bottom })];
  for (const value of [low, low + span / 2, high]) {
    grid.push(svgElement("text", { x: left - 6, y: y(value) + 4, "text-anchor": "end" }, values.length ? value.toFixed(3) : ""));
  }
  for (const step of [0, Math.round(lastStep / 2), lastStep]) {
    grid.push(svgElement("text", { x: x(step), y: height - bottom + 16, "text-anchor": "middle" }, String(step)));
  }
  grid.push(svgElement("text", { x: width - right, y: height - 4, "text-anchor": "end" }, "step"));
  $("grid").replaceChildren(...grid);
}

function svgElement(name, attributes, text) {
  const element = document.createElementNS("http://www.w3.org/2000/svg", name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, value);
  if (text !== undefined) element.textContent = text;
  return element;
}

async function cancelSelected() {
  const response = await api(`/v1/jobs/${selected}/cancel`, { method: "POST" });
  showJob(await api(`/v1/jobs/${selected}`).then((r) => r.json()));
  return response;
}

async function downloadSelected() {
  const response = await api(`/v1/jobs/${selected}/adapter`);
  if (!response.ok) return;
  const link = document.createElement("a");
  link.href = URL.createObjectURL(await response.blob());
  link.download = `${selected}-adapter.tar.gz`;
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
}

function start() {
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token-input").value.trim());
    $("token-input").value = "";
    begin(null);
  });
  $("forget").addEventListener("click", () => { sessionStorage.removeItem(TOKEN_KEY); showLogin(); });
  $("cancel").addEventListener("click", cancelSelected);
  $("download").addEventListener("click", downloadSelected);
  begin(readFragment());
}

function begin(job) {
  if (!sessionStorage.getItem(TOKEN_KEY)) return showLogin();
  showMain();
  refreshJobs().then(() => { if (job) select(job); }).catch(() => {});
  if (!window.refresher) window.refresher = setInterval(() => refreshJobs().catch(() => {}), 2000);
}

document.addEventListener("DOMContentLoaded", start);
