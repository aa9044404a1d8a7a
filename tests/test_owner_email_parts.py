"""The parts of owner emails that need no server: what an Auth0 answer is worth, the
rate-limit wait, address masking, and the rendered email (templates, escaping)."""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest

from mwapjobs.jobs.notifications.auth0 import Found, Unusable, mask_email, read_user, retry_after
from mwapjobs.jobs.notifications.render import Item, load_templates, reconnect_link, render

NOW = 1_800_000_000.0


@pytest.mark.parametrize(("payload", "expected"), [
    ({"email": "alice@example.com", "email_verified": True, "name": "Alice"},
     Found("alice@example.com", "Alice")),
    ({"email": "alice@example.com", "email_verified": True}, Found("alice@example.com", None)),
    ({"email": "alice@example.com", "email_verified": True, "name": "A\r\nBcc: x@evil.io"},
     Found("alice@example.com", "ABcc: x@evil.io")),  # no line breaks survive
    ({"email": "alice@example.com", "email_verified": False},
     Unusable("the user's email address is not verified")),
    ({"email": "alice@example.com", "email_verified": "true"},  # a string is not a yes
     Unusable("the user's email address is not verified")),
    ({"email": "alice@example.com"}, Unusable("the user's email address is not verified")),
    ({"email_verified": True}, Unusable("the user has no email address")),
    ({"email": "alice@example.com\r\nBcc: all@evil.io", "email_verified": True},
     Unusable("the user's email address is malformed")),
    ({"email": "a@b@example.com", "email_verified": True},
     Unusable("the user's email address is malformed")),
    ({"email": "Alice <alice@example.com>", "email_verified": True},
     Unusable("the user's email address is malformed")),
    (["not", "a", "user"], Unusable("Auth0 answered something that is not a user")),
])
def test_what_an_auth0_answer_is_worth(payload: Any, expected: Found | Unusable) -> None:
    assert read_user(payload) == expected


@pytest.mark.parametrize(("headers", "wait"), [
    ({"Retry-After": "7"}, 7.0),
    ({"Retry-After": "0"}, 1.0),  # at least a second
    ({"Retry-After": format_datetime(datetime.fromtimestamp(NOW + 30, UTC), usegmt=True)}, 30.0),
    ({"X-RateLimit-Reset": str(int(NOW + 12))}, 12.0),
    ({"Retry-After": "soon", "X-RateLimit-Reset": str(int(NOW + 5))}, 5.0),
    ({"Retry-After": "999999"}, 3600.0),  # capped
    ({}, 60.0),
])
def test_the_rate_limit_wait(headers: dict[str, str], wait: float) -> None:
    assert retry_after(headers, now=NOW) == pytest.approx(wait, abs=0.01)


@pytest.mark.parametrize(("address", "masked"), [
    ("alice@example.com", "a***@example.com"), ("b@x.io", "b***@x.io"), ("nonsense", "***")])
def test_mask_email(address: str, masked: str) -> None:
    assert mask_email(address) == masked


DRIVE = Item("integration.expired", "Google Drive", "google-drive", "p" * 24, "i" * 24)
BOX = Item("integration.revoked", "Dropbox", "dropbox", "q" * 24, "j" * 24)
LINK = "https://app.example.com/tenants/{tenantId}/reconnect?provider={providerSlug}"


def test_one_notification_renders_both_parts_with_names_and_a_link() -> None:
    templates, problems = load_templates(None)
    assert problems == []
    email = render(templates, owner_name="Alice", tenant_name="Acme Photos", tenant_id="t" * 24,
                   items=[DRIVE], reconnect_url=LINK)
    assert email.subject == "MWAP: Reconnect Google Drive (Acme Photos)"
    assert email.text.startswith("Hello Alice,")
    assert "Reconnect Google Drive in MWAP" in email.text
    link = f"https://app.example.com/tenants/{'t' * 24}/reconnect?provider=google-drive"
    assert f"Reconnect: {link}" in email.text
    assert f'<a href="{link}">Reconnect Google Drive</a>' in email.html
    assert "p" * 24 not in email.text + email.html  # the provider by name, never its id
    assert "i" * 24 not in email.text + email.html


def test_a_digest_lists_every_item() -> None:
    templates, _ = load_templates(None)
    email = render(templates, owner_name=None, tenant_name="Acme", tenant_id="t1",
                   items=[DRIVE, BOX], reconnect_url=None)
    assert email.subject == "MWAP: 2 storage connections need attention (Acme)"
    assert email.text.startswith("Hello,")
    assert "Google Drive: The connection to Google Drive has expired." in email.text
    assert "Dropbox: Access to Dropbox was revoked." in email.text
    assert email.html.count("<li>") == 2 and "href" not in email.html


def test_values_are_escaped_and_cannot_add_headers() -> None:
    templates, _ = load_templates(None)
    evil = Item("integration.expired", "<img src=x onerror=alert(1)>", "x", "p", "i")
    email = render(templates, owner_name="<b>Mallory</b>", tenant_name="Acme\r\nBcc: a@evil.io",
                   tenant_id="t1", items=[evil],
                   reconnect_url="javascript:alert(1)//{tenantId}")
    assert "\n" not in email.subject and "\r" not in email.subject
    assert "<img" not in email.html and "&lt;img src=x" in email.html
    assert "<b>Mallory" not in email.html
    assert "javascript:" not in email.html + email.text  # only http(s) links
    assert reconnect_link("https://x.example/{tenantId}", "a/b?c", evil) == \
        "https://x.example/a%2Fb%3Fc"


def test_templates_from_a_directory_and_a_broken_one_falls_back(tmp_path: Path) -> None:
    (tmp_path / "subject.txt").write_text("[$tenant] $summary\n")
    (tmp_path / "email.txt").write_text("Dear owner, $nosuchplaceholder\n")
    templates, problems = load_templates(str(tmp_path))
    assert len(problems) == 1 and "email.txt" in problems[0]
    email = render(templates, owner_name=None, tenant_name="Acme", tenant_id="t",
                   items=[DRIVE], reconnect_url=None)
    assert email.subject == "[Acme] Reconnect Google Drive"
    assert email.text.startswith("Hello,")  # ours, since theirs did not render
