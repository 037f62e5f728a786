"""The worker's HTTP API (FastAPI). Feature routers live beside this module and are included here.

Every route but the health check, the landing page and the static pages requires a bearer token: a static token
(``api.tokens``: read from files or environment variables, never from the configuration itself, and shared by every
replica through the database, ``tokens.py``) or an OpenID Connect token from the hospital's identity provider
(``api.oidc``, ``oidc.py``). Pages a browser navigates to also accept the session cookie of ``session.py``. Each
principal has a role. Who sent a request is worked out once, by the audit middleware (``auth.py``); the routes use
that answer.
"""
from __future__ import annotations

import os

from fastapi import Depends, FastAPI, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.engine import Engine

from pacs_bridge.schema import make_engine
from worker.api.auth import SCOPE_KEY, Authentication, authenticate
from worker.api.oidc import verifier_from_settings
from worker.api.tokens import ROLES, Principal, TokenStore, read_configured_tokens
from worker.config import Settings, load_settings

__all__ = ["ROLES", "Principal", "create_app", "current_principal", "engine_of", "require_role"]

#: Modules under worker/api/ that expose a FastAPI ``router``; each feature adds its own.
FEATURE_ROUTERS: tuple[str, ...] = ("reports", "fairness", "worklist", "stow", "audit", "session", "landing")
_bearer = HTTPBearer(auto_error=False)


def authentication_of(request: Request) -> Authentication:
    """The middleware's answer for this request (computed here for a route outside its view)."""
    found: Authentication | None = request.scope.get(SCOPE_KEY)
    if found is None:
        found = authenticate(request.app, request.scope.get("headers", []), request.method)
    return found


def current_principal(request: Request,
                      _declared: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> Principal:
    """The principal the audit middleware found for this request (the same answer, never a second reading of the
    headers; ``_declared`` only puts the bearer scheme into the OpenAPI document)."""
    found = authentication_of(request)
    if found.via_session:  # the cookie opens pages only (session.page_role): JSON routes want the header
        found = Authentication(None)
    if found.principal is None:
        raise HTTPException(found.status, found.reason,
                            headers={"WWW-Authenticate": "Bearer"} if found.status == 401 else None)
    return found.principal


def require_role(*roles: str):
    def check(principal: Principal = Depends(current_principal)) -> Principal:
        if principal.role not in roles:
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"role {principal.role!r} may not do this")
        return principal

    return check


def engine_of(request: Request) -> Engine:
    return request.app.state.engine


def create_app(settings: Settings | None = None, config_path: str | os.PathLike[str] | None = None) -> FastAPI:
    """The application. ``config_path``: where ``POST /admin/tokens/reload`` reads the configuration again (so a
    user removed from it loses their token); without it, the reload reads the token files of ``settings``."""
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

    @app.get("/healthz", tags=["operations"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    for router in _feature_routers():
        app.include_router(router)
    from worker.api.audit import AuditMiddleware  # imports this module: after it is loaded

    # Outermost: every request is attributed, admin paths are guarded, and nothing is served unlogged.
    app.add_middleware(AuditMiddleware)
    return app


def _feature_routers():
    import importlib

    return [importlib.import_module(f"worker.api.{name}").router for name in FEATURE_ROUTERS]
