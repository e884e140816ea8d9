// Engineers' device cards: alerts with acknowledge, the device grid (online/offline, last seen,
// polled Modbus units included) and Modbus control built from the writable registers.
import { api } from "./api.js";
import { ago, card, dateTime, debounce, h, status, table } from "./ui.js";

export function alertsCard() {
  const firing = h("div", { id: "alerts-firing" });
  const recent = h("div", { id: "alerts-recent" });
  const note = status();
  function rows(items) {
    return items.map((a) => h("tr", { dataset: { alert: a.alert_id } },
      h("td", { class: `sev-${a.severity}` }, a.severity),
      h("td", {}, a.device_id, h("div", { class: "muted" }, a.rule_id)),
      h("td", {}, a.message, a.value !== null && a.value !== undefined ? h("div", { class: "muted" }, `value ${+Number(a.value).toPrecision(6)}`) : ""),
      h("td", {}, dateTime(a.started_at), a.resolved_at ? h("div", { class: "ok" }, `resolved ${dateTime(a.resolved_at)}`) : ""),
      h("td", {}, a.acked_at ? h("span", { class: "muted" }, `acked by ${a.acked_by}`)
        : h("button", { type: "button", class: "secondary", onclick: () => ack(a.alert_id) }, "Acknowledge"))));
  }
  const headers = ["Severity", "Device", "What", "Since", ""];
  async function load() {
    try {
      const [now, past] = await Promise.all([
        api("/api/v1/alerts", { query: { state: "firing", limit: 100 } }),
        api("/api/v1/alerts", { query: { state: "resolved", since: Math.floor(Date.now() / 1000 - 86400), limit: 30 } }),
      ]);
      firing.replaceChildren(now.length ? table(headers, rows(now)) : h("p", { class: "ok" }, "Nothing is firing."));
      recent.replaceChildren(past.length ? table(headers, rows(past), "tall") : h("p", { class: "muted" }, "None in the last 24 h."));
      note.clear();
    } catch (err) { note.fail(err); }
  }
  async function ack(id) {
    try { await api(`/api/v1/alerts/${encodeURIComponent(id)}/ack`, { method: "POST" }); note.ok(`alert ${id} acknowledged`); load(); } catch (err) { note.fail(err); }
  }
  return {
    el: h("section", { class: "card" }, h("h2", {}, "Alerts"), h("h3", {}, "Firing"), firing, h("h3", {}, "Recent (24 h)"), recent, note),
    load, changed: debounce(load, 1000),
  };
}

export function devicesCard() {
  const grid = h("div", { class: "grid", id: "device-grid" });
  const note = status();
  const tiles = new Map();
  function tile(d) {
    const state = d.online === true ? "online" : d.online === false ? "offline" : "unknown";
    const el = h("div", { class: `dev ${state}`, dataset: { device: d.device_id, state } },
      h("strong", {}, d.name || d.device_id), h("div", { class: "muted" }, `${d.device_id} · ${d.kind}${d.building ? ` · ${d.building}` : ""}`),
      h("div", { class: state === "online" ? "ok" : state === "offline" ? "bad" : "muted" }, state),
      h("div", { class: "muted seen", dataset: { ts: d.last_seen || "" } }, `last seen ${ago(d.last_seen)}`));
    tiles.set(d.device_id, el);
    return el;
  }
  function refreshAges() {
    for (const el of tiles.values()) {
      const seen = el.querySelector(".seen");
      seen.textContent = `last seen ${ago(Number(seen.dataset.ts) || null)}`;
    }
  }
  setInterval(refreshAges, 5000);
  return {
    el: h("section", { class: "card" }, h("h2", {}, "Devices"), grid, note),
    async load() {
      try {
        const devices = await api("/api/v1/devices");
        grid.replaceChildren(...devices.map(tile));
        note.clear();
        return devices;
      } catch (err) { note.fail(err); return null; }
    },
    seen(id, ts) {
      const el = tiles.get(id);
      if (!el || !ts) return;
      el.querySelector(".seen").dataset.ts = String(ts);
    },
    status(data) {
      const id = data.device_id || data.device;
      const el = tiles.get(id);
      if (!el || typeof data.online !== "boolean") return;
      const state = data.online ? "online" : "offline";
      el.className = `dev ${state}`;
      el.dataset.state = state;
      el.children[2].className = data.online ? "ok" : "bad";
      el.children[2].textContent = state;
      if (data.ts || data.last_seen) el.querySelector(".seen").dataset.ts = String(data.last_seen || data.ts);
      refreshAges();
    },
  };
}

const INTEGER_TYPES = /^(u?int(8|16|32|64)|bool)$/;

/** The input for one writable register: a choice when the values are listed, else a number
 * limited to the register's range and step (an integer register takes whole steps). */
