// IDLoRA frontend extension: a sidebar panel for background training jobs, and job progress on nodes.
//
// The panel rebuilds from GET /idlora/jobs (so a page reload loses nothing) and then follows the
// websocket events the job manager sends: "idlora.job" (status, progress, loss) and "idlora.sample".
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const JOB_TYPE = "IDLORA_JOB"; // the wire type of a job id: any node with such an input or output shows its job
const RUNNING = new Set(["queued", "running"]);
const RESUMABLE = new Set(["failed", "cancelled", "interrupted"]);

const jobs = new Map(); // id -> { status, losses: [[step, loss]], sample }
let panel = null;

async function getJSON(path, init) {
  const r = await api.fetchApi(path, init);
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || `${r.status}`);
  return body;
}

function entry(id) {
  if (!jobs.has(id)) jobs.set(id, { status: null, losses: [], sample: null, lossFetch: 0 });
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

async function fetchLosses(id, force = false) {
  const e = entry(id);
  const now = performance.now();
  if (!force && now - e.lossFetch < 1000) return; // at most once a second per job
  e.lossFetch = now;
  const since = e.losses.length ? e.losses[e.losses.length - 1][0] : 0;
  const stride = e.status && e.status.total > 2000 ? 5 : 1;
  const { losses } = await getJSON(`/idlora/jobs/${id}/loss?since_step=${since}&stride=${stride}`);
  if (losses.length && losses[0].step <= since) e.losses = []; // rewound by a resume
  for (const r of losses) e.losses.push([r.step, r.loss]);
  renderJob(id);
}

async function fetchLatestSample(id) {
  const { samples } = await getJSON(`/idlora/jobs/${id}/samples`);
  if (samples.length) {
    entry(id).sample = api.apiURL(samples[samples.length - 1].url);
    renderJob(id);
  }
}

async function act(id, verb) {
  try {
    entry(id).status = await getJSON(`/idlora/jobs/${id}/${verb}`, { method: "POST" });
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

// -- rendering --------------------------------------------------------------------------------
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

function drawLoss(canvas, losses) {
  const ctx = canvas.getContext("2d");
  const w = (canvas.width = canvas.clientWidth || 260), h = (canvas.height = 60);
  ctx.clearRect(0, 0, w, h);
  if (losses.length < 2) return;
  const ys = losses.map((r) => r[1]).filter(Number.isFinite);
  const lo = Math.min(...ys), hi = Math.max(...ys) || lo + 1;
  const x0 = losses[0][0], x1 = losses[losses.length - 1][0] || 1;
  ctx.strokeStyle = "#4a9eff";
  ctx.lineWidth = 1.5;
  ctx.beginPath();
  losses.forEach(([s, v], i) => {
    const x = ((s - x0) / Math.max(x1 - x0, 1)) * (w - 2) + 1;
    const y = h - 2 - ((v - lo) / Math.max(hi - lo, 1e-12)) * (h - 4);
    i ? ctx.lineTo(x, y) : ctx.moveTo(x, y);
  });
  ctx.stroke();
}

function jobCard(id) {
  const e = entry(id), st = e.status;
  const pct = st.total ? Math.round((100 * st.step) / st.total) : 0;
  const card = el("div", { class: "idlora-job", "data-job": id, "data-state": st.state,
    style: { border: "1px solid var(--border-color, #444)", borderRadius: "6px", padding: "8px", margin: "6px 0" } });
  const loss = st.loss == null ? "" : ` · loss ${st.loss.toFixed(4)}`;
  card.append(
    el("div", { style: { display: "flex", justifyContent: "space-between", gap: "6px" } },
      el("b", {}, st.name),
      el("span", { class: "idlora-state" }, `${st.state}${st.phase && st.phases.length > 1 ? " · " + st.phase : ""}`)),
    el("div", { class: "idlora-progress", title: `${st.step}/${st.total}`,
      style: { height: "8px", background: "#333", borderRadius: "4px", margin: "6px 0", overflow: "hidden" } },
      el("div", { class: "idlora-progress-fill", style: { width: `${pct}%`, height: "100%", background: "#4a9eff" } })),
    el("div", { class: "idlora-steps", style: { fontSize: "12px", opacity: 0.8 } },
      `step ${st.step}/${st.total} (${pct}%)${loss}${st.sec_per_step ? ` · ${st.sec_per_step.toFixed(2)} s/step` : ""}`),
  );
  const canvas = el("canvas", { class: "idlora-loss", style: { width: "100%", height: "60px" } });
  card.append(canvas);
  if (e.sample) card.append(el("img", { class: "idlora-sample", src: e.sample, style: { width: "100%", marginTop: "4px" } }));
  if (st.error && st.state !== "succeeded") card.append(el("div", { style: { color: "#e66", fontSize: "12px" } }, st.error));
  const buttons = el("div", { style: { display: "flex", gap: "6px", marginTop: "6px" } });
  if (RUNNING.has(st.state)) buttons.append(el("button", { class: "idlora-cancel", onclick: () => act(id, "cancel") }, "Cancel"));
  if (RESUMABLE.has(st.state)) buttons.append(el("button", { class: "idlora-resume", onclick: () => act(id, "resume") }, "Resume"));
  if (RESUMABLE.has(st.state)) buttons.append(el("button", { class: "idlora-restart", title: "Start again from step 0 (discards the checkpoints)", onclick: () => act(id, "restart") }, "Restart"));
  if (st.result && st.result.lora) buttons.append(el("span", { style: { fontSize: "12px" } }, st.result.lora));
  card.append(buttons);
  requestAnimationFrame(() => drawLoss(canvas, e.losses));
  return card;
}

function renderJob(id) {
  if (!panel || !entry(id).status) return;
  const old = panel.querySelector(`[data-job="${id}"]`);
  const card = jobCard(id);
  old ? old.replaceWith(card) : render();
}

function render() {
  if (!panel) return;
  const list = [...jobs.values()].filter((e) => e.status).sort((a, b) => b.status.created - a.status.created);
  panel.replaceChildren(
    el("div", { style: { display: "flex", justifyContent: "space-between", alignItems: "center" } },
      el("h3", { style: { margin: "4px 0" } }, "IDLoRA jobs"),
      el("button", { class: "idlora-refresh", onclick: () => refreshAll() }, "Refresh")),
    list.length ? "" : el("div", { class: "idlora-empty", style: { opacity: 0.7 } },
      "No jobs yet. Set a training node's mode to 'background' and queue the workflow."),
    ...list.map((e) => jobCard(e.status.id)),
  );
}

// -- nodes that own a job show its progress ---------------------------------------------------
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
      e.status = detail;
      if (detail.loss != null) fetchLosses(detail.id, !RUNNING.has(detail.state));
      renderJob(detail.id);
      app.graph?.setDirtyCanvas(true, false);
    });
    api.addEventListener("idlora.sample", ({ detail }) => {
      entry(detail.id).sample = api.apiURL(`/idlora/jobs/${detail.id}/samples/${detail.file}`);
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
        panel = el("div", { class: "idlora-panel", style: { padding: "8px", overflowY: "auto", height: "100%" } });
        container.append(panel);
        render();
        refreshAll();
      },
    });
    refreshAll().catch((err) => console.warn("IDLoRA: could not list jobs", err));
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (handlesJobs(nodeData)) decorate(nodeType);
  },
});
