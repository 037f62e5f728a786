"""A brain MR study's headers for building SRs, and the outside validators an SR must pass (dciodvfy, dsrdump,
PixelMed); each skips the test when its tool is not installed."""
from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

DEVICE_UID = "1.2.826.0.1.3680043.8.498.1"


#: A site key for pseudonymous references to similar studies (worker.slice_evidence.study_reference_key).
SITE_KEY = b"0123456789abcdef0123456789abcdef"


PIXELMED_JAR = Path("/usr/share/java/pixelmed.jar")


# Debian's wrapper fails on Java 17 (XPath operator limits): dicom-results.md §4.
PIXELMED_COMMAND = [
    "java", "-Djdk.xml.xpathExprOpLimit=0", "-Djdk.xml.xpathExprGrpLimit=0", "-Djdk.xml.xpathTotalOpLimit=0",
    "-cp", str(PIXELMED_JAR), "com.pixelmed.validate.DicomSRValidator",
]


def mr_study(series: int = 2, slices: int = 150, *, patient_id: str = "PAT-0042") -> list[pydicom.Dataset]:
    """Headers of a brain MR study under one order: ``series`` x ``slices`` instances (300 by default)."""
    template = pydicom.dcmread(get_testdata_file("MR_small.dcm", download=False), stop_before_pixels=True)
    template.PatientName, template.PatientID, template.IssuerOfPatientID = "Doe^Jane", patient_id, "HOSP"
    template.PatientBirthDate, template.PatientSex = "19610317", "F"
    template.StudyInstanceUID, template.StudyID = generate_uid(), "S7731"
    template.StudyDate, template.StudyTime = "20260114", "081522"
    template.StudyDescription = "MRI BRAIN WO AND W CONTRAST"
    template.BodyPartExamined = "BRAIN"
    template.AccessionNumber, template.ReferringPhysicianName = "ACC20260114-17", "Neuro^Referrer"
    template.Manufacturer, template.InstitutionName = "ACME Medical", "General Hospital"
    template.FrameOfReferenceUID = generate_uid()
    request = pydicom.Dataset()
    request.AccessionNumber, request.RequestedProcedureID = template.AccessionNumber, "RP-5521"
    request.ScheduledProcedureStepID = "SPS-5521-1"
    request.RequestedProcedureDescription = "MRI brain w/wo contrast"
    template.RequestAttributesSequence = [request]
    headers = []
    for s, description in enumerate(("AX T2 FLAIR", "AX T1 POST", "AX DWI", "SAG T1")[:series]):
        series_uid = generate_uid()
        for i in range(slices):
            ds = copy.deepcopy(template)
            ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = series_uid, s + 2, description
            ds.SOPInstanceUID, ds.InstanceNumber = generate_uid(), i + 1
            ds.ImagePositionPatient = [-120.0, -120.0, -60.0 + 4.0 * i]
            headers.append(ds)
    return headers


def dciodvfy_errors(path: Path) -> list[str]:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def dsrdump(path: Path) -> subprocess.CompletedProcess:
    if shutil.which("dsrdump") is None:
        pytest.skip("dsrdump (dcmtk) is not installed")
    return subprocess.run(["dsrdump", "-v", "-Ip", str(path)], capture_output=True, text=True, check=False,
                          timeout=60)


def pixelmed_report(path: Path) -> str:
    if shutil.which("java") is None or not PIXELMED_JAR.exists():
        pytest.skip("PixelMed DicomSRValidator is not available (java, pixelmed.jar)")
    run = subprocess.run([*PIXELMED_COMMAND, str(path)], capture_output=True, text=True, check=False,
                         timeout=300)
    return run.stdout + run.stderr
