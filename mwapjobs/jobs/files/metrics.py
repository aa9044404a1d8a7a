"""File indexing's metrics: items written by change, provider calls by provider kind and
outcome (`decide.OUTCOMES`), and, read at each scrape, projects by index state."""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily, Metric

from ...metrics import DaemonMetrics, Source
from ...storage.files import FileIndexStore
from ..providers import Kind
from .decide import OUTCOMES, Outcome

CHANGES = ("added", "changed", "removed")
KINDS: tuple[Kind, ...] = ("dropbox", "google", "microsoft")


class FileMetrics:
    def __init__(self, metrics: DaemonMetrics, store: FileIndexStore) -> None:
        self.indexed_total = Counter(
            "mwapjobs_files_indexed", "Items written into virtualFiles, by change.",
            ["change"], registry=metrics.registry)
        self.calls = Counter(
            "mwapjobs_file_provider_calls",
            "Requests of file indexing to providers' APIs, by provider kind and outcome.",
            ["provider", "outcome"], registry=metrics.registry)
        for change in CHANGES:
            self.indexed_total.labels(change)
        for kind in KINDS:
            for outcome in OUTCOMES:
                self.calls.labels(kind, outcome)
        metrics.add_source(Source("file_index", store.count_by_state, _state_families))

    def call(self, kind: str, outcome: Outcome) -> None:
        self.calls.labels(kind, outcome).inc()

    def indexed(self, added: int, changed: int, removed: int) -> None:
        for change, n in zip(CHANGES, (added, changed, removed), strict=True):
            if n:
                self.indexed_total.labels(change).inc(n)


def _state_families(counts: Mapping[str, int] | None) -> list[Metric]:
    family = GaugeMetricFamily("mwapjobs_file_index_projects",
                               "Projects by file index state (synced, running, error, ...).",
                               labels=["state"])
    for state, n in sorted((counts or {}).items()):
        family.add_metric([state], float(n))
    return [family]
