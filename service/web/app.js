// bnlab dashboard: plain JS, no build step, no third-party code. Every figure comes from the API;
// with API keys the key typed in the header is kept in localStorage and sent as a Bearer token.
// Text from the API (run names, errors) is only ever set with textContent, never parsed as HTML.
"use strict";

const FINISHED = new Set(["succeeded", "failed", "cancelled"]);
const KEY_STORAGE = "bnlab.apiKey";
const COLORS = { train: "#2f6fde", val: "#d9480f", bn: "#d9480f", nobn: "#1971c2" };
const PALETTE = ["#1971c2", "#d9480f", "#2b8a3e", "#862e9c", "#e67700", "#0b7285", "#c2255c", "#5f3dc4"];

let pageAbort = new AbortController(); // aborted when the user leaves a page: ends its streams and timers

// ------------------------------------------------------------------------------------ helpers

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function fmt(value, digits = 4) {
  return typeof value === "number" && Number.isFinite(value) ? value.toFixed(digits) : "–";
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => { clearTimeout(timer); resolve(); }, { once: true });
  });
}

function authHeaders(extra = {}) {
  const key = localStorage.getItem(KEY_STORAGE);
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: authHeaders(options.headers || {}) });
  if (!response.ok) {
    let detail = response.statusText;
    try {
      const body = await response.json();
      detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail ?? body);
    } catch (_) { /* not JSON */ }
    if (response.status === 401) notice("This server needs an API key with the read scope: enter it above.");
    throw new ApiError(response.status, `${response.status}: ${detail}`);
  }
  return response.json();
}

function notice(text) {
  const box = document.getElementById("notice");
  box.textContent = text || "";
  box.hidden = !text;
}

function statusBadge(status) {
  return el("span", { class: `status ${status}`, text: status, "data-status": status });
}

function progressBar(done, total) {
  const pct = total ? Math.round((100 * done) / total) : 0;
  const bar = el("span", { class: "bar", title: `${done}/${total} epochs` }, el("span"));
  bar.firstChild.style.width = `${pct}%`;
  return bar;
}

// ------------------------------------------------------------------------------------ live events

// Server-Sent Events over fetch (EventSource cannot send an Authorization header). Reconnects with
// Last-Event-ID, so no event is lost or repeated; ends after the event isEnd recognises.
async function followEvents(path, onEvent, signal, isEnd) {
  let lastId = null;
  let failures = 0;
  while (!signal.aborted) {
    const headers = authHeaders(lastId ? { "Last-Event-ID": lastId } : {});
    let finished = false;
    try {
      const response = await fetch(path, { headers, signal });
      if (!response.ok) throw new ApiError(response.status, `${response.status} on ${path}`);
      failures = 0;
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const event = parseEvent(buffer.slice(0, end));
          buffer = buffer.slice(end + 2);
          if (!event) continue;
          if (event.id) lastId = event.id;
          onEvent(event);
          if (isEnd(event)) finished = true;
        }
      }
    } catch (error) {
      if (signal.aborted) return;
      if (error instanceof ApiError && error.status < 500 && error.status !== 429) throw error;
      failures += 1;
    }
    if (finished) return;
    await sleep(Math.min(1000 * 2 ** failures, 10000), signal);
  }
}

function parseEvent(block) {
  const event = { id: null, type: "message", data: "" };
  const data = [];
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "id") event.id = value;
    else if (field === "event") event.type = value;
    else if (field === "data") data.push(value);
  }
  if (!data.length) return null;
  event.data = JSON.parse(data.join("\n"));
  return event;
}

// ------------------------------------------------------------------------------------ charts

