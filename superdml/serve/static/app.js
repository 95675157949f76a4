// superdml review page: a keyboard-first grid of crops, the map beside it, retrain.
// Every action goes through one promise chain, so keys pressed quickly apply in order,
// each on the grid its predecessor left. body[data-ack] counts acknowledged decisions.
"use strict";

const TOKEN = new URLSearchParams(location.search).get("token") || "";
const S = {
  info: null, items: [], focus: 0, anchor: null, mode: "queue", similarOf: null,
  start: 0, pageSize: 60, columns: 1, ack: 0, map: null, layers: {}, labelsOn: false,
  outline: null, dots: null, raster: null,
};
let chain = Promise.resolve();
const $ = (id) => document.getElementById(id);

function url(path) {
  return path + (path.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(TOKEN);
}

async function api(path, body) {
  const options = body === undefined ? {} : {
    method: "POST", body: JSON.stringify(body),
    headers: { "Content-Type": "application/json", "X-SuperDML-Token": TOKEN },
  };
  const response = await fetch(url(path), options);
  const data = await response.json();
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

function say(text, error) {
  $("status").textContent = text;
  $("status").classList.toggle("error", !!error);
}

function run(task) {
  document.body.dataset.busy = String(Number(document.body.dataset.busy) + 1);
  chain = chain.then(task).catch((err) => say(err.message, true)).finally(() => {
    document.body.dataset.busy = String(Number(document.body.dataset.busy) - 1);
  });
  return chain;
}

// ------------------------------------------------------------------ grid

function selection() {
  if (S.anchor === null) return S.items.length ? [S.items[S.focus]] : [];
  const [a, b] = [Math.min(S.anchor, S.focus), Math.max(S.anchor, S.focus)];
  return S.items.slice(a, b + 1);
}

function fmt(v) { return v === null || v === undefined ? "–" : v.toFixed(2); }

const cells = new Map();  // crop id -> its grid cell, kept so images are not loaded again

function cell(it) {
  let el = cells.get(it.id);
  if (el && el.dataset.src === it.src) return el;
  el = document.createElement("div");
  el.dataset.id = it.id;
  el.dataset.file = it.file;
  el.dataset.src = it.src;
  el.title = `${it.file}\npredicted ${it.predicted}, score ${fmt(it.score)}, margin ${fmt(it.margin)}`;
  const img = document.createElement("img");
  img.src = url(it.src);
  img.alt = it.file;
  const badge = document.createElement("div");
  badge.className = "badge";
  badge.style.background = it.color;
  badge.textContent = `${it.predicted ?? "?"} ${fmt(it.score)} / ${fmt(it.margin)}`;
  el.append(img, badge);
  el.addEventListener("click", (ev) => {
    const k = S.items.findIndex((x) => x.id === it.id);
    if (ev.shiftKey) { if (S.anchor === null) S.anchor = S.focus; } else S.anchor = null;
    S.focus = k;
    render();
  });
  cells.set(it.id, el);
  return el;
}

function render() {
  const grid = $("grid");
  const selected = new Set(selection().map((it) => it.id));
  const shown = S.items.map((it, k) => {
    const el = cell(it);
    const name = "crop" + (k === S.focus ? " focus" : "") +
      (S.anchor !== null && selected.has(it.id) ? " selected" : "");
    if (el.className !== name) el.className = name;
    return el;
  });
  // move only what changed (a decision takes a cell out and appends one): re-inserting
  // every cell would restyle the whole grid on each key
  const keep = new Set(shown);
  for (const child of [...grid.children]) if (!keep.has(child)) child.remove();
  shown.forEach((el, k) => { if (grid.children[k] !== el) grid.insertBefore(el, grid.children[k] || null); });
  if (cells.size > 4 * S.pageSize) {
    const keep = new Set(S.items.map((it) => it.id));
    for (const id of cells.keys()) if (!keep.has(id)) cells.delete(id);
  }
  const c = S.info ? S.info.counts : {};
  $("counts").textContent = `${c.pending} to sort · ${c.sorted} sorted · ${c.skipped} skipped`;
  $("page").textContent = S.mode === "queue"
    ? `${S.start + 1}–${S.start + S.items.length}` : "";
  $("mode").textContent = S.mode === "similar"
    ? `more like ${S.similarOf.file} (Esc: back to the queue)` : "least certain first";
  const first = grid.children[S.focus];
  if (first) first.scrollIntoView({ block: "nearest" });
  showOnMap();
}

function measureColumns() {  // on resize only: reading the grid's style forces a layout
  const style = getComputedStyle($("grid")).gridTemplateColumns;
  S.columns = Math.max(1, style.split(" ").length);
}

function show(page) {
  S.items = page.items;
  S.info.counts = page.counts;
  S.focus = Math.min(S.focus, Math.max(0, S.items.length - 1));
  S.anchor = null;
  render();
}

async function load() {
  if (S.mode === "similar") return similar(S.similarOf, true);
  show(await api(`/api/queue?start=${S.start}&n=${S.pageSize}`));
}

function pageRequest() {
  return S.mode === "queue" ? { start: S.start, n: S.pageSize } : {};
}

async function refresh(done) {
  if (done.page) show(done.page);
  else await load();
}

function acknowledge(text, counts) {
  S.ack += 1;
  S.info.counts = counts;
  document.body.dataset.ack = String(S.ack);
  say(text);
}

async function decide(op, extra) {
  const t0 = performance.now();
  const targets = selection();
  if (!targets.length) return;
  const ids = targets.map((it) => it.id);
  const done = await api(`/api/${op}`, { ids, ...extra, page: pageRequest() });
  const gone = new Set(ids);
  const at = Math.min(S.anchor ?? S.focus, S.focus);
  S.items = S.items.filter((it) => !gone.has(it.id));
  S.focus = Math.min(at, Math.max(0, S.items.length - 1));
  S.anchor = null;
  const what = op === "skip" ? "skipped" : `sorted into ${extra.accept ? "predicted classes" : extra.class}`;
  acknowledge(`${ids.length} ${what}`, done.counts);
  await refresh(done);
  document.body.dataset.roundTripMs = (performance.now() - t0).toFixed(1);
}

async function undo() {
  const done = await api("/api/undo", { page: pageRequest() });
  acknowledge(done.undone.length ? `undid ${done.undone.length}` : "nothing to undo", done.counts);
  await refresh(done);
  const k = S.items.findIndex((it) => it.id === done.undone[0]);
  if (k >= 0) { S.focus = k; render(); }
}

async function similar(item, refresh) {
  if (!item) return;
  if (!refresh) { S.mode = "similar"; S.similarOf = item; S.focus = 0; }
  for (;;) {
    const found = await api(`/api/similar/${item.id}?k=${S.pageSize}`);
    if (found.error) throw new Error(found.error);
    if (found.ready) { S.items = found.items; break; }
    say(`more like this: embedding the mosaic, tile ${found.done} / ${found.total} (${found.kept} kept)`);
    await new Promise((r) => setTimeout(r, 300));
  }
  S.focus = Math.min(S.focus, Math.max(0, S.items.length - 1));
  S.anchor = null;
  render();
}

function move(delta, extend) {
  if (!S.items.length) return;
  if (extend && S.anchor === null) S.anchor = S.focus;
  if (!extend) S.anchor = null;
  S.focus = Math.max(0, Math.min(S.items.length - 1, S.focus + delta));
  render();
}

// ------------------------------------------------------------------- map

function initMap() {
  const rasters = Object.keys(S.info.rasters);
  if (!rasters.length || typeof L === "undefined") { $("map").textContent = "no map (segment run not found)"; return; }
  S.map = L.map("map", { crs: L.CRS.Simple, minZoom: 0, attributionControl: false });
  S.dots = L.layerGroup().addTo(S.map);
  const overlays = {};
  for (const name of rasters) {
    const top = S.info.max_zoom[name];
    const options = { maxNativeZoom: top, maxZoom: top + 3, minZoom: 0, tileSize: 256, noWrap: true };
    S.layers[name] = {
      image: L.tileLayer(url(`/map/image/${encodeURIComponent(name)}/{z}/{x}/{y}.png`), options),
      labels: S.info.rasters[name].labels
        ? L.tileLayer(url(`/map/labels/${encodeURIComponent(name)}/{z}/{x}/{y}.png`), { ...options, opacity: 0.6 })
        : null,
      top,
    };
    if (S.layers[name].labels) overlays[`classes (${name})`] = S.layers[name].labels;
  }
  if (Object.keys(overlays).length) L.control.layers({}, overlays).addTo(S.map);
  S.map.on("overlayadd", () => { S.labelsOn = true; });
  S.map.on("overlayremove", () => { S.labelsOn = false; });
  useRaster(rasters[0]);
  const { height, width } = S.info.rasters[rasters[0]];
  S.map.fitBounds([toLatLng(0, 0), toLatLng(height, width)]);
}

function toLatLng(row, col) {
  return S.map.unproject([col, row], S.layers[S.raster].top);
}

function useRaster(name) {
  if (S.raster === name) return;
  if (S.raster) {
    S.map.removeLayer(S.layers[S.raster].image);
    if (S.layers[S.raster].labels) S.map.removeLayer(S.layers[S.raster].labels);
  }
  S.raster = name;
  S.layers[name].image.addTo(S.map);
  if (S.labelsOn && S.layers[name].labels) S.layers[name].labels.addTo(S.map);
}

function toggleLabels() {
  const layer = S.raster && S.layers[S.raster].labels;
  if (!layer) return;
  if (S.map.hasLayer(layer)) { S.map.removeLayer(layer); S.labelsOn = false; }
  else { layer.addTo(S.map); S.labelsOn = true; }
}

async function showOnMap() {
  if (!S.map || !S.items.length) return;
  const item = S.items[S.focus];
  if (item.row === undefined || !S.layers[item.raster]) return;
  useRaster(item.raster);
  S.dots.clearLayers();
  for (const it of S.items) {
    if (it.raster === item.raster && it.row !== undefined) {
      L.circleMarker(toLatLng(it.row, it.col), { radius: 4, color: it.color, weight: 2 }).addTo(S.dots);
    }
  }
  S.map.setView(toLatLng(item.row, item.col), Math.max(S.map.getZoom(), S.layers[item.raster].top + 1));
  const shape = await api(`/api/outline/${item.id}`);
  if (S.items[S.focus] !== item) return;
  if (S.outline) S.map.removeLayer(S.outline);
  S.outline = L.polygon(shape.rings.map((ring) => ring.map(([r, c]) => toLatLng(r, c))),
    { color: "#ffeb3b", weight: 2, fill: false }).addTo(S.map);
}

// --------------------------------------------------------------- retrain

function showRetrain(st) {
  $("retrain").hidden = false;
  $("retrain").dataset.state = st.state;
  $("retrain-state").textContent = `retrain round ${st.round}: ${st.state}`;
  const inc = st.includes || {};
  $("retrain-includes").textContent = inc.decisions === undefined ? "" :
    `includes decisions 1–${inc.last_seq} of the journal: ${inc.decisions} sorted crops; ` +
    `training folder ${Object.entries(inc.per_class || {}).map(([c, n]) => `${c} ${n}`).join(", ")}`;
  $("retrain-log").textContent = (st.log || []).join("\n");
  if (st.before && st.after) {
    const body = $("metrics").querySelector("tbody");
    body.replaceChildren();
    for (const name of Object.keys(st.after)) {
      const row = document.createElement("tr");
      row.dataset.metric = name;
      row.innerHTML = `<td>${name}</td><td class="before">${fmt4(st.before[name])}</td><td class="after">${fmt4(st.after[name])}</td>`;
      body.append(row);
    }
    $("metrics").hidden = false;
    $("retrain-state").textContent += ` — new labels in ${st.labels}`;
    $("next-queue-btn").hidden = false;
  }
}

async function nextQueue() {
  say("reviewing the new run's least certain superpixels…");
  const done = await api("/api/retrain/next", {});
  location.reload();  // the page of the new folder (same token)
  return done;
}

function fmt4(v) { return typeof v === "number" ? v.toFixed(4) : String(v ?? "–"); }

async function retrain() {
  const st = await api("/api/retrain/start", {});
  showRetrain(st);
  say(`retrain round ${st.round} started`);
}

function followRetrain() {
  const events = new EventSource(url("/api/retrain/events"));
  events.onmessage = (ev) => {
    const st = JSON.parse(ev.data);
    if (st.round > 0) showRetrain(st);
  };
}

// ------------------------------------------------------------------ keys

function onKey(ev) {
  if (ev.target instanceof HTMLInputElement || ev.ctrlKey || ev.metaKey || ev.altKey) return;
  const k = ev.key;
  const classes = S.info.classes;
  let handled = true;
  if (k === "?") $("help").hidden = !$("help").hidden;
  else if (/^[1-9]$/.test(k) && Number(k) <= classes.length) run(() => decide("sort", { class: classes[Number(k) - 1].name }));
  else if (k === "Enter") run(() => decide("sort", { accept: true }));
  else if (k === "s") run(() => decide("skip", {}));
  else if (k === "u") run(undo);
  else if (k === "m") run(() => similar(S.items[S.focus]));
  else if (k === "l") toggleLabels();
  else if (k === "R") run(retrain);
  else if (k === "Escape") {
    $("help").hidden = true;
    if (S.anchor !== null) { S.anchor = null; render(); }
    else if (S.mode !== "queue") { S.mode = "queue"; run(load); }
  } else if (k.startsWith("Arrow")) {
    const delta = { ArrowLeft: -1, ArrowRight: 1, ArrowUp: -S.columns, ArrowDown: S.columns }[k];
    run(() => move(delta, ev.shiftKey));
  } else if (k === "PageDown" && S.mode === "queue") { S.start += S.pageSize; S.focus = 0; run(load); }
  else if (k === "PageUp" && S.mode === "queue") { S.start = Math.max(0, S.start - S.pageSize); S.focus = 0; run(load); }
  else handled = false;
  if (handled) ev.preventDefault();
}

function legend() {
  const box = $("legend");
  for (const c of S.info.classes) {
    const span = document.createElement("span");
    span.className = "cls";
    span.dataset.class = c.name;
    span.innerHTML = `<kbd>${c.key}</kbd><span class="swatch" style="background:${c.color}"></span>`;
    span.append(document.createTextNode(c.name));
    span.addEventListener("click", () => run(() => decide("sort", { class: c.name })));
    box.append(span);
  }
}

async function main() {
  S.info = await api("/api/info");
  $("folder").textContent = S.info.folder + " → " + S.info.train_dir;
  legend();
  document.addEventListener("keydown", onKey);
  $("size").addEventListener("input", (ev) => {
    $("grid").style.setProperty("--cell", ev.target.value + "px");
    measureColumns();
    render();
  });
  $("help-btn").addEventListener("click", () => { $("help").hidden = !$("help").hidden; });
  $("retrain-btn").addEventListener("click", () => run(retrain));
  $("retrain-btn").disabled = !S.info.can_retrain;
  $("next-queue-btn").addEventListener("click", () => run(nextQueue));
  $("similar-btn").addEventListener("click", () => run(() => similar(S.items[S.focus])));
  $("similar-btn").disabled = !S.info.similar;
  $("queue-btn").addEventListener("click", () => { S.mode = "queue"; run(load); });
  $("prev").addEventListener("click", () => { S.start = Math.max(0, S.start - S.pageSize); run(load); });
  $("next").addEventListener("click", () => { S.start += S.pageSize; run(load); });
  initMap();
  await load();
  measureColumns();
  window.addEventListener("resize", measureColumns);
  document.body.dataset.readyMs = performance.now().toFixed(1);  // since navigation
  document.body.dataset.ready = "1";
  followRetrain();
}

run(main);
