// The labelling page: one pair at a time; a key press posts the label and the next pair is shown
// only after the server has written it to disk. No build step, no dependencies.
"use strict";

const OUTCOME_OF_KEY = { ArrowLeft: "left", ArrowRight: "right", ArrowDown: "tie", s: "skip", S: "skip" };
let current = null;  // the state last shown
let busy = false;    // a request is in flight: further keys wait for it
let timers = [];     // frame-folder animations of the pair shown

function $(id) { return document.getElementById(id); }

function say(text) { $("message").textContent = text || ""; }

async function call(method, url, body) {
  const init = { method, headers: {} };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(url, init);
  } catch (err) {
    throw new Error("the server is not reachable: nothing was saved for this click; " +
                    "restart `sipo-pairs label` and reload this page");
  }
  const payload = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  return { status: response.status, payload };
}

function mediaElement(media) {
  if (media.kind === "video") {
    const video = document.createElement("video");
    Object.assign(video, { src: media.src, loop: true, autoplay: true, muted: true, playsInline: true });
    return video;
  }
  const img = document.createElement("img");
  img.alt = media.id;
  img.addEventListener("load", () => img.classList.toggle("small", img.naturalWidth < 256));
  if (media.kind === "frames") {
    let n = 0;
    img.src = media.frames[0];
    media.frames.forEach((src) => { new Image().src = src; });
    const delay = 1000 / Math.max(1, media.fps || 8);
    timers.push(setInterval(() => { n = (n + 1) % media.frames.length; img.src = media.frames[n]; }, delay));
  } else {
    img.src = media.src;
  }
  return img;
}

function preload(list) {
  for (const media of list || []) {
    if (media.kind === "image") new Image().src = media.src;
    if (media.kind === "frames") new Image().src = media.frames[0];
  }
}

function progressLine(state) {
  const p = state.progress, t = p.total;
  const parts = [];
  if (state.pair) {
    parts.push(`prompt ${state.pair.prompt_index}: ${p.prompt.done} / ${p.prompt.planned}`);
  }
  parts.push(`all prompts: ${t.done} / ${t.planned} labelled`);
  parts.push(`${p.prompts_done} of ${p.prompts} prompts finished`);
  return parts.join(" · ");
}

function render(state) {
  current = state;
  timers.forEach(clearInterval);
  timers = [];
  $("progress").textContent = progressLine(state);
  document.body.dataset.done = String(state.progress.total.done);
  const pair = state.pair;
  $("finished").hidden = pair !== null;
  $("pair").hidden = pair === null;
  for (const side of ["left", "right"]) {
    const box = $(side).querySelector(".media");
    $(side).classList.remove("picked");
    box.replaceChildren(...(pair ? [mediaElement(pair[side])] : []));
  }
  $("prompt").textContent = pair ? pair.prompt : "";
  $("negative").textContent = pair && pair.negative_prompt ? `negative: ${pair.negative_prompt}` : "";
  document.body.dataset.pair = pair ? `${pair.left.id}|${pair.right.id}` : "";
  document.body.dataset.status = pair ? "ready" : "finished";
  preload(state.preload);
}

async function send(method, url, body, picked) {
  if (busy) return;
  busy = true;
  document.body.classList.add("busy");
  if (picked) $(picked).classList.add("picked");
  try {
    const { status, payload } = await call(method, url, body);
    if (status === 200) {
      say(payload.undone ? "undone: the pair is shown again" : "");
      render(payload);
    } else {
      say(payload.error || `HTTP ${status}`);
      if (payload.state) render(payload.state);
      else if (picked) $(picked).classList.remove("picked");
    }
  } catch (err) {
    say(err.message);
    if (picked) $(picked).classList.remove("picked");
  } finally {
    busy = false;
    document.body.classList.remove("busy");
  }
}

function label(outcome) {
  if (!current || !current.pair) return;
  const picked = outcome === "left" || outcome === "right" ? outcome : null;
  send("POST", "/api/label",
       { left: current.pair.left.id, right: current.pair.right.id, outcome }, picked);
}

document.addEventListener("keydown", (event) => {
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  if (event.key === "u" || event.key === "U") {
    event.preventDefault();
    send("POST", "/api/undo", {});
  } else if (event.key in OUTCOME_OF_KEY) {
    event.preventDefault();
    label(OUTCOME_OF_KEY[event.key]);
  }
});

for (const side of ["left", "right"]) {
  document.addEventListener("DOMContentLoaded", () => $(side).addEventListener("click", () => label(side)));
}

document.addEventListener("DOMContentLoaded", async () => {
  try {
    const { status, payload } = await call("GET", "/api/state");
    if (status === 200) render(payload); else say(payload.error);
  } catch (err) {
    say(err.message);
  }
});
