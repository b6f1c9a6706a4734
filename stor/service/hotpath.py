"""The hot path: a GET or HEAD answered on the event loop, with no thread hop.

It runs the one read algorithm (`Lookup.find`) in the event loop's mode (`LoopMode`): a copy
kept open (`OpenFiles`) or opened from the kernel's caches alone, the near cache's disk first,
then Stor's order. A small copy in the page cache is read and verified on the loop. Anything
short of that returns None, and the caller takes the thread path (`Lookup.find` in
`ThreadMode`), which does the real work and the error handling. Nothing here ever waits on a
disk; what needs a disk (a partner's check that the dentry cache cannot answer, closing dropped
copies) starts in the background.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from stor.backends.disk import Disk
from stor.backends.heldcopies import HeldCopy
from stor.backends.opencopy import OpenCopy
from stor.backends.openfiles import Kept
from stor.checksum import fast_sum
from stor.digest import Sha, sha_of
from stor.errors import BlobNotFound
from stor.model import BlobStat
from stor.service.lookup import Lookup
from stor.service.offload import Background
from stor.service.readmode import Found, WouldBlock
from stor.service.stream import InMemory, OpenBlob
from stor.service.takedown import gone


class HotPath:
    def __init__(self, lookup: Lookup, *, background: Background, s3_may_hold: bool) -> None:
        self.lookup = lookup
        self.pool = lookup.pool
        self.monitor = lookup.monitor
        self.near = lookup.near
        self.open_files = lookup.open_files
        self.integrity = lookup.integrity
        self.metrics = lookup.metrics
        self.verify = lookup.verify
        self.background = background
        self.s3_may_hold = s3_may_hold
        self._counts: dict[str, int] = {}  # event-loop only
        self.mode = LoopMode(self)

    def stat_now(self, sha: Sha) -> BlobStat | None:
        """The stat of a kept-open copy; None: a thread must look."""
        found = self._find(sha)
        if found is None:
            return None
        self._count(found)
        return found.value.stat

    def open_now(self, sha: Sha) -> OpenBlob | None:
        """A small blob read on the event loop from a kept-open copy when the page cache has
        it, or from its bytes held in memory (see `OpenFiles`), and verified; None: a thread
        must look."""
        found = self._find(sha)
        if found is None:
            return None
        kept = found.value
        data = self.open_files.read(kept)
        if data is None:
            return None
        if self.verify and not self._intact(kept, sha, data):
            self.open_files.forget(sha)  # the thread path reads it again, and SHA-256 decides
            return None
        self._count(found)
        if not isinstance(kept, HeldCopy):
            self.metrics.disk_read(kept.disk.root, len(data), 0.0)
        return InMemory(sha, kept.stat, data)

    def _find(self, sha: Sha) -> Found[Kept] | None:
        """`Lookup.find` on the event loop: None where it would have waited. Raises
        `BlobNotFound` when the kernel's caches prove the blob is nowhere."""
        try:
            return self.lookup.find(sha, self.mode)
        except WouldBlock:
            return None
        except BlobNotFound:
            self._tally("miss", len(self.pool.disks))
            raise

    def _intact(self, kept: Kept, sha: Sha, data: bytes) -> bool:
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

    def _count(self, found: Found[Kept]) -> None:
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

    def absent_everywhere(self, sha: Sha) -> bool:
        """After every disk's dentry cache said "no such file": whether that is the whole
        truth, so a 404 needs no thread. Not with S3 (it must be asked); only when each disk's
        clear mark (`ClearMark`, one call from the dentry cache) proves the disk mounted (on a
        bare mountpoint every blob is absent: that is a 503, which the thread path finds) and
        that neither its quarantine (then the blob is lost: a 500) nor its takedown records
        (on any disk that may hold one: then a 410) hold the blob. A mark not
        in place is put back by a thread, in the background."""
        if self.s3_may_hold:
            return False
        for disk in self.pool.disks:
            proof = disk.clear.proves_absent(sha)
            if proof is None:
                self.background.start_once(f"renew {disk.root}", disk.clear.renew)
            if not proof:
                return False
        return True

    def partners_agree(self, disk: Disk, sha: Sha, size: int) -> bool:
        """`Lookup.check_partners` and the size check of `Lookup.stat_checked`, for a copy
        opened on the event loop: the partners are looked up in the dentry cache; only when
        that cannot tell does a thread look, in the background."""
        for partner in self.lookup.partners(disk):
            try:
                other = partner.size_cached(sha) if partner.takes_nowait else None  # else its fstat might wait
            except FileNotFoundError:
                self.integrity.missing_copy(disk, partner, sha)
                continue
            if other is None:
                self.background.start(self.lookup.check_partners, disk, sha, set())
            elif other != size:
                return False
        return True


@dataclass(eq=False)
class LoopMode:
    """`Lookup.find` on the event loop: the copy kept open first, then the near cache's disk
    (memcached would need a thread), then Stor's order, each disk asked from the kernel's caches
    alone; wherever that cannot tell, `WouldBlock`."""

    hot: HotPath

    def refuse(self, sha: Sha) -> None:
        found = self.hot.lookup.takedowns.gone_now(sha)
        if found is not None:
            raise gone(found)

    def kept(self, sha: Sha) -> Found[Kept] | None:
        kept = self.hot.open_files.get(sha)
        if kept is None:
            return None
        if not self.hot.monitor.responsive(kept.disk):
            raise WouldBlock
        if self.hot.open_files.due(kept):  # renewed on the loop: no reopen, no second SHA-256
            self._partners_agree(kept, sha)
        return Found(kept, kept.disk, "kept", 0)

    def hint(self, sha: Sha) -> str | None:
        return self.hot.near.get(sha)

    def may_ask(self, disk: Disk) -> bool:
        # nothing is kept open on a disk that failed its probe (see `BlobService`)
        return self.hot.open_files.usable(disk) and self.hot.monitor.healthy(disk)

    def ask(self, disk: Disk, sha: Sha) -> OpenCopy[Disk] | None:
        try:
            copy = self.hot.open_files.open(sha, disk)
        except FileNotFoundError:
            return None
        if copy is None:
            raise WouldBlock
        if self.hot.open_files.closing_due:
            self.hot.background.start_once("close_dropped", self.hot.open_files.close_dropped)
        return copy

    def stale(self, sha: Sha) -> None:
        pass  # the near cache is corrected by the thread that finds the copy

    def located(self, sha: Sha, found: Found[Kept], missed: set[str]) -> None:
        if self.hot.open_files.due(found.value):  # not when opened again soon after a check
            self._partners_agree(found.value, sha)

    def _partners_agree(self, kept: Kept, sha: Sha) -> None:
        """`HotPath.partners_agree`, else `WouldBlock`: the thread path settles it
        (`Lookup.stat_checked`)."""
        if not self.hot.partners_agree(kept.disk, sha, kept.stat.size):
            self.hot.open_files.forget(sha)
            raise WouldBlock

    def probed(self, tried: int, elapsed: float) -> None:
        pass  # counted once the answer is certain (`HotPath._count`)

    def unreachable(self, sha: Sha, reasons: list[str]) -> Exception:
        return WouldBlock()

    def absent(self, sha: Sha) -> None:
        # `refuse` asked this process's memory of the tombstones; the clear marks vouch for the
        # records on the disks (a tombstone the memory missed makes it a 410: a thread reads it)
        if not self.hot.absent_everywhere(sha):
            raise WouldBlock
        self.hot.near.forget(sha)
