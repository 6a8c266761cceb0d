// The qlora service page: the job list, one job's summary, live loss curve (and a dpo / orpo
// job's reward accuracy), log, cancel and download, and several jobs' curves on one chart
// (chart.js draws; submit.js is the submit form).
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
let summaryDone = false;  // the selected job's summary came from its summary.json: it no longer changes
const names = new Map();  // job id -> its name, for the comparison's legend
const compared = new Map(); // job id -> its metrics rows, for the jobs ticked to compare
const COLORS = ["#1761b0", "#d9730d", "#19783a", "#8e3fb0", "#b3261e", "#0f8a8a", "#6b5d00", "#445"];

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
const percent = (value) => (value === null || value === undefined ? "–" : (100 * value).toFixed(1) + "%");

async function refreshJobs() {
  if (!sessionStorage.getItem(TOKEN_KEY)) return;
  const [jobs, health] = await Promise.all([api("/v1/jobs").then((r) => r.json()), api("/healthz").then((r) => r.json())]);
  $("health").textContent = `${health.busy} of ${health.slots} slot(s) busy, ${health.waiting} waiting`;
  for (const job of jobs.jobs) names.set(job.id, job.name || "");
  const body = document.querySelector("#jobs tbody");
  body.replaceChildren(...jobs.jobs.slice().reverse().map(jobRow));
  $("no-jobs").hidden = jobs.jobs.length > 0;
  updatePrefill(jobs.jobs);
  const shown = jobs.jobs.find((job) => job.id === selected);
  if (shown) showJob(shown);
  if (shown && !summaryDone) await refreshSummary(shown.id);
  await refreshCompare(jobs.jobs);
}

function jobRow(job) {
  const row = document.createElement("tr");
  row.dataset.job = job.id;
  row.className = job.id === selected ? "selected" : "";
  const tick = document.createElement("input");
  tick.type = "checkbox";
  tick.className = "compare";
  tick.title = "compare this job's curve with others";
  tick.checked = compared.has(job.id);
  tick.addEventListener("click", (event) => event.stopPropagation());
  tick.addEventListener("change", () => toggleCompare(job.id, tick.checked));
  const tickCell = document.createElement("td");
  tickCell.append(tick);
  row.append(tickCell);
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
  summaryDone = false;
  $("summary").replaceChildren();
  history.replaceState(null, "", "#job=" + id);
  $("log").textContent = "";
  $("job").hidden = false;
  $("job-id").textContent = id;
  for (const row of document.querySelectorAll("#jobs tbody tr")) row.className = row.dataset.job === id ? "selected" : "";
  drawCurve();
  refreshSummary(id).catch(() => {});
  follow(id, null);
}

function showJob(job) {
  $("job-state").textContent = job.state;
  $("job-state").className = "state " + job.state;
  const latest = job.latest ? `, loss ${number(job.latest.loss)}` : "";
  const evalLoss = job.eval_loss !== null ? `, eval loss ${number(job.eval_loss)}` : "";
  // A dpo / orpo step also says how often the chosen answer wins and by how much.
  const rewards = job.latest && typeof job.latest["rewards/accuracy"] === "number"
    ? `, reward accuracy ${percent(job.latest["rewards/accuracy"])}, margin ${number(job.latest["rewards/margin"])}` : "";
  $("job-progress").textContent = `step ${job.step} of ${job.total_steps ?? "?"}${latest}${evalLoss}${rewards}; attempt ${job.attempts}`;
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
    if (type === "end") refreshJobs().catch(() => {});  // the list and the summary catch up at once
  }
  return type === "end";
}

// The selected job's curve: train loss as a line, eval loss dashed with a dot per evaluation.
function drawCurve() {
  const all = [...rows.values()].sort((a, b) => a.step - b.step);
  const train = all.filter((row) => typeof row.loss === "number").map((row) => [row.step, row.loss]);
  const evals = all.filter((row) => typeof row.eval_loss === "number").map((row) => [row.step, row.eval_loss]);
  const scale = chosenScale($("log-scale"), train.concat(evals).map(([, value]) => value));
  drawChart($("curve"), [
    { id: "loss-path", className: "loss", points: train },
    { id: "eval-path", className: "eval", points: evals, dots: true },
  ], scale, Number($("curve").dataset.total) || 0);
  drawRewards(all);
}

