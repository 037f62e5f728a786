"""The API's audit log and its administrators' routes.

:class:`AuditMiddleware` wraps every HTTP request: it works out who sent it (the bearer token's principal),
refuses administrative paths to anyone but an administrator, lets the request run, and writes one ``audit_log``
row with one ``audit_studies`` row for every study whose data the response carried (any ``study_instance_uid``
in a JSON body, or a ``{study_uid}`` path parameter). It sits outside the routers on purpose: a route added later
is audited without doing anything, and cannot forget the administrator check.

The log fails closed: a response is only sent once its audit row is written; if the database refuses the row,
the client gets 503 instead of data nobody will know they saw.

Administrators' routes (``/admin``): the effective configuration with secrets redacted, reloading the token
files (key rotation without a restart), and reading the audit log.
"""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from datetime import datetime
from typing import Annotated, Any
from urllib.parse import urlsplit, urlunsplit

import anyio
from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from sqlalchemy import insert, select

from sql.audit_schema import audit_log, audit_studies
from sql.schema import utcnow
from worker.api.auth import SCOPE_KEY, Authentication, authenticate
from worker.api.dependencies import require_role
from worker.api.tokens import Principal, read_configured_tokens

log = logging.getLogger(__name__)

#: Paths nobody but an administrator may use, whatever the route itself checks: configuration, the audit log, and
#: changes to models (promotion, rollback). Radiologists may read the model list.
ADMIN_ONLY_PREFIXES = ("/admin",)
ADMIN_ONLY_CHANGE_PREFIXES = ("/models",)
#: Not audited: liveness, metrics and the static page assets carry no study data.
UNAUDITED = re.compile(r"^/(healthz|readyz|metrics|favicon\.ico|docs|redoc|openapi\.json|static/)")
#: Responses larger than this are passed through unscanned (their access is still logged, without study UIDs).
MAX_SCANNED_BODY = 8 * 1024 * 1024
#: STOW-RS bodies are whole studies: limited per instance (scp.max_object_bytes) by the route, not in total here.
UNLIMITED_BODY_PREFIX = "/dicom-web/"
#: The status recorded when the client went away before any response (nginx's convention).
CLIENT_CLOSED_REQUEST = 499
_UID_KEYS = ("study_instance_uid", "StudyInstanceUID", "study_uid")
_UID_TEXT = re.compile(r"^[0-9.]{1,64}$")


def study_uids_in(document: Any, found: set[str] | None = None) -> set[str]:
    """Every Study Instance UID named in a decoded JSON document, at any depth."""
    found = set() if found is None else found
    if isinstance(document, dict):
        for key, value in document.items():
            if key in _UID_KEYS and isinstance(value, str) and _UID_TEXT.match(value):
                found.add(value)
            else:
                study_uids_in(value, found)
    elif isinstance(document, list):
        for value in document:
            study_uids_in(value, found)
    return found


