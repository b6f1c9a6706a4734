"""AMQP URIs as the RabbitMQ URI spec and Stor 1.5 read them (`rabbitmq_uri`, `events.amqp_uri`):
`amqp[s]://user:pass@host:port/vhost` with Stor's optional `exchange`, `routing_key` and
`heartbeat` query parameters. Errors name the config key; passwords are never shown."""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

from stor.errors import ConfigError


@dataclass(frozen=True)
class AmqpTarget:
    """A broker and where on it to publish: Stor's `rabbitmq_uri`, or `events.amqp_uri`."""

    url: str
    """The connection URL, without stor's query parameters (the broker's own, e.g. `heartbeat`, kept)."""
    exchange: str
    routing_key: str
    heartbeat: int

    def __repr__(self) -> str:
        return f"AmqpTarget(url={without_password(self.url)!r}, exchange={self.exchange!r})"


PARAMS = frozenset({"exchange", "routing_key", "heartbeat"})


def parse_amqp(key: str, text: object, *, exchange: str, routing_key: str = "sha") -> AmqpTarget:
    """An AMQP URI as the RabbitMQ URI spec and Stor read it: `amqp[s]://user:pass@host:port/vhost`
    with optional `exchange`, `routing_key` and `heartbeat` (seconds) query parameters."""
    if not isinstance(text, str) or not text:
        raise ConfigError(f"'{key}' must be an amqp:// or amqps:// URI, got {type(text).__name__}")
    parts = urllib.parse.urlsplit(text)
    shown = without_password(text)
    if parts.scheme not in ("amqp", "amqps"):
        raise ConfigError(f"'{key}' must be an amqp:// or amqps:// URI, got {shown!r}")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"'{key}' has a bad port: {shown!r}") from None
    if not parts.hostname or (port is not None and not 0 < port < 65536):
        raise ConfigError(f"'{key}' must name a host (and a port from 1 to 65535): {shown!r}")
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(query) - PARAMS)
    if unknown:
        raise ConfigError(f"'{key}': unknown query parameter {unknown[0]!r} (known: {', '.join(sorted(PARAMS))})")
    values = {name: query[name][-1] for name in query}
    heartbeat = values.get("heartbeat", "60")
    if not heartbeat.isdigit():
        raise ConfigError(f"'{key}': heartbeat must be a number of seconds, got {heartbeat!r}")
    for name in ("exchange", "routing_key"):
        if name in values and not values[name]:
            raise ConfigError(f"'{key}': {name} must not be empty")
    url = urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, f"heartbeat={heartbeat}", ""))
    return AmqpTarget(url, values.get("exchange", exchange), values.get("routing_key", routing_key), int(heartbeat))


def without_password(text: str) -> str:
    parts = urllib.parse.urlsplit(text)
    if parts.password is None:
        return text
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
