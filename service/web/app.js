// bnlab dashboard: plain JS, no build step. Charts: chart.js (one component, drawn with the vendored
// uPlot). Every figure comes from the API; with API keys the key typed in the header is kept in
// localStorage and sent as a Bearer token (downloads too: they are fetched, then saved from a Blob).
// Text from the API (run names, errors) is only ever set with textContent, never parsed as HTML.
"use strict";

const FINISHED = new Set(["succeeded", "failed", "cancelled"]);
const KEY_STORAGE = "bnlab.apiKey";
const SELECTION_STORAGE = "bnlab.selection";
// The filter choices the server accepts are read from its OpenAPI document (see listChoices); these
// are the fallback.
const NORM_KINDS = ["none", "batch", "layer", "group", "instance", "batch_renorm", "ghost", "weight", "batch_layer"];
const DATASETS = ["fashion-mnist", "mnist", "synthetic", "cifar10", "mnist1d", "uploaded"];
const STATUSES = ["queued", "running", "succeeded", "failed", "cancelled"];
const METRIC_KEYS = ["train_loss", "train_accuracy", "val_loss", "val_accuracy"];

let pageAbort = new AbortController(); // aborted when the user leaves a page: ends its streams and timers

// ------------------------------------------------------------------------------------ helpers

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
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

async function apiResponse(path, options = {}) {
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
  return response;
}

async function api(path, options = {}) {
  return (await apiResponse(path, options)).json();
}

// A server file (CSV, JSON) saved under `filename`: fetched with the key, then saved from a Blob.
async function downloadFromApi(path, filename) {
  try {
    const blob = await (await apiResponse(path)).blob();
    download(filename, blob);
  } catch (error) { notice(error.message); }
}

function apiDownload(text, path, filename) {
  return el("button", { type: "button", class: "link", "data-download": filename, text, onclick: () => downloadFromApi(path, filename) });
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

function swatch(style, dashed = false) {
  const mark = el("span", { class: `sample${dashed ? " dashed" : ""}` });
  mark.style.borderTopColor = style.color;
  return mark;
}

// A table from a header list and rows of cells (strings, numbers or nodes).
function table(id, headers, rows, attrs = {}) {
  const head = el("tr", {}, ...headers.map((h) => (h instanceof Node ? el("th", {}, h) : el("th", { text: h }))));
  return el("table", { id, ...attrs }, el("thead", {}, head), el("tbody", {}, ...rows));
}

function numCell(value, digits = 4) {
  return el("td", { class: "num", text: typeof value === "string" ? value : fmt(value, digits) });
}

// A name that truncates with an ellipsis and shows in full on hover.
function nameCell(text, href) {
  return el("td", { class: "name" }, el("a", { href, title: text, text }));
}

function shortId(id) { return id.slice(0, 8); }

function shortDate(iso) {
  return new Date(iso).toLocaleString([], { dateStyle: "short", timeStyle: "short" });
}

function hashQuery() {
  const hash = location.hash || "#/";
  const at = hash.indexOf("?");
  return new URLSearchParams(at < 0 ? "" : hash.slice(at + 1));
}

// Writes the page's state into the URL (so it can be shared) without reloading the page.
function setHashQuery(params) {
  const hash = location.hash || "#/";
  const path = hash.split("?")[0];
  const query = new URLSearchParams([...params].filter(([, v]) => v !== "" && v !== null && v !== undefined)).toString();
  history.replaceState(null, "", query ? `${path}?${query}` : path);
}

// ------------------------------------------------------------------------------------ selection

// The runs picked for a comparison, kept across pages of the list and across pages of the app.
const selection = {
  ids() { return JSON.parse(sessionStorage.getItem(SELECTION_STORAGE) || "[]"); },
  has(id) { return this.ids().includes(id); },
  set(ids) { sessionStorage.setItem(SELECTION_STORAGE, JSON.stringify([...new Set(ids)])); selectionBar(); },
  toggle(id, on) { this.set(on ? [...this.ids(), id] : this.ids().filter((x) => x !== id)); },
};

function selectionBar() {
  const bar = document.getElementById("selection-bar");
  if (!bar) return;
  const ids = selection.ids();
  bar.hidden = !ids.length;
  bar.replaceChildren(
    el("span", { id: "selection-count", text: `${ids.length} run${ids.length === 1 ? "" : "s"} selected` }), " ",
    el("a", { id: "compare-selected", class: "button", href: `#/compare?runs=${ids.join(",")}`, text: "Compare" }), " ",
    el("button", { type: "button", class: "link", text: "clear", onclick: () => { selection.set([]); document.querySelectorAll("input.pick").forEach((c) => { c.checked = false; }); } }));
}

function pickBox(id) {
  const box = el("input", { type: "checkbox", class: "pick", "aria-label": "select for comparison", "data-run-id": id });
  box.checked = selection.has(id);
  box.addEventListener("change", () => selection.toggle(id, box.checked));
  return el("td", { class: "pick-cell" }, box);
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

// ------------------------------------------------------------------------------------ traces

// A run's epochs as chart points of one metric: x by epoch and by wall time (cumulative seconds).
function epochPoints(epochs, key) {
  let time = 0;
  return [...epochs].sort((a, b) => a.epoch - b.epoch).map((e) => {
    time += e.seconds || 0;
    return { x: { epoch: e.epoch, time: Number(time.toFixed(3)) }, y: e[key] };
  });
}

// Training (solid) and validation (dashed) traces of `metric` for groups of runs, a colour each: the
// matplotlib figures' convention (service/experiments/plots.py).
// groups: [{ label, style, runs: [{ id, epochs }] }].
function metricTraces(groups, metric) {
  return groups.flatMap((group) => ["train", "val"].map((split) => ({
    label: `${group.label ? `${group.label} · ` : ""}${split === "train" ? "training" : "validation"}`,
    color: group.style.color,
    marker: group.style.marker,
    dash: split === "val",
    runs: group.runs.map((run) => ({ id: run.id, points: epochPoints(run.epochs, `${split}_${metric}`) })),
  })));
}

function curveCharts(prefix, title, { bandToggle = false, filename = prefix } = {}) {
  const common = { xModes: ["epoch", "time"], bandToggle, xLabel: "epoch" };
  return {
    loss: lineChart({ ...common, id: `${prefix}loss-chart`, title: `Loss — ${title}`, yLabel: "loss", filename: `${filename}-loss` }),
    accuracy: lineChart({ ...common, id: `${prefix}accuracy-chart`, title: `Accuracy — ${title}`, yLabel: "accuracy", filename: `${filename}-accuracy` }),
  };
}

function styleNote() {
  return el("p", { class: "muted legend-note", text: "Colour: configuration · solid: training · dashed: validation · drag to zoom, double-click to reset · hover for values" });
}

// ------------------------------------------------------------------------------------ runs list

const RUN_COLUMNS = [
  { title: "name", sort: "name" }, { title: "status", sort: "status" }, { title: "progress", sort: "epochs_done" },
  { title: "dataset" }, { title: "model" }, { title: "norm" }, { title: "optimizer" }, { title: "lr" }, { title: "batch" },
  { title: "train loss", sort: "train_loss" }, { title: "val loss", sort: "val_loss" }, { title: "val acc", sort: "val_accuracy" },
  { title: "experiment" }, { title: "created", sort: "created_at" },
];

function listState() {
  const q = hashQuery();
  return {
    q: q.get("q") || "", status: q.get("status") || "", norm: q.get("norm") || "", dataset: q.get("dataset") || "", tag: q.get("tag") || "",
    experiment_id: q.get("experiment") || "", in_experiment: q.get("in_experiment") || "", sort: q.get("sort") || "created_at", order: q.get("order") || "",
    limit: Number(q.get("size") || 50), page: Math.max(1, Number(q.get("page") || 1)),
  };
}

function saveListState(state) {
  const { limit, page, experiment_id: experiment, ...rest } = state;
  setHashQuery(new URLSearchParams({ ...rest, experiment, size: limit === 50 ? "" : limit, page: page === 1 ? "" : page }));
}

function runsQuery(state) {
  const params = new URLSearchParams({ limit: state.limit, offset: (state.page - 1) * state.limit, sort: state.sort });
  for (const key of ["q", "status", "norm", "dataset", "tag", "experiment_id", "in_experiment", "order"]) if (state[key]) params.set(key, state[key]);
  return `/api/v1/runs?${params}`;
}

function select(id, label, values, current, onChange) {
  const node = el("select", { id, "aria-label": label }, el("option", { value: "", text: `${label}: any` }),
    ...values.map(([value, text]) => el("option", { value, text })));
  node.value = current;
  node.addEventListener("change", () => onChange(node.value));
  return node;
}

// The values GET /api/v1/runs accepts for `norm` and `dataset`, as the server's OpenAPI document
// lists them (so new norm kinds appear without a change here).
async function listChoices(signal) {
  const choices = { norm: NORM_KINDS, dataset: DATASETS };
  try {
    const doc = await (await fetch("/openapi.json", { signal })).json();
    for (const param of doc.paths["/api/v1/runs"].get.parameters) {
      const schemas = param.schema.anyOf || [param.schema];
      const values = schemas.flatMap((schema) => schema.enum || []);
      if (param.name in choices && values.length) choices[param.name] = values;
    }
  } catch (_) { /* keep the fallback */ }
  return choices;
}

function filterBar(state, experiments, choices, reload) {
  const change = (key) => (value) => { state[key] = value; state.page = 1; saveListState(state); reload(); };
  const search = el("input", { id: "run-search", type: "search", placeholder: "search name or id…", value: state.q });
  let timer = null;
  search.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(() => change("q")(search.value.trim()), 250); });
  const tag = el("input", { id: "filter-tag", type: "search", placeholder: "tag…", value: state.tag || "" });
  tag.addEventListener("change", () => change("tag")(tag.value.trim()));
  const sizes = select("page-size", "per page", [["20", "20"], ["50", "50"], ["100", "100"]], String(state.limit), (v) => change("limit")(Number(v || 50)));
  return el("div", { class: "filters" }, search,
    select("filter-status", "status", STATUSES.map((s) => [s, s]), state.status, change("status")),
    select("filter-norm", "norm", choices.norm.map((s) => [s, s]), state.norm, change("norm")),
    select("filter-dataset", "dataset", choices.dataset.map((s) => [s, s]), state.dataset, change("dataset")),
    select("filter-experiment", "experiment", experiments.map((e) => [e.id, e.name]), state.experiment_id, change("experiment_id")),
    select("filter-alone", "submitted", [["false", "on their own"], ["true", "by experiments"]], state.in_experiment, change("in_experiment")),
    tag, sizes);
}

