"""Readiness of a worker's model: a worker is ready only when it has a model it can serve.

Ready when the model is loaded, or when the bundle that would serve (the registry's promoted version, else the
configured ``model.bundle``) verifies: manifest, sha256 of every file, every tensor's name and shape
(:func:`models.bundle.map_bundle`, which reads no weights into memory). A bundle that verified is remembered by its
files' sizes and times, so a probe every few seconds does not hash gigabytes each time; one verification runs at
a time, and probes that arrive meanwhile answer "not ready" at once instead of queueing behind it.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from sqlalchemy.engine import Engine

from sql.model_registry import serving_version
from worker.config import Settings


class ModelNotReady(Exception):
    """No servable model; the message says why and what to do (shown in ``/readyz``: paths, no secrets)."""

    public_reason = True


def _stamp(folder: Path) -> tuple:
    return tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file()))


class ModelReadiness:
    """The ``model`` check of a worker's ``/readyz`` (see :class:`worker.metrics.HealthServer`)."""

    def __init__(self, settings: Settings, engine: Engine, loaded_version: Callable[[], str | None]) -> None:
        self.settings = settings
        self.engine = engine
        self.loaded_version = loaded_version
        self._verified: set[tuple] = set()
        self._lock = threading.Lock()

    def serving_folder(self) -> Path:
        """The bundle the worker would load now (the same choice as ``NeuroMriPipeline.predictor``)."""
        serving = serving_version(self.engine)
        if serving is not None:
            return Path(serving.bundle_path)
        configured = self.settings.model.bundle
        if not configured:
            raise ModelNotReady("no model: none is promoted in the registry and model.bundle is not set; "
                                "install one with `triage models install`")
        return Path(configured)

    def __call__(self) -> bool:
        if self.loaded_version() is not None:
            return True
        # torch: only a worker that checks a model imports it (the API's readiness never does).
        from models.bundle import BundleError, map_bundle

        folder = self.serving_folder()
        if not folder.is_dir():
            raise ModelNotReady(f"model bundle {folder} does not exist")
        key = (str(folder), _stamp(folder))
        if key in self._verified:
            return True
        if not self._lock.acquire(blocking=False):
            raise ModelNotReady(f"model bundle {folder} is being verified")
        try:
            map_bundle(folder)
            self._verified.add(key)
        except BundleError as error:
            raise ModelNotReady(str(error)) from None
        finally:
            self._lock.release()
        return True
