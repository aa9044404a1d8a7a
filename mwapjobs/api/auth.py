"""Who is calling, and may they: admin tokens and Auth0 user JWTs.

Two kinds of credential arrive as `Authorization: Bearer <value>`:

- admin tokens, random strings made by `mwapjobs admin-token`. The config holds
  only their SHA-256, so a leaked config file grants nothing;
- Auth0 access tokens (JWT, RS256), checked exactly as the MWAP backend checks
  them. Only `sub` is used; roles come from MongoDB (`storage/identity.py`).

A value with three dot-separated parts is a JWT; anything else is an admin
token. An admin token has a role (`admin.tokens[].role`): "admin", or "viewer",
which sees everything an admin sees and changes nothing: `require_admin` and
`require_tenant_access` refuse a viewer every method but GET, HEAD and OPTIONS,
so every mutating route (the jobs' too) answers 403 without a check of its own.

Failures answer 401 (`auth/unauthorized`) or 403 (`auth/forbidden`)
with a message that never echoes the credential, and are logged at info with
the reason and remote address only.

The JWKS is fetched with aiohttp, never with `jwt.PyJWKClient`, whose urllib
fetch would block the event loop that serves every other request.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
import jwt
from aiohttp import web

from ..config import Settings
from ..logs import actor_role
from ..storage.identity import IdentityStore

log = logging.getLogger(__name__)

ALGORITHM = "RS256"
LEEWAY = 30.0  # seconds of clock skew tolerated between us and Auth0
REQUIRED_CLAIMS = ["exp", "sub", "iss", "aud"]
UNAUTHORIZED = "auth/unauthorized"
FORBIDDEN = "auth/forbidden"
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True)
class Caller:
    """An authenticated caller.

    `name` is the admin token's configured name, or the user's JWT `sub`.
    `superadmin` means "sees everything an admin sees": always true for an admin
    token, and true for a user listed in `superadmins`. `viewer` (a token with
    role "viewer") takes every right to change anything away again.
    """

    kind: Literal["token", "user"]
    name: str
    superadmin: bool
    viewer: bool = False

    @property
    def role(self) -> str:
        """What audit and access lines call this caller's capacity."""
        if self.viewer:
            return "viewer"
        return "admin" if self.superadmin else "user"

    @property
    def actor(self) -> str:
        """How audit lines name this caller: `token:NAME` or `user:SUB`."""
        return f"{self.kind}:{self.name}"


# A session middleware may authenticate the request itself and leave the Caller here.
CALLER_KEY: web.RequestKey[Caller] = web.RequestKey("mwapjobs.caller", Caller)


