"""The email a tenant owner gets: a subject, a text part and an HTML part, from the
templates in `templates/` (or the same file names in `notifications.templates_dir`).

Templates are `string.Template` files (`$name` placeholders, `$$` for a dollar):

- `subject.txt`: `$summary` ("Reconnect Google Drive", or "3 storage connections need
  attention"), `$tenant`;
- `email.txt`, `email.html`: `$greeting`, `$intro`, `$items` (the items, rendered),
  `$count`, `$tenant`;
- `item.txt`, `item.html`: `$provider`, `$what` (what happened), `$action` (what to do),
  `$link`.

What an owner reads names the tenant and the provider by name (never a raw id where a
name exists) and says what to do; never the provider's error text (it may carry
internals). Every value is stripped of control characters (a tenant's name must not
add a header line) and escaped in the HTML part; the reconnect link (an `http(s)` URL
from `notifications.reconnect_url`, with `{tenantId}`, `{integrationId}`,
`{providerId}` and `{providerSlug}` filled in, URL-quoted) is the only URL.

`load_templates` reads files (call it in a thread); `render` is pure.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from string import Template
from urllib.parse import quote, urlsplit

NAMES = ("subject.txt", "email.txt", "email.html", "item.txt", "item.html")
_FIELDS = {
    "subject.txt": ("summary", "tenant"),
    "email.txt": ("greeting", "intro", "items", "count", "tenant"),
    "email.html": ("greeting", "intro", "items", "count", "tenant"),
    "item.txt": ("provider", "what", "action", "link"),
    "item.html": ("provider", "what", "action", "link"),
}
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


@dataclass(frozen=True)
class Item:
    """One notification as the owner reads it."""

    kind: str
    provider: str  # its name (else its slug, else "your cloud storage")
    provider_slug: str
    provider_id: str
    integration_id: str


@dataclass(frozen=True)
class Email:
    subject: str
    text: str
    html: str


def load_templates(directory: str | None) -> tuple[dict[str, Template], list[str]]:
    """The templates (the operator's where `directory` has a usable file, else ours),
    and the problems found with the operator's (logged by the caller)."""
    problems: list[str] = []
    out: dict[str, Template] = {}
    shipped = resources.files(__package__ or __name__).joinpath("templates")
    for name in NAMES:
        ours = Template(shipped.joinpath(name).read_text(encoding="utf-8"))
        out[name] = ours
        if directory is None:
            continue
        path = Path(directory) / name
        if not path.is_file():
            continue
        try:
            theirs = Template(path.read_text(encoding="utf-8"))
            theirs.substitute({field: "x" for field in _FIELDS[name]})
        except (OSError, UnicodeDecodeError, KeyError, ValueError) as exc:
            problems.append(f"{path}: {type(exc).__name__}: {exc}"[:300])
            continue
        out[name] = theirs
    return out, problems


def clean(value: str, limit: int = 200) -> str:
    return " ".join(_CONTROL.sub(" ", value).split())[:limit]


def what_and_action(kind: str, provider: str) -> tuple[str, str]:
    """What happened and what to do, in the owner's words (never the provider's text)."""
    if kind == "integration.expired":
        return (f"the connection to {provider} has expired.",
                f"Reconnect {provider} in MWAP to keep its files available.")
    if kind == "integration.revoked":
        return (f"access to {provider} was revoked.",
                f"Reconnect {provider} in MWAP if MWAP should use it again.")
    return (f"the connection to {provider} needs attention.",
            f"Open MWAP and check the {provider} connection.")


def reconnect_link(template: str | None, tenant_id: str, item: Item) -> str | None:
    """The reconnect URL for an item, or None (no template, or not an http(s) URL)."""
    if not template:
        return None
    values = {"tenantId": tenant_id, "integrationId": item.integration_id,
              "providerId": item.provider_id, "providerSlug": item.provider_slug}
    try:
        url = template.format_map({k: quote(v, safe="") for k, v in values.items()})
    except (KeyError, ValueError, IndexError):
        return None
    parts = urlsplit(url)
    return url if parts.scheme in ("http", "https") and parts.netloc else None


def render(templates: dict[str, Template], *, owner_name: str | None, tenant_name: str,
           tenant_id: str, items: list[Item], reconnect_url: str | None) -> Email:
    tenant = clean(tenant_name, 100)
    count = len(items)
    greeting = f"Hello {clean(owner_name, 100)}," if owner_name else "Hello,"
    if count == 1:
        provider = clean(items[0].provider, 100)
        summary = (f"Reconnect {provider}" if items[0].kind in ("integration.expired",
                                                                 "integration.revoked")
                   else f"Check your {provider} connection")
        intro = f"A storage connection of {tenant} in MWAP needs you:"
    else:
        summary = f"{count} storage connections need attention"
        intro = f"{count} storage connections of {tenant} in MWAP need you:"
    text_items, html_items = [], []
    for item in items:
        provider = clean(item.provider, 100)
        what, action = what_and_action(item.kind, provider)
        what = what[:1].upper() + what[1:]
        link = reconnect_link(reconnect_url, tenant_id, item)
        text_items.append(templates["item.txt"].substitute(
            provider=provider, what=what, action=action,
            link=f"  Reconnect: {link}\n" if link else ""))
        html_items.append(templates["item.html"].substitute(
            provider=html.escape(provider), what=html.escape(what), action=html.escape(action),
            link=(f' <a href="{html.escape(link, quote=True)}">Reconnect '
                  f'{html.escape(provider)}</a>') if link else ""))
    subject = clean(templates["subject.txt"].substitute(summary=summary, tenant=tenant), 200)
    text = templates["email.txt"].substitute(greeting=greeting, intro=intro, count=count,
                                             tenant=tenant, items="".join(text_items))
    body = templates["email.html"].substitute(
        greeting=html.escape(greeting), intro=html.escape(intro), count=count,
        tenant=html.escape(tenant), items="".join(html_items))
    return Email(subject, text, body)
