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

import hmac
import json
import logging
import re
from collections.abc import Iterable
from datetime import datetime
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from sqlalchemy import insert, select

from pacs_bridge.audit_schema import audit_log, audit_studies
from pacs_bridge.schema import utcnow
from worker.api.app import Principal, load_tokens, require_role
from worker.api.session import READ_METHODS, cookie_of, session_principal

log = logging.getLogger(__name__)

#: Paths nobody but an administrator may use, whatever the route itself checks: configuration, the audit log, and
#: changes to models (promotion, rollback). Radiologists may read the model list.
ADMIN_ONLY_PREFIXES = ("/admin",)
ADMIN_ONLY_CHANGE_PREFIXES = ("/models",)
#: Not audited: liveness, metrics and the static page assets carry no study data.
UNAUDITED = re.compile(r"^/(healthz|readyz|metrics|favicon\.ico|docs|redoc|openapi\.json|static/)")
#: Responses larger than this are passed through unscanned (their access is still logged, without study UIDs).
MAX_SCANNED_BODY = 8 * 1024 * 1024
_UID_KEYS = ("study_instance_uid", "StudyInstanceUID", "study_uid")
_UID_TEXT = re.compile(r"^[0-9.]{1,64}$")


def principal_of(app, authorization: str | None):
    """The principal a bearer token names, or None (the same lookup as ``current_principal``)."""
    if not authorization or not authorization.lower().startswith("bearer "):
        return None
    offered = authorization[7:].strip().encode()
    for secret, principal in app.state.tokens.items():
        if hmac.compare_digest(secret.encode(), offered):
            return principal
    return None


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
    """Pure ASGI middleware (no BaseHTTPMiddleware: it must see the whole response before sending it)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or UNAUDITED.match(scope["path"]):
            await self.app(scope, receive, send)
            return
        application = scope["app"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        method, path = scope["method"], scope["path"]
        principal = principal_of(application, headers.get("authorization"))
        if principal is None and method in READ_METHODS:  # a page opened with the browser session's cookie
            principal = session_principal(application.state.tokens, cookie_of(headers.get("cookie")))
        if _admin_only(method, path) and (principal is None or principal.role != "admin"):
            code = status.HTTP_401_UNAUTHORIZED if principal is None else status.HTTP_403_FORBIDDEN
            await self._write(application, scope, principal, code, set())
            await _send_json(send, code, {"detail": "administrators only" if principal else
                                          "a bearer token is required"})
            return

        start: dict[str, Any] = {}
        chunks: list[bytes] = []
        size = 0
        passthrough = False

        async def capture(message) -> None:
            nonlocal size, passthrough
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
                if not await self._write(application, scope, principal, start["status"], set()):
                    raise RuntimeError("audit log unavailable")
                await send(start)
                await send({"type": "http.response.body", "body": b"".join(chunks), "more_body": True})
                return
            if more:
                return
            body = b"".join(chunks)
            uids = _path_study_uids(scope) | _body_study_uids(start, body)
            if await self._write(application, scope, principal, start["status"], uids):
                await send(start)
                await send({"type": "http.response.body", "body": body})
            else:
                await _send_json(send, status.HTTP_503_SERVICE_UNAVAILABLE,
                                 {"detail": "the audit log cannot be written; no data is served without it"})

        await self.app(scope, receive, capture)

    async def _write(self, application, scope, principal, code: int, uids: Iterable[str]) -> bool:
        client = scope.get("client")
        row = {
            "at": utcnow(), "principal": principal.name if principal else None,
            "role": principal.role if principal else None, "method": scope["method"], "path": scope["path"][:2000],
            "status_code": int(code), "client": f"{client[0]}" if client else None,
            "action": "denied" if code in (401, 403) else ("read" if scope["method"] in ("GET", "HEAD") else "change"),
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


async def _send_json(send, code: int, payload: dict) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if code == status.HTTP_401_UNAUTHORIZED:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# --- redaction -------------------------------------------------------------------------------------------------

_SECRET_KEY = re.compile(r"(password|passwd|secret|token|api_key|credential)", re.IGNORECASE)
#: Keys that name where a secret is (a file, a variable), not the secret itself.
_SECRET_REFERENCE = re.compile(r"_(file|env)$", re.IGNORECASE)
_URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<password>[^@/\s]+)@")


def redact(value: Any, key: str = "") -> Any:
    """A copy of a configuration value with secrets replaced by "***": keys that name a secret, and passwords
    inside URLs (``postgresql://user:***@host/db``). Paths to secret files stay visible: they are not secrets."""
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, key) for v in value]
    if isinstance(value, str):
        if value and _SECRET_KEY.search(key) and not _SECRET_REFERENCE.search(key):
            return "***"
        return _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:***@", value)
    return value


# --- administrators' routes ------------------------------------------------------------------------------------

router = APIRouter(prefix="/admin", tags=["administration"])
Admin = Annotated[Principal, Depends(require_role("admin"))]


@router.get("/config", summary="The effective configuration, secrets redacted")
def admin_config(request: Request, principal: Admin) -> dict:
    return redact(request.app.state.settings.raw)


@router.post("/tokens/reload", summary="Read the token files and variables again (rotate keys, no restart)")
def admin_reload_tokens(request: Request, principal: Admin) -> dict:
    try:
        tokens = load_tokens(request.app.state.settings)
    except (OSError, ValueError) as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY,
                            f"tokens not reloaded, the old ones stay valid: {exc}") from exc
    request.app.state.tokens = tokens
    return {"tokens": len(tokens), "principals": sorted({p.name for p in tokens.values()})}


@router.get("/audit", summary="Audit log entries, newest first")
def admin_audit(request: Request, principal: Admin,
                study_instance_uid: Annotated[str | None, Query(max_length=64)] = None,
                who: Annotated[str | None, Query(max_length=128)] = None,
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
