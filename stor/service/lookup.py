"""Lookup: where a blob's copies are, found from worker threads.

The location caches first (this process's near cache, then memcached), each hint verified by
the probe itself (a `stat` or an open); then every disk in Stor's order. A disk that fails
counts as unreachable and the next is tried: 404 (`BlobNotFound`) only when every disk
answered, 503 (`StorageUnavailable`) when some could not, `BlobLost` when every copy seen
failed verification. A copy found the slow way has its partners checked, and one that is
missing is healed. Everything here blocks: call it in a worker thread.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import KW_ONLY, dataclass
from typing import TypeVar

from stor.backends.disk import Disk
from stor.backends.locations import ABSENT, CacheUnavailable, LocationCache
from stor.backends.openfiles import OpenFiles
from stor.backends.pairs import Pair, StoragePool
from stor.checksum import FastSum
from stor.digest import Sha
from stor.errors import BlobLost, BlobNotFound, CorruptCopy, StorageUnavailable
from stor.metrics import Metrics
from stor.model import BlobStat
from stor.service.health import HealthMonitor
from stor.service.integrity import Integrity
from stor.service.nearcache import NearCache
from stor.service.offload import Offload
from stor.service.stream import OpenBlob
from stor.service.verify import Verdict, check_bytes, check_copy, sha_of_copy

T = TypeVar("T")

READ_WHOLE_BYTES = 1024 * 1024
"""Blobs up to this size are read in the same thread hop as the lookup."""


@dataclass
class Copies:
    """The members of one pair that hold a blob, with their stats."""

    pair: Pair
    present: dict[str, BlobStat]

    @property
    def complete(self) -> bool:
        return len(self.present) == len(self.pair.members)


@dataclass(eq=False)
class Lookup:
    pool: StoragePool
    monitor: HealthMonitor
    _: KW_ONLY
    locations: LocationCache | None
    near: NearCache
    open_files: OpenFiles
    integrity: Integrity
    offload: Offload
    metrics: Metrics
    verify: bool
    verify_max: int

    def __post_init__(self) -> None:
        self.disk_by_root = {disk.root: disk for disk in self.pool.disks}

    def add(self, disks: list[Disk]) -> None:
        """Disks added at run time (a config reload)."""
        self.disk_by_root = {**self.disk_by_root, **{disk.root: disk for disk in disks}}

    def answering(self, disks: Iterable[Disk]) -> list[Disk]:
        """The disks worth asking: not hung (see `HealthMonitor.responsive`). Every loop over
        disks on the request path goes through here, so none waits on a hung disk."""
        return [disk for disk in disks if self.monitor.responsive(disk)]

    # -- finding one copy ------------------------------------------------------------------

    def find(self, sha: Sha, probe: Callable[[Disk, Sha], T | None]) -> T:
        """The cached location first (checked by `probe`), then every disk in Stor's order."""
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
                self.remember(sha, disk.root)
                self.check_partners(disk, sha, missed)
                return found
            missed.add(disk.root)
        self.metrics.lookup(time.monotonic() - started, attempts)
        if unreachable:
            detail = "; ".join(unreachable + corrupt)
            raise StorageUnavailable(f"blob {sha} not found, and some storage was unreachable: {detail}")
        if corrupt:
            raise BlobLost(f"blob {sha} is lost: no copy passed verification ({'; '.join(corrupt)})")
        self._check_quarantine(sha)
        if self.locations is not None:
            self._cache_do(self.locations.remember_absent, sha)
        raise BlobNotFound(sha)

    def _check_quarantine(self, sha: Sha) -> None:
        """A blob on no disk whose copies were quarantined is lost (500), not absent (404)."""
        held = []
        for disk in self.pool.disks:
            with contextlib.suppress(StorageUnavailable):
                if disk.quarantine.holds(sha):
                    held.append(disk.root)
        if held:
            raise BlobLost(
                f"blob {sha} is lost: its copies failed verification and are quarantined on {', '.join(held)}"
            )

    def _probe_hint(self, sha: Sha, hint: str, probe: Callable[[Disk, Sha], T | None], corrupt: list[str]) -> T | None:
        """The copy at the cached location, or None (and the stale entry dropped)."""
        cached = self.disk_by_root.get(hint)
        found = None
        if cached is not None and self.monitor.responsive(cached):
            try:
                found = probe(cached, sha)
            except CorruptCopy as exc:
                corrupt.append(str(exc))
            except StorageUnavailable:
                pass
        if found is not None:
            self.near.remember(sha, hint)  # a no-op refresh when it came from there
            return found
        self.metrics.cache("stale", 0.0)
        self.near.forget(sha)
        if self.locations is not None:
            self._cache_do(self.locations.forget, sha)
        return None

    def check_partners(self, disk: Disk, sha: Sha, missed: set[str]) -> None:
        """After a lookup found `sha` on `disk` the slow way (first read in this process), make
        sure its partners hold it too: a crash between the copies of an upload, or a copy
        removed by hand, leaves a one-copy blob that is healed here. One `stat` per partner
        the lookup has not already asked."""
        for partner in self.answering(self.pool.pair_of[disk.root].members):
            if partner is disk:
                continue
            absent = partner.root in missed
            if not absent:
                with contextlib.suppress(StorageUnavailable):
                    absent = partner.stat(sha) is None
            if absent:
                self.integrity.missing_copy(disk, partner, sha)
                return

    # -- the location caches ---------------------------------------------------------------

    def _cache_get(self, sha: Sha) -> str | None:
        near = self.near.get(sha)
        if near is not None:
            self.metrics.cache("local", 0.0)
            return near
        if self.locations is None:
            self.metrics.cache("miss", 0.0)  # Stor's meaning: the disks must be probed
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

    def remember(self, sha: Sha, root: str) -> None:
        self.near.remember(sha, root)
        if self.locations is not None:
            self._cache_do(self.locations.remember, sha, root)

    async def remember_soon(self, sha: Sha, root: str) -> None:
        """`remember`, from the event loop: a thread hop only for memcached."""
        self.near.remember(sha, root)
        if self.locations is not None:
            await self.offload.run(self._cache_do, self.locations.remember, sha, root)

    def _cache_do(self, call: Callable[..., None], *args: object) -> None:
        try:
            call(*args)
        except CacheUnavailable:
            self.metrics.cache("error", 0.0)

    # -- probes: what `find` does with each disk -------------------------------------------

    def stat_checked(self, disk: Disk, sha: Sha) -> BlobStat | None:
        """A stat, compared with the partners' sizes where that is cheap (one more stat each).
        Copies that disagree are hashed, and the bad ones quarantined."""
        found = disk.stat(sha)
        if found is None or not self.verify:
            return found
        pair = self.pool.pair_of[disk.root]
        for partner in self.answering(pair.members):
            if partner is disk:
                continue
            with contextlib.suppress(StorageUnavailable):
                other = partner.stat(sha)
                if other is not None and other.size != found.size:
                    return self._settle_sizes(pair, sha)
        return found

    def _settle_sizes(self, pair: Pair, sha: Sha) -> BlobStat:
        good: BlobStat | None = None
        for member in self.answering(pair.members):
            with contextlib.suppress(StorageUnavailable):
                hashed = member.hash_copy(sha)
                if hashed is None:
                    continue
                if hashed.sha == sha:
                    good = good or hashed.stat
                else:
                    self.integrity.corrupt(member, sha, hashed.stat, hashed.sha, hashed.stat.size)
        if good is None:
            raise CorruptCopy(f"no copy of {sha} on pair {pair.index} passed verification")
        return good

    def open_copy(self, disk: Disk, sha: Sha) -> OpenBlob | None:
        """Open the copy on `disk`. A small one is read whole in the same thread hop and, with
        `verify`, hashed before anything is sent; a corrupt one is quarantined."""
        began = time.monotonic()
        opened = disk.open(sha)
        if opened is None:
            return None
        fd, st = opened
        if st.size > READ_WHOLE_BYTES:
            try:
                checked = self.verify and st.size <= self.verify_max and self._check_whole(disk, fd, sha, st)
                recorded = disk.read_sum(fd) if self.verify and not checked else None
            except BaseException:
                os.close(fd)
                raise
            return OpenBlob(
                sha,
                st,
                self.offload,
                disk=disk,
                fd=fd,
                checked=checked,
                verify=self.verify and not checked,
                recorded=recorded,
                on_corrupt=functools.partial(self.integrity.corrupt, disk, sha, st),
                metrics=self.metrics,
                reopen=functools.partial(self._other_copy, sha),
            )
        try:
            data = disk.read_at(fd, 0, st.size)
            fast = self._check(disk, fd, sha, st, data) if self.verify else None
        except BaseException:
            os.close(fd)
            raise
        self.metrics.disk_read(disk.root, st.size, time.monotonic() - began)
        if self.monitor.healthy(disk):
            self.open_files.put(sha, disk, fd, st, fast)
        else:
            os.close(fd)  # nothing stays open on a disk that is down: it can be unmounted
        return OpenBlob(sha, st, self.offload, disk=disk, data=data, metrics=self.metrics)

    def _check_whole(self, disk: Disk, fd: int, sha: Sha, st: BlobStat) -> bool:
        """Verify a copy too big to read into memory before anything of it is sent (see
        `verify.check_copy`), so that it can be sent without passing through Python (see
        `OpenBlob.zero_copy`), and a corrupt one is answered from another copy, not aborted."""
        began = time.monotonic()
        verdict, size = check_copy(functools.partial(disk.read_into, fd), sha, disk.read_sum(fd))
        self.metrics.disk_read(disk.root, size, time.monotonic() - began)
        self._act_on(verdict, disk, fd, sha, st, size)
        return True

    def _check(self, disk: Disk, fd: int, sha: Sha, st: BlobStat, data: bytes) -> FastSum:
        """Verify a copy read whole (see `verify`): its fast checksum, for the kept-open copy's
        later reads."""
        verdict = check_bytes(sha, data, disk.read_sum(fd))
        self._act_on(verdict, disk, fd, sha, st, len(data))
        return verdict.fast

    def _act_on(self, verdict: Verdict, disk: Disk, fd: int, sha: Sha, st: BlobStat, size: int) -> None:
        """A corrupt copy (or one whose size changed) is quarantined and `CorruptCopy` raised; a
        good one missing its fast checksum, or with a wrong one, is given it."""
        if size != st.size or not verdict.good:
            actual = verdict.actual or sha_of_copy(functools.partial(disk.read_into, fd))
            self.integrity.corrupt(disk, sha, st, actual, size)
            raise CorruptCopy(f"the copy of {sha} on {disk.root} is corrupt (its sha256 is {actual})")
        if verdict.record is not None:
            disk.write_sum(fd, verdict.record)

    def _other_copy(self, sha: Sha, failed: set[str]) -> tuple[Disk, int, BlobStat] | None:
        """A copy of `sha` on a responsive disk not in `failed`, opened (for a stream whose
        disk failed mid-way)."""
        for disk in self.answering(self.pool.probe_order()):
            if disk.root in failed:
                continue
            with contextlib.suppress(StorageUnavailable):
                opened = disk.open(sha)
                if opened is not None:
                    return disk, *opened
        return None

    # -- every copy ------------------------------------------------------------------------

    def copies(self, sha: Sha, *, skip: Pair | None = None) -> Copies | None:
        """Which members of which pair (not `skip`) hold `sha`; unreachable disks count as not
        holding it."""
        for disk in self.answering(self.pool.probe_order()):
            if skip is not None and disk in skip.members:
                continue
            try:
                found = disk.stat(sha)
            except StorageUnavailable:
                continue
            if found is None:
                continue
            pair = self.pool.pair_of[disk.root]
            others = self.present_on(pair, sha, skip=disk)
            return Copies(pair, {disk.root: found, **others})
        return None

    def present_on(self, pair: Pair, sha: Sha, *, skip: Disk | None = None) -> dict[str, BlobStat]:
        """The stats of the copies of `sha` on the answering members of `pair` (but `skip`)."""
        present = {}
        for member in self.answering(pair.members):
            if member is not skip:
                with contextlib.suppress(StorageUnavailable):
                    if (found := member.stat(sha)) is not None:
                        present[member.root] = found
        return present

    def local_path(self, sha: Sha) -> str | None:
        """A readable local copy (for the S3 mirror); None when no disk has one."""
        try:
            return self.find(sha, Disk.stat).path
        except BlobNotFound:
            return None
