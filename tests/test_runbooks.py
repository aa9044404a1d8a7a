"""The runbooks (docs/runbooks/): every alert rule a fully enabled daemon registers has
its page, and every `curl` line in them names a route the daemon serves, with the
method it serves it for and the conventions the pages promise (127.0.0.1:8080, the
admin token as `Authorization: Bearer $MWAPJOBS_TOKEN`)."""

from __future__ import annotations

import re
import shlex
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from aiohttp import web

from mwapjobs.daemon import Daemon
from mwapjobs.storage.mongo import Mongo
from tests.conftest import ROOT, make_settings

RUNBOOKS = ROOT / "docs" / "runbooks"
BASE = "http://127.0.0.1:8080"
AUTH_HEADER = "Authorization: Bearer $MWAPJOBS_TOKEN"
PUBLIC_API = {"/api/v1/openapi.json"}  # under /api/v1 but needs no token
# The rules of the generic alert manager and of the jobs on by default: the daemon of
# the test must register at least these, or it is not the fully enabled one.
EXPECTED_RULES = {
    "mongodb_down", "failed_runs", "backlog", "alert_channel_failing",
    "scheduler_documents_rejected", "refresh_failures", "provider_on_hold",
    "provider_url_changed", "health_sweep_missed", "file_sync_failing",
}
RULE_SECTIONS = ("## What it means", "## Confirm", "## What to do", "## Over when")
# What may stand in a path parameter's place: a placeholder (QUEUE, RUN_ID) or a shell
# variable ($TENANT, ${ID}); a queue must otherwise be a real one, a run id 24 hex digits.
PLACEHOLDER = re.compile(r"[A-Z][A-Z0-9_]*|\$[A-Za-z_][A-Za-z0-9_]*|\$\{[A-Za-z_][A-Za-z0-9_]*\}")
SHELL_OPERATORS = {"|", "||", "&&", ";", "&", ">", ">>", "<", "2>", "2>&1"}
# curl options followed by a value (the ones the pages may use).
VALUE_OPTIONS = {"-H", "--header", "-o", "--output", "-w", "--write-out", "-u", "--user",
                 "-m", "--max-time", "--connect-timeout", "-A", "--user-agent", "-b",
                 "--cookie", "-c", "--cookie-jar", "-e", "--referer"}
DATA_OPTIONS = {"-d", "--data", "--data-raw", "--data-binary", "--data-urlencode", "--json",
                "-F", "--form"}


@pytest.fixture
async def daemon(mongo: Mongo) -> AsyncIterator[Daemon]:
    """A daemon with everything on (alerting, refresh, health and the other default
    jobs), its jobs plugged in by `app()`; nothing is started."""
    d = Daemon(make_settings(alerting_enabled=True), mongo=mongo)
    d.app()
    yield d
    assert d.http is not None
    await d.http.close()


def pages() -> list[Path]:
    return sorted(p for p in RUNBOOKS.glob("*.md") if p.name != "README.md")


def rule_pages() -> list[Path]:
    """Pages named like a rule (snake_case); operation pages are kebab-case."""
    return [p for p in pages() if "-" not in p.stem]


# -- (a) every alert rule has its runbook ---------------------------------------------


async def test_every_alert_rule_has_a_runbook(daemon: Daemon) -> None:
    rules = {rule.name for rule in daemon.alerts.rules}
    assert rules >= EXPECTED_RULES, f"not the fully enabled daemon: {EXPECTED_RULES - rules}"
    missing = sorted(name for name in rules if not (RUNBOOKS / f"{name}.md").is_file())
    assert not missing, f"alert rules without docs/runbooks/<rule>.md: {missing}"
    stale = sorted(p.name for p in rule_pages() if p.stem not in rules)
    assert not stale, f"runbooks named after no registered rule: {stale}"


async def test_every_firing_message_links_its_runbook(daemon: Daemon) -> None:
    """The link a FIRING carries (default base: docs/runbooks, relative to the source
    tree) names the rule's page, which exists."""
    for rule in daemon.alerts.rules:
        link = daemon.alerts._runbook(rule.name)
        assert link == f"docs/runbooks/{rule.name}.md"
        assert (ROOT / link).is_file(), link


def test_rule_pages_answer_the_four_questions() -> None:
    assert rule_pages(), "no rule pages found"
    for page in rule_pages():
        text = page.read_text()
        assert text.startswith(f"# {page.stem}\n"), f"{page.name}: title is not the rule name"
        absent = [s for s in RULE_SECTIONS if f"\n{s}\n" not in text]
        assert not absent, f"{page.name}: missing sections {absent}"


def test_the_index_lists_every_page_and_links_resolve() -> None:
    index = (RUNBOOKS / "README.md").read_text()
    unlisted = [p.name for p in pages() if f"]({p.name})" not in index]
    assert not unlisted, f"docs/runbooks/README.md does not link {unlisted}"
    for page in [RUNBOOKS / "README.md", *pages()]:
        for target in re.findall(r"\]\(([^)#\s]+\.md)(?:#[^)]*)?\)", page.read_text()):
            assert (RUNBOOKS / target).is_file(), f"{page.name}: broken link to {target}"


# -- (b) every curl line names a route the daemon serves ----------------------------


@dataclass(frozen=True)
class Curl:
    page: str
    line: int
    text: str
    method: str
    url: str
    headers: tuple[str, ...]


