// The crfasrnn demo page: plain JavaScript, no framework. Talks to /api/info, /api/segment and /api/refine.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  info: null,
  mode: "refine",
  photo: null,        // a File, or null with useSample
  useSample: false,
  labels: null,       // a File (refine mode), or null
  result: null,
  viewKey: null,
  request: 0,         // number of the latest request; older answers are ignored
  controller: null,
};

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function setStatus(text) { $("status").textContent = text; }

function human(bytes) { return (bytes / (1024 * 1024)).toFixed(1) + " MiB"; }

function buildSliders(parameters) {
  const host = $("sliders");
  host.replaceChildren();
  for (const p of parameters) {
    const wrap = document.createElement("label");
    wrap.className = "slider";
    wrap.title = p.help;
    const name = document.createElement("span");
    name.textContent = p.label;
    const out = document.createElement("output");
    const input = document.createElement("input");
    Object.assign(input, { type: "range", min: p.min, max: p.max, step: p.step, value: p.default, name: p.name });
    input.dataset.default = p.default;
    input.id = "param-" + p.name;
    out.textContent = input.value;
    input.addEventListener("input", () => { out.textContent = input.value; });
    input.addEventListener("change", scheduleRun);
    wrap.append(name, out, input);
    host.append(wrap);
  }
}

function setMode(mode) {
  state.mode = mode;
  const refine = mode === "refine";
  $("params").hidden = !refine;
  $("labels-row").hidden = !refine;
  $("mode-help").textContent = refine
    ? "Refines a coarse label map of a photo with the dense CRF (no trained weights needed): upload a photo and its " +
      "label map, or use the bundled photo with its coarse annotation."
    : "Segments the photo into the 21 PASCAL VOC classes with the trained FCN-8s + CRF-RNN network.";
  for (const radio of document.querySelectorAll("input[name=mode]")) radio.checked = radio.value === mode;
  if (state.photo || state.useSample) run();
}

async function loadInfo() {
  try {
    const response = await fetch("/api/info");
    const info = await response.json();
    state.info = info;
    const weights = info.weights && info.weights.source ? ` · weights ${info.weights.source}` : "";
    $("server-info").textContent =
      `mode: ${info.mode} · device: ${info.device}${weights} · uploads up to ${human(info.limits.max_upload_bytes)}, ` +
      `${info.limits.max_side}×${info.limits.max_side} px`;
    buildSliders(info.refine_parameters);
    $("superpixels-row").hidden = !(info.superpixels && info.superpixels.available);
    $("mode-choice").hidden = info.modes.length < 2;
    document.body.dataset.ready = "1";
    setMode(info.mode);
  } catch (err) {
    showError("cannot reach the server: " + err);
  }
}

function scheduleRun() {
  clearTimeout(scheduleRun.timer);
  scheduleRun.timer = setTimeout(() => { if (state.photo || state.useSample) run(); }, 150);
}

async function run() {
  const info = state.info;
  if (!info) return;
  const form = new FormData();
  let bytes = 0;
  if (state.photo) { form.append("image", state.photo); bytes += state.photo.size; }
  else form.append("sample", "true");
  if (state.mode === "refine") {
    if (state.photo && !state.labels) {
      showError("");
      setStatus("Now choose a label map of this photo (palette, grey or colour PNG), or use the bundled photo.");
      return;
    }
    if (state.labels) { form.append("labels", state.labels); bytes += state.labels.size; }
    for (const input of $("sliders").querySelectorAll("input")) form.append(input.name, input.value);
    if (!$("superpixels-row").hidden) form.append("superpixels", $("superpixels").checked ? "true" : "false");
  }
  if (bytes > info.limits.max_upload_bytes) {
    showError(`upload too large: ${human(bytes)}; the limit is ${human(info.limits.max_upload_bytes)}`);
    return;
  }
  if (state.controller) state.controller.abort();
  const controller = new AbortController();
  state.controller = controller;
  const number = ++state.request;
  document.body.classList.add("busy");
  setStatus(state.mode === "segment" ? "segmenting" : "refining");
  const start = performance.now();
  try {
    const response = await fetch("/api/" + state.mode, { method: "POST", body: form, signal: controller.signal });
    let answer;
    try { answer = await response.json(); } catch { answer = { error: `HTTP ${response.status}` }; }
    if (number !== state.request) return;
    if (!response.ok) {
      showError(answer.error || `HTTP ${response.status}`);
      setStatus(`request failed (HTTP ${response.status})`);
      return;
    }
    const seconds = (performance.now() - start) / 1000;
    showError("");
    state.result = answer;
    if (!answer.views.some((v) => v.key === state.viewKey)) state.viewKey = answer.views[0].key;
    render(seconds);
  } catch (err) {
    if (err.name !== "AbortError" && number === state.request) showError("request failed: " + err);
  } finally {
    if (number === state.request) document.body.classList.remove("busy");
  }
}

