// Administrators: users and their roles (new users, role changes, disabling, password resets).
import { api, currentSession } from "./api.js";
import { card, dateTime, h, status, table } from "./ui.js";

const ROLES = ["resident", "staff", "engineer", "admin"];

export function mount(el) {
  const list = h("div", { id: "users" });
  const note = status();
  const create = h("form", { class: "row", id: "new-user" },
    h("label", {}, "Username", h("input", { name: "username", required: true, autocomplete: "off", maxlength: "64" })),
    h("label", {}, "Password (12+ characters)", h("input", { name: "password", type: "password", required: true, minlength: "12", autocomplete: "new-password" })),
    h("label", {}, "Role", h("select", { name: "role" }, ROLES.map((r) => h("option", { value: r, selected: r === "staff" }, r)))),
    h("label", {}, "Resident id (residents only)", h("input", { name: "resident_id", autocomplete: "off" })),
    h("button", {}, "Add user"));
  create.addEventListener("submit", async (e) => {
    e.preventDefault();
    const json = { username: create.username.value.trim(), password: create.password.value, role: create.role.value };
    if (create.resident_id.value.trim()) json.resident_id = create.resident_id.value.trim();
    try { const u = await api("/api/v1/users", { method: "POST", json }); create.reset(); note.ok(`${u.username} added as ${u.role}`); load(); } catch (err) { note.fail(err); }
  });
  async function patch(u, json, done) {
    try { await api(`/api/v1/users/${encodeURIComponent(u.user_id)}`, { method: "PATCH", json }); note.ok(`${u.username}: ${done}`); } catch (err) { note.fail(err); }
    load();
  }
  function resetForm(u, cell) {
    const f = h("form", { class: "row" }, h("label", {}, `New password for ${u.username}`, h("input", { name: "password", type: "password", required: true, minlength: "12", autocomplete: "new-password" })),
      h("button", {}, "Set"), h("button", { type: "button", class: "secondary", onclick: () => load() }, "Cancel"));
    f.addEventListener("submit", async (e) => {
      e.preventDefault();
      try { await api(`/api/v1/users/${encodeURIComponent(u.user_id)}/password`, { method: "POST", json: { password: f.password.value } }); note.ok(`${u.username}: password reset, their sessions ended`); load(); } catch (err) { note.fail(err); }
    });
    cell.replaceChildren(f);
  }
  function row(u) {
    const me = u.username === currentSession()?.username;
    const role = h("select", { "aria-label": `role of ${u.username}`, disabled: me }, ROLES.map((r) => h("option", { value: r, selected: r === u.role }, r)));
    role.addEventListener("change", () => patch(u, { role: role.value }, `now ${role.value}`));
    const actions = h("td", {},
      h("button", { type: "button", class: "secondary", disabled: me, onclick: () => patch(u, { disabled: !u.disabled }, u.disabled ? "enabled" : "disabled") }, u.disabled ? "Enable" : "Disable"), " ",
      h("button", { type: "button", class: "secondary", onclick: () => resetForm(u, actions) }, "Reset password"));
    return h("tr", { dataset: { user: u.username } }, h("td", {}, u.username, u.disabled ? h("span", { class: "bad" }, " (disabled)") : ""),
      h("td", {}, role), h("td", {}, u.resident_id || ""), h("td", {}, dateTime(u.created_at)), actions);
  }
  async function load() {
    try {
      const users = await api("/api/v1/users");
      list.replaceChildren(table(["User", "Role", "Resident", "Created", ""], users.map(row), "tall"));
    } catch (err) { note.fail(err.status === 404 ? "user administration is not available on this gateway yet" : err); }
  }
  el.append(h("section", { class: "card wide" }, h("h2", {}, "Users and roles"), list, note), card("New user", create));
  return { show: load };
}
