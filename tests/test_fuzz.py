"""Property-based fuzzing of the admin API with schemathesis, against the running app.

Schemathesis reads /api/v1/openapi.json and sends generated and boundary
requests to every operation. Whatever it sends, the daemon must answer without
a 5xx (other than a documented 503), with a documented status, and in the MWAP
envelope the document declares.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mwapjobs.daemon import Daemon
from mwapjobs.jobs import demo
from mwapjobs.storage.mongo import Mongo
from tests.conftest import make_settings

pytestmark = pytest.mark.slow
TOKEN = "mwj_fuzzing-token-abcdefghijklmnop"
ST = shutil.which("st") or str(Path(sys.executable).with_name("st"))


@pytest.fixture
async def daemon(mongo: Mongo) -> AsyncIterator[Daemon]:
    settings = make_settings(admin={"tokens": [
        {"name": "fuzz", "sha256": hashlib.sha256(TOKEN.encode()).hexdigest()}]})
    d = Daemon(settings, mongo=mongo)
    demo.add_queue(d.registry)
    await d.start()
    await d.wait_ready()
    await demo.seed(d.engine, job_seconds=0.01)
    yield d
    await d.stop()


@pytest.mark.skipif(not Path(ST).exists(), reason="schemathesis is not installed")
async def test_schemathesis_finds_no_server_errors_and_only_envelopes(
    daemon: Daemon, tmp_path: Path
) -> None:
    base = f"http://127.0.0.1:{daemon.port}"
    proc = await asyncio.create_subprocess_exec(
        ST, "run", f"{base}/api/v1/openapi.json",
        "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
                    "response_schema_conformance",
        "--header", f"Authorization: Bearer {TOKEN}",
        "--max-examples", "15", "--seed", "7", "--phases", "examples,coverage,fuzzing",
        "--request-timeout", "10", "--max-time", "45", "--no-color",
        cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(proc.communicate(), timeout=300)
    text = output.decode(errors="replace")
    assert proc.returncode == 0, text[-6000:]
    assert "passed" in text.lower()
