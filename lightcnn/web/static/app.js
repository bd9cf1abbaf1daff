// lightcnn's comparison page: plain JS, no framework, no network access beyond this server.
// Every text that comes from a file name or the server goes through textContent, never innerHTML.
"use strict";

const token = new URLSearchParams(location.search).get("token");
const state = { models: [], files: [] };
const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "text") node.textContent = value;
    else if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

async function api(path, body) {
  const headers = token ? { Authorization: "Bearer " + token } : {};
  const response = await fetch(path, body ? { method: "POST", body, headers } : { headers });
  let data = null;
  try { data = await response.json(); } catch (e) { /* not JSON: reported below */ }
  if (!response.ok) throw new Error((data && data.error) || `HTTP ${response.status}`);
  return data;
}

const fmt = {
  count: (n) => n >= 1e9 ? (n / 1e9).toFixed(2) + " G" : n >= 1e6 ? (n / 1e6).toFixed(2) + " M" : n.toLocaleString(),
  ms: (x) => x >= 100 ? x.toFixed(0) + " ms" : x.toFixed(1) + " ms",
  num: (x) => x === null || x === undefined ? "–" : typeof x === "number" ? x.toFixed(3) : String(x),
};

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

// -- models ---------------------------------------------------------------------------------------------------

function modelCard(m) {
  const rows = [
    ["architecture", m.arch], ["parameters", fmt.count(m.params)], ["MACs", fmt.count(m.macs)],
    ["input", m.input_shape.join(" × ")], ["weights", m.weights],
  ];
  const table = el("table", { class: "facts" });
  for (const [k, v] of rows) table.append(el("tr", {}, el("th", { text: k }), el("td", { text: v })));
  table.append(el("tr", {}, el("th", { text: "SHA-256" }), el("td", { class: "hash", text: m.weights_sha256 || "–" })));
  const more = m.num_classes - m.classes.length;
  const classes = m.classes.join(", ") + (more > 0 ? `, … and ${more} more` : "");
  table.append(el("tr", {}, el("th", { text: `classes (${m.num_classes})` }), el("td", { class: "classes", text: classes })));
  if (m.operating_point) {
    table.append(el("tr", {}, el("th", { text: "operating point" }),
      el("td", { text: `${m.operating_point.positive} when P ≥ ${m.operating_point.threshold.toFixed(4)}` })));
  }
  const card = el("details", { class: "model-card", "data-model": m.name }, el("summary", { text: m.name }), table);
  if (m.metrics) {
    const splits = Object.keys(m.metrics);
    const keys = [...new Set(splits.flatMap((s) => Object.keys(m.metrics[s] || {})))]
      .filter((k) => splits.some((s) => typeof m.metrics[s][k] === "number"));
    const mt = el("table", { class: "metrics" }, el("tr", {}, el("th", { text: "split" }),
      ...keys.map((k) => el("th", { text: k }))));
    for (const s of splits) mt.append(el("tr", {}, el("th", { text: s }), ...keys.map((k) => el("td", { text: fmt.num(m.metrics[s][k]) }))));
    card.append(el("h4", { text: "fine-tuning metrics" + (m.training && m.training.best_epoch ? ` (best epoch ${m.training.best_epoch})` : "") }), mt);
  }
  return card;
}

async function loadModels() {
  try {
    state.models = await api("api/models");
  } catch (e) {
    setStatus("Could not list the models: " + e.message, true);
    return;
  }
  const list = $("model-list");
  list.querySelectorAll("p, label").forEach((n) => n.remove());
  state.models.forEach((m, i) => {
    const box = el("input", { type: "checkbox", name: "model", value: m.name });
    box.checked = i === 0;
    box.addEventListener("change", () => { if (state.files.length) run(); });
    list.append(el("label", { class: "model-choice" }, box, " " + m.name));
  });
  $("model-cards").replaceChildren(...state.models.map(modelCard));
  $("run").disabled = false;
}

const chosenModels = () => [...document.querySelectorAll('#model-list input[name="model"]:checked')].map((b) => b.value);
const modelInfo = (name) => state.models.find((m) => m.name === name);

// -- results --------------------------------------------------------------------------------------------------

function camFigure(cam) {
  const fig = el("div", { class: "cam" });
  const base = el("img", { class: "cam-base", alt: "model input", src: cam.image });
  const heat = el("img", { class: "cam-heat", alt: `${cam.method} map of ${cam.class}`, src: cam.heatmap });
  fig.append(base, heat);
  return fig;
}

