"""statsd (statsite) metrics under Stor's names. The only module that imports `statsd`.

Counters are added up in memory and sent once a second (`name:N|c`), not one UDP packet per
event: a hot GET counts three things (`request.get.count`, `success.get.ok.count`,
`cache.hit`), and a send costs more than the answer itself. Timings are sent as they happen,
with `sample_rate`, as Stor did (a read answered from the page cache on the event loop takes
no time worth sending).
"""

from __future__ import annotations

import re
import socket
import threading

import statsd

from stor.config import StatsiteSettings
from stor.errors import ConfigError
from stor.threads import start_thread


class StatsdMetrics:
    """Stor's names: `request.<method>.count`, `<outcome>.count` (`success.get.ok.count`,
    `error.post.bad_sha.count`, …), `cache.hit`/`cache.miss`/`cache.time`, `lookup.time`,
    `lookup.attempt.<n>.count`, `success.get.ok.size`/`.time`, `healthcheck.count`; and ours:
    `cache.error`, `cache.stale`, `cache.negative`, `s3.<op>.ok|error.count`, `s3.<op>.time`,
    `s3.queue.backlog`, `integrity.<event>.count`. Stor 1.5.2's names too:
    `success.get.ok_old.<server>.count|size|time` per storage directory, `success.get.ok_hcp.*`
    for S3, `error.get.not_found_old.count`, `error.get.not_found_hcp.count` (with S3),
    `error.get.500.count`, `error.post.unknown.count`. Sends are UDP, fire and forget."""

    def __init__(self, settings: StatsiteSettings, *, flush_interval: float = 1.0, s3: bool = False) -> None:
        try:
            self._client = statsd.StatsClient(settings.host, settings.port, prefix=settings.prefix or None)
        except socket.gaierror as exc:
            raise ConfigError(f"'statsite.host' {settings.host!r} does not resolve: {exc.strerror}") from None
        self._rate = settings.sample_rate
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._interval = flush_interval
        self._flusher: threading.Thread | None = None
        self._s3 = s3
        self._names: dict[str, tuple[str, str, str]] = {}

    def request(
        self,
        method: str,
        route: str,
        status: int,
        seconds: float,
        bytes_in: int,
        bytes_out: int,
        source: str | None = None,
    ) -> None:
        outcome = stor_outcome(method, route, status)
        names = self._served_names(source) if source is not None and outcome == "success.get.ok" else None
        with self._lock:
            counts = self._counts
            name = _REQUEST_NAMES.get(method) or f"request.{method.lower()}.count"
            counts[name] = counts.get(name, 0) + 1
            if outcome:
                name = f"{outcome}.count"
                counts[name] = counts.get(name, 0) + 1
                for also in _STOR_15_ALSO.get(outcome, ()):
                    if also != _NOT_FOUND_HCP or self._s3:
                        counts[also] = counts.get(also, 0) + 1
            if names is not None:
                counts[names[0]] = counts.get(names[0], 0) + 1
                if bytes_out:
                    counts[names[1]] = counts.get(names[1], 0) + bytes_out
        if self._flusher is None:
            self._start_flusher()
        if names is not None and seconds >= TIMED_SECONDS:  # an answer made on the spot: no time worth sending
            self._client.timing(names[2], seconds * 1000, rate=self._rate)

    def _served_names(self, source: str) -> tuple[str, str, str]:
        """Stor 1.5.2's names for a read served from `source`: `success.get.ok_old.<server>.*`
        for a disk copy (`<server>`: its storage directory, `/mnt/data1` → `mnt-data1`),
        `success.get.ok_hcp.*` for S3."""
        root = "s3" if source.startswith("s3://") else source.rsplit("/", 4)[0]
        names = self._names.get(root)
        if names is None:
            stem = "success.get.ok_hcp" if root == "s3" else f"success.get.ok_old.{server_name(root)}"
            names = self._names[root] = (f"{stem}.count", f"{stem}.size", f"{stem}.time")
        return names

    def cache(self, result: str, seconds: float, count: int = 1) -> None:
        self._count(f"cache.{_STOR_CACHE.get(result, result)}", count)
        if seconds:
            self._client.timing("cache.time", seconds * 1000, rate=self._rate)

    def lookup(self, seconds: float, attempts: int) -> None:
        self._client.timing("lookup.time", seconds * 1000, rate=self._rate)  # a miss: not every request
        self._count(f"lookup.attempt.{attempts}.count")

    def disk_read(self, disk: str, size: int, seconds: float) -> None:
        self._count("success.get.ok.size", size)
        if seconds:
            self._client.timing("success.get.ok.time", seconds * 1000, rate=self._rate)

    def healthcheck(self) -> None:
        self._count("healthcheck.count")

    def s3(self, operation: str, ok: bool, seconds: float) -> None:
        self._count(f"s3.{operation}.{'ok' if ok else 'error'}.count")
        self._client.timing(f"s3.{operation}.time", seconds * 1000, rate=self._rate)

    def s3_backlog(self, blobs: int) -> None:
        self._client.gauge("s3.queue.backlog", blobs)

    def integrity(self, event: str) -> None:
        self._count(f"integrity.{event}.count")

    def upload_refused(self, reason: str) -> None:
        self._count(f"error.post.{reason}.count")

    def dropped(self, what: str, count: int) -> None:
        self._count(f"{what}.dropped.count", count)

    def events_backlog(self, events: int, oldest_age: float) -> None:
        self._client.gauge("events.outbox.backlog", events)
        self._client.gauge("events.outbox.oldest_age", oldest_age)

    def close(self) -> None:
        self._closed.set()
        self.flush()
        self._client.close()

    def flush(self) -> None:
        """Send the counts added up since the last flush, one line per name."""
        with self._lock:
            counts, self._counts = self._counts, {}
        for name, count in counts.items():
            self._client.incr(name, count)

    def _count(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._counts[name] = self._counts.get(name, 0) + amount
        if self._flusher is None:
            self._start_flusher()

    def _start_flusher(self) -> None:
        with self._lock:
            if self._flusher is not None:
                return
            self._flusher = start_thread(self._flush_every_interval, "stor-statsd")

    def _flush_every_interval(self) -> None:
        while not self._closed.wait(self._interval):
            self.flush()


_REQUEST_NAMES = {m: f"request.{m.lower()}.count" for m in ("GET", "HEAD", "POST", "PUT", "DELETE")}
_STOR_CACHE = {"kept": "hit", "local": "hit"}
"""Our cache results in Stor's names: a location known without probing the disks is a hit."""

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


TIMED_SECONDS = 0.001
"""Reads answered faster than this (on the event loop) send no timing: one UDP packet would cost
more than the answer."""
_NOT_FOUND_HCP = "error.get.not_found_hcp.count"
_STOR_15_ALSO = {
    "error.get.not_found": ("error.get.not_found_old.count", _NOT_FOUND_HCP),
    "error.get.unavailable": ("error.get.500.count",),
    "error.get.500": ("error.get.500.count",),
    "error.post.500": ("error.post.unknown.count",),
}
"""Stor 1.5.2's names sent beside 0.6's: a miss on the disks (`_old`) and, with S3, on HCP (its
S3); a failed read or write (`not_found_hcp` only when S3 is on)."""


def server_name(root: str) -> str:
    """Stor 1.5.2's `<server>` in `success.get.ok_old.<server>`: the storage directory with each
    run of non-alphanumerics turned into `-`, and none at either end."""
    return re.sub(r"[^A-Za-z0-9]+", "-", root).strip("-")


def stor_outcome(method: str, route: str, status: int) -> str:
    """Stor's statsd name for a blob request's result (PUT counts as post, HEAD as get); ""
    for the other routes."""
    verb = {"GET": "get", "HEAD": "get", "POST": "post", "PUT": "post"}.get(method)
    if verb is None or route not in ("blob", "other"):
        return ""
    if route == "other" and status in (400, 404):
        return f"error.{verb}.malformed_sha"
    return _OUTCOMES.get((verb, status), f"error.{verb}.{'500' if status >= 500 else status}")
