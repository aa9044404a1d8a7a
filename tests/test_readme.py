"""README.md as a user reads it: what it says runs, runs.

- Every ```python block is a whole program: it is executed as it is, in a fresh
  interpreter with a clean environment (the embedded store), with a timeout.
- Every `mwapjobs ...` command it shows, in code blocks and inline code, names a
  real command and real options: each is checked against `mwapjobs --help` and
  `mwapjobs COMMAND --help`.
- The operator's tour is followed against a real `mwapjobs demo` process: a token
  from `mwapjobs admin-token`, the tour's `TOKEN=` and `export H=... API=...` lines
  as written, then every `curl` line of the tour (placeholders in capitals
  replaced), none of which may answer 400, 401, 403 or 5xx.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from typing import IO

import pytest

from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
# `mwapjobs` in command position: at the start of a code line or span, after a path
# (`.venv/bin/mwapjobs`), or after `&&`, `;`, `|`.
INVOCATION = re.compile(
    r"(?:^|&&|;|\||`)\s*(?:[\w./-]*/)?mwapjobs(?![\w./-])((?:[ \t]+[^\s`|&;#]+)*)", re.M)
PLACEHOLDER = re.compile(r"^[A-Z][A-Z_]*$")
TIMEOUT = 90


def blocks(language: str | None = None, text: str = README) -> list[str]:
    return [body for lang, body in FENCE.findall(text) if language is None or lang == language]


def section(title: str) -> str:
    """The text of one `## title` section, up to the next `## `."""
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end != -1 else None]


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any mwapjobs or MWAP setting, plus `extra`."""
    mwap = {"MONGODB_URI", "ENCRYPTION_KEY", "AUTH0_DOMAIN", "AUTH0_AUDIENCE",
            "ALERTING_ENABLED", "SLACK_WEBHOOK_URL", "ALERT_WEBHOOK_URL",
            "ALERT_EMAIL_RECIPIENTS"}
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MWAPJOBS_", "SMTP_")) and k not in mwap}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def mwapjobs(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mwapjobs", *args], capture_output=True,
                          text=True, timeout=60, cwd=ROOT, env=env or clean_env())


# -- Python ------------------------------------------------------------------------------------


def test_readme_has_python_examples() -> None:
    assert blocks("python"), "the README lost its Python example (or this test its parser)"


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_block_runs_as_written(index: int) -> None:
    code = blocks("python")[index]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=TIMEOUT, cwd=ROOT, env=clean_env())
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    if "send_report" in code:  # "Adding work from Python": its run completed, and counted
        assert re.search(r"^completed [0-9a-f]{24} ", result.stdout, re.M), result.stdout
        counts = result.stdout.strip().splitlines()[-1]
        assert "'completed': 1" in counts and "'delayed': 1" in counts, result.stdout


# -- mwapjobs commands -------------------------------------------------------------------------


def code_texts() -> list[str]:
    """Fenced blocks, and the inline code spans of the prose around them."""
    prose = FENCE.sub("", README)
    return blocks() + re.findall(r"`([^`\n]+)`", prose)


def invocations() -> list[tuple[str, list[str]]]:
    """(command, options) of every `mwapjobs ...` shown; a placeholder command is ''."""
    found = []
    for text in code_texts():
        for line in text.replace("\\\n", " ").splitlines():
            if line.lstrip().startswith("#"):
                continue
            for match in INVOCATION.finditer(line):
                words = [w.strip("[]") for w in match.group(1).split()]
                command = words[0] if words and not words[0].startswith("-") else ""
                if PLACEHOLDER.match(command):
                    command = ""
                options = [w.split("=")[0] for w in words if w.startswith("--")]
                found.append((command, options))
    return found


@cache
def help_text(command: str) -> str:
    result = mwapjobs(*([command] if command else []), "--help")
    assert result.returncode == 0, (command, result.stderr)
    return result.stdout


def listed_commands() -> set[str]:
    """The commands `mwapjobs --help` lists, one per line under "commands:"."""
    text = help_text("")
    listing = text[text.index("\ncommands:\n"):]
    return set(re.findall(r"^    ([a-z][a-z-]*)", listing, re.M))


def test_every_mwapjobs_command_shown_is_real() -> None:
    shown = invocations()
    commands = {c for c, _ in shown}
    # The parser above must see what the README shows, or this test proves nothing.
    assert {"serve", "check-config", "demo", "admin-token"} <= commands, shown
    assert any("--version" in options for _, options in shown), shown
    real = listed_commands()
    assert {"serve", "check-config", "demo", "admin-token"} <= real
    for command, options in shown:
        assert not command or command in real, f"`mwapjobs {command}` is no command"
        text = help_text(command)
        for option in options:
            assert re.search(rf"(^|[\s,\[]){re.escape(option)}\b", text), (
                f"`mwapjobs {command} {option}`: no such option")


def test_the_commands_table_lists_every_command() -> None:
    table = section("Commands")
    documented = set(re.findall(r"^\| `mwapjobs ([a-z][a-z-]*)", table, re.M))
    assert documented == listed_commands()


# -- the operator's tour -----------------------------------------------------------------------


@dataclass
class Demo:
    process: subprocess.Popen[str]
    token: str
    port: int
    lines: list[str]