function pager(id, total, state, go) {
  const pages = Math.max(1, Math.ceil(total / state.limit));
  const first = total ? (state.page - 1) * state.limit + 1 : 0;
  const last = Math.min(total, state.page * state.limit);
  return el("div", { class: "pager", id },
    el("button", { type: "button", id: `${id}-prev`, disabled: state.page <= 1, text: "‹ previous", onclick: () => go(state.page - 1) }),
    el("span", { id: `${id}-range`, text: `${first}–${last} of ${total} · page ${state.page} of ${pages}` }),
    el("button", { type: "button", id: `${id}-next`, disabled: state.page >= pages, text: "next ›", onclick: () => go(state.page + 1) }));
}

function sortHeader(column, state, resort) {
  if (!column.sort) return column.title;
  const active = state.sort === column.sort;
  const arrow = active ? (currentOrder(state) === "asc" ? " ▲" : " ▼") : "";
  return el("button", { type: "button", class: `sort${active ? " active" : ""}`, "data-sort": column.sort, text: `${column.title}${arrow}`, onclick: () => resort(column.sort) });
}

function currentOrder(state) {
  return state.order || (["created_at", "train_accuracy", "val_accuracy"].includes(state.sort) ? "desc" : "asc");
}

function specSummary(spec) {
  const m = spec.model;
  return {
    dataset: spec.dataset.name,
    model: m.arch === "cnn" ? `cnn ${m.channels.join("-")}` : `mlp ${m.hidden.join("-")}`,
    norm: m.norm.kind,
    optimizer: spec.train.optimizer,
    lr: spec.train.lr,
    batch: spec.train.batch_size,
  };
}

function runsTable(runs, state, resort, experimentNames) {
  if (!runs.items.length) {
    const filtered = state.q || state.status || state.norm || state.dataset || state.experiment_id || state.in_experiment;
    return el("p", { class: "muted", id: "runs-empty", text: filtered ? "No run matches these filters." : "No runs yet: submit one below, or with `bnlab submit`." });
  }
  const headers = [el("span", { class: "muted", text: "✓" }), ...RUN_COLUMNS.map((c) => sortHeader(c, state, resort)), ""];
  const rows = runs.items.map((run) => {
    const s = run.summary;
    const spec = specSummary(run.spec);
    const experiment = run.experiment_id
      ? el("a", { href: `#/experiments/${run.experiment_id}`, title: run.experiment_id, text: experimentNames.get(run.experiment_id) || shortId(run.experiment_id) })
      : "";
    return el("tr", { "data-run-id": run.id },
      pickBox(run.id),
      nameCell(run.name || shortId(run.id), `#/runs/${run.id}`),
      el("td", {}, statusBadge(run.status)),
      el("td", {}, progressBar(s.epochs_done, s.epochs_total), ` ${s.epochs_done}/${s.epochs_total}`),
      el("td", { text: spec.dataset }), el("td", { text: spec.model }), el("td", { text: spec.norm }),
      el("td", { text: spec.optimizer }), el("td", { class: "num", text: String(spec.lr) }), el("td", { class: "num", text: String(spec.batch) }),
      numCell(s.train_loss), numCell(s.val_loss), numCell(s.val_accuracy),
      el("td", { class: "name short" }, experiment),
      el("td", { class: "muted", title: run.created_at, text: shortDate(run.created_at) }),
      el("td", {}, run.status === "succeeded" ? el("a", { href: `#/models/${run.id}`, text: "predict" }) : ""));
  });
  return el("div", { class: "scroll" }, table("runs-table", headers, rows));
}

async function homePage(view, signal) {
  const state = listState();
  const [experiments, choices] = await Promise.all([
    api("/api/v1/experiments?limit=100", { signal }).then((e) => e.items).catch(() => []),
    listChoices(signal),
  ]);
  const experimentNames = new Map(experiments.map((e) => [e.id, e.name]));
  const runsBox = el("div", { id: "runs" }, el("p", { class: "muted", text: "loading…" }));
  const experimentsBox = el("div", { id: "experiments" });
  const pagerBox = el("div");
  let lastShown = "";
  let wake = () => {};
  const reload = () => { lastShown = ""; wake(); };
  const resort = (key) => {
    state.order = state.sort === key ? (currentOrder(state) === "asc" ? "desc" : "asc") : "";
    state.sort = key;
    state.page = 1;
    saveListState(state);
    reload();
  };
  view.append(el("h1", { text: "Runs" }), filterBar(state, experiments, choices, reload),
    el("div", { id: "selection-bar", class: "selection-bar", hidden: true }), pagerBox, runsBox,
    el("h2", { text: "Experiments" }), experimentsBox, submitForm());
  selectionBar();
  experimentsList(experimentsBox, signal);
  while (!signal.aborted) {
    let active = false;
    try {
      const runs = await api(runsQuery(state), { signal });
      active = runs.items.some((r) => !FINISHED.has(r.status));
      const next = JSON.stringify(runs);
      if (next !== lastShown) {
        lastShown = next;
        runsBox.replaceChildren(runsTable(runs, state, resort, experimentNames));
        pagerBox.replaceChildren(pager("runs-pager", runs.total, state, (page) => { state.page = page; saveListState(state); reload(); }));
      }
      notice("");
    } catch (error) {
      if (signal.aborted) return;
      runsBox.replaceChildren(el("p", { class: "error", text: error.message }));
    }
    await new Promise((resolve) => { wake = resolve; sleep(active ? 1000 : 4000, signal).then(resolve); });
  }
}

