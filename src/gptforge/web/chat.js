// Chat: multi-turn, streamed, with a system prompt; token chips where the server returns chat
// logprobs (OpenAI's logprobs.content), plain text where it does not; Stop cancels the request.
import { ApiError, postStream } from "./api.js";
import { chatEntries, chip, enableAlternatives } from "./chips.js";
import { sampling } from "./generate.js";
import { guarded, showMessage, state } from "./ui.js";

const $ = (id) => document.getElementById(id);
let history = [];
let controller = null;
let withLogprobs = true; // until the server says it does not give them on chat

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  div.dataset.role = role;
  div.dataset.text = text;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "You" : "Model";
  const body = document.createElement("div");
  body.className = "chips body";
  body.textContent = text;
  div.append(who, body);
  $("chat-log").append(div);
  return div;
}

function busy(on) {
  $("chat-send").disabled = on;
  $("chat-stop").disabled = !on;
}

async function ask(messages, s, reply) {
  const body = { model: state.model, messages, temperature: s.temperature, top_p: s.top_p, seed: s.seed, max_tokens: s.max_tokens };
  if (s.top_k > 0) body.top_k = s.top_k;
  if (withLogprobs) Object.assign(body, { logprobs: true, top_logprobs: 5 });
  const out = reply.querySelector(".body");
  await postStream("/v1/chat/completions", body, (event) => {
    const choice = event.choices[0];
    if (!choice) return;
    const text = (choice.delta && choice.delta.content) || "";
    const entries = chatEntries(choice.logprobs);
    if (entries.length) for (const e of entries) out.append(chip(e));
    else if (text) out.append(document.createTextNode(text));
    reply.dataset.text += text;
    if (choice.finish_reason) reply.dataset.finishReason = choice.finish_reason;
  }, controller.signal);
}

async function send() {
  const text = $("chat-input").value;
  if (!text.trim()) return showMessage("Write a message first: the Message box is empty.");
  const s = sampling();
  const system = $("system-prompt").value.trim();
  history.push({ role: "user", content: text });
  bubble("user", text);
  $("chat-input").value = "";
  const messages = (system ? [{ role: "system", content: system }] : []).concat(history);
  const reply = bubble("assistant", "");
  controller = new AbortController();
  busy(true);
  try {
    try {
      await ask(messages, s, reply);
    } catch (err) {
      if (!(withLogprobs && err instanceof ApiError && err.status === 400 && err.body && err.body.error.param === "logprobs")) throw err;
      withLogprobs = false; // this server gives no chat logprobs: plain text instead of chips
      await ask(messages, s, reply);
    }
  } catch (err) {
    if (err.name === "AbortError") reply.dataset.finishReason = "stopped";
    else throw err;
  } finally {
    history.push({ role: "assistant", content: reply.dataset.text });
    controller = null;
    busy(false);
  }
}

export function setupChat() {
  $("chat-send").addEventListener("click", () => guarded(send));
  $("chat-stop").addEventListener("click", () => controller && controller.abort());
  $("chat-clear").addEventListener("click", () => {
    history = [];
    $("chat-log").replaceChildren();
  });
  $("chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      guarded(send);
    }
  });
  enableAlternatives($("chat-log"));
}