class AuditMiddleware:
    """Pure ASGI middleware (no BaseHTTPMiddleware: it must see the whole response before sending it).

    Before the application runs it works out who sent the request (``auth.py``: once, for the routes as well) and
    refuses what needs no reading: an ambiguous ``Authorization``, an administrative path without an
    administrator, a body from an anonymous client, a body announced larger than ``api.max_body_bytes``. The body
    the application does read is counted and timed as it streams in (``guarded_receive``). Every outcome is
    audited, an exception (500) included."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or UNAUDITED.match(scope["path"]):
            await self.app(scope, receive, send)
            return
        application = scope["app"]
        raw_headers = scope.get("headers", [])
        method, path = scope["method"], scope["path"]
        try:
            found = await anyio.to_thread.run_sync(authenticate, application, raw_headers, method)
        except Exception as exc:  # the token store (database) cannot be read: nobody can be recognised
            log.error("authentication failed for %s %s: %s", method, path, type(exc).__name__)
            await _send_json(send, status.HTTP_503_SERVICE_UNAVAILABLE,
                             {"detail": "tokens cannot be checked now; try again"})
            return
        scope[SCOPE_KEY] = found
        principal = found.principal
        refusal = _refusal(application, method, path, raw_headers, found)
        if refusal is not None:
            code, detail = refusal
            await self._write(application, scope, principal, code, set(), action="denied")
            await _send_json(send, code, {"detail": detail}, close=_has_body(raw_headers))
            return

        start: dict[str, Any] = {}
        chunks: list[bytes] = []
        size = 0
        passthrough = False
        written = False

        async def capture(message) -> None:
            nonlocal size, passthrough, written
            if message["type"] == "http.response.start":
                start.update(message)
                return
            if message["type"] != "http.response.body":
                await send(message)
                return
            if passthrough:
                await send(message)
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            streaming = _content_type(start).startswith("text/event-stream")
            if more and (size > MAX_SCANNED_BODY or streaming):
                # A stream or a large file: log the access now (without scanning) and stream the rest through.
                passthrough = True
                written = True
                if not await self._write(application, scope, principal, start["status"], set()):
                    raise RuntimeError("audit log unavailable")
                await send(start)
                await send({"type": "http.response.body", "body": b"".join(chunks), "more_body": True})
                return
            if more:
                return
            body = b"".join(chunks)
            uids = _path_study_uids(scope) | _body_study_uids(start, body)
            written = True
            if await self._write(application, scope, principal, start["status"], uids):
                await send(start)
                await send({"type": "http.response.body", "body": body})
            else:
                await _send_json(send, status.HTTP_503_SERVICE_UNAVAILABLE,
                                 {"detail": "the audit log cannot be written; no data is served without it"})

        limits = application.state.settings.api
        body_limit = 0 if path.startswith(UNLIMITED_BODY_PREFIX) else int(limits.max_body_bytes)
        guarded = guarded_receive(receive, body_limit, float(limits.body_timeout_s))
        try:
            await self.app(scope, guarded, capture)
        except Exception:
            # The request ends in a 500 (or is cancelled): it is still an access, with whatever it touched.
            if not written:
                await self._write(application, scope, principal, status.HTTP_500_INTERNAL_SERVER_ERROR,
                                  _path_study_uids(scope))
            raise
        if not written:  # the application sent no response (the client went away first)
            await self._write(application, scope, principal, CLIENT_CLOSED_REQUEST, _path_study_uids(scope))

    async def _write(self, application, scope, principal, code: int, uids: Iterable[str],
                     action: str | None = None) -> bool:
        client = scope.get("client")
        row = {
            "at": utcnow(), "principal": principal.name if principal else None,
            "role": principal.role if principal else None, "method": scope["method"], "path": scope["path"][:2000],
            "status_code": int(code), "client": f"{client[0]}" if client else None,
            "action": action or ("denied" if code in (401, 403) else
                                 ("read" if scope["method"] in ("GET", "HEAD") else "change")),
        }
        uids = sorted(set(uids))

        def insert_rows() -> None:
            with application.state.engine.begin() as connection:
                audit_id = connection.execute(insert(audit_log).values(**row)).inserted_primary_key[0]
                if uids:
                    connection.execute(insert(audit_studies),
                                       [{"audit_id": audit_id, "study_instance_uid": uid} for uid in uids])

        try:
            await anyio.to_thread.run_sync(insert_rows)
            return True
        except Exception as exc:  # the database is down or not migrated: refuse to serve rather than not log
            log.error("audit log write failed for %s %s: %s", row["method"], row["path"], type(exc).__name__)
            return False


def _has_body(raw_headers) -> bool:
    for name, value in raw_headers:
        name = name.lower()
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() not in (b"0", b"")):
            return True
    return False


def _content_length(raw_headers) -> int | None:
    for name, value in raw_headers:
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _refusal(application, method: str, path: str, raw_headers, found: Authentication) -> tuple[int, str] | None:
    """A status and reason for a request refused before the application sees it, or None."""
    principal = found.principal
    if found.status == status.HTTP_400_BAD_REQUEST:
        return found.status, found.reason
    if _admin_only(method, path) and (principal is None or principal.role != "admin"):
        return ((status.HTTP_401_UNAUTHORIZED, found.reason) if principal is None else
                (status.HTTP_403_FORBIDDEN, "administrators only"))
    if principal is None and _has_body(raw_headers):
        # No route takes a body from an anonymous client: refuse before reading (or parsing) a byte of it.
        return status.HTTP_401_UNAUTHORIZED, found.reason
    limit = 0 if path.startswith(UNLIMITED_BODY_PREFIX) else int(application.state.settings.api.max_body_bytes)
    length = _content_length(raw_headers)
    if limit and length is not None and length > limit:
        return status.HTTP_413_REQUEST_ENTITY_TOO_LARGE, f"the body is larger than {limit} bytes (api.max_body_bytes)"
    return None


def guarded_receive(receive, limit: int, timeout_s: float):
    """``receive`` that refuses a body over ``limit`` bytes (0: no limit) and one that pauses longer than
    ``timeout_s`` while it streams in: 413 or 408, and the connection is closed (the rest is never read)."""
    received = 0
    done = False

    async def guarded():
        nonlocal received, done
        if done:  # after the body: waiting for a disconnect may take as long as the response does
            return await receive()
        try:
            with anyio.fail_after(timeout_s):
                message = await receive()
        except TimeoutError:
            raise HTTPException(status.HTTP_408_REQUEST_TIMEOUT,
                                f"the request body paused for more than {timeout_s:g} s (api.body_timeout_s)",
                                headers={"Connection": "close"}) from None
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            done = not message.get("more_body", False)
            if limit and received > limit:
                raise HTTPException(status.HTTP_413_REQUEST_ENTITY_TOO_LARGE,
                                    f"the body is larger than {limit} bytes (api.max_body_bytes)",
                                    headers={"Connection": "close"})
        else:
            done = True
        return message

    return guarded


def _admin_only(method: str, path: str) -> bool:
    if any(path == p or path.startswith(p + "/") for p in ADMIN_ONLY_PREFIXES):
        return True
    return method not in ("GET", "HEAD") and any(path == p or path.startswith(p + "/")
                                                  for p in ADMIN_ONLY_CHANGE_PREFIXES)


def _content_type(start: dict) -> str:
    for key, value in start.get("headers", []):
        if key.lower() == b"content-type":
            return value.decode("latin-1").lower()
    return ""


def _path_study_uids(scope) -> set[str]:
    params = scope.get("path_params") or {}
    return {str(v) for k, v in params.items() if "study" in k and _UID_TEXT.match(str(v))}


def _body_study_uids(start: dict, body: bytes) -> set[str]:
    if not body or "json" not in _content_type(start):
        return set()
    try:
        return study_uids_in(json.loads(body))
    except ValueError:
        return set()


async def _send_json(send, code: int, payload: dict, close: bool = False) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:  # a body we will not read follows the request: the connection cannot be reused
        headers.append((b"connection", b"close"))
    if code == status.HTTP_401_UNAUTHORIZED:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# --- redaction -------------------------------------------------------------------------------------------------

_SECRET_KEY = re.compile(r"(password|passwd|secret|token|api_key|credential)", re.IGNORECASE)
#: Keys that name where a secret is (a file, a variable), not the secret itself.
_SECRET_REFERENCE = re.compile(r"_(file|env)$", re.IGNORECASE)
_URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)
#: Query parameters that carry credentials (?access_token=, ?sig=, ?api-key=, ?code=, ...).
_SECRET_PARAMETER = re.compile(r"(token|secret|passw|pwd|key|sig|auth|code|credential|session)", re.IGNORECASE)
#: A path segment or value that looks generated rather than named: long, letters and digits mixed (a webhook's
#: key in its path, a GUID); UIDs (digits and dots) and ordinary words are not.
_GENERATED = re.compile(r"^(?=[^/]*[A-Za-z])(?=[^/]*[0-9])[A-Za-z0-9_~%+=.-]{16,}$")
_MASK = "***"


def redact_url(url: str, whole_path: bool = False) -> str:
    """``url`` without what would let a reader use it: the password, secret-looking query values and path
    segments, the fragment; ``whole_path``: everything after the host (a webhook URL is its own secret)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:  # not a URL after all: hide it whole rather than guess
        return _MASK
    netloc = host if ":" not in host else f"[{host}]"
    if port is not None:
        netloc += f":{port}"
    if parts.username is not None or parts.password is not None:
        user = parts.username or ""
        netloc = (f"{user}:{_MASK}@" if parts.password is not None else f"{user}@") + netloc
    if whole_path:
        path = "/" + _MASK if parts.path.strip("/") else parts.path
    else:
        path = "/".join(_MASK if _GENERATED.match(segment) else segment for segment in parts.path.split("/"))
    query = "&".join(
        f"{name}={_MASK}" if value and (_SECRET_PARAMETER.search(name) or _GENERATED.match(value)) else
        (f"{name}={value}" if sep else name)
        for name, sep, value in (item.partition("=") for item in parts.query.split("&") if item))
    fragment = _MASK if parts.fragment else ""
    if (netloc, path, query, fragment) == (parts.netloc, parts.path, parts.query, parts.fragment):
        return url  # nothing secret: as written (urlunsplit would not give back every scheme's form unchanged)
    return urlunsplit((parts.scheme, netloc, path, query, fragment))


