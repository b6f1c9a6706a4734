"""statsd (statsite) metrics under Stor's names. The only module that imports `statsd`."""

from __future__ import annotations

import socket

import statsd

from stor.config import StatsiteSettings
from stor.errors import ConfigError


class StatsdMetrics:
    """Stor's names: `request.<method>.count`, `<outcome>.count` (`success.get.ok.count`,
    `error.post.bad_sha.count`, …), `cache.hit`/`cache.miss`/`cache.time`, `lookup.time`,
    `lookup.attempt.<n>.count`, `success.get.ok.size`/`.time`, `healthcheck.count`; and ours:
    `cache.error`, `cache.stale`, `cache.negative`, `s3.<op>.ok|error.count`, `s3.<op>.time`,
    `s3.queue.backlog`, `integrity.<event>.count`. Sends are UDP, fire and forget."""

    def __init__(self, settings: StatsiteSettings) -> None:
        try:
            self._client = statsd.StatsClient(settings.host, settings.port, prefix=settings.prefix or None)
        except socket.gaierror as exc:
            raise ConfigError(f"'statsite.host' {settings.host!r} does not resolve: {exc.strerror}") from None
        self._rate = settings.sample_rate

    def request(self, method: str, route: str, status: int, seconds: float, bytes_in: int, bytes_out: int) -> None:
        self._client.incr(f"request.{method.lower()}.count", rate=self._rate)
        outcome = stor_outcome(method, route, status)
        if outcome:
            self._client.incr(f"{outcome}.count", rate=self._rate)

    def cache(self, result: str, seconds: float) -> None:
        self._client.incr(f"cache.{result}", rate=self._rate)
        self._client.timing("cache.time", seconds * 1000, rate=self._rate)

    def lookup(self, seconds: float, attempts: int) -> None:
        self._client.timing("lookup.time", seconds * 1000, rate=self._rate)
        self._client.incr(f"lookup.attempt.{attempts}.count", rate=self._rate)

    def disk_read(self, disk: str, size: int, seconds: float) -> None:
        self._client.incr("success.get.ok.size", size, rate=self._rate)
        self._client.timing("success.get.ok.time", seconds * 1000, rate=self._rate)

    def healthcheck(self) -> None:
        self._client.incr("healthcheck.count", rate=self._rate)

    def s3(self, operation: str, ok: bool, seconds: float) -> None:
        self._client.incr(f"s3.{operation}.{'ok' if ok else 'error'}.count", rate=self._rate)
        self._client.timing(f"s3.{operation}.time", seconds * 1000, rate=self._rate)

    def s3_backlog(self, blobs: int) -> None:
        self._client.gauge("s3.queue.backlog", blobs)

    def integrity(self, event: str) -> None:
        self._client.incr(f"integrity.{event}.count")

    def close(self) -> None:
        self._client.close()


_OUTCOMES = {
    ("get", 200): "success.get.ok",
    ("get", 206): "success.get.ok",
    ("get", 304): "success.get.not_modified",
    ("get", 404): "error.get.not_found",
    ("get", 416): "error.get.range_not_satisfiable",
    ("get", 503): "error.get.unavailable",
    ("post", 201): "success.post.write",
    ("post", 200): "success.post.duplicate",
    ("post", 400): "error.post.malformed_sha",
    ("post", 401): "error.post.unauthorized",
    ("post", 408): "error.post.timeout",
    ("post", 412): "error.post.bad_sha",
    ("post", 413): "error.post.too_large",
    ("post", 503): "error.post.unavailable",
    ("post", 507): "error.post.no_space",
}


def stor_outcome(method: str, route: str, status: int) -> str:
    """Stor's statsd name for a blob request's result (PUT counts as post, HEAD as get); ""
    for the other routes."""
    verb = {"GET": "get", "HEAD": "get", "POST": "post", "PUT": "post"}.get(method)
    if verb is None or route not in ("blob", "other"):
        return ""
    if route == "other" and status in (400, 404):
        return f"error.{verb}.malformed_sha"
    return _OUTCOMES.get((verb, status), f"error.{verb}.{'500' if status >= 500 else status}")
