// What every view shares: the served model, messages in the page, and running an action safely.
import { ApiError } from "./api.js";

export const state = { model: null, card: null };

export function showMessage(text, kind = "error") {
  const box = document.getElementById("message");
  box.textContent = text;
  box.dataset.kind = kind;
  box.hidden = !text;
}

export function clearMessage() {
  showMessage("");
}

// Runs an action of the page: any failure becomes a message in the page (never a console error).
export async function guarded(action) {
  clearMessage();
  try {
    return await action();
  } catch (err) {
    if (err.name === "AbortError") return undefined;
    if (err instanceof ApiError && err.status === 401) askForKey();
    showMessage(err instanceof ApiError ? err.message : `Something went wrong in the page: ${err.message}`);
    return undefined;
  }
}

export function askForKey() {
  const form = document.getElementById("key-form");
  form.hidden = false;
  document.getElementById("api-key").focus();
}