// A line chart on a canvas. series: [{label, color, points: [[x, y], ...], width, dash}].
function drawChart(canvas, series, { title, xLabel = "epoch", yLabel = "" } = {}) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || 480;
  const height = canvas.clientHeight || 280;
  canvas.width = width * ratio;
  canvas.height = height * ratio;
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  const pad = { left: 56, right: 12, top: 40, bottom: 38 };
  const all = series.flatMap((s) => s.points);
  canvas.dataset.points = String(all.length);
  ctx.fillStyle = "#1d2433";
  ctx.font = "600 13px system-ui, sans-serif";
  ctx.fillText(title || "", pad.left, 16);
  if (!all.length) {
    ctx.font = "12px system-ui, sans-serif";
    ctx.fillStyle = "#667085";
    ctx.fillText("waiting for the first epoch…", pad.left, height / 2);
    return;
  }
  const xs = all.map((p) => p[0]);
  const ys = all.map((p) => p[1]);
  const xMin = Math.min(...xs, 1);
  const xMax = Math.max(...xs, xMin + 1);
  let yMin = Math.min(...ys);
  let yMax = Math.max(...ys);
  if (yMax - yMin < 1e-9) { yMin -= 0.5; yMax += 0.5; }
  const margin = (yMax - yMin) * 0.06;
  yMin -= margin; yMax += margin;
  const X = (x) => pad.left + ((x - xMin) / (xMax - xMin)) * (width - pad.left - pad.right);
  const Y = (y) => height - pad.bottom - ((y - yMin) / (yMax - yMin)) * (height - pad.top - pad.bottom);

  ctx.strokeStyle = "#e9ecef";
  ctx.fillStyle = "#667085";
  ctx.font = "11px system-ui, sans-serif";
  ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const y = yMin + ((yMax - yMin) * i) / 4;
    ctx.beginPath(); ctx.moveTo(pad.left, Y(y)); ctx.lineTo(width - pad.right, Y(y)); ctx.stroke();
    ctx.fillText(y.toFixed(3), 6, Y(y) + 4);
  }
  const step = Math.max(1, Math.ceil((xMax - xMin) / 10));
  for (let x = Math.ceil(xMin); x <= xMax; x += step) ctx.fillText(String(x), X(x) - 3, height - pad.bottom + 14);
  ctx.fillText(xLabel, width / 2 - 14, height - 6);
  if (yLabel) ctx.fillText(yLabel, pad.left, pad.top - 2);

  for (const s of series) {
    if (!s.points.length) continue;
    ctx.strokeStyle = s.color;
    ctx.fillStyle = s.color;
    ctx.lineWidth = s.width || 2;
    ctx.setLineDash(s.dash || []);
    ctx.beginPath();
    s.points.forEach(([x, y], i) => (i ? ctx.lineTo(X(x), Y(y)) : ctx.moveTo(X(x), Y(y))));
    ctx.stroke();
    ctx.setLineDash([]);
    if (s.points.length < 30) for (const [x, y] of s.points) ctx.fillRect(X(x) - 2, Y(y) - 2, 4, 4);
  }
  // Legend: one entry per distinct label.
  let lx = width - pad.right - 8;
  ctx.font = "11px system-ui, sans-serif";
  const labels = [...new Map(series.filter((s) => s.label).map((s) => [s.label, s])).values()].reverse();
  for (const s of labels) {
    const w = ctx.measureText(s.label).width;
    lx -= w + 26;
    ctx.fillStyle = s.color;
    ctx.fillRect(lx, 26, 14, 3);
    ctx.fillStyle = "#1d2433";
    ctx.fillText(s.label, lx + 18, 31);
  }
}

function chartCard(id, title) {
  return el("div", { class: "card" }, el("canvas", { class: "chart", id, "aria-label": title }));
}

// ------------------------------------------------------------------------------------ pages

async function homePage(view, signal) {
  view.append(el("h1", { text: "Runs" }), el("div", { id: "runs" }, el("p", { class: "muted", text: "loading…" })));
  view.append(el("h2", { text: "Experiments" }), el("div", { id: "experiments" }));
  view.append(submitForm());
  while (!signal.aborted) {
    let active = false;
    try {
      const runs = await api("/api/v1/runs?limit=50", { signal });
      active = runs.items.some((r) => !FINISHED.has(r.status));
      document.getElementById("runs").replaceChildren(runsTable(runs));
      await loadExperiments(signal);
      notice("");
    } catch (error) {
      if (signal.aborted) return;
      document.getElementById("runs").replaceChildren(el("p", { class: "error", text: error.message }));
    }
    await sleep(active ? 1000 : 4000, signal);
  }
}

