"""The `token-refresh` queue: refresh one integration's OAuth token (RFC 6749 §6).

One job per integration (`job_id = "integration:<id>"`), due `refresh.lead`
seconds before `tokenExpiresAt`. The request mirrors the MWAP backend's
(method `tokenMethod`, form-encoded `grant_type=refresh_token`, its User-Agent),
with client authentication `client_secret_basic` unless the provider's
`metadata.tokenEndpointAuthMethod` is `client_secret_post`. Basic credentials
are form-urlencoded first, as RFC 6749 §2.3.1 requires (the backend skips this,
which breaks secrets containing `%`, `+` or `/`); a provider that wants them raw
can say `metadata.basicAuthEncoding = "raw"`. An answer is read as JSON, or as
`application/x-www-form-urlencoded` (GitHub-style endpoints), and an OAuth
`error` in it counts whatever the HTTP status (a 200 can carry one).

Outcomes, by who can fix them:
- success: tokens written back (encrypted, MWAP's format) unless the tenant
  reconnected meanwhile, in which case their newer tokens are kept;
- the tenant's grant is dead (`invalid_grant`; GitHub's `bad_refresh_token`):
  permanent for that integration only. It is marked `expired` so the tenant
  can reconnect, the reason goes to our own records, a notification is recorded;
- the *provider's* configuration is wrong (`invalid_client`,
  `unauthorized_client`, `unsupported_grant_type`, any 401, a token URL that
  answers 3xx/404/405/410 or is not a URL, a 403 without an OAuth error code, a
  TLS failure): no tenant's fault. The provider is put on hold
  (storage/providers.py) and its refreshes are postponed (`Postpone`), not
  failed; no integration changes. The hold ends when the provider's document
  changes, or when a re-probe (one refresh let through every
  `refresh.provider_hold_recheck` s) succeeds; the postponed runs are then promoted;
- anything else (network, timeout, 5xx, 429, another 4xx or OAuth error): retried
  with backoff, never past the token's expiry (the run's deadline); when the token
  expires before another attempt can run, the integration is marked `expired`.
An `error_description` is kept (at most `DESCRIPTION_LIMIT` characters) only
after every value sent in that request (tokens, client id and secret, in every
encoding sent) is removed from it. A `revoked` integration is never refreshed or
reactivated.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import math
import random
import re
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import parse_qsl, quote, quote_plus, urlsplit

import aiohttp

from ...config import RefreshSettings
from ...crypto import DecryptionError, MwapCipher
from ...engine import Engine, as_utc
from ...logs import secrets
from ...outbound import UrlPolicy
from ...queues import AndThen, Job, PermanentError, Postpone, QueueRegistry, TransientError
from ...ratelimit import KeyedLimiter
from ...storage.integrations import IntegrationStore
from ...storage.providers import Problem, ProviderHolds, config_fingerprint
from ...supervisor import Supervisor
from ..providers import provider_kind
from .cycle import give_up, next_refresh
from .runs import QUEUE, connection_fingerprint

log = logging.getLogger(__name__)

DEFAULT_EXPIRES_IN = 3600
DESCRIPTION_LIMIT = 300  # characters of a provider's error_description that we keep
REDACTED = "[redacted]"
# The tenant's grant is dead: reconnecting is the fix (GitHub says bad_refresh_token).
GRANT_ERRORS = frozenset({"invalid_grant", "bad_refresh_token"})
# The provider's client configuration is wrong: the same for every tenant of it.
CLIENT_ERRORS = frozenset({"invalid_client", "unauthorized_client", "unsupported_grant_type",
                           "incorrect_client_credentials"})
WRONG_URL_STATUSES = frozenset({404, 405, 410})
FORM = "application/x-www-form-urlencoded"


class RefreshFailed(PermanentError):
    """The provider refused the tenant's refresh token: reconnecting is the fix."""


