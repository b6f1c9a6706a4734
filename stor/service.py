"""BlobService: read, stat, store and report on blobs, composed from the backends.

The disks are the truth. The location cache is a hint in front of them, S3 a fallback behind
them and a mirror of every write. This is the only layer that moves blocking backend calls off
the event loop: one thread hop per operation (cache, stat, open and read together), plus one
per spooled MiB of a large upload.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TypeVar

from stor import __version__
from stor.backends import nowait
from stor.backends.disk import BlobStat, Disk, DiskHealth, now_ns
from stor.backends.groupcommit import CommitStats, GroupCommits
from stor.backends.locations import ABSENT, CacheUnavailable, LocationCache, NoLocations
from stor.backends.namestore import NameStore
from stor.backends.openfiles import OpenCopy, OpenFiles
from stor.backends.pairs import MirroredWrite, Pair, StoragePool, settle
from stor.backends.s3 import S3Object, S3Store, S3Unavailable
from stor.backends.s3queue import S3Queue
from stor.blobs import OpenBlob
from stor.digest import Sha, sha_of
from stor.errors import (
    BlobLost,
    BlobNotFound,
    CorruptCopy,
    InsufficientStorage,
    StorageUnavailable,
)
from stor.healer import Healer
from stor.health import HealthMonitor
from stor.metrics import Metrics, NullMetrics
from stor.mirror import S3Mirror
from stor.nearcache import NearCache
from stor.offload import Offload
from stor.publish import publish
from stor.scrubstate import last_runs

log = logging.getLogger(__name__)

SPOOL_BYTES = 1024 * 1024
"""Upload bytes buffered in memory before a thread hop writes them: bounds memory per upload."""

READ_WHOLE_BYTES = 1024 * 1024
"""Blobs up to this size are read in the same thread hop as the lookup."""

S3_READ_WHOLE_BYTES = 4 * 1024 * 1024
"""S3 blobs up to this size are read and verified before the first header is sent."""

MAX_FILLS = 2

T = TypeVar("T")


@dataclass(frozen=True)
class BlobInfo:
    size: int
    copies: int
    s3: bool | None


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
    memcached: dict[str, object]
    s3: dict[str, object]
    scrub: list[dict[str, object]]
    version: str = __version__
    uptime: float = 0.0
    reserved_bytes: dict[int, int] = field(default_factory=dict)
    group_commit: dict[str, CommitStats] = field(default_factory=dict)


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


@dataclass(frozen=True)
class S3Settings:
    store: S3Store
    queue: S3Queue
    sync_writes: bool = False
    fill_local: bool = True


class BlobService:
    def __init__(
        self,
        pool: StoragePool,
        monitor: HealthMonitor,
        *,
        locations: LocationCache | None = None,
        near_cache_size: int = 100_000,
        open_files: OpenFiles | None = None,
        verify_on_read: bool = True,
        verify_on_read_max: int = 4 * 1024 * 1024,
        s3: S3Settings | None = None,
        metrics: Metrics | None = None,
        names: NameStore | None = None,
        threads: int = 64,
    ) -> None:
        self.pool = pool
        self.monitor = monitor
        self.locations: LocationCache = locations or NoLocations()
        self._cache_enabled = locations is not None
        self._near = NearCache(near_cache_size)
        self.open_files = open_files if open_files is not None else OpenFiles(0, ttl=0.0)
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing: asyncio.Task[None] | None = None
        self.metrics: Metrics = metrics or NullMetrics()
        self.offload = Offload(threads)
        self.commits = GroupCommits()
        self.s3 = s3
        self.names = names
        self.mirror = (
            S3Mirror(s3.store, s3.queue, self._local_path, self.offload, self.metrics) if s3 is not None else None
        )
        self._disk_by_root = {disk.root: disk for disk in pool.disks}
        self._started = time.monotonic()
        self._sha_locks: dict[Sha, tuple[asyncio.Lock, int]] = {}
        self._fills: dict[Sha, asyncio.Task[None]] = {}
        self.verify = verify_on_read
        self._read_whole = max(READ_WHOLE_BYTES, verify_on_read_max) if verify_on_read else READ_WHOLE_BYTES
        self.healer = Healer(self._heal)
        self._cache_reachable: bool | None = None
        self.scrub_runs: list[dict[str, object]] = []

    # -- start-up and shutdown -------------------------------------------------------------

    def prepare(self) -> int:
        """Claim temp and queue directories, sweep stale temps (blocking, at start-up)."""
        swept = sum(disk.prepare() for disk in self.pool.disks)
        if self.names is not None:
            self.names.prepare()
        if self.s3 is not None:
            returned = self.s3.queue.prepare()
            if returned:
                log.info("s3 mirror: %d blobs claimed by a process that died are queued again", returned)
        return swept

    async def run_background(self, health_interval: float) -> None:
        """Health probes, cache checks and the S3 mirror; runs until cancelled."""
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._health_loop(health_interval))
            tasks.create_task(self.healer.run())
            if self.mirror is not None:
                tasks.create_task(self.mirror.run())

    async def _health_loop(self, interval: float) -> None:
        while True:
            await self.monitor.check()
            await self.offload.run(self._drop_unhealthy_open_files)
            if self.s3 is not None:
                await self.offload.run(self.s3.queue.prepare)  # a disk that came back gets a queue again
            await self._check_cache()
            self.scrub_runs = await self.offload.run(last_runs, self.pool.pairs)
            await asyncio.sleep(interval)

    def _drop_unhealthy_open_files(self) -> None:
        for disk in self.pool.disks:
            last = self.monitor.last(disk)
            if last is None or not last.ok:
                self.open_files.forget_disk(disk.root)
        self.open_files.close_dropped()

    def close(self) -> None:
        for task in [*self._fills.values(), *self._tasks]:
            task.cancel()
        self.offload.close()
        self.commits.close()
        self.open_files.close()
        self.monitor.close()
        self.locations.close()
        self.metrics.close()

    # -- reads -----------------------------------------------------------------------------

    async def stat(self, sha: Sha) -> BlobStat:
        found = self.stat_now(sha)
        if found is not None:
            return found
        return await self.offload.run(self._stat, sha)

    def stat_now(self, sha: Sha) -> BlobStat | None:
        """`stat`, when it takes no thread hop (a kept-open copy); else None: await `stat`."""
        kept = self._kept(sha)
        return None if kept is None else kept.stat

    async def open(self, sha: Sha) -> OpenBlob:
        blob = self.open_now(sha)
        if blob is not None:
            return blob
        blob = await self.offload.run(self._open, sha)
        if blob.disk is None and self.s3 is not None and self.s3.fill_local:
            self._fill_later(sha, blob.data, blob.stat.size)
        return blob

    def open_now(self, sha: Sha) -> OpenBlob | None:
        """`open`, when it takes no thread hop: a small blob read on the event loop from a
        kept-open copy, when the page cache has it (see `OpenFiles`), and verified; else None:
        await `open`."""
        kept = self._kept(sha)
        if kept is None:
            return None
        data = self.open_files.read(kept)
        if data is None:
            return None
        if self.verify and sha_of(data) != sha:
            self.open_files.forget(sha)  # the thread path reads it again and quarantines it
            return None
        self.metrics.disk_read(kept.disk.root, len(data), 0.0)
        return OpenBlob(sha, kept.stat, self.offload, disk=kept.disk, data=data, metrics=self.metrics)

    def _kept(self, sha: Sha) -> OpenCopy | None:
        """The kept-open copy of `sha`, or one opened now on the event loop from the kernel's
        caches alone (the near cache's disk first, then Stor's order). On the event loop.

        Raises `BlobNotFound` when those caches prove the blob is nowhere (see
        `_absent_everywhere`); None means only that a thread must look."""
        kept = self.open_files.get(sha)
        if kept is not None:
            return kept if self.monitor.responsive(kept.disk) else None
        hint = self._near.get(sha)
        disks = self.pool.probe_order()
        if hint is not None and (first := self._disk_by_root.get(hint)) is not None:
            disks.insert(0, first)
        absent: set[str] = set()
        for disk in disks:
            if not self.open_files.usable(disk) or not self.monitor.responsive(disk):
                continue
            try:
                kept = self.open_files.open(sha, disk)
            except FileNotFoundError:
                absent.add(disk.root)
                continue
            if kept is not None:
                if self.open_files.closing_due:
                    self._close_dropped_later()
                if not self._partners_agree(disk, sha, kept.stat.size):
                    self.open_files.forget(sha)  # the thread path settles it (`_stat_checked`)
                    return None
                return kept
        if len(absent) == len(self.pool.disks) and self._absent_everywhere():
            self._near.forget(sha)
            self.metrics.lookup(0.0, len(absent))
            raise BlobNotFound(sha)
        return None

    def _absent_everywhere(self) -> bool:
        """After every disk's dentry cache said "no such file": whether that is the whole
        truth, so a 404 needs no thread. Not with S3 (it must be asked), and only when each
        disk's `.stor-tmp` is in the dentry cache too, proving it is mounted (on a bare
        mountpoint every blob is absent: that is a 503, which the thread path finds)."""
        if self.s3 is not None:
            return False
        for disk in self.pool.disks:
            try:
                fd = nowait.open_cached(disk.tmp_root, path_only=True)
            except FileNotFoundError:
                return False
            if fd is None:
                return False
            os.close(fd)  # an O_PATH fd: closing it touches no filesystem
        return True

    def _partners_agree(self, disk: Disk, sha: Sha, size: int) -> bool:
        """`_check_partners` and the size check of `_stat_checked`, for a copy opened on the
        event loop: the partners are looked up in the dentry cache (an O_PATH open and an
        `fstat`); only when that cannot tell does a thread look, in the background."""
        for partner in self._answering(self.pool.pair_of[disk.root].members):
            if partner is disk:
                continue
            if not partner.takes_nowait:  # its fstat might wait (FUSE, NFS): a thread looks
                self._background(self._check_partners, disk, sha, set())
                continue
            try:
                fd = nowait.open_cached(partner.blob_path(sha), path_only=True)
            except FileNotFoundError:
                self._heal_missing_copy(disk, partner, sha)
                continue
            if fd is None:
                self._background(self._check_partners, disk, sha, set())
                continue
            try:
                other = os.fstat(fd).st_size
            finally:
                os.close(fd)  # an O_PATH fd: closing it touches no filesystem
            if other != size:
                return False
        return True

    def _close_dropped_later(self) -> None:
        if self._closing is None or self._closing.done():
            self._closing = self._background(self.open_files.close_dropped)

    def _background(self, call: Callable[..., None], *args: object) -> asyncio.Task[None]:
        """Run a blocking call in a worker thread without waiting for it (nor failing with it)."""
        task = asyncio.get_running_loop().create_task(self.offload.run(call, *args))
        self._tasks.add(task)
        task.add_done_callback(self._background_done)
        return task

    def _background_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("background disk call failed: %s", task.exception())

    def _stat(self, sha: Sha) -> BlobStat:
        try:
            return self._lookup(sha, self._stat_checked)
        except (BlobNotFound, StorageUnavailable, BlobLost) as miss:
            if self.s3 is None:
                raise self._counted(miss) from None
            return self._s3_stat(sha, self._s3_call("head", miss, self.s3.store.head, sha))

    def _open(self, sha: Sha) -> OpenBlob:
        try:
            return self._lookup(sha, self._open_copy)
        except (BlobNotFound, StorageUnavailable, BlobLost) as miss:
            if self.s3 is None:
                raise self._counted(miss) from None
            found = self._s3_call("get", miss, self.s3.store.open, sha)
            stat = self._s3_stat(sha, found)
            blob = OpenBlob(sha, stat, self.offload, s3=found, on_corrupt=self._s3_corrupt, metrics=self.metrics)
            if found.size <= S3_READ_WHOLE_BYTES:
                blob.data, blob.s3 = self._read_verified(blob, found), None
            return blob

    def _s3_stat(self, sha: Sha, found: S3Object) -> BlobStat:
        assert self.s3 is not None
        return BlobStat(f"s3://{self.s3.store.bucket}/{sha}", found.size, found.mtime_ns)

    def _counted(self, miss: Exception) -> Exception:
        if isinstance(miss, BlobLost):
            self.metrics.integrity("lost")
        return miss

    def _read_verified(self, blob: OpenBlob, found: S3Object) -> bytes:
        try:
            data = b"".join(found.chunks())
        except S3Unavailable as exc:
            raise StorageUnavailable(str(exc)) from exc
        finally:
            found.close()
        actual = sha_of(data)
        if len(data) != blob.stat.size or actual != blob.sha:
            self._s3_corrupt(actual, len(data))
            raise CorruptCopy(f"the S3 copy of {blob.sha} is corrupt (its sha256 is {actual})")
        return data

    def _s3_corrupt(self, actual: str, size: int) -> None:
        self.metrics.integrity("s3_corrupt")
        log.error("the S3 copy of a blob is corrupt: sha256 %s, %d bytes; not served", actual, size)

    def _s3_call(self, operation: str, miss: Exception, call: Callable[[Sha], T | None], sha: Sha) -> T:
        """Ask S3 after the disks missed; keep the disks' verdict if S3 has nothing either."""
        started = time.monotonic()
        try:
            found = call(sha)
        except S3Unavailable as exc:
            self.metrics.s3(operation, False, time.monotonic() - started)
            raise StorageUnavailable(f"{miss}; and S3 could not be asked: {exc}") from exc
        self.metrics.s3(operation, True, time.monotonic() - started)
        if found is None:
            raise self._counted(miss)
        return found

    def _open_copy(self, disk: Disk, sha: Sha) -> OpenBlob | None:
        """Open the copy on `disk`. A small one is read whole in the same thread hop and, with
        `verify_on_read`, hashed before anything is sent; a corrupt one is quarantined."""
        began = time.monotonic()
        opened = disk.open(sha)
        if opened is None:
            return None
        fd, st = opened
        if st.size > self._read_whole:
            on_corrupt = functools.partial(self._corrupt, disk, sha, st)
            reopen = functools.partial(self._other_copy, sha)
            return OpenBlob(
                sha,
                st,
                self.offload,
                disk=disk,
                fd=fd,
                verify=self.verify,
                on_corrupt=on_corrupt,
                metrics=self.metrics,
                reopen=reopen,
            )
        try:
            data = disk.read_at(fd, 0, st.size)
        except BaseException:
            os.close(fd)
            raise
        self.metrics.disk_read(disk.root, st.size, time.monotonic() - began)
        if self.verify and (actual := sha_of(data)) != sha:
            os.close(fd)
            self._corrupt(disk, sha, st, actual, len(data))
            raise CorruptCopy(f"the copy of {sha} on {disk.root} is corrupt (its sha256 is {actual})")
        self.open_files.put(sha, disk, fd, st)
        return OpenBlob(sha, st, self.offload, disk=disk, data=data, metrics=self.metrics)

    def _answering(self, disks: Iterable[Disk]) -> list[Disk]:
        """The disks worth asking: not hung (see `HealthMonitor.responsive`). Every loop over
        disks on the request path goes through here, so none waits on a hung disk."""
        return [disk for disk in disks if self.monitor.responsive(disk)]

    def _other_copy(self, sha: Sha, failed: set[str]) -> tuple[Disk, int, BlobStat] | None:
        """A copy of `sha` on a responsive disk not in `failed`, opened (for a stream whose
        disk failed mid-way)."""
        for disk in self._answering(self.pool.probe_order()):
            if disk.root in failed:
                continue
            with contextlib.suppress(StorageUnavailable):
                opened = disk.open(sha)
                if opened is not None:
                    return disk, *opened
        return None

    def _stat_checked(self, disk: Disk, sha: Sha) -> BlobStat | None:
        """A stat, compared with the partners' sizes where that is cheap (one more stat each).
        Copies that disagree are hashed, and the bad ones quarantined."""
        found = disk.stat(sha)
        if found is None or not self.verify:
            return found
        pair = self.pool.pair_of[disk.root]
        for partner in self._answering(pair.members):
            if partner is disk:
                continue
            with contextlib.suppress(StorageUnavailable):
                other = partner.stat(sha)
                if other is not None and other.size != found.size:
                    return self._settle_sizes(pair, sha)
        return found

    def _settle_sizes(self, pair: Pair, sha: Sha) -> BlobStat:
        good: BlobStat | None = None
        for member in self._answering(pair.members):
            with contextlib.suppress(StorageUnavailable):
                hashed = member.hash_copy(sha)
                if hashed is None:
                    continue
                digest, st = hashed
                if digest == sha:
                    good = good or st
                else:
                    self._corrupt(member, sha, st, digest, st.size)
        if good is None:
            raise CorruptCopy(f"no copy of {sha} on pair {pair.index} passed verification")
        return good

    def _corrupt(self, disk: Disk, sha: Sha, stat: BlobStat, actual: str, size: int) -> None:
        """A copy failed verification: count it, quarantine it, and ask for a re-copy."""
        self.metrics.integrity("corrupt_copy")
        note = {"expected": sha, "actual": actual, "size": size, "mtime_ns": stat.mtime_ns, "time": time.time()}
        try:
            moved = disk.quarantine(sha, note)
        except (StorageUnavailable, InsufficientStorage) as exc:
            self.metrics.integrity("quarantine_failed")
            log.error("corrupt copy %s (sha256 %s) could not be quarantined: %s", stat.path, actual, exc)
        else:
            log.error("corrupt copy %s (sha256 %s, %d bytes) quarantined to %s", stat.path, actual, size, moved)
        self._near.forget(sha)
        self.open_files.forget(sha)
        if not self.healer.request(sha):
            self.metrics.integrity("heal_dropped")

    async def _heal(self, sha: Sha) -> None:
        """Re-copy `sha` onto the members that lost it, from a verified copy (disk or S3)."""
        blob = await self.open(sha)
        try:
            result = await self.put(sha, blob.chunks(0, blob.stat.size), blob.stat.size, mirror=False)
        finally:
            blob.close()
        if result.created:
            self.metrics.integrity("healed")
            log.info("healed %s: %s", sha, ", ".join(result.paths))

    def _lookup(self, sha: Sha, probe: Callable[[Disk, Sha], T | None]) -> T:
        """The cached location first (checked by `probe`), then every disk in Stor's order.
        A disk that fails counts as unreachable and the next is tried; 404 only when every
        disk answered."""
        hint = self._cache_get(sha)
        if hint == ABSENT:
            raise BlobNotFound(sha)
        corrupt: list[str] = []  # copies seen bad: if nothing good turns up, the blob is lost
        if hint is not None:
            found = self._probe_hint(sha, hint, probe, corrupt)
            if found is not None:
                return found
        started = time.monotonic()
        unreachable: list[str] = []
        missed: set[str] = set()
        attempts = 0
        for disk in self.pool.probe_order():
            if not self.monitor.responsive(disk):
                unreachable.append(f"{disk.root}: not responding (hung?)")
                continue
            attempts += 1
            try:
                found = probe(disk, sha)
            except CorruptCopy as exc:
                corrupt.append(str(exc))
                continue
            except StorageUnavailable as exc:
                unreachable.append(str(exc))
                continue
            if found is not None:
                self.metrics.lookup(time.monotonic() - started, attempts)
                self._remember(sha, disk.root)
                self._check_partners(disk, sha, missed)
                return found
            missed.add(disk.root)
        self.metrics.lookup(time.monotonic() - started, attempts)
        if unreachable:
            detail = "; ".join(unreachable + corrupt)
            raise StorageUnavailable(f"blob {sha} not found, and some storage was unreachable: {detail}")
        if corrupt:
            raise BlobLost(f"blob {sha} is lost: no copy passed verification ({'; '.join(corrupt)})")
        self._cache_do(self.locations.remember_absent, sha)
        raise BlobNotFound(sha)

    def _probe_hint(self, sha: Sha, hint: str, probe: Callable[[Disk, Sha], T | None], corrupt: list[str]) -> T | None:
        """The copy at the cached location, or None (and the stale entry dropped)."""
        cached = self._disk_by_root.get(hint)
        found = None
        if cached is not None and self.monitor.responsive(cached):
            try:
                found = probe(cached, sha)
            except CorruptCopy as exc:
                corrupt.append(str(exc))
            except StorageUnavailable:
                pass
        if found is not None:
            self._near.remember(sha, hint)  # a no-op refresh when it came from there
            return found
        self.metrics.cache("stale", 0.0)
        self._near.forget(sha)
        self._cache_do(self.locations.forget, sha)
        return None

    def _check_partners(self, disk: Disk, sha: Sha, missed: set[str]) -> None:
        """After a lookup found `sha` on `disk` the slow way (first read in this process), make
        sure its partners hold it too: a crash between the copies of an upload, or a copy
        removed by hand, leaves a one-copy blob that is healed here. One `stat` per partner
        the lookup has not already asked."""
        for partner in self._answering(self.pool.pair_of[disk.root].members):
            if partner is disk:
                continue
            absent = partner.root in missed
            if not absent:
                with contextlib.suppress(StorageUnavailable):
                    absent = partner.stat(sha) is None
            if absent:
                self._heal_missing_copy(disk, partner, sha)
                return

    def _heal_missing_copy(self, disk: Disk, partner: Disk, sha: Sha) -> None:
        log.warning("%s has a copy on %s but none on %s: healing", sha, disk.root, partner.root)
        self.metrics.integrity("missing_copy")
        if not self.healer.request(sha):
            self.metrics.integrity("heal_dropped")

    def _cache_get(self, sha: Sha) -> str | None:
        near = self._near.get(sha)
        if near is not None:
            self.metrics.cache("local", 0.0)
            return near
        if not self._cache_enabled:
            return None
        started = time.monotonic()
        try:
            hint = self.locations.get(sha)
        except CacheUnavailable:
            self.metrics.cache("error", time.monotonic() - started)
            return None
        result = "miss" if hint is None else "negative" if hint == ABSENT else "hit"
        self.metrics.cache(result, time.monotonic() - started)
        return hint

    def _remember(self, sha: Sha, root: str) -> None:
        self._near.remember(sha, root)
        if self._cache_enabled:
            self._cache_do(self.locations.remember, sha, root)

    def _cache_do(self, call: Callable[..., None], *args: object) -> None:
        try:
            call(*args)
        except CacheUnavailable:
            self.metrics.cache("error", 0.0)

    def _local_path(self, sha: Sha) -> str | None:
        """A readable local copy for the S3 mirror; None when no disk has one."""
        try:
            return self._lookup(sha, Disk.stat).path
        except BlobNotFound:
            return None

    async def stat_many(self, shas: list[Sha]) -> dict[Sha, BlobInfo | None]:
        """Batch existence: size and copy count per sha (None when stored nowhere), one thread
        hop per 1000 shas. At most one `stat` per copy; S3 is asked only about blobs no disk
        has (`s3` is None when it was not asked)."""
        answers: dict[Sha, BlobInfo | None] = {}
        for start in range(0, len(shas), 1000):
            answers.update(await self.offload.run(self._stat_batch, shas[start : start + 1000]))
        return answers

    def _stat_batch(self, shas: list[Sha]) -> dict[Sha, BlobInfo | None]:
        answers: dict[Sha, BlobInfo | None] = {}
        for sha in shas:
            copies = self._copies(sha)
            if copies is not None:
                size = next(iter(copies.present.values())).size
                answers[sha] = BlobInfo(size, len(copies.present), None)
                continue
            answers[sha] = self._s3_info(sha)
        return answers

    def _s3_info(self, sha: Sha) -> BlobInfo | None:
        if self.s3 is None:
            return None
        try:
            found = self.s3.store.head(sha)
        except S3Unavailable:
            return None
        return BlobInfo(found.size, 0, True) if found is not None else None

    # -- writes ----------------------------------------------------------------------------

    async def put(
        self,
        sha: Sha,
        body: AsyncIterator[bytes],
        length: int | None,
        *,
        mirror: bool = True,
        early_answer: bool = True,
    ) -> PutResult:
        """Store the body under `sha`. When every copy already exists the body is not read,
        unless `early_answer` is off and `length` is small (up to `SPOOL_BYTES`): the body is
        then read first (the client has sent it already: nothing is saved by leaving it), so
        that the check, the placement and the writes take a single thread hop."""
        mirror = mirror and self.s3 is not None
        async with self._sha_lock(sha):
            if not early_answer and length is not None and length <= SPOOL_BYTES:
                result = await self._put_small(sha, b"".join([chunk async for chunk in body]), mirror)
            else:
                result = await self._put_streamed(sha, body, length, mirror)
        if result.created and mirror and self.mirror is not None and self.s3 is not None:
            if self.s3.sync_writes:
                try:
                    await self.mirror.put_now(sha, result.paths[0])
                except S3Unavailable as exc:
                    raise StorageUnavailable(f"stored locally, but not yet in S3 (it stays queued): {exc}") from exc
            else:
                self.mirror.notify()
        return result

    async def _put_streamed(self, sha: Sha, body: AsyncIterator[bytes], length: int | None, mirror: bool) -> PutResult:
        plan = await self.offload.run(self._plan, sha, length or 0)
        if isinstance(plan, list):
            return PutResult(False, plan)
        with self.pool.reservation(plan.pair, length or 0):
            written = await self._write(sha, plan.disks, body, plan.mtime_ns, mirror)
        return PutResult(True, plan.kept + written)

    async def _put_small(self, sha: Sha, data: bytes, mirror: bool) -> PutResult:
        staged = await self.offload.run(self._plan_and_stage, sha, data, mirror)
        if isinstance(staged, PutResult):
            return staged
        plan, writer = staged
        try:
            paths = await self._publish(writer, sha)
        except BaseException:
            await self.offload.run(writer.abort)  # runs to the end even when cancelled
            raise
        finally:
            self.pool.release(plan.pair, len(data))
        return PutResult(True, plan.kept + paths)

    def _plan_and_stage(self, sha: Sha, data: bytes, mirror: bool) -> PutResult | tuple[_Target, MirroredWrite]:
        """`_plan`, then `_stage` of the whole body, in one thread hop: the result when the
        blob was stored already or is now; else the pair (reserved: the caller releases it)
        and the writer that `publish` finishes."""
        plan = self._plan(sha, len(data))
        if isinstance(plan, list):
            return PutResult(False, plan)
        self.pool.reserve(plan.pair, len(data))
        writer = MirroredWrite(plan.disks)
        try:
            paths = self._stage(writer, sha, data, plan.mtime_ns, mirror)
        except BaseException:
            writer.abort()
            self.pool.release(plan.pair, len(data))
            raise
        if paths is None:
            return plan, writer
        self.pool.release(plan.pair, len(data))
        return PutResult(True, plan.kept + paths)

    async def put_content(self, body: AsyncIterator[bytes], length: int | None) -> tuple[Sha, int, PutResult]:
        """Store a body whose sha is not known in advance (named files): it is hashed on the
        way in, and if the blob turns out to be stored already the new copies are dropped."""
        pair = await self.offload.run(self.pool.choose_pair, length or 0, self.monitor.pair_healthy)
        writer = MirroredWrite(list(pair.members))
        with self.pool.reservation(pair, length or 0):
            try:
                tail, size = await self._spool(writer, body)
                sha, existing = await self.offload.run(self._content_sha, writer, tail)
                if existing is not None:
                    await self.offload.run(writer.abort)
                    return sha, size, PutResult(False, existing)
                paths = await self._commit(writer, sha, b"", None, self.s3 is not None)
                return sha, size, PutResult(True, paths)
            except BaseException:
                await self.offload.run(writer.abort)
                raise

    async def _spool(self, writer: MirroredWrite, body: AsyncIterator[bytes]) -> tuple[bytes, int]:
        """Write the body to the temps a MiB at a time; return what is left (for the last,
        finishing hop) and the size of the whole body."""
        buffer = bytearray()
        size = 0
        async for chunk in body:
            buffer += chunk
            size += len(chunk)
            if len(buffer) >= SPOOL_BYTES:
                await self.offload.run(writer.write, buffer)
                buffer.clear()
        return bytes(buffer), size

    def _content_sha(self, writer: MirroredWrite, tail: bytes) -> tuple[Sha, list[str] | None]:
        """Spool the last bytes: the body's sha, and the paths of its copies if it is stored."""
        sha = writer.write_last(tail)
        copies = self._copies(sha)
        if copies is not None and copies.complete:
            return sha, [copies.present[d.root].path for d in copies.pair.members]
        return sha, None

    def store_file(self, sha: Sha, path: str) -> PutResult:
        """Blocking, for tools (`stor import`): store a local file under `sha` through the same
        plan, reservation and durable mirrored write as an upload. The file is hashed on the way
        in: if it does not match `sha`, nothing is stored (`DigestMismatch`)."""
        size = os.path.getsize(path)
        plan = self._plan(sha, size)
        if isinstance(plan, list):
            return PutResult(False, plan)
        writer = MirroredWrite(plan.disks)
        with self.pool.reservation(plan.pair, size), open(path, "rb") as source:
            try:
                tail = b""
                while chunk := source.read(SPOOL_BYTES):
                    if tail:
                        writer.write(tail)
                    tail = chunk
                written = self._finish(writer, sha, tail, plan.mtime_ns, self.s3 is not None)
            except BaseException:
                writer.abort()
                raise
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
        for disk in self._answering(self.pool.probe_order()):
            try:
                found = disk.stat(sha)
            except StorageUnavailable:
                continue
            if found is None:
                continue
            pair = self.pool.pair_of[disk.root]
            present = {disk.root: found}
            for partner in self._answering(pair.members):
                if partner is not disk:
                    try:
                        other = partner.stat(sha)
                    except StorageUnavailable:
                        other = None
                    if other is not None:
                        present[partner.root] = other
            return _Copies(pair, present)
        return None

    async def _write(
        self, sha: Sha, disks: list[Disk], body: AsyncIterator[bytes], mtime: int | None, mirror: bool
    ) -> list[str]:
        writer = MirroredWrite(disks)
        try:
            tail, _ = await self._spool(writer, body)
            return await self._commit(writer, sha, tail, mtime, mirror)
        except BaseException:
            await self.offload.run(writer.abort)  # runs to the end even when cancelled
            raise

    async def _commit(self, writer: MirroredWrite, sha: Sha, tail: bytes, mtime: int | None, mirror: bool) -> list[str]:
        """Check the digest and make every copy durable and visible: in the thread hop that
        writes the last bytes when no copy can be group-committed, else through `publish`."""
        paths = await self.offload.run(self._stage, writer, sha, tail, mtime, mirror)
        if paths is None:
            paths = await self._publish(writer, sha)
        return paths

    async def _publish(self, writer: MirroredWrite, sha: Sha) -> list[str]:
        paths = await publish(writer, sha, self.commits, self.offload)
        self._near.remember(sha, writer.disks[0].root)
        if self._cache_enabled:
            await self.offload.run(self._cache_do, self.locations.remember, sha, writer.disks[0].root)
        return paths

    def _stage(self, writer: MirroredWrite, sha: Sha, tail: bytes, mtime: int | None, mirror: bool) -> list[str] | None:
        """`MirroredWrite.stage`, and the S3 queue marker (made durable before any copy is
        linked: here, or by the first copy's group commit). When no copy is groupable they are
        committed here too, and their paths returned; else None (`publish` does the rest)."""
        writer.stage(sha, now_ns() if mtime is None else mtime, tail, group=True)
        temps = writer.temps
        if mirror:
            self._enqueue(writer.disks[0], sha, durable=not temps[0].groupable)
        if any(temp.groupable for temp in temps):
            return None
        paths = settle([temp.commit(sha) for temp in temps])
        self._remember(sha, writer.disks[0].root)
        return paths

    def _finish(self, writer: MirroredWrite, sha: Sha, tail: bytes, mtime: int | None, mirror: bool) -> list[str]:
        """Blocking, for tools: the whole upload in the calling thread, one copy at a time."""

        def enqueue() -> None:
            self._enqueue(writer.disks[0], sha, durable=True)

        paths = writer.finish(
            sha, now_ns() if mtime is None else mtime, tail, before_commit=enqueue if mirror else None
        )
        self._remember(sha, writer.disks[0].root)
        return paths

    def _enqueue(self, disk: Disk, sha: Sha, *, durable: bool) -> None:
        assert self.s3 is not None
        try:
            self.s3.queue.enqueue(disk, sha, durable=durable)
        except OSError as exc:
            raise StorageUnavailable(f"{disk.root}: cannot queue the S3 mirror: {exc.strerror}") from exc

    def _fill_later(self, sha: Sha, data: bytes | None, size: int) -> None:
        """Write a blob found only in S3 back to a pair, in the background, a few at a time."""
        if sha in self._fills or len(self._fills) >= MAX_FILLS:
            return
        task = asyncio.get_running_loop().create_task(self._fill(sha, data, size))
        self._fills[sha] = task
        task.add_done_callback(lambda _: self._fills.pop(sha, None))

    async def _fill(self, sha: Sha, data: bytes | None, size: int) -> None:
        assert self.s3 is not None
        try:
            if data is not None:
                await self.put(sha, _once(data), size, mirror=False)
                return
            found = await self.offload.run(self.s3.store.open, sha)
            if found is None:
                return
            try:
                await self.put(sha, _iterate(self.offload, found), size, mirror=False)
            finally:
                found.close()
        except Exception as exc:  # a fill is an optimisation: log it, never crash the loop
            log.warning("refilling %s from S3 failed: %s", sha, exc)
        else:
            log.info("refilled %s from S3", sha)

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
        self.metrics.healthcheck()
        disks, _ = await asyncio.gather(self.monitor.check(), self._check_cache())
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
            memcached={"configured": self._cache_enabled, "reachable": self._cache_reachable},
            s3=self._s3_status(),
            scrub=self.scrub_runs,
            uptime=time.monotonic() - self._started,
            reserved_bytes={p.index: self.pool.reserved(p) for p in self.pool.pairs},
            group_commit=self.commits.stats(),
        )

    async def _check_cache(self) -> None:
        """Ask the cache if it answers, within the status deadline (the breaker makes a dead
        cache answer at once)."""
        if not self._cache_enabled:
            return
        probe = asyncio.ensure_future(self.offload.run(self.locations.reachable))
        try:
            # not asyncio.wait_for: on Python 3.11 it swallows a cancellation that arrives as
            # the probe finishes, and a cancelled health loop then ran on forever
            async with asyncio.timeout(self.monitor.timeout):
                self._cache_reachable = await asyncio.shield(probe)
        except TimeoutError:
            self._cache_reachable = False

    def _s3_status(self) -> dict[str, object]:
        if self.s3 is None or self.mirror is None:
            return {"enabled": False}
        return {
            "enabled": True,
            "endpoint": self.s3.store.endpoint,
            "bucket": self.s3.store.bucket,
            "reachable": self.mirror.reachable,
            "backlog": self.mirror.backlog,
            "last_error": self.mirror.last_error,
            "sync_writes": self.s3.sync_writes,
        }


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def _iterate(offload: Offload, found: S3Object) -> AsyncIterator[bytes]:
    source = found.chunks()
    while (chunk := await offload.run(next, source, None)) is not None:
        yield chunk
