"""What the API's fairness pages need from the fairness analysis, which is train's: the composition root
(:mod:`worker.commands.api`) gives the app an implementation, so the API never imports train."""
from __future__ import annotations

from typing import Any, Protocol

from sqlalchemy.engine import Connection, Engine


class FairnessAnalysis(Protocol):
    def latest(self, connection: Connection) -> Any | None:
        """The latest completed refresh's results, or None."""

    def page(self, connection: Connection, results: Any) -> str:
        """The HTML report of ``results``."""

    def agreement(self, connection: Connection) -> list:
        """The radiologists' agreement with the AI, by group (dataclass rows)."""

    def headline(self, results: Any) -> dict[str, Any]:
        """The findings of ``results`` in a few numbers."""

    def refresh(self, engine: Engine) -> Any:
        """Analyse the database now and store the results."""
