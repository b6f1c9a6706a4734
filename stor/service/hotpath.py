"""The hot path: a GET or HEAD answered on the event loop, with no thread hop.

A blob's copy is kept open (`OpenFiles`) or opened on the loop from the kernel's caches alone
(`nowait`): the near cache's disk first, then Stor's order. A small copy in the page cache is
read and verified on the loop. Anything short of that returns None, and the caller takes the
thread path (`Lookup`), which does the real work and the error handling. Nothing here ever
waits on a disk; what needs a disk (a partner's check that the dentry cache cannot answer,
closing dropped fds) starts in the background.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import KW_ONLY, dataclass
from typing import NamedTuple

from stor.backends import nowait
from stor.backends.disk import Disk
from stor.backends.openfiles import OpenCopy, OpenFiles
from stor.backends.pairs import StoragePool
from stor.checksum import fast_sum
from stor.digest import Sha, sha_of
from stor.errors import BlobNotFound
from stor.metrics import Metrics
from stor.model import BlobStat
from stor.service.health import HealthMonitor
from stor.service.integrity import Integrity
from stor.service.lookup import Lookup
from stor.service.nearcache import NearCache
from stor.service.offload import Background
from stor.service.stream import OpenBlob


class _Found(NamedTuple):
    copy: OpenCopy
    how: str  # kept, local (the near cache's disk) or miss (the disks were probed)
    tried: int  # disks probed, for a miss


@dataclass(eq=False)
class HotPath:
    pool: StoragePool
    monitor: HealthMonitor
    lookup: Lookup
    _: KW_ONLY
    near: NearCache
    open_files: OpenFiles
    integrity: Integrity
    background: Background
    metrics: Metrics
    verify: bool
    s3_may_hold: bool

    def __post_init__(self) -> None:
        self._counts: dict[str, int] = {}  # event-loop only

    def stat_now(self, sha: Sha) -> BlobStat | None:
        """The stat of a kept-open copy; None: a thread must look."""
        found = self._kept(sha)
        if found is None:
            return None
        self._count(found)
        return found.copy.stat

    def open_now(self, sha: Sha) -> OpenBlob | None:
        """A small blob read on the event loop from a kept-open copy, when the page cache has
        it (see `OpenFiles`), and verified; None: a thread must look."""
        found = self._kept(sha)
        if found is None:
            return None
        kept = found.copy
        data = self.open_files.read(kept)
        if data is None:
            return None
        if self.verify and not self._intact(kept, sha, data):
            self.open_files.forget(sha)  # the thread path reads it again, and SHA-256 decides
            return None
        self._count(found)
        self.metrics.disk_read(kept.disk.root, len(data), 0.0)
        return OpenBlob(sha, kept.stat, self.lookup.offload, disk=kept.disk, data=data, metrics=self.metrics)

    def _intact(self, kept: OpenCopy, sha: Sha, data: bytes) -> bool:
        """`data` read from `kept` checked against the fast checksum of the bytes it held when
        they were verified. A copy opened on the loop has none yet: SHA-256 checks it once, and
        its fast checksum is kept for the reads that follow. (Its attribute on disk is left
        alone: reading or writing it might wait on the disk. A copy that lacks one is given it
        when a thread reads it, or by `stor scrub --repair`.)"""
        if kept.fast is not None:
            return fast_sum(data) == kept.fast
        if sha_of(data) != sha:
            return False
        kept.fast = fast_sum(data)
        return True

    def _kept(self, sha: Sha) -> _Found | None:
        """The kept-open copy of `sha`, or one opened now from the kernel's caches alone (the
        near cache's disk first, then Stor's order), and how its location was known.

        Raises `BlobNotFound` when those caches prove the blob is nowhere (see
        `_absent_everywhere`); None means only that a thread must look."""
        kept = self.open_files.get(sha)
        if kept is not None:
            return _Found(kept, "kept", 0) if self.monitor.responsive(kept.disk) else None
        hint = self.near.get(sha)
        disks = self.pool.probe_order()
        first = None if hint is None else self.lookup.disk_by_root.get(hint)
        hinted = first is not None
        if first is not None:
            disks = [first, *(disk for disk in disks if disk is not first)]
        absent: set[str] = set()
        tried = 0
        for disk in disks:
            if not self.open_files.usable(disk) or not self.monitor.healthy(disk):
                continue  # nothing is kept open on a disk that failed its probe (see `BlobService`)
            tried += 1
            try:
                kept = self.open_files.open(sha, disk)
            except FileNotFoundError:
                absent.add(disk.root)
                continue
            if kept is not None:
                if self.open_files.closing_due:
                    self.background.start_once("close_dropped", self.open_files.close_dropped)
                if not self._partners_agree(disk, sha, kept.stat.size):
                    self.open_files.forget(sha)  # the thread path settles it (`Lookup.stat_checked`)
                    return None
                return _Found(kept, "local", 0) if hinted and disk is first else _Found(kept, "miss", tried)
        if len(absent) == len(self.pool.disks) and self._absent_everywhere(sha):
            self.near.forget(sha)
            self._tally("miss", len(absent))
            raise BlobNotFound(sha)
        return None

    def _count(self, found: _Found) -> None:
        self._tally(found.how, found.tried)

    def _tally(self, how: str, tried: int) -> None:
        """Stor's cache and lookup events, for an answer that took no thread: a location known
        without probing is a hit (kept open, or the near cache's disk had it). Counted here and
        handed to the metrics by `flush_counts`: on the loop, a dict increment is all it costs."""
        self._counts[how] = self._counts.get(how, 0) + 1
        if how == "miss":
            self.metrics.lookup(0.0, tried)

    async def flush_counts(self, interval: float = 1.0) -> None:
        """Hand the counts to the metrics every `interval` seconds, until cancelled."""
        try:
            while True:
                await asyncio.sleep(interval)
                self._flush()
        finally:
            self._flush()

    def _flush(self) -> None:
        counts, self._counts = self._counts, {}
        for how, count in counts.items():
            self.metrics.cache(how, 0.0, count)

    def _absent_everywhere(self, sha: Sha) -> bool:
        """After every disk's dentry cache said "no such file": whether that is the whole
        truth, so a 404 needs no thread. Not with S3 (it must be asked); only when each
        disk's `.stor-tmp` is in the dentry cache too, proving it is mounted (on a bare
        mountpoint every blob is absent: that is a 503, which the thread path finds); and
        only when no disk's quarantine may hold the blob (then it is lost: a 500)."""
        if self.s3_may_hold:
            return False
        for disk in self.pool.disks:
            try:
                fd = nowait.open_cached(disk.tmp_root, path_only=True)
            except FileNotFoundError:
                return False
            if fd is None:
                return False
            os.close(fd)  # an O_PATH fd: closing it touches no filesystem
            if not self._quarantine_clear(disk, sha):
                return False
        return True

    @staticmethod
    def _quarantine_clear(disk: Disk, sha: Sha) -> bool:
        try:
            fd = nowait.open_cached(disk.quarantine.root, path_only=True)
        except FileNotFoundError:
            return True  # no quarantine on this disk at all
        if fd is None:
            return False
        try:
            mtime = os.fstat(fd).st_mtime_ns
        finally:
            os.close(fd)
        return disk.quarantine.known_clear(sha, mtime)

    def _partners_agree(self, disk: Disk, sha: Sha, size: int) -> bool:
        """`Lookup.check_partners` and the size check of `Lookup.stat_checked`, for a copy
        opened on the event loop: the partners are looked up in the dentry cache (an O_PATH
        open and an `fstat`); only when that cannot tell does a thread look, in the background."""
        for partner in self.lookup.answering(self.pool.pair_of[disk.root].members):
            if partner is disk:
                continue
            if not partner.takes_nowait:  # its fstat might wait (FUSE, NFS): a thread looks
                self.background.start(self.lookup.check_partners, disk, sha, set())
                continue
            try:
                fd = nowait.open_cached(partner.blob_path(sha), path_only=True)
            except FileNotFoundError:
                self.integrity.missing_copy(disk, partner, sha)
                continue
            if fd is None:
                self.background.start(self.lookup.check_partners, disk, sha, set())
                continue
            try:
                other = os.fstat(fd).st_size
            finally:
                os.close(fd)  # an O_PATH fd: closing it touches no filesystem
            if other != size:
                return False
        return True
