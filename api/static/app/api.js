// Session, API calls and live events. The token lives in sessionStorage with its expiry, so a
// reload keeps the user signed in and closing the tab signs them out.
const KEY = "scgw.session";

export function currentSession() {
  try {
    const s = JSON.parse(sessionStorage.getItem(KEY) || "null");
    if (s && s.token && s.expires_at * 1000 > Date.now()) return s;
  } catch (_) { /* a damaged entry is no session */ }
  sessionStorage.removeItem(KEY);
  return null;
}

export function saveSession(s) { sessionStorage.setItem(KEY, JSON.stringify(s)); }
export function clearSession() { sessionStorage.removeItem(KEY); }

export class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

/** The API's `detail` as a sentence: a string as is, pydantic's list as "field: problem". */
export function detailText(body, status, statusText) {
  const d = body && body.detail;
  if (typeof d === "string") return d;
  if (Array.isArray(d)) {
    return d.map((p) => {
      const where = (p.loc || []).filter((x) => x !== "body" && x !== "query" && x !== "path").join(".");
      return where ? `${where}: ${p.msg}` : p.msg;
    }).join("; ");
  }
  return `${status} ${statusText || "error"}`;
}

export async function login(username, password) {
  const r = await fetch("/api/v1/auth/token", {
    method: "POST", body: new URLSearchParams({ username, password }),
  });
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new ApiError(r.status, detailText(body, r.status, r.statusText));
  const s = { token: body.access_token, role: body.role, username,
    expires_at: Date.now() / 1000 + (body.expires_in || 3600) };
  saveSession(s);
  return s;
}

/** A call with the session's token; `json` is sent as the body, `query` as the URL query. */
export async function api(path, { method = "GET", json, query } = {}) {
  const s = currentSession();
  if (!s) { window.dispatchEvent(new Event("scgw:signed-out")); throw new ApiError(401, "please sign in again"); }
  let url = path;
  if (query) {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(query)) if (v !== undefined && v !== null && v !== "") q.set(k, v);
    if ([...q].length) url += `?${q}`;
  }
  const headers = { Authorization: `Bearer ${s.token}` };
  if (json !== undefined) headers["Content-Type"] = "application/json";
  let r;
  try {
    r = await fetch(url, { method, headers, body: json === undefined ? undefined : JSON.stringify(json) });
  } catch (_) {
    throw new ApiError(0, "the gateway cannot be reached");
  }
  const body = r.status === 204 ? null : await r.json().catch(() => null);
  if (r.status === 401) { clearSession(); window.dispatchEvent(new Event("scgw:signed-out")); }
  if (!r.ok) throw new ApiError(r.status, detailText(body, r.status, r.statusText));
  return body;
}

// --- live events (GET /api/v1/events, Server-Sent Events) ---------------------------------
const listeners = new Map();
let source = null;
export const live = { connected: false };

export function on(type, fn) {
  if (!listeners.has(type)) listeners.set(type, new Set());
  listeners.get(type).add(fn);
  if (source) source.addEventListener(type, dispatch);
}

/** Forget every listener (sign-out: the next user's views register their own). */
export function offAll() { listeners.clear(); }

function dispatch(ev) {
  let data;
  try { data = JSON.parse(ev.data); } catch (_) { return; }
  for (const fn of listeners.get(ev.type) || []) {
    try { fn(data); } catch (err) { console.error(err); }
  }
}

function setLive(connected) {
  live.connected = connected;
  window.dispatchEvent(new CustomEvent("scgw:live", { detail: connected }));
}

export function startEvents() {
  stopEvents();
  const s = currentSession();
  if (!s || typeof EventSource === "undefined") return;
  source = new EventSource(`/api/v1/events?access_token=${encodeURIComponent(s.token)}`);
  source.onopen = () => setLive(true);
  source.onerror = () => {
    setLive(false);
    if (!currentSession()) stopEvents();  // signed out: the browser would retry forever
  };
  for (const type of new Set([...listeners.keys(), "access", "payment", "alert", "device", "reading", "reset"])) {
    source.addEventListener(type, dispatch);
  }
}

export function stopEvents() {
  if (source) source.close();
  source = null;
  setLive(false);
}
