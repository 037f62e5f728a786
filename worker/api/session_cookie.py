"""The session cookie's value: the principal's name and role, an expiry, and an HMAC under the principal's static
token (so that revoking the token ends its sessions). Read by the authentication (``auth.py``) and written by
the session routes (``session.py``).
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import time

from worker.api.tokens import Principal, TokenStore

COOKIE = "triage_session"
_VERSION = "v1"
#: Methods for which a page route accepts the cookie instead of the bearer header: reading only.
READ_METHODS = ("GET", "HEAD")


def _mac(secret: str, name: str, role: str, expires: int) -> str:
    message = f"triage-session-{_VERSION}\n{name}\n{role}\n{expires}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _unb64(text: str) -> str:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()


def session_value(store: TokenStore, principal: Principal, expires: int) -> str | None:
    """The cookie's value for ``principal`` until ``expires`` (Unix seconds), or None if it has no static token."""
    keys = store.signing_keys(principal)
    if not keys:
        return None
    return ".".join((_VERSION, _b64(principal.name), principal.role, str(expires),
                     _mac(keys[0], principal.name, principal.role, expires)))


def session_principal(store: TokenStore, value: str | None, now: float | None = None) -> Principal | None:
    """The principal a session cookie names, or None when it is malformed, expired, or its token is gone.
    Blocking (a database lookup)."""
    if not value:
        return None
    try:
        version, name_b64, role, expires_text, mac = value.split(".")
        name, expires = _unb64(name_b64), int(expires_text)
    except ValueError:  # wrong number of parts, bad base64 or UTF-8, not a number
        return None
    if version != _VERSION or expires < (time.time() if now is None else now):
        return None
    principal = Principal(name, role)
    for key in store.signing_keys(principal):
        if hmac.compare_digest(_mac(key, name, role, expires), mac):
            return principal
    return None


def cookie_of(cookie_header: str | None) -> str | None:
    """Our cookie's value from a raw ``Cookie`` header (for the ASGI middleware, which has no Request)."""
    for part in (cookie_header or "").split(";"):
        key, _, value = part.strip().partition("=")
        if key == COOKIE:
            return value
    return None
