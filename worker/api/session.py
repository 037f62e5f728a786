"""Browser sessions: one sign-in on the worklist also opens the server-rendered pages (the fairness report).

The worklist page keeps its bearer token in the tab's sessionStorage and sends it with every ``fetch``; a page the
browser navigates to (``/fairness``) cannot carry a header. So, after the login check, the page asks
``POST /session`` (with the bearer token) for a session cookie: ``HttpOnly`` (no script reads it),
``SameSite=Strict`` (no other site's page sends it), ``Secure`` over HTTPS, ``Path=/``, expiring after
``api.session_max_age_s``. The cookie never holds the token: it names the principal and an expiry, signed with
HMAC-SHA256 keyed by the hash of that principal's token in the shared token store (``tokens.py``), so it needs no
session store, survives a restart and works across API replicas, and dies with its token on every replica (rotated
or removed, then ``POST /admin/tokens/reload``). A principal of the identity provider (OIDC) has no static token,
so it cannot open a session.

The cookie is read with the Authorization header, once per request, by ``auth.authenticate``. Only routes that
declare :data:`PageReader`-style dependencies (:func:`page_role`) accept it, and only for GET and HEAD: the JSON
and changing routes still require the bearer header, so a cookie cannot be used to change anything (no cross-site
request forgery), and the token is never put in a URL.
"""
from __future__ import annotations

import time
from urllib.parse import quote

from fastapi import APIRouter, Depends, HTTPException, Request, Response, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from worker.api.auth import authorization_values
from worker.api.dependencies import authentication_of, current_principal
from worker.api.session_cookie import COOKIE, session_value
from worker.api.tokens import Principal

#: Where an unauthenticated browser is sent to sign in, with ``?next=`` the page it asked for.
LOGIN_PAGE = "/worklist/login"

router = APIRouter(prefix="/session", tags=["session"])
_bearer = HTTPBearer(auto_error=False)


def page_role(*roles: str):
    """A dependency for pages a browser navigates to: the bearer header, or on GET/HEAD the session cookie.

    A browser that has neither is sent to the sign-in page, which comes back here afterwards."""

    def check(request: Request, _declared: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> Principal:
        found = authentication_of(request)  # the middleware's one reading of header and cookie
        principal = found.principal
        if principal is None:
            if found.status == status.HTTP_401_UNAUTHORIZED and not authorization_values(request.scope["headers"]) \
                    and "text/html" in request.headers.get("accept", ""):
                raise HTTPException(status.HTTP_303_SEE_OTHER, "sign in first", headers={
                    "Location": f"{LOGIN_PAGE}?next={quote(request.url.path, safe='/')}"})
            raise HTTPException(found.status, found.reason if found.status != 401 else
                                "a bearer token or a session is required",
                                headers={"WWW-Authenticate": "Bearer"} if found.status == 401 else None)
        if principal.role not in roles:
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"role {principal.role!r} may not do this")
        return principal

    return check


@router.post("", summary="Open a browser session for the pages (send the bearer token; sets an HttpOnly cookie)")
def open_session(request: Request, response: Response,
                 principal: Principal = Depends(current_principal)) -> dict:
    max_age = int(request.app.state.settings.api.session_max_age_s)
    expires = int(time.time()) + max_age
    value = session_value(request.app.state.token_store, principal, expires)
    if value is None:
        raise HTTPException(status.HTTP_409_CONFLICT, "only a static API token can open a browser session; send "
                                                      "the identity provider's token as a bearer header")
    response.set_cookie(COOKIE, value, max_age=max_age,
                        path="/", httponly=True, samesite="strict", secure=request.url.scheme == "https")
    response.headers["Cache-Control"] = "no-store"
    return {"name": principal.name, "role": principal.role, "expires": expires}


@router.delete("", summary="Close the browser session (signing out)")
def close_session(request: Request, response: Response) -> dict:
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict",
                           secure=request.url.scheme == "https")
    return {"closed": True}
