"""Group commit: the copies of many uploads made durable by one `syncfs` per cycle.

Alone, a copy costs a journal commit for the fsync of its file and another for its directory
(more when the upload creates directories), one after the other; at 32 uploads at once a
virtual disk here managed about 500 pairs a second. Here one thread per filesystem runs
cycles instead, each ending in a single `syncfs`, which writes back every dirty file of that
filesystem and commits its journal once, for everything queued meanwhile:

    take the queue → link the copies whose data an earlier cycle made durable → syncfs →
    those links are durable, and so is the data of every temp queued before the syncfs
    began (once `TempFile.check_written` passed)

An upload's copies go through two phases, each a cycle of their filesystem's thread: every
copy durable, then (only once all of them are, whichever thread finishes last) every copy
linked and durable. That is the per-file protocol's order: the data durable before the name
exists, the name durable before the upload is acknowledged.

Errors are never lost: `syncfs` reports any writeback error on the filesystem since the fd it
is called on was opened, so it is called on the fd of the oldest temp of the cycle; and each
temp is checked on its own fd (`TempFile.check_written`), which reports that file's writeback
errors without another journal commit. A failed check fails that copy's upload; a failed
`syncfs` fails every upload in the cycle; nothing is retried.

Only for temps whose filesystem's `syncfs` is real (`TempFile.groupable`). A `syncfs` also
writes back what other writers left dirty on the filesystem, which is why large uploads start
their writeback while they spool (`TempFile.start_writeback`). Thread-safe; the futures
resolve in the commit threads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

from stor.backends import syscalls
from stor.backends.temps import TempFile
from stor.digest import Sha
from stor.errors import StorageUnavailable, StorError
from stor.model import CommitStats
from stor.threads import start_thread

log = logging.getLogger(__name__)

T = TypeVar("T")

Linked = tuple[str, bool]
"""A copy's final path, and whether this upload created it (see `TempFile.commit`)."""


@dataclass
class _Item:
    temp: TempFile
    sha: Sha | None  # None: make the data durable; a sha: link it under that name, durably
    done: Callable[[Linked | None, StorError | None], None]
    linked: Linked | None = None
    finished: bool = False

    def finish(self, linked: Linked | None, error: StorError | None) -> None:
        """Report the outcome, once."""
        if not self.finished:
            self.finished = True
            self.done(linked, error)


