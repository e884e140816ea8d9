// Small DOM and formatting helpers shared by the views (no framework, no inline handlers).

/** An element: h("td", {class: "num"}, "12") ; children may be strings, nodes or arrays. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (v === true) el.setAttribute(k, "");
    else el.setAttribute(k, v);
  }
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

export const $ = (sel, root = document) => root.querySelector(sel);

export function card(title, ...body) {
  return h("section", { class: "card" }, h("h2", {}, title), ...body);
}

/** A table in a horizontally scrolling box (the page itself never scrolls sideways). */
export function table(headers, rows, cls = "") {
  return h("div", { class: `scroll ${cls}` }, h("table", {},
    h("thead", {}, h("tr", {}, headers.map((x) => h("th", typeof x === "object" ? x : {}, typeof x === "object" ? x.label : x)))),
    h("tbody", {}, rows)));
}

export const CURRENCY = "¥";  // the site's currency (CNY) unless the API says otherwise
export function money(cents) {
  const sign = cents < 0 ? "−" : "";
  return `${sign}${CURRENCY}${(Math.abs(cents) / 100).toFixed(2)}`;
}

export function dateTime(ts) {
  if (ts === null || ts === undefined) return "";
  const d = new Date(ts * 1000);
  const thisYear = d.getFullYear() === new Date().getFullYear();  // shorter rows on a phone
  return d.toLocaleString(undefined, { year: thisYear ? undefined : "numeric", month: "short",
    day: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

export function timeOnly(ts) {
  return ts ? new Date(ts * 1000).toLocaleTimeString() : "";
}

export function ago(ts) {
  if (!ts) return "never";
  const s = Math.max(0, Date.now() / 1000 - ts);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return dateTime(ts);
}

export function power(w) {
  if (w === null || w === undefined || Number.isNaN(w)) return "–";
  return Math.abs(w) >= 1000 ? `${(w / 1000).toFixed(2)} kW` : `${Math.round(w)} W`;
}

/** A status line that shows success or the API's error detail. */
export function status() {
  const el = h("p", { class: "muted", role: "status" });
  el.ok = (text) => { el.className = "ok"; el.textContent = text; };
  el.fail = (err) => { el.className = "bad"; el.textContent = err && err.message ? err.message : String(err); };
  el.clear = () => { el.className = "muted"; el.textContent = ""; };
  return el;
}

export function isoDay(d = new Date()) {
  const p = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())}`;
}

/** Seconds since the epoch from a datetime-local input's value, or undefined. */
export function epochOf(value) {
  if (!value) return undefined;
  const t = new Date(value).getTime();
  return Number.isNaN(t) ? undefined : t / 1000;
}

export function debounce(fn, ms) {
  let timer = null;
  return (...args) => { clearTimeout(timer); timer = setTimeout(() => fn(...args), ms); };
}

export function newKey(prefix) {
  const rnd = crypto.randomUUID ? crypto.randomUUID() : `${Date.now()}-${Math.random().toString(16).slice(2)}`;
  return `${prefix}-${rnd}`;
}
