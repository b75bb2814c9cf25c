// The drawing pad: pointer events (mouse, touch, pen), live predictions, photo upload.
"use strict";

const pad = document.getElementById("pad");
const ctx = pad.getContext("2d");
const digitEl = document.getElementById("digit");
const confidenceEl = document.getElementById("confidence");
const seenEl = document.getElementById("seen");
const barsEl = document.getElementById("bars");
const errorEl = document.getElementById("error");

// A stroke about 1/14 of the pad: after the digit is scaled into MNIST's 20x20 box it is as
// thick as MNIST's own pen strokes.
const STROKE = pad.width / 14;
const LIVE_INTERVAL_MS = 200;

const bars = [];
for (let d = 0; d < 10; d++) {
  const li = document.createElement("li");
  li.innerHTML = `<span class="label">${d}</span><span class="track"><span class="fill"></span></span><span class="value">0%</span>`;
  barsEl.appendChild(li);
  bars.push(li);
}

function clearPad() {
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, pad.width, pad.height);
  inked = false;
  show(null);
}

let drawing = false;
let inked = false;
let last = null;

function point(event) {
  const rect = pad.getBoundingClientRect();
  return {x: (event.clientX - rect.left) * pad.width / rect.width,
          y: (event.clientY - rect.top) * pad.height / rect.height};
}

function line(from, to) {
  ctx.strokeStyle = "#000";
  ctx.lineWidth = STROKE;
  ctx.lineCap = "round";
  ctx.lineJoin = "round";
  ctx.beginPath();
  ctx.moveTo(from.x, from.y);
  ctx.lineTo(to.x, to.y);
  ctx.stroke();
  inked = true;
}

pad.addEventListener("pointerdown", (event) => {
  event.preventDefault();
  pad.setPointerCapture(event.pointerId);
  drawing = true;
  last = point(event);
  line(last, last);
  schedule();
});
pad.addEventListener("pointermove", (event) => {
  if (!drawing) return;
  event.preventDefault();
  const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [event];
  for (const e of events.length ? events : [event]) {
    const p = point(e);
    line(last, p);
    last = p;
  }
  schedule();
});
for (const type of ["pointerup", "pointercancel"]) {
  pad.addEventListener(type, () => {
    if (!drawing) return;
    drawing = false;
    schedule(true);
  });
}

// Live predictions: at most one request in flight, at most one every LIVE_INTERVAL_MS while
// drawing, and always one after the stroke ends.
let inFlight = false;
let pending = false;
let lastSent = 0;
let timer = null;

function schedule(now = false) {
  if (!inked) return;
  const wait = now ? 0 : Math.max(0, LIVE_INTERVAL_MS - (Date.now() - lastSent));
  clearTimeout(timer);
  timer = setTimeout(() => {
    if (inFlight) { pending = true; return; }
    send(JSON.stringify({image: pad.toDataURL("image/png")}), {"content-type": "application/json"});
  }, wait);
}

async function send(body, headers = {}) {
  inFlight = true;
  lastSent = Date.now();
  digitEl.dataset.state = "busy";
  try {
    const response = await fetch("/api/predict", {method: "POST", body, headers});
    const answer = await response.json();
    if (response.ok) show(answer);
    else show(null, answer.error || `error ${response.status}`);
  } catch (e) {
    show(null, "the server did not answer");
  } finally {
    inFlight = false;
    if (pending) { pending = false; schedule(true); }
  }
}

function show(answer, error = "") {
  errorEl.textContent = error;
  if (!answer) {
    digitEl.textContent = "?";
    confidenceEl.textContent = error ? "" : "draw to start";
    seenEl.removeAttribute("src");
    bars.forEach((li) => setBar(li, 0, false));
    digitEl.dataset.state = error ? "error" : "idle";
    return;
  }
  digitEl.textContent = String(answer.digit);
  confidenceEl.textContent = `${(100 * answer.confidence).toFixed(1)}% sure`;
  seenEl.src = answer.preprocessed;
  answer.probabilities.forEach((p, d) => setBar(bars[d], p, d === answer.digit));
  digitEl.dataset.state = "done";
}

function setBar(li, p, best) {
  li.querySelector(".fill").style.width = `${(100 * p).toFixed(1)}%`;
  li.querySelector(".value").textContent = `${(100 * p).toFixed(p < 0.1 ? 1 : 0)}%`;
  li.classList.toggle("best", best);
}

document.getElementById("clear").addEventListener("click", clearPad);
document.getElementById("upload").addEventListener("change", (event) => {
  const file = event.target.files[0];
  if (!file) return;
  const form = new FormData();
  form.append("file", file);
  send(form);
  event.target.value = "";
});

clearPad();
