"""The database report: what upkeep finds, never changes (apart from mwapjobs' own
indexes, and recommended backend ones when `maintenance.create_recommended_indexes`).

- **Indexes**: the backend's own (`tenants{ownerId}` unique, `projects{tenantId}`,
  `projects{members.userId}`, `superadmins{userId}` unique), mwapjobs' (by name), and
  the ones recommended for `cloudProviderIntegrations` and `projects` (the backend has
  none for the joins its own queries make). A missing one of ours is made again by the
  store that owns it; a missing backend one is only reported.
- **Orphans**, compared as strings (ids live in both forms): projects and integrations
  whose tenant is gone (the backend deletes a tenant with a bare `deleteOne`),
  integrations whose provider is gone, projects whose integration is gone. Counts and a
  few sample ids; nothing is deleted.
- **Sizes**: `dbStats`, and per collection `collStats` (size, storage, indexes) where
  this database user may run them (Atlas `readWrite` usually may; a refusal is
  reported as text, not an error), with an estimated count always.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from ...config import MaintenanceSettings
from ...storage.maintenance import FLOW_INDEX, MaintenanceStore
from ...storage.names import (
    ALERT_HISTORY,
    INTEGRATIONS,
    NOTIFICATIONS,
    PROJECTS,
    PROVIDERS,
    RUNS,
    SUPERADMINS,
    TENANTS,
    THROUGHPUT,
)
from .decide import ExpectedIndex, index_findings, orphans

SAMPLE = 5  # orphan ids shown per kind
B, M, R = "backend", "mwapjobs", "recommended"

EXPECTED: tuple[ExpectedIndex, ...] = (
    ExpectedIndex(B, TENANTS, (("ownerId", 1),), unique=True),
    ExpectedIndex(B, PROJECTS, (("tenantId", 1),)),
    ExpectedIndex(B, PROJECTS, (("members.userId", 1),)),
    ExpectedIndex(B, SUPERADMINS, (("userId", 1),), unique=True),
    ExpectedIndex(M, RUNS, (("queue", 1), ("state", 1), ("priority", -1), ("runAt", 1)),
                  name="mwapjobs_claim"),
    ExpectedIndex(M, RUNS, (("state", 1), ("runAt", 1), ("_id", 1)), name="mwapjobs_due_order"),
    ExpectedIndex(M, RUNS, (("state", 1), ("leaseUntil", 1)), name="mwapjobs_lease"),
    ExpectedIndex(M, RUNS, (("queue", 1), ("state", 1), ("finishedAt", -1), ("_id", -1)),
                  name="mwapjobs_history_order"),
    ExpectedIndex(M, RUNS, (("key", 1),), unique=True, name="mwapjobs_dedupe"),
    ExpectedIndex(M, RUNS, (("slot", 1),), unique=True, name="mwapjobs_slot"),
    ExpectedIndex(M, RUNS, (("jobId", 1), ("_id", -1)), name="mwapjobs_job"),
    ExpectedIndex(M, THROUGHPUT, (("minute", 1),), name="mwapjobs_throughput_ttl"),
    ExpectedIndex(M, INTEGRATIONS, (("updatedAt", 1),), name="mwapjobs_updatedAt"),
    ExpectedIndex(M, INTEGRATIONS, (("providerId", 1), ("tokenExpiresAt", 1)),
                  name="mwapjobs_providerId_tokenExpiresAt"),
    ExpectedIndex(M, INTEGRATIONS, (("oauth.status", 1), ("oauth.expiresAt", 1)),
                  name=FLOW_INDEX),
    ExpectedIndex(M, NOTIFICATIONS, (("createdAt", -1),), name="mwapjobs_notifications_recent"),
    ExpectedIndex(M, NOTIFICATIONS, (("delivered", 1), ("createdAt", 1)),
                  name="mwapjobs_notifications_pending"),
    ExpectedIndex(M, ALERT_HISTORY, (("at", 1),), name="mwapjobs_alert_history_at"),
    # The backend's own queries: a tenant's integrations, a provider's, a project's.
    ExpectedIndex(R, INTEGRATIONS, (("tenantId", 1),)),
    ExpectedIndex(R, INTEGRATIONS, (("providerId", 1),)),
    ExpectedIndex(R, PROJECTS, (("cloudIntegrationId", 1),)),
)

# The collections whose sizes are reported (besides every mwapjobs_* one).
BACKEND_COLLECTIONS = (INTEGRATIONS, PROVIDERS, TENANTS, SUPERADMINS, PROJECTS, "projectTypes",
                       "virtualFiles")


def recommended_name(index: ExpectedIndex) -> str:
    return "mwapjobs_recommended_" + "_".join(k.replace(".", "_") for k, _ in index.keys)


class DatabaseReport:
    def __init__(self, store: MaintenanceStore, settings: MaintenanceSettings,
                 own_indexes: Sequence[Callable[[], Awaitable[None]]],
                 expected: Sequence[ExpectedIndex] = EXPECTED) -> None:
        """`own_indexes`: the `ensure_indexes` of the stores that own mwapjobs' indexes."""
        self.store = store
        self.settings = settings
        self.own_indexes = own_indexes
        self.expected = list(expected)

    async def make(self) -> dict[str, Any]:
        return {"indexes": await self.indexes(), "orphans": await self.orphans(),
                "sizes": await self.sizes()}

    async def _present(self) -> dict[str, list[dict[str, Any]]]:
        return {c: await self.store.indexes(c) for c in sorted({e.collection
                                                                for e in self.expected})}

    async def indexes(self) -> list[dict[str, Any]]:
        findings = index_findings(self.expected, await self._present())
        created: list[str] = []
        if any(f["owner"] == M and not f["present"] for f in findings):
            for ensure in self.own_indexes:
                await ensure()
            created += [f["name"] for f in findings if f["owner"] == M and not f["present"]]
        if self.settings.create_recommended_indexes:
            for want, finding in zip(self.expected, findings, strict=True):
                if want.owner == R and not finding["present"]:
                    name = recommended_name(want)
                    await self.store.create_index(want.collection, want.keys, name)
                    created.append(name)
        if created:
            findings = index_findings(self.expected, await self._present())
        for finding in findings:
            finding["created"] = bool(finding["present"] and (
                finding["name"] in created or finding["by"] in created))
        return findings

    async def orphans(self) -> dict[str, Any]:
        store = self.store
        project_tenants = await store.referenced(PROJECTS, "tenantId")
        integration_tenants = await store.referenced(INTEGRATIONS, "tenantId")
        tenants = await store.existing_ids(
            TENANTS, sorted(set(project_tenants) | set(integration_tenants)))
        providers_used = await store.referenced(INTEGRATIONS, "providerId")
        providers = await store.existing_ids(PROVIDERS, sorted(providers_used))
        project_integrations = await store.referenced(PROJECTS, "cloudIntegrationId")
        integrations = await store.existing_ids(INTEGRATIONS, sorted(project_integrations))
        out: dict[str, Any] = {}
        for kind, collection, field, referenced, existing in (
                ("projectsWithoutTenant", PROJECTS, "tenantId", project_tenants, tenants),
                ("integrationsWithoutTenant", INTEGRATIONS, "tenantId", integration_tenants,
                 tenants),
                ("integrationsWithoutProvider", INTEGRATIONS, "providerId", providers_used,
                 providers),
                ("projectsWithoutIntegration", PROJECTS, "cloudIntegrationId",
                 project_integrations, integrations)):
            count, missing = orphans(referenced, existing)
            out[kind] = {"count": count, "missingIds": missing[:SAMPLE],
                         "missing": len(missing),
                         "sample": await store.sample_referencing(collection, field, missing,
                                                                  SAMPLE)}
        return out

    async def sizes(self) -> dict[str, Any]:
        names = await self.store.collection_names()
        audit = self.settings.audit_collection
        wanted = [n for n in names if n.startswith("mwapjobs_")
                  or n in BACKEND_COLLECTIONS or n == audit]
        collections: dict[str, Any] = {}
        for name in wanted:
            entry: dict[str, Any] = {"count": await self.store.estimated_count(name)}
            stats = await self.store.command("collStats", name)
            if isinstance(stats, str):
                entry["refused"] = stats
            else:
                entry.update({k: _number(stats.get(k)) for k in
                              ("size", "storageSize", "totalIndexSize", "nindexes")})
            collections[name] = entry
        db = await self.store.command("dbStats")
        database = ({"refused": db} if isinstance(db, str) else
                    {k: _number(db.get(k)) for k in ("collections", "objects", "dataSize",
                                                     "storageSize", "indexSize")})
        return {"database": database, "collections": collections}


def _number(value: Any) -> float | int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value
