"""Masking secret-looking fields in structured values: job data, results, log fields.

A field is secret-looking when the last word of its name says so: `accessToken`,
`refresh_token`, `client_secret`, `clientSecret`, `password`, `SMTP_PASS`,
`Authorization`, `cookie`, `apiKey`, `X-Api-Key`, `privateKey`, `credentials`.
Only the last word counts, so `tokenExpiresAt`, `tokenUrl` or `secretName` stay
readable. The value of such a field is replaced by `[redacted]`, whatever it is
(a string, a number, a whole object), except `None` and booleans, which cannot
carry a secret and say whether one is there.

This module imports nothing from mwapjobs, so any layer (the engine, the API, the
log formatter) can use it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

REDACTED = "[redacted]"

# The last word of a field name that makes it a secret.
_SECRET_WORDS = frozenset({
    "token", "tokens", "secret", "secrets", "password", "passwords", "passwd", "pass",
    "pwd", "passphrase", "authorization", "cookie", "cookies", "credential",
    "credentials", "apikey", "apikeys",
})
# "key" alone is too common (`key`, `jobKey`): only these words before it make it secret.
_SECRET_KEY_PREFIXES = frozenset({"api", "private", "secret", "encryption", "signing",
                                  "access", "client"})
_WORDS = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")


def is_secret_key(name: object) -> bool:
    """Whether a field called `name` holds a secret, judged by the last word of its name."""
    words = [w.lower() for w in _WORDS.findall(str(name))]
    if not words:
        return False
    last = words[-1]
    if last in _SECRET_WORDS:
        return True
    return last in ("key", "keys") and len(words) > 1 and words[-2] in _SECRET_KEY_PREFIXES


def _masked(value: Any) -> Any:
    return value if value is None or isinstance(value, bool) else REDACTED


def redact(value: Any, _depth: int = 0) -> Any:
    """A copy of `value` with the values of secret-looking fields masked, at any depth
    (mappings, lists and tuples are walked; everything else is returned as is)."""
    if _depth > 32:  # a cycle, or data no one should log or show whole
        return REDACTED
    if isinstance(value, Mapping):
        return {k: _masked(v) if is_secret_key(k) else redact(v, _depth + 1)
                for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v, _depth + 1) for v in value]
    return value


__all__ = ["REDACTED", "is_secret_key", "redact"]
