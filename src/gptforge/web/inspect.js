// Inspect: a prompt's tokens and ids, the attention of a layer (one head as a heatmap, all heads
// as small multiples), the logit lens, and the model card. What is drawn is in #inspect-data.
import { postJSON } from "./api.js";
import { percent, visible } from "./chips.js";
import { guarded, showMessage, state } from "./ui.js";

const $ = (id) => document.getElementById(id);
let data = null; // the last inspection: {prompt, tokens, attention: {layer, heads}, logit_lens, shapes}

function publish() {
  const view = data && { ...data, layer: Number($("layer").value), head: Number($("head").value) };
  $("inspect-data").textContent = JSON.stringify(view || {});
}

function paint(canvas, weights, size) {
  const t = weights.length;
  const cell = Math.max(1, Math.floor(size / t));
  canvas.width = canvas.height = cell * t;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  for (let q = 0; q < t; q++) {
    for (let k = 0; k <= q; k++) {
      ctx.fillStyle = `rgba(29, 78, 216, ${weights[q][k]})`;
      ctx.fillRect(k * cell, q * cell, cell, cell);
    }
  }
  return cell;
}

function drawAttention() {
  if (!data) return;
  const heads = data.attention.heads;
  const head = Number($("head").value);
  const canvas = $("heatmap");
  canvas.hidden = false;
  const cell = paint(canvas, heads[head], Math.min(480, document.documentElement.clientWidth - 40));
  canvas.dataset.layer = String(data.attention.layer);
  canvas.dataset.head = String(head);
  canvas.dataset.cell = String(cell);
  canvas.setAttribute("aria-label", `Attention weights of layer ${data.attention.layer}, head ${head}: rows are query positions, columns the positions they attend to`);
  const grid = $("heads-grid");
  grid.replaceChildren();
  heads.forEach((w, h) => {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "head";
    button.setAttribute("aria-label", `Head ${h}`);
    button.setAttribute("aria-pressed", String(h === head));
    const small = document.createElement("canvas");
    paint(small, w, 96);
    const label = document.createElement("span");
    label.textContent = `head ${h}`;
    button.append(small, label);
    button.addEventListener("click", () => {
      $("head").value = String(h);
      drawAttention();
      publish();
    });
    grid.append(button);
  });
}

function readout(event) {
  if (!data) return;
  const canvas = $("heatmap");
  const cell = Number(canvas.dataset.cell);
  const rect = canvas.getBoundingClientRect();
  const k = Math.floor(((event.clientX - rect.left) * (canvas.width / rect.width)) / cell);
  const q = Math.floor(((event.clientY - rect.top) * (canvas.height / rect.height)) / cell);
  const row = data.attention.heads[Number($("head").value)][q];
  if (!row || k > q) return (canvas.title = "");
  canvas.title = `"${visible(data.tokens[q].text)}" (position ${q}) attends to "${visible(data.tokens[k].text)}" (position ${k}): ${percent(row[k])}`;
}

function drawTokens() {
  const list = $("inspect-tokens");
  list.replaceChildren();
  data.tokens.forEach((tok, i) => {
    const li = document.createElement("li");
    li.className = "token";
    li.dataset.tokenId = String(tok.id);
    li.dataset.position = String(i);
    const text = document.createElement("span");
    text.textContent = visible(tok.text);
    const id = document.createElement("small");
    id.textContent = String(tok.id);
    li.append(text, id);
    list.append(li);
  });
}

function drawLens() {
  const table = $("lens");
  table.replaceChildren();
  const caption = table.createCaption();
  caption.textContent = "Top token per layer (rows) and position (columns)";
  const head = table.createTHead().insertRow();
  const corner = document.createElement("th");
  corner.textContent = "layer";
  head.append(corner);
  for (const tok of data.tokens) {
    const th = document.createElement("th");
    th.scope = "col";
    th.textContent = visible(tok.text);
    head.append(th);
  }
  const body = table.createTBody();
  for (const layer of [...data.logit_lens].reverse()) {
    const row = body.insertRow();
    const th = document.createElement("th");
    th.scope = "row";
    th.textContent = String(layer.layer);
    row.append(th);
    layer.positions.forEach((top, position) => {
      const cell = row.insertCell();
      const best = top[0];
      cell.dataset.layer = String(layer.layer);
      cell.dataset.position = String(position);
      cell.dataset.tokenId = String(best.id);
      cell.dataset.prob = String(best.prob);
      cell.style.setProperty("--p", best.prob.toFixed(3));
      cell.title = top.map((t) => `${visible(t.text)} ${percent(t.prob)}`).join("\n");
      cell.textContent = `${visible(best.text)} ${percent(best.prob)}`;
    });
  }
}

