"""Sensitive attributes of a study, reduced to the groups the fairness analysis compares.

Each attribute comes from the DICOM header or the HL7 message where present: sex (DICOM PatientSex, HL7 PID-8),
age band (PatientAge, else the birth date at the examination), ethnic group (EthnicGroup, PID-22 then PID-10),
region and population-density quartile (the postcode, PID-11.5, looked up in a configurable table), scheduling
(weekday, weekend or holiday, from the examination date), scanner manufacturer and model (Manufacturer,
ManufacturerModelName) and insurance class (PV1-20 financial class, else IN1-15 plan type).

Identifiers never leave this module: the birth date and the postcode are used to find the group and dropped.
A value that is missing or cannot be interpreted is the group ``unknown``, analysed like any other.
"""
from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import insert, or_, select, update
from sqlalchemy.engine import Connection

from sql.report_schema import ATTRIBUTES, UNKNOWN, study_attributes
from sql.schema import utcnow

#: The example postcode table shipped with the package (UK-style outward codes, invented regions).
DEFAULT_POSTCODE_TABLE = Path(__file__).resolve().parent / "data" / "postcode_regions.csv"

_SEX = {"F": "F", "FEMALE": "F", "M": "M", "MALE": "M", "O": "O", "OTHER": "O", "A": "O", "N": "O", "X": "O"}


@dataclass(frozen=True)
class PostcodeTable:
    """Postcode prefix -> (region, density quartile); the longest matching prefix wins."""

    entries: Mapping[str, tuple[str, str]]

    @classmethod
    def load(cls, path: str | Path) -> PostcodeTable:
        """Read a CSV with columns ``postcode_prefix,region,density_quartile``."""
        entries: dict[str, tuple[str, str]] = {}
        with Path(path).open(newline="") as handle:
            reader = csv.DictReader(handle)
            missing = {"postcode_prefix", "region", "density_quartile"} - set(reader.fieldnames or ())
            if missing:
                raise ValueError(f"postcode table {path}: missing columns {sorted(missing)}")
            for line, row in enumerate(reader, start=2):
                prefix = _normalise_postcode(row["postcode_prefix"])
                if not prefix:
                    raise ValueError(f"postcode table {path} line {line}: empty postcode_prefix")
                entries[prefix] = (row["region"].strip() or UNKNOWN, row["density_quartile"].strip() or UNKNOWN)
        return cls(entries)

    def lookup(self, postcode: str | None) -> tuple[str, str]:
        code = _normalise_postcode(postcode or "")
        for length in range(len(code), 0, -1):
            if code[:length] in self.entries:
                return self.entries[code[:length]]
        return UNKNOWN, UNKNOWN


def _normalise_postcode(text: str) -> str:
    return re.sub(r"[^A-Z0-9]", "", text.upper())


@dataclass(frozen=True)
class AttributePolicy:
    """How raw values become groups: the age bands, the holiday calendar, the local time zone, the postcodes."""

    #: Lower edges (years) of the age bands after the first: (18, 40, 65, 80) gives 0-17, 18-39, ..., 80+.
    age_band_edges: tuple[int, ...] = (18, 40, 65, 80)
    holidays: frozenset[date] = frozenset()
    timezone: str = "UTC"
    postcodes: PostcodeTable | None = None

    @classmethod
    def from_settings(cls, fairness: Mapping[str, Any]) -> AttributePolicy:
        """From the ``fairness`` section of the configuration."""
        table_path = fairness.get("postcode_table") or DEFAULT_POSTCODE_TABLE
        return cls(
            age_band_edges=tuple(int(edge) for edge in fairness.get("age_band_edges", (18, 40, 65, 80))),
            holidays=frozenset(date.fromisoformat(str(day)) for day in fairness.get("holidays", ())),
            timezone=str(fairness.get("timezone", "UTC")),
            postcodes=PostcodeTable.load(table_path),
        )

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def age_band(self, years: float | None) -> str:
        if years is None or years < 0 or years > 150:
            return UNKNOWN
        edges = sorted(self.age_band_edges)
        lower = 0
        for edge in edges:
            if years < edge:
                return f"{lower}-{edge - 1}"
            lower = edge
        return f"{lower}+"

    def scheduling(self, exam_at: datetime | None) -> str:
        """weekday | weekend | holiday, on the local calendar of the examination."""
        if exam_at is None:
            return UNKNOWN
        local = exam_at.astimezone(self.zone).date()
        if local in self.holidays:
            return "holiday"
        return "weekend" if local.weekday() >= 5 else "weekday"

    def local_to_utc(self, value: datetime) -> datetime:
        """A naive local time (DICOM, HL7 without offset) as an aware UTC time."""
        if value.tzinfo is None:
            value = value.replace(tzinfo=self.zone)
        return value.astimezone(UTC)


