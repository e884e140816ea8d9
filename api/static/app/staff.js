// Property staff: the access log with filters (live from the event stream), residents, cards,
// visitor passes, top-ups, and the canteen's daily totals and reconciliation.
import { api, live, on } from "./api.js";
import { card, dateTime, debounce, epochOf, h, isoDay, money, status, table } from "./ui.js";
import { passesCard, residentsCard } from "./people.js";

function accessLogCard(ctx) {
  const device = h("select", { name: "device_id" }, h("option", { value: "" }, "any device"));
  const resident = h("select", { name: "resident_id" }, h("option", { value: "" }, "anyone"));
  const granted = h("select", { name: "granted" }, h("option", { value: "" }, "granted or denied"),
    h("option", { value: "true" }, "granted"), h("option", { value: "false" }, "denied"));
  const since = h("input", { name: "since", type: "datetime-local" });
  const until = h("input", { name: "until", type: "datetime-local" });
  const limit = h("select", { name: "limit" }, [50, 100, 500, 1000].map((n) => h("option", { value: n, selected: n === 100 }, n)));
  const form = h("form", { class: "row", id: "access-filters" },
    h("label", {}, "Device", device), h("label", {}, "Resident", resident), h("label", {}, "Result", granted),
    h("label", {}, "Since", since), h("label", {}, "Until", until), h("label", {}, "Rows", limit));
  const body = h("div", { id: "access-log" });
  const note = status();
  async function load() {
    try {
      const items = await api("/api/v1/access/log", { query: {
        device_id: device.value, resident_id: resident.value, granted: granted.value,
        since: epochOf(since.value), until: epochOf(until.value), limit: limit.value } });
      const rows = items.map((e) => h("tr", { dataset: { ts: e.ts, device: e.device_id, resident: e.resident_id || "", granted: String(e.granted), request: e.request_id || "" } },
        h("td", {}, dateTime(e.ts)), h("td", {}, e.device_id), h("td", {}, e.method || e.action || ""),
        h("td", { class: e.granted ? "ok" : "bad" }, e.granted ? "granted" : `denied${e.reason ? `: ${e.reason}` : ""}`),
        h("td", {}, e.resident_id ? (ctx.names.get(e.resident_id) || e.resident_id) : ""),
        h("td", { class: "num" }, e.floor ?? (e.floors || []).join(", "))));
      body.replaceChildren(items.length ? table(["When", "Device", "How", "Result", "Who", { label: "Floors", class: "num" }], rows, "tall")
        : h("p", { class: "muted" }, "No access decision matches."));
      note.clear();
    } catch (err) {
      note.fail(err.status === 404 ? "the access log is not available on this gateway yet" : err);
    }
  }
  form.addEventListener("change", load);
  form.addEventListener("submit", (e) => { e.preventDefault(); load(); });
  return {
    el: h("section", { class: "card wide" }, h("h2", {}, "Access log"), form, body, note),
    load, changed: debounce(load, 700),
    setDevices(devices) {
      device.replaceChildren(device.options[0], ...devices.filter((d) => ["gate", "elevator"].includes(d.kind))
        .map((d) => h("option", { value: d.device_id }, `${d.name || d.device_id}`)));
    },
    setResidents(residents) {
      const chosen = resident.value;
      resident.replaceChildren(h("option", { value: "" }, "anyone"),
        ...residents.map((r) => h("option", { value: r.resident_id, selected: r.resident_id === chosen }, `${r.name} (${r.unit_id})`)));
    },
  };
}

function canteenCard() {
  // The day as this browser's calendar has it (the date picker's), not the site's zone.
  const tz = Intl.DateTimeFormat().resolvedOptions().timeZone || undefined;
  const day = h("input", { name: "date", type: "date", value: isoDay(), required: true });
  const totals = h("div", { id: "canteen-totals" });
  const shortfalls = h("div", { id: "canteen-reconciliation" });
  const note = status();
  async function load() {
    try {
      const [s, r] = await Promise.all([
        api("/api/v1/canteen/settlement", { query: { date: day.value, tz } }),
        api("/api/v1/canteen/reconciliation", { query: { date: day.value, tz } }),
      ]);
      totals.replaceChildren(h("div", { class: "stats" }, h("div", { class: "stat" }, `Net ${s.date}`, h("b", {}, money(s.net_cents)))),
        table(["Terminal", { label: "Sales", class: "num" }, { label: "Refunds", class: "num" }, { label: "Net", class: "num" }, { label: "Shortfalls", class: "num" }],
          s.terminals.map((t) => h("tr", {}, h("td", {}, t.terminal_id),
            h("td", { class: "num" }, `${t.payments} · ${money(t.sales_cents)}`), h("td", { class: "num" }, `${t.refunds} · ${money(t.refunds_cents)}`),
            h("td", { class: "num" }, money(t.net_cents)), h("td", { class: "num" }, `${t.shortfalls} · ${money(t.shortfall_cents)}`)))));
      shortfalls.replaceChildren(r.length
        ? table(Object.keys(r[0]), r.map((row) => h("tr", {}, Object.entries(row).map(([k, v]) =>
          h("td", {}, k.endsWith("_cents") ? money(v) : k.endsWith("_at") || k === "ts" ? dateTime(v) : String(v ?? ""))))))
        : h("p", { class: "ok" }, "No offline sale left uncovered that day."));
      note.clear();
    } catch (err) { note.fail(err); }
  }
  day.addEventListener("change", load);
  return {
    el: card("Canteen day", h("form", { class: "row" }, h("label", {}, "Day", day)), h("h3", {}, "Totals per terminal"), totals,
      h("h3", {}, "Reconciliation (offline sales not covered)"), shortfalls, note),
    load, changed: debounce(load, 3000),
  };
}

export function mount(el) {
  const ctx = { names: new Map() };
  const log = accessLogCard(ctx);
  const canteen = canteenCard();
  const residents = residentsCard((list) => {
    ctx.names = new Map(list.map((r) => [r.resident_id, r.name]));
    log.setResidents(list);
    passes.setResidents(list);
  });
  const passes = passesCard();
  el.append(log.el, residents.el, passes.el, canteen.el);
  let visible = false;
  const timers = [];
  on("access", () => visible && log.changed());
  on("payment", () => visible && canteen.changed());
  return {
    async show() {
      visible = true;
      try { log.setDevices(await api("/api/v1/devices")); } catch (_) { /* the log still works */ }
      await residents.load();
      log.load(); passes.load(); canteen.load();
      // Without the event stream the log is refreshed on a timer instead.
      timers.push(setInterval(() => { if (!live.connected) log.load(); }, 5000));
    },
    hide() { visible = false; timers.splice(0).forEach(clearInterval); },
  };
}
