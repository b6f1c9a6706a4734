"""Configuration: one JSON file plus `STOR_*` secrets from the environment, validated once.

Building a `Config` has no side effects; every error is a `ConfigError` naming the key and the
value. Checking that the storage directories exist and are mounted is `check_storage_dirs`,
called once at start-up.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from stor.amqpuri import AmqpTarget, parse_amqp
from stor.errors import ConfigError

GiB = 1024**3

ENV_CONFIG_FILE = "CONFIG_FILE"
ENV_BASIC_AUTH = "STOR_BASIC_AUTH"
ENV_READ_AUTH = "STOR_READ_AUTH"
ENV_ADMIN_AUTH = "STOR_ADMIN_AUTH"
ENV_METRICS_AUTH = "STOR_METRICS_AUTH"
ROLE_KEYS = {
    "basic_auth": ENV_BASIC_AUTH,
    "read_auth": ENV_READ_AUTH,
    "admin_auth": ENV_ADMIN_AUTH,
    "metrics_auth": ENV_METRICS_AUTH,
}
"""The credential lists, one per role, each with the variable that overrides it."""
ENV_S3_ACCESS_KEY = "STOR_S3_ACCESS_KEY"
ENV_S3_SECRET_KEY = "STOR_S3_SECRET_KEY"  # noqa: S105 - a variable name, not a secret


@dataclass(frozen=True)
class Credential:
    user: str
    password: str

    def __repr__(self) -> str:  # never print a password by accident
        return f"Credential(user={self.user!r}, password='***')"


@dataclass(frozen=True)
class S3Settings:
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)
    host: str

    @property
    def endpoint_url(self) -> str:
        """Stor's `host[:port]` means plain http; a full URL is taken as it is."""
        return self.host if "://" in self.host else f"http://{self.host}"


@dataclass(frozen=True)
class StatsiteSettings:
    host: str
    port: int = 8125
    prefix: str = "stor"
    sample_rate: float = 1.0


Check = Callable[[str, Any], Any]
"""Validates one key's value from the file: returns it typed, or raises `ConfigError` naming
the key and the value."""


def check_storage_dirs(config: Config) -> None:
    """Fail loudly when a configured directory is missing, not a directory, or (with
    `check_mountpoints`) not a mounted filesystem of its own. stor never creates a root."""
    root_dev = os.stat("/").st_dev
    for index, pair in enumerate(config.storage_pairs):
        for member in pair:
            where = f"storage_pairs[{index}]: {member!r}"
            if not os.path.isdir(member):
                state = "is not a directory" if os.path.exists(member) else "does not exist"
                raise ConfigError(f"{where} {state} (an unmounted disk? stor never creates a storage root)")
            if config.check_mountpoints and not config.embedded and os.stat(member).st_dev == root_dev:
                raise ConfigError(
                    f"{where} is on the root filesystem, not a mounted disk "
                    "(set check_mountpoints to false to allow it)"
                )


