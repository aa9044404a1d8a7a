"""The `token-refresh` queue: refresh one integration's OAuth token (RFC 6749 §6).

One job per integration (`job_id = "integration:<id>"`), due `refresh.lead`
seconds before `tokenExpiresAt`. The request mirrors the MWAP backend's
(method `tokenMethod`, form-encoded `grant_type=refresh_token`, its User-Agent),
with client authentication `client_secret_basic` unless the provider's
`metadata.tokenEndpointAuthMethod` is `client_secret_post`. Basic credentials
are form-urlencoded first, as RFC 6749 §2.3.1 requires (the backend skips this,
which breaks secrets containing `%`, `+` or `/`); a provider that wants them raw
can say `metadata.basicAuthEncoding = "raw"`.

Outcomes:
- success: tokens written back (encrypted, MWAP's format) unless the tenant
  reconnected meanwhile, in which case their newer tokens are kept;
- transient failure (network, timeout, 5xx, 429): retried with backoff, never
  past the token's expiry (the run's deadline); when the token expires before
  another attempt can run, the integration is marked `expired`;
- permanent failure (`invalid_grant`, `invalid_client`, `unauthorized_client`,
  other 4xx): the integration is marked `expired` so the tenant can reconnect,
  the reason goes to our own records, and a notification is recorded.
A `revoked` integration is never refreshed or reactivated.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote

import aiohttp

from ..config import RefreshSettings
from ..crypto import DecryptionError, MwapCipher
from ..engine import Engine, as_utc
from ..queues import Job, PermanentError, QueueRegistry, TransientError
from ..ratelimit import KeyedLimiter
from ..storage.integrations import IntegrationStore

log = logging.getLogger(__name__)

QUEUE = "token-refresh"
MANUAL_PRIORITY = 100
DEFAULT_EXPIRES_IN = 3600
PERMANENT_OAUTH_ERRORS = {"invalid_grant", "invalid_client", "unauthorized_client"}


def job_id(integration_id: str) -> str:
    return f"integration:{integration_id}"


def fingerprint(stored_token: str | None) -> str:
    """Identifies a stored refresh token without keeping it (a reconnect changes it)."""
    return hashlib.sha256((stored_token or "").encode()).hexdigest()[:32]


class RefreshFailed(PermanentError):
    """The provider refused the refresh token or the client: reconnecting is the fix."""


class TokenRefresher:
    """The job handler. Stateless apart from its HTTP session and provider limiter."""

    def __init__(
        self,
        store: IntegrationStore,
        cipher: MwapCipher,
        http: aiohttp.ClientSession,
        settings: RefreshSettings,
        clock: Callable[[], datetime],
    ) -> None:
        self.store = store
        self.cipher = cipher
        self.http = http
        self.settings = settings
        self.clock = clock
        self.limiter = KeyedLimiter(settings.provider_concurrency, settings.provider_rate)
        self.requests = 0

    def register(self, registry: QueueRegistry) -> None:
        registry.register(QUEUE, self, attempts=3, backoff={"delay": 5.0},
                          timeout=self.settings.request_timeout * 2, concurrency=50)

    async def __call__(self, job: Job) -> dict[str, Any]:
        integration_id = str(job.data["integrationId"])
        integration = await self.store.get(integration_id)
        if integration is None:
            return {"skipped": "the integration no longer exists"}
        if integration.get("status") == "revoked":
            return {"skipped": "the integration is revoked"}
        if not integration.get("refreshToken"):
            return {"skipped": "the integration has no refresh token"}
        provider = await self.store.provider(str(integration.get("providerId")))
        if provider is None:
            raise PermanentError(f"provider {integration.get('providerId')} not found")
        refresh_token = self._stored_token(integration["refreshToken"])
        try:
            tokens = await self._request(provider, refresh_token)
        except RefreshFailed as exc:
            await self._give_up(integration, str(exc))
            raise
        return await self._save(integration, refresh_token, tokens)

    def _stored_token(self, stored: str) -> str:
        """The plaintext of a stored token. Plain text (written by the backend's PATCH) is
        used as it is; a ciphertext that does not decrypt is never sent to the provider,
        whose invalid_grant would then expire a healthy integration."""
        if not MwapCipher.looks_encrypted(stored):
            return stored
        try:
            return self.cipher.decrypt(stored)
        except DecryptionError:
            raise PermanentError(
                "the stored refresh token does not decrypt: is ENCRYPTION_KEY the backend's?"
            ) from None

    async def _request(self, provider: dict[str, Any], refresh_token: str) -> dict[str, Any]:
        metadata = provider.get("metadata") or {}
        client_id = str(provider.get("clientId", ""))
        secret = self.cipher.decrypt_lenient(str(provider.get("clientSecret") or ""))
        form = {"grant_type": "refresh_token", "refresh_token": refresh_token}
        headers = {"User-Agent": self.settings.user_agent, "Accept": "application/json"}
        if metadata.get("tokenEndpointAuthMethod") == "client_secret_post":
            form |= {"client_id": client_id, "client_secret": secret}
        else:
            raw = metadata.get("basicAuthEncoding") == "raw"
            user, password = (client_id, secret) if raw else (quote(client_id, safe=""),
                                                             quote(secret, safe=""))
            basic = base64.b64encode(f"{user}:{password}".encode()).decode()
            headers["Authorization"] = f"Basic {basic}"
        method = str(provider.get("tokenMethod") or "POST").upper()
        url = str(provider.get("tokenUrl") or "")
        timeout = aiohttp.ClientTimeout(total=self.settings.request_timeout)
        async with self.limiter.slot(str(provider["_id"])):
            self.requests += 1
            try:
                async with self.http.request(method, url, data=form, headers=headers,
                                             timeout=timeout, allow_redirects=False) as resp:
                    body = await resp.text()
                    status, retry_after = resp.status, resp.headers.get("Retry-After")
            except TimeoutError:
                raise TransientError(
                    f"token endpoint timed out after {self.settings.request_timeout:g}s"
                ) from None
            except aiohttp.ClientError as exc:
                raise TransientError(f"token endpoint unreachable: {type(exc).__name__}") from None
        return self._parse(status, body, retry_after)

    def _parse(self, status: int, body: str, retry_after: str | None) -> dict[str, Any]:
        payload = _json_object(body)
        if status == 429:
            raise TransientError("token endpoint rate-limited us (429)",
                                 retry_after=_retry_after_seconds(retry_after, self.clock()))
        if status >= 500:
            raise TransientError(f"token endpoint failed with HTTP {status}")
        if status >= 400 or status < 200:
            error = str(payload.get("error") or f"HTTP {status}") if payload else f"HTTP {status}"
            description = str(payload.get("error_description") or "") if payload else ""
            reason = f"{error}: {description}" if description else error
            raise RefreshFailed(f"provider refused the refresh ({reason})")
        if not payload or not isinstance(payload.get("access_token"), str):
            raise TransientError("token endpoint answered without an access_token")
        return payload

    async def _save(self, integration: dict[str, Any], refresh_token: str,
                    tokens: dict[str, Any]) -> dict[str, Any]:
        now = self.clock()
        try:
            expires_in = int(tokens.get("expires_in") or DEFAULT_EXPIRES_IN)
        except (TypeError, ValueError):
            expires_in = DEFAULT_EXPIRES_IN
        new_refresh = tokens.get("refresh_token")
        if not (isinstance(new_refresh, str) and new_refresh):
            new_refresh = None  # Dropbox returns none: keep ours
        stored = integration["refreshToken"]
        fields: dict[str, Any] = {
            "accessToken": self.cipher.encrypt(tokens["access_token"]),
            "refreshToken": (
                self.cipher.encrypt(new_refresh or refresh_token)
                if new_refresh or not MwapCipher.looks_encrypted(stored) else stored
            ),
            "tokenExpiresAt": now + timedelta(seconds=expires_in),
            "status": "active",
            "updatedAt": now,
        }
        scopes = str(tokens.get("scope") or "").split()
        if scopes:
            fields["scopesGranted"] = scopes
        if not await self.store.save_tokens(integration, fields):
            log.warning("integration changed while refreshing; keeping the newer tokens",
                        extra={"integrationId": str(integration["_id"])})
            return {"skipped": "the integration changed during the refresh; newer tokens kept"}
        await self.store.clear_refresh_failure(str(integration["_id"]))
        return {"expiresAt": fields["tokenExpiresAt"].isoformat(),
                "rotated": new_refresh is not None and new_refresh != refresh_token}

    async def _give_up(self, integration: dict[str, Any], reason: str) -> None:
        """Permanent failure: `expired` invites the tenant to reconnect (an `active`
        integration with a dead token would block the backend's reconnect)."""
        now = self.clock()
        integration_id = str(integration["_id"])
        await self.store.record_refresh_failure(
            integration_id, fingerprint(integration.get("refreshToken")), reason, now)
        if await self.store.set_status(integration, "expired", now):
            await self.store.notify("integration.expired", integration, reason, now)
        log.warning("refresh failed for good; integration marked expired",
                    extra={"integrationId": integration_id, "tenantId": integration.get("tenantId"),
                           "reason": reason})

    async def on_run_failed(self, engine: Engine, job_data: dict[str, Any],
                            error: dict[str, Any]) -> None:
        """After a run's last transient failure: keep trying while the token is valid
        (a new run after `sync_interval`, or the provider's Retry-After if longer),
        and once the token would expire before the next try, mark the integration
        expired: it cannot be saved in time."""
        if error.get("permanent"):
            return
        integration = await self.store.get(str(job_data.get("integrationId")))
        if integration is None or not isinstance(integration.get("tokenExpiresAt"), datetime):
            return
        now = self.clock()
        expires = as_utc(integration["tokenExpiresAt"])
        wait = max(self.settings.sync_interval, float(error.get("retryAfter") or 0))
        if not error.get("deadlineExceeded") and expires > now + timedelta(seconds=wait):
            await engine.add(QUEUE, job_data, job_id=job_id(str(integration["_id"])),
                             delay=wait, deadline=expires)
            return
        if await self.store.set_status(integration, "expired", now,
                                       only_from=("active", "error")):
            reason = f"token expired before a refresh succeeded ({error.get('message')})"
            await self.store.notify("integration.expired", integration, reason, now)
            log.warning("token could not be refreshed before expiry; integration marked expired",
                        extra={"integrationId": str(integration["_id"])})


def _json_object(body: str) -> dict[str, Any] | None:
    try:
        value = json.loads(body)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _retry_after_seconds(value: str | None, now: datetime) -> float | None:
    """Retry-After as seconds: delta-seconds or an HTTP date (RFC 9110 §10.2.3)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, (parsedate_to_datetime(value) - now).total_seconds())
    except (TypeError, ValueError):
        return None


def follow_up_failures(engine: Engine, refresher: TokenRefresher) -> None:
    """After a refresh run fails for good: try again later, or mark the integration expired."""

    async def on_event(event: str, run: dict[str, Any]) -> None:
        if event == "failed" and run.get("queue") == QUEUE:
            await refresher.on_run_failed(engine, run.get("data") or {}, run.get("error") or {})

    engine.subscribe(on_event)
