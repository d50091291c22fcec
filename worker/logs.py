"""Logging set-up: plain text or one JSON object a line, with deletion context fields on every line.

Context travels in ``extra={"ctx": {...}}``; keys such as backup_id, job_id and request_id appear as fields
in JSON and as ``key=value`` pairs in text. Secrets are never put into a context.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

from worker.settings import Settings

LOGGER_NAME = "vbs_deleter"
_ESCAPES = {ord("\n"): "\\n", ord("\r"): "\\r"}  # a text line stays one line, whatever a server sent


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(getattr(record, "ctx", {}))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class _TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        """The line before any traceback: message and context, each kept on one line."""
        line = super().formatMessage(record)
        ctx = getattr(record, "ctx", None)
        if ctx:
            line += " " + " ".join(f"{key}={value}" for key, value in ctx.items() if value is not None)
        return line.translate(_ESCAPES)


def configure(settings: Settings) -> None:
    """Send the worker's logger to stderr in the configured format and level (idempotent)."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(settings.log_level)
    logger.propagate = False
    handler = logging.StreamHandler()
    handler.setFormatter(_JsonFormatter() if settings.log_format == "json" else _TextFormatter())
    logger.handlers[:] = [handler]


def get(name: str) -> logging.Logger:
    """A child of the worker's logger, e.g. ``get("engine")`` → ``vbs_deleter.engine``."""
    return logging.getLogger(f"{LOGGER_NAME}.{name}")
