"""``CommunicationsConfig``: one configuration for notifications, WebSockets and events.

Values come from, highest priority first: keyword arguments, ``DOTMAC_*`` environment variables
(nested with ``__``: ``DOTMAC_EVENTS__BACKEND=redis``), a ``.env`` file, the legacy flat variables
(``DOTMAC_SMTP_HOST``…, deprecated), a JSON or YAML file named by ``DOTMAC_CONFIG_FILE``, and the
defaults below. Any invalid value raises :class:`~dotmac.communications.errors.ConfigurationError`
listing every bad field with the environment variable that sets it.

``.env.example`` at the repository root is generated from the field descriptions here
(``dotmac-comms config env-example``) and a test keeps the two identical.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated, Any, Literal, Self
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from ._config_sources import (
    ConfigFileSource,
    FilteredDotEnvSource,
    LegacyEnvSource,
    configuration_error,
    rename_legacy_keys,
)
from ._redis import redact_url, validate_redis_url
from .errors import ConfigurationError

__all__ = [
    "ApnsSettings",
    "ChatSettings",
    "CircuitBreakerSettings",
    "CommunicationsConfig",
    "EmailSettings",
    "EventsSettings",
    "FcmSettings",
    "HttpSmsSettings",
    "NotificationsSettings",
    "ObservabilitySettings",
    "PushSettings",
    "ResilienceSettings",
    "RetrySettings",
    "SmsSettings",
    "TwilioSettings",
    "WebPushSettings",
    "WebSocketsSettings",
    "WebhookSettings",
]

Port = Annotated[int, Field(ge=1, le=65535)]
PositiveSeconds = Annotated[float, Field(gt=0)]
_JWT_ALGORITHMS = frozenset(
    {
        "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
        "ES256", "ES256K", "ES384", "ES512", "EdDSA",
    }
)  # fmt: skip


def _masked_url(value: str) -> str:
    return redact_url(value)


# A URL that may carry a password: it serialises to JSON with the password masked (like
# SecretStr does), and the models' repr masks it too; Python attribute access gives it whole.
SecretURL = Annotated[str, PlainSerializer(_masked_url, when_used="json")]
_URL_FIELDS = frozenset({"redis_url", "otlp_endpoint"})


def _masked_repr_args(args: Any) -> Any:
    for name, value in args:
        yield name, (redact_url(value) if name in _URL_FIELDS and isinstance(value, str) else value)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)

    def __repr_args__(self) -> Any:
        return _masked_repr_args(super().__repr_args__())


def _check_redis_url(value: str | None) -> str | None:
    if value is not None:
        try:
            validate_redis_url(value, field="URL")
        except ConfigurationError as exc:
            raise ValueError(str(exc)) from exc
    return value


def _split_list(value: Any) -> Any:
    # Environment variables give lists as "a,b" (or JSON); both are accepted.
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            import json  # noqa: PLC0415 -- only for the rare JSON-list spelling

            return json.loads(text)
        return [item.strip() for item in text.split(",") if item.strip()]
    return value


# ----------------------------------------------------------------------------------------- events
class EventsSettings(_Section):
    """Event bus settings (``DOTMAC_EVENTS__*``)."""

    backend: Literal["memory", "redis"] = Field(
        "memory", description="Event backend: memory (one process) or redis (Redis Streams)."
    )
    redis_url: SecretURL | None = Field(
        None, description="Redis URL for events; defaults to redis_url."
    )
    stream_prefix: str = Field(
        "dotmac:events", min_length=1, description="Prefix of stream keys (hash-tagged per topic)."
    )
    max_attempts: int = Field(5, ge=1, description="Deliveries of one event before dead-lettering.")
    claim_idle_seconds: PositiveSeconds = Field(
        30.0, description="Pending events idle this long are claimed by another consumer."
    )
    maxlen: int = Field(100_000, ge=1, description="Approximate cap on entries kept per stream.")
    max_event_bytes: int = Field(
        1_048_576, ge=1, description="Largest serialised event data (payload) publish accepts."
    )
    dead_letter_enabled: bool = Field(True, description="Keep failed events as dead letters.")
    dead_letter_maxlen: int = Field(10_000, ge=1, description="Approximate cap on dead letters.")
    shutdown_timeout: PositiveSeconds = Field(
        10.0, description="Seconds to drain in-flight handlers when the bus stops."
    )
    key_lanes: int = Field(
        16, ge=0, le=1024,
        description="Redis streams per topic for keyed events (per-key order across processes).",
    )  # fmt: skip

    _check_url = field_validator("redis_url")(_check_redis_url)

    @model_validator(mode="before")
    @classmethod
    def _legacy(cls, data: Any) -> Any:
        return rename_legacy_keys(
            data,
            "events",
            {"default_adapter": "backend", "max_retries": ("max_attempts", lambda v: int(v) + 1)},
        )

    @field_validator("stream_prefix")
    @classmethod
    def _no_braces(cls, value: str) -> str:
        if "{" in value or "}" in value:
            raise ValueError("must not contain braces; hash tags are added per topic")
        return value


# ---------------------------------------------------------------------------------- notifications
class EmailSettings(_Section):
    """SMTP settings (``DOTMAC_NOTIFICATIONS__EMAIL__*``)."""

    host: str = Field("localhost", min_length=1, description="SMTP server host.")
    port: Port = Field(25, description="SMTP server port (25, 465 for implicit TLS, 587).")
    username: str | None = Field(None, description="SMTP AUTH user name.")
    password: SecretStr | None = Field(None, description="SMTP AUTH password (secret).")
    use_tls: bool = Field(False, description="Implicit TLS from the first byte (port 465).")
    start_tls: bool | None = Field(
        None, description="STARTTLS: true requires it, false never, unset uses it when offered."
    )
    from_address: str | None = Field(None, description="Default From address.")
    timeout: PositiveSeconds = Field(30.0, description="Deadline for one send, in seconds.")
    pool_size: int = Field(5, ge=1, le=1000, description="SMTP connections kept open per server.")
    dkim_selector: str | None = Field(None, description="DKIM selector (signing is on when set).")
    dkim_domain: str | None = Field(None, description="DKIM signing domain (d=).")
    dkim_key_file: Path | None = Field(None, description="PEM private key for DKIM signing.")
    legacy_use_tls: bool | None = Field(None, exclude=True, repr=False)
    """The old ``DOTMAC_SMTP_USE_TLS`` flag, resolved once every source is merged."""

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        legacy, self.legacy_use_tls = self.legacy_use_tls, None
        if legacy is not None and not self.use_tls and self.start_tls is None:
            # The old flag meant "use TLS": implicit TLS on port 465, STARTTLS elsewhere.
            if legacy and self.port == 465:
                self.use_tls = True
            else:
                self.start_tls = legacy
        if self.use_tls and self.start_tls:
            raise ValueError("use_tls (implicit TLS) and start_tls cannot both be true")
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password must be set together")
        dkim = (self.dkim_selector, self.dkim_domain, self.dkim_key_file)
        if any(v is not None for v in dkim) and not all(v is not None for v in dkim):
            raise ValueError("dkim_selector, dkim_domain and dkim_key_file must be set together")
        return self


class TwilioSettings(_Section):
    """Twilio SMS provider (``DOTMAC_NOTIFICATIONS__SMS__TWILIO__*``)."""

    account_sid: str | None = Field(None, description="Twilio account SID.")
    auth_token: SecretStr | None = Field(None, description="Twilio auth token (secret).")
    base_url: str = Field("https://api.twilio.com", description="Twilio API base URL.")
    messaging_service_sid: str | None = Field(
        None, description="Messaging Service SID to send from (instead of sms.from_number)."
    )


class HttpSmsSettings(_Section):
    """Generic HTTP SMS gateway (``DOTMAC_NOTIFICATIONS__SMS__HTTP__*``)."""

    url: str | None = Field(None, description="Gateway URL the message is sent to.")
    method: Literal["POST", "PUT", "PATCH"] = Field("POST", description="HTTP method.")
    body_template: dict[str, Any] = Field(
        default_factory=lambda: {"to": "{to}", "text": "{body}"},
        description="JSON body; {to}, {from}, {body} and {id} are substituted (JSON text).",
    )
    auth_header: str | None = Field(None, description="Name of the auth header (Authorization).")
    auth_value: SecretStr | None = Field(None, description="Value of the auth header (secret).")
    message_id_field: str | None = Field(
        None, description="Dotted path of the message id in the JSON answer."
    )


class SmsSettings(_Section):
    """SMS settings (``DOTMAC_NOTIFICATIONS__SMS__*``)."""

    provider: Literal["twilio", "http"] | None = Field(None, description="SMS provider.")
    from_number: str | None = Field(None, description="Sender number in E.164 form.")
    twilio: TwilioSettings = Field(default_factory=TwilioSettings)
    http: HttpSmsSettings = Field(default_factory=HttpSmsSettings)

    @model_validator(mode="after")
    def _provider_complete(self) -> Self:
        if self.provider == "twilio" and not (self.twilio.account_sid and self.twilio.auth_token):
            raise ValueError("provider 'twilio' needs twilio.account_sid and twilio.auth_token")
        if self.provider == "http" and not self.http.url:
            raise ValueError("provider 'http' needs http.url")
        return self


class FcmSettings(_Section):
    """Firebase Cloud Messaging HTTP v1 (``DOTMAC_NOTIFICATIONS__PUSH__FCM__*``)."""

    project_id: str | None = Field(None, description="Firebase project id.")
    service_account_file: Path | None = Field(None, description="Service-account JSON file.")
    base_url: str = Field("https://fcm.googleapis.com", description="FCM API base URL.")
    server_key: SecretStr | None = Field(
        None, description="Retired legacy-API server key; accepted but unused by FCM HTTP v1."
    )


class ApnsSettings(_Section):
    """Apple Push Notification service token auth (``DOTMAC_NOTIFICATIONS__PUSH__APNS__*``)."""

    key_id: str | None = Field(None, description="APNs auth key id.")
    key_file: Path | None = Field(None, description="APNs .p8 auth key file.")


class WebPushSettings(_Section):
    """Web Push with VAPID (``DOTMAC_NOTIFICATIONS__PUSH__WEBPUSH__*``)."""

    vapid_private_key: SecretStr | None = Field(
        None, description="VAPID private key: PEM, or base64url raw P-256 key (secret)."
    )
    vapid_subject: str | None = Field(
        None, description="VAPID contact: mailto: address or https URL."
    )
    ttl: int = Field(
        86_400, ge=0, description="Seconds the push service keeps an undelivered message."
    )

    @model_validator(mode="after")
    def _complete(self) -> Self:
        if (self.vapid_private_key is None) != (self.vapid_subject is None):
            raise ValueError("vapid_private_key and vapid_subject must be set together")
        return self


class PushSettings(_Section):
    """Push settings (``DOTMAC_NOTIFICATIONS__PUSH__*``)."""

    fcm: FcmSettings = Field(default_factory=FcmSettings)
    apns: ApnsSettings = Field(default_factory=ApnsSettings)
    webpush: WebPushSettings = Field(default_factory=WebPushSettings)


class WebhookSettings(_Section):
    """Outgoing webhook settings (``DOTMAC_NOTIFICATIONS__WEBHOOK__*``)."""

    secret: SecretStr | None = Field(None, description="HMAC-SHA256 signing secret (secret).")
    timeout: PositiveSeconds = Field(10.0, description="Deadline for one webhook POST, in seconds.")
    allow_private_targets: bool = Field(
        False, description="Allow loopback/private-network targets (tests, internal hooks)."
    )
    max_connections: int = Field(
        10, ge=1, le=1000, description="Concurrent webhook requests per target host."
    )


class ChatSettings(_Section):
    """Chat incoming webhooks (``DOTMAC_NOTIFICATIONS__CHAT__*``); URLs hold their token."""

    slack_webhook_url: SecretStr | None = Field(None, description="Slack incoming webhook URL.")
    discord_webhook_url: SecretStr | None = Field(None, description="Discord webhook URL.")
    teams_webhook_url: SecretStr | None = Field(
        None, description="Microsoft Teams (Workflows) webhook URL."
    )


class NotificationsSettings(_Section):
    """Notification service settings (``DOTMAC_NOTIFICATIONS__*``)."""

    email: EmailSettings = Field(default_factory=EmailSettings)
    sms: SmsSettings = Field(default_factory=SmsSettings)
    push: PushSettings = Field(default_factory=PushSettings)
    webhook: WebhookSettings = Field(default_factory=WebhookSettings)
    chat: ChatSettings = Field(default_factory=ChatSettings)
    backend: Literal["memory", "redis"] = Field(
        "memory", description="Where idempotency, status, schedule and dead letters live."
    )
    max_attempts: int = Field(3, ge=1, description="Attempts per provider on transient errors.")
    retry_initial_delay: PositiveSeconds = Field(0.5, description="First retry backoff, seconds.")
    rate_limit_per_minute: int | None = Field(
        None, ge=1, description="Sends per minute per provider (unset: unlimited)."
    )
    template_dir: Path | None = Field(None, description="Directory of Jinja2 templates.")
    idempotency_ttl_seconds: PositiveSeconds = Field(
        86_400.0, description="How long an idempotency key suppresses a repeat send."
    )
    redis_url: SecretURL | None = Field(
        None, description="Redis URL for idempotency, status and scheduling; defaults to redis_url."
    )

    _check_url = field_validator("redis_url")(_check_redis_url)

    @model_validator(mode="before")
    @classmethod
    def _legacy(cls, data: Any) -> Any:
        return rename_legacy_keys(
            data,
            "notifications",
            {"retry_attempts": "max_attempts", "retry_delay": "retry_initial_delay"},
        )


# ------------------------------------------------------------------------------------- websockets
class WebSocketsSettings(_Section):
    """WebSocket gateway settings (``DOTMAC_WEBSOCKETS__*``)."""

    host: str = Field("127.0.0.1", min_length=1, description="Address the gateway listens on.")
    port: Annotated[int, Field(ge=0, le=65535)] = Field(
        8765, description="Port the gateway listens on (0: any free port)."
    )
    path: str = Field("/ws", description="URL path of the WebSocket endpoint.")
    jwt_secret: SecretStr | None = Field(None, description="Key verifying handshake JWTs (secret).")
    jwt_algorithms: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["HS256"], description="Accepted JWT algorithms, comma-separated."
    )
    jwt_audience: str | None = Field(None, description="Required JWT audience (unset: none).")
    allowed_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Origins allowed to connect, comma-separated; empty: any.",
    )
    max_message_size: int = Field(65_536, ge=1, description="Largest incoming frame, in bytes.")
    max_connections: int = Field(10_000, ge=1, description="Connections accepted per process.")
    ping_interval: PositiveSeconds = Field(20.0, description="Seconds between protocol pings.")
    ping_timeout: PositiveSeconds = Field(20.0, description="Seconds to wait for a pong.")
    send_buffer_limit: int = Field(
        1_048_576, ge=1024, description="Bytes buffered per slow client before it is disconnected."
    )
    allow_anonymous: bool = Field(
        False, description="Accept connections without credentials (anonymous identity)."
    )
    jwt_issuer: str | None = Field(None, description="Required JWT issuer (unset: none).")
    jwt_leeway: float = Field(30.0, ge=0, description="Clock skew allowed on JWT times, seconds.")
    session_cookie: str = Field("session", min_length=1, description="Session cookie name.")
    session_prefix: str = Field(
        "session:", description="Redis key prefix of sessions (session store auth)."
    )
    max_connections_per_tenant: int | None = Field(
        None, ge=1, description="Connections accepted per tenant (unset: no per-tenant limit)."
    )
    max_subscriptions: int = Field(100, ge=1, description="Channels one connection may join.")
    message_rate: float = Field(10.0, gt=0, description="Client frames per second, sustained.")
    message_burst: int = Field(50, ge=1, description="Client frames allowed in a burst.")
    idle_timeout: PositiveSeconds | None = Field(
        None, description="Close connections silent for this long, seconds (unset: never)."
    )
    compression: bool = Field(
        False, description="permessage-deflate (costs ~3x memory per connection and CPU)."
    )
    drain_timeout: PositiveSeconds = Field(
        10.0, description="Seconds stop() waits for clients to close (1001) before dropping them."
    )
    backend: Literal["memory", "redis"] = Field(
        "memory",
        description="Fan-out backend: memory (one process) or redis (pub/sub across processes).",
    )
    redis_url: SecretURL | None = Field(
        None, description="Redis URL for cross-process fan-out; defaults to redis_url."
    )
    channel_prefix: str = Field(
        "dotmac:ws",
        min_length=1,
        pattern=r"^[^{}\s]+$",
        description="Prefix of the gateway's Redis keys and pub/sub channels (no braces).",
    )
    presence: bool = Field(
        True, description="Track which users are subscribed to each channel (presence)."
    )
    presence_ttl: PositiveSeconds = Field(
        30.0, description="Seconds a stopped process's users stay in presence (Redis backend)."
    )
    history_channels: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Channel patterns (shell-style, e.g. hist:*) that keep a history for recovery.",
    )
    history_size: int = Field(1000, ge=1, description="Messages kept per history channel.")
    history_ttl: PositiveSeconds = Field(
        3600.0, description="Seconds a history channel's messages are kept after the last one."
    )

    _check_url = field_validator("redis_url")(_check_redis_url)
    _split = field_validator(
        "jwt_algorithms", "allowed_origins", "history_channels", mode="before"
    )(_split_list)

    @model_validator(mode="before")
    @classmethod
    def _legacy(cls, data: Any) -> Any:
        return rename_legacy_keys(
            data,
            "websockets",
            {"heartbeat_interval": "ping_interval", "message_size_limit": "max_message_size",
             "connection_timeout": "ping_timeout"},
        )  # fmt: skip

    @field_validator("path")
    @classmethod
    def _absolute_path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"must start with '/', got {value!r}")
        return value

    @field_validator("jwt_algorithms")
    @classmethod
    def _known_algorithms(cls, value: list[str]) -> list[str]:
        unknown = [alg for alg in value if alg not in _JWT_ALGORITHMS]
        if unknown or not value:
            raise ValueError(
                f"unsupported JWT algorithm(s) {unknown or value!r}; "
                f"choose from {', '.join(sorted(_JWT_ALGORITHMS))} ('none' is never accepted)"
            )
        return value


# ---------------------------------------------------------------------------------- observability
class ObservabilitySettings(_Section):
    """Metrics, tracing and health (``DOTMAC_OBSERVABILITY__*``)."""

    service_name: str = Field(
        "dotmac-communications", min_length=1, description="service.name of exported telemetry."
    )
    otlp_endpoint: SecretURL | None = Field(
        None,
        description="OTLP/HTTP base URL (also OTEL_EXPORTER_OTLP_ENDPOINT); unset: no export.",
    )
    metrics_enabled: bool = Field(True, description="Record metrics.")
    tracing_enabled: bool = Field(True, description="Record spans.")
    export_interval_seconds: PositiveSeconds = Field(
        10.0, description="Seconds between metric exports."
    )
    health_check_timeout: PositiveSeconds = Field(
        2.0, description="Default per-check timeout of health checks."
    )

    @field_validator("otlp_endpoint")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and (
            urlsplit(value).scheme not in {"http", "https"} or not urlsplit(value).hostname
        ):
            raise ValueError("must be an http(s) URL with a host")
        return value


# ------------------------------------------------------------------------------------- resilience
class RetrySettings(_Section):
    """Default retry policy (``DOTMAC_RESILIENCE__RETRY__*``)."""

    max_attempts: int = Field(3, ge=1, description="Attempts including the first.")
    initial_delay: Annotated[float, Field(ge=0)] = Field(0.1, description="First backoff, seconds.")
    max_delay: Annotated[float, Field(ge=0)] = Field(10.0, description="Backoff cap, seconds.")
    multiplier: Annotated[float, Field(ge=1)] = Field(2.0, description="Backoff growth factor.")
    jitter: bool = Field(True, description="Full jitter on backoff delays.")


class CircuitBreakerSettings(_Section):
    """Default circuit breaker (``DOTMAC_RESILIENCE__CIRCUIT_BREAKER__*``)."""

    failure_rate_threshold: Annotated[float, Field(gt=0, le=1)] = Field(
        0.5, description="Failure rate (0-1] that opens the circuit."
    )
    minimum_calls: int = Field(10, ge=1, description="Calls in the window before rates count.")
    window_size: int = Field(20, ge=1, description="Calls in the sliding window.")
    reset_timeout: PositiveSeconds = Field(30.0, description="Seconds open before a trial call.")
    half_open_max_calls: int = Field(3, ge=1, description="Trial calls allowed when half-open.")


class ResilienceSettings(_Section):
    """Default resilience settings (``DOTMAC_RESILIENCE__*``)."""

    retry: RetrySettings = Field(default_factory=RetrySettings)
    circuit_breaker: CircuitBreakerSettings = Field(default_factory=CircuitBreakerSettings)


# ------------------------------------------------------------------------------------------- root
class CommunicationsConfig(BaseSettings):
    """The whole library's configuration; see the module docstring for where values come from.

    Raises:
        ConfigurationError: One or more values are invalid; the message lists each with its
            environment variable.
    """

    model_config = SettingsConfigDict(
        env_prefix="DOTMAC_",
        env_nested_delimiter="__",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="forbid",
        validate_default=True,
        case_sensitive=False,
    )

    environment: Literal["development", "test", "staging", "production"] = Field(
        "development", description="Deployment environment."
    )
    debug: bool = Field(False, description="Debug mode (more logging, never in production).")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        "INFO", description="Log level."
    )
    log_format: Literal["json", "console"] | None = Field(
        None, description="Log format; unset: console in development, json elsewhere."
    )
    redis_url: SecretURL | None = Field(
        None, description="Shared Redis URL for every section that does not set its own."
    )
    events: EventsSettings = Field(default_factory=EventsSettings)
    notifications: NotificationsSettings = Field(default_factory=NotificationsSettings)
    websockets: WebSocketsSettings = Field(default_factory=WebSocketsSettings)
    observability: ObservabilitySettings = Field(default_factory=ObservabilitySettings)
    resilience: ResilienceSettings = Field(default_factory=ResilienceSettings)

    def __init__(self, **values: Any) -> None:
        error: ConfigurationError | None = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                super().__init__(**values)
            except ValidationError as exc:
                error = configuration_error(exc)
            except SettingsError as exc:
                error = ConfigurationError(f"invalid configuration: {exc}")
        # Re-issued here so they point at the caller, and also when the config is invalid.
        for item in caught:
            warnings.warn(item.message, item.category, stacklevel=2)
        if error is not None:
            # Not chained: pydantic's own message repeats every input value, secrets included.
            raise error

    _check_url = field_validator("redis_url")(_check_redis_url)

    def __repr_args__(self) -> Any:
        return _masked_repr_args(super().__repr_args__())

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="before")
    @classmethod
    def _legacy_shape(cls, data: Any) -> Any:
        # The old config took redis={"host":..., "port":..., "db":..., "password":...}.
        if isinstance(data, dict) and isinstance(data.get("redis"), dict):
            from ._config_sources import (  # noqa: PLC0415 -- rare legacy path
                deprecation_message,
                legacy_redis_url,
            )

            data = dict(data)
            warnings.warn(
                deprecation_message("config key redis (host/port/db/password)", "redis_url"),
                DeprecationWarning,
                stacklevel=2,
            )
            url = legacy_redis_url(data.pop("redis"), origin="CommunicationsConfig(redis=...)")
            if url is not None:
                data.setdefault("redis_url", url)
        return data

    @model_validator(mode="after")
    def _derive(self) -> Self:
        if self.log_format is None:
            self.log_format = "console" if self.environment == "development" else "json"
        for section in (self.events, self.notifications, self.websockets):
            if section.redis_url is None:
                section.redis_url = self.redis_url
        if self.events.backend == "redis" and self.events.redis_url is None:
            raise ValueError(
                "events.backend is 'redis' but no Redis URL is set "
                "(DOTMAC_EVENTS__REDIS_URL or DOTMAC_REDIS_URL)"
            )
        if self.websockets.backend == "redis" and self.websockets.redis_url is None:
            raise ValueError(
                "websockets.backend is 'redis' but no Redis URL is set "
                "(DOTMAC_WEBSOCKETS__REDIS_URL or DOTMAC_REDIS_URL)"
            )
        if self.environment == "production" and self.debug:
            raise ValueError("debug must be false when environment is 'production' (DOTMAC_DEBUG)")
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
        """Order the sources: init > env > .env > legacy flat env > config file > defaults."""
        dotenv = FilteredDotEnvSource.wrap(settings_cls, dotenv_settings)
        return (
            init_settings,
            env_settings,
            dotenv,
            LegacyEnvSource(settings_cls, dotenv_values=dotenv.raw_env_vars()),
            ConfigFileSource(settings_cls, dotenv_values=dotenv.raw_env_vars()),
        )
