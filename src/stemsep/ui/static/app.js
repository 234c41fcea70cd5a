// The page of `stemsep ui`: choose songs and options, follow the queue, reopen earlier
// separations in the mixer (mixer.js). Talks only to its own server's JSON API.

import { clock, Mixer } from "/static/mixer.js";

const $ = (selector) => document.querySelector(selector);
const POLL_MS = 500;
const LIMIT_KEY = "stemsep-mixer-minutes";

let config = null;
let files = [];
const mine = new Set(); // ids of the jobs this page queued, opened in the mixer when done
const seen = new Map(); // job id -> the state last shown
const mixer = new Mixer($("#mixer"));
window.stemsepMixer = mixer; // for debugging: stemsepMixer.state() resolves to the worklet's own state

async function api(path, options = {}) {
  const response = await fetch(path, options);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || `the server answered HTTP ${response.status}`);
  return body;
}

function showError(message) {
  $("#error").textContent = message || "";
  $("#error").hidden = !message;
}

function megabytes(bytes) {
  return bytes >= 1e9 ? `${(bytes / 1e9).toFixed(2)} GB` : `${Math.round(bytes / 1e6)} MB`;
}

// choices ------------------------------------------------------------------------------------

function modelRows() {
  if ($("#engine").value === "local") return config.models;
  const hosted = config.replicate;
  if (!hosted.choices.length) return [{ name: "", label: "the hosted model's default", stems: [], practice: [], downloaded: true }];
  return hosted.choices.map((name) => {
    const stems = hosted.stems[name] || [];
    return { name, label: name, stems, practice: hosted.practice[name] || [], downloaded: true };
  });
}

function fillModels(selected) {
  const select = $("#model");
  select.replaceChildren();
  for (const model of modelRows()) {
    const option = new Option(model.label, model.name);
    if (!model.downloaded) option.textContent += ` (${megabytes(model.size)} to download)`;
    select.append(option);
  }
  if ([...select.options].some((o) => o.value === selected)) select.value = selected;
  fillStems();
}

function fillStems() {
  const model = modelRows().find((m) => m.name === $("#model").value);
  const box = $("#stem-choices");
  box.replaceChildren();
  for (const stem of [...(model?.stems || []), ...(model?.practice || [])]) {
    const label = document.createElement("label");
    const box_ = document.createElement("input");
    box_.type = "checkbox";
    box_.value = stem;
    box_.name = "stem";
    label.append(box_, ` ${stem}`);
    if (stem.startsWith("no_")) label.title = `the mix without ${stem.slice(3)}: a practice track`;
    box.append(label);
  }
  $("#stems").hidden = !box.children.length;
  let note = "";
  if (model && !model.downloaded) {
    note = config.offline
      ? `${model.name} is not downloaded, and this server is offline: stemsep models download ${model.name}`
      : `${model.name} is downloaded (${megabytes(model.size)}, checksummed) when its first song is separated.`;
  }
  $("#model-note").textContent = note;
}

function fillReplicate() {
  const hosted = config.replicate;
  $("#replicate-model").value = hosted.model || "";
  $("#replicate-status").textContent = hosted.error || (hosted.configured ? `using ${hosted.model}` : "not set");
  $("#engine").querySelector("option[value=replicate]").disabled = !hosted.configured;
}

async function loadConfig() {
  config = await api("/api/config");
  $("#output-dir").textContent = `stems in ${config.output_dir}`;
  const format = $("#format");
  format.replaceChildren(...config.formats.map((f) => new Option(f, f)));
  format.value = config.format;
  $("#tta").checked = config.tta;
  const limit = Number(localStorage.getItem(LIMIT_KEY)) || config.mixer_minutes;
  $("#mixer-minutes").value = String(limit);
  fillReplicate();
  fillModels(config.model);
}

// queueing songs -----------------------------------------------------------------------------

function choose(list) {
  files = [...list];
  $("#chosen").textContent = files.map((f) => f.name).join(", ");
}

async function start(event) {
  event.preventDefault();
  showError("");
  if (!files.length) {
    showError("Choose or drop a song first.");
    return;
  }
  const stems = [...document.querySelectorAll("#stem-choices input:checked")].map((b) => b.value);
  for (const file of files) {
    const query = new URLSearchParams({
      name: file.name, engine: $("#engine").value, model: $("#model").value, format: $("#format").value,
      tta: $("#tta").checked ? "1" : "0", stems: stems.join(","),
    });
    try {
      const job = await api(`/api/jobs?${query}`, {
        method: "POST", body: file, headers: { "content-type": "application/octet-stream" },
      });
      mine.add(job.id);
    } catch (error) {
      showError(error.message);
    }
  }
  choose([]);
  $("#file").value = "";
  poll();
}

// the queue ------------------------------------------------------------------------------------

function jobText(job) {
  if (job.state === "running") {
    const left = job.remaining_s == null ? "" : `, about ${clock(job.remaining_s)} left`;
    return job.total ? `${job.stage}: ${Math.floor((100 * job.done) / job.total)}%${left}` : job.stage;
  }
  if (job.state === "failed") return job.error;
  return { queued: "waiting", done: "done", canceled: "canceled" }[job.state];
}