class AuthError(Exception):
    """The caller is not authenticated (401), not allowed (403), or user tokens cannot be
    checked right now (503). The envelope middleware answers it like any API error."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class JwksUnavailable(Exception):
    """No signing keys at all: the JWKS has never been fetched successfully."""


class JwksCache:
    """Auth0's signing keys, fetched over aiohttp and kept for `ttl` seconds.

    A token signed with a key we do not know triggers a refetch (Auth0 rotated
    its keys), but fetches are at most one per `min_refresh_interval`, so
    tokens with made-up `kid`s cannot turn us into a JWKS-fetching machine.
    Concurrent callers share one in-flight fetch. When a refetch fails the
    previous keys stay in use: a short Auth0 outage should not log everyone out.
    (If the very first fetch fails there are no keys, and user tokens get 503
    until the next attempt, `min_refresh_interval` later.)

    Pass `session` to reuse the daemon's `aiohttp.ClientSession` (it is not
    closed here); without one, the cache makes its own on first use and
    `close()` closes it.
    """

    def __init__(
        self,
        jwks_url: str,
        issuer: str,
        *,
        ttl: float = 3600.0,
        session: aiohttp.ClientSession | None = None,
        min_refresh_interval: float = 30.0,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.jwks_url = jwks_url
        self.issuer = issuer
        self._ttl = ttl
        self._session = session
        self._owns_session = session is None
        self._min_refresh_interval = min_refresh_interval
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._clock = clock
        self._keys: dict[str, jwt.PyJWK] = {}
        self._expires = -math.inf
        self._next_fetch = -math.inf
        self._fetching: asyncio.Task[None] | None = None

    @classmethod
    def for_auth0(cls, domain: str, **options: Any) -> JwksCache:
        """The cache for an Auth0 tenant, with the URLs the MWAP backend derives."""
        host = domain.removeprefix("https://").strip("/")
        return cls(f"https://{host}/.well-known/jwks.json", f"https://{host}/", **options)

    @classmethod
    def from_settings(
        cls, settings: Settings, session: aiohttp.ClientSession | None = None
    ) -> JwksCache | None:
        """The cache for the configured Auth0 tenant, or None when user tokens are off."""
        if not (settings.auth0_domain and settings.auth0_audience):
            return None
        return cls.for_auth0(
            settings.auth0_domain, ttl=settings.admin.jwks_cache_ttl, session=session
        )

    async def get_key(self, kid: str) -> jwt.PyJWK:
        """The RS256 key `kid`, refetching the JWKS if it is stale or lacks `kid`.

        Raises KeyError for a key the JWKS does not have, and `JwksUnavailable`
        when there are no keys at all to check against.
        """
        now = self._clock()
        needed = now >= self._expires or kid not in self._keys
        if needed and (self._fetching is not None or now >= self._next_fetch):
            await self._refresh()
        if not self._keys:
            raise JwksUnavailable(self.jwks_url)
        return self._keys[kid]

    async def close(self) -> None:
        """Stop an in-flight fetch and close the session if it is ours."""
        fetching = self._fetching
        if fetching is not None:
            fetching.cancel()
            await asyncio.gather(fetching, return_exceptions=True)
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def _refresh(self) -> None:
        if self._fetching is None:
            self._next_fetch = self._clock() + self._min_refresh_interval
            self._fetching = asyncio.get_running_loop().create_task(self._fetch())
        # Shielded: one waiter giving up must not cancel the fetch the others share.
        await asyncio.shield(self._fetching)

    async def _fetch(self) -> None:
        try:
            if self._session is None:
                self._session = aiohttp.ClientSession()
            async with self._session.get(self.jwks_url, timeout=self._timeout) as response:
                response.raise_for_status()
                data = await response.json(content_type=None)
            keys = _signing_keys(data)
        except (aiohttp.ClientError, TimeoutError, ValueError, jwt.PyJWTError) as exc:
            log.warning(
                "JWKS fetch failed; keeping %d cached keys", len(self._keys),
                extra={"url": self.jwks_url, "error": f"{type(exc).__name__}: {exc}"[:300]},
            )
            return
        finally:
            self._fetching = None
        self._keys = keys
        self._expires = self._clock() + self._ttl
        log.info("JWKS fetched", extra={"url": self.jwks_url, "kids": sorted(keys)})


def _signing_keys(data: Any) -> dict[str, jwt.PyJWK]:
    """The RS256 signature keys of a JWKS document, by kid; other keys are ignored."""
    if not isinstance(data, dict):
        raise ValueError("the JWKS is not a JSON object")
    keys = {
        key.key_id: key
        for key in jwt.PyJWKSet.from_dict(data)
        if key.key_id and key.algorithm_name == ALGORITHM and key.public_key_use in (None, "sig")
    }
    if not keys:
        raise ValueError("the JWKS has no RS256 signing key with a kid")
    return keys


class _Denied(Exception):
    """An authentication failure: `reason` is for the log, `message` for the client."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.message = message


_INVALID = "The bearer token is not valid."


