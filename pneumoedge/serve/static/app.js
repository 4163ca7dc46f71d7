// The page's one script: model identity, file choice / drag and drop, one request per file.
// No framework, no external resource (Content-Security-Policy allows only this origin).
"use strict";

const DISAGREEMENT_HIGH = 0.2;          // members' spread worth a closer look
const TIMEOUT_MS = 120000;              // never a spinner forever
const PARALLEL = 2;                     // uploads at once; the server queues the rest
const RETRIES_WHEN_BUSY = 5;

const model = { info: null };
const waiting = [];
let running = 0;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

function percent(p) { return (100 * p).toFixed(1) + " %"; }

async function loadModel() {
  try {
    const response = await fetch("/api/v1/model", { cache: "no-store" });
    if (!response.ok) throw new Error(await reason(response));
    const info = await response.json();
    model.info = info;
    document.getElementById("model-name").textContent = info.name;
    document.getElementById("model-members").textContent =
      info.members.map((m) => `${m.name} (${m.precision}, weight ${m.weight})`).join(", ");
    document.getElementById("model-sha").textContent =
      info.members.map((m) => `${m.name}: ${m.sha256.slice(0, 12)}`).join(", ");
    const provenance = document.getElementById("model-provenance");
    provenance.textContent = info.provenance_summary;
    if (info.provenance && info.provenance.notice && info.provenance.notice !== info.provenance_summary) {
      provenance.textContent += ` (${info.provenance.notice})`;
    }
    provenance.classList.toggle("synthetic", Boolean(info.synthetic));
    document.getElementById("footer-provenance").textContent = `Model ${info.name}: ${info.provenance_summary}`;
    document.getElementById("model-threshold").textContent = info.threshold === null
      ? `the most probable of ${info.labels.join(", ")}`
      : `${info.labels[1]} when its probability is at least ${percent(info.threshold)}`;
    document.getElementById("model-explain").textContent = info.can_explain
      ? "available: tick “Ask for heatmaps” before choosing images"
      : `not available (${info.explain_note || "this model has no heatmap output"})`;
    document.getElementById("explain-toggle").disabled = !info.can_explain;
  } catch (error) {
    const box = document.getElementById("model-error");
    box.hidden = false;
    box.textContent = `Could not read the model's description from the server: ${error.message}`;
  }
}

async function reason(response) {
  try {
    const body = await response.json();
    if (body && body.detail) return String(body.detail);
  } catch (ignored) { /* not JSON: fall through */ }
  return `the server answered ${response.status} ${response.statusText}`;
}

function isDicom(file) {
  return /\.(dcm|dicom)$/i.test(file.name) || file.type === "application/dicom";
}

function addFiles(files) {
  const list = document.getElementById("results");
  for (const file of files) {
    const card = makeCard(file);
    list.append(card.item);
    waiting.push({ file, card });
  }
  updateProgress();
  pump();
}

function makeCard(file) {
  const item = el("li", { class: "result", "data-status": "pending" });
  const picture = el("div", { class: "picture" });
  const status = el("p", { class: "meta", text: "Waiting…" });
  const body = el("div", { class: "body" }, el("h3", { text: file.name }), status);
  let thumbUrl = null;
  if (isDicom(file)) {
    picture.append(el("div", { class: "no-preview", text: "DICOM file: the browser cannot show a preview" }));
  } else {
    thumbUrl = URL.createObjectURL(file);
    const img = el("img", { class: "thumb", src: thumbUrl, alt: `Preview of ${file.name}` });
    img.addEventListener("error", () => {
      img.replaceWith(el("div", { class: "no-preview", text: "No preview: the browser cannot show this file" }));
    });
    picture.append(img);
  }
  item.append(picture, body);
  return { item, picture, body, status, thumbUrl };
}

function updateProgress() {
  const done = document.querySelectorAll('#results [data-status="ok"], #results [data-status="error"]').length;
  const total = document.querySelectorAll("#results [data-status]").length;
  document.getElementById("progress").textContent = total ? `${done} of ${total} images done` : "";
}

function pump() {
  while (running < PARALLEL && waiting.length) {
    const job = waiting.shift();
    running += 1;
    classify(job.file, job.card).finally(() => { running -= 1; updateProgress(); pump(); });
  }
}

async function classify(file, card) {
  card.status.textContent = "Analysing…";
  const explain = document.getElementById("explain-toggle").checked;
  for (let attempt = 0; ; attempt += 1) {
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), TIMEOUT_MS);
    let response;
    try {
      const form = new FormData();
      form.append("file", file, file.name);
      response = await fetch("/api/v1/predict" + (explain ? "?explain=1" : ""), {
        method: "POST", body: form, signal: controller.signal, cache: "no-store",
      });
    } catch (error) {
      return showError(card, controller.signal.aborted
        ? "No answer from the server within two minutes."
        : "Could not reach the server (is pneumoedge serve still running?).");
    } finally {
      clearTimeout(timer);
    }
    if (response.status === 503 && attempt < RETRIES_WHEN_BUSY) {
      const wait = Number(response.headers.get("Retry-After") || "1");
      card.status.textContent = `The server is busy; trying again in ${wait} s…`;
      await new Promise((resolve) => setTimeout(resolve, 1000 * wait));
      continue;
    }
    let body = null;
    try { body = await response.clone().json(); } catch (ignored) { /* handled below */ }
    const row = body && body.results && body.results[0];
    if (row && row.status === "ok") return showResult(card, row);
    if (row) return showError(card, `Could not read this file: ${row.error}`);
    if (response.status === 413) return showError(card, `This file is larger than the server accepts (${(model.info ? model.info.server.max_upload_bytes / 1048576 : 64).toFixed(0)} MB).`);
    if (response.status === 401) return showError(card, "The server needs its access token: reload the page and sign in.");
    return showError(card, `The server refused this file: ${await reason(response)}`);
  }
}

