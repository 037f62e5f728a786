"""Radiologists' agreement with the AI by group: the share of verdicts that agree (IHE AIR "accept"), per group of
each sensitive attribute, for the fairness report.

A verdict is a radiologist's latest on one target (a called finding, or the priority) of one AI result
(``sql.feedback_schema``); groups are the study's attributes (``study_attributes``; a study without a row
is "unknown"). A group where the AI is rejected far more often than elsewhere is a sign it serves that group worse,
visible long before final reports make TPR/FPR disparities measurable.
"""
from __future__ import annotations

import html
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from matplotlib.figure import Figure
from sqlalchemy import func, select
from sqlalchemy.engine import Connection

from sql.feedback_schema import ai_feedback
from sql.report_schema import ATTRIBUTES, UNKNOWN, study_attributes
from train.fairness.report import _img, plot_text

ALL = "all"


@dataclass(frozen=True)
class AgreementRow:
    attribute: str  # "all" for the population
    group: str
    target: str  # finding | priority | all
    verdicts: int
    agreed: int

    @property
    def share(self) -> float:
        return self.agreed / self.verdicts if self.verdicts else float("nan")


def latest_verdicts(connection: Connection) -> list[tuple[str, str, str]]:
    """(study UID, target, verdict) of each radiologist's latest verdict on each target of each result."""
    latest = (select(func.max(ai_feedback.c.id))
              .group_by(ai_feedback.c.run_id, ai_feedback.c.target, ai_feedback.c.label, ai_feedback.c.principal))
    return [tuple(r) for r in connection.execute(
        select(ai_feedback.c.study_instance_uid, ai_feedback.c.target, ai_feedback.c.verdict)
        .where(ai_feedback.c.id.in_(latest)))]


def agreement_by_group(connection: Connection, attributes: Sequence[str] = ATTRIBUTES) -> list[AgreementRow]:
    """Agreement per attribute and group, per target and for both targets together; the population first."""
    verdicts = latest_verdicts(connection)
    if not verdicts:
        return []
    uids = sorted({uid for uid, _, _ in verdicts})
    groups: dict[str, dict[str, str]] = {}
    for chunk in range(0, len(uids), 500):
        for row in connection.execute(select(study_attributes).where(
                study_attributes.c.study_instance_uid.in_(uids[chunk:chunk + 500]))).mappings():
            groups[row["study_instance_uid"]] = {a: row[a] or UNKNOWN for a in attributes}
    counts: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0])
    for uid, target, verdict in verdicts:
        keys = [(ALL, ALL)] + [(a, groups.get(uid, {}).get(a, UNKNOWN)) for a in attributes]
        for attribute, group in keys:
            for t in (target, ALL):
                count = counts[(attribute, group, t)]
                count[0] += 1
                count[1] += verdict == "agree"
    order = {a: i for i, a in enumerate((ALL, *attributes))}
    return [AgreementRow(a, g, t, n, k) for (a, g, t), (n, k) in
            sorted(counts.items(), key=lambda kv: (order[kv[0][0]], kv[0][1], kv[0][2] != ALL, kv[0][2]))]


def agreement_plot(rows: Sequence[AgreementRow]) -> Figure | None:
    """Horizontal bars: share of agreeing verdicts per group (both targets), one block per attribute."""
    shown = [r for r in rows if r.target == ALL]
    if not shown:
        return None
    figure = Figure(figsize=(7, 0.3 * len(shown) + 1.0))
    axes = figure.add_subplot()
    labels = [plot_text(f"{r.attribute}: {r.group} (n={r.verdicts})") for r in shown]
    axes.barh(range(len(shown)), [r.share for r in shown], color="#2c3e50")
    axes.set_yticks(range(len(shown)), labels, fontsize=8)
    axes.invert_yaxis()
    axes.set_xlim(0, 1)
    axes.set_xlabel("share of verdicts agreeing with the AI")
    figure.tight_layout()
    return figure


def render_agreement_html(rows: Sequence[AgreementRow]) -> str:
    """The report's section on radiologists' agreement with the AI (a plot and its table)."""
    parts = ["<h2 id=agreement>Radiologists' agreement with the AI</h2>",
             ("<p class=note>Each radiologist's latest verdict (agree / disagree, IHE AIR accept / reject) on each "
              "called finding and priority, by the study's group. Counts are small at first: read shares with "
              "their n.</p>")]
    if not rows:
        parts.append("<p class=note>No feedback given yet.</p>")
        return "\n".join(parts)
    figure = agreement_plot(rows)
    if figure is not None:
        parts.append(_img(figure, "share of agreeing verdicts per group", "agreement-plot"))
    body = "".join(
        f"<tr><td class=text>{html.escape(r.attribute)}</td><td class=text>{html.escape(r.group)}</td>"
        f"<td class=text>{html.escape(r.target)}</td><td>{r.verdicts}</td><td>{r.agreed}</td>"
        f"<td>{100 * r.share:.0f} %</td></tr>" for r in rows)
    parts.append("<table id=agreement-table><tr><th class=text>Attribute</th><th class=text>Group</th>"
                 "<th class=text>Target</th><th>Verdicts</th><th>Agree</th><th>Share agreeing</th></tr>"
                 f"{body}</table>")
    return "\n".join(parts)
