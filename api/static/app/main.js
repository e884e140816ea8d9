// Entry point: sign-in, one view per role (admin sees the engineer's and staff's too), the
// account view (password change), sign-out, and the live-events indicator.
import { api, clearSession, currentSession, detailText, login, offAll, startEvents, stopEvents } from "./api.js";
import { $, card, h, status } from "./ui.js";
import * as resident from "./resident.js";
import * as engineer from "./engineer.js";
import * as staff from "./staff.js";
import * as admin from "./admin.js";

const VIEWS = {
  resident: { label: "My home", module: resident },
  engineer: { label: "Energy & devices", module: engineer },
  staff: { label: "Front desk", module: staff },
  admin: { label: "Users", module: { mount: mountAdmin } },
  account: { label: "Account", module: { mount: mountAccount } },
};
const BY_ROLE = {
  resident: ["resident", "account"],
  engineer: ["engineer", "account"],
  staff: ["staff", "account"],
  admin: ["engineer", "staff", "admin", "account"],
};
const mounted = new Map();
let active = null;

function mountAdmin(el) { return admin.mount(el); }

function mountAccount(el) {
  const form = h("form", {},
    h("label", {}, "Current password", h("input", { name: "current", type: "password", autocomplete: "current-password", required: true })),
    h("label", {}, "New password (at least 12 characters)", h("input", { name: "next", type: "password", autocomplete: "new-password", minlength: "12", required: true })),
    h("label", {}, "New password again", h("input", { name: "again", type: "password", autocomplete: "new-password", required: true })),
    h("button", {}, "Change password"));
  const note = status();
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    if (form.next.value !== form.again.value) { note.fail("the new passwords differ"); return; }
    try {
      await api("/api/v1/me/password", { method: "POST", json: { current_password: form.current.value, new_password: form.next.value } });
      // A changed password ends every session of the user, this one too: sign in again.
      const s = await login(currentSession()?.username || "", form.next.value);
      form.reset();
      startEvents();
      note.ok(`password changed; signed in again as ${s.username}`);
    } catch (err) { note.fail(err); }
  });
  const s = currentSession();
  el.append(card("Account", h("p", {}, `Signed in as ${s.username} (${s.role}).`), form, note));
  return {};
}

function showBanner(text) {
  const b = $("#banner");
  b.textContent = text || "";
  b.hidden = !text;
}

function route() {
  const s = currentSession();
  if (!s) return;
  const allowed = BY_ROLE[s.role] || ["account"];
  const wanted = location.hash.slice(1);
  const name = allowed.includes(wanted) ? wanted : allowed[0];
  for (const a of document.querySelectorAll("#tabs a")) a.classList.toggle("active", a.dataset.view === name);
  if (active && active !== name) {
    $(`#view-${active}`).hidden = true;
    mounted.get(active)?.hide?.();
  }
  const el = $(`#view-${name}`);
  if (!mounted.has(name)) mounted.set(name, VIEWS[name].module.mount(el) || {});
  el.hidden = false;
  mounted.get(name).show?.();
  active = name;
  document.body.dataset.view = name;
}

function signedIn(s) {
  $("#login").hidden = true;
  $("#logout").hidden = false;
  $("#who").textContent = `${s.username} · ${s.role}`;
  const allowed = BY_ROLE[s.role] || ["account"];
  $("#tabs").replaceChildren(...allowed.map((v) => h("a", { href: `#${v}`, dataset: { view: v } }, VIEWS[v].label)));
  document.body.dataset.role = s.role;
  startEvents();
  route();
}

function signedOut(message) {
  stopEvents();
  offAll();
  clearSession();
  for (const m of mounted.values()) m.hide?.();
  mounted.clear();
  active = null;
  for (const v of document.querySelectorAll(".view")) { v.hidden = true; v.replaceChildren(); }
  $("#tabs").replaceChildren();
  $("#who").textContent = "";
  $("#logout").hidden = true;
  $("#login").hidden = false;
  delete document.body.dataset.role;
  delete document.body.dataset.view;
  $("#login-error").textContent = message || "";
}

$("#login-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const f = e.target;
  $("#login-error").textContent = "";
  try {
    const s = await login(f.username.value, f.password.value);
    f.reset();
    signedIn(s);
  } catch (err) { $("#login-error").textContent = err.message; }
});
function invitationForm() {
  const f = h("form", { id: "invitation-form" },
    h("label", {}, "Invitation code", h("input", { name: "invitation", required: true, autocomplete: "off" })),
    h("label", {}, "Choose a username", h("input", { name: "username", required: true, autocomplete: "username" })),
    h("label", {}, "Choose a password (12+ characters)", h("input", { name: "password", type: "password", minlength: "12", required: true, autocomplete: "new-password" })),
    h("button", {}, "Create my login"));
  const note = status();
  f.addEventListener("submit", async (e) => {
    e.preventDefault();
    try {
      const r = await fetch("/api/v1/invitations/accept", { method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ invitation: f.invitation.value.trim(), username: f.username.value.trim(), password: f.password.value }) });
      const body = await r.json().catch(() => ({}));
      if (!r.ok) throw new Error(detailText(body, r.status, r.statusText));
      const s = await login(f.username.value.trim(), f.password.value);
      f.reset();
      signedIn(s);
    } catch (err) { note.fail(err); }
  });
  return h("details", {}, h("summary", {}, "Have an invitation from the property office?"), f, note);
}
$("#login").append(invitationForm());

$("#logout").addEventListener("click", () => { signedOut(""); history.replaceState(null, "", "/"); });
window.addEventListener("hashchange", route);
window.addEventListener("scgw:signed-out", () => signedOut("your session ended: please sign in again"));
window.addEventListener("scgw:live", (e) => {
  const el = $("#live");
  el.textContent = e.detail ? "live" : "offline";
  el.className = `pill ${e.detail ? "on" : "off"}`;
});
window.addEventListener("unhandledrejection", (e) => showBanner(e.reason?.message || String(e.reason)));

const s = currentSession();
if (s) signedIn(s); else signedOut("");
