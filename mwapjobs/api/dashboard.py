"""The operator dashboard at /admin/queues: login sessions, CSRF, and the static page.

The page itself is plain HTML, CSS and JavaScript shipped in `mwapjobs/dashboard/`
(no build step, no CDN). It calls the same REST API as curl does
(`/api/v1/queues/...`); what this module adds is how a browser authenticates:

- `POST /admin/login` takes an admin token or an Auth0 JWT in the form field
  `token`, checks it with the daemon's `Authenticator`, requires an admin, and
  answers with a session cookie (`mwapjobs_session`: HttpOnly, SameSite=Strict,
  Path=/, Secure when `admin.cookie_secure`, Max-Age `admin.session_ttl`).
  Sessions live in this process's memory (a restart logs everyone out); the
  store keeps only the SHA-256 of each session id. A session made from a JWT
  ends when the JWT expires, and a user's superadmin role is re-read from
  MongoDB at every request, as for a bearer JWT (revoking it takes effect at once).
- `session_middleware` turns a valid session cookie into the request's
  `Caller` (`CALLER_KEY`), so the REST API works unchanged from the browser.
  A request with an `Authorization` header is left alone: bearer calls are not
  ambient credentials, so they need no CSRF token.
- CSRF: a cookie-authenticated POST, PUT, PATCH or DELETE must carry the
  session's token in `X-CSRF-Token` (the page reads it from `GET /admin/session`),
  else 403 `auth/csrf`. The login form, which has no session yet, is guarded by
  SameSite and by an Origin (or Referer / Sec-Fetch-Site) check.
- Every /admin response carries a strict Content-Security-Policy (no inline
  script or style, nothing from other origins) and no-sniff / no-frame headers.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import resources
from urllib.parse import urlsplit

import jwt
from aiohttp import web

from ..logs import audit
from .auth import CALLER_KEY, UNAUTHORIZED, AuthError, Caller
from .envelope import ApiError, ok
from .keys import AUTH, ENGINE, SETTINGS
from .queues import stats_key
from .throttle import Throttle

log = logging.getLogger(__name__)

COOKIE = "mwapjobs_session"
CSRF_HEADER = "X-CSRF-Token"
PREFIX = "/admin"
LOGIN_PATH = "/admin/login"
HOME_PATH = "/admin/queues"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
MAX_SESSIONS = 1000  # the oldest session goes when a new one would exceed this
REFRESH_SECONDS = 5  # the page's auto-refresh period

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
       "frame-ancestors 'none'")
_SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
}
_STATIC = {
    "app.js": "text/javascript",
    "style.css": "text/css",
}
_MESSAGE_SLOT = "<!--MESSAGE-->"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Session:
    caller: Caller
    csrf: str
    expires: float  # on the store's monotonic clock
    expires_at: datetime  # the same instant on the wall clock, for the page
    lifetime: float  # seconds it was made for: the cookie's Max-Age


class SessionStore:
    """Dashboard sessions in memory, keyed by the SHA-256 of the cookie's value."""

    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic,
                 max_sessions: int = MAX_SESSIONS) -> None:
        self.ttl = ttl
        self._clock = clock
        self._max = max_sessions
        self._sessions: dict[str, Session] = {}

    @staticmethod
    def _key(sid: str) -> str:
        return hashlib.sha256(sid.encode("utf-8", "surrogatepass")).hexdigest()

    def create(self, caller: Caller, ttl: float | None = None) -> tuple[str, Session]:
        """A new session id (the cookie value) and its session, valid `ttl` s at most."""
        self._prune()
        while len(self._sessions) >= self._max:
            oldest = min(self._sessions, key=lambda k: self._sessions[k].expires)
            del self._sessions[oldest]
        lifetime = self.ttl if ttl is None else max(0.0, min(ttl, self.ttl))
        now = self._clock()
        sid = secrets.token_urlsafe(32)
        session = Session(caller, secrets.token_urlsafe(32), now + lifetime,
                          datetime.now(UTC) + timedelta(seconds=lifetime), lifetime)
        self._sessions[self._key(sid)] = session
        return sid, session

    def get(self, sid: str) -> Session | None:
        key = self._key(sid)
        session = self._sessions.get(key)
        if session is not None and self._clock() >= session.expires:
            del self._sessions[key]
            return None
        return session

    def drop(self, sid: str) -> None:
        self._sessions.pop(self._key(sid), None)

    def __len__(self) -> int:
        return len(self._sessions)

    def _prune(self) -> None:
        now = self._clock()
        for key in [k for k, s in self._sessions.items() if now >= s.expires]:
            del self._sessions[key]


