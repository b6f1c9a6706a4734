"""Lookup: where a blob's copies are, and the one read algorithm that finds one.

`find` is written once and run in two I/O modes (a `Mode`): `ThreadMode` here, from worker
threads, may wait on a disk; the event loop's mode (`hotpath.LoopMode`) answers from the kernel's
caches alone and gives up (`WouldBlock`) where it would wait. Either way: a blob an admin took
down is refused first (`BlobGone`, see `takedown`), whatever any disk or cache holds; then a
copy kept open, then the location hint (this process's near cache, and memcached in a thread), verified
by the probe itself; then every disk in Stor's order. A disk that fails, or that a mode may not
ask, counts as unreachable and the next is tried: 404 (`BlobNotFound`) only when every disk
answered "no copy" and the mode could prove the blob is nowhere else, 503 (`StorageUnavailable`)
when some could not answer, `BlobLost` when every copy seen failed verification. A copy found
the slow way has its partners checked (`Pair.partners`), and one that is missing is healed.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterable
from dataclasses import KW_ONLY, dataclass
from typing import Generic, TypeVar

from stor.backends.disk import Disk
from stor.backends.locations import ABSENT, LocationCache
from stor.backends.opencopy import OpenCopy
from stor.backends.openfiles import OpenFiles
from stor.backends.pairs import Pair, StoragePool
from stor.checksum import FastSum
from stor.digest import Sha
from stor.errors import BlobLost, BlobNotFound, CorruptCopy, StorageUnavailable
from stor.metrics import Metrics
from stor.model import BlobStat
from stor.service.health import HealthMonitor
from stor.service.hints import Hints
from stor.service.integrity import Integrity
from stor.service.nearcache import NearCache
from stor.service.offload import Offload
from stor.service.readmode import Found, Mode, Seen, WouldBlock
from stor.service.stream import DiskStream, InMemory, OpenBlob
from stor.service.takedown import Takedowns
from stor.service.verify import Verdict, check_bytes, check_copy, sha_of_copy

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)

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
    takedowns: Takedowns
    offload: Offload
    metrics: Metrics
    verify: bool
    verify_max: int

    def __post_init__(self) -> None:
        self.hints = Hints(self.near, self.locations, self.metrics, self.offload)

    def answering(self, disks: Iterable[Disk]) -> list[Disk]:
        """The disks worth asking: not hung (see `HealthMonitor.responsive`). Every loop over
        disks on the request path goes through here, so none waits on a hung disk."""
        return [disk for disk in disks if self.monitor.responsive(disk)]

    def partners(self, disk: Disk) -> list[Disk]:
        """The answering partners of `disk` (see `Pair.partners`)."""
        return self.answering(self.pool.pair_of[disk.root].partners(disk))

    # -- the read algorithm ----------------------------------------------------------------

    def find(self, sha: Sha, mode: Mode[T]) -> Found[T]:
        """A copy of `sha`, found as the module docstring says, in `mode`."""
        mode.refuse(sha)
        kept = mode.kept(sha)
        if kept is not None:
            return kept
        hint = mode.hint(sha)
        first = None if hint is None else self.pool.disk_at.get(hint)
        seen = Seen()
        asked_first = first is not None and mode.may_ask(first)
        if first is not None:
            found = self._ask(mode, first, sha, seen) if asked_first else None
            if found is not None:
                located = Found(found, first, "local", 0)
                mode.located(sha, located, seen.missed)
                return located
            mode.stale(sha)
        started, tried = time.monotonic(), 0
        for disk in self.pool.probe_order():
            if disk is first and asked_first:
                continue  # asked already, as the hint
            if not mode.may_ask(disk):
                seen.unreachable.append(f"{disk.root}: not responding (hung?)")
                continue
            tried += 1
            found = self._ask(mode, disk, sha, seen)
            if found is not None:
                mode.probed(tried, time.monotonic() - started)
                located = Found(found, disk, "miss", tried)
                mode.located(sha, located, seen.missed)
                return located
        mode.probed(tried, time.monotonic() - started)
        if seen.unreachable:
            raise mode.unreachable(sha, seen.unreachable + seen.corrupt)
        if seen.corrupt:
            raise BlobLost(f"blob {sha} is lost: no copy passed verification ({'; '.join(seen.corrupt)})")
        mode.absent(sha)
        raise BlobNotFound(sha)

    @staticmethod
    def _ask(mode: Mode[T], disk: Disk, sha: Sha, seen: Seen) -> T | None:
        try:
            found = mode.ask(disk, sha)
        except CorruptCopy as exc:
            seen.corrupt.append(str(exc))
            return None
        except (StorageUnavailable, WouldBlock) as exc:
            seen.unreachable.append(str(exc) or f"{disk.root}: cannot tell without waiting")
            return None
        if found is None:
            seen.missed.add(disk.root)
        return found

    def threaded(self, probe: Callable[[Disk, Sha], T | None]) -> ThreadMode[T]:
        """The mode of a worker thread, asking each disk with `probe`."""
        return ThreadMode(self, probe)

    def check_partners(self, disk: Disk, sha: Sha, missed: set[str]) -> None:
        """After a lookup found `sha` on `disk` the slow way (first read in this process), make
        sure its partners hold it too: a crash between the copies of an upload, or a copy
        removed by hand, leaves a one-copy blob that is healed here. One `stat` per partner
        the lookup has not already asked."""
        for partner in self.partners(disk):
            absent = partner.root in missed
            if not absent:
                with contextlib.suppress(StorageUnavailable):
                    absent = partner.stat(sha) is None
            if absent:
                self.integrity.missing_copy(disk, partner, sha)
                return

    def check_quarantine(self, sha: Sha) -> None:
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

    # -- probes: what a thread's `find` does with each disk ---------------------------------

    def stat_checked(self, disk: Disk, sha: Sha) -> BlobStat | None:
        """A stat, compared with the partners' sizes where that is cheap (one more stat each).
        Copies that disagree are hashed, and the bad ones quarantined."""
        found = disk.stat(sha)
        if found is None or not self.verify:
            return found
        for partner in self.partners(disk):
            with contextlib.suppress(StorageUnavailable):
                other = partner.stat(sha)
                if other is not None and other.size != found.size:
                    return self._settle_sizes(self.pool.pair_of[disk.root], sha)
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
        `verify`, hashed before anything is sent (then kept open for the event loop); a corrupt
        one is quarantined."""
        began = time.monotonic()
        copy = disk.open(sha)
        if copy is None:
            return None
        try:
            if copy.stat.size > READ_WHOLE_BYTES:
                return self._stream(copy, sha)
            data = copy.read_at(0, copy.stat.size)
            if self.verify:
                copy.fast = self._check(copy, sha, data)
        except BaseException:
            copy.close()
            raise
        self.metrics.disk_read(disk.root, copy.stat.size, time.monotonic() - began)
        if self.monitor.healthy(disk):
            self.open_files.put(sha, copy)
        else:
            copy.close()  # nothing stays open on a disk that is down: it can be unmounted
        return InMemory(sha, copy.stat, data)

    def _stream(self, copy: OpenCopy[Disk], sha: Sha) -> DiskStream:
        """A copy too big to read whole: verified whole first when it is small enough for that
        (so it can go out by `sendfile`, and a corrupt one is answered from another copy rather
        than aborted), else verified as it streams."""
        checked = self.verify and copy.stat.size <= self.verify_max and self._check_whole(copy, sha)
        return DiskStream(
            sha,
            copy.stat,
            copy,
            self.offload,
            checked=checked,
            verify=self.verify and not checked,
            recorded=copy.recorded_sum() if self.verify and not checked else None,
            on_corrupt=functools.partial(self.integrity.corrupt, copy.disk, sha, copy.stat),
            metrics=self.metrics,
            reopen=functools.partial(self._other_copy, sha),
        )

    def _check_whole(self, copy: OpenCopy[Disk], sha: Sha) -> bool:
        """Verify a copy too big to read into memory (see `verify.check_copy`)."""
        began = time.monotonic()
        verdict, size = check_copy(copy.read_into, sha, copy.recorded_sum())
        self.metrics.disk_read(copy.disk.root, size, time.monotonic() - began)
        self._act_on(verdict, copy, sha, size)
        return True

    def _check(self, copy: OpenCopy[Disk], sha: Sha, data: bytes) -> FastSum:
        """Verify a copy read whole (see `verify`): its fast checksum, for the kept-open copy's
        later reads."""
        verdict = check_bytes(sha, data, copy.recorded_sum())
        self._act_on(verdict, copy, sha, len(data))
        return verdict.fast

    def _act_on(self, verdict: Verdict, copy: OpenCopy[Disk], sha: Sha, size: int) -> None:
        """A corrupt copy (or one whose size changed) is quarantined and `CorruptCopy` raised; a
        good one missing its fast checksum, or with a wrong one, is given it."""
        if size != copy.stat.size or not verdict.good:
            actual = verdict.actual or sha_of_copy(copy.read_into)
            self.integrity.corrupt(copy.disk, sha, copy.stat, actual, size)
            raise CorruptCopy(f"the copy of {sha} on {copy.disk.root} is corrupt (its sha256 is {actual})")
        if verdict.record is not None:
            copy.record_sum(verdict.record)

    def _other_copy(self, sha: Sha, failed: set[str]) -> OpenCopy[Disk] | None:
        """A copy of `sha` on a responsive disk not in `failed`, opened (for a stream whose
        disk failed mid-way)."""
        for disk in self.answering(self.pool.probe_order()):
            if disk.root in failed:
                continue
            with contextlib.suppress(StorageUnavailable):
                copy = disk.open(sha)
                if copy is not None:
                    return copy
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
            return self.find(sha, self.threaded(Disk.stat)).value.path
        except BlobNotFound:
            return None


