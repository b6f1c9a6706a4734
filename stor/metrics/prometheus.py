"""Prometheus metrics for `/metrics`. The only module that imports `prometheus_client`.

With several workers (`PROMETHEUS_MULTIPROC_DIR` set, as `stor serve --workers N` does) the
counters and histograms of every worker are summed at scrape time; disk gauges come from the
answering worker's latest health probe. There every update of a value is a write into a
shared file mapping, which cost about a tenth of a small GET's CPU here; so the per-request
events are tallied in memory and added to the shared values about once a second (`_Tally`):
a scrape sees the other workers' requests up to a second late, its own at once.
"""

from __future__ import annotations

import bisect
import os
import platform
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from stor import __version__
from stor.threads import start_thread

ENV_MULTIPROC = "PROMETHEUS_MULTIPROC_DIR"


@dataclass(frozen=True)
class DiskGauge:
    path: str
    up: bool
    free_bytes: int
    total_bytes: int


class _BuildInfo(Collector):
    """`stor_build_info{version, python}` 1: which stor answers, for dashboards and alerts."""

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("stor_build_info", "The stor version serving", labels=["version", "python"])
        info.add_metric([__version__, platform.python_version()], 1)
        yield info


class _DiskCollector(Collector):
    def __init__(
        self,
        disks: Callable[[], Iterable[DiskGauge]],
        scrubs: Callable[[], Iterable[dict[str, object]]],
        running: Callable[[], Iterable[dict[str, object]]],
    ) -> None:
        self._disks = disks
        self._scrubs = scrubs
        self._running = running

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("stor_disk_up", "1 if the disk passed its last health probe", labels=["disk"])
        free = GaugeMetricFamily("stor_disk_free_bytes", "Free bytes at the last health probe", labels=["disk"])
        total = GaugeMetricFamily("stor_disk_total_bytes", "Size in bytes at the last health probe", labels=["disk"])
        for disk in self._disks():
            up.add_metric([disk.path], 1.0 if disk.up else 0.0)
            free.add_metric([disk.path], disk.free_bytes)
            total.add_metric([disk.path], disk.total_bytes)
        yield from (up, free, total)
        finished = GaugeMetricFamily("stor_scrub_finished_timestamp_seconds", "End of the last scrub", labels=["pair"])
        left = GaugeMetricFamily("stor_scrub_damage_left", "Damage the last scrub left unrepaired", labels=["pair"])
        for run in self._scrubs():
            pair = str(run.get("pair", ""))
            finished.add_metric([pair], float(run.get("finished") or 0))  # type: ignore[arg-type]
            left.add_metric([pair], float(run.get("damage_left") or 0))  # type: ignore[arg-type]
        yield from (finished, left)
        yield from _running_gauges(self._running())


_RUNNING_GAUGES = {
    "fraction": ("stor_scrub_progress_ratio", "Share of the sha space a running scrub has walked"),
    "eta_seconds": ("stor_scrub_eta_seconds", "A running scrub's estimate of the time it has left"),
    "full_redundancy_eta_seconds": (
        "stor_pair_full_redundancy_eta_seconds",
        "A repairing scrub's estimate of the time until the pair holds both copies of everything",
    ),
    "missing": ("stor_scrub_missing_copies", "Copies a running scrub found missing so far"),
    "repaired": ("stor_scrub_repaired_copies", "Copies a running scrub wrote back so far"),
}


def _running_gauges(running: Iterable[dict[str, object]]) -> Iterator[Metric]:
    """The scrubs under way (`stor scrub` writes its progress; see `scrubstate`), one sample
    per pair being scrubbed; none when no scrub runs."""
    families = {key: GaugeMetricFamily(name, text, labels=["pair"]) for key, (name, text) in _RUNNING_GAUGES.items()}
    for progress in running:
        for key, family in families.items():
            value = progress.get(key)
            if isinstance(value, int | float):
                family.add_metric([str(progress.get("pair", ""))], float(value))
    yield from families.values()


FLUSH_INTERVAL = 1.0


