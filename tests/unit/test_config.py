"""CommunicationsConfig: sources, precedence, validation, secrets and legacy names."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dotmac.communications import ConfigurationError
from dotmac.communications._config_docs import (
    env_example,
    env_variables,
    safe_dump,
    unknown_variables,
)
from dotmac.communications.config import CommunicationsConfig, EventsSettings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run each config test in an empty directory so no stray .env is read."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_defaults_need_nothing_running() -> None:
    """The embedded defaults use memory backends and no Redis."""
    config = CommunicationsConfig()
    assert config.events.backend == "memory"
    assert config.redis_url is None
    assert config.events.redis_url is None
    assert config.log_format == "console"  # development default
    assert config.websockets.jwt_algorithms == ["HS256"]


def test_log_format_defaults_to_json_outside_development() -> None:
    """log_format follows the environment unless set."""
    assert CommunicationsConfig(environment="production").log_format == "json"
    assert CommunicationsConfig(environment="production", log_format="console").log_format == (
        "console"
    )


def test_nested_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """DOTMAC_ prefix with __ nesting sets section fields, typed."""
    monkeypatch.setenv("DOTMAC_EVENTS__BACKEND", "redis")
    monkeypatch.setenv("DOTMAC_REDIS_URL", "redis://127.0.0.1:6390/2")
    monkeypatch.setenv("DOTMAC_NOTIFICATIONS__EMAIL__HOST", "smtp.example.org")
    monkeypatch.setenv("DOTMAC_NOTIFICATIONS__EMAIL__PORT", "2525")
    monkeypatch.setenv("DOTMAC_WEBSOCKETS__JWT_ALGORITHMS", "HS256, RS256")
    monkeypatch.setenv("DOTMAC_WEBSOCKETS__ALLOWED_ORIGINS", '["https://a.example"]')
    monkeypatch.setenv("DOTMAC_LOG_LEVEL", "debug")
    config = CommunicationsConfig()
    assert config.events.backend == "redis"
    assert config.events.redis_url == "redis://127.0.0.1:6390/2"  # inherited from the top level
    assert config.notifications.redis_url == "redis://127.0.0.1:6390/2"
    assert config.notifications.email.host == "smtp.example.org"
    assert config.notifications.email.port == 2525
    assert config.websockets.jwt_algorithms == ["HS256", "RS256"]
    assert config.websockets.allowed_origins == ["https://a.example"]
    assert config.log_level == "DEBUG"


def test_section_redis_url_overrides_top_level(monkeypatch: pytest.MonkeyPatch) -> None:
    """A section's own redis_url wins over the shared one."""
    monkeypatch.setenv("DOTMAC_REDIS_URL", "redis://shared:6379/0")
    monkeypatch.setenv("DOTMAC_EVENTS__REDIS_URL", "redis://events:6379/1")
    config = CommunicationsConfig()
    assert config.events.redis_url == "redis://events:6379/1"
    assert config.websockets.redis_url == "redis://shared:6379/0"