class ProviderProblem(Exception):
    """The token endpoint refuses our configuration of the provider: no tenant's fault."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.reason)
        self.problem = problem


class TokenRefresher:
    """The job handler. Stateless apart from its HTTP session and provider limiter."""

    def __init__(
        self,
        store: IntegrationStore,
        cipher: MwapCipher,
        http: aiohttp.ClientSession,
        settings: RefreshSettings,
        clock: Callable[[], datetime],
        policy: UrlPolicy | None = None,
        engine: Engine | None = None,
        tasks: Supervisor | None = None,
        shared: KeyedLimiter | None = None,
    ) -> None:
        """`policy` decides where the client secret and refresh tokens may be sent
        (default: https to the known hosts of each provider kind); `engine`, when given,
        promotes a provider's postponed runs as soon as its hold ends; `shared` is the
        per-provider limiter every job's requests share (`JobContext.limiter`)."""
        self.store = store
        self.policy = policy or UrlPolicy()
        self.holds: ProviderHolds = store.holds
        self.cipher = cipher
        self.http = http
        self.settings = settings
        self.clock = clock
        self.limiter = KeyedLimiter(settings.provider_concurrency, settings.provider_rate,
                                    within=shared)
        self.engine = engine
        self.tasks = tasks or Supervisor()  # where the promotion after a hold runs

    def register(self, registry: QueueRegistry) -> None:
        """Three attempts 5 s apart, then the cycle's follow-up (cycle.py) decides."""
        registry.register(QUEUE, self, attempts=3, backoff={"delay": 5.0},
                          timeout=self.settings.request_timeout * 2, concurrency=50)

    async def __call__(self, job: Job) -> AndThen | dict[str, Any]:
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
        refused: RefreshFailed | None = None
        # Admission and a new hold happen inside the provider's slot: the requests queued
        # behind this one see the hold before they are sent, so a burst for a broken
        # provider costs one refused request, not one per tenant. The hold is read before
        # the slot, so that no query waits between the slot's paced start and the request
        # (a slow store then bunched requests past the provider's rate).
        await self.holds.get(str(provider["_id"]))
        async with self.limiter.slot(str(provider["_id"])):
            probing = await self._admit(provider)
            try:
                tokens = await self._request(provider, refresh_token)
            except ProviderProblem as exc:
                raise await self._hold(provider, exc.problem, probing) from None
            except RefreshFailed as exc:
                refused = exc
        # The provider judged the request on its merits: its client configuration works.
        await self._provider_works(provider, probing)
        if refused is not None:
            await give_up(self.store, integration, str(refused), self.clock())
            raise refused
        result = await self._save(integration, refresh_token, tokens,
                                  refused_before=bool(job.data.get("refusedBefore")))
        # The next refresh, for the tokens just written, goes with the completion.
        return next_refresh(job.data, result, self.settings, self.clock())

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

    # -- provider holds ------------------------------------------------------------------

    async def _admit(self, provider: dict[str, Any]) -> bool:
        """May this run ask the provider? False: yes, as usual. True: yes, as the
        re-probe of a held provider. Raises Postpone while the provider is on hold."""
        provider_id = str(provider["_id"])
        # Read just before the slot; a hold set or lifted since then was forgotten, and
        # is asked for again here.
        if await self.holds.get(provider_id, max_age=math.inf) is None:
            return False
        hold = await self.holds.get(provider_id, fresh=True)  # held: never act on a stale read
        if hold is None:
            return False
        now = self.clock()
        config = config_fingerprint(provider)
        if hold.get("config") != config:  # the operator changed the provider: try it
            await self._lift(provider, hold.get("config"),
                             "the provider's configuration changed")
            return False
        recheck = self.settings.provider_hold_recheck
        if await self.holds.claim_probe(provider_id, config, now, recheck):
            log.info("provider on hold: letting one refresh through to test it again",
                     extra={"providerId": provider_id, "provider": provider.get("name"),
                            "error": hold.get("error")})
            return True
        next_probe = hold.get("nextProbeAt")
        until = ((as_utc(next_probe) - now).total_seconds()
                 if isinstance(next_probe, datetime) else recheck)
        raise Postpone(f"provider {_label(provider)} is on hold ({hold.get('error')}): "
                       f"{hold.get('reason')}", _postpone_delay(until, recheck))

    async def _hold(self, provider: dict[str, Any], problem: Problem,
                    probing: bool) -> Postpone:
        """The token endpoint refused our configuration: hold the provider (one error
        line when the hold starts) and postpone this run; no integration changes."""
        recheck = self.settings.provider_hold_recheck
        started = await self.holds.hold(provider, problem, self.clock(), recheck)
        context = {"providerId": str(provider["_id"]), "provider": provider.get("name"),
                   "error": problem.error, "reason": problem.reason,
                   "httpStatus": problem.http_status, "recheckIn": recheck}
        if started:
            log.error("provider put on hold: its token endpoint refuses our configuration "
                      "of it; no tenant's status changes and its refreshes wait until the "
                      "provider is fixed", extra=context)
        elif probing:
            log.info("provider still on hold after a re-probe", extra=context)
        return Postpone(f"provider {_label(provider)} is on hold ({problem.error}): "
                        f"{problem.reason}", _postpone_delay(recheck, recheck))

    async def _provider_works(self, provider: dict[str, Any], probing: bool) -> None:
        """The provider judged our request on its merits: a hold on it can end."""
        if probing or await self.holds.get(str(provider["_id"])) is not None:
            await self._lift(provider, None, "a refresh got through")

    async def _lift(self, provider: dict[str, Any], config: str | None, because: str) -> None:
        provider_id = str(provider["_id"])
        hold = await self.holds.lift(provider_id, config, self.clock(), because)
        if hold is None:
            return  # not held any more (another run or daemon lifted it)
        log.info("provider hold lifted; its postponed refreshes resume",
                 extra={"providerId": provider_id, "provider": provider.get("name"),
                        "because": because, "heldSince": hold.get("since"),
                        "error": hold.get("error"), "probes": hold.get("probes")})
        if self.engine is not None:
            self.tasks.spawn(f"promote:{provider_id}", resume_postponed(self.engine, provider_id))

    # -- the request --------------------------------------------------------------------

    async def _request(self, provider: dict[str, Any], refresh_token: str) -> dict[str, Any]:
        metadata = provider.get("metadata") or {}
        client_id = str(provider.get("clientId", ""))
        secret = self.cipher.decrypt_lenient(str(provider.get("clientSecret") or ""))
        form = {"grant_type": "refresh_token", "refresh_token": refresh_token}
        headers = {"User-Agent": self.settings.user_agent, "Accept": "application/json"}
        sent = [refresh_token, client_id, secret]
        if metadata.get("tokenEndpointAuthMethod") == "client_secret_post":
            form |= {"client_id": client_id, "client_secret": secret}
        else:
            raw = metadata.get("basicAuthEncoding") == "raw"
            user, password = (client_id, secret) if raw else (quote(client_id, safe=""),
                                                             quote(secret, safe=""))
            basic = base64.b64encode(f"{user}:{password}".encode()).decode()
            headers["Authorization"] = f"Basic {basic}"
            sent += [f"{user}:{password}", basic]
        method = str(provider.get("tokenMethod") or "POST").upper()
        url = str(provider.get("tokenUrl") or "")
        refusal = self.policy.refusal(url, provider_kind(provider))
        if refusal is not None:  # nothing is sent: the URL is the provider's problem
            raise ProviderProblem(Problem(
                "tokenUrl refused", f"tokenUrl {scrub(url, sent)[:200]!r} is refused by "
                                    f"the outbound policy: {refusal}"))
        timeout = aiohttp.ClientTimeout(total=self.settings.request_timeout)
        # The caller holds the provider's limiter slot.
        try:
            async with self.http.request(method, url, data=form, headers=headers,
                                         timeout=timeout, allow_redirects=False) as resp:
                body = await resp.text()
                status, retry_after = resp.status, resp.headers.get("Retry-After")
                content_type = resp.headers.get("Content-Type", "")
                location = resp.headers.get("Location", "")
        except TimeoutError:
            raise TransientError(
                f"token endpoint timed out after {self.settings.request_timeout:g}s"
            ) from None
        except (aiohttp.ClientSSLError, aiohttp.ServerFingerprintMismatch) as exc:
            detail = scrub(f"{type(exc).__name__}: {exc}", sent)[:200]
            raise ProviderProblem(Problem(
                "tls", f"TLS failure talking to the token endpoint ({detail}): check "
                       "tokenUrl and the server's certificate")) from None
        except aiohttp.InvalidURL:
            raise ProviderProblem(Problem(
                "invalid tokenUrl", f"tokenUrl {scrub(url, sent)[:200]!r} is not a URL "
                                    "the daemon can request")) from None
        except aiohttp.ClientError as exc:
            raise TransientError(f"token endpoint unreachable: {type(exc).__name__}") from None
        return self._parse(status, body, retry_after, content_type=content_type,
                           sent=sent, location=location)

    def _parse(self, status: int, body: str, retry_after: str | None, *,
               content_type: str = "", sent: Iterable[str] = (),
               location: str = "") -> dict[str, Any]:
        """Classify an answer (see the module docstring); the tokens on success."""
        sent = list(sent)
        payload = parse_answer(body, content_type)
        code, description = oauth_error(payload, sent)
        reason = f"{code}: {description}" if code and description else code or ""
        said = f"HTTP {status}" + (f", {reason}" if reason else "")
        wait = _retry_after_seconds(retry_after, self.clock())
        if status == 429:
            raise TransientError("token endpoint rate-limited us (429)", retry_after=wait)
        if status >= 500:
            raise TransientError(f"token endpoint failed with HTTP {status}",
                                 retry_after=wait if retry_after else None)
        if 300 <= status < 400:
            where = urlsplit(location).netloc or location or "nowhere"
            raise ProviderProblem(Problem(
                f"HTTP {status}", f"the token URL redirects (HTTP {status} to "
                                  f"{scrub(where, sent)[:120]}); redirects are not followed "
                                  "with the client's credentials: fix tokenUrl", status))
        if code in GRANT_ERRORS:
            raise RefreshFailed(f"provider refused the refresh ({reason})")
        if code in CLIENT_ERRORS or status == 401:
            raise ProviderProblem(Problem(
                code or f"HTTP {status}",
                f"the token endpoint refuses the client ({said}): check the provider's "
                "clientId, clientSecret and metadata.tokenEndpointAuthMethod", status))
        if status in WRONG_URL_STATUSES:
            raise ProviderProblem(Problem(
                f"HTTP {status}", f"the token URL answers {said}: check the provider's "
                                  "tokenUrl and tokenMethod", status))
        if status == 403 and code is None:
            raise ProviderProblem(Problem(
                "HTTP 403", "the token endpoint forbids our requests (HTTP 403 without an "
                            "OAuth error: a firewall or an IP allow-list?)", status))
        if code is not None or not 200 <= status < 300:
            raise TransientError(f"provider refused the refresh ({said}); not a known "
                                 "grant or client error, so it is retried")
        if not payload or not isinstance(payload.get("access_token"), str) \
                or not payload["access_token"]:
            raise TransientError("token endpoint answered without an access_token")
        return payload

    async def _save(self, integration: dict[str, Any], refresh_token: str,
                    tokens: dict[str, Any], *, refused_before: bool = False) -> dict[str, Any]:
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
        if refused_before:  # the tenant reconnected: the old refusal is history
            await self.store.clear_refresh_failure(str(integration["_id"]))
        # `connection` names the tokens just written, as discovery sees them: the next
        # refresh is for them (cycle.next_refresh).
        return {"expiresAt": fields["tokenExpiresAt"].isoformat(),
                "rotated": new_refresh is not None and new_refresh != refresh_token,
                "connection": connection_fingerprint({**integration, **fields})}


