// The labeling page: fetch a pair, show it, send the answer. No framework, no build step.
//
// The token comes once as ?token=..., is kept in sessionStorage (this tab only) and removed from the
// address bar; every API call sends it as "Authorization: Bearer <token>". Pictures are fetched with
// that header too and shown through blob: URLs. <body data-state> is loading | ready | busy | done |
// login, and data-shown counts the pairs shown so far (tests wait on both).
"use strict";

(() => {
  const TOKEN_KEY = "scoreaction-labeler-token";
  const $ = (id) => document.getElementById(id);
  const body = document.body;

  const params = new URLSearchParams(location.search);
  let token = params.get("token");
  if (token) {
    sessionStorage.setItem(TOKEN_KEY, token);
    params.delete("token");
    const rest = params.toString();
    history.replaceState(null, "", location.pathname + (rest ? "?" + rest : ""));
  } else {
    token = sessionStorage.getItem(TOKEN_KEY);
  }

  let current = null; // {left: {id, kind, caption}, right: {...}}
  let shownAt = 0;
  let objectUrls = [];

  function setState(state) {
    body.dataset.state = state;
    for (const button of document.querySelectorAll("button")) {
      button.disabled = state === "busy" || state === "loading";
    }
  }

  function say(text, kind = "") {
    const status = $("status");
    status.textContent = text;
    status.className = "status " + kind;
  }

  class ApiError extends Error {
    constructor(message, status) { super(message); this.status = status; }
  }

  async function api(path, options = {}) {
    const headers = { Authorization: "Bearer " + token };
    if (options.body) headers["Content-Type"] = "application/json";
    const res = await fetch(path, { ...options, headers, cache: "no-store" });
    if (!res.ok) {
      let message = res.statusText;
      try { message = (await res.json()).error || message; } catch (e) { /* not JSON */ }
      throw new ApiError(message, res.status);
    }
    return res;
  }

  function showProgress(p) {
    if (!p) return;
    $("who").textContent = p.labeler ? "labeler: " + p.labeler : "";
    if (p.queued) {
      const done = p.queued - p.remaining;
      $("progress-text").textContent = `${done} / ${p.queued} pairs`;
      $("progress-fill").style.width = `${(100 * done) / p.queued}%`;
      $("progress").classList.remove("open-ended");
    } else {
      $("progress-text").textContent = `${p.answered} answered`;
      $("progress").classList.add("open-ended");
    }
  }

  async function picture(item) {
    const res = await api(`/api/items/${item.id}.png`);
    const url = URL.createObjectURL(await res.blob());
    objectUrls.push(url);
    return url;
  }

  async function show(data) {
    showProgress(data.progress);
    if (data.question) $("question").textContent = data.question;
    if (data.done) {
      current = null;
      $("labeling").hidden = true;
      $("done").hidden = false;
      setState("done");
      body.dataset.shown = String(Number(body.dataset.shown) + 1);
      return;
    }
    const [leftUrl, rightUrl] = await Promise.all([picture(data.left), picture(data.right)]);
    const old = objectUrls.filter((u) => u !== leftUrl && u !== rightUrl);
    objectUrls = [leftUrl, rightUrl];
    for (const [side, url] of [["left", leftUrl], ["right", rightUrl]]) {
      const img = $(side + "-img");
      img.src = url;
      img.dataset.itemId = String(data[side].id);
      $(side + "-caption").textContent = data[side].caption;
    }
    await Promise.all([$("left-img").decode(), $("right-img").decode()]).catch(() => {});
    old.forEach((u) => URL.revokeObjectURL(u));
    $("prompt").hidden = !data.prompt;
    $("prompt").textContent = data.prompt ? "Condition: " + data.prompt : "";
    $("done").hidden = true;
    $("labeling").hidden = false;
    current = { left: data.left, right: data.right };
    shownAt = performance.now();
    setState("ready");
    body.dataset.shown = String(Number(body.dataset.shown) + 1);
  }

  async function loadNext() {
    const res = await api("/api/next");
    await show(await res.json());
  }

  function flash(choice) {
    const target = { left: "left-card", right: "right-card" }[choice];
    if (!target) return;
    const card = $(target);
    card.classList.add("chosen");
    setTimeout(() => card.classList.remove("chosen"), 250);
  }

  async function act(work) {
    if (body.dataset.state === "busy" || body.dataset.state === "loading" || !token) return;
    const before = body.dataset.state;
    setState("busy");
    try {
      await work();
    } catch (err) {
      if (err.status === 401) return needToken(err.message);
      say(err.message || String(err), "error");
      setState(before);
    }
  }

  function answer(choice) {
    if (!current || body.dataset.state !== "ready") return;
    const payload = {
      left: current.left.id,
      right: current.right.id,
      choice,
      response_ms: Math.round(performance.now() - shownAt),
    };
    return act(async () => {
      flash(choice);
      try {
        await api("/api/answer", { method: "POST", body: JSON.stringify(payload) });
        say(`Saved: ${choice === "skip" ? "skipped" : choice === "tie" ? "tie" : choice + " is better"}.`);
      } catch (err) {
        if (err.status !== 409) throw err;
        say("That pair was already answered (in another tab?); here is the next one.");
      }
      await loadNext();
    });
  }

  function undo() {
    return act(async () => {
      const data = await (await api("/api/undo", { method: "POST" })).json();
      if (!data.undone) {
        say("Nothing to undo.");
        showProgress(data.progress);
        setState(current ? "ready" : "done");
        return;
      }
      await show(data);
      say(`Undone: your answer "${data.undone.choice}" was removed. Answer this pair again.`);
    });
  }

  function needToken(message) {
    current = null;
    $("labeling").hidden = true;
    $("done").hidden = true;
    $("login").hidden = false;
    if (message) say(message, "error");
    sessionStorage.removeItem(TOKEN_KEY);
    setState("login");
  }

  document.addEventListener("click", (event) => {
    const button = event.target.closest("button");
    if (!button) return;
    if (button.dataset.choice) answer(button.dataset.choice);
    else if (button.id === "undo" || button.id === "undo-done") undo();
  });

  const KEYS = { ArrowLeft: "left", ArrowRight: "right", ArrowDown: "tie", t: "tie", T: "tie", s: "skip", S: "skip" };
  document.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    if (event.key in KEYS) {
      event.preventDefault();
      answer(KEYS[event.key]);
    } else if (event.key === "u" || event.key === "U" || event.key === "Backspace") {
      event.preventDefault();
      undo();
    }
  });

  if (!token) {
    needToken("");
  } else {
    loadNext().catch((err) => (err.status === 401 ? needToken(err.message) : say(err.message, "error")));
  }
})();