@dataclass
class StudyAttributes:
    """One study's groups; ``sources`` says where each known value came from (dicom, hl7, http, ...).

    ``sources`` may also hold bookkeeping entries that are not attribute names, such as ``dicom_header``.
    """

    study_instance_uid: str | None = None
    accession_number: str | None = None
    exam_at: datetime | None = None
    values: dict[str, str] = field(default_factory=lambda: {name: UNKNOWN for name in ATTRIBUTES})
    sources: dict[str, str] = field(default_factory=dict)

    def set(self, name: str, value: str | None, source: str) -> None:
        if name not in ATTRIBUTES:
            raise KeyError(f"unknown sensitive attribute {name!r}; known: {ATTRIBUTES}")
        text = (value or "").strip()
        if text and text != UNKNOWN:
            self.values[name] = text[:64]
            self.sources[name] = source


def normalise_sex(value: str | None) -> str:
    return _SEX.get((value or "").strip().upper(), UNKNOWN)


def dicom_age_years(value: str | None) -> float | None:
    """DICOM AS ('064Y', '006M', '010W', '003D') in years; None if absent or malformed."""
    match = re.fullmatch(r"\s*(\d{1,3})([DWMY])\s*", value or "")
    if not match:
        return None
    number, unit = int(match.group(1)), match.group(2)
    return number / {"D": 365.25, "W": 52.18, "M": 12.0, "Y": 1.0}[unit]


def age_at(birth: date, on: date) -> int:
    return on.year - birth.year - ((on.month, on.day) < (birth.month, birth.day))


def _clean_group(value: Any) -> str:
    text = re.sub(r"\s+", " ", str(value or "")).strip()
    return text.lower() if text else UNKNOWN


def attributes_from_dicom(dataset: Any, policy: AttributePolicy) -> StudyAttributes:
    """The attributes a DICOM header carries (any instance of the study; pixel data is not needed)."""
    attrs = StudyAttributes(study_instance_uid=str(dataset.get("StudyInstanceUID", "") or "") or None,
                            accession_number=str(dataset.get("AccessionNumber", "") or "") or None)
    attrs.exam_at = _dicom_datetime(str(dataset.get("StudyDate", "") or ""), str(dataset.get("StudyTime", "") or ""),
                                    policy)
    attrs.set("sex", normalise_sex(str(dataset.get("PatientSex", "") or "")), "dicom")
    years = dicom_age_years(str(dataset.get("PatientAge", "") or ""))
    if years is None and attrs.exam_at is not None:
        birth = _parse_date(str(dataset.get("PatientBirthDate", "") or ""))
        if birth is not None:
            years = age_at(birth, attrs.exam_at.astimezone(policy.zone).date())
    attrs.set("age_band", policy.age_band(years), "dicom")
    attrs.set("ethnic_group", _clean_group(dataset.get("EthnicGroup", "")), "dicom")
    attrs.set("scheduling", policy.scheduling(attrs.exam_at), "dicom")
    attrs.set("scanner_manufacturer", str(dataset.get("Manufacturer", "") or "").strip(), "dicom")
    attrs.set("scanner_model", str(dataset.get("ManufacturerModelName", "") or "").strip(), "dicom")
    return attrs


def attributes_from_hl7(fields: Mapping[str, str], policy: AttributePolicy, exam_at: datetime | None,
                        source: str = "hl7") -> StudyAttributes:
    """The attributes in an HL7 message's PID/PV1/IN1 fields, given as a mapping such as {"PID-8": "F"}."""
    attrs = StudyAttributes(exam_at=exam_at)
    attrs.set("sex", normalise_sex(fields.get("PID-8")), source)
    birth = _parse_date(fields.get("PID-7", "")[:8])
    if birth is not None and exam_at is not None:
        attrs.set("age_band", policy.age_band(age_at(birth, exam_at.astimezone(policy.zone).date())), source)
    attrs.set("ethnic_group", _clean_group(fields.get("PID-22") or fields.get("PID-10")), source)
    if policy.postcodes is not None and fields.get("PID-11.5"):
        region, density = policy.postcodes.lookup(fields["PID-11.5"])
        attrs.set("region", region, source)
        attrs.set("density_quartile", density, source)
    attrs.set("scheduling", policy.scheduling(exam_at), source)
    attrs.set("insurance_class", _clean_group(fields.get("PV1-20") or fields.get("IN1-15")), source)
    return attrs


