// bnlab's one chart component, drawn with uPlot (service/web/vendor/uplot). Every chart of the
// dashboard is a lineChart: run curves, experiment bands, comparisons, probe statistics, histograms.
//
// Input: traces, each { label, color, dash, marker, runs: [{ id, points: [{ x: {epoch, time, …}, y }] }] }.
// A trace with several runs (the seeds of a configuration, a group of a comparison) is drawn as its
// mean ± std band, or as one line per run. Conventions, the same in the matplotlib figures
// (service/experiments/plots.py): the colour is the configuration, in grid order from one palette;
// solid is training, dashed is validation; configurations past the tenth colour add point markers.
//
// Controls: hover values in the legend (click an entry to hide it), drag to zoom (double-click
// resets), log scale, EMA smoothing, x by epoch or wall time, band or each run, and downloads of the
// chart's data (CSV, JSON) and picture (PNG, SVG).
"use strict";

// matplotlib's tab10 (C0…C9): the same configuration has the same colour in the PNG plots.
const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];
const DASH = [6, 4]; // validation

// The style of the i-th configuration: a colour, and past the palette's length, point markers.
function styleOf(i) {
  return { color: PALETTE[i % PALETTE.length], marker: Math.floor(i / PALETTE.length) };
}

// Exponential moving average, debiased (as TensorBoard's smoothing slider): weight 0 leaves the values.
function smooth(values, weight) {
  if (!weight) return values;
  let last = 0;
  let steps = 0;
  return values.map((v) => {
    if (v === null || !Number.isFinite(v)) return v;
    last = last * weight + (1 - weight) * v;
    steps += 1;
    return last / (1 - weight ** steps);
  });
}

function meanStd(values) {
  const finite = values.filter((v) => v !== null && Number.isFinite(v));
  if (!finite.length) return { mean: null, std: null, n: 0 };
  const mean = finite.reduce((a, b) => a + b, 0) / finite.length;
  if (finite.length < 2) return { mean, std: 0, n: 1 };
  const variance = finite.reduce((a, b) => a + (b - mean) ** 2, 0) / (finite.length - 1);
  return { mean, std: Math.sqrt(variance), n: finite.length };
}

function hexToRgba(hex, alpha) {
  const n = parseInt(hex.slice(1), 16);
  return `rgba(${(n >> 16) & 255},${(n >> 8) & 255},${n & 255},${alpha})`;
}

function formatValue(v) {
  if (v === null || v === undefined || !Number.isFinite(v)) return "–";
  const a = Math.abs(v);
  return a !== 0 && (a < 1e-3 || a >= 1e5) ? v.toExponential(3) : v.toPrecision(4);
}

// ------------------------------------------------------------------------------------ lines

// The plotted lines of the traces under the chart's settings: [{ trace, kind: "mean"|"run", xs, ys, std? }].
function plottedLines(traces, settings) {
  const lines = [];
  traces.forEach((trace, t) => {
    const runs = trace.runs.map((run) => {
      const points = run.points.filter((p) => p.x[settings.x] !== undefined && p.x[settings.x] !== null);
      return { id: run.id, xs: points.map((p) => p.x[settings.x]), ys: smooth(points.map((p) => p.y), settings.smoothing), epochs: points.map((p) => p.x.epoch) };
    });
    if (runs.length > 1 && settings.band) lines.push({ trace: t, kind: "mean", ...aggregate(runs) });
    else for (const run of runs) lines.push({ trace: t, kind: "run", id: run.id, xs: run.xs, ys: run.ys });
  });
  return lines;
}

