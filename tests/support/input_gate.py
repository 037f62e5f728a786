"""The series a complete brain MR study has, and the series the routing rules expect of one."""
from __future__ import annotations

FULL = ("AX T2 FLAIR", "AX DWI", "AX DWI ADC")


EXPECTED = ["(?i)flair", "(?i)dwi", "(?i)adc"]