// ------------------------------------------------------------------------------------ experiments list

async function experimentsList(box, signal) {
  const state = { q: "", sort: "created_at", order: "", limit: 20, page: 1 };
  const search = el("input", { id: "experiment-search", type: "search", placeholder: "search experiments…" });
  const body = el("div");
  box.replaceChildren(el("div", { class: "filters" }, search), body);
  const load = async () => {
    const params = new URLSearchParams({ limit: state.limit, offset: (state.page - 1) * state.limit, sort: state.sort });
    if (state.q) params.set("q", state.q);
    if (state.order) params.set("order", state.order);
    try {
      const page = await api(`/api/v1/experiments?${params}`, { signal });
      body.replaceChildren(experimentsTable(page.items, state, (key) => {
        state.order = state.sort === key ? (currentOrder(state) === "asc" ? "desc" : "asc") : "";
        state.sort = key; state.page = 1; load();
      }), pager("experiments-pager", page.total, state, (n) => { state.page = n; load(); }));
    } catch (error) {
      if (signal.aborted) return;
      body.replaceChildren(el("p", { class: error.status === 404 ? "muted" : "error", text: error.status === 404 ? "This server has no experiments API." : error.message }));
    }
  };
  let timer = null;
  search.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(() => { state.q = search.value.trim(); state.page = 1; load(); }, 250); });
  await load();
}

function experimentsTable(items, state, resort) {
  if (!items.length) return el("p", { class: "muted", text: state.q ? "No experiment matches." : "No experiments yet (`bnlab experiment create`, or a preset)." });
  const headers = [sortHeader({ title: "name", sort: "name" }, state, resort), "preset", "status", "runs", "configurations", sortHeader({ title: "created", sort: "created_at" }, state, resort)];
  const rows = items.map((e) => el("tr", { "data-experiment-id": e.id },
    nameCell(e.name, `#/experiments/${e.id}`),
    el("td", { text: e.preset || "" }),
    el("td", {}, statusBadge(e.finished ? "finished" : "running")),
    el("td", { class: "num", text: experimentProgress(e) }),
    el("td", { class: "num", text: String(new Set(e.runs.map((r) => r.config)).size) }),
    el("td", { class: "muted", text: new Date(e.created_at).toLocaleString() })));
  return table("experiments-table", headers, rows);
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
  return el("details", { class: "submit" }, el("summary", { text: "Submit a run" }),
    el("p", { class: "muted", text: "A run spec as POST /api/v1/runs takes it (needs the train scope)." }),
    text, el("p", {}, el("button", { id: "submit-run", onclick: submit, text: "Submit" }), " ", result));
}

// ------------------------------------------------------------------------------------ run page

// The probes of a run page: each is one more chart of the same component, fed by one route.
// `traces(body)` turns the route's answer into chart traces. A route this server lacks (404), or a
// probe the run did not record (no epochs), hides its chart.
const RUN_PROBES = [
  {
    id: "activation-mean-chart", title: "Activations: input mean per normalisation slot", yLabel: "input mean",
    xLabel: "epoch (0 = initial network)", allowLog: false, path: (id) => `/api/v1/runs/${id}/layer-stats`,
    traces: (body) => slotTraces(body, "input_mean"),
  },
  {
    id: "activation-std-chart", title: "Activations: input std per normalisation slot", yLabel: "input std",
    xLabel: "epoch (0 = initial network)", path: (id) => `/api/v1/runs/${id}/layer-stats`,
    traces: (body) => slotTraces(body, "input_std"),
  },
  // The deep-lab probes (GET /api/v1/runs/{id}/probes/{probe}: epochs → layers → values by name).
  deepProbe("gradients", "grad_norm", "Gradient norm per layer", "‖∇W‖"),
  deepProbe("gamma", "near_zero_fraction", "γ ≈ 0: fraction per BN layer", "fraction", { allowLog: false }),
  deepProbe("smoothness", null, "Loss smoothness", "value"),
  deepProbe("statistics_gap", "mean_gap", "Batch vs running statistics: mean gap per BN layer", "mean gap"),
];

// A deep-lab probe's chart: one line per layer for the value `name`, or (name null) one line per
// value of the whole network (layer "model").
function deepProbe(probe, name, title, yLabel, extra = {}) {
  return {
    id: `probe-${probe}-chart`, title, yLabel, xLabel: "epoch (0 = initial network)", ...extra,
    path: (id) => `/api/v1/runs/${id}/probes/${probe}`,
    traces: (body) => (name ? probeLayerTraces(body, name) : probeModelTraces(body)),
  };
}

// layer-stats: one line per normalisation slot for `key` (input_mean or input_std).
function slotTraces(body, key) {
  const layers = [...new Set(body.epochs.flatMap((e) => e.layers.map((l) => l.layer)))];
  return layers.map((layer, i) => ({
    label: layer, ...styleOf(i), dash: false,
    runs: [{ id: layer, points: body.epochs.flatMap((e) => e.layers.filter((l) => l.layer === layer).map((l) => ({ x: { epoch: e.epoch }, y: l[key] }))) }],
  }));
}

function probeLayerTraces(body, name) {
  const layers = [...new Set(body.epochs.flatMap((e) => e.layers.filter((l) => l.layer !== "model" && name in l.values).map((l) => l.layer)))];
  return layers.map((layer, i) => ({
    label: layer, ...styleOf(i), dash: false,
    runs: [{ id: layer, points: body.epochs.flatMap((e) => e.layers.filter((l) => l.layer === layer).map((l) => ({ x: { epoch: e.epoch }, y: l.values[name] }))) }],
  }));
}

function probeModelTraces(body) {
  const names = [...new Set(body.epochs.flatMap((e) => e.layers.filter((l) => l.layer === "model").flatMap((l) => Object.keys(l.values))))];
  return names.map((name, i) => ({
    label: name, ...styleOf(i), dash: false,
    runs: [{ id: name, points: body.epochs.flatMap((e) => e.layers.filter((l) => l.layer === "model").map((l) => ({ x: { epoch: e.epoch }, y: l.values[name] ?? null }))) }],
  }));
}

async function loadProbes(runId, charts, signal) {
  const bodies = new Map();
  for (const probe of RUN_PROBES) {
    const chart = charts.get(probe.id);
    try {
      const path = probe.path(runId);
      if (!bodies.has(path)) bodies.set(path, api(path, { signal }));
      const traces = probe.traces(await bodies.get(path));
      chart.element.hidden = !traces.length;
      chart.update(traces);
    } catch (error) {
      if (error.status === 404) chart.element.hidden = true;
      else if (!signal.aborted) console.error(error);
    }
  }
}

