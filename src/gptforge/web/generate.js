// Generate: streamed completions as token chips, and Step mode (one token at a time, with the
// distribution it was drawn from). Greedy at temperature 0, as the API.
import { postJSON, postStream } from "./api.js";
import { bars, chip, completionEntries, enableAlternatives, percent } from "./chips.js";
import { guarded, showMessage, state } from "./ui.js";

const $ = (id) => document.getElementById(id);

function number(id, { min = -Infinity, max = Infinity, integer = false, name }) {
  const raw = $(id).value.trim();
  const value = Number(raw);
  if (raw === "" || Number.isNaN(value) || value < min || value > max || (integer && !Number.isInteger(value))) {
    const range = max === Infinity ? `at least ${min}` : `between ${min} and ${max}`;
    throw new Error(`${name} must be ${integer ? "a whole number " : "a number "}${range}, got "${raw}".`);
  }
  return value;
}

export function sampling() {
  return {
    temperature: number("temperature", { min: 0, max: 2, name: "Temperature" }),
    top_k: number("top-k", { min: 0, integer: true, name: "Top-k" }),
    top_p: number("top-p", { min: 0.01, max: 1, name: "Top-p" }),
    max_tokens: number("max-tokens", { min: 1, integer: true, name: "Max tokens" }),
    seed: number("seed", { min: 0, integer: true, name: "Seed" }),
  };
}

const EMPTY = "Write a prompt first: the Prompt box is empty.";
let controller = null;
let stepState = null; // {prompt, ids, count}
let record = { mode: null, text: "", tokens: [] };

function publish() {
  $("generate-data").textContent = JSON.stringify(record);
  $("gen-output").dataset.text = record.text;
}

function reset(mode) {
  $("gen-output").replaceChildren();
  $("step-figure").hidden = mode !== "step";
  record = { mode, text: "", tokens: [], finish_reason: null };
  publish();
}

function busy(on) {
  $("generate").disabled = on;
  $("step").disabled = on;
  $("gen-stop").disabled = !on;
}

async function generate() {
  const prompt = $("prompt").value;
  if (!prompt.trim()) return showMessage(EMPTY);
  const s = sampling();
  reset("generate");
  stepState = null;
  controller = new AbortController();
  busy(true);
  const body = { model: state.model, prompt, max_tokens: s.max_tokens, temperature: s.temperature, top_p: s.top_p, seed: s.seed, logprobs: 5 };
  if (s.top_k > 0) body.top_k = s.top_k;
  const out = $("gen-output");
  try {
    await postStream("/v1/completions", body, (event) => {
      const choice = event.choices[0];
      if (!choice) return;
      record.text += choice.text;
      for (const entry of completionEntries(choice.logprobs)) {
        record.tokens.push(entry);
        out.append(chip(entry));
      }
      if (choice.finish_reason) record.finish_reason = choice.finish_reason;
      publish();
    }, controller.signal);
  } finally {
    if (controller.signal.aborted) record.finish_reason = "stopped";
    publish();
    controller = null;
    busy(false);
  }
}

async function step() {
  const prompt = $("prompt").value;
  if (!prompt.trim()) return showMessage(EMPTY);
  if (!state.card) return showMessage("Step needs the inspect endpoint, which this model does not offer.");
  const s = sampling();
  if (!stepState || stepState.prompt !== prompt) {
    const tokenized = await postJSON("/tokenize", { model: state.model, prompt });
    stepState = { prompt, ids: tokenized.tokens, count: 0 };
    reset("step");
  }
  const limit = state.card.inspect_max_tokens;
  if (stepState.ids.length >= limit) {
    return showMessage(`Step mode looks at ${limit} tokens at most, and the text has reached that: change the prompt to start again.`);
  }
  busy(true);
  try {
    const next = { temperature: s.temperature, top_p: s.top_p, seed: s.seed + stepState.count, top: 20 };
    if (s.top_k > 0) next.top_k = s.top_k;
    const result = await postJSON("/v1/inspect", { model: state.model, prompt: stepState.ids, attention_layers: [], logit_lens_top_k: 0, next_token: next });
    const { chosen, top } = result.next_token;
    const index = top.findIndex((t) => t.id === chosen.id);
    const prob = index >= 0 ? top[index].prob : 0;
    bars($("step-chart"), top.map((t) => ({ label: t.text, prob: t.prob, data: { tokenId: t.id, token: t.text } })), index);
    $("step-caption").textContent = `Step ${stepState.count + 1}: next-token distribution (top ${top.length}, after temperature, top-k and top-p); chosen: "${chosen.text}" ${percent(prob)}`;
    const entry = { token: chosen.text, id: chosen.id, logprob: Math.log(prob), top: top.slice(0, 5).map((t) => ({ token: t.text, logprob: Math.log(t.prob) })) };
    stepState.ids.push(chosen.id);
    stepState.count += 1;
    record.text += chosen.text;
    record.tokens.push(entry);
    record.step = { ids: stepState.ids.slice(), distribution: top, chosen };
    $("gen-output").append(chip(entry));
    publish();
  } finally {
    busy(false);
  }
}

export function setupGenerate() {
  $("generate").addEventListener("click", () => guarded(generate));
  $("step").addEventListener("click", () => guarded(step));
  $("gen-stop").addEventListener("click", () => controller && controller.abort());
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) guarded(generate);
  });
  enableAlternatives($("gen-output"));
}