SESSIONS: web.AppKey[SessionStore] = web.AppKey("dashboard_sessions")
# Failed logins per client address: this many within the window, then 429 until it passes.
LOGIN_FAILURES: web.AppKey[Throttle] = web.AppKey("dashboard_login_failures")
MAX_FAILED_LOGINS, FAILED_LOGIN_WINDOW = 5, 300.0
_FILES: web.AppKey[dict[str, bytes]] = web.AppKey("dashboard_files")


def _is_dashboard(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


@web.middleware
async def session_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Authenticate by session cookie (with CSRF for state changes); secure /admin responses."""
    session = _session(request)
    if session is not None:
        if request.method not in SAFE_METHODS and request.path != LOGIN_PATH:
            _check_csrf(request, session)
        request[CALLER_KEY] = await _current_caller(request, session)
    response = await handler(request)
    if _is_dashboard(request.path):
        for name, value in _SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
    return response


def _session(request: web.Request) -> Session | None:
    """The request's dashboard session: a valid cookie, on a request without a bearer token."""
    store = request.app.get(SESSIONS)
    sid = request.cookies.get(COOKIE)
    if store is None or not sid or "Authorization" in request.headers:
        return None
    return store.get(sid)


def _check_csrf(request: web.Request, session: Session) -> None:
    sent = request.headers.get(CSRF_HEADER, "")
    if not hmac.compare_digest(sent.encode("utf-8", "surrogatepass"), session.csrf.encode()):
        log.info("CSRF check failed", extra={"actor": session.caller.actor, "path": request.path,
                                             "remote": request.remote})
        raise ApiError(403, "auth/csrf",
                       f"This request needs the session's {CSRF_HEADER} header; reload the page.")


async def _current_caller(request: web.Request, session: Session) -> Caller:
    """The session's caller; a user's superadmin role is read now, as for a bearer JWT."""
    if session.caller.kind == "user":
        return await request.app[AUTH].user_caller(session.caller.name)
    return session.caller


# -- pages -------------------------------------------------------------------


def _html(body: str, status: int = 200) -> web.Response:
    response = web.Response(text=body, status=status, content_type="text/html", charset="utf-8")
    response.headers["Cache-Control"] = "no-store"
    return response


def _redirect(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location, "Cache-Control": "no-store"})


def _login_page(request: web.Request, message: str = "", status: int = 200) -> web.Response:
    page = request.app[_FILES]["login.html"].decode()
    slot = f'<p class="login-error" role="alert">{html.escape(message)}</p>' if message else ""
    return _html(page.replace(_MESSAGE_SLOT, slot), status)


def _logged_in(request: web.Request) -> bool:
    """A valid session whose caller is (still) an admin."""
    caller = request.get(CALLER_KEY)
    return _session(request) is not None and isinstance(caller, Caller) and caller.superadmin


async def home(request: web.Request) -> web.Response:
    if not _logged_in(request):
        return _redirect(LOGIN_PATH)
    return _html(request.app[_FILES]["index.html"].decode())


async def to_home(request: web.Request) -> web.Response:
    return _redirect(HOME_PATH)


async def login_form(request: web.Request) -> web.Response:
    if _logged_in(request):
        return _redirect(HOME_PATH)
    return _login_page(request)


def _same_origin(request: web.Request) -> bool:
    """False for a login form posted from another site (login CSRF)."""
    if request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
        return False
    origin = request.headers.get("Origin") or request.headers.get("Referer")
    if origin is None:
        return True  # not a browser form: no ambient credentials to abuse
    return urlsplit(origin).netloc.lower() == request.host.lower()


