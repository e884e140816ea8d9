// The resident's phone page: an access QR that renews itself before it expires, remote gate
// unlock and elevator call, the canteen purse with dated history.
import qrcode from "/static/vendor/qrcode.mjs";
import { api, on } from "./api.js";
import { card, dateTime, h, money, status, table, timeOnly } from "./ui.js";

const RENEW_BEFORE_S = 8;  // a fresh code this long before the shown one expires

/** The QR as pixels on a canvas (no data: URL, so a strict CSP needs no img-src exception). */
function drawQr(canvas, text) {
  const qr = qrcode(0, "M");
  qr.addData(text);
  qr.make();
  const n = qr.getModuleCount();
  const quiet = 4;
  const scale = 8;
  const size = (n + 2 * quiet) * scale;
  canvas.width = size;
  canvas.height = size;
  const g = canvas.getContext("2d");
  g.fillStyle = "#fff";
  g.fillRect(0, 0, size, size);
  g.fillStyle = "#000";
  for (let r = 0; r < n; r += 1) {
    for (let c = 0; c < n; c += 1) {
      if (qr.isDark(r, c)) g.fillRect((c + quiet) * scale, (r + quiet) * scale, scale, scale);
    }
  }
}

function qrCard() {
  const canvas = h("canvas", { id: "qr", width: "10", height: "10", role: "img", "aria-label": "access QR code" });
  const until = h("p", { id: "qr-exp", class: "muted" });
  const note = status();
  let expiresAt = 0;
  let renewTimer = null;
  let tick = null;
  async function renew() {
    clearTimeout(renewTimer);
    try {
      const t = await api("/api/v1/me/access-token", { method: "POST" });
      drawQr(canvas, t.qr);
      expiresAt = t.expires_at;
      canvas.dataset.expiresAt = String(t.expires_at);
      canvas.dataset.shown = String(Number(canvas.dataset.shown || 0) + 1);  // codes drawn so far
      canvas.dataset.shownAt = String(Date.now() / 1000);
      note.clear();
      const wait = Math.max(3, t.expires_at - Date.now() / 1000 - RENEW_BEFORE_S);
      renewTimer = setTimeout(renew, wait * 1000);
    } catch (err) {
      note.fail(err);
      renewTimer = setTimeout(renew, 15000);
    }
    show();
  }
  function show() {
    const left = Math.round(expiresAt - Date.now() / 1000);
    until.textContent = expiresAt ? `valid until ${timeOnly(expiresAt)} (${Math.max(0, left)} s); renews by itself` : "";
  }
  const el = card("My access QR", h("div", { class: "qrbox" }, canvas), until, note,
    h("p", { class: "muted" }, "Show this code at a gate or elevator reader. Each code works once."));
  return {
    el,
    start() { renew(); tick = setInterval(show, 1000); },
    stop() { clearTimeout(renewTimer); clearInterval(tick); },
  };
}

function remoteCard() {
  const note = status();
  const body = h("div", {}, h("p", { class: "muted" }, "loading…"));
  async function unlock(id) {
    try {
      await api(`/api/v1/gates/${encodeURIComponent(id)}/unlock`, { method: "POST" });
      note.ok(`${id}: unlock sent`);
    } catch (err) { note.fail(err); }
  }
  async function call(id, floor) {
    try {
      await api(`/api/v1/elevators/${encodeURIComponent(id)}/call`, { method: "POST", json: { floor: Number(floor) } });
      note.ok(`${id}: called to floor ${floor}`);
    } catch (err) { note.fail(err); }
  }
  function elevatorForm(id, name, floors) {
    const input = floors && floors.length
      ? h("select", { name: "floor" }, floors.map((f) => h("option", { value: f }, f)))
      : h("input", { name: "floor", type: "number", step: "1", required: true });
    const f = h("form", { class: "row" }, h("label", {}, `${name} floor`, input), h("button", {}, "Call"));
    f.addEventListener("submit", (e) => { e.preventDefault(); call(id, f.floor.value); });
    return f;
  }
  async function load() {
    let devices = null;
    try { devices = await api("/api/v1/me/devices"); } catch (err) { if (err.status !== 404) note.fail(err); }
    body.replaceChildren();
    if (devices) {
      for (const d of devices.filter((x) => x.kind === "gate")) {
        body.append(h("p", {}, h("button", { type: "button", onclick: () => unlock(d.device_id) }, `Unlock ${d.name || d.device_id}`)));
      }
      for (const d of devices.filter((x) => x.kind === "elevator")) body.append(elevatorForm(d.device_id, d.name || d.device_id, d.floors));
      if (!body.children.length) body.append(h("p", { class: "muted" }, "No gate or elevator is open to you remotely."));
      return;
    }
    // Without a list of permitted devices, ask for the id; the gateway checks the permission.
    const gate = h("form", { class: "row" }, h("label", {}, "Gate id", h("input", { name: "id", required: true, placeholder: "gate-north" })), h("button", {}, "Unlock"));
    gate.addEventListener("submit", (e) => { e.preventDefault(); unlock(gate.id.value.trim()); });
    const lift = h("form", { class: "row" },
      h("label", {}, "Elevator id", h("input", { name: "id", required: true })),
      h("label", {}, "Floor", h("input", { name: "floor", type: "number", step: "1", required: true })), h("button", {}, "Call"));
    lift.addEventListener("submit", (e) => { e.preventDefault(); call(lift.id.value.trim(), lift.floor.value); });
    body.append(gate, lift);
  }
  return { el: card("Open and call", body, note), load };
}

const KINDS = { payment: "Canteen purchase", topup: "Top-up", refund: "Refund" };

function canteenCard() {
  const balance = h("b", { id: "balance" }, "–");
  const list = h("div", {});
  const note = status();
  async function load() {
    try {
      const c = await api("/api/v1/me/canteen", { query: { limit: 30 } });
      balance.textContent = money(c.balance_cents);
      list.replaceChildren(table(["When", "What", { label: "Amount", class: "num" }, { label: "Balance", class: "num" }],
        c.transactions.map((t) => h("tr", {}, h("td", {}, dateTime(t.posted_at)),
          h("td", {}, KINDS[t.kind] || t.kind, t.terminal_id ? h("span", { class: "muted" }, ` · ${t.terminal_id}`) : ""),
          h("td", { class: `num ${t.amount_cents < 0 ? "" : "ok"}` }, money(t.amount_cents)),
          h("td", { class: "num" }, money(t.balance_cents)))), "tall"));
      if (!c.transactions.length) list.append(h("p", { class: "muted" }, "No canteen movements yet."));
      note.clear();
    } catch (err) { note.fail(err); }
  }
  return { el: card("Canteen", h("div", { class: "stat" }, "Balance", balance), list, note), load };
}

export function mount(el) {
  const qr = qrCard();
  const remote = remoteCard();
  const canteen = canteenCard();
  el.append(qr.el, remote.el, canteen.el);
  remote.load();
  let poll = null;
  let visible = false;
  on("payment", () => { if (visible) canteen.load(); });
  return {
    show() { visible = true; qr.start(); canteen.load(); poll = setInterval(canteen.load, 30000); },
    hide() { visible = false; qr.stop(); clearInterval(poll); },
  };
}
