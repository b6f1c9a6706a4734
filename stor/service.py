"""BlobService: read, stat, store and report on blobs, composed from the storage backends.

This is the only layer that moves blocking backend calls off the event loop, one thread hop
per operation (stat + open + read together), plus one per spooled MiB of a large upload.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TypeVar

import anyio

from stor import __version__
from stor.backends.disk import BlobStat, Disk, DiskHealth, now_ns
from stor.backends.pairs import MirroredWrite, Pair, StoragePool
from stor.digest import Sha
from stor.errors import BlobNotFound, StorageUnavailable
from stor.health import HealthMonitor
from stor.offload import Offload

SPOOL_BYTES = 1024 * 1024
"""Upload bytes buffered in memory before a thread hop writes them: bounds memory per upload."""

READ_WHOLE_BYTES = 1024 * 1024
"""Blobs up to this size are read in the same thread hop as the lookup."""

STREAM_CHUNK = 1024 * 1024

T = TypeVar("T")


@dataclass
class OpenBlob:
    """A located copy: its bytes when small, else an open fd to stream from (caller closes)."""

    sha: Sha
    stat: BlobStat
    disk: Disk
    offload: Offload
    data: bytes | None = None
    fd: int | None = None

    def chunks(self, start: int, end: int) -> AsyncGenerator[bytes, None]:
        """Bytes [start, end) of the copy, read off the event loop; closes the fd when done."""
        return _read_chunks(self, start, end)

    def close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)


async def _read_chunks(blob: OpenBlob, start: int, end: int) -> AsyncGenerator[bytes, None]:
    try:
        if blob.data is not None:
            yield blob.data[start:end]
            return
        fd = blob.fd
        if fd is None:
            raise ValueError("blob already closed")
        offset = start
        while offset < end:
            size = min(STREAM_CHUNK, end - offset)
            yield await blob.offload.run(blob.disk.read_at, fd, offset, size)
            offset += size
    finally:
        blob.close()


@dataclass(frozen=True)
class PutResult:
    created: bool
    paths: list[str]


@dataclass(frozen=True)
class PairState:
    index: int
    members: list[str]
    writable: bool
    state: str  # "healthy", "degraded" (some member down) or "down"


@dataclass(frozen=True)
class StatusReport:
    ok: bool
    reasons: list[str]
    disks: list[DiskHealth]
    pairs: list[PairState]
    version: str = __version__
    uptime: float = 0.0
    reserved_bytes: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class _Target:
    pair: Pair
    disks: list[Disk]
    mtime_ns: int | None
    kept: list[str]  # paths of copies already in place


@dataclass
class _Copies:
    pair: Pair
    present: dict[str, BlobStat]

    @property
    def complete(self) -> bool:
        return len(self.present) == len(self.pair.members)


class BlobService:
    def __init__(self, pool: StoragePool, monitor: HealthMonitor, *, threads: int = 32) -> None:
        self.pool = pool
        self.monitor = monitor
        self.offload = Offload(threads)
        self._started = time.monotonic()
        self._sha_locks: dict[Sha, tuple[asyncio.Lock, int]] = {}

    # -- start-up and shutdown -------------------------------------------------------------

    def prepare(self) -> int:
        """Claim temp directories and sweep stale temps on every disk (blocking, start-up)."""
        return sum(disk.prepare() for disk in self.pool.disks)

    def close(self) -> None:
        self.offload.close()
        self.monitor.close()

    # -- reads -----------------------------------------------------------------------------

    async def stat(self, sha: Sha) -> BlobStat:
        return await self.offload.run(self._first_copy, sha, Disk.stat)

    async def open(self, sha: Sha) -> OpenBlob:
        return await self.offload.run(self._first_copy, sha, self._open_copy)

    def _first_copy(self, sha: Sha, probe: Callable[[Disk, Sha], T | None]) -> T:
        """`probe` each disk in Stor's order until one has the blob. A disk that fails counts
        as unreachable and the next copy is tried; 404 only when every disk answered."""
        unreachable: list[str] = []
        for disk in self.pool.probe_order():
            try:
                found = probe(disk, sha)
            except StorageUnavailable as exc:
                unreachable.append(str(exc))
                continue
            if found is not None:
                return found
        if unreachable:
            raise StorageUnavailable(
                f"blob {sha} not found, and some storage was unreachable: " + "; ".join(unreachable)
            )
        raise BlobNotFound(sha)

    def _open_copy(self, disk: Disk, sha: Sha) -> OpenBlob | None:
        """Open the copy on `disk`; a small one is read whole in the same thread hop."""
        opened = disk.open(sha)
        if opened is None:
            return None
        fd, st = opened
        if st.size > READ_WHOLE_BYTES:
            return OpenBlob(sha, st, disk, self.offload, fd=fd)
        try:
            return OpenBlob(sha, st, disk, self.offload, data=disk.read_at(fd, 0, st.size))
        finally:
            os.close(fd)

    # -- writes ----------------------------------------------------------------------------

    async def put(self, sha: Sha, body: AsyncIterator[bytes], length: int | None) -> PutResult:
        """Store the body under `sha`. When every copy already exists the body is not read."""
        async with self._sha_lock(sha):
            plan = await self.offload.run(self._plan, sha, length or 0)
            if isinstance(plan, list):
                return PutResult(False, plan)
            with self.pool.reservation(plan.pair, length or 0):
                written = await self._write(sha, plan.disks, body, plan.mtime_ns)
            return PutResult(True, plan.kept + written)

    def _plan(self, sha: Sha, size: int) -> list[str] | _Target:
        """The paths of every copy when the blob is already stored on a pair; otherwise where
        to write: the missing members of a healthy pair that holds some copies (keeping their
        mtime), else every member of a pair chosen by free space."""
        copies = self._copies(sha)
        if copies is not None:
            if copies.complete:
                return [copies.present[d.root].path for d in copies.pair.members]
            if copies.pair.writable and self.monitor.pair_healthy(copies.pair):
                missing = [d for d in copies.pair.members if d.root not in copies.present]
                mtime = min(st.mtime_ns for st in copies.present.values())
                return _Target(copies.pair, missing, mtime, [st.path for st in copies.present.values()])
        pair = self.pool.choose_pair(size, self.monitor.pair_healthy)
        return _Target(pair, list(pair.members), None, [])

    def _copies(self, sha: Sha) -> _Copies | None:
        """Which members of which pair hold `sha`; unreachable disks count as not holding it."""
        for disk in self.pool.probe_order():
            try:
                found = disk.stat(sha)
            except StorageUnavailable:
                continue
            if found is None:
                continue
            pair = self.pool.pair_of[disk.root]
            present = {disk.root: found}
            for partner in pair.members:
                if partner is not disk:
                    try:
                        other = partner.stat(sha)
                    except StorageUnavailable:
                        other = None
                    if other is not None:
                        present[partner.root] = other
            return _Copies(pair, present)
        return None

    async def _write(self, sha: Sha, disks: list[Disk], body: AsyncIterator[bytes], mtime: int | None) -> list[str]:
        writer = MirroredWrite(disks)
        try:
            buffer = bytearray()
            async for chunk in body:
                buffer += chunk
                if len(buffer) >= SPOOL_BYTES:
                    await self.offload.run(writer.write, buffer)
                    buffer.clear()
            return await self.offload.run(_finish, writer, sha, bytes(buffer), mtime)
        except BaseException:
            await self.offload.run(writer.abort)  # runs to the end even when cancelled
            raise

    @asynccontextmanager
    async def _sha_lock(self, sha: Sha) -> AsyncIterator[None]:
        """Serialise uploads of one sha in this process: the second finds the first's copies
        and answers "exists" without reading its body."""
        lock, users = self._sha_locks.get(sha, (asyncio.Lock(), 0))
        self._sha_locks[sha] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._sha_locks[sha]
            if users == 1:
                del self._sha_locks[sha]
            else:
                self._sha_locks[sha] = (lock, users - 1)

    # -- status ----------------------------------------------------------------------------

    async def status(self) -> StatusReport:
        disks = await self.monitor.check()
        by_root = {h.path: h for h in disks}
        reasons = [f"{h.path}: {h.error}" for h in disks if not h.ok]
        pairs = []
        for pair in self.pool.pairs:
            up = sum(1 for d in pair.members if by_root[d.root].ok)
            state = "healthy" if up == len(pair.members) else "down" if up == 0 else "degraded"
            pairs.append(PairState(pair.index, [d.root for d in pair.members], pair.writable, state))
        return StatusReport(
            ok=not reasons,
            reasons=reasons,
            disks=disks,
            pairs=pairs,
            uptime=time.monotonic() - self._started,
            reserved_bytes={p.index: self.pool.reserved(p) for p in self.pool.pairs},
        )

    async def run_health_checks(self, interval: float) -> None:
        """Keep the health used by placement fresh (runs until cancelled)."""
        while True:
            await self.monitor.check()
            await anyio.sleep(interval)


def _finish(writer: MirroredWrite, sha: Sha, tail: bytes, mtime: int | None) -> list[str]:
    return writer.finish(sha, now_ns() if mtime is None else mtime, tail)
