"""The systemd unit: `systemd-analyze verify` is silent and the hardening score stays low.

`systemd-analyze verify` exits 0 on most mistakes (an unknown key or a bad value
is "ignored" with a warning), so any stderr output at all counts as a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
pytestmark = pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze not on PATH")

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "mwapjobs.service"
ENV_EXAMPLE = ROOT / "systemd" / "mwapjobs.env.example"

MAX_EXPOSURE = 1.5
DEFAULT_SHUTDOWN_TIMEOUT = 30.0
TIMEOUT = 60  # seconds for one systemd-analyze run

_EXPOSURE_RE = re.compile(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)")
_EXEC_START_RE = re.compile(r"^ExecStart=(\S+)(.*)$", re.MULTILINE)


def _analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run(
        [SYSTEMD_ANALYZE, "--no-pager", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
        env={**os.environ, "SYSTEMD_COLORS": "0"},
    )


def _existing_executable() -> str:
    """The installed console script if the test venv has one, else the interpreter."""
    script = Path(sys.executable).parent / "mwapjobs"
    return str(script) if script.is_file() else sys.executable


def _verifiable_copy(tmp_path: Path, text: str) -> Path:
    """Write `text` as a unit that `verify` can check on a machine without the daemon.

    The only rewrite: the ExecStart binary becomes an existing executable (arguments
    kept), because `verify` fails when /opt/mwapjobs/venv/bin/mwapjobs does not exist.
    Nothing else needs changing: `verify` does not open the EnvironmentFile, and
    DynamicUser=yes needs no user to exist.
    """
    text, count = _EXEC_START_RE.subn(
        lambda m: f"ExecStart={_existing_executable()}{m.group(2)}", text
    )
    assert count == 1, "expected exactly one ExecStart= line"
    path = tmp_path / UNIT.name  # same name: verify derives the unit name from it
    path.write_text(text)
    return path


def _directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;[" or "=" not in line:
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def _seconds(span: str) -> float:
    """A systemd time span as used in this unit: "45", "45s", "1min 30s", "2min"."""
    units = {"": 1, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "ms": 0.001}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", span):
        total += float(number) * units[unit]
    return total


def test_verify_is_silent(tmp_path: Path) -> None:
    unit = _verifiable_copy(tmp_path, UNIT.read_text())
    result = _analyze("verify", str(unit))
    assert result.stderr == "", f"systemd-analyze verify complained:\n{result.stderr}"
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize(
    ("line", "typo"),
    [
        ("Type=notify", "Type=notfy"),  # bad value: "Failed to parse service type, ignoring"
        ("WatchdogSec=30s", "WatchdogSek=30s"),  # unknown key: "Unknown key ..., ignoring"
    ],
)
def test_verify_catches_typos(tmp_path: Path, line: str, typo: str) -> None:
    """Both typos make verify exit 0, so only the stderr check catches them."""
    text = UNIT.read_text()
    assert f"\n{line}\n" in text
    unit = _verifiable_copy(tmp_path, text.replace(f"\n{line}\n", f"\n{typo}\n"))
    result = _analyze("verify", str(unit))
    assert result.stderr.strip(), "a broken unit must make systemd-analyze verify complain"


def test_security_exposure() -> None:
    result = _analyze("security", "--offline=true", str(UNIT))
    assert result.returncode == 0, result.stderr
    match = _EXPOSURE_RE.search(result.stdout)
    assert match, f"no exposure line in:\n{result.stdout}\n{result.stderr}"
    score = float(match.group(1))
    # `pytest -rA` (or -v plus the captured output) shows the score in CI logs.
    print(f"systemd-analyze security exposure for {UNIT.name}: {score}")
    assert score <= MAX_EXPOSURE, (
        f"exposure {score} > {MAX_EXPOSURE}; failing checks:\n"
        + "\n".join(line for line in result.stdout.splitlines() if line.startswith("✗"))
    )


def test_key_directives() -> None:
    d = _directives(UNIT.read_text())
    assert d.get("Type") == ["notify"]
    assert d.get("NotifyAccess") == ["main"]
    assert "WatchdogSec" in d and _seconds(d["WatchdogSec"][-1]) > 0
    assert d.get("Restart") == ["on-failure"]
    assert d.get("EnvironmentFile") == ["/etc/mwapjobs/mwapjobs.env"]
    assert d.get("NoNewPrivileges") == ["yes"]
    stop = _seconds(d["TimeoutStopSec"][-1])
    assert stop > DEFAULT_SHUTDOWN_TIMEOUT, (
        f"TimeoutStopSec={stop}s leaves no room for the {DEFAULT_SHUTDOWN_TIMEOUT}s graceful stop"
    )
    exec_start = d["ExecStart"][-1].split()
    assert exec_start[:2] == ["/opt/mwapjobs/venv/bin/mwapjobs", "serve"]
    assert exec_start[2:] == ["--config", "/etc/mwapjobs/config.toml"]


def test_env_example_names() -> None:
    """Every variable in the example is NAME=value, and every MWAPJOBS_* name is a setting."""
    # The check the daemon runs at start-up (skipped only where mwapjobs is not importable).
    config = pytest.importorskip("mwapjobs.config")

    names: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        # Commented-out MWAPJOBS_* overrides must be valid too, once uncommented.
        candidate = line[1:] if line.startswith("#MWAPJOBS_") else line
        if not candidate.strip() or candidate.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Z][A-Z0-9_]*)=(.*)", candidate)
        assert match, f"not NAME=value: {line!r}"
        names[match.group(1)] = match.group(2)
    required = {"MONGODB_URI", "ENCRYPTION_KEY", "AUTH0_DOMAIN", "AUTH0_AUDIENCE", "SMTP_PASS"}
    assert required <= names.keys()
    config._check_unknown_env({k: v for k, v in names.items() if k.startswith("MWAPJOBS_")})