class GroupCommit:
    """The commit cycles of one filesystem, run by one thread started on first use."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.stats = CommitStats()
        self._queue: list[_Item] = []
        self._ready = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    def close(self) -> None:
        """Stop after the queued copies are through (does not wait: a disk may hang)."""
        with self._ready:
            self._closed = True
            self._ready.notify()

    def submit(self, item: _Item) -> None:
        with self._ready:
            if not self._closed:
                self._queue.append(item)
                if self._thread is None:
                    self._thread = start_thread(self._run, f"stor-commit-{self.name}")
                self._ready.notify()
                return
        item.finish(None, StorageUnavailable(f"{self.name}: shutting down"))

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._queue and not self._closed:
                    self._ready.wait()
                if not self._queue:
                    return
                batch, self._queue = self._queue, []
            try:
                self._cycle(batch)
            except BaseException as exc:  # never leave a waiter hanging, whatever went wrong
                log.exception("group commit on %s failed", self.name)
                for item in batch:  # those not answered yet
                    item.finish(None, StorageUnavailable(f"{self.name}: group commit failed: {exc!r}"))

    def _cycle(self, batch: list[_Item]) -> None:
        synced: list[_Item] = []
        for item in batch:
            if item.sha is not None:
                try:
                    item.linked = item.temp.link(item.sha)
                except StorError as exc:
                    item.finish(None, exc)
                    continue
            synced.append(item)
        if not synced:
            return
        oldest = min(synced, key=lambda item: item.temp.created)
        disks = {item.temp.disk.root: item.temp.disk for item in synced}
        try:
            with contextlib.ExitStack() as timed:
                for disk in disks.values():  # counted as in flight: a hung syncfs marks the disks stalled
                    timed.enter_context(disk.inflight.op(bounded=False))
                syscalls.syncfs(oldest.temp.fd)
        except OSError as exc:
            for disk in disks.values():
                disk.count_error()
            error = StorageUnavailable(f"{', '.join(disks)}: syncfs: {exc.strerror or exc}")
            for item in synced:
                item.finish(None, error)
            return
        self.stats.cycles += 1
        self.stats.copies += len(synced)
        self.stats.largest = max(self.stats.largest, len(synced))
        for item in synced:
            if item.sha is None:
                try:
                    item.temp.check_written()
                except StorError as exc:
                    item.finish(None, exc)
                    continue
            else:
                item.temp.discard()  # the name is durable: only the fd is left to close
            item.finish(item.linked, None)


class GroupCommits:
    """One `GroupCommit` per filesystem (by `st_dev`), made when first needed, and the two
    phases of an upload across them."""

    def __init__(self) -> None:
        self._by_device: dict[int, GroupCommit] = {}
        self._lock = threading.Lock()

    def commit(self, temps: list[TempFile], sha: Sha) -> Future[list[Linked]]:
        """Every temp durable, then every one linked under `sha`, durably; resolves to the
        copies (or the first failure: the caller then discards the temps)."""
        future: Future[list[Linked]] = _running_future()
        self._phase(temps, None, lambda _, error: self._link_or_fail(temps, sha, future, error))
        return future

    def durable(self, temps: list[TempFile]) -> Future[None]:
        """Only the first phase: every temp durable (for uploads with copies elsewhere too)."""
        future: Future[None] = _running_future()
        self._phase(temps, None, lambda _, error: _resolve(future, None, error))
        return future

    def link(self, temps: list[TempFile], sha: Sha) -> Future[list[Linked]]:
        """Only the second phase: durable temps linked under `sha`, durably."""
        future: Future[list[Linked]] = _running_future()
        self._phase(temps, sha, lambda linked, error: _resolve(future, linked, error))
        return future

    def _link_or_fail(
        self, temps: list[TempFile], sha: Sha, future: Future[list[Linked]], error: StorError | None
    ) -> None:
        if error is not None:
            future.set_exception(error)
        else:
            self._phase(temps, sha, lambda linked, error: _resolve(future, linked, error))

    def _phase(
        self, temps: list[TempFile], sha: Sha | None, then: Callable[[list[Linked], StorError | None], None]
    ) -> None:
        """Submit one item per temp; `then` runs once, in the thread that finishes the last."""
        if not temps:
            then([], None)
            return
        results: list[Linked | None] = [None] * len(temps)
        errors: list[StorError] = []
        left = [len(temps)]
        lock = threading.Lock()

        def done(index: int, linked: Linked | None, error: StorError | None) -> None:
            with lock:
                results[index] = linked
                if error is not None:
                    errors.append(error)
                left[0] -= 1
                if left[0]:
                    return
            then([r for r in results if r is not None], errors[0] if errors else None)

        for index, temp in enumerate(temps):
            self.of(temp).submit(_Item(temp, sha, functools.partial(done, index)))

    def of(self, temp: TempFile) -> GroupCommit:
        with self._lock:
            found = self._by_device.get(temp.device)
            if found is None:
                found = self._by_device[temp.device] = GroupCommit(f"{temp.disk.root} (dev {temp.device:#x})")
            return found

    def stats(self) -> dict[str, CommitStats]:
        """Per filesystem: cycles run, copies through them, the most in one cycle."""
        with self._lock:
            return {commit.name: dataclasses.replace(commit.stats) for commit in self._by_device.values()}

    def close(self) -> None:
        with self._lock:
            for commit in self._by_device.values():
                commit.close()


def _running_future() -> Future[Any]:
    future: Future[Any] = Future()
    future.set_running_or_notify_cancel()  # so nothing can cancel it while copies are in a cycle
    return future


def _resolve(future: Future[T], value: T, error: StorError | None) -> None:
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)