// Mean ± std over runs, epoch by epoch (over the runs that reached it); x is the mean x at that epoch.
function aggregate(runs) {
  const byEpoch = new Map();
  for (const run of runs) {
    run.epochs.forEach((epoch, i) => {
      if (!byEpoch.has(epoch)) byEpoch.set(epoch, { xs: [], ys: [] });
      byEpoch.get(epoch).xs.push(run.xs[i]);
      byEpoch.get(epoch).ys.push(run.ys[i]);
    });
  }
  const epochs = [...byEpoch.keys()].sort((a, b) => a - b);
  const xs = epochs.map((e) => meanStd(byEpoch.get(e).xs).mean);
  const stats = epochs.map((e) => meanStd(byEpoch.get(e).ys));
  return { xs, ys: stats.map((s) => s.mean), std: stats.map((s) => s.std), n: runs.length };
}

// uPlot's aligned data: one sorted x array, every line's values at those x (null where it has none).
function alignedData(lines, logScale) {
  const xs = [...new Set(lines.flatMap((l) => l.xs))].sort((a, b) => a - b);
  const index = new Map(xs.map((x, i) => [x, i]));
  const keep = (v) => (v === null || !Number.isFinite(v) || (logScale && v <= 0) ? null : v);
  const columns = [xs];
  for (const line of lines) {
    const ys = new Array(xs.length).fill(null);
    line.xs.forEach((x, i) => { ys[index.get(x)] = keep(line.ys[i]); });
    columns.push(ys);
    if (line.std) {
      const lo = new Array(xs.length).fill(null);
      const hi = new Array(xs.length).fill(null);
      line.xs.forEach((x, i) => {
        if (line.ys[i] === null) return;
        lo[index.get(x)] = keep(line.ys[i] - line.std[i]);
        hi[index.get(x)] = keep(line.ys[i] + line.std[i]);
      });
      columns.push(lo, hi);
    }
  }
  return columns;
}

// ------------------------------------------------------------------------------------ the component

// lineChart(options) → { element, update(traces), settings }. options: id, title, xLabel, yLabel,
// xModes (e.g. ["epoch", "time"]), logScale (initial), allowLog, height.
function lineChart(options) {
  const settings = {
    x: (options.xModes || ["epoch"])[0], log: Boolean(options.logScale), smoothing: 0, band: options.band !== false,
  };
  const root = el("div", { class: "card chart-card", id: options.id, "data-points": "0", "data-scale": settings.log ? "log" : "linear" });
  const heading = el("div", { class: "chart-title", text: options.title || "" });
  const plotBox = el("div", { class: "plot" });
  const legend = el("div", { class: "legend" });
  const toolbar = el("div", { class: "chart-tools" });
  root.append(heading, toolbar, plotBox, legend);
  let traces = [];
  let plot = null;
  let lines = [];
  let signature = "";

  const rerender = () => { signature = ""; draw(); };
  buildToolbar(toolbar, options, settings, rerender, () => exportData(), root);

  function draw() {
    lines = plottedLines(traces, settings);
    const points = lines.reduce((n, l) => n + l.ys.filter((v) => v !== null && Number.isFinite(v)).length, 0);
    root.dataset.points = String(points);
    root.dataset.scale = settings.log ? "log" : "linear";
    root.dataset.lines = String(lines.length);
    root.dataset.x = settings.x;
    const data = alignedData(lines, settings.log);
    const look = traces.map((t) => [t.label, t.color, Boolean(t.dash), t.marker || 0]);
    const next = JSON.stringify([lines.map((l) => [l.trace, l.kind, l.id || "", Boolean(l.std)]), look, settings, plotBox.clientWidth]);
    if (plot && next === signature) {
      plot.setData(data);
    } else {
      plot?.destroy();
      plotBox.replaceChildren();
      if (!lines.length || !data[0].length) {
        plotBox.append(el("p", { class: "muted empty", text: options.empty || "nothing to draw yet" }));
        plot = null;
      } else {
        plot = new uPlot(uplotOptions(options, settings, traces, lines, plotBox, (idx) => showLegendValues(idx)), data, plotBox);
      }
      signature = next;
      buildLegend();
    }
    showLegendValues(null);
  }

  function buildLegend() {
    legend.replaceChildren(...traces.map((trace, t) => {
      const sample = el("span", { class: `sample${trace.dash ? " dashed" : ""}` });
      sample.style.borderTopColor = trace.color;
      const entry = el("span", { class: "entry", "data-trace": String(t), title: "click to hide or show" },
        sample, el("span", { class: "label", text: trace.label }), el("span", { class: "value" }));
      entry.addEventListener("click", () => toggleTrace(t, entry));
      return entry;
    }));
  }

  function toggleTrace(t, entry) {
    if (!plot) return;
    const hidden = entry.classList.toggle("off");
    let column = 1;
    for (const line of lines) {
      const count = line.std ? 3 : 1;
      if (line.trace === t) for (let k = 0; k < count; k++) plot.setSeries(column + k, { show: !hidden });
      column += count;
    }
  }

  function showLegendValues(idx) {
    const data = plot?.data;
    for (const entry of legend.querySelectorAll(".entry")) {
      const t = Number(entry.dataset.trace);
      let text = "";
      if (data && idx !== null && idx !== undefined) {
        const values = [];
        let column = 1;
        for (const line of lines) {
          if (line.trace === t) values.push({ y: data[column][idx], std: line.std ? spread(data[column][idx], data[column + 2][idx]) : null });
          column += line.std ? 3 : 1;
        }
        text = legendValue(values);
      }
      entry.querySelector(".value").textContent = text;
    }
    const x = data && idx !== null && idx !== undefined ? data[0][idx] : null;
    const xText = Number.isInteger(x) ? String(x) : formatValue(x);
    heading.dataset.cursor = x === null ? "" : `${settings.x === "time" ? "wall time (s)" : options.xLabel || "x"} = ${xText}`;
  }

  function exportData() {
    return { title: options.title, x: settings.x, traces, lines, plot, settings, yLabel: options.yLabel, xLabel: xTitle(options, settings) };
  }

  new ResizeObserver(() => { if (plot && Math.abs(plot.width - plotBox.clientWidth) > 4) rerender(); }).observe(plotBox);

  return {
    element: root,
    settings,
    update(nextTraces) { traces = nextTraces; draw(); },
  };
}