def test_secrets_never_leak(monkeypatch: pytest.MonkeyPatch) -> None:
    """Passwords, tokens and secrets are SecretStr: absent from repr, str and dumps."""
    values = {
        "DOTMAC_NOTIFICATIONS__EMAIL__USERNAME": "mailer",
        "DOTMAC_NOTIFICATIONS__EMAIL__PASSWORD": "smtp-pw-123",
        "DOTMAC_NOTIFICATIONS__SMS__TWILIO__AUTH_TOKEN": "twilio-tok-456",
        "DOTMAC_NOTIFICATIONS__WEBHOOK__SECRET": "hook-secret-789",
        "DOTMAC_WEBSOCKETS__JWT_SECRET": "jwt-secret-000",
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    config = CommunicationsConfig()
    rendered = [repr(config), str(config), config.model_dump_json(), safe_dump(config)]
    for text in rendered:
        for secret in ("smtp-pw-123", "twilio-tok-456", "hook-secret-789", "jwt-secret-000"):
            assert secret not in text
    password = config.notifications.email.password
    assert password is not None
    assert password.get_secret_value() == "smtp-pw-123"


def test_precedence_env_over_dotenv_over_file_over_defaults(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """env beats .env beats the config file beats defaults, field by field."""
    config_file = workdir / "comms.yaml"
    config_file.write_text(
        "log_level: WARNING\n"
        "events:\n  max_attempts: 7\n  maxlen: 50\n  stream_prefix: from-file\n"
        "notifications:\n  email:\n    host: file-host\n"
    )
    (workdir / ".env").write_text(
        "DOTMAC_EVENTS__MAXLEN=60\nDOTMAC_EVENTS__STREAM_PREFIX=from-dotenv\n"
    )
    monkeypatch.setenv("DOTMAC_CONFIG_FILE", str(config_file))
    monkeypatch.setenv("DOTMAC_EVENTS__STREAM_PREFIX", "from-env")
    config = CommunicationsConfig()
    assert config.events.stream_prefix == "from-env"
    assert config.events.maxlen == 60
    assert config.events.max_attempts == 7
    assert config.log_level == "WARNING"
    assert config.notifications.email.host == "file-host"
    assert config.notifications.email.port == 25


def test_json_config_file(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A .json file works like YAML."""
    path = workdir / "comms.json"
    path.write_text(json.dumps({"websockets": {"port": 9001}, "debug": True}))
    monkeypatch.setenv("DOTMAC_CONFIG_FILE", str(path))
    config = CommunicationsConfig()
    assert config.websockets.port == 9001
    assert config.debug is True


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [
        ("missing.yaml", None, "cannot read"),
        ("comms.toml", "x = 1", "must end in .json, .yaml or .yml"),
        ("bad.yaml", "events: [unclosed", "cannot parse"),
        ("bad.json", "{", "cannot parse"),
        ("list.yaml", "- 1\n- 2\n", "top level must be a mapping"),
    ],
)
def test_bad_config_file_is_a_clear_error(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, name: str, content: str | None, needle: str
) -> None:
    """A missing, unparsable or wrongly shaped config file names the file and the problem."""
    path = workdir / name
    if content is not None:
        path.write_text(content)
    monkeypatch.setenv("DOTMAC_CONFIG_FILE", str(path))
    with pytest.raises(ConfigurationError, match=needle) as info:
        CommunicationsConfig()
    assert "DOTMAC_CONFIG_FILE" in str(info.value)


def test_unknown_key_in_file_is_rejected(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A typo in the config file fails instead of being ignored."""
    path = workdir / "comms.yaml"
    path.write_text("events:\n  max_atempts: 3\n")
    monkeypatch.setenv("DOTMAC_CONFIG_FILE", str(path))
    with pytest.raises(
        ConfigurationError, match=r"events\.max_atempts.*DOTMAC_EVENTS__MAX_ATEMPTS"
    ):
        CommunicationsConfig()


def test_every_bad_field_is_listed_with_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """One ConfigurationError (also a ValueError) names every bad field and its env var."""
    monkeypatch.setenv("DOTMAC_EVENTS__MAX_ATTEMPTS", "zero")
    monkeypatch.setenv("DOTMAC_NOTIFICATIONS__EMAIL__PORT", "70000")
    monkeypatch.setenv("DOTMAC_WEBSOCKETS__JWT_ALGORITHMS", "none")
    monkeypatch.setenv("DOTMAC_EVENTS__BACKEND", "kafka")
    with pytest.raises(ConfigurationError) as info:
        CommunicationsConfig()
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "4 errors" in message
    for env in (
        "DOTMAC_EVENTS__MAX_ATTEMPTS",
        "DOTMAC_NOTIFICATIONS__EMAIL__PORT",
        "DOTMAC_WEBSOCKETS__JWT_ALGORITHMS",
        "DOTMAC_EVENTS__BACKEND",
    ):
        assert env in message
    assert "'kafka'" in message


def test_bad_secret_value_is_not_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    """An invalid secret field is reported without its value."""
    with pytest.raises(ConfigurationError) as info:
        CommunicationsConfig(notifications={"email": {"password": 12345678}})
    assert "12345678" not in str(info.value)
    assert "notifications.email.password" in str(info.value)


def test_cross_field_rules() -> None:
    """Redis backend without a URL, TLS conflicts and half-set credentials are refused."""
    with pytest.raises(ConfigurationError, match="DOTMAC_EVENTS__REDIS_URL or DOTMAC_REDIS_URL"):
        CommunicationsConfig(events={"backend": "redis"})
    with pytest.raises(ConfigurationError, match=r"use_tls .* start_tls"):
        CommunicationsConfig(notifications={"email": {"use_tls": True, "start_tls": True}})
    with pytest.raises(ConfigurationError, match="username and password must be set together"):
        CommunicationsConfig(notifications={"email": {"username": "u"}})
    with pytest.raises(ConfigurationError, match=r"twilio\.account_sid"):
        CommunicationsConfig(notifications={"sms": {"provider": "twilio"}})
    with pytest.raises(ConfigurationError, match="DOTMAC_DEBUG"):
        CommunicationsConfig(environment="production", debug=True)


@pytest.mark.parametrize(
    "url", ["http://localhost:6379", "redis://", "localhost:6379", "mysql://db/1"]
)
def test_bad_redis_url(url: str) -> None:
    """A Redis URL with the wrong scheme or no host is refused, naming the variable."""
    with pytest.raises(ConfigurationError, match="DOTMAC_REDIS_URL"):
        CommunicationsConfig(redis_url=url)


def test_redis_url_password_is_redacted_in_errors() -> None:
    """A bad Redis URL's password does not appear in the error."""
    with pytest.raises(ConfigurationError) as info:
        CommunicationsConfig(events={"redis_url": "http://:hunter2@h:1"})
    assert "hunter2" not in str(info.value)


def test_section_usable_alone() -> None:
    """Sections validate on their own (EventBus.from_config takes config.events)."""
    assert EventsSettings(backend="memory").max_attempts == 5
    with pytest.raises(ValueError, match="braces"):
        EventsSettings(stream_prefix="{x}")


# ------------------------------------------------------------------------------- legacy names
LEGACY_CASES = [
    ("DOTMAC_SMTP_HOST", "mail.old", ("notifications", "email", "host"), "mail.old"),
    ("DOTMAC_SMTP_PORT", "587", ("notifications", "email", "port"), 587),
    ("DOTMAC_SMTP_USE_TLS", "true", ("notifications", "email", "start_tls"), True),
    ("DOTMAC_SMTP_USE_TLS", "false", ("notifications", "email", "start_tls"), False),
    ("DOTMAC_TWILIO_SID", "AC123", ("notifications", "sms", "twilio", "account_sid"), "AC123"),
    ("DOTMAC_APNS_KEY_ID", "KEY1", ("notifications", "push", "apns", "key_id"), "KEY1"),
    ("DOTMAC_APNS_KEY_FILE", "/k.p8", ("notifications", "push", "apns", "key_file"), Path("/k.p8")),
]


def _get(config: CommunicationsConfig, path: tuple[str, ...]) -> object:
    node: object = config
    for part in path:
        node = getattr(node, part)
    return node


@pytest.mark.parametrize(("name", "raw", "path", "expected"), LEGACY_CASES)
def test_legacy_flat_variable_still_works(
    monkeypatch: pytest.MonkeyPatch, name: str, raw: str, path: tuple[str, ...], expected: object
) -> None:
    """Each old flat variable maps to its new field with one DeprecationWarning naming it."""
    monkeypatch.setenv(name, raw)
    if name == "DOTMAC_TWILIO_SID":
        monkeypatch.setenv("DOTMAC_TWILIO_TOKEN", "tok")
    with pytest.deprecated_call() as record:
        config = CommunicationsConfig()
    assert _get(config, path) == expected
    new_name = "DOTMAC_" + "__".join(path).upper()
    messages = [str(w.message) for w in record if name in str(w.message)]
    assert len(messages) == 1
    assert new_name in messages[0]
    assert "removed in version 1.0" in messages[0]


def test_legacy_secrets_and_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    """SMTP password and Twilio token become secrets; a Twilio SID selects the Twilio provider."""
    monkeypatch.setenv("DOTMAC_SMTP_USERNAME", "u")
    monkeypatch.setenv("DOTMAC_SMTP_PASSWORD", "old-pw")
    monkeypatch.setenv("DOTMAC_TWILIO_SID", "AC1")
    monkeypatch.setenv("DOTMAC_TWILIO_TOKEN", "old-tok")
    with pytest.deprecated_call():
        config = CommunicationsConfig()
    assert config.notifications.sms.provider == "twilio"
    token = config.notifications.sms.twilio.auth_token
    assert token is not None
    assert token.get_secret_value() == "old-tok"
    assert "old-pw" not in repr(config)


def test_legacy_smtp_tls_on_port_465_means_implicit_tls(monkeypatch: pytest.MonkeyPatch) -> None:
    """The old TLS flag on port 465 maps to implicit TLS, elsewhere to STARTTLS."""
    monkeypatch.setenv("DOTMAC_SMTP_PORT", "465")
    monkeypatch.setenv("DOTMAC_SMTP_USE_TLS", "true")
    with pytest.deprecated_call():
        config = CommunicationsConfig()
    assert config.notifications.email.use_tls is True
    assert config.notifications.email.start_tls is None


def test_legacy_redis_parts_build_the_url(monkeypatch: pytest.MonkeyPatch) -> None:
    """DOTMAC_REDIS_HOST/PORT/DB/PASSWORD build redis_url (password URL-quoted)."""
    monkeypatch.setenv("DOTMAC_REDIS_HOST", "cache.internal")
    monkeypatch.setenv("DOTMAC_REDIS_PORT", "6380")
    monkeypatch.setenv("DOTMAC_REDIS_DB", "3")
    monkeypatch.setenv("DOTMAC_REDIS_PASSWORD", "p@ss/word")
    with pytest.deprecated_call():
        config = CommunicationsConfig()
    assert config.redis_url == "redis://:p%40ss%2Fword@cache.internal:6380/3"


def test_new_names_beat_legacy_twins(monkeypatch: pytest.MonkeyPatch) -> None:
    """A nested variable wins over its flat twin; DOTMAC_REDIS_URL wins over REDIS_HOST."""
    monkeypatch.setenv("DOTMAC_SMTP_HOST", "old-host")
    monkeypatch.setenv("DOTMAC_NOTIFICATIONS__EMAIL__HOST", "new-host")
    monkeypatch.setenv("DOTMAC_REDIS_HOST", "old-redis")
    monkeypatch.setenv("DOTMAC_REDIS_URL", "redis://new-redis:6379/0")
    with pytest.deprecated_call():
        config = CommunicationsConfig()
    assert config.notifications.email.host == "new-host"
    assert config.redis_url == "redis://new-redis:6379/0"


def test_fcm_server_key_warns_about_service_accounts(monkeypatch: pytest.MonkeyPatch) -> None:
    """The retired FCM server key is accepted with a warning pointing at HTTP v1."""
    monkeypatch.setenv("DOTMAC_FCM_SERVER_KEY", "AAAA-legacy")
    with pytest.deprecated_call(match="service account"):
        config = CommunicationsConfig()
    key = config.notifications.push.fcm.server_key
    assert key is not None
    assert key.get_secret_value() == "AAAA-legacy"


def test_legacy_names_in_dotenv(workdir: Path) -> None:
    """Legacy names in .env work too; foreign variables there are ignored."""
    (workdir / ".env").write_text("DOTMAC_SMTP_HOST=dotenv-host\nDATABASE_URL=postgres://x\n")
    with pytest.deprecated_call():
        config = CommunicationsConfig()
    assert config.notifications.email.host == "dotenv-host"


def test_unknown_dotmac_name_in_dotenv_is_ignored_and_reported(workdir: Path) -> None:
    """A misspelt DOTMAC_ name in .env does not break start-up; unknown_variables names it."""
    (workdir / ".env").write_text("DOTMAC_EVENT__BACKEND=redis\n")
    assert CommunicationsConfig().events.backend == "memory"
    assert unknown_variables(environ={}, dotenv={"dotmac_event__backend": "redis"}) == [
        "DOTMAC_EVENT__BACKEND"
    ]
    assert unknown_variables(environ={"DOTMAC_REDIS_URL": "x", "DOTMAC_SMTP_HOST": "h"}) == []


def test_config_file_named_in_dotenv(workdir: Path) -> None:
    """DOTMAC_CONFIG_FILE may be set in .env itself."""
    (workdir / "comms.yaml").write_text("events:\n  maxlen: 77\n")
    (workdir / ".env").write_text(f"DOTMAC_CONFIG_FILE={workdir / 'comms.yaml'}\n")
    assert CommunicationsConfig().events.maxlen == 77


def test_redis_password_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    """A password inside redis_url is masked in repr, JSON dumps and config show."""
    monkeypatch.setenv("DOTMAC_REDIS_URL", "redis://:hunter2@cache:6379/0")
    monkeypatch.setenv("DOTMAC_OBSERVABILITY__OTLP_ENDPOINT", "https://user:s3cret@otel:4318")
    config = CommunicationsConfig()
    for text in (repr(config), str(config), config.model_dump_json(), safe_dump(config),
                 repr(config.events)):  # fmt: skip
        assert "hunter2" not in text
        assert "s3cret" not in text
    assert config.events.redis_url == "redis://:hunter2@cache:6379/0"  # usable in code


@pytest.mark.parametrize(
    "url", ["redis://:hunter2@[::1/0", "redis://:hunter2@host:notaport/0", "ftp://:hunter2@h/0"]
)
def test_malformed_url_is_a_configuration_error_without_the_password(url: str) -> None:
    """A URL that cannot even be parsed is a ConfigurationError that hides its password."""
    with pytest.raises(ConfigurationError) as info:
        CommunicationsConfig(redis_url=url)
    assert "hunter2" not in str(info.value)
    assert info.value.__cause__ is None


def test_otlp_credentials_not_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad OTLP endpoint's credentials stay out of the error."""
    monkeypatch.setenv("DOTMAC_OBSERVABILITY__OTLP_ENDPOINT", "grpc://user:s3cret@collector:4317")
    with pytest.raises(ConfigurationError, match="OTLP_ENDPOINT") as info:
        CommunicationsConfig()
    assert "s3cret" not in str(info.value)


def test_legacy_use_tls_gives_way_to_nested_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """DOTMAC_SMTP_USE_TLS never conflicts with an explicit use_tls/start_tls."""
    monkeypatch.setenv("DOTMAC_SMTP_USE_TLS", "true")
    monkeypatch.setenv("DOTMAC_NOTIFICATIONS__EMAIL__USE_TLS", "true")
    with pytest.deprecated_call():
        email = CommunicationsConfig().notifications.email
    assert (email.use_tls, email.start_tls) == (True, None)


def test_legacy_use_tls_follows_the_resolved_port(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the nested port 465 the old TLS flag means implicit TLS."""
    monkeypatch.setenv("DOTMAC_SMTP_USE_TLS", "true")
    monkeypatch.setenv("DOTMAC_NOTIFICATIONS__EMAIL__PORT", "465")
    with pytest.deprecated_call():
        email = CommunicationsConfig().notifications.email
    assert (email.use_tls, email.start_tls) == (True, None)


def test_legacy_redis_parts_without_host_warn(monkeypatch: pytest.MonkeyPatch) -> None:
    """REDIS_PORT/PASSWORD without REDIS_HOST are reported as ignored, not dropped silently."""
    monkeypatch.setenv("DOTMAC_REDIS_PASSWORD", "pw")
    with pytest.deprecated_call(), pytest.warns(UserWarning, match="DOTMAC_REDIS_HOST is not set"):
        assert CommunicationsConfig().redis_url is None


def test_error_names_the_legacy_variable_the_user_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad value from a flat variable is reported under that variable's name."""
    monkeypatch.setenv("DOTMAC_SMTP_PORT", "abc")
    with pytest.deprecated_call(), pytest.raises(ConfigurationError) as info:
        CommunicationsConfig()
    assert "DOTMAC_SMTP_PORT (deprecated; use DOTMAC_NOTIFICATIONS__EMAIL__PORT)" in str(info.value)


def test_section_rule_names_the_section(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cross-field rule points at the section's variables."""
    monkeypatch.setenv("DOTMAC_NOTIFICATIONS__EMAIL__USERNAME", "u")
    with pytest.raises(ConfigurationError, match=r"DOTMAC_NOTIFICATIONS__EMAIL__\*"):
        CommunicationsConfig()


def test_old_config_shape_maps_with_warnings() -> None:
    """The old dict keys (retry_attempts, default_adapter, redis.host...) map to the new ones."""
    with pytest.deprecated_call() as record:
        config = CommunicationsConfig(
            notifications={"retry_attempts": 4, "retry_delay": 2.0},
            websockets={"heartbeat_interval": 15, "message_size_limit": 4096},
            events={"default_adapter": "redis", "max_retries": 2},
            redis={"host": "r", "port": 6381, "db": 1},
        )
    assert config.notifications.max_attempts == 4
    assert config.notifications.retry_initial_delay == 2.0
    assert config.websockets.ping_interval == 15
    assert config.websockets.max_message_size == 4096
    assert config.events.backend == "redis"
    assert config.events.max_attempts == 3
    assert config.events.redis_url == "redis://r:6381/1"
    messages = [str(w.message) for w in record]
    for old in ("notifications.retry_attempts", "notifications.retry_delay",
                "websockets.heartbeat_interval", "websockets.message_size_limit",
                "events.default_adapter", "events.max_retries", "config key redis"):  # fmt: skip
        assert sum(old in m for m in messages) == 1, old


def test_no_warning_without_legacy_input() -> None:
    """Plain configuration emits no warnings at all."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CommunicationsConfig()


# ---------------------------------------------------------------------------- .env.example
def test_env_example_is_in_sync() -> None:
    """.env.example is exactly what the schema generates (run `dotmac-comms config env-example`)."""
    assert (ROOT / ".env.example").read_text() == env_example()


def test_env_example_lists_every_field() -> None:
    """Every leaf field appears in .env.example with a description."""
    text = (ROOT / ".env.example").read_text()
    names = [env for env, _, _ in env_variables()]
    assert len(names) > 50
    for env, description, _ in env_variables():
        assert f"{env}=" in text
        assert description, f"{env} has no description"


# ------------------------------------------------------------------------------- properties
@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(port=st.integers(min_value=-(10**6), max_value=10**6))
def test_port_bounds_property(port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Any port string parses to the port in range, else fails naming the variable."""
    with monkeypatch.context() as patch:  # one example's variables never leak into the next
        patch.setenv("DOTMAC_NOTIFICATIONS__EMAIL__PORT", str(port))
        if 1 <= port <= 65535:
            assert CommunicationsConfig().notifications.email.port == port
        else:
            with pytest.raises(ConfigurationError, match="DOTMAC_NOTIFICATIONS__EMAIL__PORT"):
                CommunicationsConfig()


@settings(max_examples=80, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    field=st.sampled_from(
        ["DOTMAC_LOG_LEVEL", "DOTMAC_EVENTS__MAXLEN", "DOTMAC_WEBSOCKETS__PING_INTERVAL",
         "DOTMAC_DEBUG", "DOTMAC_WEBSOCKETS__JWT_ALGORITHMS", "DOTMAC_OBSERVABILITY__OTLP_ENDPOINT"]
    ),
    value=st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), max_size=20),
)  # fmt: skip
def test_arbitrary_env_text_never_crashes(
    field: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any text in a variable either parses or raises ConfigurationError naming it."""
    with monkeypatch.context() as patch:  # one example's variables never leak into the next
        patch.setenv(field, value)
        try:
            CommunicationsConfig()
        except ConfigurationError as exc:
            message = str(exc)
        else:
            return
    assert field in message
    assert message.count("\n  ") == 1  # exactly one bad field reported
