"""Synthetic brain-MRI studies with planted lesions, written as multi-series DICOM (data.md §5).

Built on the MNI152 2009c template that nilearn ships: tissue fraction maps, per-tissue PD/T1/T2/ADC and the
spin-echo and inversion-recovery signal equations give T1, T2, FLAIR, DWI and ADC images; a simulated scanner
adds oblique slices, thick-slice averaging, coil bias and Rician noise, and writes MR Image Storage files a
PACS and dciodvfy accept. Everything is seeded: the same arguments give the same pixels and UIDs.

    from train.phantoms import write_phantom_study
    study = write_phantom_study(Path("var/phantoms"), "infarct", seed=3)
    study.truth.centre_ras_mm   # where the infarct was planted

Modules: ``anatomy`` (tissue maps), ``lesions`` (what is planted), ``contrast`` (tissue parameters, signal
equations), ``acquisition`` (protocols, geometry, sampling, noise), ``dicom`` (headers, files), ``study`` (one
study end to end), ``cli`` (``python -m train.phantoms``).
"""

from train.phantoms.acquisition import FAST_SERIES, SERIES
from train.phantoms.cli import main
from train.phantoms.lesions import LESION_LABELS, LESIONS, PhantomTruth
from train.phantoms.study import PhantomStudy, write_phantom_study

__all__ = [
    "FAST_SERIES",
    "LESIONS",
    "LESION_LABELS",
    "SERIES",
    "PhantomStudy",
    "PhantomTruth",
    "main",
    "write_phantom_study",
]
