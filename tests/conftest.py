"""Shared fixtures.

By default every test gets a fresh embedded (mongomock) database. Set
MWAPJOBS_TEST_MONGODB_URI=mongodb://host:27017 to run the same tests against a
real server; each test then gets its own database, dropped afterwards.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import mongomock
import pymongo
import pytest

from mwapjobs.config import Settings
from mwapjobs.storage.mongo import Mongo
from tests.support.wire_server import SecantusServer, secantusd_path

# The token-refresh world's fixtures (oauth_server, oauth, tls_server, world); a module
# that defines a fixture of the same name uses its own.
pytest_plugins = ("tests.support.refresh_world", "tests.support.hang_guard")

REAL_MONGODB_URI = os.environ.get("MWAPJOBS_TEST_MONGODB_URI")
ROOT = Path(__file__).resolve().parents[1]
TEST_ENCRYPTION_KEY = "0123456789abcdef0123456789abcdef"
# Engines that share a database (restarts, two instances) must sign triggers alike.
TEST_SIGNING_KEY = b"mwapjobs-test-signing-key-000000"


def make_mongo() -> tuple[Mongo, Callable[[], None]]:
    """A fresh database and a function that disposes of it."""
    if REAL_MONGODB_URI:
        name = f"mwapjobs_test_{uuid.uuid4().hex[:12]}"
        mongo = Mongo.connect(REAL_MONGODB_URI, db_name=name)

        def drop() -> None:
            with pymongo.MongoClient(REAL_MONGODB_URI) as client:
                client.drop_database(name)

        return mongo, drop
    return Mongo.from_clients(mongomock.MongoClient(tz_aware=True)), lambda: None


@pytest.fixture
async def mongo() -> AsyncIterator[Mongo]:
    m, drop = make_mongo()
    yield m
    await m.aclose()
    drop()


def make_settings(**overrides: Any) -> Settings:
    """Settings for in-process tests: port 0, short intervals, no config file."""
    base: dict[str, Any] = {
        "mongodb_uri": REAL_MONGODB_URI or "memory://",
        "encryption_key": TEST_ENCRYPTION_KEY,
        "http": {"host": "127.0.0.1", "port": 0},
        "engine": {"lease_seconds": 3, "sweep_interval": 0.5, "retention_interval": 3600},
        "mongodb": {"ping_interval": 0.5, "server_selection_timeout": 1},
        "shutdown_timeout": 5,
        # Provider simulators and token servers listen on 127.0.0.1 over plain http.
        "outbound": {"allow_loopback": True},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return Settings(**base)


async def wait_for(predicate: Callable[[], Awaitable[bool] | bool], timeout: float = 10.0,
                   interval: float = 0.02, message: str = "condition") -> None:
    """Poll until `predicate` is true; fail with `message` after `timeout` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        outcome = predicate()
        if not isinstance(outcome, bool):
            outcome = await outcome
        if outcome:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        await asyncio.sleep(interval)


@pytest.fixture
def secantus_server(tmp_path: Path) -> Iterator[Callable[..., SecantusServer]]:
    """A factory of private MongoDB-wire servers (secantusd-py) that a test may freeze,
    kill and restart: `start(*extra_args)`, e.g. `start("--enable-test-commands")` for
    failpoints. Every server it started is stopped afterwards. Skips the test when there
    is no secantusd-py (MWAPJOBS_TEST_SECANTUSD, or .venv-secantus from .ci/setup)."""
    executable = secantusd_path()
    if executable is None or not executable.exists():
        pytest.skip("needs its own MongoDB-wire server: set MWAPJOBS_TEST_SECANTUSD to a "
                    "secantusd-py, or run .ci/setup to make .venv-secantus")
    started: list[SecantusServer] = []

    def start(*extra_args: str) -> SecantusServer:
        server = SecantusServer(executable, tmp_path / f"secantus-{len(started)}",
                                extra_args=extra_args)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()
