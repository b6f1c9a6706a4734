"""Configuration: one JSON file plus `STOR_*` secrets from the environment, validated once.

Building a `Config` has no side effects; every error is a `ConfigError` naming the key and the
value. Checking that the storage directories exist and are mounted is `check_storage_dirs`,
called once at start-up.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stor.errors import ConfigError

GiB = 1024**3

ENV_CONFIG_FILE = "CONFIG_FILE"
ENV_BASIC_AUTH = "STOR_BASIC_AUTH"
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


@dataclass(frozen=True)
class Config:
    storage_pairs: tuple[tuple[str, ...], ...]
    writable_pairs_regex: str | None = None
    basic_auth: tuple[Credential, ...] = ()
    max_upload_size: int = 2 * GiB
    max_named_file_size: int = 2 * 1024 * 1024
    placement_threshold: int = GiB
    check_mountpoints: bool = True
    body_idle_timeout: float = 30.0
    status_timeout: float = 1.5
    health_check_interval: float = 5.0
    s3_enabled: bool = False
    s3_credentials: S3Settings | None = None
    s3_bucket: str = "samples"
    s3_region: str = "us-east-1"
    s3_sync_writes: bool = False
    s3_fill_local: bool = True
    s3_timeout: float = 5.0
    memcached_servers: tuple[tuple[str, int], ...] = ()
    memcached_timeout: float = 0.05
    memcached_ttl: int = 86400
    memcached_negative_ttl: int = 0
    location_cache_size: int = 100_000
    open_file_cache_size: int = 32_768
    verify_on_read: bool = True
    verify_on_read_max: int = 4 * 1024 * 1024
    group_commit: bool = True
    statsite: StatsiteSettings | None = None
    secret: str | None = field(default=None, repr=False)
    # Not a config key: the embedded default creates its own directories.
    embedded: bool = False

    def pair_writable_by_regex(self, members: tuple[str, ...]) -> bool:
        """Stor's rule: the regex is searched in each path, and every member must match."""
        if self.writable_pairs_regex is None:
            return True
        return all(re.search(self.writable_pairs_regex, member) for member in members)


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
    unknown = sorted(set(raw) - _KNOWN_KEYS)
    if unknown:
        raise ConfigError(f"unknown config key {unknown[0]!r} (known keys: {', '.join(sorted(_KNOWN_KEYS))})")
    if "storage_pairs" not in raw:
        raise ConfigError("missing required key 'storage_pairs'")
    auth_raw = env.get(ENV_BASIC_AUTH)
    auth = _parse_auth_env(auth_raw) if auth_raw else _credentials("basic_auth", raw.get("basic_auth"))
    s3_enabled = _bool(raw, "s3_enabled", False)
    s3 = _s3(raw.get("s3_credentials"), env)
    if s3_enabled and s3 is None:
        raise ConfigError("'s3_enabled' is true but 's3_credentials' is missing")
    return Config(
        storage_pairs=_storage_pairs(raw["storage_pairs"]),
        writable_pairs_regex=_regex(raw.get("writable_pairs_regex")),
        basic_auth=auth,
        max_upload_size=_int(raw, "max_upload_size", 2 * GiB, minimum=0),
        max_named_file_size=_int(raw, "max_named_file_size", 2 * 1024 * 1024, minimum=0),
        placement_threshold=_int(raw, "placement_threshold", GiB, minimum=0),
        check_mountpoints=_bool(raw, "check_mountpoints", True),
        body_idle_timeout=_seconds(raw, "body_idle_timeout", 30.0, maximum=3600.0),
        status_timeout=_seconds(raw, "status_timeout", 1.5, maximum=1.9),
        health_check_interval=_seconds(raw, "health_check_interval", 5.0, maximum=3600.0),
        s3_enabled=s3_enabled,
        s3_credentials=s3,
        s3_bucket=_str(raw, "s3_bucket", "samples"),
        s3_region=_str(raw, "s3_region", "us-east-1"),
        s3_sync_writes=_bool(raw, "s3_sync_writes", False),
        s3_fill_local=_bool(raw, "s3_fill_local", True),
        s3_timeout=_seconds(raw, "s3_timeout", 5.0, maximum=600.0),
        memcached_servers=tuple(
            _host_port("memcached_servers", s) for s in _str_list("memcached_servers", raw.get("memcached_servers", []))
        ),
        memcached_timeout=_seconds(raw, "memcached_timeout", 0.05, maximum=10.0),
        memcached_ttl=_int(raw, "memcached_ttl", 86400, minimum=0),
        memcached_negative_ttl=_int(raw, "memcached_negative_ttl", 0, minimum=0),
        location_cache_size=_int(raw, "location_cache_size", 100_000, minimum=0),
        open_file_cache_size=_int(raw, "open_file_cache_size", 32_768, minimum=0),
        verify_on_read=_bool(raw, "verify_on_read", True),
        verify_on_read_max=_int(raw, "verify_on_read_max", 4 * 1024 * 1024, minimum=0),
        group_commit=_bool(raw, "group_commit", True),
        statsite=_statsite(raw.get("statsite")),
        secret=_str(raw, "secret", None),
    )


_KNOWN_KEYS = frozenset(
    {
        "storage_pairs",
        "writable_pairs_regex",
        "basic_auth",
        "max_upload_size",
        "max_named_file_size",
        "placement_threshold",
        "check_mountpoints",
        "body_idle_timeout",
        "status_timeout",
        "health_check_interval",
        "s3_enabled",
        "s3_credentials",
        "s3_bucket",
        "s3_region",
        "s3_sync_writes",
        "s3_fill_local",
        "s3_timeout",
        "memcached_servers",
        "memcached_timeout",
        "memcached_ttl",
        "memcached_negative_ttl",
        "location_cache_size",
        "open_file_cache_size",
        "verify_on_read",
        "verify_on_read_max",
        "group_commit",
        "statsite",
        "secret",
    }
)


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


def _storage_pairs(value: object) -> tuple[tuple[str, ...], ...]:
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


def _regex(value: object) -> str | None:
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


def _parse_auth_env(text: str) -> tuple[Credential, ...]:
    """`STOR_BASIC_AUTH` is "user:pass", or a JSON list of them for several writers."""
    if text.lstrip().startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            raise ConfigError(f"{ENV_BASIC_AUTH} looks like a JSON list but does not parse") from None
        return _credentials(ENV_BASIC_AUTH, value)
    return (_credential(ENV_BASIC_AUTH, text),)


def _int(raw: Mapping[str, Any], key: str, default: int, *, minimum: int) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"'{key}' must be an integer number of bytes >= {minimum}, got {value!r}")
    return value


def _seconds(raw: Mapping[str, Any], key: str, default: float, *, maximum: float) -> float:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= maximum:
        raise ConfigError(f"'{key}' must be a number of seconds in (0, {maximum}], got {value!r}")
    return float(value)


def _bool(raw: Mapping[str, Any], key: str, default: bool) -> bool:
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"'{key}' must be true or false, got {value!r}")
    return value


def _str(raw: Mapping[str, Any], key: str, default: Any) -> Any:
    value = raw.get(key, default)
    if value is not default and not (isinstance(value, str) and value):
        raise ConfigError(f"'{key}' must be a non-empty string, got {value!r}")
    return value


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


def _statsite(value: object) -> StatsiteSettings | None:
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