function runsTable(runs) {
  if (!runs.items.length) return el("p", { class: "muted", text: "No runs yet: submit one below, or with `bnlab submit`." });
  const head = el("tr", {}, ...["name", "status", "progress", "train loss", "val loss", "val accuracy", "created", ""].map((h) => el("th", { text: h })));
  const rows = runs.items.map((run) => {
    const s = run.summary;
    return el("tr", { "data-run-id": run.id },
      el("td", {}, el("a", { href: `#/runs/${run.id}`, text: run.name || run.id.slice(0, 8) })),
      el("td", {}, statusBadge(run.status)),
      el("td", {}, progressBar(s.epochs_done, s.epochs_total), ` ${s.epochs_done}/${s.epochs_total}`),
      el("td", { class: "num", text: fmt(s.train_loss) }),
      el("td", { class: "num", text: fmt(s.val_loss) }),
      el("td", { class: "num", text: fmt(s.val_accuracy) }),
      el("td", { class: "muted", text: new Date(run.created_at).toLocaleString() }),
      el("td", {}, run.status === "succeeded" ? el("a", { href: `#/models/${run.id}`, text: "predict" }) : ""));
  });
  return el("table", { id: "runs-table" }, el("thead", {}, head), el("tbody", {}, ...rows));
}

async function loadExperiments(signal) {
  const box = document.getElementById("experiments");
  try {
    const experiments = await api("/api/v1/experiments?limit=50", { signal });
    const items = experiments.items || [];
    if (!items.length) {
      box.replaceChildren(el("p", { class: "muted", text: "No experiments yet (`bnlab experiment create`)." }));
      return;
    }
    const head = el("tr", {}, ...["name", "status", "runs", "created"].map((h) => el("th", { text: h })));
    const rows = items.map((e) => el("tr", { "data-experiment-id": e.id },
      el("td", {}, el("a", { href: `#/experiments/${e.id}`, text: e.name })),
      el("td", {}, statusBadge(e.finished ? "finished" : "running")),
      el("td", { class: "num", text: experimentProgress(e) }),
      el("td", { class: "muted", text: new Date(e.created_at).toLocaleString() })));
    box.replaceChildren(el("table", {}, el("thead", {}, head), el("tbody", {}, ...rows)));
  } catch (error) {
    if (error.status === 404) box.replaceChildren(el("p", { class: "muted", text: "This server has no experiments API." }));
    else throw error;
  }
}

function experimentProgress(e) {
  const counts = e.status_counts;
  const done = (counts.succeeded || 0) + (counts.failed || 0) + (counts.cancelled || 0);
  return `${done}/${e.runs.length} runs`;
}

function submitForm() {
  const spec = {
    name: "synthetic-bn",
    dataset: { name: "synthetic", limit: 2000 },
    model: { norm: { kind: "batch" } },
    train: { epochs: 5 },
  };
  const text = el("textarea", { id: "spec", rows: "7" });
  text.value = JSON.stringify(spec, null, 2);
  const result = el("span", { class: "muted" });
  const submit = async (event) => {
    event.preventDefault();
    try {
      const run = await api("/api/v1/runs", { method: "POST", headers: { "content-type": "application/json" }, body: text.value });
      location.hash = `#/runs/${run.id}`;
    } catch (error) { result.textContent = error.message; result.className = "error"; }
  };
  return el("div", {}, el("h2", { text: "Submit a run" }),
    el("p", { class: "muted", text: "A run spec as POST /api/v1/runs takes it (needs the train scope)." }),
    text, el("p", {}, el("button", { id: "submit-run", onclick: submit, text: "Submit" }), " ", result));
}

