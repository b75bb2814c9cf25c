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
// The drawing is sent at 112 px: a sixth of the canvas's pixels to encode, send and decode, and
// a quarter less server time than 160 px, at the same accuracy on held-out digits drawn as the pad
// draws them (scripts/compare_pad_side.py, docs/benchmarks.md).
const PAD_UPLOAD_SIDE = 112;
// Photos are shrunk to at most this long side before upload: a 20 MB phone photo becomes a few
// hundred KB, well within the server's upload limit, and the digit keeps plenty of detail.
const PHOTO_SIDE = 1024;
// What each refusal means to the person using the page.
const REFUSALS = {
  413: "That file is too large for the server.",
  503: "The server is busy right now: try again in a moment.",
  504: "The server took too long to answer: try again.",
};

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
    send(JSON.stringify({image: padImage()}), {"content-type": "application/json"});
  }, wait);
}

const small = document.createElement("canvas");
small.width = small.height = PAD_UPLOAD_SIDE;
const smallCtx = small.getContext("2d");

function padImage() {
  smallCtx.imageSmoothingEnabled = true;
  smallCtx.imageSmoothingQuality = "high";
  smallCtx.drawImage(pad, 0, 0, PAD_UPLOAD_SIDE, PAD_UPLOAD_SIDE);
  return small.toDataURL("image/png");
}

async function send(body, headers = {}) {
  inFlight = true;
  lastSent = Date.now();
  digitEl.dataset.state = "busy";
  try {
    const response = await fetch("/api/predict", {method: "POST", body, headers});
    let answer = {};
    try { answer = await response.json(); } catch (e) { /* a proxy's HTML error page */ }
    if (response.ok) show(answer);
    else show(null, refusal(response.status, answer.error));
  } catch (e) {
    show(null, "The server did not answer: check your connection and try again.");
  } finally {
    inFlight = false;
    if (pending) { pending = false; schedule(true); }
  }
}

function refusal(status, message) {
  if (REFUSALS[status]) return REFUSALS[status];
  if (status === 422) return "No digit found: draw or photograph one digit, dark on light.";
  if (status === 400) return `That is not a picture the server can read (${message || "bad request"}).`;
  return message || `The server answered with error ${status}.`;
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
  seenEl.src = answer.preprocessed;
  answer.probabilities.forEach((p, d) => setBar(bars[d], p, d === answer.digit));
  if (answer.digit === null) {  // the reject option: the model is unsure this is a digit at all
    digitEl.textContent = "?";
    confidenceEl.textContent = "that doesn't look like a digit";
    digitEl.dataset.state = "rejected";
    return;
  }
  digitEl.textContent = String(answer.digit);
  confidenceEl.textContent = `${(100 * answer.confidence).toFixed(1)}% sure`;
  digitEl.dataset.state = "done";
}

function setBar(li, p, best) {
  li.querySelector(".fill").style.width = `${(100 * p).toFixed(1)}%`;
  li.querySelector(".value").textContent = `${(100 * p).toFixed(p < 0.1 ? 1 : 0)}%`;
  li.classList.toggle("best", best);
}

document.getElementById("clear").addEventListener("click", clearPad);
// Shrinks a photo to at most PHOTO_SIDE px (upright, by its EXIF orientation) before upload.
// Pictures the browser cannot decode, and small ones, go as they are.
async function shrunk(file) {
  let bitmap;
  try {
    bitmap = await createImageBitmap(file, {imageOrientation: "from-image"});
  } catch (e) {
    return file;
  }
  const scale = Math.min(1, PHOTO_SIDE / Math.max(bitmap.width, bitmap.height));
  if (scale === 1 && file.size <= 1024 * 1024) {
    bitmap.close();
    return file;
  }
  const canvas = document.createElement("canvas");
  canvas.width = Math.max(1, Math.round(bitmap.width * scale));
  canvas.height = Math.max(1, Math.round(bitmap.height * scale));
  const context = canvas.getContext("2d");
  context.imageSmoothingQuality = "high";
  context.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
  bitmap.close();
  // PNG where transparency may carry the drawing; JPEG for photos (JPEG, HEIC, ...).
  const type = ["image/png", "image/gif", "image/webp"].includes(file.type) ? "image/png"
                                                                             : "image/jpeg";
  const blob = await new Promise((resolve) => canvas.toBlob(resolve, type, 0.92));
  return blob || file;
}

document.getElementById("upload").addEventListener("change", async (event) => {
  const file = event.target.files[0];
  event.target.value = "";
  if (!file) return;
  digitEl.dataset.state = "busy";
  const form = new FormData();
  form.append("file", await shrunk(file), file.name);
  send(form);
});

clearPad();