class Authenticator:
    """Turns a request's credentials into a `Caller` and enforces who may do what.

    `jwks` is None when Auth0 is not configured: admin tokens still work and
    JWTs are refused with a message saying so. The Authenticator does not own
    `jwks`; whoever made it closes it (`JwksCache.close`).
    """

    def __init__(
        self, settings: Settings, identity: IdentityStore, jwks: JwksCache | None
    ) -> None:
        self._identity = identity
        self._jwks = jwks
        self._audience = settings.auth0_audience
        self._admin_tokens = tuple((t.name, t.sha256, t.role) for t in settings.admin.tokens)
        if bool(settings.auth0_domain) != bool(settings.auth0_audience):
            log.warning("user tokens are off: set both AUTH0_DOMAIN and AUTH0_AUDIENCE")

    async def authenticate(self, request: web.Request) -> Caller:
        """The caller, from a session middleware's `CALLER_KEY` or the bearer token; else 401."""
        ready = request.get(CALLER_KEY)
        if isinstance(ready, Caller):
            actor_role.set(ready.role)
            return ready
        try:
            token = _bearer(request)
        except _Denied as denied:
            raise _unauthorized(denied, request.remote) from None
        caller = await self.authenticate_token(token, request.remote)
        actor_role.set(caller.role)
        return caller

    async def authenticate_token(self, token: str, remote: str | None = None) -> Caller:
        """The caller for a bearer value (admin token or JWT), e.g. from a login form; else 401."""
        try:
            if token.count(".") == 2:
                return await self.user_caller(await self._verify_jwt(token))
            name, role = self._match_admin_token(token)
            return Caller("token", name, superadmin=True, viewer=role == "viewer")
        except _Denied as denied:
            raise _unauthorized(denied, remote) from None

    async def user_caller(self, sub: str) -> Caller:
        """The caller for an already verified user, with their superadmin role read now."""
        return Caller("user", sub, superadmin=await self._identity.is_superadmin(sub))

    async def require_admin(self, request: web.Request) -> Caller:
        """An admin token or a superadmin; anyone else authenticated gets 403, and so does
        a viewer for anything but a read."""
        caller = await self.authenticate(request)
        if not caller.superadmin:
            raise _forbidden(caller, request, "This needs an admin token or a superadmin account.")
        _check_writable(caller, request)
        return caller

    async def require_tenant_access(self, request: web.Request, tenant_id: str) -> Caller:
        """An admin token, a superadmin, or the owner of `tenant_id`; anyone else gets 403,
        and so does a viewer for anything but a read."""
        caller = await self.authenticate(request)
        if caller.superadmin or await self._identity.is_tenant_owner(tenant_id, caller.name):
            _check_writable(caller, request)
            return caller
        raise _forbidden(caller, request, "Only the tenant's owner or a superadmin may do this.")

    def _match_admin_token(self, token: str) -> tuple[str, str]:
        """The name and role of the configured token `token` is, compared in constant time.

        Every entry is compared, match or not, so the time taken says nothing
        about which entry (if any) matched.
        """
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()
        matched: tuple[str, str] | None = None
        for name, expected, role in self._admin_tokens:
            if hmac.compare_digest(digest, expected) and matched is None:
                matched = (name, role)
        if matched is None:
            raise _Denied("unknown admin token", _INVALID)
        return matched

    async def _verify_jwt(self, token: str) -> str:
        """The `sub` of a valid Auth0 access token; `_Denied` for anything else."""
        jwks = self._jwks
        if jwks is None or not self._audience:
            raise _Denied(
                "user tokens not configured",
                "User tokens (JWT) are not configured on this server; use an admin token.",
            )
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise _Denied("malformed JWT", "The bearer token is malformed.") from None
        # Checked before the key look-up so that forged headers cannot trigger JWKS fetches;
        # jwt.decode enforces the same again.
        if header.get("alg") != ALGORITHM:
            raise _Denied("JWT algorithm not allowed", _INVALID)
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise _Denied("JWT has no kid", _INVALID)
        key = await _signing_key(jwks, kid)
        try:
            claims = jwt.decode(
                token, key, algorithms=[ALGORITHM], audience=self._audience,
                issuer=jwks.issuer, leeway=LEEWAY, options={"require": REQUIRED_CLAIMS},
            )
        except jwt.ExpiredSignatureError:
            raise _Denied("JWT expired", "The bearer token has expired.") from None
        except jwt.InvalidAudienceError:
            raise _Denied("JWT audience mismatch", _INVALID) from None
        except jwt.InvalidIssuerError:
            raise _Denied("JWT issuer mismatch", _INVALID) from None
        except jwt.PyJWTError as exc:
            raise _Denied(f"JWT rejected ({type(exc).__name__})", _INVALID) from None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise _Denied("JWT sub is empty", _INVALID)
        return sub


async def _signing_key(jwks: JwksCache, kid: str) -> jwt.PyJWK:
    try:
        return await jwks.get_key(kid)
    except KeyError:
        raise _Denied("JWT signed by an unknown key", _INVALID) from None
    except JwksUnavailable:
        # Not the caller's fault, so not a 401: their token may be fine.
        log.warning("cannot check a user token: no JWKS keys (fetch failing)")
        raise AuthError(
            503, "auth/unavailable", "User tokens cannot be checked right now; try again."
        ) from None


def _bearer(request: web.Request) -> str:
    header = request.headers.get("Authorization")
    if not header:
        raise _Denied(
            "no credentials", "Authentication is required: send Authorization: Bearer <token>."
        )
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        raise _Denied("not a Bearer credential", "Only Bearer tokens are accepted.")
    value = value.strip()
    if not value or " " in value:
        raise _Denied("malformed Authorization header", "The Authorization header is malformed.")
    return value


def _unauthorized(denied: _Denied, remote: str | None) -> AuthError:
    log.info("authentication failed: %s", denied.reason,
             extra={"reason": denied.reason, "remote": remote})
    return AuthError(401, UNAUTHORIZED, denied.message)


def _check_writable(caller: Caller, request: web.Request) -> None:
    """A viewer may read (GET, HEAD, OPTIONS) and nothing else."""
    if caller.viewer and request.method not in READ_METHODS:
        raise _forbidden(caller, request, "This token is read-only (role viewer): it can see "
                                          "everything and change nothing.")


def _forbidden(caller: Caller, request: web.Request, message: str) -> AuthError:
    log.info("access denied", extra={"actor": caller.actor, "role": caller.role,
                                     "method": request.method, "path": request.path,
                                     "remote": request.remote})
    return AuthError(403, FORBIDDEN, message)