async function runPage(view, signal, runId) {
  const run = await api(`/api/v1/runs/${runId}`, { signal });
  const statusBox = el("span", { id: "run-status" }, statusBadge(run.status));
  const progress = el("span", { id: "run-progress", text: `${run.summary.epochs_done}/${run.summary.epochs_total} epochs` });
  const errorBox = el("p", { class: "error", id: "run-error", text: run.error || "" });
  const modelLink = el("span", { id: "model-link" });
  view.append(
    el("h1", {}, `Run ${run.name || ""} `, el("span", { class: "muted", text: run.id })),
    el("p", {}, statusBox, "  ", progress, "  ", modelLink), errorBox,
    el("div", { class: "charts" }, chartCard("loss-chart", "loss"), chartCard("accuracy-chart", "accuracy")),
    el("h2", { text: "Epochs" }), el("div", { id: "epochs" }),
    el("h2", { text: "Spec" }), el("pre", { text: JSON.stringify(run.spec, null, 2) }));

  const epochs = new Map();
  const redraw = () => {
    const rows = [...epochs.values()].sort((a, b) => a.epoch - b.epoch);
    const curve = (key) => rows.map((r) => [r.epoch, r[key]]);
    drawChart(document.getElementById("loss-chart"), [
      { label: "train loss", color: COLORS.train, points: curve("train_loss") },
      { label: "val loss", color: COLORS.val, points: curve("val_loss") },
    ], { title: "Loss" });
    drawChart(document.getElementById("accuracy-chart"), [
      { label: "train accuracy", color: COLORS.train, points: curve("train_accuracy") },
      { label: "val accuracy", color: COLORS.val, points: curve("val_accuracy") },
    ], { title: "Accuracy" });
    document.getElementById("epochs").replaceChildren(epochTable(rows));
  };
  const showStatus = (status, error) => {
    statusBox.replaceChildren(statusBadge(status));
    errorBox.textContent = error || "";
    modelLink.replaceChildren(status === "succeeded" ? el("a", { href: `#/models/${runId}`, text: "→ predict with this model" }) : "");
  };
  showStatus(run.status, run.error);
  redraw();
  const ended = (event) => event.type === "status" && FINISHED.has(event.data.status);
  await followEvents(`/api/v1/runs/${runId}/events`, (event) => {
    if (event.type === "epoch") {
      epochs.set(event.data.epoch, event.data);
      progress.textContent = `${event.data.epoch}/${event.data.epochs_total} epochs`;
      redraw();
    } else if (event.type === "status") {
      showStatus(event.data.status, event.data.error);
    }
  }, signal, ended);
}

function epochTable(rows) {
  const head = el("tr", {}, ...["epoch", "train loss", "train acc", "val loss", "val acc", "seconds"].map((h) => el("th", { text: h })));
  const body = rows.map((r) => el("tr", {}, el("td", { class: "num", text: r.epoch }),
    ...["train_loss", "train_accuracy", "val_loss", "val_accuracy"].map((k) => el("td", { class: "num", text: fmt(r[k]) })),
    el("td", { class: "num", text: fmt(r.seconds, 2) })));
  return el("table", {}, el("thead", {}, head), el("tbody", {}, ...body));
}

async function modelPage(view, signal, runId) {
  const run = await api(`/api/v1/runs/${runId}`, { signal });
  const pad = el("canvas", { id: "pad", width: "280", height: "280" });
  const file = el("input", { id: "image-file", type: "file", accept: "image/png,image/jpeg" });
  const output = el("div", { id: "prediction-box" }, el("p", { class: "muted", text: "Draw a digit (or a garment) or choose an image." }));
  view.append(
    el("h1", {}, `Model of run ${run.name || ""} `, el("span", { class: "muted", text: run.id })),
    el("p", {}, statusBadge(run.status), " ", el("a", { href: `#/runs/${runId}`, text: "curves" }),
      ` · val accuracy ${fmt(run.summary.val_accuracy)} · served in eval mode, BN folded into the Linear layers`),
    el("div", { class: "draw" },
      el("div", {}, pad, el("p", {},
        el("button", { id: "predict-drawing", text: "Predict the drawing", onclick: () => pad.toBlob((blob) => predict(runId, blob, output)) }),
        " ", el("button", { text: "Clear", onclick: () => clearPad(pad) }))),
      el("div", {}, el("p", {}, el("label", { for: "image-file", text: "…or upload a PNG/JPEG: " }), file), output)));
  clearPad(pad);
  enableDrawing(pad);
  file.addEventListener("change", () => file.files[0] && predict(runId, file.files[0], output));
  await sleep(0, signal);
}

function clearPad(pad) {
  const ctx = pad.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, pad.width, pad.height);
}

function enableDrawing(pad) {
  const ctx = pad.getContext("2d");
  let drawing = false;
  const at = (e) => { const r = pad.getBoundingClientRect(); return [(e.clientX - r.left) * (pad.width / r.width), (e.clientY - r.top) * (pad.height / r.height)]; };
  pad.addEventListener("pointerdown", (e) => { drawing = true; pad.setPointerCapture(e.pointerId); ctx.beginPath(); ctx.moveTo(...at(e)); });
  pad.addEventListener("pointermove", (e) => {
    if (!drawing) return;
    ctx.strokeStyle = "#fff"; ctx.lineWidth = 22; ctx.lineCap = "round"; ctx.lineJoin = "round";
    ctx.lineTo(...at(e)); ctx.stroke();
  });
  pad.addEventListener("pointerup", () => { drawing = false; });
}

