// IDLoRA frontend extension: a sidebar panel for background training jobs, and job progress on nodes.
//
// The panel rebuilds from GET /idlora/jobs (so a page reload loses nothing) and then follows the
// websocket events the job manager sends: "idlora.job" (status, progress, loss) and "idlora.sample".
// Each job is a card built once and then updated in place (a websocket event marks it dirty; dirty cards are
// redrawn at most every UPDATE_MS); the loss chart is uPlot (web/lib/uplot, MIT), fed with setData.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import uPlot from "./lib/uplot/uPlot.esm.js";

const JOB_TYPE = "IDLORA_JOB"; // the wire type of a job id: any node with such an input or output shows its job
const RUNNING = new Set(["queued", "running"]);
const RESUMABLE = new Set(["failed", "cancelled", "interrupted"]);
const UPDATE_MS = 150; // cards redraw at most this often, whatever the event rate
const LOSS_FETCH_MS = 1000; // the incremental loss route is asked at most once a second per job
const CHART_HEIGHT = 130;
const PHASE_COLOURS = ["#4a9eff", "#f5a623", "#5ccf7a", "#d96bff", "#ff6b6b"];
const LOADABLE = ["content_lora", "lora"]; // result keys naming a file under models/loras (in the order shown)
const NOT_LORAS = ["meta_down", "difflora", "lae", "dataset"]; // result keys naming other outputs: shown, no button

const jobs = new Map(); // id -> job data (see entry())
const cards = new Map(); // id -> the card's elements and chart, for updates in place
const dirty = new Set();
let flushTimer = null;
let panel = null;

loadStyles();

async function getJSON(path, init) {
  const r = await api.fetchApi(path, init);
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || `${r.status}`);
  return body;
}

function entry(id) {
  if (!jobs.has(id)) {
    jobs.set(id, {
      status: null, sample: null,
      steps: [], raw: [], ema: [], phase: [], // one element per loss row
      emaState: { phase: null, m: 0, n: 0 },
      lossVersion: 0, lossEpoch: 0, lossFetch: 0, lossBusy: false, lossAgain: false, lossTimer: null,
    });
  }
  return jobs.get(id);
}

async function refreshAll() {
  const { jobs: list } = await getJSON("/idlora/jobs");
  for (const st of list) {
    entry(st.id).status = st;
    fetchLosses(st.id, true);
    fetchLatestSample(st.id);
  }
  render();
}

// -- the loss series: raw rows and their EMA (debiased, restarted at each phase) ----------------------------
function emaBeta(e) {
  const points = (e.status?.total || 100) / (e.status?.total > 2000 ? 5 : 1);
  const span = Math.min(50, Math.max(5, Math.round(points / 40))); // about 40 EMA spans per chart
  return 1 - 1 / span;
}

function appendLoss(e, step, phase, loss) {
  const s = e.emaState, beta = emaBeta(e);
  if (s.phase !== phase) Object.assign(s, { phase, m: 0, n: 0 });
  let smoothed = null;
  if (Number.isFinite(loss)) {
    s.m = beta * s.m + (1 - beta) * loss;
    s.n += 1;
    smoothed = s.m / (1 - beta ** s.n);
  }
  e.steps.push(step);
  e.raw.push(Number.isFinite(loss) ? loss : null);
  e.ema.push(smoothed);
  e.phase.push(phase);
}

function clearLosses(e) {
  e.steps = []; e.raw = []; e.ema = []; e.phase = [];
  e.emaState = { phase: null, m: 0, n: 0 };
  e.lossEpoch += 1; // a fetch in flight was asked from the old series: its rows are dropped
  e.lossVersion += 1;
}

