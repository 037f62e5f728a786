"""How the service's log is written: one record per line, whatever its values hold.

Log messages carry values from the network (UIDs from DIMSE commands, AE titles, HL7 fields). A CR or LF in one
would start what looks like a new record in the text format, so an attacker could forge log lines. The text format
escapes control characters in the message, and indents the lines of a traceback: a line that starts at column 0 is
always the start of a record. (The JSON format escapes them by construction.)
"""
from __future__ import annotations

import logging
import re

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_NAMED = {"\n": "\\n", "\r": "\\r"}
#: Libraries that narrate per object at INFO (pynetdicom: every C-STORE request and response, every presentation
#: context; highdicom: every attribute it copies). Their lines show with -v; the service logs one line per study.
CHATTY_LOGGERS = ("pynetdicom", "highdicom")


def escape_controls(text: str) -> str:
    """``text`` with CR, LF and the other control characters (tab excepted) written as escapes."""
    return _CONTROL.sub(lambda m: _NAMED.get(m.group(), f"\\x{ord(m.group()):02x}"), text)


class EscapingFormatter(logging.Formatter):
    """The text log format, with each record's message on one line and its traceback indented beneath it."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        record.message = escape_controls(record.message)
        return super().formatMessage(record)

    def formatException(self, ei) -> str:  # noqa: N802, ANN001 (logging's name and type)
        return _indent(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:  # noqa: N802
        return _indent(super().formatStack(stack_info))


def _indent(text: str) -> str:
    return "\n".join("  " + escape_controls(line.rstrip("\r")) for line in text.split("\n"))


def configure_logging(verbose: bool = False, log_format: str = "text") -> None:
    """The root logger of a ``triage`` command: INFO (DEBUG with ``verbose``) to stderr, text or JSON lines."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=TEXT_FORMAT)
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)
    if log_format == "json":
        from worker.metrics import JsonLogFormatter

        formatter: logging.Formatter = JsonLogFormatter()
    else:
        formatter = EscapingFormatter(TEXT_FORMAT)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(formatter)