function render(seconds) {
  const r = state.result;
  if (!r) return;
  const view = r.views.find((v) => v.key === state.viewKey) || r.views[0];
  $("photo-img").src = "data:image/png;base64," + r.photo_png;
  const overlay = $("overlay-img");
  overlay.dataset.view = view.key;
  overlay.src = "data:image/png;base64," + view.overlay_png;
  $("labels-img").src = "data:image/png;base64," + view.labels_png;
  $("overlay-caption").textContent = `overlay: ${view.title}`;
  $("labels-caption").textContent = `label map: ${view.title}`;

  const toggle = $("view-toggle");
  toggle.replaceChildren();
  for (const v of r.views) {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = v.title;
    button.dataset.view = v.key;
    button.className = v.key === view.key ? "active" : "";
    button.addEventListener("click", () => { state.viewKey = v.key; render(); });
    toggle.append(button);
  }
  toggle.hidden = r.views.length < 2;

  const body = $("legend").querySelector("tbody");
  body.replaceChildren();
  for (const c of view.classes) {
    const row = document.createElement("tr");
    row.dataset.label = c.label;
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = c.color;
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = Math.max(1, Math.round(c.share * 120)) + "px";
    const cells = [swatch, c.name, c.pixels.toLocaleString(), (100 * c.share).toFixed(1) + " %"];
    cells.forEach((content, i) => {
      const td = document.createElement("td");
      if (i >= 2) td.className = "num";
      td.append(content);
      if (i === 3) td.append(bar);
      row.append(td);
    });
    body.append(row);
  }
  $("legend").hidden = false;

  const notes = $("notes");
  notes.replaceChildren(...r.notes.map((n) => { const li = document.createElement("li"); li.textContent = n; return li; }));
  if (seconds !== undefined) {
    state.lastTiming = `${r.mode}: ${r.width}×${r.height} px in ${seconds.toFixed(2)} s ` +
      `(server ${r.request_seconds.toFixed(2)} s, of which ${r.mode === "segment" ? "network" : "CRF"} ` +
      `${r.compute_seconds.toFixed(2)} s)`;
  }
  setStatus(state.lastTiming || "");
}

function init() {
  $("photo-input").addEventListener("change", (e) => {
    const file = e.target.files[0];
    if (!file) return;
    state.photo = file;
    state.useSample = false;
    state.labels = null;  // a label map belongs to one photo
    $("labels-input").value = "";
    run();
  });
  $("sample-button").addEventListener("click", () => {
    state.photo = null;
    state.useSample = true;
    state.labels = null;  // the bundled photo comes with its own coarse annotation
    $("photo-input").value = "";
    $("labels-input").value = "";
    run();
  });
  $("labels-input").addEventListener("change", (e) => {
    state.labels = e.target.files[0] || null;
    if (state.photo || state.useSample) run();
  });
  $("labels-clear").addEventListener("click", () => {
    state.labels = null;
    $("labels-input").value = "";
    if (state.photo || state.useSample) run();
  });
  $("params-reset").addEventListener("click", () => {
    for (const input of $("sliders").querySelectorAll("input")) {
      input.value = input.dataset.default;
      input.dispatchEvent(new Event("input"));
    }
    $("superpixels").checked = false;
    scheduleRun();
  });
  $("superpixels").addEventListener("change", scheduleRun);
  for (const radio of document.querySelectorAll("input[name=mode]")) {
    radio.addEventListener("change", () => setMode(radio.value));
  }
  loadInfo();
}

document.addEventListener("DOMContentLoaded", init);
