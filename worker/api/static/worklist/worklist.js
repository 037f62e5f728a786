// The worklist page: polls the worklist with its ETag and redraws when it changes; no reload needed.
import { api, download, logout, requireLogin } from "./auth.js";
import { changeList, el, findingList, priorityBadge, waited } from "./format.js";

const body = document.querySelector("#worklist tbody");
const statusLine = document.getElementById("status");
let etag = null;
let shown = null; // study UID -> its AI state on screen; null until the first answer
let pollMs = 5000;

function evidence(item) {
  const links = [el("a", { href: item.links.detail, class: "detail" }, "Details")];
  if (item.links.sr) {
    links.push(el("button", {
      type: "button", class: "link sr",
      onclick: () => download(item.links.sr, `${item.study_instance_uid}-sr.dcm`).catch((e) => alert(e.message)),
    }, "SR"));
  }
  if (item.similar_studies) {
    links.push(el("a", { href: `${item.links.detail}#similar`, class: "similar" }, `${item.similar_studies} similar`));
  }
  if (item.links.viewer) links.push(el("a", { href: item.links.viewer, target: "_blank", rel: "noopener" }, "Viewer"));
  return el("div", { class: "evidence" }, links);
}

function row(item, isNew) {
  return el("tr", { class: [`p-${item.priority || item.ai_status}`, isNew ? "new" : ""].join(" "),
                    dataset: { studyUid: item.study_instance_uid, priority: item.priority || item.ai_status } },
    el("td", {}, priorityBadge(item), changeList(item.priority_changes)),
    el("td", {},
      el("div", { class: "description" }, item.study_description || "(no description)"),
      el("div", { class: "muted small" }, [item.accession_number ? `Acc. ${item.accession_number}` : null,
                                             item.modalities].filter(Boolean).join(" · "))),
    el("td", {}, findingList(item.findings)),
    el("td", {}, item.referrals.length ? item.referrals.join(", ") : el("span", { class: "muted" }, "—")),
    el("td", { class: "waiting", dataset: { since: item.waiting_since } }, waited(item.waiting_since)),
    el("td", {}, evidence(item)));
}

// Rows that arrived, or whose AI result changed, since the last answer are highlighted for a moment.
function render(items) {
  const before = shown;
  const state = (item) => `${item.ai_status}:${item.priority}`;
  body.replaceChildren(...items.map((item) =>
    row(item, before !== null && before.get(item.study_instance_uid) !== state(item))));
  shown = new Map(items.map((item) => [item.study_instance_uid, state(item)]));
  document.getElementById("empty").hidden = items.length > 0;
}

async function poll() {
  try {
    const response = await api("items", { headers: etag ? { "If-None-Match": etag } : {} });
    if (response.status === 200) {
      const data = await response.json();
      etag = response.headers.get("ETag");
      pollMs = Math.max(500, 1000 * data.poll_interval_s);
      render(data.items);
    } else if (response.status !== 304) {
      throw new Error(`HTTP ${response.status}`);
    }
    statusLine.textContent = `updated ${new Date().toLocaleTimeString()}`;
    statusLine.classList.remove("offline");
  } catch (error) {
    if (error.message === "not logged in") return;
    statusLine.textContent = `no connection (${error.message}); retrying`;
    statusLine.classList.add("offline");
  }
  setTimeout(poll, pollMs);
}

function tick() {
  for (const cell of body.querySelectorAll("td.waiting")) cell.textContent = waited(cell.dataset.since);
}

if (requireLogin()) {
  document.getElementById("logout").addEventListener("click", logout);
  api("me").then((r) => r.json()).then((me) => {
    document.getElementById("user").textContent = `${me.name} (${me.role})`;
  }).catch(() => {});
  poll();
  setInterval(tick, 30000);
}