async function runPage(view, signal, runId) {
  const run = await api(`/api/v1/runs/${runId}`, { signal });
  runId = run.id;
  const statusBox = el("span", { id: "run-status" }, statusBadge(run.status));
  const progress = el("span", { id: "run-progress", text: `${run.summary.epochs_done}/${run.summary.epochs_total} epochs` });
  const errorBox = el("p", { class: "error", id: "run-error", text: run.error || "" });
  const modelLink = el("span", { id: "model-link" });
  const title = run.name || shortId(run.id);
  const curves = curveCharts("", title, { filename: `run-${shortId(run.id)}` });
  const probeCharts = new Map(RUN_PROBES.map((p) => [p.id, lineChart({ ...p, filename: `run-${shortId(run.id)}-${p.id.replace(/-chart$/, "")}` })]));
  for (const chart of probeCharts.values()) chart.element.hidden = true; // until its data comes
  const bnBox = el("div", { id: "bn-stats" }, el("p", { class: "muted", text: "loading…" }));
  const epochsBox = el("div", { id: "epochs" });
  const pick = el("input", { type: "checkbox", id: "pick-run", class: "pick" });
  pick.checked = selection.has(runId);
  pick.addEventListener("change", () => selection.toggle(runId, pick.checked));
  view.append(
    el("h1", { class: "title" }, el("span", { class: "run-name", title, text: `Run ${title} ` }), el("span", { class: "muted id", text: run.id })),
    el("p", {}, statusBox, "  ", progress, "  ", modelLink, "  ",
      run.experiment_id ? el("a", { href: `#/experiments/${run.experiment_id}`, text: "its experiment" }) : "", "  ",
      el("label", {}, pick, " select for comparison"), " ", el("span", { id: "selection-bar", class: "selection-bar inline", hidden: true })),
    errorBox,
    el("p", { class: "downloads" }, "Metrics: ", apiDownload("CSV", `/api/v1/runs/${runId}/metrics.csv`, `${runId}-metrics.csv`), " ",
      apiDownload("JSON", `/api/v1/runs/${runId}/metrics`, `${runId}-metrics.json`)),
    styleNote(),
    el("div", { class: "charts" }, curves.loss.element, curves.accuracy.element),
    el("h2", { text: "Probes" }),
    el("p", { class: "muted", text: "Measured on a fixed probe batch at each epoch end: activation statistics always; gradient norms, γ, smoothness and the statistics gap where the server and the run's train.probes record them." }),
    el("div", { class: "charts", id: "probe-charts" }, ...[...probeCharts.values()].map((c) => c.element)),
    el("h2", { text: "BN running statistics (the served model)" }), bnBox,
    el("h2", { text: "Epochs" }), epochsBox,
    el("h2", { text: "Spec" }), el("pre", { text: JSON.stringify(run.spec, null, 2) }),
    manageRun(run));
  selectionBar();

  const epochs = new Map();
  const redraw = () => {
    const rows = [...epochs.values()].sort((a, b) => a.epoch - b.epoch);
    const group = [{ label: "", style: styleOf(0), runs: [{ id: run.id, epochs: rows }] }];
    curves.loss.update(metricTraces(group, "loss"));
    curves.accuracy.update(metricTraces(group, "accuracy"));
    epochsBox.replaceChildren(epochTable(rows));
  };
  const showStatus = (status, error) => {
    statusBox.replaceChildren(statusBadge(status));
    errorBox.textContent = error || "";
    modelLink.replaceChildren(status === "succeeded" ? el("a", { href: `#/models/${runId}`, text: "→ predict with this model" }) : "");
    if (FINISHED.has(status)) bnStats(runId, status, bnBox, signal);
  };
  showStatus(run.status, run.error);
  redraw();
  loadProbes(runId, probeCharts, signal);
  let probeTimer = null;
  const ended = (event) => event.type === "status" && FINISHED.has(event.data.status);
  await followEvents(`/api/v1/runs/${runId}/events`, (event) => {
    if (event.type === "epoch") {
      epochs.set(event.data.epoch, event.data);
      progress.textContent = `${event.data.epoch}/${event.data.epochs_total} epochs`;
      redraw();
      clearTimeout(probeTimer);
      probeTimer = setTimeout(() => loadProbes(runId, probeCharts, signal), 500);
    } else if (event.type === "status") {
      showStatus(event.data.status, event.data.error);
    }
  }, signal, ended);
}

function epochTable(rows) {
  const body = rows.map((r) => el("tr", {}, el("td", { class: "num", text: r.epoch }),
    ...METRIC_KEYS.map((k) => numCell(r[k])), numCell(r.seconds, 2)));
  return table("epochs-table", ["epoch", "train loss", "train acc", "val loss", "val acc", "seconds"], body);
}

// BN running statistics of the served model: a table per layer and histograms with the chart component.
async function bnStats(runId, status, box, signal) {
  if (status !== "succeeded") {
    box.replaceChildren(el("p", { class: "muted", text: "Only a succeeded run has a stored model to read." }));
    return;
  }
  let body;
  try {
    body = await api(`/api/v1/runs/${runId}/bn-stats`, { signal });
  } catch (error) {
    box.replaceChildren(el("p", { class: "muted", text: error.message }));
    return;
  }
  if (!body.layers.length) {
    box.replaceChildren(el("p", { class: "muted", id: "bn-none", text: "This model has no BatchNorm layer." }));
    return;
  }
  const summary = (s) => (s ? `${fmt(s.mean, 3)} ± ${fmt(s.std, 3)} [${fmt(s.min, 3)}, ${fmt(s.max, 3)}]` : "–");
  const rows = body.layers.map((l, i) => el("tr", {}, el("td", {}, swatch(styleOf(i)), ` ${l.name}`), el("td", { class: "num", text: l.num_features }),
    el("td", { class: "num", text: l.num_batches_tracked ?? "–" }), el("td", { class: "num", text: l.momentum ?? "cumulative" }),
    el("td", { text: summary(l.running_mean) }), el("td", { text: summary(l.running_var) }), el("td", { text: summary(l.weight) }), el("td", { text: summary(l.bias) })));
  const histogram = (key, title) => {
    const chart = lineChart({ id: `bn-${key}-chart`, title, xModes: ["value"], xLabel: key.replace("_", " "), yLabel: "channels", smoothing: false, filename: `run-${shortId(runId)}-bn-${key}` });
    chart.update(body.layers.filter((l) => l[key]).map((l, i) => ({
      label: l.name, ...styleOf(i), dash: false,
      runs: [{ id: l.name, points: l[key].histogram_counts.map((c, b) => ({ x: { value: (l[key].histogram_edges[b] + l[key].histogram_edges[b + 1]) / 2 }, y: c })) }],
    })));
    return chart.element;
  };
  box.replaceChildren(
    el("p", { class: "muted", text: `model version ${body.version}; mean ± std [min, max] over each layer's channels` }),
    el("div", { class: "scroll" }, table("bn-table", ["layer", "features", "batches tracked", "momentum", "running mean", "running var", "γ (weight)", "β (bias)"], rows)),
    el("div", { class: "charts" }, histogram("running_mean", "Running mean: histogram over channels"), histogram("running_var", "Running variance: histogram over channels"),
      body.layers.some((l) => l.weight) ? histogram("weight", "γ: histogram over channels") : null));
}

