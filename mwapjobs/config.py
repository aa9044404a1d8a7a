"""Settings: `config.toml` overridden by environment variables.

The daemon shares the MWAP backend's environment file, so the backend's own
names (`MONGODB_URI`, `ENCRYPTION_KEY`, `AUTH0_DOMAIN`, `AUTH0_AUDIENCE`) are
read as they are; everything else is `MWAPJOBS_*` with `__` for nesting.
A wrong setting stops start-up with one line that names it (see `ConfigError`),
because a daemon that guesses is worse than one that refuses to start.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl, quote, unquote

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from .triggers import make_trigger

ENV_PREFIX = "MWAPJOBS_"
DEFAULT_CONFIG_PATHS = (Path("config.toml"), Path("/etc/mwapjobs/config.toml"))


class ConfigError(Exception):
    """A configuration problem, phrased as one line for an operator."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HttpSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    max_body_bytes: int = Field(1_048_576, gt=0)
    max_connections: int = Field(256, ge=8, le=10_000)
    idle_timeout: float = Field(15.0, gt=0, le=3600)


class MongoSettings(_Section):
    server_selection_timeout: float = Field(5.0, gt=0)
    socket_timeout: float = Field(30.0, gt=0)
    ping_interval: float = Field(2.0, gt=0)
    ping_timeout: float = Field(2.0, gt=0)
    connect_retry_max: float = Field(30.0, gt=0)


class BackoffSettings(_Section):
    type: Literal["fixed", "exponential"] = "exponential"
    delay: float = Field(5.0, ge=0)
    jitter: float = Field(0.1, ge=0, le=1)
    max_delay: float = Field(3600.0, ge=0)


class RetentionSettings(_Section):
    count: int | None = Field(1000, ge=0)
    age: float | None = Field(7 * 86400.0, ge=0)


class QueueSettings(_Section):
    """Defaults for one queue; every field can still be overridden per job."""

    attempts: int = Field(3, ge=1)
    backoff: BackoffSettings = BackoffSettings()
    concurrency: int = Field(10, ge=1)
    priority: int = 0
    timeout: float = Field(300.0, gt=0)
    keep_completed: RetentionSettings = RetentionSettings()
    keep_failed: RetentionSettings = RetentionSettings(count=5000, age=30 * 86400.0)


class EngineSettings(_Section):
    lease_seconds: float = Field(30.0, gt=0)
    # The leader lease (leadership.py): failover takes at most this plus a third of it.
    leader_lease: float = Field(15.0, ge=1, le=600)
    stalled_limit: int = Field(3, ge=0)
    sweep_interval: float = Field(15.0, gt=0)
    retention_interval: float = Field(60.0, gt=0)
    # The most runs one claim takes (never more than the queue's free slots). Each claim
    # is two round trips whatever its size: in a burst on a wide queue, claims of 200
    # made the embedded store about a tenth faster than claims of 100.
    claim_batch: int = Field(200, ge=1)
    # The data fields runs can be searched by (API `field=`, the dashboard's "Find a
    # run"); each gets a partial index on the runs collection, so a search reads only
    # the runs that match. Plain names only (letters, digits, _).
    search_fields: list[Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9_]{0,63}$")]] = Field(
        default_factory=lambda: ["integrationId", "tenantId", "providerId", "projectId"],
        max_length=20)


class AdminToken(_Section):
    """An admin API token, stored only as the SHA-256 of the token (`mwapjobs admin-token`)."""

    name: str = Field(min_length=1, max_length=100)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    # "viewer": sees everything an admin sees and changes nothing (every mutating route
    # answers 403). Absent means "admin", so configurations written before roles keep
    # working as they were.
    role: Literal["admin", "viewer"] = "admin"


class AdminSettings(_Section):
    tokens: list[AdminToken] = Field(default_factory=list)
    session_ttl: float = Field(12 * 3600.0, gt=0)
    cookie_secure: bool = True
    jwks_cache_ttl: float = Field(3600.0, gt=0)


