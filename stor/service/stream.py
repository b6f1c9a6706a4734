"""A located blob and how its bytes go out: read whole already (`InMemory`), streamed from a disk
copy it owns (`DiskStream`, optionally verified while it streams) or from S3 (`S3Stream`,
always verified). Reads run off the event loop via `Offload`."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from dataclasses import KW_ONLY, dataclass, field

from stor.backends.disk import Disk
from stor.backends.opencopy import OpenCopy
from stor.backends.s3 import S3Object
from stor.checksum import FastSum
from stor.digest import Sha
from stor.errors import StorageUnavailable, TransferAborted
from stor.metrics import Metrics, NullMetrics
from stor.model import BlobStat
from stor.service.offload import Offload
from stor.service.verify import StreamCheck, sha_of_copy

STREAM_CHUNK = 1024 * 1024

Reopen = Callable[[set[str]], OpenCopy[Disk] | None]
"""Another copy of the same blob, not on the given disk roots, opened; or None."""


@dataclass
class InMemory:
    """A blob whose bytes were read (and verified) whole: from a disk copy, or from S3."""

    sha: Sha
    stat: BlobStat
    data: bytes
    from_s3: bool = False
    zero_copy = False

    def chunks(self, start: int, end: int) -> AsyncGenerator[bytes, None]:
        return _slice(self.data, start, end)

    def close(self) -> None:
        pass


@dataclass
class DiskStream:
    """An open disk copy, streamed (it owns the copy and closes it when the stream ends or on
    `close`).

    `checked`: the whole copy was verified before it was opened for sending (see
    `Lookup.open_copy`). Else, with `verify`, the stream checks the whole copy, whatever range is
    asked (see `verify.StreamCheck`), and holds the last piece back until it passes; when SHA-256
    finds the copy bad, `on_corrupt` runs (in a worker thread) with the actual digest and the
    transfer is aborted.

    When a disk read fails mid-stream, `reopen` (in a worker thread) is asked for another copy,
    not on the disks that failed, and the stream carries on from it at the same offset: the
    copies hold the same bytes, so the client sees one unbroken response."""

    sha: Sha
    stat: BlobStat
    copy: OpenCopy[Disk]
    offload: Offload
    _: KW_ONLY
    checked: bool = False
    verify: bool = False
    recorded: FastSum | None = None
    """The copy's recorded fast checksum: a verified stream checks that instead of SHA-256."""
    on_corrupt: Callable[[str, int], None] | None = None
    reopen: Reopen | None = None
    metrics: Metrics = field(default_factory=NullMetrics)
    data = None
    from_s3 = False
    _failed: set[str] = field(default_factory=set, init=False)

    @property
    def zero_copy(self) -> bool:
        """The bytes may go from the file to the socket without passing through Python
        (`sendfile`): verified already, on a filesystem served from the page cache."""
        return self.checked and not self.copy.closed and self.copy.disk.takes_nowait

    def chunks(self, start: int, end: int) -> AsyncGenerator[bytes, None]:
        """Bytes [start, end), read off the event loop; closes the copy when done."""
        if self.verify:
            check = StreamCheck(self.recorded)
            return _verified(self, start, end, check, self._next_chunk(check))
        return _disk_range(self, start, end)

    def rehash(self) -> Sha | None:
        """Blocking: the SHA-256 of the copy read again from the start (after its fast checksum
        disagreed); None when it cannot be read."""
        try:
            return sha_of_copy(self.copy.read_into)
        except (StorageUnavailable, ValueError):
            return None

    def record_sum(self, digest: FastSum) -> None:
        """Blocking: give the copy being read the fast checksum SHA-256 just vouched for."""
        self.copy.record_sum(digest)

    def _next_chunk(self, hasher: StreamCheck) -> Callable[[], Awaitable[bytes | None]]:
        offset = 0

        async def read() -> bytes | None:
            nonlocal offset
            chunk = await self.read(offset, STREAM_CHUNK, exact=False, hasher=hasher)
            offset += len(chunk)
            return chunk or None

        return read

    async def read(self, offset: int, size: int, *, exact: bool, hasher: StreamCheck | None = None) -> bytes:
        """`size` bytes at `offset` (fewer at the end unless `exact`), moving to another copy
        when this one fails; hashed into `hasher` in the same thread hop (sha256 releases the
        GIL, so the event loop sends the previous piece meanwhile)."""
        while True:
            copy, began = self.copy, time.monotonic()
            try:
                read = copy.read_at if exact else copy.read_some
                chunk = await self.offload.run(_read_hashed, read, offset, size, hasher)
            except StorageUnavailable:
                if not await self.offload.run(self._switch_copy):
                    raise
                continue
            self.metrics.disk_read(copy.disk.root, len(chunk), time.monotonic() - began)
            return chunk

    def _switch_copy(self) -> bool:
        if self.reopen is None:
            return False
        self._failed.add(self.copy.disk.root)
        other = self.reopen(self._failed)
        if other is None or other.stat.size != self.stat.size:
            if other is not None:
                other.close()
            return False
        self.copy.close()
        self.copy = other
        self.on_corrupt = None  # it names the first copy; a mismatch now only aborts the transfer
        return True

    def close(self) -> None:
        self.copy.close()


