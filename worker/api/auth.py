"""Who sent a request: the one place that reads the ``Authorization`` header.

The audit middleware calls :func:`authenticate` once per request, before the application reads a byte of the body,
and keeps the answer in the ASGI scope; the routes' dependency (``current_principal``) reads that same answer. So
the principal the audit log names is the one the route served, whatever the request carries: a request with more
than one ``Authorization`` header is refused outright (a proxy and the server might otherwise each pick another).

A bearer token is either a static token (``api.tokens``, looked up in the shared token store) or, where
``api.oidc`` is configured, a JWT from the identity provider. A GET or HEAD without an ``Authorization`` header may
carry the browser session's cookie instead (``session.py``); such an answer is marked ``via_session``, and only the
pages that say so accept it (``session.page_role``), never the JSON routes (``current_principal``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from worker.api.oidc import OidcError, looks_like_jwt
from worker.api.session_cookie import READ_METHODS, cookie_of, session_principal
from worker.api.tokens import Principal

log = logging.getLogger(__name__)

#: Where the middleware leaves its answer in the ASGI scope for the routes.
SCOPE_KEY = "triage.authentication"


@dataclass(frozen=True)
class Authentication:
    """A principal, or why there is none: ``status`` 401 (no or unknown token) or 400 (ambiguous request)."""

    principal: Principal | None
    status: int = 401
    reason: str = "a bearer token is required"
    via_session: bool = False


def authorization_values(raw_headers: list[tuple[bytes, bytes]]) -> list[str]:
    return [value.decode("latin-1") for name, value in raw_headers if name.lower() == b"authorization"]


def authenticate(app, raw_headers: list[tuple[bytes, bytes]], method: str = "GET") -> Authentication:
    """The request's principal from its headers. Blocking (a database lookup, perhaps a JWKS fetch)."""
    values = authorization_values(raw_headers)
    if not values:
        cookies = [value.decode("latin-1") for name, value in raw_headers if name.lower() == b"cookie"]
        if method in READ_METHODS and cookies:
            principal = session_principal(app.state.token_store, cookie_of("; ".join(cookies)))
            if principal is not None:
                return Authentication(principal, via_session=True)
        return Authentication(None)
    if len(values) > 1:
        return Authentication(None, 400, "more than one Authorization header")
    scheme, _, credentials = values[0].strip().partition(" ")
    credentials = credentials.strip()
    if scheme.lower() != "bearer" or not credentials:
        return Authentication(None, 401, "the Authorization header must be 'Bearer <token>'")
    principal = app.state.token_store.principal(credentials)
    if principal is not None:
        return Authentication(principal)
    verifier = app.state.oidc
    if verifier is not None and looks_like_jwt(credentials):
        try:
            return Authentication(verifier.principal(credentials))
        except OidcError as exc:
            log.info("OIDC token refused: %s", exc)
            return Authentication(None, 401, "the token is not accepted")
    return Authentication(None, 401, "unknown token")