def redact(value: Any, key: str = "", whole_url: bool = False) -> Any:
    """A copy of a configuration value with secrets replaced by "***": keys that name a secret, and in URLs the
    password, credentials in the query, key-like path segments and, for webhooks, the whole path. Paths to secret
    files stay visible: they are not secrets."""
    if isinstance(value, dict):
        webhook = str(value.get("kind", "")).lower() == "webhook"
        return {k: redact(v, str(k), webhook) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, key) for v in value]
    if isinstance(value, str):
        if value and _SECRET_KEY.search(key) and not _SECRET_REFERENCE.search(key):
            return _MASK
        if _URL.match(value.strip()):
            return redact_url(value.strip(), whole_path=whole_url)
        return value
    return value


# --- administrators' routes ------------------------------------------------------------------------------------

router = APIRouter(prefix="/admin", tags=["administration"])
#: 422 under its current name (Starlette renamed it; older versions only have the old one).
UNPROCESSABLE = getattr(status, "HTTP_422_UNPROCESSABLE_CONTENT", 422)
Admin = Annotated[Principal, Depends(require_role("admin"))]


@router.get("/config", summary="The effective configuration, secrets redacted")
def admin_config(request: Request, principal: Admin) -> dict:
    return redact(request.app.state.settings.model_dump(mode="json"))


