"""Provider items turned into `Entry`s, each field checked: provider answers are
untrusted, so a value of the wrong type, an oversized string or a date that does not
parse makes the item invalid (counted, skipped) rather than anything stored. Pure.

What each provider gives, and what is kept:

- id: `id` everywhere;
- type: Dropbox gives none (guessed from the extension); Drive `mimeType`; Graph
  `file.mimeType`; folders are `inode/directory` everywhere;
- size: Dropbox `size`, Drive `size` (a decimal string), Graph `size`;
- modified: Dropbox `server_modified`, Drive `modifiedTime`, Graph
  `lastModifiedDateTime`;
- checksum: Dropbox `content_hash`, Drive `md5Checksum`, Graph `file.hashes`
  (`sha256Hash`, else `sha1Hash`, else `quickXorHash`);
- permissions (sharing as the provider reports it): Dropbox `sharing_info` →
  `shared` + `read_only`/`read_write`; Drive `permissions` → `type:role` (else
  `shared`); Graph `shared.scope` → `shared:<scope>`.

Download and thumbnail URLs (Graph's `@microsoft.graph.downloadUrl`, ...) are
short-lived credentials of a sort, and are never kept.
"""

from __future__ import annotations

import mimetypes
from datetime import UTC, datetime
from typing import Any

from .model import Entry

MAX_ID = 1024
MAX_NAME = 1024
MAX_PERMISSIONS = 20
MAX_SIZE = 2 ** 62
FOLDER = "inode/directory"
DRIVE_FOLDER = "application/vnd.google-apps.folder"
# Built now, at import: the first guess reads the system's mime.types files, which must
# not happen on the event loop in the middle of a pass.
_TYPES = mimetypes.MimeTypes()


def text(value: Any, limit: int = MAX_NAME) -> str | None:
    """A non-empty string of at most `limit` characters without NUL, else None."""
    if not isinstance(value, str) or not value or len(value) > limit or "\0" in value:
        return None
    return value


def count(value: Any, *, decimal: bool = False) -> int | None:
    """A size: a non-negative integer (`decimal`: as a decimal string, as Drive sends it)."""
    if decimal and isinstance(value, str) and value.isdigit() and len(value) <= 19:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SIZE:
        return None
    return value


def when(value: Any) -> datetime | None:
    """An ISO 8601 instant (`Z` or an offset), in UTC to the millisecond as MongoDB
    stores it (so that a stored date compares equal to the same date read again)."""
    if not isinstance(value, str) or len(value) > 40:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        return None
    parsed = parsed.astimezone(UTC)
    return parsed.replace(microsecond=parsed.microsecond // 1000 * 1000)


def _mime_from_name(name: str) -> str:
    guessed, _ = _TYPES.guess_type(name, strict=False)
    return guessed or "application/octet-stream"


def dropbox_item(raw: Any) -> Entry | str | None:
    """A `list_folder` entry: an Entry, the lower-case path of a deleted item (str), or
    None when the entry is malformed."""
    if not isinstance(raw, dict):
        return None
    tag = raw.get(".tag")
    path_lower = text(raw.get("path_lower"), 4096)
    if tag == "deleted":
        return path_lower
    name = text(raw.get("name"))
    item_id = text(raw.get("id"), MAX_ID)
    path = text(raw.get("path_display"), 4096) or path_lower
    if tag not in ("file", "folder") or name is None or item_id is None or path is None:
        return None
    folder = tag == "folder"
    size = None if folder else count(raw.get("size"))
    if not folder and raw.get("size") is not None and size is None:
        return None
    sharing = raw.get("sharing_info")
    permissions: tuple[str, ...] = ()
    if isinstance(sharing, dict):
        permissions = ("shared", "read_only" if sharing.get("read_only") is True
                       else "read_write")
    return Entry(id=item_id, name=name, folder=folder, path=path, parent=None,
                 mime=FOLDER if folder else _mime_from_name(name), size=size,
                 modified=None if folder else when(raw.get("server_modified")),
                 checksum=None if folder else text(raw.get("content_hash"), 128),
                 permissions=permissions)


def drive_item(raw: Any, path: str | None = None) -> Entry | None:
    """A Drive `files` resource (from `files.list` or a change), or None if malformed.
    `path` when the caller knows it (a walk), else the writer resolves `parents[0]`."""
    if not isinstance(raw, dict):
        return None
    item_id = text(raw.get("id"), MAX_ID)
    name = text(raw.get("name"))
    mime = text(raw.get("mimeType"), 255)
    if item_id is None or name is None or mime is None:
        return None
    parents = raw.get("parents")
    parent = text(parents[0], MAX_ID) if isinstance(parents, list) and parents else None
    folder = mime == DRIVE_FOLDER
    permissions: list[str] = []
    listed = raw.get("permissions")
    if isinstance(listed, list):
        for item in listed[:MAX_PERMISSIONS]:
            if isinstance(item, dict):
                kind, role = text(item.get("type"), 40), text(item.get("role"), 40)
                if kind and role:
                    permissions.append(f"{kind}:{role}")
    if not permissions and raw.get("shared") is True:
        permissions.append("shared")
    return Entry(id=item_id, name=name, folder=folder, path=path, parent=parent,
                 mime=FOLDER if folder else mime,
                 size=None if folder else count(raw.get("size"), decimal=True),
                 modified=when(raw.get("modifiedTime")),
                 checksum=None if folder else text(raw.get("md5Checksum"), 128),
                 permissions=tuple(sorted(set(permissions))))


def graph_item(raw: Any) -> Entry | str | None:
    """A Graph `driveItem` from `delta`: an Entry, the id of a deleted item (str), or
    None when malformed."""
    if not isinstance(raw, dict):
        return None
    item_id = text(raw.get("id"), MAX_ID)
    if item_id is None:
        return None
    if isinstance(raw.get("deleted"), dict):
        return item_id
    name = text(raw.get("name"))
    reference = raw.get("parentReference")
    parent = text(reference.get("id"), MAX_ID) if isinstance(reference, dict) else None
    folder = isinstance(raw.get("folder"), dict) or isinstance(raw.get("package"), dict)
    file_facet = raw.get("file")
    if name is None or (not folder and not isinstance(file_facet, dict)):
        return None
    checksum = mime = None
    if isinstance(file_facet, dict):
        mime = text(file_facet.get("mimeType"), 255)
        hashes = file_facet.get("hashes")
        if isinstance(hashes, dict):
            checksum = next((h for h in (text(hashes.get(k), 128) for k in
                                         ("sha256Hash", "sha1Hash", "quickXorHash")) if h),
                            None)
    shared = raw.get("shared")
    scope = text(shared.get("scope"), 40) if isinstance(shared, dict) else None
    permissions = (f"shared:{scope}",) if scope else (("shared",) if shared else ())
    return Entry(id=item_id, name=name, folder=folder, path=None, parent=parent,
                 mime=FOLDER if folder else (mime or _mime_from_name(name)),
                 size=None if folder else count(raw.get("size")),
                 modified=when(raw.get("lastModifiedDateTime")), checksum=checksum,
                 permissions=permissions)
