"""Metrics as domain events. The service and the HTTP layer report what happened; each
implementation names it its own way (Stor's statsd names, Prometheus families).

Every method must be cheap and must never raise: metrics are never a reason to fail a request.
Implementations are safe to call from several threads.
"""

from __future__ import annotations

from typing import Protocol


class Metrics(Protocol):
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
        """One HTTP request finished: its method, route (`blob`, `status`, `file`, …, `other`),
        status, duration and body bytes each way; for a blob served, `source`, the path of the
        copy that answered (`s3://…` for S3)."""

    def cache(self, result: str, seconds: float, count: int = 1) -> None:
        """Where a blob's location came from (`count` times): `kept` (a copy kept open),
        `local` (this process's near cache), `hit` (memcached) — each a hit in Stor's sense,
        the location known without probing the disks — or `miss` (the disks are probed),
        `negative`, `stale` or `error`."""

    def lookup(self, seconds: float, attempts: int) -> None:
        """A probe of the disks for a blob (after a cache miss), and how many disks it asked."""

    def disk_read(self, disk: str, size: int, seconds: float) -> None:
        """Bytes read from a disk for a GET."""

    def healthcheck(self) -> None:
        """`/status` was asked."""

    def s3(self, operation: str, ok: bool, seconds: float) -> None:
        """One S3 call (`put`, `get`, `head`) and whether it succeeded."""

    def s3_backlog(self, blobs: int) -> None:
        """Blobs waiting in the durable S3 upload queue."""

    def integrity(self, event: str) -> None:
        """An integrity event: `s3_corrupt` (an S3 object failed its hash), …"""

    def upload_refused(self, reason: str) -> None:
        """An upload refused for load: `shed` (the worker had `max_uploads_in_flight` already:
        503) or `slow` (its body crawled below `min_upload_rate`: 408)."""

    def dropped(self, what: str, count: int) -> None:
        """Hints dropped (`rabbitmq`: requested shas the buffer could not hold for the broker)."""

    def events_backlog(self, events: int, oldest_age: float) -> None:
        """Lifecycle events waiting in the durable outbox, and the oldest one's age (seconds)."""

    def close(self) -> None:
        """Release sockets; called once at shutdown."""


class NullMetrics:
    """Records nothing: the default when no metrics are configured."""

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
        pass

    def cache(self, result: str, seconds: float, count: int = 1) -> None:
        pass

    def lookup(self, seconds: float, attempts: int) -> None:
        pass

    def disk_read(self, disk: str, size: int, seconds: float) -> None:
        pass

    def healthcheck(self) -> None:
        pass

    def s3(self, operation: str, ok: bool, seconds: float) -> None:
        pass

    def s3_backlog(self, blobs: int) -> None:
        pass

    def integrity(self, event: str) -> None:
        pass

    def upload_refused(self, reason: str) -> None:
        pass

    def dropped(self, what: str, count: int) -> None:
        pass

    def events_backlog(self, events: int, oldest_age: float) -> None:
        pass

    def close(self) -> None:
        pass


class FanoutMetrics:
    """Sends every event to several implementations (statsd and Prometheus at once)."""

    def __init__(self, *targets: Metrics) -> None:
        self.targets = targets

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
        for target in self.targets:
            target.request(method, route, status, seconds, bytes_in, bytes_out, source)

    def cache(self, result: str, seconds: float, count: int = 1) -> None:
        for target in self.targets:
            target.cache(result, seconds, count)

    def lookup(self, seconds: float, attempts: int) -> None:
        for target in self.targets:
            target.lookup(seconds, attempts)

    def disk_read(self, disk: str, size: int, seconds: float) -> None:
        for target in self.targets:
            target.disk_read(disk, size, seconds)

    def healthcheck(self) -> None:
        for target in self.targets:
            target.healthcheck()

    def s3(self, operation: str, ok: bool, seconds: float) -> None:
        for target in self.targets:
            target.s3(operation, ok, seconds)

    def s3_backlog(self, blobs: int) -> None:
        for target in self.targets:
            target.s3_backlog(blobs)

    def integrity(self, event: str) -> None:
        for target in self.targets:
            target.integrity(event)

    def upload_refused(self, reason: str) -> None:
        for target in self.targets:
            target.upload_refused(reason)

    def dropped(self, what: str, count: int) -> None:
        for target in self.targets:
            target.dropped(what, count)

    def events_backlog(self, events: int, oldest_age: float) -> None:
        for target in self.targets:
            target.events_backlog(events, oldest_age)

    def close(self) -> None:
        for target in self.targets:
            target.close()
