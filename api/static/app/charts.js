// A uPlot line chart that loads a series from /api/v1/energy/series and then grows from live
// readings. `data-points` on the chart element counts the points drawn (the browser test and
// curious engineers can read it).
import { api } from "./api.js";
import { h } from "./ui.js";

export const RANGES = { hour: 3600, day: 86400, week: 7 * 86400 };

export function lineChart(label, unit) {
  const el = h("div", { class: "chart", dataset: { points: "0" } });
  const xs = [];
  const ys = [];
  let plot = null;
  let span = RANGES.hour;
  let seriesUnit = unit || "";
  function draw() {
    el.dataset.points = String(xs.length);
    if (!window.uPlot) return;
    const width = Math.max(200, el.clientWidth || 300);
    if (!plot) {
      plot = new window.uPlot({
        width, height: 240,
        series: [{}, { label: `${label}${seriesUnit ? ` (${seriesUnit})` : ""}`, stroke: "#1d3557", width: 2, fill: "#1d355714", spanGaps: true }],
        axes: [{}, { size: 72, values: (_u, splits) => splits.map((v) => axisLabel(v, seriesUnit)) }],
        scales: { x: { time: true } },
      }, [xs, ys], el);
      new ResizeObserver(() => plot && el.clientWidth && plot.setSize({ width: el.clientWidth, height: 240 })).observe(el);
    } else {
      plot.setData([xs, ys]);
    }
  }
  return {
    el,
    /** Replace the data: `points` are the API's step points (their mean is drawn). */
    load(points, newUnit, newSpan) {
      if (newUnit !== undefined && newUnit !== seriesUnit && plot) { plot.destroy(); plot = null; el.replaceChildren(); }
      if (newUnit !== undefined) seriesUnit = newUnit;
      if (newSpan) span = newSpan;
      xs.length = 0; ys.length = 0;
      for (const p of points) { xs.push(p.ts); ys.push(p.mean); }
      draw();
    },
    /** One live value; older points fall off the window's left edge. */
    push(ts, value) {
      if (xs.length && ts <= xs[xs.length - 1]) return;
      xs.push(ts); ys.push(value);
      while (xs.length && xs[0] < ts - span) { xs.shift(); ys.shift(); }
      draw();
    },
    count: () => xs.length,
  };
}

function axisLabel(v, unit) {
  if (unit === "W" && Math.abs(v) >= 1000) return `${(v / 1000).toLocaleString(undefined, { maximumFractionDigits: 4 })} kW`;
  const abs = Math.abs(v);
  return abs >= 10000 ? `${(v / 1000).toFixed(1)}k` : abs >= 100 ? v.toFixed(0) : String(+v.toFixed(2));
}

export async function series(deviceId, metric, spanS) {
  const end = Date.now() / 1000;
  return api("/api/v1/energy/series", { query: { device_id: deviceId, metric, start: Math.floor(end - spanS), end: Math.ceil(end) } });
}

/** One series, or the point-wise sum of several (the main meters of a community). */
export async function summed(ids, metric, spanS) {
  if (ids.length === 1) return series(ids[0], metric, spanS);
  const all = await Promise.all(ids.map((id) => series(id, metric, spanS)));
  const byTs = new Map();
  for (const s of all) {
    for (const p of s.points) {
      const q = byTs.get(p.ts) || { ts: p.ts, min: 0, max: 0, mean: 0, last: 0, count: 0 };
      for (const k of ["min", "max", "mean", "last", "count"]) q[k] += p[k];
      byTs.set(p.ts, q);
    }
  }
  return { device_id: ids.join("+"), metric, unit: all[0].unit, step: all[0].step,
    points: [...byTs.values()].sort((a, b) => a.ts - b.ts) };
}

/** Energy over a window from a power series: sum of mean power x step, in kWh. */
export function kwh(points, step) {
  return points.reduce((sum, p) => sum + p.mean * step, 0) / 3600 / 1000;
}
