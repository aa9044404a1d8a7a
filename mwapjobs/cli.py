"""Command line: `mwapjobs serve | check-config | demo`.

Configuration problems exit with status 2 and one line on stderr naming the
setting, never a traceback: that line is what an operator sees in journalctl.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence

from .config import ConfigError, Settings, load_settings, masked, resolve_config_path
from .daemon import Daemon, run_until_signalled
from .logs import setup_logging
from .storage.mongo import MongoUriError, database_name

EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mwapjobs", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("serve", "run the daemon"),
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
    if args.command == "demo":
        os.environ.setdefault("MONGODB_URI", "memory://")
    try:
        settings = _settings(args)
    except ConfigError as exc:
        print(f"mwapjobs: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "check-config":
        print(json.dumps(masked(settings), indent=2))
        return 0
    setup_logging(settings.log_level)
    daemon = Daemon(settings)
    if args.command == "demo":
        return asyncio.run(_demo(daemon, args.job_seconds))
    return asyncio.run(run_until_signalled(daemon))


async def _demo(daemon: Daemon, job_seconds: float) -> int:
    from .jobs import demo

    demo.register(daemon.registry)

    async def seed_when_ready() -> None:
        await daemon.wait_ready(timeout=3600)
        await demo.seed(daemon.engine, job_seconds)

    seeding = asyncio.ensure_future(seed_when_ready())
    try:
        return await run_until_signalled(daemon)
    finally:
        seeding.cancel()


if __name__ == "__main__":
    sys.exit(main())
