// Staff administration of people: residents (new, cards, move-out, invitations, canteen
// top-ups) and visitor passes.
import { api } from "./api.js";
import { card, dateTime, epochOf, h, money, newKey, status, table } from "./ui.js";

function residentDetail(id, reload) {
  const box = h("div", { class: "confirm", id: "resident-detail", dataset: { resident: id } }, h("p", { class: "muted" }, "loading…"));
  const note = status();
  let topupKey = newKey("topup");  // kept until the top-up succeeds: a retry never credits twice
  async function load() {
    let p;
    let account = null;
    try {
      p = await api(`/api/v1/residents/${encodeURIComponent(id)}`);
      account = await api(`/api/v1/canteen/accounts/${encodeURIComponent(id)}`, { query: { limit: 5 } }).catch((err) => { note.fail(err); return null; });
    } catch (err) { box.replaceChildren(h("p", { class: "bad" }, err.message)); return; }
    const r = p.resident;
    const cards = table(["Kind", "Number", "Issued", ""], p.cards.map((c) => h("tr", {},
      h("td", {}, c.kind), h("td", {}, c.card_number), h("td", {}, dateTime(c.issued_at)),
      h("td", {}, c.revoked_at ? h("span", { class: "muted" }, `revoked ${dateTime(c.revoked_at)}`)
        : h("button", { type: "button", class: "secondary", onclick: () => act(`/api/v1/cards/${encodeURIComponent(c.kind)}/${encodeURIComponent(c.card_number)}/revoke`, "card revoked") }, "Revoke")))));
    const issue = h("form", { class: "row" },
      h("label", {}, "Card kind", h("select", { name: "kind" }, ["gate", "elevator", "canteen"].map((k) => h("option", { value: k }, k)))),
      h("label", {}, "Card number", h("input", { name: "number", required: true, maxlength: "64" })), h("button", {}, "Issue card"));
    issue.addEventListener("submit", (e) => { e.preventDefault(); act(`/api/v1/residents/${encodeURIComponent(id)}/cards`, "card issued", { kind: issue.kind.value, card_number: issue.number.value.trim() }); });
    const topup = h("form", { class: "row", id: "topup-form" },
      h("label", {}, "Top-up (¥)", h("input", { name: "amount", type: "number", min: "0.01", step: "0.01", required: true })), h("button", {}, "Top up"));
    topup.addEventListener("submit", async (e) => {
      e.preventDefault();
      const cents = Math.round(Number(topup.amount.value) * 100);
      try {
        const receipt = await api(`/api/v1/canteen/accounts/${encodeURIComponent(id)}/topup`, { method: "POST", json: { amount_cents: cents, idempotency_key: topupKey } });
        topupKey = newKey("topup");
        note.ok(`${money(receipt.amount_cents)} credited${receipt.replayed ? " (already done)" : ""}; balance ${money(receipt.balance_cents)}`);
        load();
      } catch (err) { note.fail(err); }
    });
    const invite = h("button", { type: "button", class: "secondary" }, "Create app invitation");
    invite.addEventListener("click", async () => {
      try {
        const inv = await api(`/api/v1/residents/${encodeURIComponent(id)}/invitations`, { method: "POST", json: {} });
        note.ok(`invitation for ${r.name}: ${inv.invitation} (one use, expires ${dateTime(inv.expires_at)})`);
      } catch (err) { note.fail(err); }
    });
    const moveOut = h("button", { type: "button", class: "danger" }, "Move out…");
    moveOut.addEventListener("click", () => {
      moveOut.replaceWith(h("span", {}, `Revoke every card, phone and pass of ${r.name}? `,
        h("button", { type: "button", class: "danger", onclick: () => act(`/api/v1/residents/${encodeURIComponent(id)}/move-out`, "moved out") }, "Confirm move-out")));
    });
    box.replaceChildren(h("h3", {}, `${r.name} · unit ${p.unit.unit_id} (building ${p.unit.building_id}, floor ${p.unit.floor}) · ${r.role}`,
      r.moved_out_at ? h("span", { class: "bad" }, ` · moved out ${dateTime(r.moved_out_at)}`) : ""),
    h("p", {}, "Canteen balance: ", h("b", { class: "balance" }, account ? money(account.balance_cents) : "–")),
    r.moved_out_at ? "" : topup, h("h3", {}, "Cards"), cards, r.moved_out_at ? "" : issue,
    h("p", {}, `${p.credentials.filter((c) => !c.revoked_at).length} active phone credential(s); groups: ${p.groups.join(", ") || "none"}`),
    r.moved_out_at ? "" : h("p", {}, invite, " ", moveOut), note);
  }
  async function act(path, done, json) {
    try { await api(path, { method: "POST", json }); note.ok(done); await load(); if (done === "moved out") reload(); } catch (err) { note.fail(err); }
  }
  load();
  return box;
}

