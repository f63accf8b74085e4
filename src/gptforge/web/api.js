// Talking to the server that served this page (same origin only): JSON calls, server-sent
// events, the API key (kept in sessionStorage: this tab only), and errors as readable messages.

const KEY = "gptforge-api-key";

export class ApiError extends Error {
  constructor(message, status = 0, body = null) {
    super(message);
    this.status = status;
    this.body = body;
  }
}

export function apiKey() {
  return sessionStorage.getItem(KEY) || "";
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY, key);
  else sessionStorage.removeItem(KEY);
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = apiKey();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

const GONE = "The server stopped answering (connection lost). Is `gptforge serve` still running?";

async function send(method, path, body, signal) {
  let response;
  try {
    response = await fetch(path, { method, headers: headers(), body: body === undefined ? undefined : JSON.stringify(body), signal });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(GONE);
  }
  if (!response.ok) throw await errorOf(response);
  return response;
}

async function errorOf(response) {
  let data = null;
  try {
    data = await response.json();
  } catch {
    // not JSON: described by the status below
  }
  const detail = data && data.error && data.error.message;
  if (response.status === 401) {
    const why = detail ? ` (${detail})` : "";
    return new ApiError(`This server needs an API key${why}: enter it above.`, 401, data);
  }
  return new ApiError(detail || `The server answered ${response.status} ${response.statusText}.`, response.status, data);
}

export async function getJSON(path) {
  return (await send("GET", path)).json();
}

export async function postJSON(path, body, signal) {
  return (await send("POST", path, body, signal)).json();
}

// POST a streaming request; calls onEvent(data) for each server-sent event until [DONE].
// Resolves normally at [DONE]; a stream that ends without it (the server went away) is an ApiError.
export async function postStream(path, body, onEvent, signal) {
  const response = await send("POST", path, { ...body, stream: true }, signal);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    let chunk;
    try {
      chunk = await reader.read();
    } catch (err) {
      if (err.name === "AbortError") throw err;
      throw new ApiError(GONE);
    }
    if (chunk.done) throw new ApiError(`${GONE} The answer was cut off.`);
    buffer += decoder.decode(chunk.value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      const parsed = JSON.parse(data);
      if (parsed.error) throw new ApiError(parsed.error.message, 500, parsed);
      onEvent(parsed);
    }
  }
}
