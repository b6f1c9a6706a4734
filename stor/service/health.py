"""Disk health, probed in threads with a deadline, so `/status` answers even when a disk hangs.

Each disk has at most one probe in flight: a hung disk ties up one thread, never more, and
its probe counts as failed once the deadline passes. When the hung probe finally returns, its
result is recorded like any other.

A disk whose probe outran the deadline, or on which a request's operation has run for
`STALLED_AFTER`, is not `responsive`: lookups skip it (answering 503 rather than a false 404
when the blob is nowhere else) and placement gives it no writes, so requests for healthy
pairs are not queued behind it. `Disk.inflight` bounds the threads it can hold meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import time
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import replace

from stor.backends.disk import Disk
from stor.backends.pairs import Pair
from stor.model import DiskHealth
from stor.threads import thread_pool

PROBE_THREADS = 8
"""Threads probing disks at least (one per disk with more disks), so a few hung disks hold none
of the others' probes."""
RECHECK_AFTER = 1.0
"""`pair_healthy_now` probes a disk again only when its last probe started this long ago."""

STALLED_AFTER = 10.0
"""A request's disk operation running this long marks the disk as not responding. Longer than
the probe deadline: a real operation (the fsync of a large file on a busy disk) may take
seconds without the disk being hung."""


class HealthMonitor:
    def __init__(self, disks: list[Disk], *, timeout: float) -> None:
        self.disks = disks
        self.timeout = timeout
        self._executor: ThreadPoolExecutor | None = None
        self._inflight: dict[str, Future[DiskHealth]] = {}
        self._started: dict[str, float] = {}
        self._last: dict[str, DiskHealth] = {}
        self._lock = threading.Lock()

    def add(self, disks: list[Disk]) -> None:
        """Disks added at run time (a config reload)."""
        self.disks = [*self.disks, *disks]

    async def check(self) -> list[DiskHealth]:
        """Probe every disk now; a probe that misses the deadline reports the disk as hung."""
        futures = [self._probe(disk) for disk in self.disks]
        waiting = [asyncio.wrap_future(f) for f in futures]
        await asyncio.wait(waiting, timeout=self.timeout)
        return [self._result(disk, fut) for disk, fut in zip(self.disks, futures, strict=True)]

    def healthy(self, disk: Disk) -> bool:
        """Fit for writes: the last probe passed and nothing is stuck on the disk now."""
        last = self._last.get(disk.root)
        return (last is None or last.ok) and self.responsive(disk)

    def responsive(self, disk: Disk) -> bool:
        """Fit to be asked at all: no operation on it, probe or request, has outrun the
        deadline. A read-only or full disk is unhealthy but still responsive."""
        if disk.stalled(STALLED_AFTER):
            return False
        probe = self._inflight.get(disk.root)
        started = self._started.get(disk.root, 0.0)
        return probe is None or probe.done() or time.monotonic() - started <= self.timeout

    def pair_healthy(self, pair: Pair) -> bool:
        return all(self.healthy(disk) for disk in pair.members)

    def pair_healthy_now(self, pair: Pair) -> bool:
        """Blocking: `pair_healthy`, with each member its last probe failed probed again first
        (at most once per `RECHECK_AFTER`, within the deadline). A disk just put in place of a
        dead one is then written to at once, not only after the next health check: the heal
        of a blob whose partner survived waits for no probe, and puts no fresh pair of copies
        on another pair."""
        for disk in pair.members:
            if self.healthy(disk) or not self.responsive(disk):
                continue
            if time.monotonic() - self._started.get(disk.root, 0.0) < RECHECK_AFTER:
                continue
            with contextlib.suppress(TimeoutError, CancelledError, OSError):
                self._probe(disk).result(timeout=self.timeout)
        return self.pair_healthy(pair)

    def last(self, disk: Disk) -> DiskHealth | None:
        return self._last.get(disk.root)

    def close(self) -> None:
        """Stop probing (a hung probe's thread is abandoned); `check` starts afresh."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
            self._inflight.clear()

    def _probe(self, disk: Disk) -> Future[DiskHealth]:
        with self._lock:  # the loop's health checks, and `pair_healthy_now` in worker threads
            running = self._inflight.get(disk.root)
            if running is not None and not running.done():
                return running
            if self._executor is None:
                self._executor = thread_pool(max(PROBE_THREADS, len(self.disks)), "stor-health")
            future = self._executor.submit(disk.probe_health)
            self._inflight[disk.root] = future
            self._started[disk.root] = time.monotonic()
        future.add_done_callback(functools.partial(self._record, disk.root))
        return future

    def _record(self, root: str, future: Future[DiskHealth]) -> None:
        if not future.cancelled() and future.exception() is None:
            self._last[root] = future.result()

    def _result(self, disk: Disk, future: Future[DiskHealth]) -> DiskHealth:
        if future.done() and not future.cancelled() and future.exception() is None:
            return future.result()
        waited = time.monotonic() - self._started.get(disk.root, time.monotonic())
        error = f"health check has not finished after {waited:.1f}s (disk hung?)"
        if future.done():
            error = f"health check failed: {future.exception()!r}"
        previous = self._last.get(disk.root)
        hung = DiskHealth(disk.root, False, False, False, 0, 0, error, disk.io_errors)
        if previous is not None:
            hung = replace(previous, ok=False, writable=False, readable=False, error=error, io_errors=disk.io_errors)
        self._last[disk.root] = hung
        return hung
