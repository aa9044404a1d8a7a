"""The alert rules of token refresh (added to the alert manager by `register`).

| rule                   | true when                                                       |
|------------------------|-----------------------------------------------------------------|
| `refresh_failures`     | at least `refresh_failure_min` `token-refresh` runs failed within|
|                        | `failed_runs_window` and failures / (failures + successes)       |
|                        | exceeds `refresh_failure_rate`                                   |
| `provider_on_hold`     | a provider's token endpoint refuses our configuration of it      |
|                        | (wrong client secret, token URL, TLS): its refreshes wait; one   |
|                        | alert per provider, naming the error and the tokens that expire  |
|                        | meanwhile                                                        |
| `provider_url_changed` | a provider's tokenUrl, healthCheckUrl or apiBaseUrl points       |
|                        | somewhere new (announced once, for one cool-down)                |
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from ...alerts.rules import Condition, Rule, RuleContext, duration
from ...storage.providers import ProviderHolds
from .runs import QUEUE


async def refresh_failures(ctx: RuleContext) -> list[Condition]:
    a = ctx.settings.alerts
    since = ctx.now - timedelta(seconds=a.failed_runs_window)
    failed = await ctx.runs.count_finished_since(QUEUE, "failed", since)
    if failed < a.refresh_failure_min:
        return []
    completed = await ctx.runs.count_finished_since(QUEUE, "completed", since)
    rate = failed / (failed + completed)
    if rate <= a.refresh_failure_rate:
        return []
    return [Condition(
        "refresh_failures",
        f"{failed} of {failed + completed} token refreshes failed in the last "
        f"{duration(a.failed_runs_window)} ({rate:.0%}; threshold: above "
        f"{a.refresh_failure_rate:.0%} with at least {a.refresh_failure_min} failures)",
    )]


async def provider_on_hold(ctx: RuleContext) -> list[Condition]:
    """Providers on hold (storage/providers.py): what the token endpoint said, since when,
    and how many access tokens of the provider expire while nothing refreshes them."""
    holds = ProviderHolds(ctx.mongo)
    out = []
    for doc in await holds.all():
        hold = doc.get("hold") or {}
        provider_id = str(doc["_id"])
        since = hold.get("since")
        since = _utc(since) if isinstance(since, datetime) else ctx.now
        risk = await holds.tokens_at_risk(provider_id, since, ctx.now)
        name = doc.get("name")
        subject = f"provider {name} ({provider_id})" if name else f"provider {provider_id}"
        parts = [f"{hold.get('error')}: {hold.get('reason')}",
                 f"on hold since {since.isoformat(timespec='seconds')} "
                 f"({duration((ctx.now - since).total_seconds())}); no tenant's status "
                 "changes, its token refreshes wait"]
        if risk.expiring and risk.earliest is not None:
            parts.append(f"{risk.expiring} access token{'s' if risk.expiring != 1 else ''} "
                         "of this provider expire while it stays on hold, the earliest at "
                         f"{risk.earliest.isoformat(timespec='seconds')} (in "
                         f"{duration((risk.earliest - ctx.now).total_seconds())})")
        if risk.expired:
            parts.append(f"{risk.expired} expired already during the hold")
        next_probe = hold.get("nextProbeAt")
        probe = (f", or at the next re-probe ({_utc(next_probe).isoformat(timespec='seconds')})"
                 if isinstance(next_probe, datetime) else "")
        parts.append("fix the provider in cloudProviders: refreshes resume as soon as its "
                     f"document changes{probe}")
        out.append(Condition("provider_on_hold", "; ".join(parts), subject))
    return out


async def provider_url_changed(ctx: RuleContext) -> list[Condition]:
    """A provider's tokenUrl, healthCheckUrl or apiBaseUrl points somewhere new (seen by
    discovery): its secrets now go there. True for one cool-down after the change, so it
    is announced once."""
    since = ctx.now - timedelta(seconds=ctx.settings.alerts.cooldown)
    out = []
    for doc in await ProviderHolds(ctx.mongo).url_changes(since):
        name = doc.get("name")
        provider_id = str(doc["_id"])
        subject = f"provider {name} ({provider_id})" if name else f"provider {provider_id}"
        moves = "; ".join(f"{c.get('field')} now {c.get('to') or '(none)'} "
                          f"(was {c.get('from') or '(none)'})"
                          for c in doc.get("urlChanges") or [])
        out.append(Condition("provider_url_changed",
                             f"{moves}: if nobody here changed it, the provider's secrets "
                             "may be going to someone else", subject))
    return out


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def rules() -> list[Rule]:
    return [Rule("refresh_failures", refresh_failures),
            Rule("provider_on_hold", provider_on_hold),
            Rule("provider_url_changed", provider_url_changed)]