@dataclass(eq=False)
class ThreadMode(Generic[T]):
    """`find` from a worker thread: it may wait on a disk (each asked with `probe`), asks
    memcached, and settles what the event loop could not."""

    lookup: Lookup
    probe: Callable[[Disk, Sha], T | None]

    def refuse(self, sha: Sha) -> None:
        self.lookup.takedowns.refuse(sha)

    def kept(self, sha: Sha) -> Found[T] | None:
        return None  # the event loop has tried the copies kept open, or has no reason to

    def hint(self, sha: Sha) -> str | None:
        hint = self.lookup.hints.get(sha)
        if hint == ABSENT:
            raise BlobNotFound(sha)
        return hint

    def may_ask(self, disk: Disk) -> bool:
        return self.lookup.monitor.responsive(disk)

    def ask(self, disk: Disk, sha: Sha) -> T | None:
        return self.probe(disk, sha)

    def stale(self, sha: Sha) -> None:
        self.lookup.hints.forget(sha)

    def located(self, sha: Sha, found: Found[T], missed: set[str]) -> None:
        if found.how == "local":
            self.lookup.near.remember(sha, found.disk.root)  # a no-op refresh when it came from there
            return
        self.lookup.hints.remember(sha, found.disk.root)
        self.lookup.check_partners(found.disk, sha, missed)

    def probed(self, tried: int, elapsed: float) -> None:
        self.lookup.metrics.lookup(elapsed, tried)

    def unreachable(self, sha: Sha, reasons: list[str]) -> Exception:
        return StorageUnavailable(f"blob {sha} not found, and some storage was unreachable: {'; '.join(reasons)}")

    def absent(self, sha: Sha) -> None:
        self.lookup.check_quarantine(sha)
        self.lookup.hints.remember_absent(sha)
