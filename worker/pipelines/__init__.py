"""The pipelines a run can be routed to, one module each, all recording through the run book
(:mod:`worker.run_book`): ``neuro_mri`` (:mod:`worker.pipelines.neuro_mri`, the Prima study encoder) and
``slice_knn`` (:mod:`worker.pipelines.slice_knn`, the findings of similar prior studies). The Celery task
(:mod:`worker.tasks`) picks the one named by the run's ``pipeline``.
"""
from __future__ import annotations

from worker.pipelines.neuro_mri import NeuroMriPipeline
from worker.pipelines.slice_knn import SliceKnnPipeline

#: Pipeline name (routing rules, ``processing_runs.pipeline``) -> the class that processes its runs.
PIPELINES: dict[str, type[NeuroMriPipeline] | type[SliceKnnPipeline]] = {
    "neuro_mri": NeuroMriPipeline,
    "slice_knn": SliceKnnPipeline,
}
