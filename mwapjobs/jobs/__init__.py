"""The jobs: each a package that plugs in through `register(ctx)` (see context.py).

To add one: write a package with `PLUGIN = JobPlugin(name, register)` and list it here.
Order matters only where a job uses another's handle (health and files use refresh's)."""

from __future__ import annotations

from . import analytics, files, health, maintenance, notifications, refresh
from .context import JobContext, JobPlugin

DEFAULT_JOBS: tuple[JobPlugin, ...] = (refresh.PLUGIN, health.PLUGIN, maintenance.PLUGIN,
                                       notifications.PLUGIN, analytics.PLUGIN, files.PLUGIN)

__all__ = ["DEFAULT_JOBS", "JobContext", "JobPlugin"]
