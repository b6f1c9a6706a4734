"""Uploads in flight on this worker: bounded, counted, and what was refused for load.

A worker moves at most `limit` uploads' bodies at once (`max_uploads_in_flight`; 0: no bound):
each may buffer up to a MiB and keeps a thread writing, so the bound caps memory and threads.
An upload whose body crawls below `min_upload_rate` (on average, once `STALL_AGE` has passed)
is *stalled*: it holds almost nothing (at most the floor's rate times the 20 s grace before the
floor cuts it: 10 KB at the default), so it does not count against the bound. Stalled uploads
have a bound of their own, `STALLED_PER_PLACE` times as many; when that is reached too, the
slowest stalled upload is cut (408) to make room. Beyond both bounds a new upload is refused
before its body is read (`Overloaded`: 503 with `Retry-After`, which clients retry), and
nothing is lost. So hundreds of slow or stalled clients never lock fast ones out.
Event-loop only.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager

from stor.backends.pairs import StoragePool
from stor.errors import Overloaded
from stor.metrics import Metrics

STALL_AGE = 1.0
"""An upload is judged stalled (below the rate floor on average) only after this many seconds:
a new one has not had time to send anything yet."""

STALLED_PER_PLACE = 8
"""How many stalled uploads a worker holds per place of `max_uploads_in_flight`."""


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
        self.places: set[Place] = set()
        self.shed = 0
        self.cut_for_rate = 0
        self.evicted = 0

    @contextmanager
    def admitted(self) -> Iterator[Place]:
        """One upload, for as long as the block runs; `Overloaded` when the worker is full."""
        if self.limit and len(self.places) >= self.limit:
            self._make_room()
        place = Place(self)
        self.places.add(place)
        try:
            yield place
        finally:
            self.places.discard(place)

    def _make_room(self) -> None:
        """Admit one more upload if fewer than `limit` are moving, cutting the slowest stalled
        one when the stalled have filled their own bound; else `Overloaded`."""
        now = time.monotonic()
        stalled = [place for place in self.places if self._stalled(place, now)]
        if len(self.places) - len(stalled) >= self.limit:
            self._shed()
        if len(stalled) >= self.limit * STALLED_PER_PLACE:
            waiting = [place for place in stalled if place.waiting is not None and not place.evicted]
            if not waiting:
                self._shed()
            slowest = min(waiting, key=lambda place: place.rate(now))
            slowest.evict()
            self.places.discard(slowest)  # its place is the newcomer's now
            self.evicted += 1

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
            "in_flight": len(self.places),
            "stalled": sum(1 for place in self.places if self._stalled(place, now)),
            "limit": self.limit,
            "promised_bytes": sum(self.pool.reserved(pair) for pair in self.pool.pairs),
            "shed": self.shed,
            "cut_for_rate": self.cut_for_rate,
            "cut_for_room": self.evicted,
        }
