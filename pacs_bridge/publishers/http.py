"""The HTTP client of the HTTP-based publishers: timeouts, bearer tokens, errors that name the request."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx

from pacs_bridge.publishers.base import PublisherError


class HttpClient:
    def __init__(self, timeout_s: float, token: str | None = None, headers: Mapping[str, str] | None = None,
                 verify: bool | str = True) -> None:
        self.timeout_s = timeout_s
        self.headers = dict(headers or {})
        if token:
            self.headers["Authorization"] = f"Bearer {token}"
        self.verify = verify

    def request(self, method: str, url: str, *, ok: tuple[int, ...] = (200,),
                **kwargs: Any) -> httpx.Response:
        """One request; a status outside ``ok`` or a network failure raises :class:`PublisherError`."""
        headers = {**self.headers, **kwargs.pop("headers", {})}
        try:
            with httpx.Client(timeout=self.timeout_s, verify=self.verify) as client:
                response = client.request(method, url, headers=headers, **kwargs)
        except httpx.HTTPError as exc:
            raise PublisherError(f"{method} {url}: {type(exc).__name__}: {exc}") from exc
        if response.status_code not in ok:
            raise PublisherError(f"{method} {url}: HTTP {response.status_code} {response.reason_phrase}: "
                                 f"{response.text[:200]}")
        return response
