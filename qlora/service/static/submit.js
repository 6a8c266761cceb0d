// The submit form: a YAML editor prefilled from a job's config or a YAML file in the root, checked
// by POST /v1/jobs itself (its 400 line is shown next to the editor); the root's files to pick
// paths from; uploads into ROOT/files. Uses api() and $() from app.js.
"use strict";

const YAML_FILE = /\.ya?ml$/i;

function startSubmitForm() {
  $("submit-form").addEventListener("submit", (event) => { event.preventDefault(); submitJob(); });
  $("prefill-load").addEventListener("click", () => prefill($("prefill").value));
  $("upload-form").addEventListener("submit", (event) => { event.preventDefault(); uploadFiles(); });
  $("files-refresh").addEventListener("click", () => refreshFiles().catch(() => {}));
}

// The options: every job's config (newest first), then the YAML files under files/.
let rootYaml = [];
function updatePrefill(jobs) {
  const options = [new Option("— choose a job or a YAML file —", "")];
  for (const job of jobs.slice().reverse()) {
    options.push(new Option(`job ${job.id}${job.name ? " (" + job.name + ")" : ""}, ${job.state}`, "job:" + job.id));
  }
  for (const path of rootYaml) options.push(new Option(path, "file:" + path));
  const chosen = $("prefill").value;
  const same = (a, b) => a.length === b.length && a.every((option, index) => option.value === b[index].value && option.text === b[index].text);
  if (same(options, [...$("prefill").options])) return;  // an open drop-down stays open
  $("prefill").replaceChildren(...options);
  $("prefill").value = options.some((option) => option.value === chosen) ? chosen : "";
}

async function prefill(choice) {
  if (!choice) return;
  const [kind, value] = [choice.slice(0, choice.indexOf(":")), choice.slice(choice.indexOf(":") + 1)];
  const path = kind === "job" ? `/v1/jobs/${value}/config` : `/v1/files/${encodePath(value.replace(/^files\//, ""))}`;
  const response = await api(path);
  const body = await response.json();
  if (!response.ok) return showSubmitError(body.detail);
  $("editor").value = kind === "job" ? body.yaml : body.text;
  showSubmitError(null);
}

async function submitJob() {
  const priority = Number($("submit-priority").value || 0);
  const gpus = Number($("submit-gpus").value || 1);
  const payload = { config: $("editor").value, priority, gpus, name: $("submit-name").value.trim() || null };
  const response = await api("/v1/jobs", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(payload),
  });
  const body = await response.json().catch(() => ({ detail: `HTTP ${response.status}` }));
  if (!response.ok) {
    $("submit-result").hidden = true;
    return showSubmitError(body.detail);
  }
  showSubmitError(null);
  const notes = (body.notes || []).map((note) => "\n" + note).join("");
  $("submit-result").textContent = `queued job ${body.id}${notes}`;
  $("submit-result").dataset.job = body.id;
  $("submit-result").hidden = false;
  await refreshJobs();
  select(body.id);
}

function showSubmitError(message) {
  $("submit-error").hidden = !message;
  $("submit-error").textContent = message ? String(message) : "";
}

// --------------------------------------------------------------------------- the root's files

// A folder with a config.json is a model; every other file is listed for data (and configs).
async function refreshFiles() {
  const files = (await api("/v1/files").then((r) => r.json())).files;
  const models = new Set(files.filter((file) => file.path.endsWith("/config.json")).map((file) => file.path.slice(0, -"/config.json".length)));
  const inModel = (path) => [...models].some((model) => path.startsWith(model + "/"));
  $("model-list").replaceChildren(...[...models].sort().map((model) => pathItem(model, "model")));
  $("file-list").replaceChildren(...files.filter((file) => !inModel(file.path)).map((file) => pathItem(file.path, bytes(file.bytes))));
  rootYaml = files.map((file) => file.path).filter((path) => YAML_FILE.test(path) && !inModel(path));
  $("no-files").hidden = files.length > 0;
}

function pathItem(path, detail) {
  const item = document.createElement("li");
  const button = document.createElement("button");
  button.type = "button";
  button.className = "path";
  button.dataset.path = path;
  button.textContent = path;
  button.title = "insert this path into the editor at the cursor";
  button.addEventListener("click", () => insertAtCursor(path));
  item.append(button, ` ${detail}`);
  return item;
}

function insertAtCursor(text) {
  const editor = $("editor");
  editor.setRangeText(text, editor.selectionStart, editor.selectionEnd, "end");
  editor.focus();
}

const encodePath = (path) => path.split("/").map(encodeURIComponent).join("/");

// Each file goes to ROOT/files/<folder>/<name> with PUT /v1/files (the service's limits apply:
// inside the root, at most --max-upload-mb, never replacing a file unless asked).
async function uploadFiles() {
  const folder = $("upload-folder").value.trim().replace(/^\/+|\/+$/g, "");
  const overwrite = $("upload-overwrite").checked ? "?overwrite=true" : "";
  const lines = [];
  for (const file of $("upload-input").files) {
    const name = (folder ? folder + "/" : "") + (file.webkitRelativePath || file.name);
    const response = await api(`/v1/files/${encodePath(name)}${overwrite}`, { method: "PUT", body: file });
    const body = await response.json().catch(() => ({ detail: `HTTP ${response.status}` }));
    lines.push(response.ok ? `uploaded ${body.path} (${bytes(body.bytes)})` : body.detail);  // the detail names the path
  }
  $("upload-result").textContent = lines.join("\n") || "choose one or more files first";
  await refreshFiles();
}
