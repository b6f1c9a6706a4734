"""The S3 mirror worker: drains the durable queue into S3, retrying with backoff.

A local write never waits for it. It claims markers (see `backends/s3queue.py`), uploads each
blob from a local copy, and removes the marker only once S3 has the object. While S3 is down
the claimed markers back off exponentially (1 s doubling to 60 s); they survive restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from stor.backends.s3 import S3Store, S3Unavailable
from stor.backends.s3queue import Claim, S3Queue
from stor.digest import Sha
from stor.errors import BlobGone, StorError
from stor.metrics import Metrics
from stor.service.offload import Offload

log = logging.getLogger(__name__)

MAX_BACKOFF = 60.0
CHECK_INTERVAL = 10.0
BACKLOG_INTERVAL = 1.0
"""While the worker is busy, how often the backlog is counted (when idle, at every wait)."""
NOT_STORED_ATTEMPTS = 6
"""A marker is written before its blob's copies are linked, so a worker can find a marker
whose blob is not visible yet. Only after this many attempts (about a minute) is it dropped."""


@dataclass
class _Pending:
    claim: Claim
    attempts: int = 0
    due: float = 0.0


class S3Mirror:
    def __init__(
        self,
        store: S3Store,
        queue: S3Queue,
        offload: Offload,
        metrics: Metrics,
        *,
        concurrency: int = 4,
        max_claimed: int = 256,
    ) -> None:
        self.store = store
        self.queue = queue
        self._locate: Callable[[Sha], str | None] = lambda sha: None
        self._offload = offload
        self._metrics = metrics
        self._concurrency = concurrency
        self._max_claimed = max_claimed
        self._pending: dict[Sha, _Pending] = {}
        self._wake = asyncio.Event()
        self.reachable: bool | None = None
        self.last_error: str | None = None
        self.backlog = 0
        self._backlog_at = 0.0

    def notify(self) -> None:
        """A marker was just enqueued: start on it now rather than at the next poll."""
        self._wake.set()

    async def run(self, locate: Callable[[Sha], str | None]) -> None:
        """Mirror forever (until cancelled); `locate` finds a local copy of a blob to upload."""
        self._locate = locate
        next_check = 0.0
        while True:
            self._wake.clear()  # a notify from here on wakes the next idle wait
            now = time.monotonic()
            if now >= next_check:
                await self._check()
                next_check = now + CHECK_INTERVAL
            if len(self._pending) < self._max_claimed:
                for claim in await self._offload.run(self.queue.claim, self._max_claimed - len(self._pending)):
                    self._pending.setdefault(claim.sha, _Pending(claim))
            due = [p for p in self._pending.values() if p.due <= time.monotonic()]
            if due:
                if time.monotonic() - self._backlog_at >= BACKLOG_INTERVAL:  # busy (S3 slow or down?)
                    await self._count_backlog()
                semaphore = asyncio.Semaphore(self._concurrency)
                await asyncio.gather(*(self._upload(p, semaphore) for p in due))
                continue
            await self._idle()

    async def put_now(self, sha: Sha, path: str) -> None:
        """Mirror one blob synchronously (`s3_sync_writes`); raises `S3Unavailable`."""
        started = time.monotonic()
        try:
            await self._offload.run(self.store.put, sha, path)
        except S3Unavailable as exc:
            self._failed(exc, started)
            raise
        self._succeeded(started)

    async def _count_backlog(self) -> None:
        self.backlog = await self._offload.run(self.queue.backlog)
        self._backlog_at = time.monotonic()
        self._metrics.s3_backlog(self.backlog)

    async def _idle(self) -> None:
        await self._count_backlog()
        earliest = min((p.due for p in self._pending.values()), default=time.monotonic() + 1.0)
        with contextlib.suppress(TimeoutError):  # asyncio.timeout, not wait_for: see status.StatusReporter.check_cache
            async with asyncio.timeout(max(0.05, min(1.0, earliest - time.monotonic()))):
                await self._wake.wait()

    async def _check(self) -> None:
        started = time.monotonic()
        try:
            await self._offload.run(self.store.check)
        except S3Unavailable as exc:
            self._failed(exc, started, operation="check")
        else:
            self._reached(True)

    async def _upload(self, pending: _Pending, semaphore: asyncio.Semaphore) -> None:
        sha = pending.claim.sha
        async with semaphore:
            started = time.monotonic()
            try:
                path = await self._offload.run(self._locate, sha)
                if path is not None:
                    await self._offload.run(self.store.put, sha, path)
            except BlobGone:  # taken down: the marker asks for the object's deletion
                if await self._delete(pending):
                    await self._offload.run(self.queue.done, pending.claim)
                    del self._pending[sha]
                return
            except (S3Unavailable, StorError, ValueError, OSError) as exc:
                self._failed(exc, started)
                self._retry_later(pending)
                return
            if path is None:
                if pending.attempts < NOT_STORED_ATTEMPTS:
                    self._retry_later(pending)  # its copies may be being linked right now
                    return
                log.warning("s3 mirror: %s is queued but stored nowhere locally; dropping it", sha)
            else:
                self._succeeded(started)
            await self._offload.run(self.queue.done, pending.claim)
            del self._pending[sha]

    async def _delete(self, pending: _Pending) -> bool:
        started = time.monotonic()
        try:
            await self._offload.run(self.store.delete, pending.claim.sha)
        except S3Unavailable as exc:
            self._failed(exc, started, operation="delete")
            self._retry_later(pending)
            return False
        self._metrics.s3("delete", True, time.monotonic() - started)
        log.info("s3 mirror: deleted %s (taken down)", pending.claim.sha)
        return True

    @staticmethod
    def _retry_later(pending: _Pending) -> None:
        pending.attempts += 1
        pending.due = time.monotonic() + min(MAX_BACKOFF, 2.0 ** (pending.attempts - 1))

    def _succeeded(self, started: float) -> None:
        self._metrics.s3("put", True, time.monotonic() - started)
        self._reached(True)
        self.last_error = None

    def _reached(self, reachable: bool) -> None:
        """Note whether S3 answers, and say so when that changes."""
        if reachable and self.reachable is False:
            log.warning("s3 mirror: S3 is reachable again; the backlog drains")
        elif not reachable and self.reachable is not False:
            log.warning("s3 mirror: S3 is unreachable; uploads stay queued on the disks until it is back")
        self.reachable = reachable

    def _failed(self, exc: Exception, started: float, operation: str = "put") -> None:
        self._metrics.s3(operation, False, time.monotonic() - started)
        if isinstance(exc, S3Unavailable):
            self._reached(False)
        if str(exc) != self.last_error:
            log.warning("s3 mirror: %s", exc)
        self.last_error = str(exc)
