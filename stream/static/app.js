// agestream live page: each stream's annotated video, stats and people, and the counts of
// people who came into view (from the visits store). Vanilla JS over the JSON API; a ?token=
// in the page's URL is sent on.
"use strict";

const TOKEN = new URLSearchParams(location.search).get("token");
const STREAMS_EVERY_MS = 1000;
const COUNTS_EVERY_MS = 30000;
// A browser opens at most 6 connections to a server and each MJPEG image holds one; past this
// many streams the others show a still refreshed twice a second, so the API calls still get
// through.
const MAX_MJPEG = 4;
const STILL_EVERY_MS = 500;
// Every group and gender a person is counted under ("unknown": the model gave none).
const AGE_GROUPS = ["0-9", "10-19", "20-39", "40-59", "60+", "unknown"];
const GENDERS = ["male", "female", "unsure", "unknown"];
// The same colours as `agestream report`'s charts.
const COLOURS = {
  "0-9": "#8dd3c7", "10-19": "#80b1d3", "20-39": "#fdb462", "40-59": "#fb8072",
  "60+": "#bc80bd", male: "#4c78a8", female: "#e45756", unsure: "#b7b7b7", unknown: "#dcdcdc",
};
const HOUR_S = 3600;
const DAY_S = 86400;
const PERIOD_S = { hour: HOUR_S, day: DAY_S };
// Each range's length, bar period and alignment: a day's bars are whole hours and a week's
// whole UTC days (the last one still going); the last hour is exactly the last 60 minutes.
const RANGES = {
  hour: { seconds: HOUR_S, by: "hour", align: 0 },
  day: { seconds: DAY_S, by: "hour", align: HOUR_S },
  week: { seconds: 7 * DAY_S, by: "day", align: DAY_S },
};

const cards = new Map(); // stream id -> card
let lastCounts = null;
let countsAsked = 0; // numbers each counts request: only the latest one's answer is shown

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
  // In a cluster, the node serving it (it changes when a node dies and the stream moves).
  const node = card.root.querySelector(".node");
  node.hidden = !stream.node;
  node.textContent = stream.node ? `on node ${stream.node}` : "";
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

// ---- counts --------------------------------------------------------------------------------

// Unix seconds as ISO 8601 UTC to the second: 2024-05-01T13:00:00Z.
function isoSeconds(seconds) {
  return new Date(seconds * 1000).toISOString().replace(/\.\d{3}Z$/, "Z");
}

// The query of the range and camera picked now, as /api/counts and /api/counts.csv take it.
function countsQuery() {
  const range = RANGES[document.getElementById("counts-range").value] || RANGES.day;
  const now = Math.floor(Date.now() / 1000);
  const from = range.align
    ? Math.floor(now / range.align) * range.align - (range.seconds - range.align)
    : now - range.seconds;
  const query = new URLSearchParams({ from: isoSeconds(from), to: isoSeconds(now), by: range.by });
  const camera = document.getElementById("counts-camera").value;
  if (camera) query.set("camera", camera);
  return query.toString();
}

// The cameras to pick from: every one the store knows, and the one picked (it stays).
async function refreshCameras() {
  const select = document.getElementById("counts-camera");
  const picked = select.value;
  const names = new Set(await api("api/cameras"));
  if (picked) names.add(picked);
  const wanted = [...names].sort();
  const shown = [...select.options].slice(1).map((option) => option.value);
  if (shown.join("\n") === wanted.join("\n")) return;
  const options = wanted.map((name) => {
    const option = element("option", name);
    option.value = name;
    return option;
  });
  select.replaceChildren(select.options[0], ...options);
  select.value = picked;
}

async function refreshCounts() {
  const asked = ++countsAsked;
  const query = countsQuery();
  const message = document.getElementById("counts-error");
  // An <a> cannot send a header: the download carries the token in its URL.
  document.getElementById("counts-csv").href = withToken(`api/counts.csv?${query}`);
  let counts;
  try {
    [counts] = await Promise.all([api(`api/counts?${query}`), refreshCameras()]);
  } catch (error) {
    if (asked === countsAsked) message.textContent = `Cannot read the counts: ${error.message}`;
    return;
  }
  if (asked !== countsAsked) return; // the range or camera changed meanwhile
  message.textContent = "";
  lastCounts = counts;
  showCounts();
}

// One bar per period from the range's start to its end, empty ones included.
function countBins(counts) {
  const periodS = PERIOD_S[counts.by];
  const from = Date.parse(counts.from) / 1000;
  const to = Date.parse(counts.to) / 1000;
  const bins = new Map();
  for (let t = Math.floor(from / periodS) * periodS; t < to; t += periodS) {
    bins.set(t, { t, groups: {} });
  }
  for (const row of counts.rows) {
    if (!bins.has(row.start_unix)) bins.set(row.start_unix, { t: row.start_unix, groups: {} });
    const groups = bins.get(row.start_unix).groups;
    groups[row.age_group] = (groups[row.age_group] || 0) + row.people;
  }
  return [...bins.values()].sort((a, b) => a.t - b.t);
}

