// Facilities engineers: community power now and over the last day and week (per building and
// per device kind), a live chart of any metric of any device, alerts, devices and control.
import { api, live, on } from "./api.js";
import { RANGES, kwh, lineChart, series, summed } from "./charts.js";
import { card, h, power, status } from "./ui.js";
import { alertsCard, controlCard, devicesCard } from "./devices.js";

const READERS = new Set(["gate", "elevator", "canteen"]);
const STANDARD = ["power_w", "energy_wh", "voltage_v", "current_a", "temperature_c", "setpoint_c",
  "humidity_pct", "pm25_ugm3", "co2_ppm", "fan_speed_pct", "filter_dp_pa", "running"];

function rangeSelect(value = "hour") {
  return h("select", { name: "range" }, Object.keys(RANGES).map((r) => h("option", { value: r, selected: r === value }, `last ${r}`)));
}

/** Latest value per device of the readings handed in, so a sum can be drawn live. */
function readingsOf(data) {
  const id = data.device_id || data.device;
  if (!id) return [];
  const list = Array.isArray(data.readings) ? data.readings : [data];
  return list.filter((r) => r && r.metrics).map((r) => ({ id, ts: r.ts, metrics: r.metrics }));
}

const isMain = (d) => d.kind === "meter" && /(^|-)main(-|$)/.test(d.device_id);

/** Where community and building power come from: the site's main meter (a main meter in no
 * building) if there is one, else the buildings' main meters added up (sub-meters are never
 * added on top of their main meter), else every meter. */
export function powerSources(devices) {
  const site = devices.filter((d) => isMain(d) && !d.building);
  const buildingMains = devices.filter((d) => isMain(d) && d.building);
  const community = site.length ? site : buildingMains.length ? buildingMains : [];
  const buildings = [...new Set(devices.map((d) => d.building).filter(Boolean))].sort().map((b) => {
    const mains = buildingMains.filter((d) => d.building === b).map((d) => d.device_id);
    return { label: `Building ${b}`, ids: mains.length ? mains : [`building:${b}`] };
  });
  return {
    community: community.length ? community.map((d) => d.device_id) : ["kind:meter"],
    buildings,
    kinds: [...new Set(devices.map((d) => d.kind).filter((k) => !READERS.has(k) && k !== "meter"))].sort(),
  };
}

function powerCard(ctx) {
  const stats = h("div", { class: "stats", id: "power-stats" });
  const source = h("p", { class: "muted", id: "power-source" });
  const chart = lineChart("community power", "W");
  chart.el.id = "power-chart";
  const range = rangeSelect("hour");
  const note = status();
  const latest = new Map();  // community meter id -> its latest power_w
  let sources = powerSources([]);
  async function loadChart() {
    try {
      const s = await summed(sources.community, "power_w", RANGES[range.value]);
      chart.load(s.points, s.unit || "W", RANGES[range.value]);
      note.clear();
    } catch (err) { note.fail(err); }
  }
  async function stat(label, ids, spanS) {
    try {
      const s = await summed(ids, "power_w", spanS);
      return s.points.length ? { label, s } : null;
    } catch (err) { return err.status === 404 || err.status === 422 ? null : { label, err }; }
  }
  async function loadStats() {
    const now = await Promise.all([
      stat("Community now", sources.community, 900),
      ...sources.buildings.map((b) => stat(`${b.label} now`, b.ids, 900)),
      ...sources.kinds.map((k) => stat(`${k.replace("_", " ")} now`, [`kind:${k}`], 900)),
    ]);
    const [day, week] = await Promise.all([stat("Last 24 h", sources.community, RANGES.day),
      stat("Last 7 days", sources.community, RANGES.week)]);
    const tiles = now.filter(Boolean).map(({ label, s, err }) => h("div", { class: "stat" }, label,
      err ? h("span", { class: "bad" }, err.message) : h("b", {}, power(s.points[s.points.length - 1].last))));
    for (const x of [day, week].filter(Boolean)) {
      if (x.err) { tiles.push(h("div", { class: "stat" }, x.label, h("span", { class: "bad" }, x.err.message))); continue; }
      const peak = Math.max(...x.s.points.map((p) => p.max));
      tiles.push(h("div", { class: "stat" }, `${x.label} (community)`, h("b", {}, `${kwh(x.s.points, x.s.step).toFixed(1)} kWh`),
        h("span", { class: "muted" }, `peak ${power(peak)}`)));
    }
    stats.replaceChildren(...(tiles.length ? tiles : [h("p", { class: "muted" }, "No power readings yet.")]));
  }
  range.addEventListener("change", loadChart);
  function reading(r) {
    if (!sources.community.includes(r.id) || typeof r.metrics.power_w !== "number") {
      if (!(sources.community[0] === "kind:meter" && ctx.byId.get(r.id)?.kind === "meter" && typeof r.metrics.power_w === "number")) return;
    }
    latest.set(r.id, r.metrics.power_w);
    let sum = 0;
    for (const v of latest.values()) sum += v;
    chart.push(r.ts, sum);
  }
  return {
    el: h("section", { class: "card wide" }, h("h2", {}, "Community power"), stats,
      h("form", { class: "row" }, h("label", {}, "Window", range)), chart.el, source, note),
    load() {
      sources = powerSources(ctx.devices);
      source.textContent = `Community power: ${sources.community.join(" + ")}; buildings: ${sources.buildings.map((b) => b.ids.join(" + ")).join(", ")}.`;
      latest.clear();
      // Every community meter's current value first, so the live sum never starts short.
      for (const id of sources.community.filter((x) => !x.includes(":"))) {
        api(`/api/v1/devices/${encodeURIComponent(id)}/latest`).then((l) => {
          if (!latest.has(id) && typeof l.metrics.power_w === "number") latest.set(id, l.metrics.power_w);
        }).catch(() => {});
      }
      loadChart(); loadStats();
    },
    loadStats, reading,
    communityIds: () => sources.community,
  };
}