function spread(mean, upper) {
  return mean === null || upper === null || upper === undefined ? null : upper - mean;
}

function legendValue(values) {
  const present = values.filter((v) => v.y !== null && v.y !== undefined);
  if (!present.length) return "";
  if (present.length === 1) {
    const v = present[0];
    return v.std !== null && Number.isFinite(v.std) ? `${formatValue(v.y)} ± ${formatValue(v.std)}` : formatValue(v.y);
  }
  const s = meanStd(present.map((v) => v.y));
  return `${formatValue(s.mean)} ± ${formatValue(s.std)} (${s.n} runs)`;
}

function xTitle(options, settings) {
  return settings.x === "time" ? "wall time (s)" : options.xLabel || "epoch";
}

// Epochs are whole numbers: ticks 1, 2, 5, 10… apart, never 0.5.
const EPOCH_STEPS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000];

function tickLabels(u, ticks) {
  return ticks.map((v) => (v === null ? "" : String(Number(v.toPrecision(3)))));
}

function uplotOptions(options, settings, traces, lines, box, onCursor) {
  const series = [{ label: xTitle(options, settings) }];
  const bands = [];
  for (const line of lines) {
    const trace = traces[line.trace];
    const width = line.kind === "run" && trace.runs.length > 1 ? 1.2 : 2;
    series.push({
      label: trace.label,
      stroke: trace.color,
      width,
      dash: trace.dash ? DASH : undefined,
      spanGaps: true,
      points: { show: trace.marker > 0 || line.xs.length < 2, size: 4 + 2 * trace.marker, fill: trace.marker === 1 ? "#fff" : trace.color },
    });
    if (line.std) {
      const mean = series.length - 1;
      series.push({ label: `${trace.label} −std`, stroke: "transparent", width: 0, spanGaps: true, points: { show: false } });
      series.push({ label: `${trace.label} +std`, stroke: "transparent", width: 0, spanGaps: true, points: { show: false } });
      bands.push({ series: [mean + 2, mean + 1], fill: hexToRgba(trace.color, 0.16) });
    }
  }
  return {
    width: Math.max(280, box.clientWidth || 480),
    height: options.height || 260,
    legend: { show: false },
    cursor: { drag: { x: true, y: true, uni: 40 }, points: { size: 6 } },
    scales: { x: { time: false }, y: { distr: settings.log ? 3 : 1 } },
    axes: [
      { label: xTitle(options, settings), labelSize: 20, size: 36, incrs: settings.x === "epoch" ? EPOCH_STEPS : undefined, values: tickLabels },
      { label: settings.log ? `${options.yLabel || ""} (log)` : options.yLabel || "", labelSize: 20, size: 56, values: tickLabels },
    ],
    series,
    bands,
    hooks: { setCursor: [(u) => onCursor(u.cursor.idx)] },
  };
}