export function residentsCard(onList) {
  const list = h("div", { id: "residents" });
  const detail = h("div", {});
  const note = status();
  const unit = h("select", { name: "unit", required: true });
  const create = h("form", { class: "row" },
    h("label", {}, "Name", h("input", { name: "name", required: true, maxlength: "128" })), h("label", {}, "Unit", unit),
    h("label", {}, "Role", h("select", { name: "role" }, ["owner", "tenant", "family"].map((x) => h("option", { value: x }, x)))),
    h("button", {}, "Add resident"));
  create.addEventListener("submit", async (e) => {
    e.preventDefault();
    try {
      const r = await api("/api/v1/residents", { method: "POST", json: { name: create.name.value.trim(), unit_id: unit.value, role: create.role.value } });
      create.reset(); note.ok(`${r.name} added (${r.resident_id})`); await load(); open(r.resident_id);
    } catch (err) { note.fail(err); }
  });
  function open(id) { detail.replaceChildren(residentDetail(id, load)); }
  async function load() {
    try {
      const [residents, units] = await Promise.all([api("/api/v1/residents"), api("/api/v1/units")]);
      unit.replaceChildren(...units.map((u) => h("option", { value: u.unit_id }, `${u.unit_id} (${u.building_id}, floor ${u.floor})`)));
      list.replaceChildren(table(["Name", "Unit", "Role", ""], residents.map((r) => h("tr", { dataset: { resident: r.resident_id } },
        h("td", {}, r.name), h("td", {}, r.unit_id), h("td", {}, r.role),
        h("td", {}, h("button", { type: "button", class: "secondary", onclick: () => open(r.resident_id) }, "Open")))), "tall"));
      onList(residents);
    } catch (err) { note.fail(err); }
  }
  return { el: card("Residents", list, detail, h("h3", {}, "New resident"), create, note), load };
}

export function passesCard() {
  const list = h("div", { id: "visitor-passes" });
  const note = status();
  const issuer = h("select", { name: "issued_by", required: true });
  const local = (d) => new Date(d.getTime() - d.getTimezoneOffset() * 60000).toISOString().slice(0, 16);
  const form = h("form", { class: "row" },
    h("label", {}, "Visitor", h("input", { name: "visitor", required: true, maxlength: "128" })), h("label", {}, "Visiting", issuer),
    h("label", {}, "From", h("input", { name: "from", type: "datetime-local", required: true })),
    h("label", {}, "Until", h("input", { name: "until", type: "datetime-local", required: true })),
    h("label", {}, "Uses", h("input", { name: "uses", type: "number", min: "1", step: "1", value: "4" })), h("button", {}, "Issue pass"));
  form.from.value = local(new Date());
  form.until.value = local(new Date(Date.now() + 4 * 3600 * 1000));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    try {
      const p = await api("/api/v1/visitor-passes", { method: "POST", json: { visitor_name: form.visitor.value.trim(), issued_by: issuer.value,
        valid_from: epochOf(form.from.value), valid_until: epochOf(form.until.value), max_uses: Number(form.uses.value) } });
      note.ok(`pass ${p.pass_id} issued for ${p.visitor_name}`); load();
    } catch (err) { note.fail(err); }
  });
  async function revoke(id) {
    try { await api(`/api/v1/visitor-passes/${encodeURIComponent(id)}/revoke`, { method: "POST" }); note.ok("pass revoked"); load(); } catch (err) { note.fail(err); }
  }
  async function load() {
    try {
      const passes = await api("/api/v1/visitor-passes");
      list.replaceChildren(passes.length ? table(["Visitor", "Host", "Valid", "Uses", ""], passes.map((p) => h("tr", {},
        h("td", {}, p.visitor_name), h("td", {}, p.issued_by), h("td", {}, `${dateTime(p.valid_from)} – ${dateTime(p.valid_until)}`),
        h("td", { class: "num" }, `${p.uses}/${p.max_uses}`),
        h("td", {}, p.revoked_at ? h("span", { class: "muted" }, "revoked") : h("button", { type: "button", class: "secondary", onclick: () => revoke(p.pass_id) }, "Revoke")))), "tall")
        : h("p", { class: "muted" }, "No visitor passes."));
    } catch (err) { note.fail(err); }
  }
  return {
    el: card("Visitor passes", list, h("h3", {}, "New pass"), form, note), load,
    setResidents(residents) { issuer.replaceChildren(...residents.map((r) => h("option", { value: r.resident_id }, `${r.name} (${r.unit_id})`))); },
  };
}