// Rename, tags, notes and delete: PATCH and DELETE /api/v1/runs/{id} (the runs-management change).
// A server without them answers 404/405 and the form says so.
function manageRun(run) {
  const name = el("input", { id: "manage-name", value: run.name || "", maxlength: "200" });
  const tags = el("input", { id: "manage-tags", value: (run.tags || []).join(", "), placeholder: "comma-separated" });
  const notes = el("textarea", { id: "manage-notes", rows: "3" });
  notes.value = run.notes || "";
  const result = el("span", { class: "muted" });
  const fail = (error) => { result.textContent = [404, 405].includes(error.status) ? "This server cannot edit runs yet." : error.message; result.className = "error"; };
  const save = async () => {
    const body = { name: name.value.trim() || null, tags: tags.value.split(",").map((t) => t.trim()).filter(Boolean), notes: notes.value };
    try {
      await api(`/api/v1/runs/${run.id}`, { method: "PATCH", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
      result.textContent = "saved"; result.className = "muted";
    } catch (error) { fail(error); }
  };
  const remove = async () => {
    if (!confirm(`Delete run ${run.name || run.id} and its metrics and model?`)) return;
    try {
      await apiResponse(`/api/v1/runs/${run.id}`, { method: "DELETE" });
      location.hash = "#/";
    } catch (error) { fail(error); }
  };
  return el("details", { class: "manage", id: "manage" }, el("summary", { text: "Rename, tag, annotate or delete" }),
    el("div", { class: "manage-grid" }, el("label", { text: "name" }), name, el("label", { text: "tags" }), tags, el("label", { text: "notes" }, ), notes),
    el("p", {}, el("button", { type: "button", text: "Save", onclick: save }), " ", el("button", { type: "button", class: "danger", text: "Delete run", onclick: remove }), " ", result));
}

// ------------------------------------------------------------------------------------ model page

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
    const names = answer.class_names;
    const bars = probabilities.flatMap((p, cls) => {
      const bar = el("span", { class: "p" });
      bar.style.width = `${Math.round(p * 180)}px`;
      return [el("span", { text: names ? names[cls] : cls }), el("span", {}, bar), el("span", { class: "num", text: fmt(p, 3) })];
    });
    output.replaceChildren(
      el("p", {}, "Prediction: ", el("span", { class: "prediction", id: "prediction", text: answer.predictions[0] }),
        answer.labels ? el("span", { class: "muted", text: ` (${answer.labels[0]})` }) : ""),
      el("p", { class: "muted", text: `model version ${answer.model_version}, fused ${answer.fused}, image ${answer.image.width}×${answer.image.height}${answer.image.inverted ? ", inverted" : ""}` }),
      el("div", { class: "probs" }, ...bars));
  } catch (error) {
    output.replaceChildren(el("p", { class: "error", id: "prediction-error", text: error.message }));
  }
}

// ------------------------------------------------------------------------------------ experiment page

async function experimentPage(view, signal, experimentId) {
  const experiment = await api(`/api/v1/experiments/${experimentId}`, { signal });
  experimentId = experiment.id;
  const statusBox = el("span", { id: "experiment-status" });
  const curves = curveCharts("exp-", experiment.name, { bandToggle: true, filename: `experiment-${shortId(experimentId)}` });
  const configs = [...new Set(experiment.runs.map((r) => r.config))]; // grid order, as the PNG plot
  const styleOfConfig = (config) => styleOf(configs.indexOf(config));
  const allIds = experiment.runs.map((r) => r.id).join(",");
  const reportBox = el("div", { id: "report" });
  const runsBox = el("div", { id: "experiment-runs" });
  view.append(
    el("h1", { class: "title" }, `Experiment ${experiment.name} `, el("span", { class: "muted id", text: experiment.id })),
    el("p", {}, statusBox, " ", el("span", { class: "muted", text: experiment.preset ? `preset ${experiment.preset} · ` : "" }),
      `${configs.length} configurations × ${experiment.spec.seeds.length} seeds · `,
      el("a", { id: "compare-experiment", href: `#/compare?runs=${allIds}&group=seed`, text: "open in the comparison view" })),
    el("p", { class: "downloads" }, "Downloads: ",
      apiDownload("report CSV", `/api/v1/experiments/${experimentId}/report.csv`, `${experimentId}-report.csv`), " ",
      apiDownload("report JSON", `/api/v1/experiments/${experimentId}/report`, `${experimentId}-report.json`), " ",
      apiDownload("every epoch (CSV)", `/api/v1/experiments/${experimentId}/metrics.csv`, `${experimentId}-metrics.csv`), " ",
      apiDownload("loss plot (PNG)", `/api/v1/experiments/${experimentId}/plot.png?metric=loss`, `${experimentId}-loss.png`)),
    styleNote(),
    el("div", { class: "charts" }, curves.loss.element, curves.accuracy.element),
    el("h2", { text: "Report" }), reportBox,
    el("h2", { text: "Runs" }), el("div", { id: "selection-bar", class: "selection-bar", hidden: true }), runsBox);
  selectionBar();
  const runs = new Map(experiment.runs.map((r) => [r.id, { ...r, epochs: new Map() }]));
  const showStatus = (finished) => statusBox.replaceChildren(statusBadge(finished ? "finished" : "running"));
  const redraw = () => {
    const groups = configs.map((config) => ({
      label: config, style: styleOfConfig(config),
      runs: [...runs.values()].filter((r) => r.config === config).map((r) => ({ id: r.id, epochs: [...r.epochs.values()] })),
    }));
    curves.loss.update(metricTraces(groups, "loss"));
    curves.accuracy.update(metricTraces(groups, "accuracy"));
    runsBox.replaceChildren(experimentRunsTable([...runs.values()], styleOfConfig));
  };
  const refreshReport = async () => {
    try {
      const report = await api(`/api/v1/experiments/${experimentId}/report`, { signal });
      reportBox.replaceChildren(reportView(report, styleOfConfig));
    } catch (error) {
      if (!signal.aborted) reportBox.replaceChildren(el("p", { class: "error", text: error.message }));
    }
  };
  showStatus(experiment.finished);
  redraw();
  await refreshReport();
  let timer = null;
  const redrawSoon = () => { if (!timer) timer = setTimeout(() => { timer = null; redraw(); }, 100); };
  await followEvents(`/api/v1/experiments/${experimentId}/events`, (event) => {
    const run = runs.get(event.data.run_id);
    if (event.type === "epoch" && run) {
      run.epochs.set(event.data.epoch, event.data);
      run.epochs_done = event.data.epoch;
      run.val_loss = event.data.val_loss;
      run.val_accuracy = event.data.val_accuracy;
      redrawSoon();
    } else if (event.type === "status" && run) {
      run.status = event.data.status;
      redrawSoon();
      if (FINISHED.has(run.status)) refreshReport();
    } else if (event.type === "end") {
      redraw();
      showStatus(true);
      refreshReport();
    }
  }, signal, (event) => event.type === "end");
}

function experimentRunsTable(runs, styleOfConfig) {
  const rows = runs.map((r) => el("tr", { "data-run-id": r.id },
    pickBox(r.id),
    nameCell(r.name || shortId(r.id), `#/runs/${r.id}`),
    el("td", {}, swatch(styleOfConfig(r.config)), ` ${r.config}`), el("td", { class: "num", text: r.seed }),
    el("td", {}, statusBadge(r.status)),
    el("td", {}, progressBar(r.epochs_done, r.epochs_total), ` ${r.epochs_done}/${r.epochs_total}`),
    numCell(r.val_loss), numCell(r.val_accuracy)));
  return el("div", { class: "scroll" }, table("experiment-runs-table", ["✓", "run", "configuration", "seed", "status", "progress", "val loss", "val accuracy"], rows));
}

function stat(s) {
  if (!s || s.mean === null || s.mean === undefined) return "–";
  return s.std === null || s.std === undefined ? fmt(s.mean) : `${fmt(s.mean)} ± ${fmt(s.std)}`;
}

