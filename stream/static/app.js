// agestream live page: each stream's annotated video, stats and people, and charts of the
// people in view. Vanilla JS over the JSON API; a ?token= in the page's URL is sent on.
"use strict";

const TOKEN = new URLSearchParams(location.search).get("token");
const STREAMS_EVERY_MS = 1000;
const HISTORY_EVERY_MS = 5000;
const HISTORY_MINUTES = 10;
// A browser opens at most 6 connections to a server and each MJPEG image holds one; past this
// many streams the others show a still refreshed twice a second, so the API calls still get
// through.
const MAX_MJPEG = 4;
const STILL_EVERY_MS = 500;
const AGE_GROUPS = ["0-9", "10-19", "20-39", "40-59", "60+"];
const GENDERS = ["male", "female", "unsure"];
// The same colours as `agestream report`'s charts.
const COLOURS = {
  "0-9": "#8dd3c7", "10-19": "#80b1d3", "20-39": "#fdb462", "40-59": "#fb8072",
  "60+": "#bc80bd", male: "#4c78a8", female: "#e45756", unsure: "#b7b7b7",
};

const cards = new Map(); // stream id -> card
let lastHistory = [];

function withToken(path) {
  if (!TOKEN) return path;
  return path + (path.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(TOKEN);
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (TOKEN) headers.Authorization = "Bearer " + TOKEN;
  const response = await fetch(path, Object.assign({}, options, { headers, cache: "no-store" }));
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try {
      message = (await response.json()).error || message;
    } catch (ignored) { /* not JSON */ }
    throw new Error(message);
  }
  return response.status === 204 ? null : response.json();
}

// Runs `task` now and then `everyMs` after each run ends, so slow answers never pile up.
function repeat(task, everyMs) {
  const run = async () => {
    try {
      await task();
    } finally {
      setTimeout(run, everyMs);
    }
  };
  run();
}

function element(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (className) node.className = className;
  return node;
}

function streamPath(id, suffix) {
  return `stream/${encodeURIComponent(id)}${suffix}`;
}

// ---- streams -------------------------------------------------------------------------------

function createCard(stream) {
  const root = document.getElementById("stream-card").content.firstElementChild.cloneNode(true);
  const card = {
    id: stream.id,
    root,
    img: root.querySelector(".live"),
    stats: root.querySelector(".stats"),
    state: root.querySelector(".state"),
    error: root.querySelector(".stream-error"),
    tbody: root.querySelector(".tracks tbody"),
    table: root.querySelector(".tracks"),
    nobody: root.querySelector(".nobody"),
    live: true,
    retries: 0,
  };
  root.dataset.stream = stream.id;
  root.querySelector(".stream-id").textContent = stream.id;
  root.querySelector(".source").textContent = stream.source;
  card.img.alt = `live view of ${stream.id}`;
  root.querySelector(".remove").addEventListener("click", (event) => removeStream(card, event));
  const moving = [...cards.values()].filter((c) => c.mode === "mjpeg").length;
  card.mode = moving < MAX_MJPEG ? "mjpeg" : "still";
  startImage(card);
  cards.set(stream.id, card);
  return card;
}

function startImage(card) {
  if (card.mode === "mjpeg") {
    // A dropped connection (server restart, network) is retried every 2 s.
    card.img.onerror = () => {
      if (card.live) setTimeout(() => startImage(card), 2000);
    };
    card.img.src = withToken(streamPath(card.id, `.mjpg?n=${card.retries++}`));
  } else {
    const next = () => {
      if (card.live) setTimeout(() => startImage(card), STILL_EVERY_MS);
    };
    card.img.onload = next;
    card.img.onerror = next;
    card.img.src = withToken(streamPath(card.id, `.jpg?n=${card.retries++}`));
  }
}

function dropCard(card) {
  card.live = false;
  card.img.onerror = null;
  card.img.onload = null;
  card.img.removeAttribute("src"); // closes the MJPEG connection
  card.root.remove();
  cards.delete(card.id);
}

function formatNumber(value, digits, unit) {
  return value === null || value === undefined ? "–" : `${value.toFixed(digits)}${unit}`;
}

function updateStats(card, stream) {
  card.state.textContent = stream.state;
  card.state.className = `state ${stream.state}`;
  card.stats.textContent = [
    `${formatNumber(stream.fps, 1, "")} FPS`,
    `latency p95 ${formatNumber(stream.latency_ms_p95, 0, " ms")}`,
    `${stream.dropped} dropped`,
    `${stream.frames} frames`,
    `${stream.faces} faces`,
  ].join(" · ");
  card.error.textContent = stream.error || "";
}

