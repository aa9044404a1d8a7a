"""A fake Auth0 for tests: RSA keys, their JWKS served on 127.0.0.1, and signed tokens.

    async with JwksServer() as idp:
        token = idp.token("auth0|alice")      # a valid RS256 access token for that sub
        cache = idp.cache(clock=...)          # mwapjobs JwksCache pointed at this server
        settings = make_settings(auth0_domain="idp.test", auth0_audience=idp.audience)

Beyond that:
- `idp.add_key()` makes a new key and serves it (key rotation); new tokens are
  signed with it. `add_key(serve=False)` makes a key Auth0 never published.
- `idp.sign(claims, kid=..., alg=..., key=..., headers=...)` signs anything, for
  attack tests.
- `idp.fetches` counts JWKS requests; `idp.status` makes the server fail.
- `idp.hold()` / `idp.release()` make JWKS responses wait, to observe
  callers while a fetch is in flight.

The keys are real (cryptography) and the tokens are made by PyJWT, so what
passes here passes against Auth0's own tokens.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from mwapjobs.api.auth import JwksCache
from tests.support.local_server import LocalServer

AUDIENCE = "https://api.mwap.test"
ISSUER = "https://idp.test/"


class JwksServer(LocalServer):
    """An identity provider's JWKS endpoint plus its private keys; an async context manager."""

    def __init__(self, audience: str = AUDIENCE, issuer: str = ISSUER) -> None:
        super().__init__()
        self.audience = audience
        self.issuer = issuer
        self.fetches = 0
        self.status = 200
        self._private: dict[str, rsa.RSAPrivateKey] = {}
        self._served: list[str] = []
        self._current = ""
        self._gate = asyncio.Event()
        self._gate.set()
        self.add_key("key-1")

    @property
    def url(self) -> str:
        return f"{self.base_url}/.well-known/jwks.json"

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/.well-known/jwks.json", self._jwks)

    def stopping(self) -> None:
        self.release()

    def cache(self, **options: Any) -> JwksCache:
        """A `JwksCache` for this server (options as for `JwksCache`, e.g. clock, ttl)."""
        return JwksCache(self.url, self.issuer, **options)

    def add_key(self, kid: str | None = None, *, serve: bool = True) -> str:
        """Make a new RSA key, sign new tokens with it, and (by default) publish it."""
        kid = kid or f"key-{len(self._private) + 1}"
        self._private[kid] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if serve:
            self._served.append(kid)
        self._current = kid
        return kid

    def public_pem(self, kid: str | None = None) -> bytes:
        """The PEM of a public key, e.g. as the secret of an HS256 key-confusion attack."""
        return self._private[kid or self._current].public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def claims(self, sub: str, **overrides: Any) -> dict[str, Any]:
        """Valid access-token claims for `sub`; an override of None removes that claim."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "sub": sub, "iss": self.issuer, "aud": self.audience, "iat": now, "exp": now + 3600,
        }
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def token(self, sub: str, *, kid: str | None = None, **overrides: Any) -> str:
        """A valid RS256 token for `sub` (claims changed by `overrides`, see `claims`)."""
        return self.sign(self.claims(sub, **overrides), kid=kid)

    def sign(
        self, claims: dict[str, Any], *, kid: str | None = None, alg: str = "RS256",
        key: Any = None, headers: dict[str, Any] | None = None,
    ) -> str:
        """Sign `claims` with PyJWT.

        `key` defaults to the private key of `kid` (default: the newest key);
        `headers` replaces the default `{"kid": kid}` (pass {} for no kid).
        """
        kid = kid or self._current
        if key is None and alg != "none":
            key = self._private[kid]
        return jwt.encode(claims, key, algorithm=alg,
                          headers={"kid": kid} if headers is None else headers)

    def hold(self) -> None:
        """Make JWKS requests wait (they are still counted) until `release()`."""
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    async def _jwks(self, request: web.Request) -> web.Response:
        self.fetches += 1
        await self._gate.wait()
        if self.status != 200:
            return web.Response(status=self.status, text="unavailable")
        keys = [
            {**RSAAlgorithm.to_jwk(self._private[kid].public_key(), as_dict=True),
             "kid": kid, "use": "sig", "alg": "RS256"}
            for kid in self._served
        ]
        return web.json_response({"keys": keys})
