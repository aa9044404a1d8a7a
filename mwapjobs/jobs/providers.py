"""What kind of cloud provider a `cloudProviders` document is: Dropbox, Google Drive,
Microsoft (OneDrive, SharePoint), or another one. Every job that talks to providers'
APIs (refresh, health, file indexing) decides by the same rule."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

Kind = Literal["dropbox", "google", "microsoft", "generic"]

_KIND_WORDS: tuple[tuple[Kind, tuple[str, ...]], ...] = (
    ("dropbox", ("dropbox",)),
    ("google", ("google", "gdrive")),
    ("microsoft", ("microsoft", "onedrive", "sharepoint", "msgraph", "graph", "office365")),
)


def provider_kind(provider: Mapping[str, Any]) -> Kind:
    """The first of `metadata.providerType`, `slug`, `name` that names a known kind."""
    metadata = provider.get("metadata") or {}
    for value in (metadata.get("providerType"), provider.get("slug"), provider.get("name")):
        if not isinstance(value, str):
            continue
        text = value.lower()
        for kind, words in _KIND_WORDS:
            if any(word in text for word in words):
                return kind
    return "generic"