def _read(stream: IO[str], into: list[str]) -> None:
    for line in stream:
        into.append(line)


def _wait(predicate: Callable[[], object], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def _get(url: str, token: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


@pytest.fixture
def demo() -> Iterator[Demo]:
    made = mwapjobs("admin-token", "readme")
    assert made.returncode == 0, made.stderr
    [token] = re.findall(r"^    (mwj_\S+)$", made.stdout, re.M)
    [tokens] = re.findall(r"^MWAPJOBS_ADMIN__TOKENS='(.*)'$", made.stdout, re.M)
    env = clean_env(MWAPJOBS_ADMIN__TOKENS=tokens, MWAPJOBS_HTTP__PORT="0",
                    MWAPJOBS_HTTP__HOST="127.0.0.1")
    process = subprocess.Popen([sys.executable, "-m", "mwapjobs", "demo", "--job-seconds",
                                "0.1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, cwd=ROOT, env=env)
    assert process.stdout is not None
    lines: list[str] = []
    threading.Thread(target=_read, args=(process.stdout, lines), daemon=True).start()
    try:
        def listening() -> int | None:
            for line in list(lines):
                if '"listening"' in line:
                    return int(json.loads(line)["port"])
            assert process.poll() is None, "".join(lines)
            return None

        _wait(lambda: listening() is not None, "the daemon to listen")
        port = listening()
        assert port is not None
        base = f"http://127.0.0.1:{port}"
        _wait(lambda: _get(f"{base}/readyz")[0] == 200, "/readyz")

        def a_failed_demo_run() -> bool:
            status, body = _get(f"{base}/api/v1/queues/demo/runs?state=failed", token)
            return status == 200 and json.loads(body)["data"]["total"] > 0

        _wait(a_failed_demo_run, "the demo's failed run")
        yield Demo(process, token, port, lines)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def tour_commands() -> tuple[list[str], list[str]]:
    """The tour's lines that set TOKEN, H and API, and its curl commands (one per entry,
    continuation lines joined, comments dropped)."""
    tour = section("Operator's tour")
    setup, curls = [], []
    for body in blocks("sh", tour):
        for line in body.replace("\\\n", " ").splitlines():
            if re.match(r"(export )?(TOKEN|H|API)=", line.strip()):
                setup.append(line)
            elif line.startswith("curl "):
                curls.append(re.sub(r"\s+#\s.*$", "", line))
    return setup, curls


def test_the_tours_token_lines_give_h_the_token() -> None:
    setup, _ = tour_commands()
    assert setup and setup[0].startswith("TOKEN=mwj_…"), setup
    script = "\n".join(setup).replace("mwj_…", "mwj_example") + '\nprintf %s "$H|$API"'
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=10,
                         env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    assert out.stdout == "Authorization: Bearer mwj_example|http://localhost:8080/api/v1", out


@pytest.mark.skipif(shutil.which("curl") is None or shutil.which("bash") is None,
                    reason="needs curl and bash")
def test_every_curl_of_the_tour_works_as_written(demo: Demo) -> None:
    setup, curls = tour_commands()
    assert len(curls) >= 18, curls
    base = f"http://127.0.0.1:{demo.port}"
    _, body = _get(f"{base}/api/v1/queues/demo/runs?state=failed", demo.token)
    run_id = json.loads(body)["data"]["items"][0]["runId"]
    preamble = "\n".join(setup).replace("mwj_…", demo.token)
    statuses, piped = {}, []
    for curl in curls:
        concrete = (curl.replace("localhost:8080", f"127.0.0.1:{demo.port}")
                    .replace("QUEUE", "demo").replace("RUN_ID", run_id)
                    .replace("TENANT", "t1").replace("/ID/", "/i1/"))
        if "|" in concrete:  # a pipeline (metrics | grep): it must print something
            command = concrete
        else:
            command = concrete.replace("curl -s ", "curl -s -o /dev/null -w '%{http_code}' ", 1)
        out = subprocess.run(["bash", "-c", f"{preamble}\n{preamble_api(demo)}\n{command}"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, (curl, out.stdout, out.stderr)
        if "|" in concrete:
            piped.append(out.stdout)
            assert out.stdout.strip(), curl
        else:
            statuses[curl] = int(out.stdout)
    assert piped, "the tour's metrics pipeline was not found"
    for curl, code in statuses.items():
        allowed = {404} if "TENANT" in curl else {200, 201, 202, 409}
        assert code in allowed, f"{curl}: HTTP {code}\n{''.join(demo.lines[-20:])}"


def preamble_api(demo: Demo) -> str:
    """The tour's API is the VM's localhost:8080; this daemon listens elsewhere."""
    return f"API=${{API/localhost:8080/127.0.0.1:{demo.port}}}"


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_the_health_endpoints_shown_answer(demo: Demo) -> None:
    block = next(b for b in blocks("sh", section("HTTP endpoints")) if "/healthz" in b)
    for line in block.splitlines():
        if not line.startswith("curl "):
            continue
        command = (re.sub(r"\s+#\s.*$", "", line).replace("localhost:8080",
                                                          f"127.0.0.1:{demo.port}"))
        out = subprocess.run(["bash", "-c", command], capture_output=True, text=True,
                             timeout=30)
        assert json.loads(out.stdout)["success"] is True, (line, out.stdout)
