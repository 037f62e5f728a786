// The worklist page: polls the worklist with its ETag and redraws when it changes; no reload needed.
// A radiologist agrees or disagrees with each called finding and with the priority (POST studies/<uid>/feedback).
import { api, download, logout, requireLogin } from "./auth.js";
import { changeList, el, findingList, priorityBadge, waited } from "./format.js";

const body = document.querySelector("#worklist tbody");
const statusLine = document.getElementById("status");
let etag = null;
let shown = null; // study UID -> its AI state on screen; null until the first answer
let pollMs = 5000;
let role = null; // the signed-in principal's role: feedback controls for radiologists only
let lastItems = [];
const comments = new Map(); // study UID -> comment typed but not yet sent (survives redraws)
const keyImages = new Map(); // key-image URL -> object URL of its PNG, or null when there is none

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
  return el("div", { class: "evidence" }, links, keyImage(item));
}

// The key image is fetched with the token (an <img src> cannot carry it) and kept as an object URL.
function keyImage(item) {
  if (!item.links.key_image || !item.findings.length) return null;
  const url = `${item.links.key_image}?v=${encodeURIComponent(item.processed_at || "")}`;
  const figure = el("figure", { class: "key-image", hidden: true });
  const show = (objectUrl) => {
    if (!objectUrl) return;
    figure.replaceChildren(el("img", { src: objectUrl, alt: `key image of ${item.study_description || "the study"}` }),
      el("figcaption", { class: "muted small" }, "Key image: regions that drove each finding"));
    figure.hidden = false;
  };
  if (keyImages.has(url)) {
    show(keyImages.get(url));
  } else {
    keyImages.set(url, null);
    api(url, { headers: { Accept: "image/png" } }).then(async (response) => {
      if (!response.ok) return;
      const objectUrl = URL.createObjectURL(await response.blob());
      keyImages.set(url, objectUrl);
      show(objectUrl);
    }).catch(() => keyImages.delete(url));
  }
  return figure;
}

async function sendFeedback(item, target, label, verdict, buttons) {
  const comment = (comments.get(item.study_instance_uid) || "").trim();
  const response = await api(`studies/${encodeURIComponent(item.study_instance_uid)}/feedback`, {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ target, label, verdict, comment: comment || null }),
  });
  if (!response.ok) {
    const detail = await response.json().catch(() => ({}));
    alert(`Feedback not saved: ${typeof detail.detail === "string" ? detail.detail : `HTTP ${response.status}`}`);
    return;
  }
  comments.delete(item.study_instance_uid);
  const box = body.querySelector(`tr[data-study-uid="${item.study_instance_uid}"] input.comment`);
  if (box) box.value = "";
  item.feedback[target === "priority" ? "priority" : `finding:${label}`] = verdict;
  for (const button of buttons) button.setAttribute("aria-pressed", String(button.dataset.verdict === verdict));
  etag = null; // the next poll redraws with the stored verdict
}

// Agree / disagree buttons for one target (IHE AIR accept / reject); the current verdict is pressed.
function verdictButtons(item, target, label) {
  if (role !== "radiologist" || item.ai_status !== "done") return null;
  const key = target === "priority" ? "priority" : `finding:${label}`;
  const current = item.feedback[key];
  const buttons = [];
  for (const [verdict, text, title] of [["agree", "✓", "Agree"], ["disagree", "✗", "Disagree"]]) {
    buttons.push(el("button", {
      type: "button", class: `fb ${verdict}`, title: `${title} with the AI`, "aria-label": `${title}: ${label}`,
      "aria-pressed": String(current === verdict), dataset: { target, label, verdict },
      onclick: () => sendFeedback(item, target, label, verdict, buttons).catch((e) => alert(e.message)),
    }, text));
  }
  return el("span", { class: "verdict" }, buttons);
}

function commentBox(item) {
  if (role !== "radiologist" || item.ai_status !== "done") return null;
  return el("input", { type: "text", class: "comment", maxlength: "2000", placeholder: "Comment (optional)",
    "aria-label": "Comment on the AI result", value: comments.get(item.study_instance_uid) || "",
    oninput: (event) => comments.set(item.study_instance_uid, event.target.value) });
}

function demographics(item) {
  if (!item.demographics) return null;
  const exam = item.exam_at ? new Date(item.exam_at) : null;
  const examText = !exam ? null : (exam.getUTCHours() || exam.getUTCMinutes()
    ? `exam ${exam.toLocaleString([], { dateStyle: "short", timeStyle: "short" })}`
    : `exam ${exam.toISOString().slice(0, 10)}`);
  const parts = [item.patient_sex ? `Sex ${item.patient_sex}` : "Sex —",
                 item.patient_age ? `Age ${item.patient_age.replace(/^0+/, "")}` : "Age —", examText];
  return el("div", { class: "demographics small" }, parts.filter(Boolean).join(" · "));
}

function row(item, isNew) {
  const cells = [
    el("td", { class: "priority" }, priorityBadge(item),
      item.priority ? verdictButtons(item, "priority", item.priority) : null, changeList(item.priority_changes)),
    el("td", {},
      el("div", { class: "description" }, item.study_description || "(no description)"),
      el("div", { class: "muted small" }, [item.accession_number ? `Acc. ${item.accession_number}` : null,
                                             item.modalities].filter(Boolean).join(" · ")),
      demographics(item))];
  if (item.ai_status === "not_analysed") {
    cells.push(el("td", { colspan: "2", class: "not-analysed" },
      el("strong", {}, "Not analysed by the AI: "),
      el("ul", { class: "reasons" }, item.not_analysed_reasons.map((r) => el("li", {}, r))),
      el("div", { class: "muted small" }, "No priority was set: read this study in the usual order.")));
  } else {
    cells.push(el("td", { class: "findings-cell" },
      findingList(item.findings, (f) => verdictButtons(item, "finding", f.label)), commentBox(item)));
    cells.push(el("td", {}, item.referrals.length ? item.referrals.join(", ") : el("span", { class: "muted" }, "—")));
  }
  cells.push(el("td", { class: "waiting", dataset: { since: item.waiting_since } }, waited(item.waiting_since)));
  cells.push(el("td", {}, evidence(item)));
  return el("tr", { class: [`p-${item.priority || item.ai_status}`, isNew ? "new" : ""].join(" "),
                    dataset: { studyUid: item.study_instance_uid, priority: item.priority || item.ai_status } },
    cells);
}

// Rows that arrived, or whose AI result changed, since the last answer are highlighted for a moment.
function render(items) {
  lastItems = items;
  const before = shown;
  const state = (item) => `${item.ai_status}:${item.priority}`;
  const focused = document.activeElement?.classList.contains("comment")
    ? document.activeElement.closest("tr")?.dataset.studyUid : null;
  body.replaceChildren(...items.map((item) =>
    row(item, before !== null && before.get(item.study_instance_uid) !== state(item))));
  if (focused) body.querySelector(`tr[data-study-uid="${focused}"] input.comment`)?.focus();
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
    role = me.role;
    document.body.dataset.role = me.role;
    render(lastItems);
  }).catch(() => {});
  poll();
  setInterval(tick, 30000);
}
