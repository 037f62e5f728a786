"""The worker's HTTP API (FastAPI). Feature routers live beside this module and are included here.

Every route but the health check, the landing page and the static pages requires a bearer token: a static token
(``api.tokens``: read from files or environment variables, never from the configuration itself, and shared by every
replica through the database, ``tokens.py``) or an OpenID Connect token from the hospital's identity provider
(``api.oidc``, ``oidc.py``). Pages a browser navigates to also accept the session cookie of ``session.py``. Each
principal has a role. Who sent a request is worked out once, by the audit middleware (``auth.py``); the routes use
that answer.
"""
from __future__ import annotations

import importlib
import os

from fastapi import FastAPI

from sql.database import make_engine
from worker.api.audit import AuditMiddleware
from worker.api.fairness_analysis import FairnessAnalysis
from worker.api.oidc import verifier_from_settings
from worker.api.tokens import TokenStore, read_configured_tokens
from worker.config import Settings, load_settings

#: Modules under worker/api/ that expose a FastAPI ``router``; each feature adds its own.
FEATURE_ROUTERS: tuple[str, ...] = ("reports", "fairness", "worklist", "stow", "audit", "session", "landing")


def create_app(settings: Settings | None = None, config_path: str | os.PathLike[str] | None = None,
               fairness: FairnessAnalysis | None = None) -> FastAPI:
    """The application. ``config_path``: where ``POST /admin/tokens/reload`` reads the configuration again (so a
    user removed from it loses their token); without it, the reload reads the token files of ``settings``.
    ``fairness``: the fairness analysis behind ``/fairness`` (train's, given by the composition root,
    :func:`worker.commands.api.create_app`); without it those pages answer 503."""
    settings = settings or load_settings(config_path)
    app = FastAPI(title="triage-worker API", version="0.1.0",
                  description="Worklist, results and reports of the AI triage worker.")
    app.state.settings = settings
    app.state.engine = make_engine(settings.database_url)
    app.state.reload_settings = (lambda: load_settings(config_path)) if config_path else (lambda: settings)
    app.state.token_store = TokenStore(app.state.engine, float(settings.api.token_cache_s))
    # The configuration is the truth: this replica's start writes its tokens for all replicas (a wrong entry
    # stops the start, naming it).
    app.state.token_store.replace(read_configured_tokens(settings.api.tokens, strict=True))
    app.state.oidc = verifier_from_settings(settings.api)
    app.state.fairness = fairness

    @app.get("/healthz", tags=["operations"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    for router in _feature_routers():
        app.include_router(router)
    # Outermost: every request is attributed, admin paths are guarded, and nothing is served unlogged.
    app.add_middleware(AuditMiddleware)
    return app


def _feature_routers():
    return [importlib.import_module(f"worker.api.{name}").router for name in FEATURE_ROUTERS]