function camBlock(result, file) {
  const info = modelInfo(result.model);
  const block = el("div", { class: "cam-block" });
  const fig = camFigure(result.cam);
  const opacity = el("input", { type: "range", min: "0", max: "100", value: "50", "aria-label": "map opacity" });
  const applyOpacity = () => { fig.querySelector(".cam-heat").style.opacity = opacity.value / 100; };
  opacity.addEventListener("input", applyOpacity);
  const layer = el("select", { "aria-label": "Grad-CAM layer" });
  const def = info.cam.method === "cam" ? "default: CAM" : `default: Grad-CAM at ${info.cam.layer}`;
  layer.append(el("option", { value: "", text: def }));
  for (const name of info.cam.layers) layer.append(el("option", { value: name, text: "Grad-CAM at " + name }));
  const caption = el("p", { class: "muted cam-caption" });
  const describe = (cam) => {
    caption.textContent = `${cam.method === "cam" ? "CAM" : "Grad-CAM"} of “${cam.class}” at ${cam.layer} ` +
      `(${cam.map_shape.join("×")}), ${fmt.ms(cam.ms)}`;
  };
  describe(result.cam);
  layer.addEventListener("change", async () => {
    caption.textContent = "computing…";
    try {
      const [again] = await predictFile(file, [result.model], layer.value);
      if (again.error) throw new Error(again.error);
      fig.replaceChildren(...camFigure(again.cam).children);
      applyOpacity();
      describe(again.cam);
    } catch (e) {
      caption.textContent = e.message;
    }
  });
  applyOpacity();
  block.append(fig, el("div", { class: "cam-controls" },
    el("label", {}, "layer ", layer), el("label", {}, "opacity ", opacity)), caption);
  return block;
}

function resultCell(result, file) {
  const cell = el("article", { class: "cell", "data-model": result.model || "" });
  cell.append(el("h3", { text: result.model || "image" }));
  if (result.error) {
    cell.classList.add("failed");
    cell.append(el("p", { class: "error", text: result.error }));
    return cell;
  }
  cell.dataset.top1 = result.topk[0].label;
  if (result.decision) {
    const d = result.decision;
    cell.append(el("p", { class: "decision" }, el("strong", { text: d.label }),
      ` (operating point: ${d.positive} when P ≥ ${d.threshold.toFixed(4)})`));
  }
  const list = el("ol", { class: "topk" });
  result.topk.forEach((p, i) => {
    const bar = el("span", { class: "bar" });
    bar.style.width = (100 * p.score).toFixed(1) + "%";
    list.append(el("li", { class: i === 0 ? "top1" : "" }, el("span", { class: "label", text: p.label }),
      el("span", { class: "score", text: p.score.toFixed(4) }), bar));
  });
  cell.append(list);
  if (result.cam) cell.append(camBlock(result, file));
  cell.append(el("p", { class: "muted timing", text: `inference ${fmt.ms(result.inference_ms)} · ` +
    `preprocess ${fmt.ms(result.preprocess_ms)} · decode ${fmt.ms(result.decode_ms)} · ${result.engine}` }));
  return cell;
}

function predictFile(file, models, layer) {
  const form = new FormData();
  form.append("file", file, file.name);
  for (const m of models) form.append("model", m);
  form.append("topk", $("topk").value || "5");
  form.append("cam", $("want-cam").checked ? "1" : "0");
  if (layer) form.append("layer", layer);
  return api("api/predict", form);
}

let runId = 0;
async function run() {
  const models = chosenModels();
  if (!state.files.length) { setStatus("Pick or drop one or more images first."); return; }
  if (!models.length) { setStatus("Tick at least one model."); return; }
  const mine = ++runId;
  const results = $("results");
  results.replaceChildren();
  let done = 0;
  for (const file of state.files) {
    if (mine !== runId) return;   // a newer run started: stop filling this one
    setStatus(`Running ${models.length} model(s) on ${file.name} (${done + 1}/${state.files.length})…`);
    const row = el("section", { class: "row", "data-file": file.name }, el("h2", { text: file.name }));
    const cells = el("div", { class: "cells" });
    row.append(cells);
    results.append(row);
    try {
      const answer = await predictFile(file, models);
      if (mine !== runId) return;
      for (const result of answer) cells.append(resultCell(result, file));
    } catch (e) {
      cells.append(el("p", { class: "error", text: e.message }));
    }
    done += 1;
  }
  if (mine === runId) {
    setStatus(`Done: ${done} image(s) × ${models.length} model(s).`);
    results.dataset.done = String(mine);
  }
}

// -- input ----------------------------------------------------------------------------------------------------

function takeFiles(list) {
  state.files = [...list];
  if (state.files.length) run();
}

$("files").addEventListener("change", (e) => takeFiles(e.target.files));
$("run").addEventListener("click", run);
const drop = $("drop");
for (const type of ["dragenter", "dragover"]) {
  drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); });
}
for (const type of ["dragleave", "drop"]) {
  drop.addEventListener(type, () => drop.classList.remove("over"));
}
drop.addEventListener("drop", (e) => { e.preventDefault(); takeFiles(e.dataTransfer.files); });
loadModels();
