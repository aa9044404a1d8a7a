"""A pass survives a restart midway: it resumes from the last page it wrote, not from
zero. A killed engine (as SIGKILL: nothing more is written) during a Google Drive walk,
whose folders to list live in MongoDB; a graceful stop during a Dropbox listing. Each
test runs two daemons, one after the other, on one database."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

from mwapjobs.engine import Engine
from mwapjobs.jobs.files.schedule import QUEUE, job_id
from tests.conftest import make_mongo, wait_for
from tests.support.file_providers import FileProviderServer
from tests.support.files_world import KIND_TAGS, files_world
from tests.support.oauth_server import OAuthServer

pytestmark = pytest.mark.asyncio(loop_scope="function")


async def finished(engine: Engine, run_id: str) -> dict[str, Any]:
    """The run once it completed (a postponed run is settled, not finished)."""
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        run = await engine.wait_settled(run_id, 5)
        assert run is not None
        if run["state"] in ("completed", "failed") or \
                asyncio.get_running_loop().time() > deadline:
            assert run["state"] == "completed", run
            return run
        await asyncio.sleep(0.05)


def routes(sim: FileProviderServer, tag: str) -> Counter[str]:
    return Counter(r.route for r in sim.requests if r.tag == tag)


async def test_a_killed_daemon_s_drive_walk_resumes_where_it_stopped() -> None:
    mongo, drop = make_mongo()
    tag = KIND_TAGS["google"]
    try:
        with OAuthServer() as oauth:
            async with FileProviderServer(latency=0.02, max_page=2) as sim:
                tree = sim.tree(tag)
                for folder in ("a", "b", "c"):
                    for n in range(4):
                        tree.add(f"/Crash/{folder}/f{n}.txt")
                async with files_world(mongo, oauth, sim, page_size=2) as first:
                    project = await first.project("google", "/Crash")
                    added = await first.daemon.engine.add(
                        QUEUE, {"projectId": project.id}, job_id=job_id(project.id))
                    await wait_for(lambda: first.indexer.running.get(project.id, {}).get(
                        "pages", 0) >= 3, message="three pages written", timeout=30)
                    await first.daemon.engine.kill()
                    written_first = first.indexer.running.get(project.id, {}).get("pages", 0)
                before = routes(sim, tag)
                assert before["changes/startPageToken"] == 1

                async with files_world(mongo, oauth, sim, page_size=2) as second:
                    # The run is taken back once its lease expires, and resumes.
                    run = await finished(second.daemon.engine, added.run_id)
                    report = run["result"]
                    docs = await second.files(project)
                after = routes(sim, tag) - before

        assert set(docs) == {tree.path(i.id) for i in tree.below(tree.get("/Crash").id)}
        assert report["resumed"] is True and report["mode"] == "full"
        assert after["changes/startPageToken"] == 0  # the walk is not begun anew
        full_walk = 2 + 3 * 2  # the folder's two pages, then two for each subfolder
        assert after["files"] <= full_walk - written_first + 1, (after, written_first)
        assert report["files"] == 12 and report["folders"] == 3
    finally:
        await mongo.aclose()
        drop()


async def test_a_graceful_stop_midway_hands_the_pass_to_the_next_start() -> None:
    mongo, drop = make_mongo()
    tag = KIND_TAGS["dropbox"]
    try:
        with OAuthServer() as oauth:
            async with FileProviderServer(latency=0.05, max_page=2) as sim:
                tree = sim.tree(tag)
                for n in range(10):
                    tree.add(f"/Stop/f{n}.txt")
                async with files_world(mongo, oauth, sim, page_size=2) as first:
                    project = await first.project("dropbox", "/Stop")
                    added = await first.daemon.engine.add(
                        QUEUE, {"projectId": project.id}, job_id=job_id(project.id))
                    await wait_for(lambda: first.indexer.running.get(project.id, {}).get(
                        "pages", 0) >= 2, message="two pages written", timeout=30)
                    await first.daemon.stop()  # SIGTERM: the pass stops after its page
                before = routes(sim, tag)
                async with files_world(mongo, oauth, sim, page_size=2) as second:
                    run = await finished(second.daemon.engine, added.run_id)
                    docs = await second.files(project)
                after = routes(sim, tag) - before

        assert set(docs) == {f"/Stop/f{n}.txt" for n in range(10)}
        assert run["result"]["resumed"] is True
        assert before["list_folder"] == 1 and after["list_folder"] == 0  # never from zero
        # Six pages (the folder itself is the first item): one list_folder, five continues,
        # plus at most the page fetched ahead and the one in flight when it stopped.
        assert before["list_folder/continue"] + after["list_folder/continue"] <= 5 + 2
        assert run["attempts"][0]["outcome"] == "postponed"  # the stop: no attempt used
    finally:
        await mongo.aclose()
        drop()
