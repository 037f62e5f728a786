"""The routes' FastAPI dependencies: who sent the request (the audit middleware's answer), whether their role may
do it, and the database.
"""
from __future__ import annotations

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.engine import Engine

from worker.api.auth import SCOPE_KEY, Authentication, authenticate
from worker.api.tokens import Principal

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
