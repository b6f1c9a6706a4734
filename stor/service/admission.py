"""Uploads in flight on this worker: bounded, counted, and what was refused for load.

A worker takes at most `limit` uploads at once (`max_uploads_in_flight`; 0: no bound); beyond
that a new upload is refused before its body is read (`Overloaded`: 503 with `Retry-After`,
which clients retry), so memory and threads stay bounded whatever the number of connections,
and nothing is lost. Uploads cut for crawling below `min_upload_rate` are counted here too.
Event-loop only.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from stor.backends.pairs import StoragePool
from stor.errors import Overloaded
from stor.metrics import Metrics


class Admission:
    def __init__(self, limit: int, pool: StoragePool, metrics: Metrics) -> None:
        self.limit = limit
        self.pool = pool
        self.metrics = metrics
        self.in_flight = 0
        self.shed = 0
        self.cut_for_rate = 0

    @contextmanager
    def admitted(self) -> Iterator[None]:
        """One upload, for as long as the block runs; `Overloaded` when the worker is full."""
        if self.limit and self.in_flight >= self.limit:
            self.shed += 1
            self.metrics.upload_refused("shed")
            raise Overloaded(self.limit)
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    def cut(self) -> None:
        """An upload was cut for crawling below the rate floor."""
        self.cut_for_rate += 1
        self.metrics.upload_refused("slow")

    def status(self) -> dict[str, object]:
        return {
            "in_flight": self.in_flight,
            "limit": self.limit,
            "promised_bytes": sum(self.pool.reserved(pair) for pair in self.pool.pairs),
            "shed": self.shed,
            "cut_for_rate": self.cut_for_rate,
        }