function anyMetricCard(ctx) {
  const device = h("select", { name: "device", id: "chart-device" });
  const metric = h("select", { name: "metric", id: "chart-metric" });
  const range = rangeSelect("hour");
  const chart = lineChart("", "");
  chart.el.id = "metric-chart";
  const note = status();
  async function loadMetrics() {
    let names = [];
    try { names = Object.keys((await api(`/api/v1/devices/${encodeURIComponent(device.value)}/latest`)).metrics); } catch (_) { /* no reading yet */ }
    if (!names.length) names = STANDARD;
    metric.replaceChildren(...names.sort().map((m) => h("option", { value: m, selected: m === "power_w" }, m)));
    await loadChart();
  }
  async function loadChart() {
    try {
      const s = await series(device.value, metric.value, RANGES[range.value]);
      chart.load(s.points, s.unit, RANGES[range.value]);
      note.clear();
    } catch (err) { chart.load([], "", RANGES[range.value]); note.fail(err); }
  }
  device.addEventListener("change", loadMetrics);
  metric.addEventListener("change", loadChart);
  range.addEventListener("change", loadChart);
  return {
    el: h("section", { class: "card wide" }, h("h2", {}, "Any metric of any device"),
      h("form", { class: "row" }, h("label", {}, "Device", device), h("label", {}, "Metric", metric), h("label", {}, "Window", range)),
      chart.el, note),
    setDevices(devices) {
      if (device.options.length) return;
      const sensors = devices.filter((d) => !READERS.has(d.kind));
      device.replaceChildren(...[...sensors, ...devices.filter((d) => READERS.has(d.kind))]
        .map((d) => h("option", { value: d.device_id }, `${d.name || d.device_id} (${d.kind})`)));
      loadMetrics();
    },
    reading(r) {
      if (r.id === device.value && typeof r.metrics[metric.value] === "number") chart.push(r.ts, r.metrics[metric.value]);
    },
  };
}

export function mount(el) {
  const ctx = { devices: [], byId: new Map() };
  const powerView = powerCard(ctx);
  const metricView = anyMetricCard(ctx);
  const alerts = alertsCard();
  const grid = devicesCard(ctx);
  const control = controlCard();
  el.append(powerView.el, metricView.el, alerts.el, grid.el, control.el);
  let visible = false;
  const timers = [];
  function reading(r) {
    if (!visible) return;
    powerView.reading(r); metricView.reading(r); grid.seen(r.id, r.ts);
  }
  on("reading", (data) => readingsOf(data).forEach(reading));
  on("alert", () => visible && alerts.changed());
  on("device", (data) => visible && grid.status(data));
  async function loadDevices() {
    const devices = await grid.load();
    if (!devices) return;
    ctx.devices = devices;
    ctx.byId = new Map(devices.map((d) => [d.device_id, d]));
    metricView.setDevices(devices);
    control.setDevices(devices);
  }
  /** Without the event stream, the newest values are polled so the charts still move. */
  async function pollLatest() {
    if (live.connected || !visible) return;
    const ids = new Set(powerView.communityIds().filter((id) => !id.includes(":")));
    const chosen = document.getElementById("chart-device");
    if (chosen && chosen.value) ids.add(chosen.value);
    for (const id of ids) {
      try {
        const l = await api(`/api/v1/devices/${encodeURIComponent(id)}/latest`);
        reading({ id, ts: l.ts, metrics: l.metrics });
      } catch (_) { /* no reading yet */ }
    }
  }
  return {
    async show() {
      visible = true;
      await loadDevices();
      powerView.load();
      alerts.load();
      timers.push(setInterval(loadDevices, 30000), setInterval(pollLatest, 5000),
        setInterval(() => powerView.loadStats(), 60000), setInterval(alerts.load, 60000));
    },
    hide() { visible = false; timers.splice(0).forEach(clearInterval); },
  };
}