def curl_lines(page: Path) -> list[tuple[int, str]]:
    """Every curl command of a page: a line (of a code block) that starts with `curl `,
    joined with its `\\` continuation lines, and every inline code span `curl …`."""
    lines = page.read_text().splitlines()
    found: list[tuple[int, str]] = []
    i = 0
    while i < len(lines):
        stripped = lines[i].strip()
        number = i + 1
        if stripped.startswith("curl "):
            command = stripped
            while command.endswith("\\") and i + 1 < len(lines):
                i += 1
                command = command[:-1].rstrip() + " " + lines[i].strip()
            found.append((number, command))
        else:
            found += [(number, span) for span in re.findall(r"`(curl [^`]+)`", lines[i])]
        i += 1
    return found


def parse_curl(page: str, line: int, command: str) -> Curl:
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    tokens = []
    for token in lexer:
        if token in SHELL_OPERATORS:
            break  # a pipe into jq, a redirection: the rest is not curl's
        tokens.append(token)
    assert tokens and tokens[0] == "curl", f"{page}:{line}: not a curl command: {command}"
    method: str | None = None
    data = False
    headers: list[str] = []
    urls: list[str] = []
    args = iter(tokens[1:])
    for token in args:
        if token in ("-X", "--request"):
            method = next(args).upper()
        elif token.startswith("-X") and len(token) > 2:
            method = token[2:].upper()
        elif token in ("-I", "--head"):
            method = "HEAD"
        elif token in ("-H", "--header"):
            headers.append(next(args))
        elif token in DATA_OPTIONS:
            data = True
            next(args)
        elif token in VALUE_OPTIONS:
            next(args)
        elif token.startswith("-"):
            continue  # -s, -f, -i, ...
        else:
            urls.append(token)
    assert len(urls) == 1, f"{page}:{line}: expected one URL, found {urls}: {command}"
    return Curl(page, line, command, method or ("POST" if data else "GET"), urls[0],
                tuple(headers))


def every_curl() -> list[Curl]:
    return [parse_curl(page.name, number, command)
            for page in [RUNBOOKS / "README.md", *pages()]
            for number, command in curl_lines(page)]


@dataclass(frozen=True)
class Served:
    method: str
    path: str  # as registered: /api/v1/queues/{queue}/runs
    pattern: re.Pattern[str]


def served_routes(app: web.Application) -> list[Served]:
    """Method and path template of every route, read as tests/test_api.py's
    test_openapi_documents_every_route reads them."""
    out = []
    for resource in app.router.resources():
        info = resource.get_info()
        path = info.get("path") or info.get("formatter")
        if path is None:
            continue
        parts = re.split(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::[^}]*)?\}", path)
        regex = "".join(re.escape(part) if n % 2 == 0 else f"(?P<{part}>[^/]+)"
                        for n, part in enumerate(parts))
        for route in resource:
            if route.method not in ("HEAD", "*"):
                out.append(Served(route.method, path, re.compile(regex + r"\Z")))
    return out


def filled_in_well(name: str, value: str, queues: set[str]) -> bool:
    """A path parameter's value in a runbook: a placeholder, or a real value."""
    if PLACEHOLDER.fullmatch(value):
        return True
    if name == "queue":
        return value in queues
    if name in ("runId", "tenantId", "integrationId"):
        return re.fullmatch(r"[0-9a-f]{24}", value) is not None
    return True


def test_the_pages_have_curl_lines() -> None:
    curls = every_curl()
    assert len(curls) >= 30, f"only {len(curls)} curl lines found: is the parser broken?"
    without = sorted({p.name for p in rule_pages()} - {c.page for c in curls})
    assert not without, f"rule pages with no curl line to confirm the alert: {without}"


async def test_every_curl_line_names_a_route_the_app_serves(daemon: Daemon) -> None:
    app = daemon.app()
    routes = served_routes(app)
    queues = set(daemon.registry.names())
    problems = []
    for curl in every_curl():
        where = f"{curl.page}:{curl.line}"
        if not curl.url.startswith(BASE + "/"):
            problems.append(f"{where}: not {BASE}: {curl.url}")
            continue
        path = urlsplit(curl.url).path
        matches = [(r, m) for r in routes if (m := r.pattern.match(path))]
        if not matches:
            problems.append(f"{where}: no route serves {path}")
            continue
        exact = [(r, m) for r, m in matches if r.path == path]
        candidates = exact or matches
        served = [(r, m) for r, m in candidates if r.method == curl.method]
        if not served:
            methods = sorted({r.method for r, _ in candidates})
            problems.append(f"{where}: {curl.method} {path}: served only for {methods}")
            continue
        route, match = served[0]
        bad = [f"{name}={value}" for name, value in match.groupdict().items()
               if not filled_in_well(name, value, queues)]
        if bad:
            problems.append(f"{where}: {route.path}: not a placeholder or a real value: {bad}")
        if path.startswith("/api/v1/") and path not in PUBLIC_API \
                and AUTH_HEADER not in curl.headers:
            problems.append(f"{where}: {path} needs -H \"{AUTH_HEADER}\"")
    assert not problems, "\n".join(problems)


def test_the_curl_parser_reads_what_the_pages_write() -> None:
    """The parser itself, on the shapes the pages use."""
    got = parse_curl("x", 1, f'curl -s -H "{AUTH_HEADER}" -X POST '
                              f'"{BASE}/api/v1/queues/QUEUE/clean" -H "Content-Type: a/b" '
                              "-d '{\"state\": \"failed\"}' | jq .data")
    assert (got.method, got.url) == ("POST", f"{BASE}/api/v1/queues/QUEUE/clean")
    assert AUTH_HEADER in got.headers
    got = parse_curl("x", 1, f"curl -s -o /dev/null -w '%{{http_code}}\\n' {BASE}/readyz")
    assert (got.method, got.url) == ("GET", f"{BASE}/readyz")
    got = parse_curl("x", 1, f"curl -s -d 'x=1' {BASE}/admin/login >/dev/null")
    assert got.method == "POST"
