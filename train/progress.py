"""Progress bars and metric logging shared by the training loops.

A loop reports through a :class:`LoopMonitor`: a rich progress bar when it has a console, log lines otherwise,
and every metric it logs goes to ``sink`` (the nightly job's sink writes them to the database, the demo's to a
JSON-lines file).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

log = logging.getLogger(__name__)

#: (stage, step, {metric: value}) -> None
MetricsSink = Callable[[str, int, Mapping[str, float]], None]


def discard_metrics(stage: str, step: int, metrics: Mapping[str, float]) -> None:
    return None


class LoopMonitor:
    def __init__(self, progress: Progress | None, task: int | None, stage: str, sink: MetricsSink) -> None:
        self._progress, self._task, self.stage, self._sink = progress, task, stage, sink
        self._last_log = time.monotonic()

    def advance(self, steps: int = 1, status: str = "") -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, advance=steps, status=status)
        elif status and time.monotonic() - self._last_log > 10:
            log.info("%s: %s", self.stage, status)
            self._last_log = time.monotonic()

    def metrics(self, step: int, values: Mapping[str, float]) -> None:
        self._sink(self.stage, step, {k: float(v) for k, v in values.items()})


@contextmanager
def monitor(
    console: Console | None,
    stage: str,
    description: str,
    total: int,
    completed: int = 0,
    sink: MetricsSink = discard_metrics,
) -> Iterator[LoopMonitor]:
    """A progress bar for ``total`` units (``completed`` already done, e.g. on resume) while the block runs."""
    if console is None:
        log.info("%s: %s (%d/%d)", stage, description, completed, total)
        yield LoopMonitor(None, None, stage, sink)
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=total, completed=completed, status="")
        yield LoopMonitor(progress, task, stage, sink)
