"""Prometheus metrics and the health/readiness endpoints of each process.

Labels never carry patient identifiers or UIDs (they would be personal data and an unbounded label set): only
pipeline, stage, queue, outcome and reason classes.

Each long-running process (``triage serve``, each ``triage worker``) serves ``/metrics``, ``/healthz`` (the
process is alive) and ``/readyz`` (its dependencies answer) on its own port: ``metrics.port`` (0 = off).
"""
from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

log = logging.getLogger(__name__)

# The receiver's counts (triage_images_received_total, triage_images_rejected_total{status},
# triage_bookkeeping_backlog) and triage_queue_depth{queue} are collected at scrape time by
# worker.service.ReceiverCollector in the `triage serve` process.
STAGE_SECONDS = Histogram(
    "triage_stage_seconds", "Time spent in each processing stage", ["stage"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
TURNAROUND_SECONDS = Histogram(
    "triage_turnaround_seconds", "AI turnaround: last image received to SR written", ["pipeline"],
    buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800),
)
RUNS = Counter("triage_runs_total", "Processing runs by outcome", ["pipeline", "outcome"])
INPUT_GATE_REFUSALS = Counter("triage_input_gate_refusals_total",
                              "Studies not analysed by the input gate, by the check that failed", ["pipeline", "check"])
FAILURES = Counter("triage_failures_total", "Failures by component", ["component"])
DELIVERIES = Counter("triage_deliveries_total", "Delivery attempts by outcome", ["outcome"])
DEAD_LETTERS = Counter("triage_dead_letters_total", "Deliveries given up after their last attempt")
GPU_UTILISATION = Gauge("triage_gpu_utilization_ratio", "GPU utilisation reported by the driver", ["device"])
BATCH_SIZE = Histogram("triage_batch_studies", "Studies per GPU batch", buckets=(1, 2, 4, 8, 16, 32))


def sample_gpu_utilisation() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            for index in range(torch.cuda.device_count()):
                GPU_UTILISATION.labels(device=str(index)).set(torch.cuda.utilization(index) / 100.0)
    except Exception:  # the driver's NVML may be missing; the metric is then simply absent
        pass


class HealthServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` on a small threaded HTTP server.

    ``checks`` maps a dependency name to a callable that raises (or returns False) when it is not usable.
    """

    def __init__(self, host: str, port: int, checks: dict[str, Callable[[], object]] | None = None,
                 before_scrape: Callable[[], None] | None = None) -> None:
        self.checks = checks or {}
        self.before_scrape = before_scrape
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                if self.path == "/metrics":
                    if server.before_scrape:
                        server.before_scrape()
                    self._send(200, generate_latest(), CONTENT_TYPE_LATEST)
                elif self.path == "/healthz":
                    self._send(200, b'{"status": "ok"}', "application/json")
                elif self.path == "/readyz":
                    results = server.readiness()
                    ready = all(r == "ok" for r in results.values())
                    body = json.dumps({"ready": ready, "checks": results}).encode()
                    self._send(200 if ready else 503, body, "application/json")
                else:
                    self._send(404, b"not found", "text/plain")

            def _send(self, code: int, body: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:  # scrapes every few seconds would flood the log
                pass

        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="health", daemon=True)

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    def readiness(self) -> dict[str, str]:
        results = {}
        for name, check in self.checks.items():
            try:
                ok = check()
                results[name] = "ok" if ok is not False else "failing"
            except Exception as exc:  # only the class: messages may carry hosts or URLs, unless marked for operators
                reason = f": {exc}" if getattr(exc, "public_reason", False) else ""
                results[name] = f"failing: {type(exc).__name__}{reason}"
        return results

    def start(self) -> "HealthServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (which carries UIDs, never patient data)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)