async def resume_postponed(engine: Engine, provider_id: str) -> int:
    """A provider's hold ended: its postponed refresh runs become waiting now, instead
    of waiting out their postponement. Returns how many were promoted."""
    try:
        promoted = await engine.promote_matching(QUEUE, {"providerId": provider_id},
                                                 postponed_only=True)
    except Exception as exc:  # they still wake by themselves, at most a re-probe later
        log.warning("could not promote the postponed refreshes of a provider",
                    extra={"providerId": provider_id,
                           "error": f"{type(exc).__name__}: {exc}"[:300]})
        return 0
    if promoted:
        log.info("postponed refreshes promoted", extra={"providerId": provider_id,
                                                        "count": promoted})
    return promoted


def parse_answer(body: str, content_type: str = "") -> dict[str, Any] | None:
    """A token endpoint's answer as a dict: JSON, or `application/x-www-form-urlencoded`
    (GitHub answers `access_token=...&expires_in=...` unless it honours our Accept)."""
    kind = content_type.split(";", 1)[0].strip().lower()
    if kind == FORM:
        return _form_object(body)
    value = _json_object(body)
    if value is not None:
        return value
    form = _form_object(body)
    return form if form and ("access_token" in form or "error" in form) else None


def oauth_error(payload: dict[str, Any] | None,
                sent: Iterable[str] = ()) -> tuple[str | None, str]:
    """The OAuth `error` code of an answer (None if it has none) and its description,
    scrubbed of every value in `sent` and cut to DESCRIPTION_LIMIT characters."""
    if not payload:
        return None, ""
    sent = list(sent)
    error = payload.get("error")
    code = scrub(error.strip(), sent)[:100] if isinstance(error, str) and error.strip() else None
    description = payload.get("error_description")
    text = scrub(description, sent) if isinstance(description, str) else ""
    if len(text) > DESCRIPTION_LIMIT:
        text = text[: DESCRIPTION_LIMIT - 1] + "…"
    return code, text


