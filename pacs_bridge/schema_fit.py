"""Making received values fit the bookkeeping schema, and saying what was changed.

Real senders send values the schema was not drawn for: ACR-NEMA dates (``1995.01.12``), a Modality of 17
characters, a NUL inside a description, an IS of twelve digits. PostgreSQL refuses each of them (SQLite silently
takes most), and one refused row used to stop all bookkeeping. Every value is made to fit here, at intake, before
it reaches a batch: NUL and other control characters removed, text cut to the column's width (at a word boundary
where one is near), dates parsed into DICOM DA or left NULL, integers outside the column's range left NULL. Each
change is reported (``{"StudyDate": {"received": "1995.01.12", "stored": "19950112"}}``) so the bookkeeper can
write an event naming it; the file in the store keeps every byte as received.

The widths come from the table declarations themselves (:mod:`sql.schema`), so they cannot drift.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import date
from typing import Any

from sqlalchemy import Column

#: C0 controls and DEL, except TAB/LF/CR which DICOM text VRs (ST, LT, UT) may hold: never stored. NUL in particular
#: is refused by PostgreSQL in any text column.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_INT32 = (-(2**31), 2**31 - 1)
#: Dates as legacy and non-conformant senders write them: ACR-NEMA ``YYYY.MM.DD``, ISO ``YYYY-MM-DD``, ``YYYY/MM/DD``.
_LEGACY_DATE = re.compile(r"^(\d{4})[.\-/](\d{2})[.\-/](\d{2})$")

#: How far back from the width a cut may move to end at a word boundary instead of mid-word.
_WORD_SLACK = 16

Changes = dict[str, dict[str, Any]]


def clean_text(value: object) -> str:
    """``value`` as text without control characters (and without the padding DICOM allows), never None."""
    return _CONTROL.sub("", str(value if value is not None else "")).strip()


def fit_text(value: object, width: int | None) -> str:
    """Cleaned text no longer than ``width`` characters, cut at a word boundary where one lies near the end."""
    text = clean_text(value)
    if width is None or len(text) <= width:
        return text
    cut = text[:width]
    boundary = cut.rfind(" ")
    if boundary >= width - _WORD_SLACK and boundary > 0:
        cut = cut[:boundary]
    return cut.rstrip()


def column_width(column: Column) -> int | None:
    return getattr(column.type, "length", None)


def fit_dicom_date(value: object) -> str | None:
    """A DICOM DA (``YYYYMMDD``) from what a sender wrote, or None when it is not a calendar date."""
    text = clean_text(value)
    if not text:
        return None
    legacy = _LEGACY_DATE.match(text)
    if legacy:
        text = "".join(legacy.groups())
    if len(text) != 8 or not text.isdigit():
        return None
    try:
        date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None
    return text


def fit_int32(value: object) -> int | None:
    """An integer that an INTEGER column holds, or None (an IS may carry twelve digits, a sign, a decimal)."""
    try:
        number = int(str(value).strip())
    except (TypeError, ValueError):
        try:
            number = int(float(str(value).strip()))
        except (TypeError, ValueError, OverflowError):
            return None
    return number if _INT32[0] <= number <= _INT32[1] else None


class Fitter:
    """Collects the changes made while fitting one object's values."""

    def __init__(self) -> None:
        self.changes: Changes = {}

    def _note(self, name: str, received: object, stored: object) -> None:
        received_text = str(received if received is not None else "")
        stored_text = str(stored if stored is not None else "")
        if received_text.strip() != stored_text:
            # What was received is kept (bounded, and without NULs, so the event itself can be written).
            self.changes[name] = {"received": received_text[:200].replace("\x00", "\\x00"), "stored": stored}

    def text(self, name: str, value: object, column: Column) -> str:
        fitted = fit_text(value, column_width(column))
        self._note(name, value, fitted)
        return fitted

    def date(self, name: str, value: object) -> str | None:
        fitted = fit_dicom_date(value)
        if clean_text(value):
            self._note(name, value, fitted)
        return fitted

    def int32(self, name: str, value: object) -> int | None:
        if value in (None, ""):
            return None
        fitted = fit_int32(value)
        if fitted is None or str(fitted) != str(value).strip():
            self._note(name, value, fitted)
        return fitted


def clean_json(value: Any) -> Any:
    """``value`` with every string in it free of NULs and control characters (an event's detail)."""
    if isinstance(value, str):
        return _CONTROL.sub("", value)
    if isinstance(value, Mapping):
        return {clean_json(str(key)): clean_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(item) for item in value]
    if isinstance(value, (int, float, bool)) or value is None:
        return value
    return _CONTROL.sub("", str(value))
