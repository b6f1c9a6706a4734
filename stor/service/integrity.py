"""Integrity: what happens when a copy is found bad or missing. The copy is counted, moved to
quarantine with a note (one schema, for the server and `stor scrub` alike), forgotten by the
caches, and a re-copy is requested from the `Healer`.

The healer re-copies blobs from a good copy in the background. Requests come from worker
threads (where corruption is found) and are served one at a time by a single task on the
event loop, so a storm of bad copies can neither exhaust threads nor grow memory: at most
`max_pending` shas wait; more are dropped (and counted), left to `stor scrub --repair`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable

from stor.backends.disk import Disk
from stor.backends.openfiles import OpenFiles
from stor.digest import Sha
from stor.errors import InsufficientStorage, StorageUnavailable
from stor.metrics import Metrics
from stor.model import BlobStat
from stor.service.events import EventLog, NoEvents
from stor.service.nearcache import NearCache

log = logging.getLogger(__name__)

Heal = Callable[[Sha], Awaitable[None]]


def quarantine_note(sha: Sha, *, actual: str | None, size: int, mtime_ns: int, found_by: str) -> dict[str, object]:
    """The JSON note beside a quarantined copy: what it should have been, what it was."""
    return {
        "expected": sha,
        "actual": actual,
        "size": size,
        "mtime_ns": mtime_ns,
        "found_by": found_by,
        "time": time.time(),
    }


class Integrity:
    """Bad and missing copies, as the read path finds them (from worker threads and the loop)."""

    def __init__(
        self, metrics: Metrics, near: NearCache, open_files: OpenFiles, healer: Healer, events: EventLog | None = None
    ) -> None:
        self.metrics = metrics
        self.near = near
        self.open_files = open_files
        self.healer = healer
        self.events: EventLog = events or NoEvents()

    def corrupt(self, disk: Disk, sha: Sha, stat: BlobStat, actual: str, size: int) -> None:
        """A copy failed verification: count it, quarantine it, and ask for a re-copy."""
        self.metrics.integrity("corrupt_copy")
        note = quarantine_note(sha, actual=actual, size=size, mtime_ns=stat.mtime_ns, found_by="read")
        try:
            moved = disk.quarantine.move(sha, note)
        except (StorageUnavailable, InsufficientStorage) as exc:
            self.metrics.integrity("quarantine_failed")
            log.error("corrupt copy %s (sha256 %s) could not be quarantined: %s", stat.path, actual, exc)
        else:
            log.error("corrupt copy %s (sha256 %s, %d bytes) quarantined to %s", stat.path, actual, size, moved)
            self.events.note("blob.quarantined", sha=sha, size=stat.size, reason=f"{disk.root}: sha256 is {actual}")
        self.near.forget(sha)
        self.open_files.forget(sha)
        self.heal(sha)

    def missing_copy(self, disk: Disk, partner: Disk, sha: Sha) -> None:
        log.warning("%s has a copy on %s but none on %s: healing", sha, disk.root, partner.root)
        self.metrics.integrity("missing_copy")
        self.heal(sha)

    def heal(self, sha: Sha) -> None:
        if not self.healer.request(sha):
            self.metrics.integrity("heal_dropped")

    def s3_corrupt(self, actual: str, size: int) -> None:
        self.metrics.integrity("s3_corrupt")
        log.error("the S3 copy of a blob is corrupt: sha256 %s, %d bytes; not served", actual, size)


class Healer:
    def __init__(self, *, max_pending: int = 1000) -> None:
        self._max_pending = max_pending
        self._queue: deque[Sha] = deque()
        self._queued: set[Sha] = set()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self.dropped = 0

    def request(self, sha: Sha) -> bool:
        """Ask for `sha` to be healed (from any thread). False if the queue is full."""
        with self._lock:
            if sha in self._queued:
                return True
            if len(self._queue) >= self._max_pending:
                self.dropped += 1
                return False
            self._queue.append(sha)
            self._queued.add(sha)
        if self._loop is not None and self._wake is not None:
            self._loop.call_soon_threadsafe(self._wake.set)
        return True

    async def run(self, heal: Heal) -> None:
        """Heal requests one at a time with `heal`, until cancelled."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        while True:
            sha = self._next()
            if sha is None:
                await self._wake.wait()
                self._wake.clear()
                continue
            try:
                await heal(sha)
            except Exception as exc:  # one failed heal must not stop the others
                log.warning("healing %s failed: %s", sha, exc)

    def _next(self) -> Sha | None:
        with self._lock:
            if not self._queue:
                return None
            sha = self._queue.popleft()
            self._queued.discard(sha)
            return sha
