"""Gathering what routing rules look at: the tags of a study's image series and how each series arrived.

At completion the bookkeeping database knows every instance (modality, SOP class, path) and how each series
arrived (calling/called AE title, peer address, source); the other tags a rule may test are read from one header
per series, on disk, without pixel data and only for the keywords the rules use. Series-level attributes are the
same in every instance of a series, so one header is enough; a header is read once per series and cached while
the study assembles. The rule tester (``triage rules test``) builds the same facts from files.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from sqlalchemy import func, select
from sqlalchemy.engine import Connection

from pacs_bridge.routing import NON_IMAGE_MODALITIES, SR_SOP_CLASS_PREFIX, is_derived_object
from pacs_bridge.rules import SeriesFacts, StudyFacts, dataset_values, series_facts_from_dataset
from sql.schema import instances, series, studies

log = logging.getLogger(__name__)

#: Study attributes the bookkeeping keeps, usable when a series header cannot be read.
_KEPT_IN_DATABASE = {"Modality": "modality", "SeriesDescription": "series_description"}


def _is_image_series(modality: str, sop_class_uids: Iterable[str]) -> bool:
    return modality not in NON_IMAGE_MODALITIES and any(
        not is_derived_object(modality, uid) for uid in sop_class_uids
    )


class HeaderCache:
    """Tag values read from one header per series, kept while studies assemble (series attributes are fixed)."""

    def __init__(self, keywords: Iterable[str], limit: int = 20000) -> None:
        self.keywords = sorted(set(keywords) | {"Modality", "SeriesDescription", "SeriesInstanceUID"})
        self.limit = limit
        self._values: dict[int, dict[str, tuple[str, ...]]] = {}

    def values(self, series_id: int, path: str) -> dict[str, tuple[str, ...]]:
        if series_id not in self._values:
            if len(self._values) >= self.limit:
                self._values.clear()
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=self.keywords)
            self._values[series_id] = {k: dataset_values(ds, k) for k in self.keywords}
        return self._values[series_id]


def study_facts_from_database(connection: Connection, study_id: int, headers: HeaderCache) -> StudyFacts:
    """The facts of a study in the bookkeeping database, with one header per image series read from disk."""
    study_uid = connection.execute(
        select(studies.c.study_instance_uid).where(studies.c.id == study_id)).scalar_one()
    series_rows = connection.execute(
        select(series).where(series.c.study_id == study_id).order_by(series.c.series_number, series.c.id)
    ).all()
    classes: dict[int, dict[str, str]] = defaultdict(dict)
    for row in connection.execute(
        select(instances.c.series_id, instances.c.sop_class_uid, func.min(instances.c.path).label("path"))
        .where(instances.c.series_id.in_([s.id for s in series_rows]))
        .group_by(instances.c.series_id, instances.c.sop_class_uid)
    ):
        classes[row.series_id][row.sop_class_uid] = row.path

    image_series, notes = [], []
    all_modalities, all_classes = set(), set()
    for s in series_rows:
        modality = s.modality or ""
        if modality:
            all_modalities.add(modality)
        all_classes.update(classes[s.id])
        if not classes[s.id] or not _is_image_series(modality, classes[s.id]):
            continue
        path = next(p for uid, p in sorted(classes[s.id].items()) if not uid.startswith(SR_SOP_CLASS_PREFIX))
        try:
            attributes = dict(headers.values(s.id, path))
        except (OSError, InvalidDicomError, ValueError) as exc:
            # The file went (retention, an operator); route on what the database kept rather than not at all.
            notes.append(f"header of series {s.series_instance_uid} not readable ({exc}); "
                         f"only {', '.join(_KEPT_IN_DATABASE)} known")
            attributes = {k: ((getattr(s, column) or ""),) for k, column in _KEPT_IN_DATABASE.items()}
        for name in ("calling_aet", "called_aet", "peer_address", "source"):
            value = getattr(s, name, None)
            attributes[name] = (value,) if value else ()
        image_series.append(SeriesFacts(s.series_instance_uid, attributes, s.instance_count))
    return StudyFacts(study_uid, tuple(image_series), frozenset(all_modalities), frozenset(all_classes),
                      tuple(notes))


def study_facts_from_files(paths: Iterable[Path], keywords: Iterable[str],
                           association: Mapping[str, str | None] | None = None) -> tuple[dict[str, StudyFacts],
                                                                                         list[str]]:
    """Facts of the studies in ``paths`` (files, or folders searched recursively), as if received with
    ``association``; returns them by StudyInstanceUID, and the files that were not DICOM with the reason."""
    keywords = set(keywords) | {"Modality", "SeriesDescription"}
    association = dict(association or {})
    association.setdefault("source", "c-store")
    headers: dict[str, dict[str, list[pydicom.Dataset]]] = defaultdict(lambda: defaultdict(list))
    skipped = []
    for path in _expand(paths):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            study_uid, series_uid = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
        except (OSError, InvalidDicomError, AttributeError, ValueError) as exc:
            skipped.append(f"{path}: not a DICOM instance ({type(exc).__name__}: {exc})")
            continue
        headers[study_uid][series_uid].append(ds)

    found = {}
    for study_uid, by_series in headers.items():
        image_series = []
        modalities, classes = set(), set()
        for datasets in by_series.values():
            first = datasets[0]
            modality = str(first.get("Modality", "") or "")
            series_classes = {str(ds.get("SOPClassUID", "")) for ds in datasets}
            if modality:
                modalities.add(modality)
            classes.update(series_classes)
            if _is_image_series(modality, series_classes):
                image_series.append(series_facts_from_dataset(first, keywords, association, len(datasets)))
        found[study_uid] = StudyFacts(study_uid, tuple(image_series), frozenset(modalities), frozenset(classes))
    return found, skipped


def _expand(paths: Iterable[Path]) -> list[Path]:
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        else:
            files.append(path)
    return files