@router.post("/tokens/reload", summary="Read the configuration and token files again (rotate or revoke keys, "
                                     "no restart; every replica follows)")
def admin_reload_tokens(request: Request, principal: Admin) -> dict:
    """The token set becomes what the configuration names now, for every replica: new tokens are accepted, and a
    token whose entry is gone, or whose file or variable is empty or unreadable, is revoked (listed in
    ``problems``). A configuration file that cannot be read changes nothing (422)."""
    try:
        settings = request.app.state.reload_settings()
    except (OSError, ValueError, KeyError) as exc:
        raise HTTPException(UNPROCESSABLE, f"the configuration cannot be read; tokens unchanged: {exc}") from exc
    return request.app.state.token_store.replace(read_configured_tokens(settings.api.tokens, strict=False))


@router.get("/audit", summary="Audit log entries, newest first")
def admin_audit(request: Request, principal: Admin,
                study_instance_uid: Annotated[str | None, Query(max_length=64, pattern=r"^[0-9.]+$")] = None,
                who: Annotated[str | None, Query(max_length=128, pattern=r"^[^\x00]*$")] = None,
                limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[dict]:
    query = select(audit_log).order_by(audit_log.c.id.desc()).limit(limit)
    if study_instance_uid:
        query = query.where(audit_log.c.id.in_(select(audit_studies.c.audit_id).where(
            audit_studies.c.study_instance_uid == study_instance_uid)))
    if who:
        query = query.where(audit_log.c.principal == who)
    with request.app.state.engine.connect() as connection:
        rows = connection.execute(query).mappings().all()
        ids = [row["id"] for row in rows]
        studies: dict[int, list[str]] = {}
        if ids:
            for audit_id, uid in connection.execute(select(audit_studies.c.audit_id, audit_studies.c.study_instance_uid)
                                                    .where(audit_studies.c.audit_id.in_(ids))):
                studies.setdefault(audit_id, []).append(uid)
    return [{**{k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in row.items()},
             "studies": sorted(studies.get(row["id"], []))} for row in rows]