function showError(card, message) {
  card.item.dataset.status = "error";
  card.status.className = "error";
  card.status.setAttribute("role", "alert");
  card.status.textContent = message;
}

function showResult(card, row) {
  card.item.dataset.status = "ok";
  card.status.remove();
  const labels = Object.keys(row.probabilities);
  const bars = el("ul", { class: "bars", "aria-label": "Probability of each label" });
  for (const label of labels) {
    const p = row.probabilities[label];
    const fill = el("span");
    fill.style.width = `${(100 * p).toFixed(1)}%`;
    bars.append(el("li", { class: "bar-row" },
      el("span", { text: label }),
      el("span", { class: "bar", "aria-hidden": "true" }, fill),
      el("span", { text: percent(p) })));
  }
  if (row.ood === true) {
    // Unlike the training images: the warning leads, the label is only secondary information
    // (a confident label on an abdominal CT slice means nothing).
    card.item.classList.add("ood");
    card.body.append(
      el("p", { class: "ood-warning", role: "alert", text: "Unlike this model's training images: do not rely on this result." }),
      el("p", { class: "label secondary", text: `Model output, for reference only: ${row.label} (${percent(row.probability)})` }),
      bars);
  } else {
    card.body.append(
      el("p", { class: "label", text: `${row.label} (${percent(row.probability)})` }),
      bars);
  }
  if (row.threshold !== null && row.threshold !== undefined) {
    card.body.append(el("p", { class: "meta", text: `Threshold: ${labels[1]} when its probability is at least ${percent(row.threshold)}.` }));
  }
  if (row.disagreement !== null && row.disagreement >= DISAGREEMENT_HIGH) {
    card.body.append(el("p", { class: "warning", text:
      `The models in this ensemble disagree about this image (their probabilities differ by up to ${percent(row.disagreement)}): look at it closely.` }));
  } else if (row.disagreement !== null && Object.keys(row.member_probabilities).length > 1) {
    card.body.append(el("p", { class: "meta", text: `The ensemble's models agree (they differ by at most ${percent(row.disagreement)}).` }));
  }
  if (row.overlay) addHeatmapToggle(card, row.overlay);
  card.body.append(el("p", { class: "meta", text: "Decision support, not a diagnosis." }));
}

function addHeatmapToggle(card, overlayUrl) {
  const overlay = el("img", { class: "thumb", src: overlayUrl, alt: "Heatmap: where the model looked, over the X-ray", hidden: "" });
  card.picture.append(overlay);
  const original = card.picture.firstElementChild;
  const button = el("button", { type: "button", "aria-pressed": "false", text: "Show heatmap" });
  button.addEventListener("click", () => {
    const on = button.getAttribute("aria-pressed") !== "true";
    button.setAttribute("aria-pressed", String(on));
    button.textContent = on ? "Hide heatmap" : "Show heatmap";
    overlay.hidden = !on;
    if (original !== overlay) original.hidden = on;
  });
  const enlarge = el("button", { type: "button", text: "View heatmap full size" });
  enlarge.addEventListener("click", () => showLarge(overlayUrl, card.item.querySelector("h3").textContent));
  card.body.append(el("p", { class: "actions" }, button, enlarge));
}

function showLarge(url, name) {
  // One dialog for the page: the overlay at its own size (up to the window), legend readable.
  let dialog = document.getElementById("heatmap-dialog");
  if (!dialog) {
    dialog = el("dialog", { id: "heatmap-dialog", class: "large-view", "aria-labelledby": "heatmap-dialog-title" },
      el("h2", { id: "heatmap-dialog-title" }),
      el("img", { alt: "" }),
      el("p", {}, el("button", { type: "button", class: "close", text: "Close" })));
    dialog.querySelector(".close").addEventListener("click", () => dialog.close());
    dialog.addEventListener("click", (event) => { if (event.target === dialog) dialog.close(); });
    document.body.append(dialog);
  }
  dialog.querySelector("h2").textContent = `Heatmap of ${name}`;
  const img = dialog.querySelector("img");
  img.src = url;
  img.alt = `Heatmap of ${name}, full size: where the model looked, with its legend`;
  dialog.showModal();
}

function setUp() {
  const input = document.getElementById("file-input");
  input.addEventListener("change", () => { addFiles(Array.from(input.files)); input.value = ""; });
  const zone = document.getElementById("drop-zone");
  for (const name of ["dragenter", "dragover"]) {
    zone.addEventListener(name, (event) => { event.preventDefault(); zone.classList.add("dragging"); });
  }
  for (const name of ["dragleave", "drop"]) {
    zone.addEventListener(name, () => zone.classList.remove("dragging"));
  }
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    addFiles(Array.from(event.dataTransfer.files));
  });
  // A file dropped beside the zone must not navigate away from the page (and its results).
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());
  loadModel();
}

document.addEventListener("DOMContentLoaded", setUp);