def scrub(text: str, sent: Iterable[str]) -> str:
    """`text` without any value of `sent` in any form it may have been sent or echoed in
    (as is, percent-encoded, form-encoded, Basic), nor anything the log scrubber knows."""
    forms: set[str] = set()
    for value in sent:
        if value:
            forms |= {value, quote(value, safe=""), quote_plus(value), quote(value)}
            with contextlib.suppress(ValueError):
                forms.add(base64.b64encode(value.encode()).decode())
    text = " ".join(text.split())
    for value in sorted(forms, key=len, reverse=True):
        if len(value) >= 4:
            text = text.replace(value, REDACTED)
        else:  # a very short value: only as a whole word, not inside ordinary words
            text = re.sub(rf"(?<![\w-]){re.escape(value)}(?![\w-])", REDACTED, text)
    return secrets.scrub(text)


def _postpone_delay(until_probe: float, recheck: float) -> float:
    """How long a run waits for a held provider: until its next re-probe (at least a
    second), spread a little so the runs do not all wake at once; never more than the
    re-probe interval."""
    spread = random.uniform(0.0, min(30.0, recheck * 0.1))
    return min(recheck, max(min(1.0, recheck), until_probe) + spread)


def _label(provider: dict[str, Any]) -> str:
    name = provider.get("name")
    return f"{name} ({provider['_id']})" if name else str(provider["_id"])


def _json_object(body: str) -> dict[str, Any] | None:
    try:
        value = json.loads(body)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _form_object(body: str) -> dict[str, Any] | None:
    try:
        pairs = parse_qsl(body.strip(), keep_blank_values=True)
    except ValueError:
        return None
    return dict(pairs) if pairs else None


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
