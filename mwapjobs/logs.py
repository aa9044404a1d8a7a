"""Structured logs: one JSON object per line on stdout, which journald stores as is.

Secrets are scrubbed in the formatter, the last point every line passes, so a
careless `log.info("%s", token)` anywhere still cannot leak a registered secret
or anything shaped like a bearer token or JWT.
"""

from __future__ import annotations

import atexit
import json
import logging
import logging.handlers
import queue
import re
import sys
import threading
import uuid
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

correlation_id: ContextVar[str | None] = ContextVar("correlation_id", default=None)

_STANDARD_ATTRS = frozenset(
    [*vars(logging.makeLogRecord({})), "message", "asctime", "taskName", "correlationId"]
)
MASK = "[redacted]"
# (pattern, replacement): shapes of secrets we may not know by value.
_PATTERNS = (
    (re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+"), rf"\1{MASK}"),
    (re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*"), MASK),
    (
        re.compile(
            r"(?i)((?:access_token|refresh_token|client_secret|password)[\"']?\s*[=:]\s*[\"']?)"
            r"[^\s&\"',}]+"
        ),
        rf"\1{MASK}",
    ),
    (re.compile(r"(mongodb(?:\+srv)?://[^:/@\s]+:)[^@\s]+(@)"), rf"\1{MASK}\2"),
)


class _Secrets:
    """The exact secret values this process knows, registered as they are loaded."""

    def __init__(self) -> None:
        self._values: set[str] = set()
        self._lock = threading.Lock()

    def add(self, value: str | None) -> None:
        if value and len(value) >= 6:  # shorter values would redact ordinary words
            with self._lock:
                self._values = self._values | {value}

    def scrub(self, text: str) -> str:
        for value in self._values:
            if value in text:
                text = text.replace(value, MASK)
        for pattern, replacement in _PATTERNS:
            text = pattern.sub(replacement, text)
        return text


secrets = _Secrets()


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON line: time, level, logger, message, and any `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] | None = getattr(record, "audit_event", None)
        if entry is None:
            entry = {
                "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(),
                "level": record.levelname.lower(),
                "logger": record.name,
                "message": record.getMessage(),
            }
            cid = getattr(record, "correlationId", None) or correlation_id.get()
            if cid:
                entry["correlationId"] = cid
            for key, value in vars(record).items():
                if key not in _STANDARD_ATTRS and not key.startswith("_"):
                    entry[key] = value
            if record.exc_info:
                entry["exception"] = self.formatException(record.exc_info)
        return secrets.scrub(json.dumps(entry, default=str, ensure_ascii=False))


class _ContextQueueHandler(logging.handlers.QueueHandler):
    """Capture the correlation id on the calling thread; the listener thread cannot see it."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        if not hasattr(record, "correlationId"):
            record.correlationId = correlation_id.get()
        prepared: logging.LogRecord = super().prepare(record)
        return prepared


_listener: logging.handlers.QueueListener | None = None


def setup_logging(level: str = "info") -> None:
    """Send every logger to stdout as JSON, written by a background thread.

    Writing to a slow journald pipe must not stall the event loop, so records
    are queued and a listener thread does the I/O. Idempotent, so tests can
    call it freely.
    """
    global _listener
    stop_logging()
    root = logging.getLogger()
    root.setLevel(level.upper())
    for handler in list(root.handlers):
        if isinstance(handler, _ContextQueueHandler):
            root.removeHandler(handler)
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(JsonFormatter())
    log_queue: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    root.addHandler(_ContextQueueHandler(log_queue))
    _listener = logging.handlers.QueueListener(log_queue, stream, respect_handler_level=False)
    _listener.start()
    # APScheduler logs every job submission at INFO; that is per-job noise, not news.
    logging.getLogger("apscheduler").setLevel(max(logging.WARNING, root.level))
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def stop_logging() -> None:
    """Flush queued records; called at exit so the last lines of a shutdown are not lost."""
    global _listener
    if _listener is not None:
        _listener.stop()
        _listener = None


atexit.register(stop_logging)

_audit = logging.getLogger("mwapjobs.audit")


def audit(action: str, actor: str, target: str, **fields: Any) -> None:
    """Write one audit event in MWAP's format: a JSON line with level "audit"."""
    event = {
        "level": "audit",
        "action": action,
        "actor": actor,
        "target": target,
        "timestamp": datetime.now(UTC).isoformat(),
        "correlationId": correlation_id.get() or str(uuid.uuid4()),
        **fields,
    }
    _audit.warning("audit", extra={"audit_event": event})
