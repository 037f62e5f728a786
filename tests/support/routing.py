"""Routing rules and destinations that the routing tests share, and the files of an MR, CR, CT and SR study.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

#: A site's rules: brain MR to the study encoder, urgent; chest radiographs to the slice pipeline; CT not yet, but
#: archived for research; anything else from the research scanner forwarded too. The catch-all at the end would
#: match an SR if loop prevention let it.
RULES = [
    {"name": "brain-mr", "pipeline": "neuro_mri", "lane": "urgent",
     "match": {"all": [{"tag": "Modality", "equals": "MR"},
                       {"tag": "BodyPartExamined", "regex": "(?i)^(brain|head)$"}]},
     "expected_series": ["(?i)flair", "(?i)dwi"]},
    {"name": "chest-radiograph", "pipeline": "slice_knn",
     "match": {"all": [{"tag": "Modality", "equals": ["CR", "DX"]},
                       {"any": [{"tag": "BodyPartExamined", "equals": "CHEST"},
                                {"tag": "StudyDescription", "regex": "(?i)thorax|chest"}]}]}},
    {"name": "ct-not-yet", "pipeline": "ignore",
     "match": {"all": [{"tag": "Modality", "equals": "CT"}, {"tag": "SliceThickness", "range": [0.5, 10]}]},
     "forward": [{"to": ["research"], "stage": "before"}]},
    {"name": "anything-with-a-manufacturer", "pipeline": "slice_knn",
     "match": {"tag": "Manufacturer", "present": True}, "forward": [{"to": ["research"]}]},
]


DESTINATIONS = [{"name": "research", "kind": "dicom", "host": "127.0.0.1", "port": 1, "ae_title": "NOWHERE",
                 "results": False}]


def _test_files() -> dict[str, Path]:
    cr = get_testdata_file("RG1_UNCR.dcm", download=False)
    if cr is None:
        pytest.skip("pydicom-data (chest CR RG1_UNCR.dcm) is not installed")
    return {"ct": Path(get_testdata_file("CT_small.dcm", download=False)), "cr": Path(cr)}