// A dpo / orpo job's reward accuracy (the share of pairs whose chosen answer the adapter prefers
// more than the base does), train and eval, below its loss; hidden for an sft job.
function drawRewards(all) {
  const series = (key) => all.filter((row) => typeof row[key] === "number").map((row) => [row.step, row[key]]);
  const train = series("rewards/accuracy");
  const evals = series("eval_rewards/accuracy");
  $("preference").hidden = !train.length && !evals.length;
  if ($("preference").hidden) return;
  drawChart($("reward-curve"), [
    { id: "reward-path", className: "loss", points: train },
    { id: "eval-reward-path", className: "eval", points: evals, dots: true },
  ], "linear", Number($("curve").dataset.total) || 0);
}

// --------------------------------------------------------------------------- summary

const SUMMARY = [
  ["base", "base model", (s) => s.base || "–"],
  ["quantization", "quantization", (s) => quantization(s.quantization)],
  ["lora", "LoRA", (s) => `r=${s.lora.r ?? "?"}, alpha=${s.lora.alpha ?? "?"}, dropout ${s.lora.dropout ?? "?"}`],
  ["learning_rate", "learning rate", (s) => (s.learning_rate === null ? "–" : String(s.learning_rate))],
  ["steps", "steps", (s) => `${s.step} of ${s.total_steps ?? "?"}`],
  ["duration", "duration", (s) => duration(s.duration_s) + (s.train_seconds ? ` (training ${duration(s.train_seconds)})` : "")],
  ["tokens_per_s", "supervised tokens/s", (s) => (s.supervised_tokens_per_s === null ? "–" : Math.round(s.supervised_tokens_per_s).toLocaleString("en"))],
  ["mfu", "MFU", (s) => (s.mfu === null ? "–" : (100 * s.mfu).toFixed(2) + "%")],
  ["peak_memory", "peak memory", (s) => (s.peak_memory_bytes === null ? "– (when finished)" : `${bytes(s.peak_memory_bytes)} (${(s.peak_memory_kind || "").replaceAll("_", " ")})`)],
  ["adapter", "adapter size", (s) => (s.adapter_bytes === null ? "– (when finished)" : bytes(s.adapter_bytes))],
  ["eval_loss", "eval loss", (s) => `${number(s.initial_eval_loss)} before, ${number(s.final_eval_loss)} ${s.finished ? "after" : "latest"}`],
  ["final_loss", "train loss", (s) => `${number(s.final_loss)} ${s.finished ? "final" : "latest"}`],
];

// A dpo / orpo job's own rows: each preference metric it writes, train and eval, before and after.
const PREFERENCE_LABELS = {
  "rewards/accuracy": "reward accuracy",
  "rewards/margin": "reward margin",
  "logps/accuracy": "preference accuracy",
  "log_odds_ratio": "log odds ratio",
  "nll_loss": "chosen NLL",
};

function preferenceItems(summary) {
  if (!summary.preference) return [];
  const items = [["objective", "objective", summary.objective]];
  for (const [name, values] of Object.entries(summary.preference)) {
    const show = name.endsWith("accuracy") ? percent : (value) => number(value);
    const after = summary.finished ? "after" : "latest";
    items.push([name, PREFERENCE_LABELS[name] || name,
                `train ${show(values.train)}; eval ${show(values.eval_before)} before, ${show(values.eval)} ${after}`]);
  }
  return items;
}