function formatAge(track) {
  if (track.age === null) return "–";
  // The 80 % range people read as "somewhere from 38 to 52", not a lone "± 2".
  if (track.age_low !== null && track.age_high !== null) {
    return `${Math.round(track.age_low)}–${Math.round(track.age_high)}`;
  }
  return `${Math.round(track.age)}`;
}

function formatGender(track) {
  if (track.gender === null) return "–";
  if (track.confidence === null) return track.gender;
  return `${track.gender} ${Math.round(track.confidence * 100)}%`;
}

function formatDuration(seconds) {
  if (seconds === null) return "–";
  const whole = Math.floor(seconds);
  if (whole < 60) return `${whole} s`;
  return `${Math.floor(whole / 60)} min ${String(whole % 60).padStart(2, "0")} s`;
}

function updateTracks(card, tracks) {
  const rows = tracks.map((track) => {
    const row = element("tr");
    row.append(
      element("td", `#${track.track}`),
      element("td", formatAge(track)),
      element("td", formatGender(track)),
      element("td", formatDuration(track.seconds_in_view)),
    );
    return row;
  });
  card.tbody.replaceChildren(...rows);
  card.table.hidden = rows.length === 0;
  card.nobody.hidden = rows.length > 0;
}

async function refreshTracks(card) {
  try {
    const stream = await api(`api/streams/${encodeURIComponent(card.id)}`);
    if (card.live) updateTracks(card, stream.tracks);
  } catch (error) {
    // Removed meanwhile: the next list refresh drops the card.
  }
}

function setConnection(message) {
  document.getElementById("connection").textContent = message;
}

async function refreshStreams() {
  let streams;
  try {
    streams = await api("api/streams");
    setConnection("");
  } catch (error) {
    setConnection(`Cannot read the streams: ${error.message}`);
    return;
  }
  const container = document.getElementById("streams");
  const present = new Set(streams.map((stream) => stream.id));
  for (const card of [...cards.values()]) {
    if (!present.has(card.id)) dropCard(card);
  }
  streams.forEach((stream, index) => {
    const card = cards.get(stream.id) || createCard(stream);
    updateStats(card, stream);
    if (container.children[index] !== card.root) {
      container.insertBefore(card.root, container.children[index] || null);
    }
  });
  document.getElementById("empty").hidden = streams.length > 0;
  await Promise.all([...cards.values()].map(refreshTracks));
}

async function removeStream(card, event) {
  if (!confirm(`Stop stream ${card.id} and finalize its outputs?`)) return;
  const button = event.target;
  button.disabled = true;
  button.textContent = "Removing…";
  try {
    await api(`api/streams/${encodeURIComponent(card.id)}`, { method: "DELETE" });
    dropCard(card);
  } catch (error) {
    card.error.textContent = `Could not remove: ${error.message}`;
    button.disabled = false;
    button.textContent = "Remove";
  }
}

async function addStream(event) {
  event.preventDefault();
  const form = event.target;
  const source = document.getElementById("add-source").value.trim();
  const id = document.getElementById("add-id").value.trim();
  const message = document.getElementById("add-error");
  const body = id ? { source, id } : { source };
  form.querySelector("button").disabled = true;
  try {
    await api("api/streams", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    message.textContent = "";
    form.reset();
    await refreshStreams();
  } catch (error) {
    message.textContent = `Could not add the stream: ${error.message}`;
  } finally {
    form.querySelector("button").disabled = false;
  }
}

// ---- charts --------------------------------------------------------------------------------

// Sizes the canvas's pixels to its shown size; returns the 2D context in CSS pixels.
function fitCanvas(canvas) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth;
  const height = canvas.clientHeight;
  if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
  }
  const context = canvas.getContext("2d");
  context.setTransform(ratio, 0, 0, ratio, 0, 0);
  context.clearRect(0, 0, width, height);
  return { context, width, height };
}

function drawAxes(context, box, yMax, now) {
  context.strokeStyle = "#e3e3e3";
  context.fillStyle = "#666";
  context.font = "11px system-ui, sans-serif";
  context.lineWidth = 1;
  const step = Math.max(1, Math.ceil(yMax / 4));
  context.textAlign = "right";
  context.textBaseline = "middle";
  for (let value = 0; value <= yMax; value += step) {
    const y = box.y(value);
    context.beginPath();
    context.moveTo(box.left, y);
    context.lineTo(box.right, y);
    context.stroke();
    context.fillText(String(value), box.left - 4, y);
  }
  context.textAlign = "center";
  context.textBaseline = "top";
  for (let minutes = HISTORY_MINUTES; minutes >= 0; minutes -= HISTORY_MINUTES / 2) {
    const edge = { [HISTORY_MINUTES]: "left", 0: "right" };
    context.textAlign = edge[minutes] || "center";
    const label = minutes === 0 ? "now" : `−${minutes} min`;
    context.fillText(label, box.x(now - minutes * 60), box.bottom + 4);
  }
}

