// The clipbt web page: plain JS over the JSON API (/api/v1), no libraries.
"use strict";

const $ = (sel) => document.querySelector(sel);
let csrf = null;        // the session's CSRF token, sent as X-CSRF-Token on every change
let query = "";         // the query whose results are shown

async function api(method, path, body) {
  const headers = {};
  if (method !== "GET") headers["X-CSRF-Token"] = csrf || "";
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, { method, headers, credentials: "same-origin",
                                       body: body === undefined ? undefined : JSON.stringify(body) });
  if (response.status === 401 && path !== "/api/v1/login") { showLogin(); throw new Error("please log in"); }
  const data = response.status === 204 ? null : await response.json();
  if (!response.ok) throw new Error(data && data.error ? data.error : `HTTP ${response.status}`);
  return data;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
}

function showError(message) { $("#error").textContent = message || ""; }

function showLogin() {
  $("#login-view").hidden = false;
  $("#app-view").hidden = true;
  $("#account").hidden = true;
}

function showApp(me) {
  csrf = me.csrf;
  $("#who").textContent = me.user;
  $("#login-view").hidden = true;
  $("#app-view").hidden = false;
  $("#account").hidden = false;
  loadHistory();
}

async function search() {
  if (!query) return;
  showError("");
  $("#app-view").setAttribute("aria-busy", "true");
  try {
    const [found] = await Promise.all([api("GET", `/api/v1/search?q=${encodeURIComponent(query)}&k=20`), loadDuel()]);
    const list = $("#results");
    list.replaceChildren(...found.results.map(resultItem));
    $("#results-title").hidden = false;
    $("#results-title").textContent = `Results for “${query}”`;
  } catch (err) { showError(err.message); }
  finally {
    const view = $("#app-view");
    view.dataset.generation = String(Number(view.dataset.generation || 0) + 1);  // results shown so far
    view.setAttribute("aria-busy", "false");
  }
}

function resultItem(hit) {
  const vote = (good) => async (event) => {
    event.currentTarget.setAttribute("aria-pressed", "true");
    try {
      await api("POST", "/api/v1/feedback", { query, good: good ? [hit.id] : [], bad: good ? [] : [hit.id] });
      await Promise.all([search(), loadHistory()]);
    } catch (err) { showError(err.message); }
  };
  return el("li", { "data-id": hit.id },
    el("img", { src: hit.thumbnail, alt: `image ${hit.id}`, loading: "lazy", width: 256, height: 256 }),
    el("div", { class: "meta" },
      el("span", {}, `#${hit.rank} · ${hit.id}`),
      el("span", { class: "votes" },
        el("button", { type: "button", class: "up", "aria-pressed": "false", "aria-label": `Thumbs up image ${hit.id}`,
                       title: "Thumbs up: more like this", onclick: vote(true) }, "▲"),
        el("button", { type: "button", class: "down", "aria-pressed": "false", "aria-label": `Thumbs down image ${hit.id}`,
                       title: "Thumbs down: less like this", onclick: vote(false) }, "▼"))));
}

async function loadDuel() {
  const panel = $("#duel");
  try {
    const pair = await api("GET", `/api/v1/duel?q=${encodeURIComponent(query)}`);
    const choice = (winner, loser) => el("button", {
        type: "button", "data-id": winner, "aria-label": `Prefer image ${winner}`,
        onclick: async () => {
          panel.querySelectorAll("button").forEach((b) => { b.disabled = true; });
          try {
            await api("POST", "/api/v1/preferences", { query, preferred: winner, rejected: loser });
            await Promise.all([search(), loadHistory()]);
          } catch (err) { showError(err.message); }
        } },
      el("img", { src: `/api/v1/images/${winner}/thumbnail`, alt: `image ${winner}`, width: 256, height: 256 }),
      `image ${winner}`);
    panel.querySelector(".duel-pair").replaceChildren(choice(pair.a, pair.b), choice(pair.b, pair.a));
    panel.hidden = false;
  } catch (err) {
    panel.hidden = true;  // nothing left to ask for this query
  }
}

function describe(record) {
  if (record.kind === "pair") return `${record.preferred} over ${record.rejected}`;
  if (record.kind === "ranking") return record.images.join(" > ");
  const parts = [];
  if (record.good.length) parts.push(`▲ ${record.good.join(", ")}`);
  if (record.bad.length) parts.push(`▼ ${record.bad.join(", ")}`);
  return parts.join("; ");
}

async function loadHistory() {
  try {
    const { preferences } = await api("GET", "/api/v1/preferences");
    $("#history summary").textContent = `My preferences (${preferences.length})`;
    $("#history-list").replaceChildren(...preferences.map((record) => el("li", { "data-id": record.id },
      el("span", {}, `“${record.query}”: ${describe(record)}`),
      el("button", { type: "button", "aria-label": `Delete ${record.id}`, onclick: async () => {
        try { await api("DELETE", `/api/v1/preferences/${encodeURIComponent(record.id)}`); await Promise.all([loadHistory(), search()]); }
        catch (err) { showError(err.message); }
      } }, "Delete"))));
  } catch (err) { showError(err.message); }
}

$("#login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = new FormData(event.target);
  $("#login-error").textContent = "";
  try {
    showApp(await api("POST", "/api/v1/login", { name: form.get("name"), password: form.get("password") }));
    event.target.reset();
  } catch (err) { $("#login-error").textContent = err.message; }
});

$("#search-form").addEventListener("submit", (event) => {
  event.preventDefault();
  query = $("#q").value.trim();
  search();
});

$("#logout").addEventListener("click", async () => {
  try { await api("POST", "/api/v1/logout"); } finally { showLogin(); }
});

$("#delete-me").addEventListener("click", async () => {
  if (!confirm("Delete your account and every preference you recorded? This cannot be undone.")) return;
  try { await api("DELETE", "/api/v1/me"); showLogin(); } catch (err) { showError(err.message); }
});

api("GET", "/api/v1/me").then(showApp, showLogin);