function fetchLosses(id, force = false) {
  const e = entry(id);
  const wait = e.lossFetch + LOSS_FETCH_MS - performance.now();
  if (e.lossBusy) { e.lossAgain = true; return; }
  if (!force && wait > 0) { // throttled: fetch once more when the second is over, so the last rows arrive
    e.lossTimer ??= setTimeout(() => { e.lossTimer = null; fetchLosses(id, true); }, wait);
    return;
  }
  e.lossFetch = performance.now();
  e.lossBusy = true;
  const since = e.steps.length ? e.steps[e.steps.length - 1] : 0;
  const stride = e.status && e.status.total > 2000 ? 5 : 1;
  const epoch = e.lossEpoch;
  getJSON(`/idlora/jobs/${id}/loss?since_step=${since}&stride=${stride}`)
    .then(({ losses }) => {
      if (epoch !== e.lossEpoch) { e.lossAgain = true; return; }
      if (losses.length && losses[0].step <= since) clearLosses(e); // rewound by a restart
      for (const r of losses) appendLoss(e, r.step, r.phase ?? "", r.loss);
      if (losses.length) { e.lossVersion += 1; renderJob(id); }
    })
    .catch((err) => console.warn(`IDLoRA: could not read the loss of job ${id}`, err))
    .finally(() => {
      e.lossBusy = false;
      if (e.lossAgain) { e.lossAgain = false; fetchLosses(id); }
    });
}

async function fetchLatestSample(id) {
  try {
    const { samples } = await getJSON(`/idlora/jobs/${id}/samples`);
    const last = samples[samples.length - 1];
    if (last) {
      entry(id).sample = { url: api.apiURL(last.url), step: last.step };
      renderJob(id);
    }
  } catch (err) {
    console.warn(`IDLoRA: could not list the samples of job ${id}`, err);
  }
}

async function act(id, verb) {
  try {
    entry(id).status = await getJSON(`/idlora/jobs/${id}/${verb}`, { method: "POST" });
    if (verb === "restart") clearLosses(entry(id));
  } catch (err) {
    notify("error", `Could not ${verb} job ${id}`, err.message);
  }
  renderJob(id);
}

function notify(severity, summary, detail) {
  const toast = app.extensionManager?.toast;
  if (toast) toast.add({ severity, summary: `IDLoRA: ${summary}`, detail, life: 8000 });
  else console.warn(`IDLoRA: ${summary}: ${detail}`);
}

// -- loading a job's LoRA into the graph ------------------------------------------------------------------
function addLoraLoader(file) {
  const graph = app.canvas?.graph ?? app.graph;
  const node = window.LiteGraph?.createNode("LoraLoaderModelOnly");
  const widget = node?.widgets?.find((w) => w.name === "lora_name");
  if (!graph || !widget) {
    notify("error", "Could not add a LoRA loader", "the LoraLoaderModelOnly node is not available");
    return null;
  }
  widget.value = file;
  widget.callback?.(file, app.canvas, node);
  const area = app.canvas?.visible_area; // [x, y, width, height] of the viewport, in graph coordinates
  if (area && area[2] > 0) {
    node.pos = [area[0] + area[2] / 2 - node.size[0] / 2, area[1] + area[3] / 3 - node.size[1] / 2];
  }
  graph.beforeChange?.();
  graph.add(node);
  graph.afterChange?.();
  app.canvas?.selectNode?.(node);
  graph.setDirtyCanvas?.(true, true);
  notify("success", "LoRA loader added", `${file}: connect its model input and output`);
  return node;
}

// the job's output files: [label, file name, loadable]
function outputs(st) {
  const r = st.result || {}, seen = new Set(), out = [];
  for (const key of LOADABLE) {
    if (typeof r[key] === "string" && r[key] && !seen.has(r[key])) {
      seen.add(r[key]);
      out.push([key === "content_lora" ? "content" : r.content_lora ? "style" : "LoRA", r[key], true]);
    }
  }
  const other = NOT_LORAS.find((k) => r[k]);
  if (other) { // a Meta-Down, LAE, DiffLoRA file or a dataset folder: not something LoraLoader reads
    for (const [label, file] of out.splice(0)) out.push([label, file, false]);
    for (const key of NOT_LORAS) if (r[key]) out.push([key.replace("_", "-"), String(r[key]).split(/[\\/]/).pop(), false]);
  }
  return out;
}

// -- rendering --------------------------------------------------------------------------------------------
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "style") Object.assign(node.style, v);
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

