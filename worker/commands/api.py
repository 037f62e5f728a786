"""The HTTP API as ``triage api`` serves it: :func:`worker.api.app.create_app` with train's fairness analysis."""
from __future__ import annotations

import os

from fastapi import FastAPI

from worker.api import app as api_app
from worker.commands.fairness import TrainFairness
from worker.config import Settings, load_settings


def create_app(settings: Settings | None = None, config_path: str | os.PathLike[str] | None = None) -> FastAPI:
    """The API, its fairness pages backed by :class:`worker.commands.fairness.TrainFairness`."""
    settings = settings or load_settings(config_path)
    return api_app.create_app(settings, config_path, fairness=TrainFairness(settings))