// ------------------------------------------------------------------------------------ toolbar

function buildToolbar(toolbar, options, settings, rerender, exportData, root) {
  const id = options.id;
  if (options.allowLog !== false) {
    const log = el("input", { type: "checkbox", class: "log-toggle", id: `${id}-log` });
    log.checked = settings.log;
    log.addEventListener("change", () => { settings.log = log.checked; rerender(); });
    toolbar.append(el("label", { title: "logarithmic y axis" }, log, " log"));
  }
  if (options.smoothing !== false) {
    const slider = el("input", { type: "range", min: "0", max: "0.95", step: "0.05", value: "0", class: "smoothing", "aria-label": "smoothing" });
    const shown = el("span", { class: "muted", text: "0" });
    slider.addEventListener("input", () => { settings.smoothing = Number(slider.value); shown.textContent = slider.value; rerender(); });
    toolbar.append(el("label", { title: "exponential moving average weight" }, "smooth ", slider, " ", shown));
  }
  if ((options.xModes || []).length > 1) {
    const select = el("select", { class: "x-mode", "aria-label": "x axis" },
      ...options.xModes.map((m) => el("option", { value: m, text: m === "time" ? "x: wall time" : `x: ${options.xLabel || m}` })));
    select.addEventListener("change", () => { settings.x = select.value; rerender(); });
    toolbar.append(select);
  }
  if (options.bandToggle) {
    const select = el("select", { class: "band-mode", "aria-label": "runs" },
      el("option", { value: "band", text: "mean ± std" }), el("option", { value: "runs", text: "each run" }));
    select.value = settings.band ? "band" : "runs";
    select.addEventListener("change", () => { settings.band = select.value === "band"; rerender(); });
    toolbar.append(select);
  }
  const name = options.filename || id;
  toolbar.append(el("span", { class: "downloads" }, "⤓ ",
    downloadButton("CSV", () => download(`${name}.csv`, chartCsv(exportData()), "text/csv")),
    downloadButton("JSON", () => download(`${name}.json`, JSON.stringify(chartJson(exportData()), null, 2), "application/json")),
    downloadButton("PNG", () => chartPng(exportData(), root).then((blob) => download(`${name}.png`, blob, "image/png"))),
    downloadButton("SVG", () => download(`${name}.svg`, chartSvg(exportData()), "image/svg+xml"))));
}

function downloadButton(text, action) {
  return el("button", { type: "button", class: "link", "data-download": text.toLowerCase(), text, onclick: action });
}