class MetricsSettings(_Section):
    access: Literal["loopback", "token", "open"] = "loopback"
    hosts: list[str] = Field(default_factory=list)


class OutboundSettings(_Section):
    """Where provider URLs from the database may point (see outbound.py)."""

    allow_loopback: bool = False
    hosts: dict[str, list[str]] = Field(default_factory=dict)


class RefreshSettings(_Section):
    enabled: bool = True
    lead: float = Field(300.0, ge=0)
    jitter: float = Field(30.0, ge=0)
    sync_interval: float = Field(60.0, gt=0)
    # Follow the backend's writes with change streams where the server has them.
    follow_changes: bool = True
    request_timeout: float = Field(30.0, gt=0)
    user_agent: str = "MWAP-OAuth-Client/1.0"
    provider_concurrency: int = Field(4, ge=1)
    provider_rate: float = Field(10.0, gt=0)
    wait_timeout: float = Field(30.0, gt=0)
    manual_cooldown: float = Field(60.0, ge=0)
    provider_hold_recheck: float = Field(600.0, gt=0)


class HealthSettings(_Section):
    enabled: bool = True
    cron: str = "0 */4 * * *"
    timezone: str = "UTC"
    spread: bool = True
    concurrency: int = Field(20, ge=1)
    provider_concurrency: int = Field(5, ge=1)
    provider_rate: float = Field(10.0, gt=0)
    request_timeout: float = Field(15.0, gt=0)
    failure_threshold: int = Field(3, ge=1)
    history_size: int = Field(20, ge=1)

    @model_validator(mode="after")
    def _valid_schedule(self) -> HealthSettings:
        make_trigger(self.cron, None, self.timezone)  # APScheduler's parser, no second one
        return self


