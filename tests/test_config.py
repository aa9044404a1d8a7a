"""Configuration: file + environment, MWAP's variable names, one-line errors with exit 2."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from mwapjobs.config import (
    ConfigError,
    Settings,
    load_settings,
    masked,
    resolve_config_path,
)
from tests.conftest import ROOT

CLEAN_ENV = {**{k: v for k, v in os.environ.items()
                if not k.startswith("MWAPJOBS_") and k not in {"MONGODB_URI", "ENCRYPTION_KEY"}},
             "ENCRYPTION_KEY": "k" * 32}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("MWAPJOBS_") or name in {"MONGODB_URI", "ENCRYPTION_KEY",
                                                    "AUTH0_DOMAIN", "AUTH0_AUDIENCE"}:
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def cli(*args: str, env: dict[str, str] | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mwapjobs", *args], capture_output=True, text=True, timeout=60,
        env={**CLEAN_ENV, **(env or {})}, cwd=cwd or ROOT,
    )


def test_shipped_config_file_equals_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MONGODB_URI", "memory://")
    monkeypatch.setenv("ENCRYPTION_KEY", "k" * 32)
    from_file = load_settings(ROOT / "config.toml")
    assert from_file == Settings(mongodb_uri="memory://", encryption_key="k" * 32)


def test_shipped_config_file_mentions_every_setting() -> None:
    text = (ROOT / "config.toml").read_text()
    tomllib.loads(text)  # it parses
    names = set(Settings.model_fields)
    defaults = Settings(mongodb_uri="memory://", encryption_key="k" * 32)
    for section in ("http", "mongodb", "engine", "admin", "metrics", "refresh", "health",
                    "alerts", "files"):
        names |= set(type(getattr(defaults, section)).model_fields)
    missing = sorted(n for n in names if n not in text)
    assert not missing, f"config.toml does not document: {missing}"
    files = tomllib.loads(text)["files"]  # every [files] key in its own section
    assert sorted(files) == sorted(type(defaults.files).model_fields)


def test_environment_overrides_file_with_nested_names(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENCRYPTION_KEY", "k" * 32)
    path = write(tmp_path, 'mongodb_uri = "mongodb://db:27017/mwap"\n[http]\nport = 9000\n'
                           'host = "0.0.0.0"\n')
    monkeypatch.setenv("MWAPJOBS_HTTP__PORT", "9100")
    monkeypatch.setenv("MWAPJOBS_SHUTDOWN_TIMEOUT", "12.5")
    settings = load_settings(path)
    assert settings.http.port == 9100
    assert settings.http.host == "0.0.0.0"
    assert settings.shutdown_timeout == 12.5


def test_mwap_backend_variable_names_are_honoured(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, 'mongodb_uri = "mongodb://file:27017/mwap"\n')
    monkeypatch.setenv("MONGODB_URI", "mongodb://env:27017/mwap")
    monkeypatch.setenv("ENCRYPTION_KEY", "k" * 32)
    monkeypatch.setenv("AUTH0_DOMAIN", "mwap.eu.auth0.com")
    monkeypatch.setenv("AUTH0_AUDIENCE", "https://api.mwap")
    settings = load_settings(path)
    assert settings.mongodb_uri.get_secret_value() == "mongodb://env:27017/mwap"
    assert settings.encryption_key is not None
    assert settings.encryption_key.get_secret_value() == "k" * 32
    assert settings.auth0_domain == "mwap.eu.auth0.com"
    assert settings.auth0_audience == "https://api.mwap"


@pytest.mark.parametrize(
    ("toml", "env", "expected"),
    [
        ('mongodb_uri = "memory://"\n[http]\nprot = 1\n', {}, "http.prot: unknown setting"),
        ('mongodb_uri = "memory://"\nshutdwn_timeout = 1\n', {}, "shutdwn_timeout: unknown"),
        ('mongodb_uri = "memory://"\n[http]\nport = "eighty"\n', {}, "http.port: Input should"),
        ('mongodb_uri = "memory://"\n', {"MWAPJOBS_HTTP__PORT": "abc"},
         "http.port (from MWAPJOBS_HTTP__PORT): Input should be a valid integer"),
        ('mongodb_uri = "memory://"\n', {"MWAPJOBS_HTTP__PROT": "1"},
         "MWAPJOBS_HTTP__PROT: unknown setting"),
        ('mongodb_uri = "memory://"\n', {"MWAPJOBS_NOPE": "1"}, "MWAPJOBS_NOPE: unknown"),
        ("log_level = 'info'\n", {}, "MONGODB_URI: required setting is missing"),
        ('mongodb_uri = "memory://"\nlog_level = "loud"\n', {}, "log_level: Input should be"),
        ('mongodb_uri = "memory://"\n[engine]\nlease_seconds = -1\n', {},
         "engine.lease_seconds: Input should be greater than 0"),
        ("this is not toml", {}, "config file"),
        ('mongodb_uri = "memory://"\n[health]\ncron = "every day"\n', {"ENCRYPTION_KEY": "k" * 32},
         "health: invalid cron expression 'every day'"),
        ('mongodb_uri = "memory://"\n[health]\ntimezone = "Mars/Base"\n',
         {"ENCRYPTION_KEY": "k" * 32}, "unknown time zone 'Mars/Base'"),
        ('mongodb_uri = "memory://"\n', {"ENCRYPTION_KEY": ""},
         "ENCRYPTION_KEY: required while refresh or health checks are enabled"),
    ],
)
def test_bad_configuration_is_one_line_naming_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, toml: str, env: dict[str, str],
    expected: str,
) -> None:
    path = write(tmp_path, toml)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert expected in str(caught.value)
    assert "\n" not in str(caught.value)


def test_cli_exits_2_with_one_line_and_no_traceback(tmp_path: Path) -> None:
    path = write(tmp_path, 'mongodb_uri = "memory://"\n[http]\nport = "x"\n')
    for command in ("check-config", "serve"):
        result = cli(command, "--config", str(path))
        assert result.returncode == 2
        assert result.stderr.count("\n") == 1, result.stderr
        assert "http.port" in result.stderr
        assert "Traceback" not in result.stderr + result.stdout


def test_cli_rejects_a_uri_without_database() -> None:
    result = cli("check-config", env={"MONGODB_URI": "mongodb://db:27017"})
    assert result.returncode == 2
    assert "mongodb_uri: the URI names no database" in result.stderr


def test_check_config_masks_secrets(tmp_path: Path) -> None:
    path = write(tmp_path, "[http]\nport = 9999\n")
    result = cli("check-config", "--config", str(path), env={
        "MONGODB_URI": "mongodb://admin:hunter2-secret@db:27017/mwap",
        "ENCRYPTION_KEY": "super-secret-encryption-key",
    })
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["http"]["port"] == 9999
    assert shown["mongodb_uri"] == "mongodb://admin:********@db:27017/mwap"
    assert shown["encryption_key"] == "********"
    assert "hunter2" not in result.stdout
    assert "super-secret" not in result.stdout


def test_config_path_resolution_order(tmp_path: Path) -> None:
    explicit = write(tmp_path, "")
    assert resolve_config_path(str(explicit), env={}) == explicit
    assert resolve_config_path(None, env={"MWAPJOBS_CONFIG": str(explicit)}) == explicit
    with pytest.raises(ConfigError, match="not found"):
        resolve_config_path(str(tmp_path / "missing.toml"), env={})
    # Without --config or $MWAPJOBS_CONFIG: ./config.toml, then /etc/mwapjobs/config.toml.
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert resolve_config_path(None, env={}) == Path("config.toml")
    finally:
        os.chdir(cwd)


def test_cli_uses_mwapjobs_config_env_and_local_file(tmp_path: Path) -> None:
    write(tmp_path, 'mongodb_uri = "memory://"\n[http]\nport = 1234\n')
    local = cli("check-config", cwd=tmp_path)
    assert local.returncode == 0, local.stderr
    assert json.loads(local.stdout)["http"]["port"] == 1234
    other = tmp_path / "other.toml"
    other.write_text('mongodb_uri = "memory://"\n[http]\nport = 4321\n')
    via_env = cli("check-config", cwd=tmp_path, env={"MWAPJOBS_CONFIG": str(other)})
    assert json.loads(via_env.stdout)["http"]["port"] == 4321


def test_masked_keeps_non_secret_values() -> None:
    settings = Settings(mongodb_uri="mongodb://db:27017/mwap", encryption_key="x" * 32)
    shown = masked(settings)
    assert shown["mongodb_uri"] == "mongodb://db:27017/mwap"
    assert shown["encryption_key"] == "********"


def test_cli_version_is_the_installed_packages() -> None:
    result = cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"mwapjobs {importlib.metadata.version('mwapjobs')}"


def test_cli_help_lists_every_command() -> None:
    from mwapjobs.cli import _parser

    [commands] = [a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(commands.choices) == {"serve", "check-config", "demo", "admin-token"}
    result = cli("--help")
    assert result.returncode == 0, result.stderr
    for name in commands.choices:
        assert f"\n    {name} " in result.stdout or f"\n    {name}\n" in result.stdout, name
    assert "mwapjobs serve | check-config | demo | admin-token" in result.stdout
    assert "--version" in result.stdout
    assert "ENCRYPTION_KEY" in cli("serve", "--help").stdout
