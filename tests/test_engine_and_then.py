"""A handler's next run, returned with its result (`AndThen`): written in the same round
trip as the completion, only when the run completes; a pending run of the same job id
is moved instead of doubled (tests/support/engines.py)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from bson import ObjectId
from pydantic import BaseModel

from mwapjobs.engine import as_utc, utcnow
from mwapjobs.queues import AndThen, Job, QueueRegistry
from mwapjobs.storage.mongo import Mongo
from mwapjobs.storage.runs import Outcome, new_run
from tests.conftest import wait_for
from tests.support import engines
from tests.support.engines import MakeEngine, all_runs, registry, wait_state

make_engine = engines.make_engine


async def test_the_next_run_is_written_with_the_completion(
        make_engine: MakeEngine, mongo: Mongo) -> None:
    seen: list[int] = []

    async def handler(job: Job) -> Any:
        n = int(job.data["n"])
        seen.append(n)
        if n >= 3:
            return {"last": n}
        return AndThen({"n": n}, {"n": n + 1}, job_id="chain",
                       run_at=utcnow() + timedelta(seconds=0.2))

    engine = await make_engine(registry(handler))
    trips: list[int] = []
    write = engine.runs.write_outcomes

    async def counted(*args: Any) -> Any:  # the round trips of each outcome write
        before = mongo.round_trips
        try:
            return await write(*args)
        finally:
            trips.append(mongo.round_trips - before)

    engine.runs.write_outcomes = counted  # type: ignore[method-assign]
    await engine.add("q", {"n": 1}, job_id="chain")
    await wait_for(lambda: seen == [1, 2, 3], message="the chain of three runs")
    await wait_for(lambda: len(trips) == 3, message="three outcome writes")
    runs = [r for r in await all_runs(mongo) if r["state"] == "completed"]
    assert sorted(r["data"]["n"] for r in runs) == [1, 2, 3]
    assert {r["result"].get("n", r["result"].get("last")) for r in runs} == {1, 2, 3}
    assert trips == [1, 1, 1]  # the completion and the next run: one round trip
    first, second = sorted(runs, key=lambda r: r["data"]["n"])[:2]
    assert second["createdAt"] >= first["finishedAt"] - timedelta(milliseconds=1)
    assert second["runAt"] > first["finishedAt"]  # delayed by 0.2 s: the timer ran it


async def test_no_next_run_unless_the_run_completes(make_engine: MakeEngine,
                                                    mongo: Mongo) -> None:
    class NotReally(Exception):
        pass

    async def handler(job: Job) -> Any:
        raise NotReally("fails after deciding its next run")

    engine = await make_engine(registry(handler, attempts=1))
    added = await engine.add("q", {}, job_id="x")
    await wait_state(engine, added.run_id, "failed")
    assert len(await all_runs(mongo)) == 1


async def test_a_run_added_meanwhile_is_moved_not_doubled(make_engine: MakeEngine,
                                                          mongo: Mongo) -> None:
    """The completion frees the job id; if a run of it is pending by the time the next
    run is inserted (someone added one, or an earlier try of this write inserted it),
    that run takes the next run's time and data, as `add(replace=True)` does."""
    engine = await make_engine(registry(_unused), start=False)
    await engine.runs.ensure_indexes()  # the job id's uniqueness among pending runs
    meanwhile = await engine.add("q", {"n": 9}, job_id="j", delay=600)
    now, later = utcnow(), utcnow() + timedelta(hours=1)
    follow = new_run("q", {"n": 2}, job_id="j", due=later, now=now, priority=0,
                     max_attempts=1, backoff={}, timeout=None, deadline=None)
    finished = Outcome(ObjectId(), {"state": "completed", "finishedAt": now},
                       {"attempt": 1}, follow)
    for _ in range(2):  # and a retry of the same write: still one run
        await engine.runs.write_outcomes("someone", [finished], "token")
        [pending] = [r for r in await all_runs(mongo) if r["state"] in ("delayed", "waiting")]
        assert str(pending["_id"]) == meanwhile.run_id and pending["data"] == {"n": 2}
        assert abs(as_utc(pending["runAt"]) - later) < timedelta(milliseconds=1)


async def _unused(job: Job) -> None:
    raise AssertionError("not started")


async def test_a_next_run_whose_data_does_not_fit_fails_the_run(
        make_engine: MakeEngine, mongo: Mongo) -> None:
    class Data(BaseModel):
        n: int

    async def handler(job: Job) -> Any:
        return AndThen("ok", {"n": "not a number"}, job_id="j", run_at=utcnow())

    reg = QueueRegistry()
    reg.register("q", handler, data=Data, attempts=1)
    engine = await make_engine(reg)
    added = await engine.add("q", {"n": 1}, job_id="j")
    run = await wait_state(engine, added.run_id, "failed")
    assert run["error"]["permanent"] is True and "data.n" in run["error"]["message"]
    assert len(await all_runs(mongo)) == 1
