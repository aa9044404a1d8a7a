"""Analytics' gauges: the platform's totals from the newest platform snapshot (one
indexed find at each scrape). Platform totals only: no per-tenant label, ever (10,000
tenants would be 10,000 series)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric

from ...metrics import DaemonMetrics, Source
from ...storage.analytics import AnalyticsStore

P = "mwapjobs_analytics_"


async def _read(store: AnalyticsStore) -> dict[str, Any]:
    return await store.latest_platform() or {}


def families(doc: dict[str, Any] | None) -> list[Metric]:
    def gauge(name: str, text: str, labels: list[str] | None = None) -> GaugeMetricFamily:
        return GaugeMetricFamily(P + name, text, labels=labels)

    simple = {
        "tenants": gauge("tenants", "Tenants (last daily snapshot)."),
        "projects": gauge("projects", "Projects (last daily snapshot)."),
        "members": gauge("members", "Project members, each once per tenant (last snapshot)."),
        "storage_used_bytes": gauge("storage_used_bytes",
                                    "Storage used in connected integrations (last snapshot)."),
        "storage_allocated_bytes": gauge("storage_allocated_bytes",
                                         "Storage allocated to them (last snapshot)."),
        "indexed_files": gauge("indexed_files", "Files in the file index (last snapshot)."),
        "indexed_bytes": gauge("indexed_bytes", "Their bytes (last snapshot)."),
        "snapshot_timestamp_seconds": gauge("snapshot_timestamp_seconds",
                                            "When the last platform snapshot was computed."),
    }
    integrations = gauge("integrations", "Integrations by status (last snapshot).", ["status"])
    refreshes = gauge("day_refreshes", "Token refreshes of the snapshot's day, by outcome.",
                      ["outcome"])
    out: list[Metric] = [*simple.values(), integrations, refreshes]
    if not doc:
        return out
    quota = doc.get("quota") or {}
    files = doc.get("files") or {}
    at = doc.get("computedAt")
    values = {"tenants": doc.get("tenants"), "projects": (doc.get("projects") or {}).get("total"),
              "members": doc.get("members"), "storage_used_bytes": quota.get("used"),
              "storage_allocated_bytes": quota.get("allocated"),
              "indexed_files": files.get("files"), "indexed_bytes": files.get("bytes"),
              "snapshot_timestamp_seconds": at.timestamp() if isinstance(at, datetime) else None}
    for name, value in values.items():
        if isinstance(value, int | float):
            simple[name].add_metric([], float(value))
    for status, n in ((doc.get("integrations") or {}).get("byStatus") or {}).items():
        integrations.add_metric([str(status)], float(n))
    for outcome, n in (doc.get("refresh") or {}).items():
        refreshes.add_metric([str(outcome)], float(n))
    return out


def add_metrics(metrics: DaemonMetrics, store: AnalyticsStore) -> None:
    metrics.add_source(Source("analytics", lambda: _read(store), families))
