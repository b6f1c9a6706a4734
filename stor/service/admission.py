"""Uploads in flight on this worker: bounded, counted, and what was refused for load.

A worker moves at most `limit` uploads' bodies at once (`max_uploads_in_flight`; 0: no bound):
each may buffer up to a MiB and keeps a thread writing, so the bound caps memory and threads.
An upload whose body crawls below `min_upload_rate` (on average, once `STALL_AGE` has passed)
is *stalled*: it holds almost nothing (at most the floor's rate times the 20 s grace before the
floor cuts it: 10 KB at the default), so it does not count against the bound. Stalled uploads
have a bound of their own, `STALLED_PER_PLACE` times as many; when that is reached too, the
slowest stalled upload is cut (408) to make room. A new upload that finds the places taken
by uploads too young to judge waits for one (up to `ADMIT_WAIT`, longer than `STALL_AGE`: by
then the stalled among them no longer count), at most `STALLED_PER_PLACE` times as many
waiting as there are places; beyond that it is refused before its body is read (`Overloaded`:
503 with `Retry-After`, which clients retry), and nothing is lost. So hundreds of slow or
stalled clients, even arriving all at once, never lock fast ones out. Event-loop only.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from stor.backends.pairs import StoragePool
from stor.errors import Overloaded
from stor.metrics import Metrics

STALL_AGE = 0.5
"""An upload is judged stalled (below the rate floor on average) only after this many seconds:
a new one has not had time to send anything yet."""

ADMIT_WAIT = 1.0
"""How long a new upload waits for a place among uploads too young to judge."""
_POLL = 0.05

STALLED_PER_PLACE = 8
"""How many stalled uploads a worker holds per place of `max_uploads_in_flight`."""

SMALL_BODY = 64 * 1024
"""An upload declaring at most this many bytes takes no place: the HTTP server buffers this much
of any connection's body before it stops reading (uvicorn's flow-control high-water mark), so
bounding such uploads would bound no memory; and being in the bound, a burst of slow uploads
too young to judge would hold them back for `STALL_AGE`."""


class Place:
    """One upload's place: what its body reader tells the admission (bytes received, the wait it
    is in) and what the admission may do to it (cut it to make room)."""

    __slots__ = ("admission", "evicted", "received", "started", "waiting")

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self.started = time.monotonic()
        self.received = 0
        self.waiting: asyncio.Timeout | None = None  # set while the body reader awaits the client
        self.evicted = False

    def rate(self, now: float) -> float:
        return self.received / max(now - self.started, 1e-9)

    def cut(self) -> None:
        """The body reader cut this upload for crawling (or because it was evicted)."""
        self.admission.cut()

    def evict(self) -> None:
        """Cut this upload: its body reader's wait ends now, and it answers 408."""
        self.evicted = True
        if self.waiting is not None:
            self.waiting.reschedule(asyncio.get_running_loop().time())


class Admission:
    def __init__(self, limit: int, pool: StoragePool, metrics: Metrics, min_rate: int = 0) -> None:
        self.limit = limit
        self.min_rate = min_rate
        self.pool = pool
        self.metrics = metrics
        self.places: set[Place] = set()  # the uploads bounded by `limit`
        self.small: set[Place] = set()  # those declaring at most `SMALL_BODY`: not bounded
        self.shed = 0
        self.cut_for_rate = 0
        self.evicted = 0
        self.waiting = 0  # new uploads waiting for a place

    @asynccontextmanager
    async def admitted(self, declared: int | None = None) -> AsyncIterator[Place]:
        """One upload (`declared`: its Content-Length, None when not given), for as long as the
        block runs; `Overloaded` when the worker is full."""
        small = declared is not None and declared <= SMALL_BODY
        if not small and self.limit and len(self.places) >= self.limit:
            await self._wait_for_room()
        place = Place(self)
        held = self.small if small else self.places
        held.add(place)
        try:
            yield place
        finally:
            held.discard(place)

    async def _wait_for_room(self) -> None:
        """Until `_make_room` finds room, for up to `ADMIT_WAIT`, among at most as many waiting
        as the stalled may be; else `Overloaded`."""
        if self.waiting >= self.limit * STALLED_PER_PLACE:
            self._shed()
        self.waiting += 1
        try:
            deadline = time.monotonic() + ADMIT_WAIT
            while not self._make_room():
                if time.monotonic() >= deadline:
                    self._shed()
                await asyncio.sleep(_POLL)
        finally:
            self.waiting -= 1

    def _make_room(self) -> bool:
        """Whether one more upload may start: fewer than `limit` are moving (the slowest
        stalled one is cut when the stalled have filled their own bound)."""
        if len(self.places) < self.limit:
            return True
        now = time.monotonic()
        stalled = [place for place in self.places if self._stalled(place, now)]
        if len(self.places) - len(stalled) >= self.limit:
            return False
        if len(stalled) >= self.limit * STALLED_PER_PLACE:
            idle = [place for place in stalled if place.waiting is not None and not place.evicted]
            if not idle:
                return False
            slowest = min(idle, key=lambda place: place.rate(now))
            slowest.evict()
            self.places.discard(slowest)  # its place is the newcomer's now
            self.evicted += 1
        return True

    def _stalled(self, place: Place, now: float) -> bool:
        age = now - place.started
        return bool(self.min_rate) and age >= STALL_AGE and place.received < self.min_rate * age

    def _shed(self) -> None:
        self.shed += 1
        self.metrics.upload_refused("shed")
        raise Overloaded(self.limit)

    def cut(self) -> None:
        """An upload was cut for crawling below the rate floor (or to make room)."""
        self.cut_for_rate += 1
        self.metrics.upload_refused("slow")

    def status(self) -> dict[str, object]:
        now = time.monotonic()
        return {
            "in_flight": len(self.places) + len(self.small),
            "waiting": self.waiting,
            "stalled": sum(1 for place in (*self.places, *self.small) if self._stalled(place, now)),
            "limit": self.limit,
            "promised_bytes": sum(self.pool.reserved(pair) for pair in self.pool.pairs),
            "shed": self.shed,
            "cut_for_rate": self.cut_for_rate,
            "cut_for_room": self.evicted,
        }
