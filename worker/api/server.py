"""Running the API (``triage api``): uvicorn with the limits a hospital network needs.

uvicorn bounds a request's headers in size (h11: 16 KiB) but not in time: a client that opens a connection and
sends nothing, or drips its headers a byte at a time, holds a connection for ever. :class:`GuardedH11Protocol`
closes a connection whose request headers are not complete ``api.header_timeout_s`` after it opened (or after the
previous response). A body that stops arriving is cut off by the audit middleware (``api.body_timeout_s``);
``api.max_connections`` caps concurrent connections and requests (503 beyond: uvicorn's ``limit_concurrency``);
idle keep-alive connections close after ``api.keep_alive_s``.

This is the one place that reaches inside uvicorn (its h11 protocol class), written against uvicorn 0.55's
``connection_made``/``data_received``/``on_response_complete`` and tested against a real process
(tests/integration/test_security_limits.py).
"""
from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from worker.config import Settings, load_settings


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's headers."""

    header_timeout_s: float = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_timer: asyncio.TimerHandle | None = None
        self._awaiting = None
        super().connection_made(transport)
        self._arm(None)

    def _arm(self, finished_cycle) -> None:
        self._disarm()
        self._awaiting = finished_cycle  # a new cycle object means the next request's headers have arrived
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._header_timer is not None and self.cycle is not self._awaiting:
            self._disarm()

    def on_response_complete(self) -> None:
        finished = self.cycle
        super().on_response_complete()
        if self.cycle is finished and not self.transport.is_closing():  # not already on a pipelined request
            self._arm(finished)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.cycle is self._awaiting and not self.transport.is_closing():
            self.logger.info("closing a connection from %s: no complete request headers within %g s",
                             self.client[0] if self.client else "?", self.header_timeout_s)
            self.transport.close()


def uvicorn_options(settings: Settings) -> dict:
    """uvicorn's limits from ``api`` (TLS options come from ``worker.cli.api_tls_options``)."""
    api = settings.api
    protocol = type("GuardedH11Protocol", (GuardedH11Protocol,), {"header_timeout_s": float(api.header_timeout_s)})
    return {"http": protocol, "timeout_keep_alive": int(api.keep_alive_s),
            "limit_concurrency": int(api.max_connections) or None}


def config_path_of(config: str | None) -> str | None:
    """The file ``load_settings`` reads for ``config`` (so a reload reads the same one)."""
    path = config or os.environ.get("TRIAGE_CONFIG") or ("triage.yaml" if Path("triage.yaml").exists() else None)
    return str(Path(path).resolve()) if path else None


def serve(config: str | None, tls_options: dict, create_app: Callable[..., Any]) -> int:
    """Serve the app that ``create_app(settings, config_path=...)`` makes (the composition root's:
    :func:`worker.commands.api.create_app`)."""
    path = config_path_of(config)
    settings = load_settings(path)
    uvicorn.run(create_app(settings, config_path=path), host=settings.api.host,
                port=int(settings.api.port), **uvicorn_options(settings), **tls_options)
    return 0