@dataclass
class S3Stream:
    """A blob streamed from S3, always verified (as `DiskStream` with `verify`)."""

    sha: Sha
    stat: BlobStat
    s3: S3Object
    offload: Offload
    _: KW_ONLY
    on_corrupt: Callable[[str, int], None] | None = None
    data = None
    from_s3 = True
    zero_copy = False

    def chunks(self, start: int, end: int) -> AsyncGenerator[bytes, None]:
        source, check = self.s3.chunks(), StreamCheck(None)
        return _verified(self, start, end, check, lambda: self.offload.run(_next_hashed, source, check))

    def rehash(self) -> Sha | None:
        return None  # never asked: an S3 stream is checked by SHA-256 as it goes

    def record_sum(self, digest: FastSum) -> None:
        pass

    def close(self) -> None:
        self.s3.close()


OpenBlob = InMemory | DiskStream | S3Stream
"""A located blob, ready to answer: read whole, or a stream the caller closes."""


def _read_hashed(read: Callable[[int, int], bytes], offset: int, size: int, hasher: StreamCheck | None) -> bytes:
    chunk = read(offset, size)
    if hasher is not None:
        hasher.update(chunk)
    return chunk


def _next_hashed(source: Iterator[bytes], hasher: StreamCheck) -> bytes | None:
    chunk = next(source, None)
    if chunk is not None:
        hasher.update(chunk)
    return chunk


async def _slice(data: bytes, start: int, end: int) -> AsyncGenerator[bytes, None]:
    yield data[start:end]


async def _disk_range(blob: DiskStream, start: int, end: int) -> AsyncGenerator[bytes, None]:
    try:
        offset = start
        while offset < end:
            size = min(STREAM_CHUNK, end - offset)
            yield await blob.read(offset, size, exact=True)
            offset += size
    finally:
        blob.close()


async def _verified(
    blob: DiskStream | S3Stream, start: int, end: int, check: StreamCheck, read: Callable[[], Awaitable[bytes | None]]
) -> AsyncGenerator[bytes, None]:
    """Stream the whole source and yield [start, end) of it; `read` feeds every chunk to
    `check` as it reads it. The last piece is held back until the check passes, so a corrupt
    copy ends in a broken transfer, never in a complete response."""
    position = 0
    held: bytes | None = None
    try:
        while (chunk := await read()) is not None:
            piece = chunk[max(0, start - position) : max(0, end - position)]
            position += len(chunk)
            if piece:
                if held is not None:
                    yield held
                held = piece
        verdict = await blob.offload.run(check.verdict, blob.sha, blob.rehash)
        if position != blob.stat.size or not verdict.good:
            if blob.on_corrupt is not None and verdict.actual is not None:
                await blob.offload.run(blob.on_corrupt, verdict.actual, position)
            raise TransferAborted(f"the copy of {blob.sha} at {blob.stat.path} is corrupt; transfer aborted")
        if verdict.record is not None:
            await blob.offload.run(blob.record_sum, verdict.record)
        if held is not None:
            yield held
    finally:
        blob.close()
