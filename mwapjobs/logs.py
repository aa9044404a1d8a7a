r"""Structured logs: one JSON object per line on stdout, which journald stores as is.

Secrets are scrubbed in the formatter, the last point every line passes, so a
careless `log.info("%s", token)` anywhere still cannot leak a registered secret
or anything shaped like a bearer token or JWT. The scrubbing runs field by field
on the structured values, before they are encoded: every string (the message,
each `extra` value, strings nested in dicts and lists) is scrubbed as it is,
and a field named like a secret (`refreshToken`, `client_secret`, ...: see
`mwapjobs.redaction`) has its value masked. Then the whole line gets a last pass.
Scrubbing the encoded line alone would miss a secret inside a string value, where
JSON escapes its quotes (`{\"refresh_token\": \"abc\"}`).

Datetimes and dates are written in ISO 8601 (`2026-12-01T10:00:00+00:00`).

pymongo's loggers (`pymongo` and its children `pymongo.command`,
`pymongo.connection`, `pymongo.serverSelection`, `pymongo.topology`) never go below
WARNING, whatever `log_level` is: their DEBUG and INFO records carry whole
commands and replies, that is documents with the integrations' stored tokens. This
holds from the moment this module is imported (so also for an embedding program
that configures logging itself), and `setup_logging` enforces it again, also on
those of pymongo's loggers that someone set lower, and drops such records in its
handler should one get through anyway.
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
from collections.abc import Mapping
from contextvars import ContextVar
from datetime import UTC, date, datetime, time
from typing import Any

from .redaction import REDACTED, is_secret_key

correlation_id: ContextVar[str | None] = ContextVar("correlation_id", default=None)
# The role of the caller the current request authenticated as ("admin", "viewer",
# "user"), set by the authenticator, so that every audit line says who acted in what
# capacity without each call site passing it.
actor_role: ContextVar[str | None] = ContextVar("actor_role", default=None)

_STANDARD_ATTRS = frozenset(
    [*vars(logging.makeLogRecord({})), "message", "asctime", "taskName", "correlationId"]
)
MASK = REDACTED
# (pattern, replacement): shapes of secrets we may not know by value. The key=value
# one also matches quotes escaped by JSON (`refresh_token\": \"abc`), for the final
# pass over the encoded line.
_PATTERNS = (
    (re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+"), rf"\1{MASK}"),
    (re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*"), MASK),
    (
        re.compile(
            r"(?i)((?:access_token|refresh_token|client_secret|password)(?:\\?[\"'])?\s*[=:]"
            r"\s*(?:\\?[\"'])?)[^\s&\"',}\\]+"
        ),
        rf"\1{MASK}",
    ),
    (re.compile(r"(mongodb(?:\+srv)?://[^:/@\s]+:)[^@\s]+(@)"), rf"\1{MASK}\2"),
)
PYMONGO_LOGGER = "pymongo"
_MAX_DEPTH = 32


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


def _masked(value: Any) -> Any:
    return value if value is None or isinstance(value, bool) else MASK


def scrub_value(value: Any, _depth: int = 0) -> Any:
    """A JSON-ready copy of `value`, scrubbed: strings scrubbed, fields named like
    secrets masked, datetimes and dates in ISO 8601, anything else as its scrubbed str()."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return secrets.scrub(value)
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if _depth >= _MAX_DEPTH:
        return MASK
    if isinstance(value, Mapping):
        return {secrets.scrub(str(k)): _masked(v) if is_secret_key(k)
                else scrub_value(v, _depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [scrub_value(v, _depth + 1) for v in value]
    return secrets.scrub(str(value))


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON line: time, level, logger, message, and any `extra` fields.

    Every value is scrubbed before encoding (`scrub_value`), the line once more after."""

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
        return secrets.scrub(json.dumps(scrub_value(entry), ensure_ascii=False))


def quiet_pymongo() -> None:
    """Keep pymongo's loggers at WARNING or above (see the module's docstring)."""
    parent = logging.getLogger(PYMONGO_LOGGER)
    if parent.level < logging.WARNING:  # NOTSET (0) included
        parent.setLevel(logging.WARNING)
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if (name.startswith(PYMONGO_LOGGER + ".") and isinstance(logger, logging.Logger)
                and logging.NOTSET < logger.level < logging.WARNING):
            logger.setLevel(logging.WARNING)


def _not_pymongo_chatter(record: logging.LogRecord) -> bool:
    """Handler filter: drop pymongo's records below WARNING should one get this far."""
    name = record.name
    from_pymongo = name == PYMONGO_LOGGER or name.startswith(PYMONGO_LOGGER + ".")
    return not from_pymongo or record.levelno >= logging.WARNING


quiet_pymongo()


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
    handler = _ContextQueueHandler(log_queue)
    handler.addFilter(_not_pymongo_chatter)
    root.addHandler(handler)
    _listener = logging.handlers.QueueListener(log_queue, stream, respect_handler_level=False)
    _listener.start()
    # APScheduler logs every job submission at INFO; that is per-job noise, not news.
    logging.getLogger("apscheduler").setLevel(max(logging.WARNING, root.level))
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    quiet_pymongo()  # their DEBUG/INFO records carry whole documents, tokens included


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
        **({"role": role} if (role := actor_role.get()) else {}),
        **fields,
    }
    _audit.warning("audit", extra={"audit_event": event})