def _parse_date(text: str) -> date | None:
    try:
        return datetime.strptime(text.strip(), "%Y%m%d").date()
    except ValueError:
        return None


def _dicom_datetime(study_date: str, study_time: str, policy: AttributePolicy) -> datetime | None:
    day = _parse_date(study_date)
    if day is None:
        return None
    match = re.match(r"(\d{2})(\d{2})?(\d{2})?", study_time.strip())
    clock = time(int(match.group(1)), int(match.group(2) or 0), int(match.group(3) or 0)) if match else time(0)
    return policy.local_to_utc(datetime.combine(day, clock))


def save_attributes(connection: Connection, attrs: StudyAttributes) -> int | None:
    """Merge ``attrs`` into the study's row (found by study UID, else accession number); returns the row's id.

    A known value fills an unknown one; a known value is replaced only by a newer value from the same source, so a
    later HL7 message corrects an earlier one but does not overwrite what the DICOM header said, and vice versa.
    """
    if not attrs.study_instance_uid and not attrs.accession_number:
        return None
    row = _find_row(connection, attrs.study_instance_uid, attrs.accession_number)
    now = utcnow()
    if row is None:
        result = connection.execute(insert(study_attributes).values(
            study_instance_uid=attrs.study_instance_uid, accession_number=attrs.accession_number,
            exam_at=attrs.exam_at, sources=dict(attrs.sources), updated_at=now, **attrs.values))
        return int(result.inserted_primary_key[0])
    sources = dict(row.sources or {})
    changes: dict[str, Any] = {}
    for name in ATTRIBUTES:
        new = attrs.values[name]
        if new == UNKNOWN:
            continue
        if getattr(row, name) in (None, UNKNOWN) or sources.get(name) == attrs.sources.get(name):
            if getattr(row, name) != new:
                changes[name] = new
            sources[name] = attrs.sources[name]
    # Bookkeeping entries beside the attribute names (e.g. "dicom_header": "read") are kept as given.
    sources.update({key: value for key, value in attrs.sources.items() if key not in ATTRIBUTES})
    if attrs.study_instance_uid and not row.study_instance_uid:
        changes["study_instance_uid"] = attrs.study_instance_uid
    if attrs.accession_number and not row.accession_number:
        changes["accession_number"] = attrs.accession_number
    if attrs.exam_at is not None and row.exam_at is None:
        changes["exam_at"] = attrs.exam_at
    if changes or sources != (row.sources or {}):
        connection.execute(update(study_attributes).where(study_attributes.c.id == row.id)
                           .values(**changes, sources=sources, updated_at=now))
    return int(row.id)


def _find_row(connection: Connection, study_uid: str | None, accession: str | None):
    if study_uid:
        row = connection.execute(select(study_attributes)
                                 .where(study_attributes.c.study_instance_uid == study_uid)).first()
        if row is not None:
            return row
    if accession:
        # A row known only by accession number (the report came before the images) is the same study.
        return connection.execute(
            select(study_attributes)
            .where(study_attributes.c.accession_number == accession,
                   or_(study_attributes.c.study_instance_uid.is_(None),
                       study_attributes.c.study_instance_uid == study_uid if study_uid else False))
            .order_by(study_attributes.c.id).limit(1)).first()
    return None


def attribute_rows(connection: Connection, study_uids: Iterable[str]) -> dict[str, dict[str, str]]:
    """The stored groups of the given studies (every attribute present, ``unknown`` where not known)."""
    uids = list(study_uids)
    found = {row.study_instance_uid: {name: getattr(row, name) for name in ATTRIBUTES}
             for row in connection.execute(select(study_attributes)
                                           .where(study_attributes.c.study_instance_uid.in_(uids)))}
    return {uid: found.get(uid, {name: UNKNOWN for name in ATTRIBUTES}) for uid in uids}