function quantization(q) {
  if (!q || !q.bits) return "–";
  if (q.bits === 16) return "none (16-bit base)";
  const kind = q.bits === 4 ? ` ${q.quant_type}${q.double_quant ? ", double quant" : ""}` : "";
  return `${q.bits}-bit${kind}, compute ${q.compute_dtype}`;
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 120) return `${seconds.toFixed(1)} s`;
  if (seconds < 7200) return `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
  return `${Math.floor(seconds / 3600)} h ${Math.round((seconds % 3600) / 60)} min`;
}

function bytes(count) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let index = 0;
  while (count >= 1024 && index < units.length - 1) [count, index] = [count / 1024, index + 1];
  return `${index ? count.toFixed(1) : count} ${units[index]}`;
}

async function refreshSummary(id) {
  const response = await api(`/v1/jobs/${id}/summary`);
  if (!response.ok || id !== selected) return;
  const summary = await response.json();
  summaryDone = summary.finished || FINISHED.includes(summary.state);
  const entries = SUMMARY.map(([key, label, format]) => [key, label, format(summary)]).concat(preferenceItems(summary));
  const items = entries.flatMap(([key, label, text]) => {
    const term = document.createElement("dt");
    term.textContent = label;
    const value = document.createElement("dd");
    value.dataset.key = key;
    value.textContent = text;
    return [term, value];
  });
  $("summary").replaceChildren(...items);
}

// --------------------------------------------------------------------------- compare

function toggleCompare(id, on) {
  if (on) compared.set(id, []);
  else compared.delete(id);
  refreshCompare(null).catch(() => {});
}

// Each ticked job's rows are fetched again while it may still change; a finished job's once.
async function refreshCompare(jobs) {
  $("compare").hidden = compared.size < 2;
  $("compare-hint").hidden = compared.size >= 2;
  if (compared.size < 2) return;
  const states = new Map((jobs || []).map((job) => [job.id, job.state]));
  await Promise.all([...compared.keys()].map(async (id) => {
    const known = compared.get(id);
    if (known.length && known.finished) return;
    const response = await api(`/v1/jobs/${id}/metrics`);
    if (!response.ok || !compared.has(id)) return;
    const fetched = (await response.json()).rows;
    fetched.finished = FINISHED.includes(states.get(id));
    compared.set(id, fetched);
  }));
  drawCompare();
}

function drawCompare() {
  const series = [];
  const legend = [];
  [...compared.entries()].forEach(([id, jobRows], index) => {
    const color = COLORS[index % COLORS.length];
    const train = jobRows.filter((row) => typeof row.loss === "number").map((row) => [row.step, row.loss]);
    const evals = jobRows.filter((row) => typeof row.eval_loss === "number").map((row) => [row.step, row.eval_loss]);
    series.push({ className: "loss", job: id, color, points: train });
    series.push({ className: "eval", job: id, color, dashed: true, dots: true, points: evals });
    const item = document.createElement("span");
    item.className = "entry";
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = color;  // CSSOM, which the page's Content-Security-Policy allows
    const last = train.length ? number(train[train.length - 1][1]) : "–";
    item.append(swatch, `${id}${names.get(id) ? " (" + names.get(id) + ")" : ""}: loss ${last}`);
    legend.push(item);
  });
  const values = series.flatMap((line) => line.points.map(([, value]) => value));
  drawChart($("compare-chart"), series, chosenScale($("compare-log-scale"), values), 0);
  $("compare-legend").replaceChildren(...legend);
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
  for (const [box, redraw] of [["log-scale", drawCurve], ["compare-log-scale", drawCompare]]) {
    $(box).addEventListener("change", () => { $(box).dataset.chosen = $(box).checked ? "log" : "linear"; redraw(); });
  }
  startSubmitForm();
  begin(readFragment());
}

function begin(job) {
  if (!sessionStorage.getItem(TOKEN_KEY)) return showLogin();
  showMain();
  refreshFiles().then(refreshJobs).then(() => { if (job) select(job); }).catch(() => {});
  if (!window.refresher) window.refresher = setInterval(() => refreshJobs().catch(() => {}), 2000);
}

document.addEventListener("DOMContentLoaded", start);
