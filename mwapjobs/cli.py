"""Command line: `mwapjobs serve | check-config | demo | admin-token`, and `--version`.

Without --config, the configuration file is $MWAPJOBS_CONFIG, else ./config.toml,
else /etc/mwapjobs/config.toml (none is fine: the environment alone can configure
it); environment variables override the file. Configuration problems exit with
status 2 and one line on stderr naming the setting, never a traceback: that line
is what an operator sees in journalctl.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import re
import secrets
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

from .config import ConfigError, Settings, load_settings, masked, resolve_config_path
from .daemon import Daemon
from .jobs import DEFAULT_JOBS, demo
from .logs import setup_logging, stop_logging
from .signals import run_until_signalled
from .storage.mongo import MongoUriError, database_name

EXIT_CONFIG = 2


def package_version() -> str:
    """The installed distribution's version (pyproject.toml's, once installed)."""
    try:
        return version("mwapjobs")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mwapjobs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"mwapjobs {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                title="commands")
    for name, text in (
        ("serve", "run the daemon (needs MONGODB_URI, and ENCRYPTION_KEY while token "
                  "refresh or health checks are enabled)"),
        ("check-config", "validate the configuration and print it with secrets masked"),
        ("demo", "run the daemon with a demo queue and sample jobs "
                 "(MONGODB_URI defaults to memory://)"),
    ):
        cmd = sub.add_parser(name, help=text, description=text)
        cmd.add_argument("--config", metavar="PATH",
                         help="config file (default: $MWAPJOBS_CONFIG, ./config.toml, "
                              "/etc/mwapjobs/config.toml)")
        if name == "demo":
            cmd.add_argument("--job-seconds", type=float, default=1.0,
                             help="how long each sample job sleeps (default 1)")
    text = "make a new admin API token and print the config entry that enables it"
    cmd = sub.add_parser("admin-token", help=text, description=text)
    cmd.add_argument("name", help="what the token is for, e.g. ops-laptop (shown in audit lines)")
    cmd.add_argument("--viewer", action="store_true",
                     help="a read-only token: sees everything, changes nothing")
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    settings = load_settings(resolve_config_path(args.config))
    try:
        database_name(settings.mongodb_uri.get_secret_value())
    except MongoUriError as exc:
        raise ConfigError(f"mongodb_uri: {exc}") from None
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "admin-token":  # needs no configuration: it only prints
        return _admin_token(args.name, "viewer" if args.viewer else "admin")
    if args.command == "demo":
        os.environ.setdefault("MONGODB_URI", "memory://")
        os.environ.setdefault("ENCRYPTION_KEY", "mwapjobs-demo-key-not-for-production")
    try:
        settings = _settings(args)
    except ConfigError as exc:
        print(f"mwapjobs: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "check-config":
        print(json.dumps(masked(settings), indent=2))
        return 0
    setup_logging(settings.log_level)
    jobs = DEFAULT_JOBS
    if args.command == "demo":
        jobs = (*DEFAULT_JOBS, demo.plugin(args.job_seconds))
    daemon = Daemon(settings, jobs=jobs)
    try:
        return asyncio.run(run_until_signalled(daemon))
    except ConfigError as exc:  # found at start, once the queues are known
        stop_logging()
        print(f"mwapjobs: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG


ADMIN_TOKEN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def _admin_token(name: str, role: str = "admin") -> int:
    """Print a new token once, with its SHA-256 entry for config.toml or the environment.

    Only the hash goes into the configuration, so the token itself exists
    nowhere but in this output: lose it and you make another.
    """
    if not ADMIN_TOKEN_NAME.fullmatch(name):
        print("mwapjobs: admin-token: NAME must be 1-100 characters of A-Z a-z 0-9 . _ - "
              "and start with a letter or digit", file=sys.stderr)
        return EXIT_CONFIG
    token = "mwj_" + secrets.token_urlsafe(32)
    digest = hashlib.sha256(token.encode()).hexdigest()
    entry = {"name": name, "sha256": digest, **({"role": role} if role != "admin" else {})}
    env = json.dumps([entry])
    role_line = f'role = "{role}"\n' if role != "admin" else ""
    kind = "Viewer (read-only) token" if role == "viewer" else "Admin token"
    print(f"{kind} {name!r} (shown only now; keep it somewhere safe):\n\n"
          f"    {token}\n\n"
          f"Add to config.toml:\n\n"
          f'[[admin.tokens]]\nname = "{name}"\nsha256 = "{digest}"\n{role_line}\n'
          f"Or in the environment (this replaces the whole list, so include every token):\n\n"
          f"MWAPJOBS_ADMIN__TOKENS='{env}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