function formatSpan(counts) {
  const shown = (iso) => iso.slice(0, 16).replace("T", " ");
  return `${shown(counts.from)} to ${shown(counts.to)} UTC · ${counts.camera || "all cameras"}`;
}

function showCounts() {
  const counts = lastCounts;
  if (!counts) return;
  const { totals } = counts;
  document.getElementById("counts-total").textContent = String(totals.people);
  document.getElementById("counts-span").textContent = formatSpan(counts);
  document.querySelectorAll(".counts-period").forEach((node) => { node.textContent = counts.by; });
  drawBars(document.getElementById("chart-age"), countBins(counts), counts.by);
  drawLegend(document.getElementById("legend-age"), AGE_GROUPS, totals.age_groups, totals.people);
  drawSplit(document.getElementById("gender-split"), totals.genders, totals.people);
  drawLegend(document.getElementById("legend-gender"), GENDERS, totals.genders, totals.people);
}

function percent(count, total) {
  return total ? Math.round((100 * count) / total) : 0;
}

// Each key's count over the range and its share of everyone counted.
function drawLegend(container, keys, counts, total) {
  const items = keys.map((key) => {
    const count = counts[key] || 0;
    const item = element("li");
    item.dataset.key = key;
    const swatch = element("span", undefined, "swatch");
    swatch.style.background = COLOURS[key];
    item.append(swatch, `${key}: `, element("span", String(count), "count"),
      element("span", ` (${percent(count, total)}%)`, "muted"));
    return item;
  });
  container.replaceChildren(...items);
}

// A bar split by gender, each part as wide as its share.
function drawSplit(container, genders, total) {
  const parts = GENDERS.filter((key) => genders[key] > 0).map((key) => {
    const part = element("span");
    part.style.background = COLOURS[key];
    part.style.flexGrow = String(genders[key]);
    part.title = `${key}: ${genders[key]}`;
    return part;
  });
  container.replaceChildren(...parts);
  const shares = GENDERS.map((key) => `${key} ${percent(genders[key] || 0, total)}%`);
  container.setAttribute("aria-label", total ? shares.join(", ") : "no one counted");
}

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

function drawYAxis(context, box, yMax, step) {
  context.strokeStyle = "#e3e3e3";
  context.fillStyle = "#666";
  context.font = "11px system-ui, sans-serif";
  context.lineWidth = 1;
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
}

// Hours as 13:00, days as 05-01 (UTC), as many as fit without overlapping.
function drawTimeLabels(context, box, bins, slot, by) {
  const every = Math.ceil(bins.length / Math.max(1, Math.floor((box.right - box.left) / 56)));
  context.fillStyle = "#666";
  context.textAlign = "center";
  context.textBaseline = "top";
  bins.forEach((bin, i) => {
    if (i % every) return;
    const iso = isoSeconds(bin.t);
    const label = by === "hour" ? iso.slice(11, 16) : iso.slice(5, 10);
    context.fillText(label, box.left + (i + 0.5) * slot, box.bottom + 4);
  });
}

// Bars stacked by age group, one per period.
function drawBars(canvas, bins, by) {
  const { context, width, height } = fitCanvas(canvas);
  const binTotal = (bin) => AGE_GROUPS.reduce((sum, key) => sum + (bin.groups[key] || 0), 0);
  const totals = bins.map(binTotal);
  const step = Math.max(1, Math.ceil(Math.max(1, ...totals) / 4));
  const yMax = step * Math.ceil(Math.max(1, ...totals) / step);
  const box = { left: 32, right: width - 8, top: 8, bottom: height - 20 };
  box.y = (value) => box.bottom - (value / yMax) * (box.bottom - box.top);
  const slot = (box.right - box.left) / Math.max(1, bins.length);
  drawYAxis(context, box, yMax, step);
  bins.forEach((bin, i) => {
    let base = 0;
    for (const key of AGE_GROUPS) {
      const value = bin.groups[key] || 0;
      context.fillStyle = COLOURS[key];
      context.fillRect(box.left + (i + 0.1) * slot, box.y(base + value), slot * 0.8,
        box.y(base) - box.y(base + value));
      base += value;
    }
  });
  drawTimeLabels(context, box, bins, slot, by);
  const people = totals.reduce((sum, value) => sum + value, 0);
  if (people === 0) {
    context.fillStyle = "#999";
    context.textAlign = "center";
    context.textBaseline = "middle";
    const middle = [(box.left + box.right) / 2, (box.top + box.bottom) / 2];
    context.fillText("no one came into view", ...middle);
  }
  canvas.setAttribute("aria-label",
    `bar chart: ${people} people by age group in ${bins.length} bars of one ${by} each`);
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("add-form").addEventListener("submit", addStream);
  const countsForm = document.getElementById("counts-form");
  countsForm.addEventListener("change", () => refreshCounts());
  countsForm.addEventListener("submit", (event) => event.preventDefault());
  window.addEventListener("resize", showCounts);
  repeat(refreshStreams, STREAMS_EVERY_MS);
  repeat(refreshCounts, COUNTS_EVERY_MS);
});
