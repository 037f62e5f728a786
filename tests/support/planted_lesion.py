"""A stand-in model that "finds" the lesion a phantom study was made with, and a run processor that uses it:
for tests of routing and forwarding, where the model's accuracy is not the point."""
from __future__ import annotations

from types import SimpleNamespace

from worker.pipelines.neuro_mri import NeuroMriPipeline


class PlantedLesionModel:
    """Stands in for the model: the priority and diagnoses a perfect reader of the phantom would give."""

    def __init__(self, lesion_by_series: dict[str, str]) -> None:
        from models.labels import DIAGNOSIS_NAMES, PRIORITY_CLASSES, REFERRALS

        self.lesion_by_series = lesion_by_series
        self.labels, self.classes, self.referrals = DIAGNOSIS_NAMES, PRIORITY_CLASSES, REFERRALS

    def predict_batch(self, studies):
        return [self.predict(volumes) for volumes in studies]

    def explain(self, volumes, labels, **_):
        return {}  # no image regions: what is tested is where the images go

    def predict(self, volumes):
        lesion = self.lesion_by_series[volumes[0].series_instance_uid]
        bleed = lesion == "subdural_haemorrhage"
        diagnosis = {label: (0.93 if bleed and "subdural" in label else 0.02) for label in self.labels}
        priority = {c: (0.9 if c == ("high" if bleed else "none") else 0.05) for c in self.classes}
        return SimpleNamespace(
            diagnosis_probs=diagnosis, thresholds=dict.fromkeys(self.labels, 0.5), priority_probs=priority,
            referral_probs={r: (0.8 if bleed and r == "neurosurgery" else 0.1) for r in self.referrals},
            timings_s={"total": 0.0},
        )


class PlantedLesionProcessor(NeuroMriPipeline):
    """The worker's run processor with :class:`PlantedLesionModel` serving."""

    planted: PlantedLesionModel

    def predictor(self, refresh: bool = True):
        self._bundle = SimpleNamespace(manifest={"family": "prima"}, version="planted-lesion")
        return self.planted
