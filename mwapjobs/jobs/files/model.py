"""What the listing clients hand the index writer, whatever the provider: items
(`Entry`), pages of them (`Page`), and the ways a pass can end early.

A listing client turns each provider answer into one `Page`: the items to add or update
in provider order, the items the provider says are gone (by id, or by path for
Dropbox, whose deletions carry no id), and `resume`, the state from which the listing
continues after this page. The pass stores `resume` once the page is written, so a
restart continues from the last written page, never from zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass(frozen=True, slots=True)
class Entry:
    """One file or folder as the provider describes it, already validated."""

    id: str  # the provider's own id
    name: str
    folder: bool
    path: str | None  # absolute display path, when the lister knows it (else the writer
    parent: str | None  # resolves it from the parent folder's id)
    mime: str | None = None
    size: int | None = None
    modified: datetime | None = None
    checksum: str | None = None
    permissions: tuple[str, ...] = ()


@dataclass
class Page:
    entries: list[Entry] = field(default_factory=list)
    removed_ids: list[str] = field(default_factory=list)  # provider ids that are gone
    removed_paths: list[str] = field(default_factory=list)  # Dropbox: lower-case paths gone
    resume: dict[str, Any] = field(default_factory=dict)  # where the listing continues
    done: bool = False  # the listing is complete; `resume` is the next pass's cursor
    invalid: int = 0  # items of the answer refused as malformed
    root: tuple[str, str] | None = None  # (provider id, path) of the project's folder


class CursorExpired(Exception):
    """The stored cursor (page token, delta link) is no longer valid: a full pass."""


class ProjectProblem(Exception):
    """This project cannot be indexed as it is configured (its folder does not exist
    or is ambiguous, the provider refuses the token even after a refresh, a URL the
    outbound policy refuses): no retry helps until someone changes something."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
