"""Patient identifiers never reach the logs or the metric labels, on the receiving path and the loading path."""
from __future__ import annotations

import logging

import pytest
from prometheus_client import REGISTRY

from models.volume import load_series
from tests.support.dicom_factory import write_mr_series
from tests.support.raw_dicom import RawStoreSCU, _encode, _storescu, make_receiver  # noqa: F401 (fixture)

pytestmark = pytest.mark.needs_dcmtk

NAME, PATIENT_ID = "SECRETNAME^PATIENT", "MRN-99887766"


def test_patient_name_and_id_appear_in_no_log_line_and_no_metric_label(make_receiver, tmp_path, caplog):
    import pydicom

    caplog.set_level(logging.DEBUG)
    scp, engine, root = make_receiver()
    files = write_mr_series(tmp_path / "send", n=3)
    for path in files:
        ds = pydicom.dcmread(path)
        ds.PatientName, ds.PatientID = NAME, PATIENT_ID
        ds.save_as(path, enforce_file_format=True)
    assert _storescu(scp.port, *files).returncode == 0
    bad = pydicom.dcmread(files[0])
    scu = RawStoreSCU(scp.port)
    try:  # a truncated copy: the rejection path logs too
        assert scu.send(_encode(bad)[:-300], sop_instance_uid=bad.SOPInstanceUID) >= 0xA000
    finally:
        scu.close()
    assert scp.bookkeeper.wait_idle()
    stored = sorted((root / "incoming").rglob("*.dcm"))
    assert len(stored) == 3
    volume = load_series(stored, in_plane_size=32)
    assert volume.array.shape[0] == 3

    logged = "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    assert logged  # the path did log
    for identifier in (NAME, "SECRETNAME", PATIENT_ID):
        assert identifier not in logged
    labels = {value for metric in REGISTRY.collect() for sample in metric.samples for value in sample.labels.values()}
    assert not any(NAME in v or PATIENT_ID in v or "SECRETNAME" in v for v in labels)
