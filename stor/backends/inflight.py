"""Operations in flight on one disk: bounded in number, and timed, so a hung disk is seen.

A disk that stops answering (a dead NFS server, a FUSE daemon stuck, a failing drive) blocks
every thread that touches it, and a blocked thread cannot be taken back. So each disk admits
at most `limit` operations at once. One more waits up to `busy_wait` seconds for a slot: a
busy disk (many uploads fsyncing at once) frees one within milliseconds, a hung one never,
and then the operation fails (`StorageUnavailable`) instead of taking the rest of the thread
pool down with the disk. And the age of the oldest operation still running tells the
request path a disk has stalled, before the next health probe would.
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


BUSY_WAIT = 2.0
"""Seconds an operation past the limit waits for a slot before the disk counts as hung."""


class InflightOps:
    def __init__(self, root: str, limit: int, *, busy_wait: float = BUSY_WAIT) -> None:
        self.root = root
        self.limit = limit
        self.busy_wait = busy_wait
        self._lock = threading.Lock()
        self._freed = threading.Condition(self._lock)
        self._started: dict[int, float] = {}
        self._waiting = 0  # operations waiting for a slot
        self._ids = itertools.count()

    @contextmanager
    def op(self, *, bounded: bool = True) -> Iterator[None]:
        """One operation, timed. When `limit` are running already it waits for one to end,
        and is refused once `busy_wait` has passed; not when not `bounded` (a thread of its
        own, such as a group commit's, holds no pool thread)."""
        key = self.begin(bounded=bounded)
        try:
            yield
        finally:
            self.end(key)

    def begin(self, *, bounded: bool = True) -> int:
        """`op` without a context manager (for `guarded`, around every disk call): its key,
        for `end`."""
        with self._lock:
            if bounded and len(self._started) >= self.limit:
                deadline = time.monotonic() + self.busy_wait
                self._waiting += 1
                try:
                    while len(self._started) >= self.limit:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            raise StorageUnavailable(
                                f"{self.root}: {len(self._started)} operations running on this disk for "
                                f"{self.busy_wait:g}s and more waiting (hung?)"
                            )
                        self._freed.wait(left)
                finally:
                    self._waiting -= 1
            key = next(self._ids)
            self._started[key] = time.monotonic()
        return key

    def end(self, key: int) -> None:
        with self._lock:
            del self._started[key]
            if self._waiting:  # (a notify with nobody waiting still costs a check of the lock)
                self._freed.notify()

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
        inflight = self.inflight
        key = inflight.begin()
        try:
            return method(self, *args, **kwargs)
        finally:
            inflight.end(key)

    wrapper.__name__, wrapper.__doc__ = method.__name__, method.__doc__
    return wrapper
