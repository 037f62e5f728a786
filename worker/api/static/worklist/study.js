// One study's AI result and its evidence: findings, regions, similar studies, priority changes, deliveries.
import { api, download, logout, requireLogin } from "./auth.js";
import { changeList, el, findingList, percent, priorityBadge, waited } from "./format.js";

const main = document.getElementById("detail");

function section(title, id, ...content) {
  return el("section", { id }, el("h2", {}, title), ...content);
}

function table(headers, rows) {
  return el("table", {}, el("thead", {}, el("tr", {}, headers.map((h) => el("th", {}, h)))),
    el("tbody", {}, rows.map((cells) => el("tr", {}, cells.map((c) => el("td", {}, c))))));
}

function render(detail) {
  const item = detail.item;
  document.getElementById("title").textContent = item.study_description || "Study";
  document.title = `${item.study_description || "Study"} · AI triage worklist`;
  const actions = [];
  if (item.links.sr) {
    actions.push(el("button", { type: "button", class: "sr",
      onclick: () => download(item.links.sr, `${item.study_instance_uid}-sr.dcm`).catch((e) => alert(e.message)) },
      "Download the SR"));
  }
  if (item.links.viewer) actions.push(el("a", { href: item.links.viewer, target: "_blank", rel: "noopener" }, "Open in viewer"));

  main.replaceChildren(
    el("div", { class: "summary" },
      priorityBadge(item), changeList(item.priority_changes),
      el("dl", {},
        el("dt", {}, "Accession"), el("dd", {}, item.accession_number || "—"),
        el("dt", {}, "Study UID"), el("dd", { class: "uid" }, item.study_instance_uid),
        el("dt", {}, "Waiting"), el("dd", {}, waited(item.waiting_since)),
        el("dt", {}, "Model"), el("dd", {}, item.model || "—"),
        el("dt", {}, "Referral"), el("dd", {}, item.referrals.join(", ") || "—")),
      el("div", { class: "actions" }, actions)),
    section("Findings", "findings",
      detail.all_findings.length
        ? table(["Finding and probability", "Threshold", "Regions marked in the SR"],
          detail.all_findings.map((f) => [findingList([f]),
            f.threshold === null ? "—" : percent(f.threshold), String(detail.regions[f.label] || 0)]))
        : el("p", { class: "muted" }, "No finding reported.")),
    section("Priority scores", "scores",
      table(["Model class", "Probability"], Object.entries(detail.priority_scores).map(([k, v]) => [k, percent(v)]))),
    section("Similar prior studies", "similar",
      detail.similar_studies.length
        ? table(["Study", "Similarity", "Its findings"], detail.similar_studies.map((s) => [
          s.on_worklist ? el("a", { href: s.links.detail, class: "uid" }, s.study_instance_uid)
            : (s.links && s.links.viewer ? el("a", { href: s.links.viewer, class: "uid" }, s.study_instance_uid)
              : el("span", { class: "uid" }, s.study_instance_uid)),
          percent(s.similarity), s.findings.join(", ") || "—"]))
        : el("p", { class: "muted" }, "The SR cites no similar studies.")),
    section("Worklist priority in other systems", "publications",
      detail.publications.length
        ? table(["When", "Publisher", "Action", "Before → after", "Why"], detail.publications.map((p) => [
          new Date(p.at).toLocaleString(), p.publisher || "—", p.action || "—",
          `${p.original ?? "—"} → ${p.new ?? "—"}`, p.reason]))
        : el("p", { class: "muted" }, "No publisher configured or nothing published.")),
    section("SR deliveries", "deliveries",
      detail.deliveries.length
        ? table(["Destination", "Status", "Attempts", "Delivered", "Last error"], detail.deliveries.map((d) => [
          d.destination, d.status, String(d.attempts), d.delivered_at ? new Date(d.delivered_at).toLocaleString() : "—",
          d.last_error || ""]))
        : el("p", { class: "muted" }, "No destination: the SR is in the outbox.")));
  if (location.hash) document.querySelector(location.hash)?.scrollIntoView();
}

if (requireLogin()) {
  document.getElementById("logout").addEventListener("click", logout);
  const uid = new URLSearchParams(location.search).get("uid") || "";
  api(`studies/${encodeURIComponent(uid)}`).then(async (response) => {
    if (!response.ok) throw new Error((await response.json()).detail || `HTTP ${response.status}`);
    render(await response.json());
  }).catch((error) => main.replaceChildren(el("p", { class: "error" }, error.message)));
}
