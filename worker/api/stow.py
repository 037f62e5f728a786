"""STOW-RS: storing DICOM instances over HTTP (PS3.18 §10.5), the second way in beside C-STORE.

``POST /dicom-web/studies`` and ``POST /dicom-web/studies/{study}`` take ``multipart/related;
type="application/dicom"``, one instance per part. Each part goes through exactly what a C-STORE does
(:func:`pacs_bridge.ingest.ingest`: the same checks, store, quarantine and batched bookkeeping), so the study is
completed, routed and processed like one sent by C-STORE (the assembler in ``triage serve`` finds it in the
database). The API process runs its own bookkeeper, started and stopped with the application.

The response is the Store Instances Response Module (PS3.18 Table 10.5.3-1) as ``application/dicom+json``: a
ReferencedSOPSequence item per stored instance and a FailedSOPSequence item, with its FailureReason, per refused
one. 200 when every instance was stored, 202 when some were, 409 when none was; 415 for any other content type.
Parts are read one at a time as the request streams in, so a large study never has to fit in memory.
"""
from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from email.message import Message
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, status
from fastapi.responses import JSONResponse
from pydicom.dataset import Dataset
from starlette.concurrency import run_in_threadpool

from pacs_bridge.bookkeeping import Bookkeeper
from pacs_bridge.ingest import IngestOutcome, as_file_format, ingest
from pacs_bridge.intake import STATUS_CANNOT_UNDERSTAND
from pacs_bridge.storage import InstanceStore, InvalidUID, validate_uid
from worker.api.app import Principal, require_role

log = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"
#: A single part larger than this is refused (413) rather than held in memory.
MAX_PART_BYTES = 2 * 1024 ** 3


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The API's own store handle and bookkeeper, for as long as the application serves."""
    settings = app.state.settings
    app.state.stow_store = InstanceStore(settings.incoming_dir, settings.quarantine_dir,
                                         fsync=bool(settings["store"]["fsync"]))
    bookkeeper = Bookkeeper(app.state.engine, quarantine_file=app.state.stow_store.quarantine_file)
    bookkeeper.start()
    app.state.stow_bookkeeper = bookkeeper
    try:
        yield
    finally:
        bookkeeper.stop()  # writes what it holds before the process goes
        app.state.stow_bookkeeper = None


router = APIRouter(prefix="/dicom-web", tags=["dicomweb"], lifespan=lifespan)
#: Modalities and PACSs store with a sender token; administrators may too.
Sender = Annotated[Principal, Depends(require_role("sender", "admin"))]


@dataclass(frozen=True)
class Part:
    headers: Message
    body: bytes


class MultipartError(ValueError):
    """A request body that is not the multipart/related message its Content-Type announces."""


def _boundary_and_type(content_type: str) -> tuple[str, str]:
    message = Message()
    message["content-type"] = content_type
    if message.get_content_type() != "multipart/related":
        raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
                            f'expected multipart/related; type="application/dicom", not {content_type or "nothing"}')
    part_type = (message.get_param("type") or "").lower()
    if part_type and part_type != "application/dicom":
        raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
                            f"only application/dicom parts are accepted (metadata and bulk data are not), "
                            f"not type={part_type}")
    boundary = message.get_param("boundary")
    if not boundary:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "the multipart/related Content-Type has no boundary")
    return str(boundary), part_type


