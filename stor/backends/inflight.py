"""Operations in flight on one disk: bounded in number, and timed, so a hung disk is seen.

A disk that stops answering (a dead NFS server, a FUSE daemon stuck, a failing drive) blocks
every thread that touches it, and a blocked thread cannot be taken back. So each disk admits
at most `limit` operations at once: past that, more fail at once (`StorageUnavailable`)
instead of taking the rest of the thread pool down with the disk. And the age of the oldest
operation still running tells the request path a disk has stalled, before the next health
probe would.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Concatenate, ParamSpec, Protocol, TypeVar

from stor.errors import StorageUnavailable

P = ParamSpec("P")
T = TypeVar("T")


class InflightOps:
    def __init__(self, root: str, limit: int) -> None:
        self.root = root
        self.limit = limit
        self._lock = threading.Lock()
        self._started: dict[int, float] = {}
        self._ids = itertools.count()

    @contextmanager
    def op(self, *, bounded: bool = True) -> Iterator[None]:
        """One operation, timed; refused when `limit` are running already, unless not
        `bounded` (a thread of its own, such as a group commit's, holds no pool thread)."""
        with self._lock:
            if bounded and len(self._started) >= self.limit:
                raise StorageUnavailable(
                    f"{self.root}: {len(self._started)} operations already waiting on this disk (hung?)"
                )
            key = next(self._ids)
            self._started[key] = time.monotonic()
        try:
            yield
        finally:
            with self._lock:
                del self._started[key]

    def oldest(self) -> float:
        """How long the oldest operation still running has run (0 when none is)."""
        with self._lock:  # keys only grow and dicts keep insertion order: the first is the oldest
            first = next(iter(self._started.values()), None)
        return 0.0 if first is None else time.monotonic() - first

    def count(self) -> int:
        with self._lock:
            return len(self._started)


class HasInflight(Protocol):
    @property
    def inflight(self) -> InflightOps: ...


H = TypeVar("H", bound=HasInflight)


def guarded(method: Callable[Concatenate[H, P], T]) -> Callable[Concatenate[H, P], T]:
    """Count a blocking method of a disk (or of a file on it) as one operation in flight."""

    def wrapper(self: H, /, *args: P.args, **kwargs: P.kwargs) -> T:
        with self.inflight.op():
            return method(self, *args, **kwargs)

    wrapper.__name__, wrapper.__doc__ = method.__name__, method.__doc__
    return wrapper