async function predict(runId, blob, output) {
  const form = new FormData();
  form.append("file", blob, blob.name || "drawing.png");
  output.replaceChildren(el("p", { class: "muted", text: "predicting…" }));
  try {
    const answer = await api(`/api/v1/runs/${runId}/predict`, { method: "POST", body: form });
    const probabilities = answer.probabilities[0];
    const bars = probabilities.flatMap((p, cls) => {
      const bar = el("span", { class: "p" });
      bar.style.width = `${Math.round(p * 180)}px`;
      return [el("span", { text: cls }), el("span", {}, bar), el("span", { class: "num", text: fmt(p, 3) })];
    });
    output.replaceChildren(
      el("p", {}, "Prediction: ", el("span", { class: "prediction", id: "prediction", text: answer.predictions[0] })),
      el("p", { class: "muted", text: `model version ${answer.model_version}, fused ${answer.fused}, image ${answer.image.width}×${answer.image.height}${answer.image.inverted ? ", inverted" : ""}` }),
      el("div", { class: "probs" }, ...bars));
  } catch (error) {
    output.replaceChildren(el("p", { class: "error", id: "prediction-error", text: error.message }));
  }
}

// ------------------------------------------------------------------------------------ experiments

async function experimentPage(view, signal, experimentId) {
  const experiment = await api(`/api/v1/experiments/${experimentId}`, { signal });
  const statusBox = el("span", { id: "experiment-status" });
  view.append(el("h1", {}, `Experiment ${experiment.name} `, el("span", { class: "muted", text: experiment.id })),
    el("p", {}, statusBox, " ", el("span", { class: "muted", text: experiment.preset ? `preset ${experiment.preset}` : "" })),
    el("div", { class: "charts" }, chartCard("exp-loss-chart", "loss"), chartCard("exp-acc-chart", "accuracy")),
    el("p", { class: "muted", text: "Solid: validation; dashed: training. One line per run; colour by configuration." }),
    el("h2", { text: "Report" }), el("div", { id: "report" }),
    el("h2", { text: "Runs" }), el("div", { id: "experiment-runs" }));
  const runs = new Map(experiment.runs.map((r) => [r.id, { ...r, epochs: new Map() }]));
  const configs = [...new Set(experiment.runs.map((r) => r.config))];
  const colorOf = (config) => configColor(config, configs);
  const showStatus = (finished) => statusBox.replaceChildren(statusBadge(finished ? "finished" : "running"));
  const redraw = () => {
    const series = (metric) => [...runs.values()].flatMap((r) => {
      const rows = [...r.epochs.values()].sort((a, b) => a.epoch - b.epoch);
      return [
        { label: `${r.config} val`, color: colorOf(r.config), width: 1.8, points: rows.map((e) => [e.epoch, e[`val_${metric}`]]) },
        { label: "", color: colorOf(r.config), width: 1, dash: [4, 3], points: rows.map((e) => [e.epoch, e[`train_${metric}`]]) },
      ];
    });
    drawChart(document.getElementById("exp-loss-chart"), series("loss"), { title: "Loss: BN vs no BN (the article's figure)" });
    drawChart(document.getElementById("exp-acc-chart"), series("accuracy"), { title: "Accuracy" });
    document.getElementById("experiment-runs").replaceChildren(experimentRunsTable([...runs.values()]));
  };
  const refreshReport = async () => {
    try {
      const report = await api(`/api/v1/experiments/${experimentId}/report`, { signal });
      document.getElementById("report").replaceChildren(reportView(report));
    } catch (error) {
      if (!signal.aborted) document.getElementById("report").replaceChildren(el("p", { class: "error", text: error.message }));
    }
  };
  showStatus(experiment.finished);
  redraw();
  await refreshReport();
  await followEvents(`/api/v1/experiments/${experimentId}/events`, (event) => {
    const run = runs.get(event.data.run_id);
    if (event.type === "epoch" && run) {
      run.epochs.set(event.data.epoch, event.data);
      run.epochs_done = event.data.epoch;
      run.val_loss = event.data.val_loss;
      run.val_accuracy = event.data.val_accuracy;
      redraw();
    } else if (event.type === "status" && run) {
      run.status = event.data.status;
      redraw();
      if (FINISHED.has(run.status)) refreshReport();
    } else if (event.type === "end") {
      showStatus(true);
      refreshReport();
    }
  }, signal, (event) => event.type === "end");
}