function reportView(report, styleOfConfig) {
  const headers = ["configuration", "ok/runs", "final val loss", "final val accuracy", "best val loss", `epochs to ${report.target}`];
  const rows = report.configurations.map((c) => el("tr", {},
    el("td", {}, swatch(styleOfConfig(c.config)), ` ${c.config}`), el("td", { class: "num", text: `${c.succeeded}/${c.runs}` }),
    el("td", { class: "num", text: stat(c.final.val_loss) }), el("td", { class: "num", text: stat(c.final.val_accuracy) }),
    el("td", { class: "num", text: stat(c.best.val_loss) }),
    el("td", { class: "num", text: c.epochs_to_target.mean === null ? `– (${c.epochs_to_target.reached} reached)` : `${c.epochs_to_target.mean.toFixed(1)} (${c.epochs_to_target.reached} reached)` })));
  const notes = [
    el("p", { class: "muted", text: report.finished ? "All runs have ended." : "Runs are still training: these figures will change." }),
    ...report.winners.map((w) => el("p", { text: `Best ${w.metric} (${w.better}): ${w.config}` })),
    ...report.claims.map((c) => el("p", {}, el("strong", { text: `${c.verdict}: ` }), c.claim, el("span", { class: "muted", text: ` (${c.evidence})` }))),
  ];
  return el("div", {}, el("div", { class: "scroll" }, table("report-table", headers, rows)), ...notes);
}

// ------------------------------------------------------------------------------------ comparison

// Dotted paths → values of a spec (lists are one value).
function flatten(value, prefix = "", out = {}) {
  if (value && typeof value === "object" && !Array.isArray(value)) {
    for (const [key, inner] of Object.entries(value)) flatten(inner, prefix ? `${prefix}.${key}` : key, out);
  } else {
    out[prefix] = JSON.stringify(value);
  }
  return out;
}

// The shortest dotted suffix of each path that no other path shares: model.norm.kind → kind or norm.kind.
function shortNames(paths) {
  const names = new Map();
  for (const path of paths) {
    const parts = path.split(".");
    let n = 1;
    const clash = (k) => paths.some((other) => other !== path && other.split(".").slice(-k).join(".") === parts.slice(-k).join("."));
    while (n < parts.length && clash(n)) n += 1;
    names.set(path, parts.slice(-n).join("."));
  }
  return names;
}

const SEED = "train.seed";

// How the comparison groups its runs: each run alone, everything but the seed, or one field.
// A spec value for people: strings without their JSON quotes.
function shown(value) {
  if (value === undefined) return "–";
  const parsed = JSON.parse(value);
  return typeof parsed === "string" ? parsed : value;
}

function groupRuns(runs, flats, differing, by) {
  const fields = differing.filter((p) => p !== SEED && p !== "name");
  const short = shortNames(fields);
  const keyOf = (flat, run) => {
    if (by === "run") return run.id;
    if (by === "seed") return JSON.stringify(Object.entries(flat).filter(([p]) => p !== SEED && p !== "name").sort());
    return flat[by] ?? "null";
  };
  const labelOf = (flat, run) => {
    if (by === "run") return run.name || shortId(run.id);
    if (by === "seed") return fields.map((p) => `${short.get(p)}=${shown(flat[p])}`).join(" ") || "all runs";
    return `${shortNames([by]).get(by)}=${shown(flat[by])}`;
  };
  const groups = new Map();
  runs.forEach((run, i) => {
    const key = keyOf(flats[i], run);
    if (!groups.has(key)) groups.set(key, { key, label: labelOf(flats[i], run), runs: [] });
    groups.get(key).runs.push(run);
  });
  return [...groups.values()].map((g, i) => ({ ...g, style: styleOf(i) }));
}

function best(epochs, key) {
  const values = epochs.map((e) => e[key]).filter(Number.isFinite);
  if (!values.length) return null;
  return key.endsWith("accuracy") ? Math.max(...values) : Math.min(...values);
}

async function comparePage(view, signal, _unused, query) {
  const ids = [...new Set((query.get("runs") || "").split(",").filter((id) => /^[0-9a-f]{6,32}$/.test(id)))];
  let by = query.get("group") || "run";
  view.append(el("h1", { text: `Comparison of ${ids.length} runs` }));
  if (!ids.length) {
    view.append(el("p", { class: "muted", text: "Select runs with the checkboxes of any list (runs, an experiment's runs), then Compare." }));
    return;
  }
  const runs = await Promise.all(ids.map((id) => api(`/api/v1/runs/${id}`, { signal })));
  const metrics = await Promise.all(runs.map((r) => api(`/api/v1/runs/${r.id}/metrics`, { signal })));
  runs.forEach((run, i) => { run.epochs = metrics[i].epochs; });
  selection.set(runs.map((r) => r.id));
  const flats = runs.map((r) => flatten({ name: r.name, ...r.spec }));
  const fields = [...new Set(flats.flatMap(Object.keys))].sort();
  const differing = fields.filter((f) => new Set(flats.map((flat) => flat[f])).size > 1);
  const options = [["run", "each run"], ["seed", "everything but the seed"], ...differing.filter((f) => f !== "name").map((f) => [f, f])];
  if (!options.some(([v]) => v === by)) by = "run";
  const groupSelect = select("group-by", "group", options, by, (value) => {
    by = value || "run";
    setHashQuery(new URLSearchParams({ runs: runs.map((r) => r.id).join(","), group: by }));
    draw();
  });
  groupSelect.firstChild.remove(); // no "any"
  groupSelect.value = by;
  const curves = curveCharts("compare-", `${runs.length} runs`, { bandToggle: true, filename: "comparison" });
  const specBox = el("div", { id: "spec-diff" });
  const metricsBox = el("div", { id: "compare-metrics" });
  const link = () => `${location.origin}${location.pathname}#/compare?runs=${runs.map((r) => r.id).join(",")}${by === "run" ? "" : `&group=${by}`}`;
  view.append(
    el("p", {}, el("label", { for: "group-by", text: "Group runs by " }), groupSelect, " ",
      el("button", { type: "button", class: "link", text: "copy link to this comparison", onclick: () => navigator.clipboard?.writeText(link()) }), " · ",
      el("a", { href: "#/", text: "add runs from the list" })),
    el("p", { class: "downloads" }, "Downloads: ",
      el("button", { type: "button", class: "link", id: "compare-csv", "data-download": "comparison.csv", text: "every epoch (CSV)", onclick: () => download("comparison.csv", comparisonCsv(runs, currentGroups()), "text/csv") }), " ",
      el("button", { type: "button", class: "link", "data-download": "comparison.json", text: "JSON", onclick: () => download("comparison.json", JSON.stringify(comparisonJson(runs, currentGroups()), null, 2), "application/json") })),
    styleNote(),
    el("div", { class: "charts" }, curves.loss.element, curves.accuracy.element),
    el("h2", { text: "Final and best metrics" }), metricsBox,
    el("h2", { text: "Specs side by side" }), specBox);
  let groups = [];
  const currentGroups = () => groups;
  const draw = () => {
    groups = groupRuns(runs, flats, differing, by);
    curves.loss.update(metricTraces(groups, "loss"));
    curves.accuracy.update(metricTraces(groups, "accuracy"));
    metricsBox.replaceChildren(compareMetricsTable(runs, groups), by === "run" ? "" : groupSummaryTable(groups));
    specBox.replaceChildren(specTable(runs, flats, fields, differing, groups));
  };
  draw();
  await sleep(0, signal);
}

function groupOf(groups, run) {
  return groups.find((g) => g.runs.includes(run));
}

