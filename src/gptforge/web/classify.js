// Classify: texts in (one per line), each text's label probabilities as bars, through POST
// /classify (vLLM's shape: {input: [texts]} -> {data: [{index, label, probs}]}).
import { postJSON } from "./api.js";
import { bars } from "./chips.js";
import { guarded, showMessage, state } from "./ui.js";

const $ = (id) => document.getElementById(id);

async function classify() {
  const texts = $("classify-input").value.split("\n").filter((t) => t.trim());
  if (!texts.length) return showMessage("Write at least one text to classify (one per line).");
  const result = await postJSON("/classify", { model: state.model, input: texts });
  const labels = (state.card && state.card.labels) || [];
  const out = $("classify-results");
  out.replaceChildren();
  const rows = [];
  for (const item of result.data) {
    const text = texts[item.index];
    const figure = document.createElement("figure");
    figure.className = "classified";
    figure.dataset.label = item.label;
    figure.dataset.text = text;
    const caption = document.createElement("figcaption");
    caption.textContent = `${text} → ${item.label}`;
    const list = document.createElement("ol");
    list.className = "bars";
    list.setAttribute("aria-label", `Label probabilities for: ${text}`);
    const names = item.probs.map((_, i) => labels[i] || `label ${i}`);
    bars(list, item.probs.map((p, i) => ({ label: names[i], prob: p, data: { label: names[i] } })), names.indexOf(item.label), "predicted");
    figure.append(caption, list);
    out.append(figure);
    rows.push({ text, label: item.label, probs: Object.fromEntries(names.map((n, i) => [n, item.probs[i]])) });
  }
  $("classify-data").textContent = JSON.stringify(rows);
}

export function setupClassify() {
  $("classify").addEventListener("click", () => guarded(classify));
}
