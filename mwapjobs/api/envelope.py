"""MWAP's JSON envelope for every response, errors included.

Success is `{"success": true, "data": ...}`; failure is
`{"success": false, "error": {"code", "message"}}`. The middleware turns
aiohttp's own 404/405/413 and any unexpected exception into that shape, so a
client never sees an HTML error page or a stack trace.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from aiohttp import web
from bson import ObjectId

from ..logs import correlation_id
from ..storage.mongo import StoreUnavailable
from .auth import AuthError

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

HTTP_CODES = {
    400: ("validation/bad-request", "The request is malformed."),
    401: ("auth/unauthorized", "Authentication is required."),
    403: ("auth/forbidden", "You are not allowed to do this."),
    404: ("http/not-found", "No such resource."),
    405: ("http/method-not-allowed", "This method is not allowed here."),
    413: ("http/payload-too-large", "The request body is too large."),
    415: ("http/unsupported-media-type", "Send JSON (Content-Type: application/json)."),
}


class ApiError(Exception):
    """Raise from a handler to answer with an error envelope."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, ObjectId):
        return str(value)
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return str(value)


def dumps(value: Any) -> str:
    return json.dumps(value, default=_default, ensure_ascii=False)


def ok(data: Any, status: int = 200) -> web.Response:
    return web.json_response({"success": True, "data": data}, status=status, dumps=dumps)


def error(status: int, code: str, message: str) -> web.Response:
    return web.json_response(
        {"success": False, "error": {"code": code, "message": message}}, status=status,
        dumps=dumps,
    )


@web.middleware
async def envelope_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    cid = request.headers.get("X-Correlation-Id") or str(uuid.uuid4())
    token = correlation_id.set(cid[:100])
    try:
        response = await handler(request)
    except (ApiError, AuthError) as exc:
        response = error(exc.status, exc.code, exc.message)
    except StoreUnavailable as exc:
        log.warning("request failed: MongoDB is unreachable",
                    extra={"path": request.path, "method": request.method, "error": str(exc)})
        response = error(503, "service/unavailable",
                         "MongoDB is unreachable right now; try again shortly.")
        response.headers["Retry-After"] = "5"
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code, message = HTTP_CODES.get(exc.status, (f"http/{exc.status}", exc.reason))
        response = error(exc.status, code, message)
        if exc.status == 405 and "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
    except Exception:
        log.exception("unhandled error", extra={"path": request.path, "method": request.method})
        response = error(500, "server/internal-error", "Something went wrong on our side.")
    finally:
        correlation_id.reset(token)
    response.headers["X-Correlation-Id"] = cid[:100]
    return response


MAX_JSON_DEPTH = 32  # objects and arrays inside one another in a request body


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _depth(value: Any, limit: int) -> int:
    """How deeply `value` nests (stops counting past `limit`)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return deepest


async def json_body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object body, or an empty object; anything else is a 400.

    Strict JSON (no NaN or Infinity), in the charset the request names (UTF-8 by
    default), nested at most MAX_JSON_DEPTH deep."""
    if not request.can_read_body:
        return {}
    if request.content_type != "application/json":
        raise ApiError(415, "http/unsupported-media-type", "Send JSON (application/json).")
    raw = await request.read()
    charset = request.charset or "utf-8"
    try:
        text = raw.decode(charset)
    except LookupError:
        raise ApiError(400, "validation/invalid-json",
                       f"Unknown charset {charset[:40]!r}; send UTF-8.") from None
    except UnicodeDecodeError:
        raise ApiError(400, "validation/invalid-json",
                       f"The body is not valid {charset[:40]}.") from None
    try:
        body = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ApiError(400, "validation/invalid-json", "The body nests too deeply.") from None
    except ValueError:
        raise ApiError(400, "validation/invalid-json", "The body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise ApiError(400, "validation/invalid-json", "The body must be a JSON object.")
    if _depth(body, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise ApiError(400, "validation/invalid-json",
                       f"The body nests deeper than {MAX_JSON_DEPTH} levels.")
    return body
