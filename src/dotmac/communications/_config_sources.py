"""Configuration sources and error formatting behind :class:`~.config.CommunicationsConfig`.

Kept apart from ``config.py`` so the settings classes read as a plain schema.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml
from pydantic import ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from ._redis import redact_url
from .errors import ConfigurationError

__all__ = [
    "EXTRA_KNOWN_ENV",
    "LEGACY_ENV",
    "REMOVAL_VERSION",
    "ConfigFileSource",
    "FilteredDotEnvSource",
    "LegacyEnvSource",
    "configuration_error",
    "deprecation_message",
    "legacy_redis_url",
    "rename_legacy_keys",
    "replacement",
]

REMOVAL_VERSION = "1.0"
CONFIG_FILE_ENV = "DOTMAC_CONFIG_FILE"

# Old flat variable → new field path. DOTMAC_REDIS_URL, DOTMAC_ENVIRONMENT, DOTMAC_DEBUG and
# DOTMAC_LOG_LEVEL kept their names and need no mapping.
LEGACY_ENV: dict[str, tuple[str, ...]] = {
    "DOTMAC_SMTP_HOST": ("notifications", "email", "host"),
    "DOTMAC_SMTP_PORT": ("notifications", "email", "port"),
    "DOTMAC_SMTP_USERNAME": ("notifications", "email", "username"),
    "DOTMAC_SMTP_PASSWORD": ("notifications", "email", "password"),
    "DOTMAC_SMTP_USE_TLS": ("notifications", "email", "legacy_use_tls"),
    "DOTMAC_TWILIO_SID": ("notifications", "sms", "twilio", "account_sid"),
    "DOTMAC_TWILIO_TOKEN": ("notifications", "sms", "twilio", "auth_token"),
    "DOTMAC_FCM_SERVER_KEY": ("notifications", "push", "fcm", "server_key"),
    "DOTMAC_APNS_KEY_ID": ("notifications", "push", "apns", "key_id"),
    "DOTMAC_APNS_KEY_FILE": ("notifications", "push", "apns", "key_file"),
    "DOTMAC_REDIS_HOST": ("redis_url",),
    "DOTMAC_REDIS_PORT": ("redis_url",),
    "DOTMAC_REDIS_DB": ("redis_url",),
    "DOTMAC_REDIS_PASSWORD": ("redis_url",),
}
_LEGACY_LOWER = frozenset(name.lower() for name in LEGACY_ENV)
# What to tell users to set instead, where the field path alone would mislead.
_REPLACEMENT = {
    "DOTMAC_SMTP_USE_TLS": "DOTMAC_NOTIFICATIONS__EMAIL__START_TLS (or __USE_TLS on port 465)",
    **{name: "DOTMAC_REDIS_URL" for name, path in LEGACY_ENV.items() if path == ("redis_url",)},
}
# Variables the library reads that are not settings fields.
EXTRA_KNOWN_ENV = frozenset({CONFIG_FILE_ENV, "DOTMAC_TEST_REDIS_URL", "DOTMAC_BENCH_REDIS_URL"})


def replacement(legacy_name: str) -> str:
    """The variable that replaces a deprecated flat one."""
    return _REPLACEMENT.get(legacy_name) or "DOTMAC_" + "__".join(LEGACY_ENV[legacy_name]).upper()


_SECRET_WORDS = ("password", "secret", "token", "key")


def deprecation_message(old: str, new: str, *, extra: str = "") -> str:
    """Build the one deprecation message format used across the library."""
    text = (
        f"{old} is deprecated; use {new} instead. It will be removed in version {REMOVAL_VERSION}."
    )
    return f"{text} {extra}" if extra else text


def env_name(loc: tuple[str | int, ...], *, leaf: bool = True) -> str:
    """Environment variable that sets the field at ``loc`` (``('events', 'backend')``).

    When only a deprecated flat variable for that field is set, it is named instead, since it
    is what the user wrote. ``leaf=False`` marks a whole section (``DOTMAC_EVENTS__*``).
    """
    parts = tuple(str(p) for p in loc if isinstance(p, str))
    if parts and parts[0].startswith("dotmac_"):
        return parts[0].upper()
    if not parts:
        return "DOTMAC_*"
    name = "DOTMAC_" + "__".join(parts).upper()
    if not leaf:
        return f"{name}__*"
    if name not in os.environ:
        for legacy, path in LEGACY_ENV.items():
            if path == parts and legacy in os.environ:
                return f"{legacy} (deprecated; use {replacement(legacy)})"
    return name


def configuration_error(exc: ValidationError) -> ConfigurationError:
    """Turn a ``ValidationError`` into one error listing every bad field and its env var."""
    lines = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        path = ".".join(str(p) for p in loc) or "(whole config)"
        secret = any(word in str(p).lower() for p in loc for word in _SECRET_WORDS)
        shown = "" if err["type"] == "missing" or "input" not in err else err["input"]
        # A model-level check (cross-field rule) reports the whole section.
        leaf = not isinstance(shown, dict)
        if secret and shown != "":
            shown = "'***'"
        elif isinstance(shown, str) and "://" in shown:
            shown = repr(redact_url(shown))
        elif isinstance(shown, dict | list) or shown == "":
            shown = ""
        else:
            shown = repr(shown)
        value = f" = {shown}" if shown else ""
        message = err["msg"].removeprefix("Value error, ")
        lines.append(f"  {path}{value}: {message} (set by {env_name(loc, leaf=leaf)})")
    count = len(lines)
    header = f"invalid configuration ({count} error{'s' if count != 1 else ''}):"
    return ConfigurationError("\n".join([header, *lines]))


def rename_legacy_keys(
    data: Any,
    section: str,
    mapping: Mapping[str, str | tuple[str, Callable[[Any], Any]]],
) -> Any:
    """Map a section's old config keys to the new ones, warning once per key used.

    A new key given alongside its old twin wins.
    """
    if not isinstance(data, dict) or not any(old in data for old in mapping):
        return data
    data = dict(data)
    for old, target in mapping.items():
        if old not in data:
            continue
        new, convert = (target, None) if isinstance(target, str) else target
        warnings.warn(
            deprecation_message(f"config key {section}.{old}", f"{section}.{new}"),
            DeprecationWarning,
            stacklevel=2,
        )
        value = data.pop(old)
        data.setdefault(new, convert(value) if convert else value)
    return data


def legacy_redis_url(parts: Mapping[str, Any], *, origin: str) -> str | None:
    """Build a Redis URL from old ``host``/``port``/``db``/``password`` settings (None if no host).

    Raises:
        ConfigurationError: A value cannot be used in a URL (non-numeric port or db).
    """
    host = parts.get("host")
    if not host:
        return None
    port, db = parts.get("port") or 6379, parts.get("db") or 0
    try:
        port, db = int(port), int(db)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(
            f"{origin}: Redis port and db must be integers, got port={port!r} db={db!r}"
        ) from exc
    password = parts.get("password")
    auth = f":{quote(str(password), safe='')}@" if password else ""
    return f"redis://{auth}{host}:{port}/{db}"


class LegacyEnvSource(PydanticBaseSettingsSource):
    """The old flat ``DOTMAC_SMTP_HOST``-style variables, each with a DeprecationWarning."""

    def __init__(
        self, settings_cls: type[BaseSettings], *, dotenv_values: Mapping[str, Any]
    ) -> None:
        super().__init__(settings_cls)
        # Real environment beats the .env file, as for the new names.
        lowered = {k.lower(): v for k, v in dotenv_values.items() if v is not None}
        lowered.update({k.lower(): v for k, v in os.environ.items()})
        self._values = {
            name: lowered[name.lower()] for name in LEGACY_ENV if name.lower() in lowered
        }

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        """Unused: :meth:`__call__` builds the nested data directly."""
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        """Return the nested settings data the legacy variables give."""
        data: dict[str, Any] = {}
        redis_parts: dict[str, str] = {}
        for name, value in self._values.items():
            path = LEGACY_ENV[name]
            new = replacement(name)
            extra = ""
            if name == "DOTMAC_FCM_SERVER_KEY":
                extra = (
                    "FCM's legacy server-key API is retired: FCM HTTP v1 needs a service account "
                    "(DOTMAC_NOTIFICATIONS__PUSH__FCM__SERVICE_ACCOUNT_FILE); see MIGRATION.md."
                )
            warnings.warn(
                deprecation_message(name, new, extra=extra), DeprecationWarning, stacklevel=2
            )
            if path == ("redis_url",):
                redis_parts[name.removeprefix("DOTMAC_REDIS_").lower()] = value
                continue
            _set_path(data, path, value)
        if "DOTMAC_TWILIO_SID" in self._values:
            _set_path(data, ("notifications", "sms", "provider"), "twilio")
        url = legacy_redis_url(redis_parts, origin="DOTMAC_REDIS_HOST/PORT/DB/PASSWORD")
        if url is not None:
            data["redis_url"] = url
        elif redis_parts:
            warnings.warn(
                f"{', '.join(sorted('DOTMAC_REDIS_' + k.upper() for k in redis_parts))} ignored: "
                "DOTMAC_REDIS_HOST is not set (set DOTMAC_REDIS_URL instead)",
                UserWarning,
                stacklevel=2,
            )
        return data


def _set_path(data: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = data
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value


class FilteredDotEnvSource(PydanticBaseSettingsSource):
    """The ``.env`` source, keeping only the settings' own fields.

    Legacy names are read by :class:`LegacyEnvSource`, ``DOTMAC_CONFIG_FILE`` by
    :class:`ConfigFileSource`; a host app's own variables (its ``DATABASE_URL``) and unknown
    ``DOTMAC_*`` names are ignored here, as in the real environment, and
    :func:`unknown_variables` reports the latter (``dotmac-comms config check``).
    """

    def __init__(self, settings_cls: type[BaseSettings], inner: PydanticBaseSettingsSource) -> None:
        super().__init__(settings_cls)
        self._inner = inner

    @classmethod
    def wrap(
        cls, settings_cls: type[BaseSettings], inner: PydanticBaseSettingsSource
    ) -> FilteredDotEnvSource:
        """Wrap pydantic-settings' dotenv source."""
        return cls(settings_cls, inner)

    def raw_env_vars(self) -> Mapping[str, Any]:
        """Every variable read from the ``.env`` file(s), names lower-cased."""
        values: Mapping[str, Any] = getattr(self._inner, "env_vars", {})
        return values

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        """Unused: :meth:`__call__` filters the inner source's output."""
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        """Return the inner source's data without foreign and legacy names."""
        fields = self.settings_cls.model_fields
        return {key: value for key, value in self._inner().items() if key in fields}


