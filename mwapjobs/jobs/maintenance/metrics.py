"""Upkeep's metrics, read at each scrape from the last report (one find by `_id`):
orphans by kind, missing expected indexes by owner, and when the last run finished."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric

from ...metrics import DaemonMetrics, Source
from ...storage.maintenance import MaintenanceStore

ORPHAN_KINDS = ("projectsWithoutTenant", "integrationsWithoutTenant",
                "integrationsWithoutProvider", "projectsWithoutIntegration")
OWNERS = ("backend", "mwapjobs", "recommended")


async def _read(store: MaintenanceStore) -> dict[str, Any]:
    return await store.report() or {}


def families(report: dict[str, Any] | None) -> list[Metric]:
    orphans = GaugeMetricFamily(
        "mwapjobs_maintenance_orphans",
        "Backend documents that reference a missing one, by kind (last upkeep report).",
        labels=["kind"])
    missing = GaugeMetricFamily(
        "mwapjobs_maintenance_missing_indexes",
        "Expected indexes missing, by whose they are (last upkeep report).", labels=["owner"])
    finished = GaugeMetricFamily(
        "mwapjobs_maintenance_last_run_timestamp_seconds",
        "When the last upkeep run finished (Unix time; 0: never).")
    if report is None:  # the read failed: source_up says so; no made-up zeros
        return [orphans, missing, finished]
    found = report.get("orphans") or {}
    for kind in ORPHAN_KINDS:
        orphans.add_metric([kind], float((found.get(kind) or {}).get("count", 0)))
    indexes = report.get("indexes") or []
    for owner in OWNERS:
        missing.add_metric([owner], float(sum(1 for i in indexes
                                              if i.get("owner") == owner and not i.get("present"))))
    at = report.get("finishedAt")
    finished.add_metric([], at.timestamp() if isinstance(at, datetime) else 0.0)
    return [orphans, missing, finished]


def add_metrics(metrics: DaemonMetrics, store: MaintenanceStore) -> None:
    metrics.add_source(Source("maintenance", lambda: _read(store), families))