function registerInput(r) {
  const allowed = r.allowed_values || r.allowed || r.choices || r.values;
  if (Array.isArray(allowed) && allowed.length) {
    return h("select", { name: r.name }, allowed.map((v) => typeof v === "object"
      ? h("option", { value: v.value }, v.label ? `${v.label} (${v.value})` : v.value)
      : h("option", { value: v }, v)));
  }
  if (r.data_type === "bool" || r.input_type === "coil") {
    return h("select", { name: r.name }, h("option", { value: "0" }, "0 (off)"), h("option", { value: "1" }, "1 (on)"));
  }
  const integer = r.integer === true || (INTEGER_TYPES.test(r.data_type || "") && (r.scale === undefined || r.scale === 1));
  const step = r.step ?? (integer ? 1 : (r.scale && r.scale !== 1 ? r.scale : "any"));
  return h("input", { name: r.name, type: "number", step, min: r.min ?? undefined, max: r.max ?? undefined });
}

export function controlCard() {
  const unit = h("select", { name: "unit", id: "control-unit" });
  const form = h("form", { id: "control-form" });
  const confirmBox = h("div", {});
  const note = status();
  let registers = [];
  async function loadRegisters() {
    form.replaceChildren(); confirmBox.replaceChildren(); note.clear();
    if (!unit.value) return;
    try {
      registers = (await api(`/api/v1/devices/${encodeURIComponent(unit.value)}/registers`)).filter((r) => r.writable !== false);
    } catch (err) { note.fail(err); return; }
    if (!registers.length) { form.append(h("p", { class: "muted" }, "This unit has no writable register.")); return; }
    for (const r of registers) {
      const limits = [r.min !== null && r.min !== undefined ? `min ${r.min}` : "", r.max !== null && r.max !== undefined ? `max ${r.max}` : ""].filter(Boolean).join(", ");
      form.append(h("label", {}, `${r.name}${r.unit ? ` (${r.unit})` : ""}`, h("span", { class: "muted" }, limits ? ` ${limits}` : ""), registerInput(r)));
    }
    form.append(h("button", {}, "Review change"));
    await fillCurrent(unit.value, registers);
  }
  // Start from what the unit reports now, so a change touches only what the user edits. A
  // unit not read yet (just started, or the local store catching up) is asked again every
  // few seconds until each field has its value, for as long as it is the unit shown (a
  // minute at most: a register the unit never reports leaves its field empty).
  async function fillCurrent(shown, shownRegisters, tries = 20) {
    let missing = shownRegisters.length;
    try {
      const now = (await api(`/api/v1/devices/${encodeURIComponent(shown)}/latest`)).metrics;
      missing = 0;
      if (registers !== shownRegisters) return;  // another unit (or a reload) since
      for (const r of registers) {
        const input = form.elements[r.name];
        // a field the user has typed into is theirs; one already filled stays as it is
        if (!input || input.dataset.initial !== undefined || input.value !== "") continue;
        if (typeof now[r.name] === "number") { input.value = String(now[r.name]); input.dataset.initial = input.value; }
        else missing += 1;
      }
    } catch (_) { /* no reading yet */ }
    if (missing && tries > 1 && registers === shownRegisters) {
      setTimeout(() => fillCurrent(shown, shownRegisters, tries - 1), 3000);
    }
  }
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const values = {};
    for (const r of registers) {
      const input = form.elements[r.name];
      if (input && input.value !== "" && input.value !== input.dataset.initial) values[r.name] = Number(input.value);
    }
    if (!Object.keys(values).length) { note.fail("nothing changed: edit a value first"); return; }
    const target = unit.value;
    const apply = h("button", { type: "button", class: "danger" }, "Confirm and send");
    const cancel = h("button", { type: "button", class: "secondary" }, "Cancel");
    confirmBox.replaceChildren(h("div", { class: "confirm", id: "control-confirm" },
      h("p", {}, `Send to ${target}:`), h("ul", {}, Object.entries(values).map(([k, v]) => {
        const r = registers.find((x) => x.name === k);
        return h("li", {}, `${k} = ${v}${r && r.unit ? ` ${r.unit}` : ""}`);
      })), apply, " ", cancel));
    cancel.addEventListener("click", () => confirmBox.replaceChildren());
    apply.addEventListener("click", async () => {
      apply.disabled = true;
      try {
        const out = await api(`/api/v1/devices/${encodeURIComponent(target)}/set`, { method: "POST", json: { values } });
        confirmBox.replaceChildren();
        note.ok(`${target} read back: ${Object.entries(out.values).map(([k, v]) => `${k} = ${v}`).join(", ")}`);
      } catch (err) { apply.disabled = false; note.fail(err); }
    });
  });
  unit.addEventListener("change", loadRegisters);
  return {
    el: card("Control a unit", h("label", {}, "Unit", unit), form, confirmBox, note),
    async setDevices(devices) {
      if (unit.options.length) return;
      const candidates = devices.filter((d) => !["gate", "elevator", "canteen"].includes(d.kind));
      const usable = [];
      await Promise.all(candidates.map(async (d) => {
        try {
          const regs = await api(`/api/v1/devices/${encodeURIComponent(d.device_id)}/registers`);
          if (regs.some((r) => r.writable !== false)) usable.push(d);
        } catch (_) { /* not a Modbus unit */ }
      }));
      usable.sort((a, b) => a.device_id.localeCompare(b.device_id));
      unit.replaceChildren(...usable.map((d) => h("option", { value: d.device_id }, `${d.name || d.device_id} (${d.kind})`)));
      if (!usable.length) note.fail("no unit with writable registers");
      loadRegisters();
    },
  };
}