// Save text or a Blob as a file (an object URL: works with the page's strict CSP and with API keys).
function download(filename, content, type) {
  const blob = content instanceof Blob ? content : new Blob([content], { type });
  const url = URL.createObjectURL(blob);
  const link = el("a", { href: url, download: filename });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

function csvCell(value) {
  if (value === null || value === undefined) return "";
  const text = String(value);
  return /[",\n]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
}

function toCsv(columns, rows) {
  return [columns, ...rows.map((row) => columns.map((c) => row[c]))].map((r) => r.map(csvCell).join(",")).join("\n") + "\n";
}

// The data behind the chart: every raw point of every run (unsmoothed), one row each.
function chartCsv({ traces }) {
  const rows = traces.flatMap((trace) => trace.runs.flatMap((run) => run.points.map((p) => ({
    series: trace.label, run: run.id, epoch: p.x.epoch, time_s: p.x.time, x: p.x.value, value: p.y,
  }))));
  const columns = ["series", "run", "epoch", "time_s", "value"];
  if (rows.some((r) => r.x !== undefined)) columns.splice(2, 2, "x");
  return toCsv(columns, rows);
}

function chartJson({ title, traces, settings }) {
  return {
    title,
    settings,
    series: traces.map((t) => ({ label: t.label, color: t.color, dashed: Boolean(t.dash), runs: t.runs.map((r) => ({ id: r.id, points: r.points.map((p) => ({ ...p.x, y: p.y })) })) })),
  };
}

// ------------------------------------------------------------------------------------ pictures

function legendItems({ traces }) {
  return traces.map((t) => ({ label: t.label, color: t.color, dash: Boolean(t.dash) }));
}

// PNG: the title, uPlot's canvas (plot and axes) and the legend, on white.
function chartPng(data, root) {
  const source = root.querySelector("canvas");
  const ratio = window.devicePixelRatio || 1;
  const items = legendItems(data);
  const plotW = source ? source.width : 600 * ratio;
  const plotH = source ? source.height : 260 * ratio;
  const perRow = Math.max(1, Math.floor(plotW / (220 * ratio)));
  const legendH = Math.ceil(items.length / perRow) * 18 * ratio + 8 * ratio;
  const canvas = document.createElement("canvas");
  canvas.width = plotW;
  canvas.height = plotH + 30 * ratio + legendH;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  ctx.fillStyle = "#1d2433";
  ctx.font = `600 ${14 * ratio}px system-ui, sans-serif`;
  ctx.fillText(data.title || "", 8 * ratio, 20 * ratio);
  if (source) ctx.drawImage(source, 0, 30 * ratio);
  ctx.font = `${12 * ratio}px system-ui, sans-serif`;
  items.forEach((item, i) => {
    const x = (i % perRow) * 220 * ratio + 10 * ratio;
    const y = plotH + 30 * ratio + Math.floor(i / perRow) * 18 * ratio + 12 * ratio;
    ctx.strokeStyle = item.color;
    ctx.lineWidth = 2 * ratio;
    ctx.setLineDash(item.dash ? DASH.map((d) => d * ratio) : []);
    ctx.beginPath(); ctx.moveTo(x, y - 4 * ratio); ctx.lineTo(x + 22 * ratio, y - 4 * ratio); ctx.stroke();
    ctx.setLineDash([]);
    ctx.fillStyle = "#1d2433";
    ctx.fillText(item.label, x + 28 * ratio, y);
  });
  return new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
}

function niceTicks(min, max, log) {
  if (log) {
    const ticks = [];
    for (let e = Math.floor(Math.log10(min)); e <= Math.ceil(Math.log10(max)); e++) ticks.push(10 ** e);
    return ticks.filter((t) => t >= min && t <= max);
  }
  const span = max - min || 1;
  const step = 10 ** Math.floor(Math.log10(span / 5));
  const nice = [1, 2, 5, 10].map((m) => m * step).find((s) => span / s <= 6);
  const ticks = [];
  for (let t = Math.ceil(min / nice) * nice; t <= max + 1e-12; t += nice) ticks.push(Number(t.toPrecision(12)));
  return ticks;
}

// SVG: the lines and bands as the chart shows them (same zoom, scale, smoothing), drawn as vectors.
function chartSvg({ title, lines, traces, plot, settings, xLabel, yLabel }) {
  const W = 800, H = 480, L = 70, R = 20, T = 40, B = 60 + 18 * Math.ceil(traces.length / 3);
  const esc = (s) => String(s).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");
  const xs = plot?.scales.x, ys = plot?.scales.y;
  if (!xs || xs.min === null) return `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="100"><text x="10" y="30">${esc(title)}: no data</text></svg>`;
  const log = settings.log;
  const f = (v) => (log ? Math.log10(v) : v);
  const X = (x) => L + ((x - xs.min) / (xs.max - xs.min)) * (W - L - R);
  const Y = (y) => (H - B) - ((f(y) - f(ys.min)) / (f(ys.max) - f(ys.min))) * (H - B - T);
  const ok = (x, y) => y !== null && Number.isFinite(y) && (!log || y > 0) && x >= xs.min && x <= xs.max;
  const parts = [`<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" font-family="sans-serif" font-size="11">`,
    `<rect width="${W}" height="${H}" fill="#fff"/>`, `<text x="${L}" y="22" font-size="14" font-weight="600">${esc(title)}</text>`];
  for (const t of niceTicks(ys.min, ys.max, log)) parts.push(`<line x1="${L}" x2="${W - R}" y1="${Y(t)}" y2="${Y(t)}" stroke="#e9ecef"/><text x="${L - 6}" y="${Y(t) + 4}" text-anchor="end">${formatValue(t)}</text>`);
  for (const t of niceTicks(xs.min, xs.max, false)) parts.push(`<text x="${X(t)}" y="${H - B + 16}" text-anchor="middle">${formatValue(t)}</text>`);
  parts.push(`<rect x="${L}" y="${T}" width="${W - L - R}" height="${H - B - T}" fill="none" stroke="#adb5bd"/>`,
    `<text x="${(L + W - R) / 2}" y="${H - B + 34}" text-anchor="middle">${esc(xLabel)}</text>`,
    `<text transform="translate(16 ${(T + H - B) / 2}) rotate(-90)" text-anchor="middle">${esc(yLabel || "")}${log ? " (log)" : ""}</text>`);
  lines.forEach((line, n) => {
    const trace = traces[line.trace];
    const pts = line.xs.map((x, i) => [x, line.ys[i], line.std?.[i]]).filter(([x, y]) => ok(x, y));
    if (line.std) {
      const upper = pts.filter(([x, y, s]) => ok(x, y + s)).map(([x, y, s]) => `${X(x)},${Y(y + s)}`);
      const lower = pts.filter(([x, y, s]) => ok(x, y - s)).map(([x, y, s]) => `${X(x)},${Y(y - s)}`).reverse();
      parts.push(`<polygon id="band-${n}" points="${[...upper, ...lower].join(" ")}" fill="${trace.color}" fill-opacity="0.16"/>`);
    }
    const dash = trace.dash ? ` stroke-dasharray="${DASH.join(" ")}"` : "";
    parts.push(`<polyline id="curve-${n}" points="${pts.map(([x, y]) => `${X(x)},${Y(y)}`).join(" ")}" fill="none" stroke="${trace.color}" stroke-width="${line.kind === "run" && trace.runs.length > 1 ? 1.2 : 2}"${dash}/>`);
  });
  legendItems({ traces }).forEach((item, i) => {
    const x = L + (i % 3) * 240, y = H - B + 52 + Math.floor(i / 3) * 18;
    parts.push(`<line x1="${x}" x2="${x + 22}" y1="${y - 4}" y2="${y - 4}" stroke="${item.color}" stroke-width="2"${item.dash ? ` stroke-dasharray="${DASH.join(" ")}"` : ""}/><text x="${x + 28}" y="${y}">${esc(item.label)}</text>`);
  });
  parts.push("</svg>");
  return parts.join("\n");
}
