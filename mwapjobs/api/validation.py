"""Request parameter checks that answer 400 with a message naming the parameter."""

from __future__ import annotations

import re

from aiohttp import web

from .envelope import ApiError

_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def path_id(request: web.Request, name: str) -> str:
    value = request.match_info[name]
    if not _ID.match(value):
        raise ApiError(400, "validation/invalid-id",
                       f"{name} must be 1-64 letters, digits, '-' or '_'")
    return value


def query_bool(request: web.Request, name: str, default: bool = False) -> bool:
    raw = request.query.get(name)
    if raw is None:
        return default
    if raw.lower() in ("true", "1", "yes"):
        return True
    if raw.lower() in ("false", "0", "no"):
        return False
    raise ApiError(400, "validation/invalid-parameter", f"{name} must be true or false")


def query_int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, "validation/invalid-parameter",
                       f"{name} must be an integer") from None
    if not low <= value <= high:
        raise ApiError(400, "validation/invalid-parameter",
                       f"{name} must be between {low} and {high}")
    return value