class _Tally:
    """Increments and observations kept in memory until `flush` adds them to their values:
    one write per value per flush instead of one per event. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[Any, float] = {}
        self._observed: dict[Any, list[float]] = {}

    def inc(self, child: Any, amount: float = 1.0) -> None:
        with self._lock:
            self._counts[child] = self._counts.get(child, 0.0) + amount

    def observe(self, child: Any, value: float) -> None:
        with self._lock:
            self._observed.setdefault(child, []).append(value)

    def request(self, children: tuple[Any, Any, Any, Any], seconds: float, bytes_in: int, bytes_out: int) -> None:
        """A request's four updates under one lock (`PrometheusMetrics.request`)."""
        count, latency, received, sent = children
        with self._lock:
            counts = self._counts  # under the lock: `flush` swaps it
            counts[count] = counts.get(count, 0.0) + 1
            self._observed.setdefault(latency, []).append(seconds)
            if bytes_in:
                counts[received] = counts.get(received, 0.0) + bytes_in
            if bytes_out:
                counts[sent] = counts.get(sent, 0.0) + bytes_out

    def flush(self) -> None:
        with self._lock:
            counts, self._counts = self._counts, {}
            observed, self._observed = self._observed, {}
        for child, amount in counts.items():
            child.inc(amount)
        for child, values in observed.items():
            _observe_all(child, values)


def _observe_all(histogram: Any, values: list[float]) -> None:
    """`histogram.observe(v)` for every value, with one write per bucket."""
    bounds, buckets, total = (getattr(histogram, name, None) for name in ("_upper_bounds", "_buckets", "_sum"))
    if bounds is None or buckets is None or total is None:  # not the prometheus_client we know: the slow way
        for value in values:
            histogram.observe(value)
        return
    counts: dict[int, int] = {}
    for value in values:
        index = bisect.bisect_left(bounds, value)  # the first bucket whose bound is >= value
        counts[index] = counts.get(index, 0) + 1
    for index, count in counts.items():
        buckets[index].inc(count)
    total.inc(sum(values))


class _Direct:
    """`_Tally`'s interface, writing at once (one process: its values are plain memory)."""

    @staticmethod
    def inc(child: Any, amount: float = 1.0) -> None:
        child.inc(amount)

    @staticmethod
    def observe(child: Any, value: float) -> None:
        child.observe(value)

    @staticmethod
    def request(children: tuple[Any, Any, Any, Any], seconds: float, bytes_in: int, bytes_out: int) -> None:
        count, latency, received, sent = children
        count.inc()
        latency.observe(seconds)
        if bytes_in:
            received.inc(bytes_in)
        if bytes_out:
            sent.inc(bytes_out)

    def flush(self) -> None:
        pass


class PrometheusMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(
        self,
        disks: Callable[[], Iterable[DiskGauge]],
        scrubs: Callable[[], Iterable[dict[str, object]]] = list,
        running: Callable[[], Iterable[dict[str, object]]] = list,
    ) -> None:
        self.registry = CollectorRegistry()
        self._disk_collector = _DiskCollector(disks, scrubs, running)
        self.registry.register(self._disk_collector)
        self.registry.register(_BuildInfo())
        self.registry.register(PROCESS_COLLECTOR)  # process_cpu_seconds_total, resident memory, open fds
        r = self.registry
        self._requests = Counter("stor_http_requests", "HTTP requests", ["route", "method", "status"], registry=r)
        self._latency = Histogram(
            "stor_http_request_duration_seconds",
            "Time to answer an HTTP request",
            ["route", "method"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self._bytes_in = Counter("stor_http_received_bytes", "Request body bytes received", ["route"], registry=r)
        self._bytes_out = Counter("stor_http_sent_bytes", "Response body bytes sent", ["route"], registry=r)
        self._cache = Counter("stor_cache_lookups", "Location cache lookups by result", ["result"], registry=r)
        self._lookup = Histogram("stor_lookup_duration_seconds", "Time to find a blob on the disks", registry=r)
        self._attempts = Counter("stor_lookup_disk_probes", "Disks probed by lookups", registry=r)
        self._disk_read = Counter("stor_disk_read_bytes", "Bytes read from disk for GETs", ["disk"], registry=r)
        self._health = Counter("stor_healthchecks", "Requests to /status", registry=r)
        self._s3 = Counter("stor_s3_requests", "S3 calls by operation and result", ["operation", "result"], registry=r)
        self._s3_backlog = Gauge(
            "stor_s3_queue_blobs", "Blobs waiting to be mirrored to S3", registry=r, multiprocess_mode="livemax"
        )
        self._children: dict[tuple[str, str, int], tuple[Any, Any, Any, Any]] = {}
        self._labelled: dict[tuple[int, str], Any] = {}
        self._integrity = Counter("stor_integrity_events", "Corrupt or lost copies found", ["event"], registry=r)
        self._refused = Counter(
            "stor_uploads_refused", "Uploads refused for load (shed: 503; slow: 408)", ["reason"], registry=r
        )
        self._dropped = Counter("stor_hints_dropped", "Hints dropped (rabbitmq: requested shas)", ["what"], registry=r)
        self._events_backlog = Gauge(
            "stor_events_outbox", "Lifecycle events waiting to be published", registry=r, multiprocess_mode="livemax"
        )
        self._events_age = Gauge(
            "stor_events_oldest_age_seconds",
            "Age of the oldest unpublished event",
            registry=r,
            multiprocess_mode="livemax",
        )
        self._tally: _Tally | _Direct = _Tally() if os.environ.get(ENV_MULTIPROC) else _Direct()
        self._flusher: threading.Thread | None = None
        self._closed = threading.Event()

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
        key = (route, method, status)
        children = self._children.get(key)
        if children is None:  # labels() validates and takes the family's lock: once per combination
            children = self._children.setdefault(
                key,
                (
                    self._requests.labels(route, method, str(status)),
                    self._latency.labels(route, method),
                    self._bytes_in.labels(route),
                    self._bytes_out.labels(route),
                ),
            )
        tally = self._tally
        tally.request(children, seconds, bytes_in, bytes_out)
        if self._flusher is None and isinstance(tally, _Tally):
            self._flusher = start_thread(self._flush_every_second, "stor-metrics")

    def _flush_every_second(self) -> None:
        while not self._closed.wait(FLUSH_INTERVAL):
            self._tally.flush()

    def cache(self, result: str, seconds: float, count: int = 1) -> None:
        self._tally.inc(self._child(self._cache, result), count)

    def lookup(self, seconds: float, attempts: int) -> None:
        self._tally.observe(self._lookup, seconds)
        self._tally.inc(self._attempts, attempts)

    def disk_read(self, disk: str, size: int, seconds: float) -> None:
        self._tally.inc(self._child(self._disk_read, disk), size)

    def _child(self, family: Any, label: str) -> Any:
        """`family.labels(label)`, looked up once: labels() validates and locks every call."""
        child = self._labelled.get((id(family), label))
        if child is None:
            child = self._labelled.setdefault((id(family), label), family.labels(label))
        return child

    def healthcheck(self) -> None:
        self._health.inc()

    def s3(self, operation: str, ok: bool, seconds: float) -> None:
        self._s3.labels(operation, "ok" if ok else "error").inc()

    def s3_backlog(self, blobs: int) -> None:
        self._s3_backlog.set(blobs)

    def integrity(self, event: str) -> None:
        self._integrity.labels(event).inc()

    def upload_refused(self, reason: str) -> None:
        self._refused.labels(reason).inc()

    def dropped(self, what: str, count: int) -> None:
        self._dropped.labels(what).inc(count)

    def events_backlog(self, events: int, oldest_age: float) -> None:
        self._events_backlog.set(events)
        self._events_age.set(oldest_age)

    def close(self) -> None:
        self._closed.set()
        self._tally.flush()

    def render(self) -> bytes:
        """The text exposition format, summed over workers in multiprocess mode."""
        self._tally.flush()
        if not os.environ.get(ENV_MULTIPROC):
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        registry.register(self._disk_collector)
        registry.register(_BuildInfo())
        registry.register(PROCESS_COLLECTOR)  # of the worker that answers the scrape
        return generate_latest(registry)
