"""What a token-refresh run is: its queue, its job id (one per integration), its data,
and the fingerprints that say which tokens it was scheduled for."""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any

from ...engine import as_utc

QUEUE = "token-refresh"
MANUAL_PRIORITY = 100  # a refresh asked for now (by hand, by a health check): first in line


def job_id(integration_id: str) -> str:
    return f"integration:{integration_id}"


def fingerprint(stored_token: str | None) -> str:
    """Identifies a stored refresh token without keeping it (a reconnect changes it)."""
    return hashlib.sha256((stored_token or "").encode()).hexdigest()[:32]


def connection_fingerprint(doc: dict[str, Any]) -> str:
    """Identifies an integration's tokens as discovery sees them (the stored refresh
    token and `tokenExpiresAt`): any change of tokens (a reconnect, a refresh by the
    backend) changes it; a status write does not."""
    expires = doc.get("tokenExpiresAt")
    stamp = (as_utc(expires).isoformat(timespec="milliseconds")
             if isinstance(expires, datetime) else "")
    return hashlib.sha256(f"{doc.get('refreshToken') or ''}|{stamp}".encode()).hexdigest()[:32]


def run_data(doc: dict[str, Any], *, refused_before: bool = False) -> dict[str, Any]:
    """The data of an integration's refresh run: who it is for, and which tokens it was
    scheduled for (`connection`, compared by discovery to see a reconnect).
    `refusedBefore`: our notes hold a refusal of an earlier token, to clear once this
    one works (so a refresh of an integration with none costs no write for it)."""
    data = {"integrationId": str(doc["_id"]), "tenantId": doc.get("tenantId"),
            "providerId": None if doc.get("providerId") is None else str(doc["providerId"]),
            "connection": connection_fingerprint(doc)}
    if refused_before:
        data["refusedBefore"] = True
    return data
