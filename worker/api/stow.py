"""STOW-RS: storing DICOM instances over HTTP (PS3.18 §10.5), the second way in beside C-STORE.

``POST /dicom-web/studies`` and ``POST /dicom-web/studies/{study}`` take ``multipart/related;
type="application/dicom"``, one instance per part. Each part goes through exactly what a C-STORE does
(:func:`pacs_bridge.ingest.ingest`: the same checks, store, quarantine and batched bookkeeping), so the study is
completed, routed and processed like one sent by C-STORE (the assembler in ``triage serve`` finds it in the
database). The API process runs its own bookkeeper, started and stopped with the application.

The response is the Store Instances Response Module (PS3.18 Table 10.5.3-1) as ``application/dicom+json``: a
ReferencedSOPSequence item per stored instance and a FailedSOPSequence item, with its FailureReason, per refused
one. 200 when every instance was stored, 202 when some were, 409 when none was; 415 for any other content type.
Parts are read one at a time as the request streams in, so a large study never has to fit in memory, and a part
larger than ``scp.max_object_bytes`` is refused as it streams, without being kept (FailureReason A700, Out of
Resources, as C-STORE answers it); the other parts are stored.
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
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser
from starlette.concurrency import run_in_threadpool

from pacs_bridge.bookkeeping import Bookkeeper
from pacs_bridge.ingest import IngestOutcome, as_file_format, ingest
from pacs_bridge.intake import STATUS_CANNOT_UNDERSTAND, STATUS_OUT_OF_RESOURCES
from pacs_bridge.storage import InstanceStore, InvalidUID, validate_uid
from worker.api.dependencies import require_role
from worker.api.tokens import Principal

log = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"
#: A part larger than this is refused (Out of Resources, like C-STORE) while it streams in, never held in memory;
#: ``scp.max_object_bytes`` sets it, this is the bound where that is 0 (no limit).
MAX_PART_BYTES = 2 * 1024 ** 3


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The API's own store handle and bookkeeper, for as long as the application serves."""
    settings = app.state.settings
    app.state.stow_store = InstanceStore(settings.incoming_dir, settings.quarantine_dir,
                                         fsync=bool(settings.store.fsync))
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
    """One part: its headers, and its body (None when it was larger than the limit: not kept, only counted)."""

    headers: Message
    body: bytearray | None
    size: int


class MultipartError(ValueError):
    """A request body that is not the multipart/related message its Content-Type announces."""


class _PartCollector:
    """python-multipart's callbacks, collecting finished parts; a part's body is kept only up to the limit."""

    def __init__(self, max_part_bytes: int) -> None:
        self.max_part_bytes = max_part_bytes
        self.ready: list[Part] = []
        self.ended = False
        self._field = bytearray()
        self._value = bytearray()
        self._headers = Message()
        self._body: bytearray | None = bytearray()
        self._size = 0

    def callbacks(self) -> dict:
        return {"on_part_begin": self._begin, "on_header_field": self._header_field,
                "on_header_value": self._header_value, "on_header_end": self._header_end,
                "on_part_data": self._data, "on_part_end": self._part_end, "on_end": self._end}

    def _begin(self) -> None:
        self._headers, self._body, self._size = Message(), bytearray(), 0

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._field.decode("latin-1").strip()] = self._value.decode("latin-1").strip()
        self._field, self._value = bytearray(), bytearray()

    def _data(self, data: bytes, start: int, end: int) -> None:
        self._size += end - start
        if self._body is None:
            return
        if self._size > self.max_part_bytes:
            self._body = None  # refused: the rest streams past without being kept
            return
        self._body += memoryview(data)[start:end]

    def _part_end(self) -> None:
        self.ready.append(Part(self._headers, self._body, self._size))
        self._body = bytearray()

    def _end(self) -> None:
        self.ended = True


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
    """The parts of a multipart body (RFC 2046 §5.1) as the chunks arrive, holding at most one part's body, and
    none beyond ``max_part_bytes`` (such a part comes out with ``body`` None). Parsing is python-multipart's; the
    preamble before the first delimiter, which it does not take, is skipped here."""
    delimiter = b"--" + boundary.encode("latin-1")
    collector = _PartCollector(max_part_bytes)
    parser = MultipartParser(boundary.encode("latin-1"), collector.callbacks())
    preamble: bytearray | None = bytearray()
    async for chunk in chunks:
        if preamble is not None:
            preamble += chunk
            at = 0 if preamble.startswith(delimiter) else preamble.find(b"\r\n" + delimiter)
            if at < 0:
                del preamble[:max(0, len(preamble) - len(delimiter) - 2)]
                continue
            chunk, preamble = bytes(preamble[at:]), None
        try:
            parser.write(chunk)
        except MultipartParseError as exc:
            raise MultipartError(str(exc)) from exc
        while collector.ready:
            yield collector.ready.pop(0)
        if collector.ended:
            return
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
    limit = int(request.app.state.settings.scp.max_object_bytes) or MAX_PART_BYTES
    try:
        async for part in iter_parts(request.stream(), boundary, limit):
            part_type = (part.headers.get_content_type() if part.headers.get("content-type") else
                         "application/dicom")
            if part.body is None:
                log.warning("STOW-RS from %s: a part of %d bytes refused (scp.max_object_bytes %d)",
                            principal.name, part.size, limit)
                outcomes.append(IngestOutcome(STATUS_OUT_OF_RESOURCES, "", "",
                                              f"part of {part.size} bytes exceeds scp.max_object_bytes ({limit})"))
                continue
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