// Stacked step areas: each bin holds its counts until the next bin starts.
function drawStack(context, box, bins, keys, pick, binSeconds) {
  const base = bins.map(() => 0);
  for (const key of keys) {
    const top = bins.map((bin, i) => base[i] + (pick(bin)[key] || 0));
    context.beginPath();
    bins.forEach((bin, i) => {
      const x0 = box.x(bin.t);
      const x1 = box.x(bin.t + binSeconds);
      if (i === 0) context.moveTo(x0, box.y(top[i]));
      else context.lineTo(x0, box.y(top[i]));
      context.lineTo(x1, box.y(top[i]));
    });
    for (let i = bins.length - 1; i >= 0; i--) {
      context.lineTo(box.x(bins[i].t + binSeconds), box.y(base[i]));
      context.lineTo(box.x(bins[i].t), box.y(base[i]));
    }
    context.closePath();
    context.fillStyle = COLOURS[key];
    context.fill();
    top.forEach((value, i) => { base[i] = value; });
  }
  return Math.max(0, ...base);
}

function drawChart(canvas, bins, keys, pick) {
  const { context, width, height } = fitCanvas(canvas);
  const now = Date.now() / 1000;
  const start = now - HISTORY_MINUTES * 60;
  const shown = bins.filter((bin) => bin.t + 10 > start);
  const binSeconds = shown.length > 1 ? shown[1].t - shown[0].t : 10;
  const totals = shown.map((bin) => keys.reduce((sum, key) => sum + (pick(bin)[key] || 0), 0));
  const yMax = Math.max(1, ...totals);
  const box = { left: 32, right: width - 8, top: 8, bottom: height - 20 };
  box.x = (t) => box.left + ((t - start) / (now - start)) * (box.right - box.left);
  box.y = (value) => box.bottom - (value / yMax) * (box.bottom - box.top);
  drawAxes(context, box, yMax, now);
  context.save();
  context.beginPath();
  context.rect(box.left, box.top - 1, box.right - box.left, box.bottom - box.top + 2);
  context.clip();
  drawStack(context, box, shown, keys, pick, binSeconds);
  context.restore();
  if (shown.length === 0) {
    context.fillStyle = "#999";
    context.textAlign = "center";
    context.textBaseline = "middle";
    context.fillText("no one seen yet", (box.left + box.right) / 2, (box.top + box.bottom) / 2);
  }
}

// The legend gives each key's count in the newest bin (nobody when it is over 20 s old).
function drawLegend(container, keys, last) {
  const items = keys.map((key) => {
    const item = element("span");
    const swatch = element("span", undefined, "swatch");
    swatch.style.background = COLOURS[key];
    item.append(swatch, `${key}: ${last ? last[key] || 0 : 0}`);
    return item;
  });
  container.replaceChildren(element("span", "now", "muted"), ...items);
}

function drawHistory() {
  const bins = lastHistory;
  const newest = bins.length ? bins[bins.length - 1] : null;
  const last = newest && newest.t + 20 >= Date.now() / 1000 ? newest : null;
  drawChart(document.getElementById("chart-age"), bins, AGE_GROUPS, (bin) => bin.age_groups);
  drawChart(document.getElementById("chart-gender"), bins, GENDERS, (bin) => bin.genders);
  drawLegend(document.getElementById("legend-age"), AGE_GROUPS, last && last.age_groups);
  drawLegend(document.getElementById("legend-gender"), GENDERS, last && last.genders);
}

async function refreshHistory() {
  try {
    lastHistory = await api(`api/history?minutes=${HISTORY_MINUTES}`);
  } catch (error) {
    setConnection(`Cannot read the history: ${error.message}`);
  }
  drawHistory();
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll(".minutes").forEach((node) => { node.textContent = HISTORY_MINUTES; });
  document.getElementById("add-form").addEventListener("submit", addStream);
  window.addEventListener("resize", drawHistory);
  repeat(refreshStreams, STREAMS_EVERY_MS);
  repeat(refreshHistory, HISTORY_EVERY_MS);
});