class ConfigFileSource(PydanticBaseSettingsSource):
    """A JSON or YAML file named by ``DOTMAC_CONFIG_FILE`` (nested like the config).

    The variable is read from the environment, else from the ``.env`` file.
    """

    def __init__(
        self, settings_cls: type[BaseSettings], *, dotenv_values: Mapping[str, Any]
    ) -> None:
        super().__init__(settings_cls)
        name = os.environ.get(CONFIG_FILE_ENV)
        if name is None:
            lowered = {k.lower(): v for k, v in dotenv_values.items()}
            name = lowered.get(CONFIG_FILE_ENV.lower())
        self._name = name

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        """Unused: :meth:`__call__` returns the whole file."""
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        """Load the file, or return nothing when ``DOTMAC_CONFIG_FILE`` is unset.

        Raises:
            ConfigurationError: The file is missing, unreadable, not JSON/YAML, or not a mapping.
        """
        name = self._name
        if not name:
            return {}
        path = Path(name)
        suffix = path.suffix.lower()
        if suffix not in {".json", ".yaml", ".yml"}:
            raise ConfigurationError(
                f"{CONFIG_FILE_ENV}={name!r}: the file must end in .json, .yaml or .yml"
            )
        try:
            text = path.read_text(encoding="utf-8")
            data = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
        except OSError as exc:
            raise ConfigurationError(f"{CONFIG_FILE_ENV}={name!r}: cannot read: {exc}") from exc
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise ConfigurationError(f"{CONFIG_FILE_ENV}={name!r}: cannot parse: {exc}") from exc
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise ConfigurationError(
                f"{CONFIG_FILE_ENV}={name!r}: top level must be a mapping, "
                f"got {type(data).__name__}"
            )
        return data