function duration(s) {
  if (!Number.isFinite(s) || s < 0) return "–";
  s = Math.round(s);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${String(s % 60).padStart(2, "0")}s`;
  return `${Math.floor(s / 3600)}h ${String(Math.floor(s / 60) % 60).padStart(2, "0")}m`;
}

function fmtLoss(v) {
  return v == null || !Number.isFinite(v) ? "–" : Math.abs(v) >= 100 ? v.toFixed(1) : v.toPrecision(4);
}

function timeText(st) {
  if (st.state === "queued") return ["queued", st.step ? `resumes at step ${st.step}` : ""];
  const end = st.finished ?? (st.state === "running" ? Date.now() / 1000 : null);
  const elapsed = st.started && end ? duration(end - st.started) : "–";
  if (st.state === "running") {
    const left = st.sec_per_step && st.total ? (st.total - st.step) * st.sec_per_step : NaN;
    return [`elapsed ${elapsed}`, `ETA ${Number.isFinite(left) ? duration(left) : "…"}`];
  }
  if (st.state === "succeeded") return [`took ${elapsed}`, ""];
  return [`ran ${elapsed}`, `stopped at step ${st.step}`];
}

function phasesOf(e) {
  const list = [...(e.status?.phases || [])];
  for (const p of e.phase) if (!list.includes(p)) list.push(p);
  return list.length ? list : [""];
}

function chartData(e, phases) {
  const data = [e.steps.slice(), e.raw.slice()]; // copies: the job's arrays grow between two setData calls
  if (phases.length === 1) data.push(e.ema.slice());
  else for (const p of phases) data.push(e.ema.map((v, i) => (e.phase[i] === p ? v : null)));
  return data;
}

function lastValue(arr) {
  for (let i = arr.length - 1; i >= 0; i--) if (arr[i] != null) return arr[i];
  return null;
}

function makeChart(view, e, phases) {
  const fg = getComputedStyle(view.chart).color || "#ccc";
  const grid = { stroke: "rgba(128,128,128,0.18)", width: 1 };
  const ticks = { stroke: "rgba(128,128,128,0.35)", width: 1, size: 4 };
  const font = "10px sans-serif";
  const multi = phases.length > 1;
  const value = (fmt) => (u, v, si, di) => fmt(di == null ? lastValue(u.data[si]) : v); // idle: the latest
  const opts = {
    width: Math.max(view.chart.clientWidth, 200),
    height: CHART_HEIGHT,
    scales: { x: { time: false } },
    cursor: { drag: { x: false, y: false }, points: { size: 5 } },
    legend: { show: true, live: true },
    axes: [
      { stroke: fg, grid, ticks, font, size: 24, space: 34 },
      { stroke: fg, grid, ticks, font, size: 42, space: 24, values: (u, vs) => vs.map((v) => +v.toPrecision(3)) },
    ],
    series: [
      { label: "step", value: value((v) => (v == null ? "–" : v)) },
      { label: "loss", stroke: multi ? "rgba(170,178,190,0.55)" : "rgba(74,158,255,0.6)", width: 1,
        points: { show: false }, value: value(fmtLoss) },
      ...phases.map((p, i) => ({
        label: multi ? p : "EMA", stroke: PHASE_COLOURS[(multi ? i : 1) % PHASE_COLOURS.length], width: 2,
        points: { show: false }, spanGaps: false, value: value(fmtLoss),
      })),
    ],
  };
  view.plot?.destroy();
  view.plot = new uPlot(opts, chartData(e, phases), view.chart);
  const legend = view.plot.root.querySelector(".u-legend");
  if (legend) legend.title = `faint: the loss of each step; bold: its moving average (EMA)${multi ? ", one colour per phase" : ""}`;
  view.phaseKey = phases.join("\u0000");
}

function updateChart(view, e) {
  const phases = phasesOf(e);
  if (!view.plot || view.phaseKey !== phases.join("\u0000")) makeChart(view, e, phases);
  else view.plot.setData(chartData(e, phases));
  if (view.plot.cursor.idx == null) view.plot.setLegend({ idx: null }); // the legend shows the latest values
  view.chart.dataset.points = String(e.steps.length);
  view.chart.dataset.phases = phases.join(",");
  view.lossVersion = e.lossVersion;
}

function makeCard(id) {
  const card = el("div", { class: "idlora-job", "data-job": id });
  const view = {
    id, card,
    name: el("b", { class: "idlora-name" }),
    state: el("span", { class: "idlora-state" }),
    fill: el("div", { class: "idlora-progress-fill" }),
    steps: el("div", { class: "idlora-steps" }),
    elapsed: el("span", { class: "idlora-elapsed" }),
    eta: el("span", { class: "idlora-eta" }),
    chart: el("div", { class: "idlora-chart", "data-points": "0" }),
    sample: el("figure", { class: "idlora-sample-box" }),
    error: el("div", { class: "idlora-error" }),
    files: el("div", { class: "idlora-files" }),
    buttons: el("div", { class: "idlora-buttons" }),
    plot: null, phaseKey: null, lossVersion: -1, sampleURL: null, actionsKey: null, width: 0,
  };
  view.progress = el("div", { class: "idlora-progress" }, view.fill);
  card.append(
    el("div", { class: "idlora-head" }, view.name, view.state),
    view.progress,
    el("div", { class: "idlora-meta" }, view.steps, el("div", { class: "idlora-time" }, view.elapsed, view.eta)),
    view.chart, view.sample, view.error, view.files, view.buttons,
  );
  view.resize = new ResizeObserver(() => {
    const w = view.chart.clientWidth;
    if (view.plot && w > 0 && Math.abs(w - view.width) > 1) {
      view.width = w;
      view.plot.setSize({ width: w, height: CHART_HEIGHT });
    }
  });
  view.resize.observe(view.chart);
  view.destroy = () => { view.resize.disconnect(); view.plot?.destroy(); view.plot = null; };
  return view;
}

function updateCard(view) {
  const e = entry(view.id), st = e.status;
  const pct = st.total ? Math.round((100 * st.step) / st.total) : 0;
  const multi = st.phases && st.phases.length > 1;
  view.card.dataset.state = st.state;
  view.name.textContent = st.name;
  view.name.title = `${st.name} (${st.kind}, ${st.id})`;
  view.state.textContent = `${st.state}${st.phase && multi ? " · " + st.phase : ""}`;
  view.state.dataset.state = st.state;
  view.progress.title = `${st.step}/${st.total}`;
  view.fill.style.width = `${pct}%`;
  const loss = st.loss == null ? "" : ` · loss ${st.loss.toFixed(4)}`;
  view.steps.textContent =
    `step ${st.step}/${st.total} (${pct}%)${loss}${st.sec_per_step ? ` · ${st.sec_per_step.toFixed(2)} s/step` : ""}`;
  updateTime(view);
  if (view.lossVersion !== e.lossVersion || !view.plot) updateChart(view, e);
  if (e.sample && e.sample.url !== view.sampleURL) {
    view.sampleURL = e.sample.url;
    view.sample.replaceChildren(
      el("img", { class: "idlora-sample", src: e.sample.url, alt: "latest preview sample" }),
      el("figcaption", {}, e.sample.step != null ? `preview at step ${e.sample.step}` : "preview"));
  }
  view.error.textContent = st.error && st.state !== "succeeded" ? st.error : "";
  const files = outputs(st);
  const key = `${st.state}|${JSON.stringify(files)}`;
  if (key !== view.actionsKey) { // rebuilt only when they change, so a click never lands on a replaced button
    view.actionsKey = key;
    view.files.replaceChildren(...files.map(([label, file]) => el("div", { class: "idlora-file" },
      el("span", { class: "idlora-file-label" }, label),
      el("code", { class: "idlora-file-name", title: file }, ...file.split("/").flatMap((part, i) => (i ? ["/", el("wbr"), part] : [part]))))));
    const loadable = files.filter(([, , ok]) => ok), b = [];
    for (const [label, file] of loadable) { // one click: a stock LoraLoaderModelOnly node with this file
      b.push(el("button", { class: "idlora-load", "data-lora": file, onclick: () => addLoraLoader(file),
        title: `Add a LoraLoaderModelOnly node with ${file} to the graph` }, loadable.length > 1 ? `Load ${label}` : "Load LoRA"));
    }
    if (RUNNING.has(st.state)) b.push(el("button", { class: "idlora-cancel", onclick: () => act(view.id, "cancel") }, "Cancel"));
    if (RESUMABLE.has(st.state)) b.push(el("button", { class: "idlora-resume", onclick: () => act(view.id, "resume") }, "Resume"));
    if (RESUMABLE.has(st.state)) b.push(el("button", { class: "idlora-restart", title: "Start again from step 0 (discards the checkpoints)", onclick: () => act(view.id, "restart") }, "Restart"));
    view.buttons.replaceChildren(...b);
  }
}

function updateTime(view) {
  const [elapsed, eta] = timeText(entry(view.id).status);
  view.elapsed.textContent = elapsed;
  view.eta.textContent = eta;
}

function renderJob(id) {
  dirty.add(id);
  flushTimer ??= setTimeout(flush, UPDATE_MS);
}

function flush() {
  flushTimer = null;
  if (!panel?.isConnected) return dirty.clear(); // closed: the next render() rebuilds from the job data
  const ids = [...dirty];
  dirty.clear();
  if (ids.some((id) => entry(id).status && !cards.has(id))) return render(); // a new job: lay out the list again
  for (const id of ids) if (cards.has(id)) updateCard(cards.get(id));
}

function render() {
  if (!panel) return;
  for (const view of cards.values()) view.destroy();
  cards.clear();
  const list = [...jobs.values()].filter((e) => e.status).sort((a, b) => b.status.created - a.status.created);
  const views = list.map((e) => makeCard(e.status.id));
  panel.replaceChildren(
    el("div", { class: "idlora-header" },
      el("h3", {}, "IDLoRA jobs"),
      el("button", { class: "idlora-refresh", onclick: () => refreshAll() }, "Refresh")),
    list.length ? "" : el("div", { class: "idlora-empty" },
      "No jobs yet. Set a training node's mode to 'background' and queue the workflow."),
    ...views.map((v) => v.card),
  );
  for (const v of views) { cards.set(v.id, v); updateCard(v); } // after insertion: the chart needs its width
}

setInterval(() => { // elapsed and ETA tick between events
  if (!panel?.isConnected) return;
  for (const view of cards.values()) if (entry(view.id).status?.state === "running") updateTime(view);
}, 1000);

function loadStyles() {
  if (document.getElementById("idlora-styles")) return;
  document.head.append(
    el("link", { rel: "stylesheet", href: new URL("./lib/uplot/uPlot.min.css", import.meta.url).href }),
    el("style", { id: "idlora-styles" }, `
.idlora-panel { padding: 8px 10px; overflow-y: auto; height: 100%; box-sizing: border-box; font-size: 13px; }
.idlora-header { display: flex; justify-content: space-between; align-items: center; margin-bottom: 4px; }
.idlora-header h3 { margin: 4px 0; font-size: 15px; }
.idlora-empty { opacity: 0.7; }
.idlora-panel button { background: var(--comfy-input-bg, #222); color: var(--input-text, #ddd); cursor: pointer;
  border: 1px solid var(--border-color, #555); border-radius: 5px; padding: 3px 12px; font-size: 12px; }
.idlora-panel button:hover { border-color: #4a9eff; }
.idlora-job { border: 1px solid var(--border-color, #444); border-radius: 8px; padding: 10px 12px; margin: 10px 0;
  background: rgba(128, 128, 128, 0.06); }
.idlora-head { display: flex; justify-content: space-between; align-items: center; gap: 8px; }
.idlora-name { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.idlora-state { font-size: 11px; padding: 1px 8px; border-radius: 9px; white-space: nowrap;
  background: rgba(128, 128, 128, 0.25); }
.idlora-state[data-state="running"] { background: rgba(74, 158, 255, 0.25); color: #8cc4ff; }
.idlora-state[data-state="succeeded"] { background: rgba(92, 207, 122, 0.22); color: #7fdc98; }
.idlora-state[data-state="failed"] { background: rgba(255, 107, 107, 0.22); color: #ff9a9a; }
.idlora-state[data-state="cancelled"], .idlora-state[data-state="interrupted"] {
  background: rgba(245, 166, 35, 0.2); color: #f7bf62; }
.idlora-progress { height: 6px; background: rgba(128, 128, 128, 0.3); border-radius: 3px; margin: 8px 0 6px;
  overflow: hidden; }
.idlora-progress-fill { height: 100%; background: #4a9eff; transition: width 0.3s; }
.idlora-job[data-state="succeeded"] .idlora-progress-fill { background: #5ccf7a; }
.idlora-job[data-state="failed"] .idlora-progress-fill { background: #ff6b6b; }
.idlora-meta { font-size: 12px; opacity: 0.85; line-height: 1.5; font-variant-numeric: tabular-nums; }
.idlora-time { display: flex; justify-content: space-between; gap: 8px; }
.idlora-chart { width: 100%; margin-top: 6px; min-height: ${CHART_HEIGHT}px; }
.idlora-chart .uplot { width: 100%; font-family: inherit; }
.idlora-chart .u-legend { font-size: 11px; line-height: 1.3; margin-top: 2px; font-variant-numeric: tabular-nums; }
.idlora-chart .u-legend .u-series > * { padding: 1px 3px; }
.idlora-chart .u-legend .u-marker { width: 0.9em; height: 0.9em; }
.idlora-sample-box { margin: 6px 0 0; text-align: center; }
.idlora-sample-box:empty { display: none; }
.idlora-sample { max-width: 100%; max-height: 160px; border-radius: 4px; image-rendering: auto; }
.idlora-sample-box figcaption { font-size: 11px; opacity: 0.65; }
.idlora-error { color: #ff8a8a; font-size: 12px; white-space: pre-wrap; }
.idlora-error:empty, .idlora-files:empty, .idlora-buttons:empty { display: none; }
.idlora-files { margin-top: 8px; display: flex; flex-direction: column; gap: 4px; }
.idlora-file { font-size: 12px; line-height: 1.4; }
.idlora-file-label { opacity: 0.65; margin-right: 6px; }
.idlora-file-name { overflow-wrap: anywhere; font-size: 11px; }
.idlora-buttons { display: flex; flex-wrap: wrap; gap: 6px; margin-top: 8px; }
`));
}

// -- nodes that own a job show its progress ---------------------------------------------------------------
function jobOfNode(node) {
  return node.idloraJob ? entry(node.idloraJob).status : null;
}

function handlesJobs(nodeData) {
  const inputs = { ...(nodeData.input?.required || {}), ...(nodeData.input?.optional || {}) };
  return (nodeData.output || []).includes(JOB_TYPE) || Object.values(inputs).some((spec) => spec?.[0] === JOB_TYPE);
}

function decorate(nodeType) {
  nodeType.prototype.idloraShowsJob = true;
  const onExecuted = nodeType.prototype.onExecuted;
  nodeType.prototype.onExecuted = function (message) {
    onExecuted?.apply(this, arguments);
    const id = message?.idlora_job?.[0];
    if (id) {
      this.idloraJob = id;
      getJSON(`/idlora/jobs/${id}`).then((st) => { entry(id).status = st; this.setDirtyCanvas(true); });
    }
  };
  const onDraw = nodeType.prototype.onDrawForeground;
  nodeType.prototype.onDrawForeground = function (ctx) {
    onDraw?.apply(this, arguments);
    const st = jobOfNode(this);
    if (!st || this.flags?.collapsed) return;
    const w = this.size[0], y = this.size[1] + 4, frac = st.total ? st.step / st.total : 0;
    ctx.fillStyle = "#333";
    ctx.fillRect(0, y, w, 14);
    ctx.fillStyle = st.state === "failed" ? "#c44" : "#4a9eff";
    ctx.fillRect(0, y, w * frac, 14);
    ctx.fillStyle = "#fff";
    ctx.font = "11px sans-serif";
    ctx.fillText(`job ${st.state} ${st.step}/${st.total}`, 4, y + 11);
  };
}

app.registerExtension({
  name: "IDLoRA.jobs",
  async setup() {
    api.addEventListener("idlora.job", ({ detail }) => {
      const e = entry(detail.id);
      const previous = e.status;
      e.status = detail;
      if (previous && previous.step > detail.step) clearLosses(e); // restarted from step 0
      if (detail.loss != null) fetchLosses(detail.id, !RUNNING.has(detail.state));
      renderJob(detail.id);
      app.graph?.setDirtyCanvas(true, false);
    });
    api.addEventListener("idlora.sample", ({ detail }) => {
      entry(detail.id).sample = { url: api.apiURL(`/idlora/jobs/${detail.id}/samples/${detail.file}`), step: detail.step };
      renderJob(detail.id);
    });
    api.addEventListener("reconnected", () => refreshAll());
    app.extensionManager.registerSidebarTab({
      id: "idlora-jobs",
      icon: "pi pi-chart-line",
      title: "IDLoRA",
      tooltip: "IDLoRA training jobs",
      type: "custom",
      render: (container) => {
        panel = el("div", { class: "idlora-panel" });
        container.append(panel);
        render();
        refreshAll().catch((err) => console.warn("IDLoRA: could not list jobs", err));
      },
    });
    refreshAll().catch((err) => console.warn("IDLoRA: could not list jobs", err));
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (handlesJobs(nodeData)) decorate(nodeType);
  },
});
