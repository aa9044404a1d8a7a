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

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_HTTP_CODES = {
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
    except ApiError as exc:
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
        code, message = _HTTP_CODES.get(exc.status, (f"http/{exc.status}", exc.reason))
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


async def json_body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object body, or an empty object; anything else is a 400."""
    if not request.can_read_body:
        return {}
    if request.content_type != "application/json":
        raise ApiError(415, "http/unsupported-media-type", "Send JSON (application/json).")
    try:
        body = await request.json()
    except ValueError:
        raise ApiError(400, "validation/invalid-json", "The body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise ApiError(400, "validation/invalid-json", "The body must be a JSON object.")
    return body
