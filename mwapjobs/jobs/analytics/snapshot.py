"""The day's snapshots, from the grouped rows the store answers. Pure: no I/O (the
daily run calls it in a thread, since 10,000 tenants make a few tens of milliseconds
of dictionary work that the event loop must not do).

One document per tenant and one for the platform, keyed `tenant:<tenantId>:<day>` and
`platform:<day>` (`tenantId: null`):

    {tenantId, day, scope: "tenant" | "platform", computedAt,
     projects: {total, archived}, members,
     integrations: {total, connected, byStatus: {active, expired, revoked, error, ...},
                    byProvider: [{providerId, provider, kind, total, connected, byStatus}]},
     refresh: {refreshed, skipped, transientFailure, permanentFailure},
     health: {healthy, failing, error, expired, revoked, skipped},
     files: {files, bytes} | null,           # null: file indexing never ran
     quota: {readings, used, allocated, items: [...]}}  # items: tenants only

Tenant ids are compared as strings (tenants' `_id` is an ObjectId, the others' refer to
it by its hex string); rows of tenants that no longer exist are left out of the tenants'
documents but counted in the platform's totals only through the tenants that exist.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from ..providers import provider_kind

STATUSES = ("active", "expired", "revoked", "error")
REFRESH = ("refreshed", "skipped", "transientFailure", "permanentFailure")
HEALTH = ("healthy", "failing", "error", "expired", "revoked", "skipped")
MAX_ITEMS = 200  # quota items kept per tenant snapshot


def _zero(keys: Iterable[str]) -> dict[str, int]:
    return dict.fromkeys(keys, 0)


def _empty(tenant_id: str | None, day: str, at: datetime, files: bool) -> dict[str, Any]:
    return {
        "_id": f"tenant:{tenant_id}:{day}" if tenant_id else f"platform:{day}",
        "tenantId": tenant_id, "day": day, "scope": "tenant" if tenant_id else "platform",
        "computedAt": at,
        "projects": {"total": 0, "archived": 0}, "members": 0,
        "integrations": {"total": 0, "connected": 0, "byStatus": _zero(STATUSES),
                         "byProvider": []},
        "refresh": _zero(REFRESH), "health": _zero(HEALTH),
        "files": {"files": 0, "bytes": 0} if files else None,
        "quota": {"readings": 0, "used": 0, "allocated": 0, "items": []},
    }


def _add(into: dict[str, int], key: str, n: int) -> None:
    into[key] = into.get(key, 0) + n


def assemble(*, day: str, at: datetime, tenant_ids: list[str], projects: list[dict[str, Any]],
             members: list[dict[str, Any]], integrations: list[dict[str, Any]],
             health: list[dict[str, Any]], quota: list[dict[str, Any]],
             files: list[dict[str, Any]] | None, activity: list[dict[str, Any]],
             providers: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The tenants' documents (in `tenant_ids` order), then the platform's."""
    docs = {t: _empty(t, day, at, files is not None) for t in tenant_ids}
    for row in projects:
        doc = docs.get(str(row["_id"]))
        if doc is not None:
            doc["projects"] = {"total": int(row.get("projects") or 0),
                               "archived": int(row.get("archived") or 0)}
    for row in members:
        doc = docs.get(str(row["_id"]))
        if doc is not None:
            doc["members"] = int(row.get("members") or 0)
    by_provider: dict[str, dict[str, dict[str, Any]]] = {}
    for row in integrations:
        key = row["_id"] if isinstance(row.get("_id"), dict) else {}
        tenant = str(key.get("t"))
        doc = docs.get(tenant)
        if doc is None:
            continue
        n, connected = int(row.get("n") or 0), int(row.get("connected") or 0)
        status = str(key.get("s") or "active")
        part = doc["integrations"]
        part["total"] += n
        part["connected"] += connected
        _add(part["byStatus"], status, n)
        provider_id = str(key.get("p"))
        entry = by_provider.setdefault(tenant, {}).get(provider_id)
        if entry is None:
            provider = providers.get(provider_id) or {}
            entry = {"providerId": provider_id, "provider": provider.get("name"),
                     "kind": provider_kind(provider) if provider else None,
                     "total": 0, "connected": 0, "byStatus": _zero(STATUSES)}
            by_provider[tenant][provider_id] = entry
        entry["total"] += n
        entry["connected"] += connected
        _add(entry["byStatus"], status, n)
    for tenant, entries in by_provider.items():
        docs[tenant]["integrations"]["byProvider"] = sorted(
            entries.values(), key=lambda e: e["providerId"])
    for row in health:
        key = row["_id"] if isinstance(row.get("_id"), dict) else {}
        doc = docs.get(str(key.get("t")))
        if doc is not None:
            _add(doc["health"], str(key.get("o")), int(row.get("n") or 0))
    for row in quota:
        doc = docs.get(str(row["_id"]))
        if doc is not None:
            items = [{**item, "integrationId": str(item.get("integrationId"))}
                     for item in row.get("items") or []]
            doc["quota"] = {"readings": int(row.get("readings") or 0),
                            "used": int(row.get("used") or 0),
                            "allocated": int(row.get("allocated") or 0),
                            "items": sorted(items, key=lambda i: i["integrationId"])[:MAX_ITEMS]}
    for row in files or []:
        doc = docs.get(str(row["_id"]))
        if doc is not None and doc["files"] is not None:
            doc["files"] = {"files": int(row.get("files") or 0),
                            "bytes": int(row.get("bytes") or 0)}
    for row in activity:
        doc = docs.get(str(row.get("tenantId")))
        if doc is not None:
            counts = row.get("refresh") or {}
            for name in REFRESH:
                doc["refresh"][name] = int(counts.get(name) or 0)
    tenants = [docs[t] for t in tenant_ids]
    return [*tenants, platform(tenants, day, at, files is not None)]


def platform(tenants: list[dict[str, Any]], day: str, at: datetime,
             files: bool) -> dict[str, Any]:
    """The platform's totals: the sums of the tenants' documents."""
    doc = _empty(None, day, at, files)
    doc["tenants"] = len(tenants)
    providers: dict[str, dict[str, Any]] = {}
    for t in tenants:
        for name in ("total", "archived"):
            doc["projects"][name] += t["projects"][name]
        doc["members"] += t["members"]
        part = doc["integrations"]
        part["total"] += t["integrations"]["total"]
        part["connected"] += t["integrations"]["connected"]
        for status, n in t["integrations"]["byStatus"].items():
            _add(part["byStatus"], status, n)
        for entry in t["integrations"]["byProvider"]:
            total = providers.setdefault(entry["providerId"], {
                **entry, "total": 0, "connected": 0, "byStatus": _zero(STATUSES)})
            total["total"] += entry["total"]
            total["connected"] += entry["connected"]
            for status, n in entry["byStatus"].items():
                _add(total["byStatus"], status, n)
        for group in ("refresh", "health"):
            for key, n in t[group].items():
                _add(doc[group], key, n)
        if files and t["files"] is not None:
            doc["files"]["files"] += t["files"]["files"]
            doc["files"]["bytes"] += t["files"]["bytes"]
        for key in ("readings", "used", "allocated"):
            doc["quota"][key] += t["quota"][key]
    doc["integrations"]["byProvider"] = sorted(providers.values(),
                                               key=lambda e: e["providerId"])
    del doc["quota"]["items"]
    return doc
