"""Re-copies blobs whose bad copies were quarantined, from a good copy, in the background.

Requests come from worker threads (where corruption is found) and are served one at a time by
a single task on the event loop, so a storm of bad copies can neither exhaust threads nor
grow memory: at most `max_pending` shas wait; more are dropped (and counted), left to `stor
scrub --repair`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Awaitable, Callable

from stor.digest import Sha

log = logging.getLogger(__name__)


class Healer:
    def __init__(self, heal: Callable[[Sha], Awaitable[None]], *, max_pending: int = 1000) -> None:
        self._heal = heal
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

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._queue)

    async def run(self) -> None:
        """Heal requests one at a time, until cancelled."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        while True:
            sha = self._next()
            if sha is None:
                await self._wake.wait()
                self._wake.clear()
                continue
            try:
                await self._heal(sha)
            except Exception as exc:  # one failed heal must not stop the others
                log.warning("healing %s failed: %s", sha, exc)

    def _next(self) -> Sha | None:
        with self._lock:
            if not self._queue:
                return None
            sha = self._queue.popleft()
            self._queued.discard(sha)
            return sha