function renderQueue(jobs) {
  const list = $("#queue");
  list.replaceChildren();
  for (const job of jobs) {
    const item = document.createElement("li");
    item.className = `job ${job.state}`;
    item.dataset.job = job.id;
    const name = document.createElement("span");
    name.className = "job-song";
    name.textContent = job.song;
    const bar = document.createElement("progress");
    bar.max = 1;
    if (job.state === "running" && job.total) bar.value = job.done / job.total;
    if (job.state === "done") bar.value = 1;
    if (job.state === "queued" || job.state === "failed" || job.state === "canceled") bar.value = 0;
    const text = document.createElement("span");
    text.className = "job-text";
    text.textContent = jobText(job);
    item.append(name, bar, text);
    if (job.state === "queued" || job.state === "running") {
      const cancel = document.createElement("button");
      cancel.type = "button";
      cancel.textContent = "Cancel";
      cancel.addEventListener("click", () => api(`/api/jobs/${job.id}/cancel`, { method: "POST" }).then(poll, (e) => showError(e.message)));
      item.append(cancel);
    } else if (job.state === "done") {
      const open = document.createElement("button");
      open.type = "button";
      open.textContent = "Open";
      open.addEventListener("click", () => openSeparation(job.separation));
      item.append(open);
    }
    list.append(item);
  }
  $("#queue-section").hidden = !jobs.length;
}

let polling = null;

async function poll() {
  clearTimeout(polling);
  let jobs = [];
  try {
    jobs = (await api("/api/jobs")).jobs;
  } catch (error) {
    showError(error.message);
  }
  renderQueue(jobs);
  let finished = false;
  for (const job of jobs) {
    if (seen.get(job.id) === job.state) continue;
    seen.set(job.id, job.state);
    if (!mine.has(job.id)) continue;
    if (job.state === "failed") showError(job.error);
    if (job.state === "done") {
      finished = true;
      if (!mixer.playing) openSeparation(job.separation);
    }
  }
  if (finished) loadHistory();
  if (jobs.some((j) => j.state === "queued" || j.state === "running")) polling = setTimeout(poll, POLL_MS);
}

// earlier separations --------------------------------------------------------------------------

async function loadHistory() {
  const { separations } = await api("/api/separations");
  const list = $("#history");
  list.replaceChildren();
  for (const record of separations) {
    const item = document.createElement("li");
    item.dataset.separation = record.id;
    const when = new Date(record.created).toLocaleString();
    const length = record.duration_s ? `, ${clock(record.duration_s)}` : "";
    const label = document.createElement("span");
    label.textContent = `${record.song}: ${Object.keys(record.stems).join(", ")} (${record.model}${length}; ${when})`;
    const open = document.createElement("button");
    open.type = "button";
    open.textContent = "Open";
    open.addEventListener("click", () => openSeparation(record.id));
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "Delete";
    remove.addEventListener("click", async () => {
      if (!confirm(`Delete the stems of ${record.song}?`)) return;
      await api(`/api/separations/${encodeURIComponent(record.id)}`, { method: "DELETE" }).catch((e) => showError(e.message));
      if (mixer.record?.id === record.id) {
        await mixer.close();
        $("#mixer").hidden = true;
      }
      loadHistory();
    });
    item.append(label, open, remove);
    list.append(item);
  }
  $("#history-empty").hidden = separations.length > 0;
}

async function openSeparation(id) {
  showError("");
  $("#mixer-note").textContent = "Loading the stems…";
  try {
    const record = await api(`/api/separations/${encodeURIComponent(id)}`);
    const note = await mixer.open(record, Number($("#mixer-minutes").value) || config.mixer_minutes);
    $("#mixer-note").textContent = note || "";
  } catch (error) {
    $("#mixer-note").textContent = "";
    showError(error.message);
  }
}

// wiring ----------------------------------------------------------------------------------------

$("#file").addEventListener("change", (event) => choose(event.target.files));
const drop = $("#drop");
drop.addEventListener("dragover", (event) => {
  event.preventDefault();
  drop.classList.add("over");
});
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  choose(event.dataTransfer.files);
});
$("#separate-form").addEventListener("submit", start);
$("#engine").addEventListener("change", () => fillModels(config.model));
$("#model").addEventListener("change", fillStems);
$("#mixer-minutes").addEventListener("change", (event) => localStorage.setItem(LIMIT_KEY, event.target.value));
$("#replicate-save").addEventListener("click", async () => {
  try {
    config.replicate = await api("/api/replicate", {
      method: "POST", headers: { "content-type": "application/json" },
      body: JSON.stringify({ model: $("#replicate-model").value, token: $("#replicate-token").value }),
    });
    $("#replicate-token").value = "";
    fillReplicate();
    $("#engine").value = "replicate";
    fillModels("");
  } catch (error) {
    $("#replicate-status").textContent = error.message;
  }
});

loadConfig().then(() => Promise.all([loadHistory(), poll()])).catch((error) => showError(error.message));
