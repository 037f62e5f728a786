"""The worker's HTTP API (FastAPI). Feature routers live beside this module and are included here.

Every route but the health check, the landing page and the static pages requires a bearer token (pages a browser
navigates to also accept the session cookie of ``session.py``). Tokens come from files or environment variables named
in the configuration (``api.tokens``), never from the configuration itself; each token has a role.
"""
from __future__ import annotations

import hmac
import os
from dataclasses import dataclass
from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.engine import Engine

from pacs_bridge.schema import make_engine
from worker.config import Settings, load_settings

#: radiologist: read; sender: store images (STOW-RS); admin: everything.
ROLES = ("radiologist", "sender", "admin")
#: Modules under worker/api/ that expose a FastAPI ``router``; each feature adds its own.
FEATURE_ROUTERS: tuple[str, ...] = ("reports", "fairness", "worklist", "stow", "audit", "session", "landing")
_bearer = HTTPBearer(auto_error=False)


@dataclass(frozen=True)
class Principal:
    name: str
    role: str


def load_tokens(settings: Settings) -> dict[str, Principal]:
    tokens: dict[str, Principal] = {}
    for entry in settings["api"]["tokens"]:
        if entry.get("role") not in ROLES:
            raise ValueError(f"api.tokens entry {entry.get('name')!r}: role must be one of {ROLES}")
        if "token_file" in entry:
            secret = Path(entry["token_file"]).read_text().strip()
        elif "token_env" in entry:
            secret = os.environ.get(entry["token_env"], "").strip()
        else:
            raise ValueError(f"api.tokens entry {entry.get('name')!r} needs token_file or token_env")
        if not secret:
            raise ValueError(f"api.tokens entry {entry.get('name')!r}: the token is empty")
        tokens[secret] = Principal(entry.get("name", "unnamed"), entry["role"])
    return tokens


def current_principal(request: Request,
                      credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> Principal:
    if credentials is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "a bearer token is required",
                            headers={"WWW-Authenticate": "Bearer"})
    for secret, principal in request.app.state.tokens.items():
        if hmac.compare_digest(secret.encode(), credentials.credentials.encode()):
            return principal
    raise HTTPException(status.HTTP_401_UNAUTHORIZED, "unknown token", headers={"WWW-Authenticate": "Bearer"})


def require_role(*roles: str):
    def check(principal: Principal = Depends(current_principal)) -> Principal:
        if principal.role not in roles:
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"role {principal.role!r} may not do this")
        return principal

    return check


def engine_of(request: Request) -> Engine:
    return request.app.state.engine


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or load_settings()
    app = FastAPI(title="triage-worker API", version="0.1.0",
                  description="Worklist, results and reports of the AI triage worker.")
    app.state.settings = settings
    app.state.engine = make_engine(settings.database_url)
    app.state.tokens = load_tokens(settings)

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