async def login(request: web.Request) -> web.Response:
    if not _same_origin(request):
        log.info("cross-site login refused", extra={"remote": request.remote,
                                                    "origin": request.headers.get("Origin")})
        return _login_page(request, "Log in from this server's own login page.", 403)
    remote = request.remote or "unknown"
    wait = request.app[LOGIN_FAILURES].retry_after(remote)
    if wait is not None:
        response = _login_page(request, "Too many failed logins from your address; try "
                                        f"again in {int(wait) + 1} s.", 429)
        response.headers["Retry-After"] = str(int(wait) + 1)
        return response
    try:
        form = await request.post()
    except (ValueError, LookupError, web.HTTPException):  # a broken form or charset
        return _login_page(request, "The login form could not be read.", 400)
    token = form.get("token")
    if not isinstance(token, str) or not token.strip():
        return _login_page(request, "Enter an admin token.", 400)
    token = token.strip()
    try:
        caller = await request.app[AUTH].authenticate_token(token, request.remote)
    except AuthError as exc:
        request.app[LOGIN_FAILURES].hit(remote)
        if exc.status == 401:
            return _login_page(request, "That token is not valid.", 401)
        return _login_page(request, exc.message, exc.status)
    request.app[LOGIN_FAILURES].clear(remote)
    if not caller.superadmin:
        log.info("dashboard login denied: not an admin", extra={"actor": caller.actor,
                                                                "remote": request.remote})
        return _login_page(request, "This account is not an admin.", 403)
    store = request.app[SESSIONS]
    old = request.cookies.get(COOKIE)
    if old:
        store.drop(old)  # a fresh id at every login: no session fixation
    sid, session = store.create(caller, _jwt_lifetime(token))
    audit("admin.login", caller.actor, "dashboard", remote=request.remote, role=caller.role)
    response = _redirect(HOME_PATH)
    response.set_cookie(COOKIE, sid, max_age=int(session.lifetime), path="/", httponly=True,
                        secure=request.app[SETTINGS].admin.cookie_secure, samesite="Strict")
    return response


def _jwt_lifetime(token: str) -> float | None:
    """Seconds until an (already verified) JWT expires, or None for an admin token."""
    if token.count(".") != 2:
        return None
    exp = jwt.decode(token, options={"verify_signature": False}).get("exp")
    return float(exp) - time.time() if isinstance(exp, int | float) else None


async def logout(request: web.Request) -> web.Response:
    sid = request.cookies.get(COOKIE)
    session = _session(request)  # the middleware has checked its CSRF token
    if sid and session is not None:
        request.app[SESSIONS].drop(sid)
        audit("admin.logout", session.caller.actor, "dashboard", remote=request.remote,
              role=session.caller.role)
    response = ok({"loggedOut": True})
    response.del_cookie(COOKIE, path="/", secure=request.app[SETTINGS].admin.cookie_secure,
                        httponly=True, samesite="Strict")
    return response


async def session_info(request: web.Request) -> web.Response:
    """What the page needs to start: who is logged in, the CSRF token, the queues."""
    session = _session(request)
    caller = request.get(CALLER_KEY)
    if session is None or not isinstance(caller, Caller):
        raise ApiError(401, UNAUTHORIZED, "No dashboard session: log in at /admin/login.")
    names = request.app[ENGINE].registry.names()
    response = ok({
        "actor": caller.actor,
        "isAdmin": caller.superadmin,
        "role": caller.role,
        "readOnly": caller.viewer,
        "csrfToken": session.csrf,
        "expiresAt": session.expires_at,
        "refreshSeconds": REFRESH_SECONDS,
        "queues": [{"name": name, "statsKey": stats_key(name)} for name in names],
        "searchFields": list(request.app[ENGINE].runs.search_fields),
    })
    response.headers["Cache-Control"] = "no-store"
    return response


async def static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in _STATIC:
        raise ApiError(404, "http/not-found", "No such resource.")
    response = web.Response(body=request.app[_FILES][name], content_type=_STATIC[name],
                            charset="utf-8")
    response.headers["Cache-Control"] = "no-cache"
    return response


def _load_files() -> dict[str, bytes]:
    folder = resources.files("mwapjobs").joinpath("dashboard")
    return {name: folder.joinpath(name).read_bytes()
            for name in ("index.html", "login.html", *_STATIC)}


def add_routes(app: web.Application) -> None:
    """The dashboard's routes and session store (add `session_middleware` to the app too)."""
    app[SESSIONS] = SessionStore(app[SETTINGS].admin.session_ttl)
    app[LOGIN_FAILURES] = Throttle(MAX_FAILED_LOGINS, FAILED_LOGIN_WINDOW)
    app[_FILES] = _load_files()
    r = app.router
    r.add_get(PREFIX, to_home)
    r.add_get(HOME_PATH, home)
    r.add_get(LOGIN_PATH, login_form)
    r.add_post(LOGIN_PATH, login)
    r.add_post(PREFIX + "/logout", logout)
    r.add_get(PREFIX + "/session", session_info)
    r.add_get(PREFIX + "/static/{name}", static)


__all__ = ["COOKIE", "CSRF_HEADER", "SESSIONS", "Session", "SessionStore", "add_routes",
           "session_middleware"]
