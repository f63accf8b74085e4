// The page: tabs, the model card that decides which views show, the API key, messages.
import { ApiError, getJSON, setApiKey } from "./api.js";
import { guarded, state } from "./ui.js";
import { setupGenerate } from "./generate.js";
import { setupChat } from "./chat.js";
import { setupInspect } from "./inspect.js";
import { setupClassify } from "./classify.js";

function setupKey() {
  const form = document.getElementById("key-form");
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    setApiKey(document.getElementById("api-key").value.trim());
    document.getElementById("api-key").value = "";
    form.hidden = true;
    boot();
  });
}

function selectTab(tab, focus = false) {
  for (const t of document.querySelectorAll('[role="tab"]')) {
    const selected = t === tab;
    t.setAttribute("aria-selected", String(selected));
    t.tabIndex = selected ? 0 : -1;
    document.getElementById(t.getAttribute("aria-controls")).hidden = !selected;
  }
  // One set of sampling controls, shared by Generate and Chat: it moves to the panel shown.
  const panel = document.getElementById(tab.getAttribute("aria-controls"));
  const sampling = document.getElementById("sampling");
  const buttons = panel.querySelector(".buttons");
  sampling.hidden = !["panel-generate", "panel-chat"].includes(panel.id);
  if (!sampling.hidden) buttons.before(sampling);
  if (focus) tab.focus();
  document.getElementById("alternatives").hidden = true;
}

function setupTabs() {
  const list = document.getElementById("tabs");
  list.addEventListener("click", (e) => {
    const tab = e.target.closest('[role="tab"]');
    if (tab) selectTab(tab);
  });
  list.addEventListener("keydown", (e) => {
    const tabs = [...list.querySelectorAll('[role="tab"]:not([hidden])')];
    const i = tabs.indexOf(document.activeElement);
    if (i < 0) return;
    const next = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: tabs.length - 1 }[e.key];
    if (next === undefined) return;
    e.preventDefault();
    selectTab(tabs[(next + tabs.length) % tabs.length], true);
  });
}

function showViews(card) {
  const lm = !card || card.kind === "language_model";
  const views = { generate: lm, chat: lm && card && card.chat, inspect: lm && !!card, classify: card && card.kind === "classifier" };
  for (const [name, on] of Object.entries(views)) document.getElementById(`tab-${name}`).hidden = !on;
  const current = document.querySelector('[role="tab"][aria-selected="true"]');
  if (current.hidden) selectTab(document.querySelector('[role="tab"]:not([hidden])'));
}

async function boot() {
  await guarded(async () => {
    const models = await getJSON("/v1/models");
    state.model = models.data[0].id;
    document.getElementById("model-name").textContent = state.model;
    try {
      state.card = await getJSON("/v1/model_card");
    } catch (err) {
      if (!(err instanceof ApiError) || err.status !== 404) throw err;
      state.card = null; // a model the page cannot look inside: Generate only
    }
    showViews(state.card);
    document.dispatchEvent(new CustomEvent("model-ready", { detail: state }));
    document.body.dataset.ready = "true";
  });
}

setupTabs();
setupKey();
setupGenerate();
setupChat();
setupInspect();
setupClassify();
boot();
