"""File indexing: every project's cloud folder mirrored into `virtualFiles`, kept current
incrementally, so that the backend can answer from MongoDB instead of asking the
provider on every request.

- `schedule.py`: the repeat that adds a sweep, and where each project's pass falls;
- `indexer.py`: the `file-index` job: the sweep, and one project's pass;
- `dropbox.py`, `drive.py`, `graph.py`: listing each provider (pages, cursors);
- `client.py`: one request (outbound policy, shared limits, rate limits, 401 → refresh);
- `parse.py`: provider items checked and turned into entries (pure);
- `decide.py`: what an answer means, when to retry, which pass, who is indexed (pure);
- `feed.py`: pages fetched one ahead of the writer;
- `writer.py`: pages into `virtualFiles` in batches (the queries: storage/files.py);
- `api.py`, `rules.py`, `metrics.py`: its HTTP routes, alert rule and metrics.
"""

from __future__ import annotations

import logging

from ...storage.files import FileIndexStore
from ..context import JobContext, JobPlugin
from .api import OPENAPI, FilesApi, routes
from .indexer import FileIndexer
from .metrics import FileMetrics
from .rules import sync_failing
from .schedule import schedule, unschedule

log = logging.getLogger(__name__)


def register(ctx: JobContext) -> FileIndexer | None:
    settings = ctx.settings.files
    store = FileIndexStore(ctx.mongo)
    indexer = None
    if settings.enabled and ctx.cipher is None:
        log.warning("file indexing is off: it needs ENCRYPTION_KEY to read the access tokens")
    if settings.enabled and ctx.cipher is not None:
        refreshing = ctx.jobs.get("refresh") is not None  # else a 401 is final
        indexer = FileIndexer(
            store=store, integrations=ctx.integrations, cipher=ctx.cipher, http=ctx.http,
            policy=ctx.policy, shared=ctx.limiter, settings=settings,
            refresh=ctx.settings.refresh if refreshing else None, engine=ctx.engine,
            clock=ctx.clock, user_agent=ctx.settings.refresh.user_agent,
            metrics=FileMetrics(ctx.metrics, store))
    ctx.add_routes(routes(FilesApi(indexer, store, settings)), OPENAPI)
    if indexer is None:
        ctx.when_ready("files:unschedule", lambda: unschedule(ctx.engine))
        return None
    indexer.register(ctx.engine.registry)
    ctx.engine.subscribe(indexer.on_event)
    ctx.on_stopping.append(indexer.interrupt)
    ctx.alerts.add_rule(sync_failing(store, settings))

    async def start() -> None:
        await store.ensure_indexes()
        await schedule(ctx.engine, settings)

    ctx.when_ready("files:start", start)
    return indexer


PLUGIN = JobPlugin("files", register)
