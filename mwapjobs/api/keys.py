"""Typed application keys, so handlers get the daemon's parts without globals."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from ..daemon import Daemon

DAEMON: web.AppKey[Daemon] = web.AppKey("daemon")
