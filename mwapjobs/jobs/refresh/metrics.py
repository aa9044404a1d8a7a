"""Token refresh's metrics: attempts by outcome (from the engine's events) and, read at
each scrape, the backend's integrations by status."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily, Metric

from ...metrics import DaemonMetrics, Source
from ...storage.integrations import IntegrationStore
from .runs import QUEUE

OUTCOMES = ("refreshed", "skipped", "transient_failure", "permanent_failure")


def refresh_outcome(event: str, run: Mapping[str, Any]) -> str | None:
    """A `token-refresh` attempt's outcome, or None for events that are not one (stalls)."""
    if event == "completed":
        result = run.get("result")
        return "skipped" if isinstance(result, dict) and "skipped" in result else "refreshed"
    if event == "retrying":
        return "transient_failure"
    if event == "failed":
        permanent = (run.get("error") or {}).get("permanent")
        return "permanent_failure" if permanent else "transient_failure"
    return None


def add_metrics(metrics: DaemonMetrics, store: IntegrationStore, *, refreshing: bool) -> None:
    """The integrations gauge always (it is MWAP's data); the outcome counter when this
    daemon refreshes."""
    metrics.add_source(Source("integrations", store.count_by_status, _integration_families))
    if not refreshing:
        return
    refreshes = Counter("mwapjobs_token_refresh", "Token refresh attempts by outcome.",
                        ["outcome"], registry=metrics.registry)
    for outcome in OUTCOMES:
        refreshes.labels(outcome)

    def on_event(event: str, run: dict[str, Any]) -> None:
        if run.get("queue") == QUEUE:
            outcome = refresh_outcome(event, run)
            if outcome is not None:
                refreshes.labels(outcome).inc()

    metrics.engine.subscribe(on_event)


def _integration_families(counts: Mapping[str, int] | None) -> list[Metric]:
    family = GaugeMetricFamily("mwapjobs_integrations", "Cloud provider integrations by status.",
                               labels=["status"])
    for status, count in sorted((counts or {}).items()):
        family.add_metric([str(status)], float(count))
    return [family]
