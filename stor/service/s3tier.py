"""The S3 tier: one part with two implementations, so no other module asks whether S3 is on.

`NoS3` (S3 off) answers every disk miss with the disks' verdict and mirrors nothing.
`S3Tier` (S3 on) is the fallback behind the disks (bytes from S3 are hash-verified before
they are trusted; a blob found only there is written back to a pair in the background) and
the mirror of every write: a durable queue marker per new blob, drained by `S3Mirror`.

The blocking methods run in worker threads; `run`, `published` and `fill_later` on the loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Protocol, TypeVar

from stor.backends.disk import Disk
from stor.backends.s3 import S3Object, S3Store, S3Unavailable
from stor.backends.s3queue import S3Queue
from stor.digest import Sha, new_hasher, sha_of
from stor.errors import CorruptCopy, StorageUnavailable
from stor.metrics import Metrics
from stor.model import BlobInfo, BlobStat, PutResult
from stor.service.integrity import Integrity
from stor.service.offload import Offload, blocking_chunks, one_piece
from stor.service.s3mirror import S3Mirror
from stor.service.stream import InMemory, OpenBlob, S3Stream

log = logging.getLogger(__name__)

T = TypeVar("T")

S3_READ_WHOLE_BYTES = 4 * 1024 * 1024
"""S3 blobs up to this size are read and verified before the first header is sent."""
MAX_FILLS = 2
"""Blobs found only in S3 written back to the disks at once."""

Locate = Callable[[Sha], str | None]
Restore = Callable[[Sha, AsyncIterator[bytes], int], Awaitable[PutResult]]


class S3Part(Protocol):
    may_hold: bool
    """Whether a blob absent from every disk may still be in S3 (so a 404 must ask it)."""

    def prepare(self) -> None:
        """Blocking, at start-up and after each health check: claim the queues of the disks
        that are up, and put back what dead processes had claimed."""

    def add(self, disk: Disk) -> None:
        """A disk added at run time (a config reload); `prepare` claims it."""

    def let_go(self, disk: Disk) -> None:
        """Blocking: give up the claim on a disk that went away (it is claimed again by
        `prepare` when it comes back)."""

    async def run(self, locate: Locate) -> None:
        """The mirror worker, until cancelled; `locate` finds a local copy to upload."""

    def stat(self, sha: Sha, miss: Exception) -> BlobStat:
        """Blocking: the blob's stat in S3, after the disks missed with `miss` (raised again
        when S3 has nothing either)."""

    def open(self, sha: Sha, miss: Exception) -> OpenBlob:
        """Blocking: the blob opened from S3 (small ones read and verified), as `stat`."""

    def info(self, sha: Sha) -> BlobInfo | None:
        """Blocking: for batch existence, whether S3 has a blob no disk has."""

    def source(self, sha: Sha) -> tuple[Iterator[bytes], int, int] | None:
        """Blocking, for repairs: the S3 object's chunks (checked against `sha` as they are
        read: a mismatch raises `CorruptCopy` at the end), size and mtime; None if absent.
        `StorageUnavailable` when S3 cannot be asked."""

    def enqueue(self, disk: Disk, sha: Sha, *, durable: bool) -> None:
        """Blocking: the queue marker of a new blob, beside its copy on `disk`, written before
        any copy is linked (`durable`: fsynced now; else by the copy's group commit)."""

    async def published(self, sha: Sha, path: str) -> None:
        """A new blob is durable on its pair (copy at `path`): mirror it now or soon."""

    def fill_later(self, blob: OpenBlob, restore: Restore) -> None:
        """A blob served from S3 alone: write it back to a pair in the background."""

    def status(self) -> dict[str, object]: ...

    def close(self) -> None: ...


class NoS3:
    may_hold = False

    def prepare(self) -> None:
        pass

    def add(self, disk: Disk) -> None:
        pass

    def let_go(self, disk: Disk) -> None:
        pass

    async def run(self, locate: Locate) -> None:
        pass

    def stat(self, sha: Sha, miss: Exception) -> BlobStat:
        raise miss

    def open(self, sha: Sha, miss: Exception) -> OpenBlob:
        raise miss

    def info(self, sha: Sha) -> BlobInfo | None:
        return None

    def source(self, sha: Sha) -> tuple[Iterator[bytes], int, int] | None:
        return None

    def enqueue(self, disk: Disk, sha: Sha, *, durable: bool) -> None:
        pass

    async def published(self, sha: Sha, path: str) -> None:
        pass

    def fill_later(self, blob: OpenBlob, restore: Restore) -> None:
        pass

    def status(self) -> dict[str, object]:
        return {"enabled": False}

    def close(self) -> None:
        pass


class S3Tier:
    may_hold = True

    def __init__(
        self,
        store: S3Store,
        queue: S3Queue,
        *,
        offload: Offload,
        metrics: Metrics,
        integrity: Integrity,
        sync_writes: bool = False,
        fill_local: bool = True,
    ) -> None:
        self.store = store
        self.queue = queue
        self.offload = offload
        self.metrics = metrics
        self.integrity = integrity
        self.sync_writes = sync_writes
        self.fill_local = fill_local
        self.mirror = S3Mirror(store, queue, offload, metrics)
        self._fills: dict[Sha, asyncio.Task[None]] = {}

    def prepare(self) -> None:
        returned = self.queue.prepare()
        if returned:
            log.info("s3 mirror: %d blobs claimed by a process that died are queued again", returned)

    def add(self, disk: Disk) -> None:
        self.queue.add(disk)

    def let_go(self, disk: Disk) -> None:
        self.queue.let_go(disk)

    async def run(self, locate: Locate) -> None:
        await self.mirror.run(locate)

    # -- reads -----------------------------------------------------------------------------

    def stat(self, sha: Sha, miss: Exception) -> BlobStat:
        return self._stat(sha, self._call("head", miss, self.store.head, sha))

    def open(self, sha: Sha, miss: Exception) -> OpenBlob:
        found = self._call("get", miss, self.store.open, sha)
        stat = self._stat(sha, found)
        if found.size <= S3_READ_WHOLE_BYTES:
            return InMemory(sha, stat, self._read_verified(sha, stat, found), from_s3=True)
        return S3Stream(sha, stat, found, self.offload, on_corrupt=self.integrity.s3_corrupt)

    def info(self, sha: Sha) -> BlobInfo | None:
        try:
            found = self.store.head(sha)
        except S3Unavailable:
            return None
        return BlobInfo(found.size, 0, True) if found is not None else None

    def source(self, sha: Sha) -> tuple[Iterator[bytes], int, int] | None:
        try:
            found = self.store.open(sha)
        except S3Unavailable as exc:
            raise StorageUnavailable(f"S3 could not be asked: {exc}") from exc
        if found is None:
            return None
        return _checked(found, sha), found.size, found.mtime_ns

    def _stat(self, sha: Sha, found: S3Object) -> BlobStat:
        return BlobStat(f"s3://{self.store.bucket}/{sha}", found.size, found.mtime_ns)

    def _call(self, operation: str, miss: Exception, call: Callable[[Sha], T | None], sha: Sha) -> T:
        """Ask S3 after the disks missed; keep the disks' verdict if S3 has nothing either."""
        started = time.monotonic()
        try:
            found = call(sha)
        except S3Unavailable as exc:
            self.metrics.s3(operation, False, time.monotonic() - started)
            raise StorageUnavailable(f"{miss}; and S3 could not be asked: {exc}") from exc
        self.metrics.s3(operation, True, time.monotonic() - started)
        if found is None:
            raise miss
        return found

    def _read_verified(self, sha: Sha, stat: BlobStat, found: S3Object) -> bytes:
        try:
            data = b"".join(found.chunks())
        except S3Unavailable as exc:
            raise StorageUnavailable(str(exc)) from exc
        finally:
            found.close()
        actual = sha_of(data)
        if len(data) != stat.size or actual != sha:
            self.integrity.s3_corrupt(actual, len(data))
            raise CorruptCopy(f"the S3 copy of {sha} is corrupt (its sha256 is {actual})")
        return data

    # -- writes ----------------------------------------------------------------------------

    def enqueue(self, disk: Disk, sha: Sha, *, durable: bool) -> None:
        try:
            self.queue.enqueue(disk, sha, durable=durable)
        except OSError as exc:
            raise StorageUnavailable(f"{disk.root}: cannot queue the S3 mirror: {exc.strerror}") from exc

    async def published(self, sha: Sha, path: str) -> None:
        if not self.sync_writes:
            self.mirror.notify()
            return
        try:
            await self.mirror.put_now(sha, path)
        except S3Unavailable as exc:
            raise StorageUnavailable(f"stored locally, but not yet in S3 (it stays queued): {exc}") from exc

    def fill_later(self, blob: OpenBlob, restore: Restore) -> None:
        """Write a blob found only in S3 back to a pair, in the background, a few at a time."""
        sha = blob.sha
        if not self.fill_local or sha in self._fills or len(self._fills) >= MAX_FILLS:
            return
        task = asyncio.get_running_loop().create_task(self._fill(sha, blob.data, blob.stat.size, restore))
        self._fills[sha] = task
        task.add_done_callback(lambda _: self._fills.pop(sha, None))

    async def _fill(self, sha: Sha, data: bytes | None, size: int, restore: Restore) -> None:
        try:
            if data is not None:
                await restore(sha, one_piece(data), size)
                return
            found = await self.offload.run(self.store.open, sha)
            if found is None:
                return
            try:
                await restore(sha, blocking_chunks(self.offload, found.chunks()), size)
            finally:
                found.close()
        except Exception as exc:  # a fill is an optimisation: log it, never crash the loop
            log.warning("refilling %s from S3 failed: %s", sha, exc)
        else:
            log.info("refilled %s from S3", sha)

    def status(self) -> dict[str, object]:
        return {
            "enabled": True,
            "endpoint": self.store.endpoint,
            "bucket": self.store.bucket,
            "reachable": self.mirror.reachable,
            "backlog": self.mirror.backlog,
            "last_error": self.mirror.last_error,
            "sync_writes": self.sync_writes,
        }

    def close(self) -> None:
        for task in self._fills.values():
            task.cancel()
        self.queue.close()


def _checked(found: S3Object, sha: Sha) -> Iterator[bytes]:
    hasher = new_hasher()
    try:
        for chunk in found.chunks():
            hasher.update(chunk)
            yield chunk
    except S3Unavailable as exc:
        raise StorageUnavailable(f"reading the S3 copy of {sha}: {exc}") from exc
    finally:
        found.close()
    if hasher.hexdigest() != sha:
        raise CorruptCopy(f"the S3 copy of {sha} is corrupt too")