class MaintenanceSettings(_Section):
    """Upkeep and archiving (jobs/maintenance/): a daily run that resets expired OAuth
    flows, archives and deletes history past its retention, and reports on the database."""

    enabled: bool = True
    cron: str = "30 3 * * *"
    timezone: str = "UTC"
    time_budget: float = Field(600.0, gt=0)
    batch_size: int = Field(500, ge=1, le=10_000)
    reset_expired_flows: bool = True
    archive_dir: str | None = None
    archive_keep_files: int = Field(400, ge=1)
    archive_keep_days: float = Field(400.0, gt=0)
    notifications_days: float = Field(90.0, gt=0)
    alert_history_days: float = Field(90.0, gt=0)
    health_history_days: float = Field(30.0, gt=0)
    audit_collection: str = Field("auditLogs", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    audit_days: float = Field(30.0, gt=0)
    create_recommended_indexes: bool = False

    @model_validator(mode="after")
    def _valid_schedule(self) -> MaintenanceSettings:
        make_trigger(self.cron, None, self.timezone)
        return self


class FileIndexSettings(_Section):
    """File indexing (jobs/files/): every project's cloud folder mirrored into
    `virtualFiles` (the backend's planned collection, which it reads). On by default, as
    the other jobs; the backend's own documents (`projects.metadata`) are written only
    with `write_project_metadata`."""

    enabled: bool = True
    interval: float = Field(900.0, ge=10)
    full_interval: float = Field(86400.0, ge=60)
    spread: bool = True
    page_size: int = Field(1000, ge=1, le=1000)
    concurrency: int = Field(8, ge=1, le=200)
    provider_concurrency: int = Field(3, ge=1, le=100)
    provider_rate: float = Field(5.0, gt=0)
    request_timeout: float = Field(30.0, gt=0)
    max_retry_wait: float = Field(120.0, ge=0)
    pass_timeout: float = Field(3600.0, gt=0)
    failure_alert_after: float = Field(3600.0, gt=0)
    write_project_metadata: bool = False


class OwnerEmailSettings(_Section):
    """Emails to tenant owners (jobs/notifications/): the owner's address from the Auth0
    Management API, one email per notification episode, digests within a window."""

    enabled: bool = True
    # The Auth0 tenant's base URL; default https://AUTH0_DOMAIN.
    auth0_url: str | None = None
    # The machine-to-machine client (read:users); default AUTH0_CLIENT_ID/_SECRET.
    client_id: str | None = None
    client_secret: SecretStr | None = None
    email_from: str | None = None
    reconnect_url: str | None = Field(None, pattern=r"^https?://")
    templates_dir: str | None = None
    digest_window: float = Field(300.0, ge=0)
    check_interval: float = Field(30.0, gt=0)
    address_ttl: float = Field(86400.0, gt=0)
    unusable_ttl: float = Field(3600.0, gt=0)
    lookup_attempts: int = Field(5, ge=1)
    request_timeout: float = Field(10.0, gt=0)
    batch: int = Field(50, ge=1, le=1000)


class AnalyticsSettings(_Section):
    """Analytics (jobs/analytics/): a daily snapshot per tenant and of the platform, with
    each connected integration's storage quota."""

    enabled: bool = True
    cron: str = "55 23 * * *"
    timezone: str = "UTC"
    quota: bool = True
    quota_concurrency: int = Field(10, ge=1, le=200)
    quota_provider_concurrency: int = Field(4, ge=1, le=100)
    quota_provider_rate: float = Field(10.0, gt=0)
    request_timeout: float = Field(15.0, gt=0)
    write_batch: int = Field(1000, ge=1, le=10_000)
    run_timeout: float = Field(6 * 3600.0, gt=0)
    max_days: int = Field(366, ge=1, le=3660)

    @model_validator(mode="after")
    def _valid_schedule(self) -> AnalyticsSettings:
        make_trigger(self.cron, None, self.timezone)
        return self


class AlertSettings(_Section):
    cooldown: float = Field(900.0, ge=0)
    check_interval: float = Field(30.0, gt=0)
    failed_runs_threshold: int = Field(10, ge=1)
    failed_runs_window: float = Field(900.0, gt=0)
    refresh_failure_rate: float = Field(0.2, gt=0, le=1)
    refresh_failure_min: int = Field(5, ge=1)
    backlog_age: float = Field(900.0, gt=0)
    health_sweep_missed_intervals: float = Field(2.0, gt=0)
    mongodb_down_for: float = Field(60.0, gt=0)
    email_from: str = "mwapjobs@localhost"
    smtp_allow_plaintext: bool = False
    smtp_ca_file: str | None = None
    # Where each FIRING message points for what to do: "<runbook_url>/<rule>.md".
    runbook_url: str = Field("docs/runbooks", max_length=500)


def _mwap(name: str) -> AliasChoices:
    """Read a setting under the MWAP backend's own environment name, or its key in the file."""
    return AliasChoices(name, name.lower())


class Settings(BaseSettings):
    """Everything the daemon can be told. Defaults are what `config.toml` shows."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        populate_by_name=True,
    )

    mongodb_uri: SecretStr = Field(validation_alias=_mwap("MONGODB_URI"))
    encryption_key: SecretStr | None = Field(None, validation_alias=_mwap("ENCRYPTION_KEY"))
    # Signs the stored repeat triggers; default: derived from ENCRYPTION_KEY.
    signing_key: SecretStr | None = Field(None, min_length=16)
    auth0_domain: str | None = Field(None, validation_alias=_mwap("AUTH0_DOMAIN"))
    auth0_audience: str | None = Field(None, validation_alias=_mwap("AUTH0_AUDIENCE"))
    alerting_enabled: bool = Field(True, validation_alias=_mwap("ALERTING_ENABLED"))
    smtp_host: str | None = Field(None, validation_alias=_mwap("SMTP_HOST"))
    smtp_port: int = Field(587, ge=1, le=65535, validation_alias=_mwap("SMTP_PORT"))
    smtp_secure: bool = Field(False, validation_alias=_mwap("SMTP_SECURE"))
    smtp_user: str | None = Field(None, validation_alias=_mwap("SMTP_USER"))
    smtp_pass: SecretStr | None = Field(None, validation_alias=_mwap("SMTP_PASS"))
    alert_email_recipients: str | None = Field(
        None, validation_alias=_mwap("ALERT_EMAIL_RECIPIENTS")
    )
    slack_webhook_url: SecretStr | None = Field(None, validation_alias=_mwap("SLACK_WEBHOOK_URL"))
    alert_webhook_url: SecretStr | None = Field(None, validation_alias=_mwap("ALERT_WEBHOOK_URL"))
    # The backend's machine-to-machine Auth0 client (its example environment lists them):
    # tenant owners' addresses come from the Management API with it.
    auth0_client_id: str | None = Field(None, validation_alias=_mwap("AUTH0_CLIENT_ID"))
    auth0_client_secret: SecretStr | None = Field(
        None, validation_alias=_mwap("AUTH0_CLIENT_SECRET"))
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    shutdown_timeout: float = Field(30.0, gt=0)
    http: HttpSettings = HttpSettings()
    mongodb: MongoSettings = MongoSettings()
    engine: EngineSettings = EngineSettings()
    queues: dict[str, QueueSettings] = Field(default_factory=dict)
    admin: AdminSettings = AdminSettings()
    metrics: MetricsSettings = MetricsSettings()
    outbound: OutboundSettings = OutboundSettings()
    refresh: RefreshSettings = RefreshSettings()
    health: HealthSettings = HealthSettings()
    alerts: AlertSettings = AlertSettings()
    files: FileIndexSettings = FileIndexSettings()
    maintenance: MaintenanceSettings = MaintenanceSettings()
    notifications: OwnerEmailSettings = OwnerEmailSettings()
    analytics: AnalyticsSettings = AnalyticsSettings()

    @model_validator(mode="after")
    def _key_when_needed(self) -> Settings:
        key = self.encryption_key.get_secret_value() if self.encryption_key else ""
        if not key and (self.refresh.enabled or self.health.enabled):
            raise ValueError(
                "ENCRYPTION_KEY: required while refresh or health checks are enabled "
                "(the same key as the MWAP backend)"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if _toml_path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=_toml_path))
        return tuple(sources)

    def queue(self, name: str) -> QueueSettings:
        """The defaults for queue `name`: its own section, else the built-in defaults."""
        return self.queues.get(name, QueueSettings())


# pydantic-settings builds sources from a classmethod, so the file path for the
# one load in progress is passed through this module-level slot.
_toml_path: Path | None = None


def resolve_config_path(explicit: str | None, env: Mapping[str, str] | None = None) -> Path | None:
    """`--config`, else `$MWAPJOBS_CONFIG`, else ./config.toml, else /etc/mwapjobs/config.toml.

    An explicitly named file must exist; the fallbacks are optional, so a
    daemon configured purely through the environment still starts.
    """
    env = os.environ if env is None else env
    named = explicit or env.get("MWAPJOBS_CONFIG")
    if named:
        path = Path(named)
        if not path.is_file():
            raise ConfigError(f"config file {named}: not found")
        return path
    return next((p for p in DEFAULT_CONFIG_PATHS if p.is_file()), None)


def load_settings(path: Path | None, **overrides: Any) -> Settings:
    """Load and validate, turning every problem into a one-line `ConfigError`."""
    global _toml_path
    _check_unknown_env(os.environ)
    _toml_path = path
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path)) from None
    except (OSError, ValueError) as exc:  # unreadable file or TOML syntax error
        raise ConfigError(f"config file {path}: {exc}") from None
    finally:
        _toml_path = None


def _describe(exc: ValidationError, path: Path | None) -> str:
    err = exc.errors()[0]
    if not err["loc"]:  # a rule across settings; its message names the key
        return str(err["msg"]).removeprefix("Value error, ")
    key = ".".join(str(part) for part in err["loc"]) or "(root)"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    if err["type"] == "missing":
        return f"{key}: required setting is missing{_hint(key)}{more}"
    if err["type"] == "extra_forbidden":
        return f"{key}: unknown setting{' in ' + str(path) if path else ''}{more}"
    env_name = ENV_PREFIX + "__".join(str(part) for part in err["loc"]).upper()
    source = f" (from {env_name})" if env_name in os.environ else ""
    return f"{key}{source}: {str(err['msg']).removeprefix('Value error, ')}{more}"


def _hint(key: str) -> str:
    if key == "MONGODB_URI":
        return " (set MONGODB_URI or mongodb_uri in config.toml)"
    return ""


def _check_unknown_env(env: Mapping[str, str]) -> None:
    """Reject `MWAPJOBS_*` variables that match no setting: a typo must not pass silently."""
    known_top = set(Settings.model_fields) | {"config"}
    for name in env:
        if not name.startswith(ENV_PREFIX):
            continue
        parts = name[len(ENV_PREFIX) :].lower().split("__")
        if parts[0] not in known_top:
            raise ConfigError(f"{name}: unknown setting (environment variable)")
        field = Settings.model_fields.get(parts[0])
        model = getattr(field, "annotation", None) if field else None
        if (
            len(parts) > 1
            and isinstance(model, type)
            and issubclass(model, BaseModel)
            and parts[1] not in model.model_fields
        ):
            raise ConfigError(f"{name}: unknown setting (environment variable)")


SECRET_MASK = "********"


def masked(settings: Settings) -> dict[str, Any]:
    """The effective configuration with every secret masked, for `check-config`."""
    data = settings.model_dump(mode="json")
    for key, value in settings:
        if isinstance(value, SecretStr):
            secret = value.get_secret_value()
            data[key] = mask_uri(secret) if key == "mongodb_uri" else SECRET_MASK
    data["admin"]["tokens"] = [{"name": t.name, "sha256": SECRET_MASK, "role": t.role}
                               for t in settings.admin.tokens]
    return data


# URI options whose value is a credential (pymongo's names, compared case-insensitively),
# besides any option whose name says password, secret or token.
_SECRET_URI_OPTIONS = frozenset({"authmechanismproperties", "tlscertificatekeyfilepassword",
                                 "sslpempassphrase", "sslclientcertificatekeypassword"})


def _secret_option(name: str) -> bool:
    lowered = name.lower()
    return lowered in _SECRET_URI_OPTIONS or any(
        word in lowered for word in ("password", "secret", "token", "passphrase"))


def secret_values(settings: Settings) -> list[str]:
    """Every secret in `settings` (keys, passwords, the URI's credentials): what the log
    scrubber must never let through."""
    values = [v.get_secret_value() for _, v in settings if isinstance(v, SecretStr)]
    return [v for v in values if v] + uri_secrets(settings.mongodb_uri.get_secret_value())


def uri_secrets(uri: str) -> list[str]:
    """The credential parts of a MongoDB URI: the password, and secret option values."""
    _scheme, sep, rest = uri.partition("://")
    if not sep:
        return []
    found: list[str] = []
    authority, _, query = rest.partition("?")
    if "@" in authority:
        creds = authority.rpartition("@")[0]
        if ":" in creds:
            found.append(unquote(creds.split(":", 1)[1]))
    for name, value in parse_qsl(query, keep_blank_values=True):
        if _secret_option(name) and value:
            found.append(value)
            found.extend(part.split(":", 1)[1] for part in value.split(",") if ":" in part)
    return [f for f in found if f]


def mask_uri(uri: str) -> str:
    """Hide the credentials in a MongoDB URI (the password, and secret options such as
    `tlsCertificateKeyFilePassword` or `authMechanismProperties`) but keep hosts,
    database and the other options, which operators need."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return uri
    authority, qmark, query = rest.partition("?")
    if "@" in authority:
        creds, _, hosts = authority.rpartition("@")
        authority = f"{creds.split(':', 1)[0]}:{SECRET_MASK}@{hosts}"
    if qmark:
        query = "&".join(
            f"{name}={SECRET_MASK if _secret_option(name) else quote(value, safe=':,/')}"
            for name, value in parse_qsl(query, keep_blank_values=True))
    return f"{scheme}://{authority}{qmark}{query}"
