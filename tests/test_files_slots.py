"""A provider's pass slots (`files.provider_concurrency`): a pass that finds them all
taken is put back at once (no attempt used, its queue slot free for other providers'
projects) and made due as soon as a slot frees, not when its fallback delay ends."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from mwapjobs.jobs.files import indexer as indexer_module
from mwapjobs.jobs.files.schedule import QUEUE, job_id
from tests.conftest import wait_for
from tests.support.files_world import KIND_TAGS, module_world

pytestmark = pytest.mark.asyncio(loop_scope="function")


async def test_a_pass_put_back_for_want_of_a_slot_starts_when_one_frees(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(indexer_module, "POSTPONE_FOR", 3600.0)  # only a wake brings it back
    async with module_world(provider_concurrency=1) as w:
        tag = KIND_TAGS["dropbox"]
        w.tree("dropbox").add("/SlotA/a.txt")
        w.tree("dropbox").add("/SlotB/b.txt")
        first = await w.project("dropbox", "/SlotA")
        second = await w.project("dropbox", "/SlotB")
        engine = w.daemon.engine
        w.sim.hold(tag)
        a = await engine.add(QUEUE, {"projectId": first.id}, job_id=job_id(first.id))
        await wait_for(lambda: first.id in w.indexer.running, message="the first pass runs")

        b = await engine.add(QUEUE, {"projectId": second.id}, job_id=job_id(second.id))
        put_back = await b.settled(20)

        assert put_back is not None and put_back["state"] == "delayed"
        assert put_back["attempts"][-1]["outcome"] == "postponed"
        assert put_back["attemptsMade"] == 0  # no attempt used
        assert put_back["runAt"] - put_back["attempts"][-1]["finishedAt"] > timedelta(hours=1)
        assert second.id not in w.indexer.running

        w.sim.release(tag)

        async def state(run_id: str) -> Any:
            run = await engine.wait_settled(run_id, 0)
            return run["state"] if run else None

        await wait_for(lambda: _is(state(a.run_id), "completed"), timeout=20,
                       message="the first pass done")
        await wait_for(lambda: _is(state(b.run_id), "completed"), timeout=20,
                       message="the second pass made due when the slot freed")
        assert set(await w.files(second)) == {"/SlotB/b.txt"}


async def _is(value: Any, expected: str) -> bool:
    return bool(await value == expected)