def _kind(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def _storage_pairs(key: str, value: object) -> tuple[tuple[str, ...], ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"'storage_pairs' must be a non-empty list of pairs of directories, got {value!r}")
    pairs: list[tuple[str, ...]] = []
    seen: set[str] = set()
    for index, pair in enumerate(value):
        key = f"storage_pairs[{index}]"
        if not isinstance(pair, list) or not all(isinstance(m, str) and m for m in pair):
            raise ConfigError(f"'{key}' must be a list of directory paths, got {pair!r}")
        if len(pair) < 2:
            raise ConfigError(f"'{key}' must have at least two members (a mirrored pair), got {pair!r}")
        for member in pair:
            normal = os.path.normpath(os.path.abspath(member))
            if normal in seen:
                raise ConfigError(f"'{key}': directory {member!r} is listed more than once")
            seen.add(normal)
        pairs.append(tuple(os.path.normpath(os.path.abspath(m)) for m in pair))
    return tuple(pairs)


def _regex(key: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(f"'writable_pairs_regex' must be a string, got {value!r}")
    try:
        re.compile(value)
    except re.error as exc:
        raise ConfigError(f"'writable_pairs_regex' is not a valid regex: {value!r} ({exc})") from None
    return value


def _credential(key: str, value: object) -> Credential:
    if not isinstance(value, str) or ":" not in value:
        shown = value if not isinstance(value, str) else value.split(":", 1)[0] + "…"
        raise ConfigError(f"'{key}' must be \"user:password\", got {shown!r}")
    user, password = value.split(":", 1)
    if not user or not password:
        raise ConfigError(f"'{key}' needs both a user and a password, got user {user!r}")
    return Credential(user, password)


def _credentials(key: str, value: object) -> tuple[Credential, ...]:
    if value is None:
        return ()
    if isinstance(value, list):
        return tuple(_credential(f"{key}[{i}]", item) for i, item in enumerate(value))
    return (_credential(key, value),)


def _parse_auth_env(text: str, variable: str = ENV_BASIC_AUTH) -> tuple[Credential, ...]:
    """`STOR_BASIC_AUTH` is "user:pass", or a JSON list of them for several writers."""
    if text.lstrip().startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            raise ConfigError(f"{variable} looks like a JSON list but does not parse") from None
        return _credentials(variable, value)
    return (_credential(variable, text),)


def _natural(key: str, value: object) -> int:
    return _int(key, value, minimum=0)


def _int(key: str, value: object, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"'{key}' must be an integer >= {minimum}, got {value!r}")
    return value


def _seconds(maximum: float) -> Check:
    """A duration check: a number of seconds in (0, `maximum`]."""
    return functools.partial(_seconds_within, maximum=maximum)


def _seconds_within(key: str, value: object, *, maximum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= maximum:
        raise ConfigError(f"'{key}' must be a number of seconds in (0, {maximum}], got {value!r}")
    return float(value)


def _bool(key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"'{key}' must be true or false, got {value!r}")
    return value


def _str(key: str, value: object) -> str:
    if not (isinstance(value, str) and value):
        raise ConfigError(f"'{key}' must be a non-empty string, got {value!r}")
    return value


def _s3_file(key: str, value: object) -> S3Settings | None:
    return _s3(value, {})


def _servers(key: str, value: object) -> tuple[tuple[str, int], ...]:
    return tuple(_host_port(key, server) for server in _str_list(key, value))


def _str_list(key: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"'{key}' must be a list of non-empty strings, got {value!r}")
    return tuple(value)


def _s3(value: object, env: Mapping[str, str]) -> S3Settings | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ConfigError(f"'s3_credentials' must be an object, got {_kind(value)}")
    extra = sorted(set(value) - {"access_key", "secret_key", "host"})
    if extra:
        raise ConfigError(f"unknown key 's3_credentials.{extra[0]}'")
    overrides = {"access_key": env.get(ENV_S3_ACCESS_KEY), "secret_key": env.get(ENV_S3_SECRET_KEY)}
    fields = {}
    for name in ("access_key", "secret_key", "host"):
        item = overrides.get(name) or value.get(name)
        if not isinstance(item, str) or not item:
            raise ConfigError(f"'s3_credentials.{name}' must be a non-empty string, got {_kind(item)}")
        fields[name] = item
    return S3Settings(**fields)


def _host_port(key: str, text: str) -> tuple[str, int]:
    """`host:port`, `[v6]:port`, or a bare host for the default memcached port."""
    host, port = text, "11211"
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":") or port
    elif text.count(":") == 1:
        host, port = text.split(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"'{key}' entries must be host:port, got {text!r}")
    return host, int(port)


def _rabbitmq(key: str, value: object) -> AmqpTarget | None:
    return parse_amqp(key, value, exchange="stor")


def _events(key: str, value: object) -> AmqpTarget | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ConfigError(f"'events' must be an object with 'amqp_uri' (and 'exchange'), got {_kind(value)}")
    extra = sorted(set(value) - {"amqp_uri", "exchange"})
    if extra:
        raise ConfigError(f"unknown key 'events.{extra[0]}'")
    exchange = value.get("exchange", "stor.events")
    if not isinstance(exchange, str) or not exchange:
        raise ConfigError(f"'events.exchange' must be a non-empty string, got {exchange!r}")
    return parse_amqp("events.amqp_uri", value.get("amqp_uri"), exchange=exchange)


def _statsite(key: str, value: object) -> StatsiteSettings | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ConfigError(f"'statsite' must be an object, got {_kind(value)}")
    extra = sorted(set(value) - {"host", "port", "prefix", "sample_rate"})
    if extra:
        raise ConfigError(f"unknown key 'statsite.{extra[0]}'")
    host = value.get("host")
    if not isinstance(host, str) or not host:
        raise ConfigError(f"'statsite.host' must be a non-empty string, got {host!r}")
    port = value.get("port", 8125)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ConfigError(f"'statsite.port' must be a port number, got {port!r}")
    prefix = value.get("prefix", "stor")
    if not isinstance(prefix, str):
        raise ConfigError(f"'statsite.prefix' must be a string, got {prefix!r}")
    rate = value.get("sample_rate", 1.0)
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate <= 1:
        raise ConfigError(f"'statsite.sample_rate' must be a number in (0, 1], got {rate!r}")
    return StatsiteSettings(host=host, port=port, prefix=prefix, sample_rate=float(rate))


def _key(check: Check, default: Any = MISSING) -> Any:
    """A config key: a `Config` field with its default and the check its value must pass."""
    return field(default=default, metadata={"check": check})


@dataclass(frozen=True)
class Config:
    """Every key of the config file, each declared once: its type, default and check."""

    storage_pairs: tuple[tuple[str, ...], ...] = _key(_storage_pairs)
    writable_pairs_regex: str | None = _key(_regex, None)
    basic_auth: tuple[Credential, ...] = _key(_credentials, ())
    read_auth: tuple[Credential, ...] = _key(_credentials, ())
    admin_auth: tuple[Credential, ...] = _key(_credentials, ())
    metrics_auth: tuple[Credential, ...] = _key(_credentials, ())
    max_upload_size: int = _key(_natural, 2 * GiB)
    max_named_file_size: int = _key(_natural, 2 * 1024 * 1024)
    placement_threshold: int = _key(_natural, GiB)
    check_mountpoints: bool = _key(_bool, True)
    body_idle_timeout: float = _key(_seconds(3600.0), 30.0)
    min_upload_rate: int = _key(_natural, 500)
    max_uploads_in_flight: int = _key(_natural, 128)
    archive_password: str = _key(_str, "infected")
    archive_max_blobs: int = _key(_natural, 1000)
    status_timeout: float = _key(_seconds(1.9), 1.5)
    health_check_interval: float = _key(_seconds(3600.0), 5.0)
    s3_enabled: bool = _key(_bool, False)
    s3_credentials: S3Settings | None = _key(_s3_file, None)
    s3_bucket: str = _key(_str, "samples")
    s3_region: str = _key(_str, "us-east-1")
    s3_sync_writes: bool = _key(_bool, False)
    s3_fill_local: bool = _key(_bool, True)
    s3_timeout: float = _key(_seconds(600.0), 5.0)
    memcached_servers: tuple[tuple[str, int], ...] = _key(_servers, ())
    memcached_timeout: float = _key(_seconds(10.0), 0.05)
    memcached_ttl: int = _key(_natural, 86400)
    memcached_negative_ttl: int = _key(_natural, 0)
    location_cache_size: int = _key(_natural, 100_000)
    open_file_cache_size: int = _key(_natural, 32_768)
    small_blob_cache_bytes: int = _key(_natural, 64 * 1024 * 1024)
    verify_on_read: bool = _key(_bool, True)
    verify_on_read_max: int = _key(_natural, 64 * 1024 * 1024)
    group_commit: bool = _key(_bool, True)
    statsite: StatsiteSettings | None = _key(_statsite, None)
    rabbitmq_uri: AmqpTarget | None = _key(_rabbitmq, None)
    events: AmqpTarget | None = _key(_events, None)
    secret: str | None = field(default=None, repr=False, metadata={"check": _str})
    # Not a config key: the embedded default creates its own directories.
    embedded: bool = False

    def pair_writable_by_regex(self, members: tuple[str, ...]) -> bool:
        """Stor's rule: the regex is searched in each path, and every member must match."""
        if self.writable_pairs_regex is None:
            return True
        return all(re.search(self.writable_pairs_regex, member) for member in members)


_KEYS = {key.name: key.metadata["check"] for key in fields(Config) if "check" in key.metadata}
KEYS = frozenset(_KEYS)
"""The names of the config file's keys."""


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read the JSON file at `path` and validate it, with secrets from `env` (os.environ)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc.strerror}") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid JSON: {exc}") from None
    return config_from_mapping(raw, os.environ if env is None else env)


def config_from_mapping(raw: object, env: Mapping[str, str]) -> Config:
    if not isinstance(raw, dict):
        raise ConfigError(f"the config must be a JSON object, got {_kind(raw)}")
    unknown = sorted(set(raw) - set(_KEYS))
    if unknown:
        raise ConfigError(f"unknown config key {unknown[0]!r} (known keys: {', '.join(sorted(_KEYS))})")
    if "storage_pairs" not in raw:
        raise ConfigError("missing required key 'storage_pairs'")
    values = {key: _KEYS[key](key, value) for key, value in raw.items()}
    # secrets from the environment win over the file
    for key, variable in ROLE_KEYS.items():
        from_env = env.get(variable)
        if from_env:
            values[key] = _parse_auth_env(from_env, variable)
    values["s3_credentials"] = _s3(raw.get("s3_credentials"), env)
    if values.get("s3_enabled") and values["s3_credentials"] is None:
        raise ConfigError("'s3_enabled' is true but 's3_credentials' is missing")
    return Config(**values)
