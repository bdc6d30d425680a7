// recstream playground: plain JS against the gateway's own API (no build step).
// Search -> render ranked items (score, model version, reasons) and log impressions;
// click -> send a click event with request_id + position -> refresh session recommendations.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { seq: 0, lastRecRequest: null, liveTimer: null };

function randomId(prefix) {
  return prefix + Math.random().toString(36).slice(2, 10);
}

function initSettings() {
  const params = new URLSearchParams(location.search);
  for (const [id, key, fallback] of [
    ["api-key", "apiKey", ""], ["user-id", "user", randomId("u")], ["session-id", "session", randomId("s")],
  ]) {
    const value = params.get(key) || localStorage.getItem("recstream." + key) || fallback;
    $(id).value = value;
    $(id).addEventListener("change", () => localStorage.setItem("recstream." + key, $(id).value));
    localStorage.setItem("recstream." + key, value);
  }
  if (params.has("apiKey")) {
    // the key is kept in localStorage; take it out of the address bar, history and bookmarks
    params.delete("apiKey");
    history.replaceState(null, "", location.pathname + (params.size ? "?" + params : "") + location.hash);
  }
  $("live").addEventListener("change", scheduleLive);
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function api(path, body) {
  const resp = await fetch(path, {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-API-Key": $("api-key").value },
    body: JSON.stringify(body),
  });
  const data = await resp.json().catch(() => ({}));
  if (!resp.ok) {
    const detail = typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail);
    throw new Error(`${resp.status}: ${detail}`);
  }
  return data;
}

function who() {
  return { user_id: $("user-id").value, session_id: $("session-id").value || null };
}

function describe(result) {
  const arm = result.policy ? `, arm ${escapeHtml(result.policy)}` : "";
  const degraded = result.degraded ? ' <span class="degraded">degraded</span>' : "";
  const latency = result.latency_ms != null ? `, ${result.latency_ms.toFixed(1)} ms` : "";
  return `model <b class="model-version">${escapeHtml(result.model_version)}</b>${arm}${latency}${degraded}`;
}

function renderItems(listEl, result) {
  // Same list as on screen (e.g. a live refresh with nothing new): keep it, log no new impressions.
  const signature = result.items.map((i) => i.item_id).join(",") + "|" + result.model_version;
  if (listEl.dataset.signature === signature) return;
  listEl.dataset.signature = signature;
  listEl.replaceChildren();
  listEl.dataset.requestId = result.request_id;
  for (const item of result.items) {
    const li = document.createElement("li");
    li.className = "item fresh";
    li.dataset.itemId = item.item_id;
    li.dataset.position = item.position;
    const title = result.titles[item.item_id] || item.item_id;
    const reasons = Object.entries(item.reasons || {})
      .sort((a, b) => Math.abs(b[1]) - Math.abs(a[1]))
      .map(([k, v]) => `<span class="reason">${escapeHtml(k)} <b>${v.toFixed(2)}</b></span>`)
      .join("") || `<span class="reason muted">no reasons reported by ${escapeHtml(result.model_version)}</span>`;
    li.innerHTML =
      `<span class="score" title="score">${item.score.toFixed(3)}</span>` +
      `<div class="title">${item.position + 1}. ${escapeHtml(title)}</div>` +
      `<div class="meta">${escapeHtml(item.item_id)} · ${escapeHtml(item.category || "?")}` +
      ` · p=${item.propensity.toFixed(2)}</div>` +
      `<div class="reasons" title="why it was shown: top contributing signals">${reasons}</div>`;
    li.addEventListener("click", () => onClick(result, item, li));
    listEl.appendChild(li);
  }
  logImpressions(result);
}

function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

function feedbackEvent(type, result, item) {
  return {
    type, ...who(), item_id: item.item_id, request_id: result.request_id, position: item.position,
    model_version: result.model_version, propensity: item.propensity,
  };
}

async function logImpressions(result) {
  if (!result.items.length) return;
  try {
    await api("/v1/events", { events: result.items.map((item) => feedbackEvent("impression", result, item)) });
  } catch (err) {
    setStatus("could not log impressions: " + err.message, true);
  }
}

async function onClick(result, item, li) {
  try {
    await api("/v1/events", { events: [feedbackEvent("click", result, item)] });
    li.classList.add("clicked");
    setStatus(`clicked ${item.item_id} (request ${result.request_id}, position ${item.position}); updating recommendations…`);
    // Session features update within ~100 ms of the click; ask twice so the list visibly follows it.
    setTimeout(refreshRecs, 300);
    setTimeout(refreshRecs, 1200);
  } catch (err) {
    setStatus("click failed: " + err.message, true);
  }
}

async function doSearch(event) {
  event.preventDefault();
  const query = $("query").value.trim();
  if (!query) return;
  setStatus(`searching "${query}"…`);
  try {
    const result = await api("/v1/search", { ...who(), query, k: 10 });
    renderItems($("results"), result);
    $("search-meta").innerHTML = describe(result);
    setStatus(`${result.items.length} results for "${query}". Click one to tell the system what you like.`);
    refreshRecs();
    scheduleLive();
  } catch (err) {
    setStatus("search failed: " + err.message, true);
  }
}

async function refreshRecs() {
  const seq = ++state.seq;
  try {
    const result = await api("/v1/recommend", { ...who(), k: 10 });
    if (seq !== state.seq) return; // a newer refresh is already under way
    renderItems($("recs"), result);
    $("rec-meta").innerHTML = describe(result);
  } catch (err) {
    setStatus("recommend failed: " + err.message, true);
  }
}

// Live refresh starts with the first search, so an idle page with no key sends nothing.
function scheduleLive() {
  clearInterval(state.liveTimer);
  if ($("live").checked) state.liveTimer = setInterval(refreshRecs, 5000);
}

initSettings();
$("search-form").addEventListener("submit", doSearch);
