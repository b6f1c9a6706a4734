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

    def request(
        self, method: str, outcome: str, route: str, status: int, seconds: float, bytes_in: int, bytes_out: int
    ) -> None:
        self._client.incr(f"request.{method.lower()}.count", rate=self._rate)
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