function configColor(config, configs) {
  // The article's two curves keep fixed colours: no BN blue, BN orange.
  if (/norm=none/.test(config)) return COLORS.nobn;
  if (/norm=batch/.test(config)) return COLORS.bn;
  return PALETTE[configs.indexOf(config) % PALETTE.length];
}

function experimentRunsTable(runs) {
  const head = el("tr", {}, ...["run", "configuration", "seed", "status", "progress", "val loss", "val accuracy"].map((h) => el("th", { text: h })));
  const rows = runs.map((r) => el("tr", { "data-run-id": r.id },
    el("td", {}, el("a", { href: `#/runs/${r.id}`, text: r.id.slice(0, 8) })),
    el("td", { text: r.config }), el("td", { class: "num", text: r.seed }),
    el("td", {}, statusBadge(r.status)),
    el("td", {}, progressBar(r.epochs_done, r.epochs_total), ` ${r.epochs_done}/${r.epochs_total}`),
    el("td", { class: "num", text: fmt(r.val_loss) }), el("td", { class: "num", text: fmt(r.val_accuracy) })));
  return el("table", {}, el("thead", {}, head), el("tbody", {}, ...rows));
}

function stat(s) {
  if (!s || s.mean === null || s.mean === undefined) return "–";
  return s.std === null || s.std === undefined ? fmt(s.mean) : `${fmt(s.mean)} ± ${fmt(s.std)}`;
}

function reportView(report) {
  const head = el("tr", {}, ...["configuration", "ok/runs", "final val loss", "final val accuracy", "best val loss", `epochs to ${report.target}`]
    .map((h) => el("th", { text: h })));
  const rows = report.configurations.map((c) => el("tr", {},
    el("td", { text: c.config }), el("td", { class: "num", text: `${c.succeeded}/${c.runs}` }),
    el("td", { class: "num", text: stat(c.final.val_loss) }), el("td", { class: "num", text: stat(c.final.val_accuracy) }),
    el("td", { class: "num", text: stat(c.best.val_loss) }),
    el("td", { class: "num", text: c.epochs_to_target.mean === null ? `– (${c.epochs_to_target.reached} reached)` : `${c.epochs_to_target.mean.toFixed(1)} (${c.epochs_to_target.reached} reached)` })));
  const notes = [
    el("p", { class: "muted", text: report.finished ? "All runs have ended." : "Runs are still training: these figures will change." }),
    ...report.winners.map((w) => el("p", { text: `Best ${w.metric} (${w.better}): ${w.config}` })),
    ...report.claims.map((c) => el("p", {}, el("strong", { text: `${c.verdict}: ` }), c.claim, el("span", { class: "muted", text: ` (${c.evidence})` }))),
  ];
  return el("div", {}, el("table", { id: "report-table" }, el("thead", {}, head), el("tbody", {}, ...rows)), ...notes);
}

// ------------------------------------------------------------------------------------ routing

const ROUTES = [
  [/^#?\/?$/, homePage],
  [/^#\/runs\/([0-9a-f]{32})$/, runPage],
  [/^#\/models\/([0-9a-f]{32})$/, modelPage],
  [/^#\/experiments\/([0-9a-f]{32})$/, experimentPage],
];

async function route() {
  pageAbort.abort();
  pageAbort = new AbortController();
  const signal = pageAbort.signal;
  const view = document.getElementById("view");
  view.replaceChildren();
  notice("");
  const hash = location.hash || "#/";
  for (const [pattern, page] of ROUTES) {
    const match = hash.match(pattern);
    if (!match) continue;
    try {
      await page(view, signal, ...match.slice(1));
    } catch (error) {
      if (!signal.aborted) view.append(el("p", { class: "error", id: "page-error", text: error.message }));
    }
    return;
  }
  view.append(el("p", { class: "error", text: `No page at ${hash}` }));
}

function setUpKeyForm() {
  const input = document.getElementById("api-key");
  input.value = localStorage.getItem(KEY_STORAGE) || "";
  document.getElementById("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = input.value.trim();
    if (key) localStorage.setItem(KEY_STORAGE, key);
    else localStorage.removeItem(KEY_STORAGE);
    route();
  });
}

window.addEventListener("hashchange", route);
window.addEventListener("DOMContentLoaded", () => { setUpKeyForm(); route(); });
