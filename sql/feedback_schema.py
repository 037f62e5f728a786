"""Radiologists' feedback on AI results: agree or disagree, per finding and per priority, with a comment.

Modelled on IHE AI Results (AIR): a reader *accepts* or *rejects* an AI result (here: "agree" / "disagree") and
may say why. Rows are never updated: a radiologist who changes their mind adds a row, and the latest row of a
person for a target is their current verdict, so the record of what was said, and when, stays whole (the API's
audit log names the request as well). People are named by their API token's name, studies by their UID; no
patient names or IDs are kept.

What the feedback is about:

* ``target`` "finding": ``label`` is the model's diagnosis label, ``ai_value`` "present" (the summary lists only
  called findings, so that is what is judged); agreeing confirms the finding, disagreeing rejects it.
* ``target`` "priority": ``label`` and ``ai_value`` are the AI's priority (routine | urgent | stat).

The nightly job (``train.nightly``) takes finding verdicts as labels for studies with no final report.
"""
from __future__ import annotations

from sqlalchemy import BigInteger, Column, DateTime, ForeignKey, Integer, String, Table, Text

from sql.base import UID, metadata

#: What may be judged, and the two verdicts (IHE AIR accept / reject).
TARGETS = ("finding", "priority")
VERDICTS = ("agree", "disagree")
#: Longest comment kept (characters); longer ones are refused with this limit named.
MAX_COMMENT = 2000

ai_feedback = Table(
    "ai_feedback",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
    Column("study_instance_uid", UID, nullable=False, index=True),
    # The processing run whose result was judged (a revised result is a new run and needs new feedback).
    Column("run_id", Integer, ForeignKey("processing_runs.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("target", String(16), nullable=False),
    Column("label", String(96), nullable=False),
    # What the AI said of the target when it was judged: "present" for a finding, the priority for a priority.
    Column("ai_value", String(16), nullable=False),
    Column("verdict", String(16), nullable=False),
    Column("comment", Text),
    Column("principal", String(128), nullable=False),
    Column("role", String(32), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, index=True),
)
