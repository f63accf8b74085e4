// Token chips (shaded by probability, alternatives on hover or focus) and bar charts. Every number
// drawn is also in a data attribute, so the page's data can be read without reading pixels.

export function visible(text) {
  // A token as a label: whitespace a reader should see ("\n" as ↵, edge spaces kept), on one line.
  return text.replace(/\n/g, "↵").replace(/^ /, "\u00a0").replace(/ $/, "\u00a0") || "∅";
}

function flowing(text) {
  // A token inside flowing text: its line breaks shown and kept.
  return visible(text).replace(/↵/g, "↵\n");
}

export function percent(p) {
  if (p >= 0.995) return `${(100 * p).toFixed(0)}%`;
  return p >= 0.001 ? `${(100 * p).toFixed(1)}%` : `${(100 * p).toPrecision(1)}%`;
}

// entry: {token, logprob, top: [{token, logprob}] | null, id?}
export function chip(entry) {
  const el = document.createElement("span");
  const prob = Math.exp(entry.logprob);
  el.className = "chip";
  el.tabIndex = 0;
  el.textContent = flowing(entry.token);
  el.dataset.token = entry.token;
  el.dataset.prob = String(prob);
  el.dataset.logprob = String(entry.logprob);
  if (entry.id !== undefined) el.dataset.tokenId = String(entry.id);
  el.dataset.alternatives = JSON.stringify(entry.top || []);
  el.style.setProperty("--p", prob.toFixed(3));
  el.setAttribute("aria-describedby", "alternatives");
  el.setAttribute("aria-label", `${entry.token} (${percent(prob)})`);
  return el;
}

let shownFor = null;

function showAlternatives(el) {
  const box = document.getElementById("alternatives");
  const top = JSON.parse(el.dataset.alternatives || "[]");
  box.replaceChildren();
  const title = document.createElement("strong");
  title.textContent = `${visible(el.dataset.token)}: ${percent(Number(el.dataset.prob))}`;
  box.append(title);
  if (top.length) {
    const list = document.createElement("ol");
    for (const alt of top) {
      const li = document.createElement("li");
      li.dataset.token = alt.token;
      li.dataset.logprob = String(alt.logprob);
      li.textContent = `${visible(alt.token)} ${percent(Math.exp(alt.logprob))}`;
      list.append(li);
    }
    box.append(list);
  } else {
    const none = document.createElement("p");
    none.textContent = "no alternatives returned";
    box.append(none);
  }
  const rect = el.getBoundingClientRect();
  box.hidden = false;
  const left = Math.min(window.scrollX + rect.left, window.scrollX + document.documentElement.clientWidth - box.offsetWidth - 4);
  box.style.left = `${Math.max(window.scrollX + 4, left)}px`;
  box.style.top = `${window.scrollY + rect.bottom + 4}px`;
  shownFor = el;
}

function hideAlternatives(el) {
  if (el && el !== shownFor) return;
  document.getElementById("alternatives").hidden = true;
  shownFor = null;
}

// Alternatives for every chip in `container`, now and later (event delegation).
export function enableAlternatives(container) {
  const chipOf = (event) => event.target.closest && event.target.closest(".chip[data-alternatives]");
  container.addEventListener("mouseover", (e) => { const c = chipOf(e); if (c) showAlternatives(c); });
  container.addEventListener("mouseout", (e) => { const c = chipOf(e); if (c) hideAlternatives(c); });
  container.addEventListener("focusin", (e) => { const c = chipOf(e); if (c) showAlternatives(c); });
  container.addEventListener("focusout", (e) => { const c = chipOf(e); if (c) hideAlternatives(c); });
  container.addEventListener("keydown", (e) => { if (e.key === "Escape") hideAlternatives(); });
}

// Completions' logprobs (one entry per token: top_logprobs a {token: logprob} map) or chat's
// (logprobs.content: [{token, logprob, top_logprobs: [{token, logprob}]}]) as chip entries.
export function completionEntries(lp) {
  if (!lp || !lp.tokens) return [];
  return lp.tokens.map((token, i) => ({
    token,
    logprob: lp.token_logprobs[i],
    top: lp.top_logprobs && lp.top_logprobs[i]
      ? Object.entries(lp.top_logprobs[i]).map(([t, l]) => ({ token: t, logprob: l })).sort((a, b) => b.logprob - a.logprob)
      : null,
  }));
}

export function chatEntries(lp) {
  if (!lp || !lp.content) return [];
  return lp.content.map((c) => ({
    token: c.token,
    logprob: c.logprob,
    top: (c.top_logprobs || []).map((t) => ({ token: t.token, logprob: t.logprob })),
  }));
}

// A horizontal bar chart: items [{label, prob, data}], `chosen` (an index) marked with `mark`.
export function bars(list, items, chosen = -1, mark = "chosen") {
  list.replaceChildren();
  const max = Math.max(...items.map((i) => i.prob), 1e-9);
  items.forEach((item, index) => {
    const li = document.createElement("li");
    li.className = "bar";
    li.dataset.prob = String(item.prob);
    for (const [k, v] of Object.entries(item.data || {})) li.dataset[k] = String(v);
    if (index === chosen) {
      li.dataset.chosen = "true";
      li.classList.add("chosen");
    }
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = visible(item.label) + (index === chosen ? ` ◀ ${mark}` : "");
    const track = document.createElement("span");
    track.className = "track";
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.width = `${(100 * item.prob) / max}%`;
    track.append(fill);
    const value = document.createElement("span");
    value.className = "value";
    value.textContent = percent(item.prob);
    li.append(label, track, value);
    list.append(li);
  });
}