function compareMetricsTable(runs, groups) {
  const rows = runs.map((run) => {
    const last = run.epochs[run.epochs.length - 1] || {};
    const group = groupOf(groups, run);
    return el("tr", { "data-run-id": run.id },
      el("td", {}, swatch(group.style), " ", el("a", { href: `#/runs/${run.id}`, title: run.name || run.id, text: run.name || shortId(run.id) })),
      el("td", { text: group.label }), el("td", {}, statusBadge(run.status)), el("td", { class: "num", text: run.epochs.length }),
      numCell(last.val_loss), numCell(last.val_accuracy), numCell(best(run.epochs, "val_loss")), numCell(best(run.epochs, "val_accuracy")), numCell(last.train_loss));
  });
  return el("div", { class: "scroll" }, table("compare-table", ["run", "group", "status", "epochs", "final val loss", "final val acc", "best val loss", "best val acc", "final train loss"], rows));
}

function groupSummaryTable(groups) {
  const cell = (group, pick) => {
    const s = meanStd(group.runs.map(pick).filter((v) => v !== null && v !== undefined));
    return el("td", { class: "num", text: s.n ? (s.n > 1 ? `${fmt(s.mean)} ± ${fmt(s.std)}` : fmt(s.mean)) : "–" });
  };
  const last = (key) => (run) => run.epochs[run.epochs.length - 1]?.[key] ?? null;
  const rows = groups.map((g) => el("tr", {}, el("td", {}, swatch(g.style), ` ${g.label}`), el("td", { class: "num", text: g.runs.length }),
    cell(g, last("val_loss")), cell(g, last("val_accuracy")), cell(g, (r) => best(r.epochs, "val_loss")), cell(g, (r) => best(r.epochs, "val_accuracy"))));
  return el("div", { class: "scroll" }, table("group-table", ["group (mean ± std over its runs)", "runs", "final val loss", "final val acc", "best val loss", "best val acc"], rows));
}

function specTable(runs, flats, fields, differing, groups) {
  const all = el("input", { type: "checkbox", id: "spec-all" });
  const body = el("tbody");
  const fill = () => body.replaceChildren(...fields.filter((f) => all.checked || differing.includes(f)).map((f) =>
    el("tr", { class: differing.includes(f) ? "differs" : "", "data-field": f }, el("th", { text: f }),
      ...flats.map((flat) => el("td", { text: shown(flat[f]) })))));
  all.addEventListener("change", fill);
  fill();
  const head = el("tr", {}, el("th", {}, el("label", {}, all, ` all ${fields.length} fields (${differing.length} differ)`)),
    ...runs.map((run) => el("th", { class: "name", title: run.name || run.id }, swatch(groupOf(groups, run).style), ` ${run.name || shortId(run.id)}`)));
  return el("div", { class: "scroll" }, el("table", { id: "spec-table" }, el("thead", {}, head), body));
}

function comparisonRows(runs, groups) {
  return runs.flatMap((run) => run.epochs.map((e) => ({ run_id: run.id, name: run.name, group: groupOf(groups, run).label, ...e })));
}

function comparisonCsv(runs, groups) {
  return toCsv(["run_id", "name", "group", "epoch", ...METRIC_KEYS, "seconds", "train_seconds", "train_samples"], comparisonRows(runs, groups));
}

function comparisonJson(runs, groups) {
  return {
    groups: groups.map((g) => ({ label: g.label, runs: g.runs.map((r) => r.id) })),
    runs: runs.map((r) => ({ id: r.id, name: r.name, status: r.status, spec: r.spec, epochs: r.epochs })),
  };
}

// ------------------------------------------------------------------------------------ replication cards

// The cards (GET /api/v1/replications, /api/v1/cards/{name}, …/report): a server without them says so.
async function cardsPage(view, signal) {
  view.append(el("h1", { text: "Replication cards" }));
  let body;
  try {
    body = await api("/api/v1/replications", { signal });
  } catch (error) {
    if (error.status !== 404) throw error;
    view.append(el("p", { class: "muted", id: "cards-none", text: "This server has no replication cards." }));
    return;
  }
  const rows = body.items.map((c) => el("tr", { "data-card": c.card },
    nameCell(c.title, `#/cards/${c.card}`), el("td", { text: c.card }),
    el("td", { text: c.available ? "yes" : `no: ${c.unavailable_reason || ""}` }),
    el("td", {}, c.last_run ? statusBadge(c.finished ? "finished" : "running") : ""),
    el("td", { text: c.scale || "" }), numCell(c.measured_seconds, 0), numCell(c.estimated_seconds, 0)));
  view.append(el("div", { class: "scroll" }, table("cards-table", ["card", "name", "available", "last run", "scale", "took (s)", "estimate (s)"], rows)));
}

async function cardPage(view, signal, name) {
  const card = await api(`/api/v1/cards/${name}`, { signal });
  view.append(el("h1", { text: card.title }), el("p", { class: "muted", text: card.citation }),
    el("p", {}, el("strong", { text: "Claim: " }), card.claim),
    el("p", {}, el("strong", { text: "The paper: " }), card.paper_setup),
    el("ul", {}, ...card.paper_figures.map((f) => el("li", { text: `${f.text}${f.verified ? " (verified)" : ""}` }))),
    el("p", {}, el("strong", { text: "bnlab: " }), card.setup),
    el("p", {}, el("strong", { text: "What differs: " }), card.differences),
    card.available ? cardRunForm(card) : el("p", { class: "error", text: `Cannot run here: ${card.unavailable_reason}` }),
    el("h2", { text: "Contrasts" }),
    el("div", { class: "scroll" }, table("contrasts-table", ["claim", "metric", "contrast", "sign", "smallest effect"],
      card.claims.map((c) => el("tr", {}, el("td", { text: c.sentence }), el("td", { text: c.metric }), el("td", { text: c.contrast }),
        el("td", { text: c.direction }), numCell(c.smallest))))));
  if (!card.last_run) return;
  const report = await api(`/api/v1/cards/${name}/report`, { signal });
  view.append(el("h2", { text: `Latest run (${report.scale}, ${report.dataset})` }),
    el("p", {}, statusBadge(report.finished ? "finished" : "running"), " ",
      Object.entries(report.runs).map(([state, n]) => `${n} ${state}`).join(", ")),
    el("p", { text: report.summary }),
    el("div", { class: "scroll" }, table("verdicts-table", ["claim", "effect [95 % CI]", "p (Holm)", "Hedges' g", "seeds for power", "verdict", "paper"],
      report.claims.map((c) => el("tr", {}, el("td", { text: c.sentence }),
        el("td", { class: "num", text: `${fmt(c.effect)} [${fmt(c.ci_low)}, ${fmt(c.ci_high)}]` }),
        el("td", { class: "num", text: `${fmt(c.p_value, 3)} (${fmt(c.adjusted_p, 3)})` }), numCell(c.hedges_g, 2),
        el("td", { class: "num", text: c.seeds_for_power ?? "–" }), el("td", { text: c.verdict ? `${c.verdict}${c.reason ? `: ${c.reason}` : ""}` : "–" }),
        el("td", { text: c.paper_comparison }))))),
    el("p", { class: "muted", text: report.verdict_rule }),
    el("p", { class: "downloads" }, "Figure: ", apiDownload("PNG", report.figure_png, `${name}-figure.png`), " ",
      apiDownload("SVG", report.figure_svg, `${name}-figure.svg`)),
    await authorisedImage(report.figure_png, `${card.title}: the paper's figure redrawn from this run`, signal));
  // Each of its experiments with the same curves as an experiment page.
  for (const experimentId of report.experiments) view.append(await experimentCurves(experimentId, signal));
}

// An image behind the API key: fetched with it, shown from a blob: URL (the CSP allows those).
async function authorisedImage(path, alt, signal) {
  try {
    const blob = await (await apiResponse(path, { signal })).blob();
    return el("img", { class: "figure", src: URL.createObjectURL(blob), alt });
  } catch (error) {
    return el("p", { class: "muted", text: `figure: ${error.message}` });
  }
}

