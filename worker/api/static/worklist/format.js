// Formatting shared by the worklist pages. Everything is written with textContent, never as HTML.

export function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function waited(since, now = Date.now()) {
  const minutes = Math.max(0, Math.floor((now - new Date(since).getTime()) / 60000));
  if (minutes < 60) return `${minutes} min`;
  const hours = Math.floor(minutes / 60);
  if (hours < 24) return `${hours} h ${String(minutes % 60).padStart(2, "0")} min`;
  return `${Math.floor(hours / 24)} d ${hours % 24} h`;
}

export function percent(p) {
  return `${(100 * p).toFixed(p >= 0.995 || p < 0.01 ? 1 : 0)} %`;
}

export const PRIORITY_TEXT = { stat: "STAT", urgent: "Urgent", routine: "Routine" };

export function priorityBadge(item) {
  if (item.ai_status === "pending") return el("span", { class: "badge pending" }, "AI pending");
  if (item.ai_status === "failed") return el("span", { class: "badge failed" }, "AI failed");
  if (item.ai_status === "not_analysed") return el("span", { class: "badge not-analysed" }, "Not analysed");
  return el("span", { class: `badge ${item.priority}` }, PRIORITY_TEXT[item.priority] || item.priority);
}

// extra(f): more content at the end of a finding's line (the worklist's agree / disagree buttons).
export function findingList(findings, extra = () => null) {
  if (!findings.length) return el("span", { class: "muted" }, "—");
  return el("ul", { class: "findings" }, findings.map((f) =>
    el("li", { class: f.positive ? "positive" : "", title: f.label, dataset: { label: f.label } },
      el("span", { class: "name" }, f.name),
      el("span", { class: "bar" }, el("span", { style: `width:${Math.round(100 * f.probability)}%` })),
      el("span", { class: "p" }, percent(f.probability)),
      extra(f))));
}

export function changeList(changes) {
  const shown = changes.filter((c) => c.action !== "notified");
  if (!shown.length) return null;
  return el("div", { class: "changes" }, shown.map((c) =>
    el("div", {}, `${c.publisher}: ${c.original ?? "—"} → ${c.new ?? "—"}${c.action === "reverted" ? " (reverted)" : ""}`)));
}