async def iter_parts(chunks: AsyncIterator[bytes], boundary: str, max_part_bytes: int = MAX_PART_BYTES
                     ) -> AsyncIterator[Part]:
    """The parts of a multipart body (RFC 2046 §5.1) as the chunks arrive, holding at most one part."""
    delimiter = b"--" + boundary.encode("latin-1")
    buffer = bytearray()
    state = "preamble"
    scanned = 0
    headers: Message | None = None
    async for chunk in chunks:
        buffer += chunk
        while True:
            if state == "preamble":
                at = buffer.find(delimiter)
                if at < 0:
                    del buffer[:max(0, len(buffer) - len(delimiter))]
                    break
                del buffer[:at + len(delimiter)]
                state = "after-delimiter"
            if state == "after-delimiter":
                if len(buffer) < 2:
                    break
                if buffer.startswith(b"--"):
                    return  # the close delimiter; an epilogue, if any, is ignored
                end = buffer.find(b"\r\n")
                if end < 0:
                    break
                del buffer[:end + 2]  # transport padding and the line break
                state = "headers"
            if state == "headers":
                if buffer.startswith(b"\r\n"):
                    end, skip = 0, 2
                else:
                    end, skip = buffer.find(b"\r\n\r\n"), 4
                    if end < 0:
                        if len(buffer) > 65536:
                            raise MultipartError("a part's headers are longer than 64 KiB")
                        break
                headers = Message()
                for line in bytes(buffer[:end]).decode("latin-1").split("\r\n"):
                    if ":" in line:
                        name, value = line.split(":", 1)
                        headers[name.strip()] = value.strip()
                del buffer[:end + skip]
                state, scanned = "body", 0
            if state == "body":
                at = buffer.find(b"\r\n" + delimiter, scanned)
                if at < 0:
                    if len(buffer) > max_part_bytes:
                        raise HTTPException(status.HTTP_413_REQUEST_ENTITY_TOO_LARGE,
                                            f"a part is larger than {max_part_bytes} bytes")
                    scanned = max(0, len(buffer) - len(delimiter) - 2)
                    break
                yield Part(headers, bytes(buffer[:at]))
                del buffer[:at + 2 + len(delimiter)]
                state = "after-delimiter"
    if state != "after-delimiter" or buffer:
        raise MultipartError("the body ended before the multipart close delimiter")


def store_response(outcomes: list[IngestOutcome]) -> Dataset:
    """The Store Instances Response Module: referenced (stored) and failed instances."""
    response = Dataset()
    response.ReferencedSOPSequence = []
    response.FailedSOPSequence = []
    for outcome in outcomes:
        item = Dataset()
        item.ReferencedSOPClassUID = outcome.sop_class_uid
        item.ReferencedSOPInstanceUID = outcome.sop_instance_uid
        if outcome.accepted:
            response.ReferencedSOPSequence.append(item)
        else:
            item.FailureReason = outcome.status
            response.FailedSOPSequence.append(item)
    return response


@router.post("/studies", summary="Store instances (STOW-RS)", response_class=JSONResponse)
async def store_instances(request: Request, principal: Sender) -> JSONResponse:
    return await _store(request, principal, None)


@router.post("/studies/{study}", summary="Store instances of one study (STOW-RS)", response_class=JSONResponse)
async def store_study_instances(study: str, request: Request, principal: Sender) -> JSONResponse:
    try:
        study = validate_uid(study, "StudyInstanceUID")
    except InvalidUID as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(exc)) from exc
    return await _store(request, principal, study)


async def _store(request: Request, principal: Principal, study: str | None) -> JSONResponse:
    accept = request.headers.get("accept", "")
    if accept and not any(t in accept for t in (DICOM_JSON, "application/json", "*/*", "application/*")):
        raise HTTPException(status.HTTP_406_NOT_ACCEPTABLE, f"responses are {DICOM_JSON} only")
    boundary, _ = _boundary_and_type(request.headers.get("content-type", ""))
    store = getattr(request.app.state, "stow_store", None)
    bookkeeper = getattr(request.app.state, "stow_bookkeeper", None)
    if store is None or bookkeeper is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "STOW-RS is not started (application lifespan)")
    peer = request.client.host if request.client else None
    outcomes: list[IngestOutcome] = []
    try:
        async for part in iter_parts(request.stream(), boundary):
            part_type = (part.headers.get_content_type() if part.headers.get("content-type") else
                         "application/dicom")
            if part_type != "application/dicom":
                outcomes.append(IngestOutcome(STATUS_CANNOT_UNDERSTAND, "", "",
                                              f"part of type {part_type} is not application/dicom"))
                continue
            outcome = await run_in_threadpool(
                ingest, as_file_format(part.body), store, bookkeeper, source="stow-rs", peer_address=peer,
                expected_study_uid=study, context={"principal": principal.name},
            )
            outcomes.append(outcome)
    except MultipartError as exc:
        if not outcomes:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, f"malformed multipart/related body: {exc}") from exc
        log.warning("STOW-RS from %s: %s after %d parts", principal.name, exc, len(outcomes))
    if not outcomes:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "the request holds no instances")
    stored = sum(o.accepted for o in outcomes)
    log.info("STOW-RS from %s (%s): %d stored, %d refused", principal.name, peer, stored, len(outcomes) - stored)
    code = status.HTTP_200_OK if stored == len(outcomes) else (
        status.HTTP_202_ACCEPTED if stored else status.HTTP_409_CONFLICT)
    return JSONResponse(store_response(outcomes).to_json_dict(), status_code=code, media_type=DICOM_JSON)