function table(rows, headings) {
  const t = document.createElement("table");
  const h = t.createTHead().insertRow();
  for (const name of headings) {
    const th = document.createElement("th");
    th.textContent = name;
    h.append(th);
  }
  const body = t.createTBody();
  for (const cells of rows) {
    const r = body.insertRow();
    cells.forEach((c, i) => {
      const cell = i === 0 ? document.createElement("th") : r.insertCell();
      if (i === 0) r.append(cell);
      cell.textContent = typeof c === "number" ? c.toLocaleString("en") : String(c);
    });
  }
  const scroll = document.createElement("div");
  scroll.className = "scroll";
  scroll.append(t);
  return scroll;
}

function drawCard(card) {
  const box = $("card");
  box.replaceChildren();
  const config = Object.entries(card.config).map(([k, v]) => [k, v === null ? "none" : typeof v === "object" ? JSON.stringify(v) : v]);
  const counts = card.parameter_counts;
  const parts = Object.keys(counts.tied).map((k) => [k.replace(/_/g, " "), counts.tied[k], counts.untied[k]]);
  const summary = document.createElement("p");
  summary.textContent = `${card.id}: ${card.kind.replace("_", " ")}, ${card.parameters.toLocaleString("en")} parameters as served (${card.tied_weights ? "head tied to the token embedding" : "head not tied"}), ${card.dtype}.`;
  const flow = document.createElement("p");
  flow.className = "flow";
  flow.textContent = `"${card.example}": ` + card.shapes.map((s) => `[${s.shape.join(", ")}]`).join(" → ");
  const h3a = document.createElement("h3");
  h3a.textContent = "Config";
  const h3b = document.createElement("h3");
  h3b.textContent = "Parameters by component";
  const h3c = document.createElement("h3");
  h3c.textContent = "Tensor shapes through one forward pass";
  box.append(summary, h3a, table(config, ["key", "value"]), h3b, table(parts, ["component", "head tied", "head untied"]),
    h3c, flow, table(card.shapes.map((s) => [s.name, `[${s.shape.join(", ")}]`]), ["tensor", "shape"]));
}

async function inspect() {
  const prompt = $("inspect-prompt").value;
  if (!prompt.trim()) return showMessage("Write some text to inspect first: the box is empty.");
  const layer = Number($("layer").value);
  const result = await postJSON("/v1/inspect", { model: state.model, prompt, attention_layers: [layer], logit_lens_top_k: 5 });
  data = { prompt, tokens: result.tokens, attention: result.attention[0], logit_lens: result.logit_lens, shapes: result.shapes };
  drawTokens();
  drawAttention();
  drawLens();
  publish();
}

async function changeLayer() {
  if (!data) return;
  const layer = Number($("layer").value);
  const result = await postJSON("/v1/inspect", { model: state.model, prompt: data.tokens.map((t) => t.id), attention_layers: [layer], logit_lens_top_k: 0 });
  data.attention = result.attention[0];
  drawAttention();
  publish();
}

function options(select, count, label) {
  select.replaceChildren();
  for (let i = 0; i < count; i++) {
    const option = document.createElement("option");
    option.value = String(i);
    option.textContent = `${label} ${i}`;
    select.append(option);
  }
}

export function setupInspect() {
  $("inspect").addEventListener("click", () => guarded(inspect));
  $("layer").addEventListener("change", () => guarded(changeLayer));
  $("head").addEventListener("change", () => { drawAttention(); publish(); });
  $("heatmap").addEventListener("mousemove", readout);
  document.addEventListener("model-ready", () => {
    const card = state.card;
    if (!card) return;
    options($("layer"), card.config.n_layers, "layer");
    $("layer").value = String(card.config.n_layers - 1);
    options($("head"), card.config.n_heads, "head");
    drawCard(card);
  });
}