function cardRunForm(card) {
  const scale = select("card-scale", "scale", Object.keys(card.estimated_seconds).map((k) => [k, `${k} (~${card.estimated_seconds[k]} s)`]), "quick", () => {});
  scale.firstChild.remove();
  scale.value = "quick" in card.estimated_seconds ? "quick" : scale.value;
  const result = el("span", { class: "muted" });
  const run = async () => {
    try {
      await api(`/api/v1/cards/${card.name}`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ scale: scale.value }) });
      route();
    } catch (error) { result.textContent = error.message; result.className = "error"; }
  };
  return el("p", {}, el("button", { type: "button", text: "Run this card", onclick: run }), " at scale ", scale, " ", result);
}

// An experiment's mean ± std curves, read once (the card page; the experiment page follows them live).
async function experimentCurves(experimentId, signal) {
  const experiment = await api(`/api/v1/experiments/${experimentId}`, { signal });
  const metrics = await Promise.all(experiment.runs.map((r) => api(`/api/v1/runs/${r.id}/metrics`, { signal })));
  const configs = [...new Set(experiment.runs.map((r) => r.config))];
  const groups = configs.map((config, i) => ({
    label: config, style: styleOf(i),
    runs: experiment.runs.map((r, k) => ({ id: r.id, config: r.config, epochs: metrics[k].epochs })).filter((r) => r.config === config),
  }));
  const curves = curveCharts(`exp-${shortId(experimentId)}-`, experiment.name, { bandToggle: true, filename: `experiment-${shortId(experimentId)}` });
  const box = el("div", {}, el("h3", {}, el("a", { href: `#/experiments/${experimentId}`, text: experiment.name })),
    el("div", { class: "charts" }, curves.loss.element, curves.accuracy.element));
  curves.loss.update(metricTraces(groups, "loss"));
  curves.accuracy.update(metricTraces(groups, "accuracy"));
  return box;
}

// ------------------------------------------------------------------------------------ searches

// Optuna searches (GET /api/v1/searches): each trial trains as an experiment over the seeds.
async function searchesPage(view, signal) {
  view.append(el("h1", { text: "Searches" }));
  let page;
  try {
    page = await api("/api/v1/searches?limit=100", { signal });
  } catch (error) {
    if (error.status !== 404) throw error;
    view.append(el("p", { class: "muted", text: "This server has no searches API." }));
    return;
  }
  if (!page.items.length) {
    view.append(el("p", { class: "muted", id: "searches-none", text: "No searches yet (`bnlab search start spec.json`)." }));
    return;
  }
  const rows = page.items.map((s) => el("tr", { "data-search-id": s.id },
    nameCell(s.name, `#/searches/${s.id}`), el("td", {}, statusBadge(s.status)),
    el("td", { class: "num", text: `${s.trials.length - s.trial_counts.running}/${s.spec.trials}` }),
    numCell(s.best ? s.best.value : null), el("td", { text: shortDate(s.created_at) })));
  view.append(table("searches-table", ["search", "status", "trials", "best", "created"], rows));
}

function paramsText(params) {
  return Object.entries(params).map(([k, v]) => `${k}=${typeof v === "number" ? Number(v.toPrecision(3)) : JSON.stringify(v)}`).join(" ");
}

function meanPlusMinus(mean, std) {
  return mean === null ? "–" : `${fmt(mean)}${std === null ? "" : ` ± ${fmt(std)}`}`;
}

async function searchPage(view, signal, searchId) {
  const load = () => api(`/api/v1/searches/${searchId}`, { signal });
  let search = await load();
  const summary = el("div", { id: "search-summary" });
  const trialsBox = el("div", { id: "search-trials" });
  const plotsBox = el("div", { id: "search-plots", class: "charts" });
  const objective = search.spec.objective;
  view.append(
    el("h1", { class: "title" }, `Search ${search.name} `, el("span", { class: "muted id", text: search.id })),
    el("p", { class: "muted", text: `${search.spec.trials} trials × ${search.spec.seeds.length} seeds · ${objective.aggregate} of ${objective.metric} (${objective.direction}) · sampler ${search.spec.sampler.kind} · pruner ${search.spec.pruner.kind} · Optuna study ${search.study_name}` }),
    summary, el("h2", { text: "Trials" }), trialsBox, el("h2", { text: "Plots" }), plotsBox);
  let plotted = -1;
  for (;;) {
    const best = search.best;
    summary.replaceChildren(
      el("p", {}, statusBadge(search.status), " ",
        best ? el("span", { id: "search-best" }, `best: trial ${best.number}, ${paramsText(best.params)}: ${fmt(best.value)} (seeds ${meanPlusMinus(best.mean, best.std)})`) : "no complete trial yet"),
      search.importances ? el("p", { id: "search-importances" }, `importances (${search.importance_method}): `,
        Object.entries(search.importances).map(([k, v]) => `${k} ${v.toFixed(2)}`).join(", ")) : "");
    const rows = search.trials.map((t) => el("tr", { "data-trial": t.number },
      el("td", { class: "num", text: t.number }), el("td", {}, statusBadge(t.state)), el("td", { text: paramsText(t.params) }),
      numCell(t.value), el("td", { class: "num", text: meanPlusMinus(t.mean, t.std) }),
      el("td", { class: "num", text: t.values.map((v) => (v === null ? "–" : fmt(v))).join(" ") }),
      el("td", {}, t.experiment_id ? el("a", { href: `#/experiments/${t.experiment_id}`, text: "runs" }) : (t.error || ""))));
    trialsBox.replaceChildren(table("search-trials-table", ["#", "state", "params", "value", "mean ± std", "per seed", ""], rows));
    const complete = search.trial_counts.complete;
    if (complete > 0 && complete !== plotted) {
      plotted = complete;
      const images = await Promise.all(["history", "parallel", "slice"].map((kind) =>
        authorisedImage(`/api/v1/searches/${search.id}/plots/${kind}.png?trials=${complete}`, `${kind} plot of search ${search.name}`, signal)));
      plotsBox.replaceChildren(...images);
    }
    if (search.status !== "running") return;
    await sleep(3000, signal);
    if (signal.aborted) return;
    search = await load();
  }
}

// ------------------------------------------------------------------------------------ routing

const ROUTES = [
  [/^#?\/?$/, homePage],
  [/^#\/runs\/([0-9a-f]{6,32})$/, runPage],
  [/^#\/models\/([0-9a-f]{6,32})$/, modelPage],
  [/^#\/experiments\/([0-9a-f]{6,32})$/, experimentPage],
  [/^#\/compare()$/, comparePage],
  [/^#\/cards$/, cardsPage],
  [/^#\/searches$/, searchesPage],
  [/^#\/searches\/([0-9a-f]{6,32})$/, searchPage],
  [/^#\/cards\/([a-z0-9_-]{1,80})$/, cardPage],
];

async function route() {
  pageAbort.abort();
  pageAbort = new AbortController();
  const signal = pageAbort.signal;
  // A fresh container per visit: a page still finishing an await after the user left writes into
  // its own detached container, never into the next page.
  const view = el("div", { class: "page" });
  document.getElementById("view").replaceChildren(view);
  notice("");
  const [path] = (location.hash || "#/").split("?");
  for (const [pattern, page] of ROUTES) {
    const match = path.match(pattern);
    if (!match) continue;
    try {
      await page(view, signal, ...match.slice(1), hashQuery());
    } catch (error) {
      if (!signal.aborted) view.append(el("p", { class: "error", id: "page-error", text: error.message }));
    }
    return;
  }
  view.append(el("p", { class: "error", text: `No page at ${path}` }));
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
