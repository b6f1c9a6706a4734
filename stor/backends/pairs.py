"""Mirrored storage pairs: placement by free space, Stor's probe order, and the mirrored write.

Contract:
- `StoragePool.probe_order` lists every disk once: the pairs in random order, one random
  member of each pair first, then the partners (Stor's order).
- `StoragePool.choose_pair` raises `InsufficientStorage` when no writable, healthy pair has
  room for the blob on its disks; the bytes reserved by uploads in flight only steer the choice.
- `PairWrite` streams one body into a temp file on every member, hashing once; `finish`
  makes every copy durable or raises, leaving no temp behind. `stage` stops before that, for
  a caller that group-commits the temps (see `groupcommit`) and calls `abort` in the end.
- All methods block; they are safe to call from several threads. `pairs`, `disks` and
  `pair_of` are replaced whole when a pair is added, never changed in place, so a reader
  that took one sees a consistent list.
"""

from __future__ import annotations

import os
import random
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from stor.backends.disk import Disk
from stor.backends.temps import TempFile
from stor.checksum import FastHasher
from stor.digest import Sha, new_hasher
from stor.errors import DigestMismatch, InsufficientStorage, StorageUnavailable

_LEVEL = re.compile(r"[0-9A-F]{2}")


@dataclass(eq=False)
class Pair:
    index: int
    members: tuple[Disk, ...]
    writable: bool  # from writable_pairs_regex (a config reload may change it); health is judged at run time

    def partners(self, disk: Disk) -> list[Disk]:
        """The members that should hold what `disk` holds: the partner rule, in one place."""
        return [member for member in self.members if member is not disk]


@dataclass(frozen=True)
class Candidate:
    pair: Pair
    free: int
    """Free space less the bytes promised to uploads in flight: what placement steers by."""
    room: int | None = None
    """Free space on the disks (`statvfs`, the smallest member's): what decides "no room"
    (None: `free`)."""

    @property
    def fits(self) -> int:
        return self.free if self.room is None else self.room


def pick_pair(candidates: list[Candidate], size: int, threshold: int, rng: random.Random) -> Pair:
    """The placement rule, free of I/O so it can be tested alone.

    Among pairs whose disks have room for `size`: if some have more than `threshold` free once
    promised bytes are counted, pick one of those at random, weighted by that; otherwise the
    one with the most. Promised bytes steer, never refuse: bytes merely promised by a
    `Content-Length` (a stalled or slow upload) must not make stor refuse an upload that fits.
    """
    roomy = [c for c in candidates if c.fits >= size]
    if not roomy:
        raise InsufficientStorage(f"no writable storage pair has room for {size} bytes")
    above = [c for c in roomy if c.free > threshold]
    if above:
        return rng.choices([c.pair for c in above], weights=[c.free for c in above])[0]
    return max(roomy, key=lambda c: (c.free, c.fits)).pair


class StoragePool:
    def __init__(self, pairs: list[Pair], *, placement_threshold: int, rng: random.Random | None = None) -> None:
        self.pairs = pairs
        self.disks = [disk for pair in pairs for disk in pair.members]
        self.pair_of = {disk.root: pair for pair in pairs for disk in pair.members}
        self.disk_at = {disk.root: disk for disk in self.disks}
        self.placement_threshold = placement_threshold
        self._rng = rng or random.Random()
        self._reserved = {pair.index: 0 for pair in pairs}
        self._lock = threading.Lock()

    def add(self, pair: Pair) -> None:
        """A pair added at run time (a config reload); its disks are prepared already."""
        with self._lock:
            self._reserved[pair.index] = 0
            self.pair_of = {**self.pair_of, **{disk.root: pair for disk in pair.members}}
            self.disks = [*self.disks, *pair.members]
            self.disk_at = {**self.disk_at, **{disk.root: disk for disk in pair.members}}
            self.pairs = [*self.pairs, pair]

    def probe_order(self) -> list[Disk]:
        pairs = list(self.pairs)
        self._rng.shuffle(pairs)
        firsts: list[Disk] = []
        partners: list[Disk] = []
        for pair in pairs:
            members = list(pair.members)
            first = members.pop(self._rng.randrange(len(members)))
            firsts.append(first)
            partners.extend(members)
        return firsts + partners

    def choose_pair(self, size: int, healthy: Callable[[Pair], bool]) -> Pair:
        """The pair for a new blob of `size` bytes (see `pick_pair`). When none has room and
        some writable pair was skipped because it is down, the answer is "unavailable" (503,
        worth retrying), not "full" (507)."""
        candidates = []
        down: list[str] = []
        for pair in self.pairs:
            if not pair.writable:
                continue
            if not healthy(pair):
                down.append(f"pair {pair.index} is unhealthy")
                continue
            try:
                room = min(disk.free_bytes() for disk in pair.members)
            except StorageUnavailable as exc:
                down.append(str(exc))
                continue
            with self._lock:
                promised = self._reserved[pair.index]
            candidates.append(Candidate(pair, room - promised, room))
        try:
            return pick_pair(candidates, size, self.placement_threshold, self._rng)
        except InsufficientStorage as full:
            if down:
                raise StorageUnavailable(f"{full}; {'; '.join(down)}") from None
            raise

    @contextmanager
    def reservation(self, pair: Pair, size: int) -> Iterator[None]:
        """Count `size` bytes as used on `pair` while an upload to it is in flight."""
        self.reserve(pair, size)
        try:
            yield
        finally:
            self.release(pair, size)

    def reserve(self, pair: Pair, size: int) -> None:
        """`reservation` for callers whose upload outlives a `with` block: `release` after."""
        with self._lock:
            self._reserved[pair.index] += size

    def release(self, pair: Pair, size: int) -> None:
        with self._lock:
            self._reserved[pair.index] -= size

    def reserved(self, pair: Pair) -> int:
        with self._lock:
            return self._reserved[pair.index]


class PairWrite:
    """One upload into temp files on several disks, hashed once as the bytes arrive."""

    def __init__(self, disks: list[Disk]) -> None:
        self.disks = disks
        self._temps: list[TempFile] = []
        self._hasher = new_hasher()
        self._fast = FastHasher()  # the copies' fast checksum, from the same bytes

    @property
    def temps(self) -> list[TempFile]:
        return list(self._temps)

    def write(self, data: bytes | bytearray) -> None:
        """Spool a part of the body (not the last) to every member."""
        try:
            self._open_temps()
            self._hasher.update(data)
            self._fast.update(data)
            for temp in self._temps:
                temp.write(data)
                if temp.groupable:  # so the group's syncfs finds little of it left to write
                    temp.start_writeback()
        except BaseException:
            self.abort()
            raise

    def finish(
        self, sha: Sha, mtime_ns: int, tail: bytes = b"", *, before_commit: Callable[[], None] | None = None
    ) -> list[str]:
        """Hash the last bytes, check the digest, then make every copy durable and visible.
        `before_commit` runs once every temp is durable, before any copy becomes visible.

        Returns the final paths. Raises `DigestMismatch` or a storage error; either way no
        temp is left behind (a copy already made visible stays: it is a valid blob). When
        nothing was spooled before, a mismatching body never touches the disks at all.
        """
        try:
            self.stage(sha, mtime_ns, tail, group=False)
            if before_commit is not None:
                before_commit()
            return settle([temp.commit(sha) for temp in self._temps])
        finally:
            self.abort()

    def stage(self, sha: Sha, mtime_ns: int, tail: bytes = b"", *, group: bool) -> None:
        """`finish` up to the point where every temp is complete, with its mtime, and nothing
        is visible yet. Temps that are not to be group-committed (all of them, without
        `group`) are fsynced here; the `groupable` ones are left to a `GroupCommit`."""
        self._hasher.update(tail)
        actual = self._hasher.hexdigest()
        if actual != sha:
            raise DigestMismatch(sha, actual)
        self._fast.update(tail)
        fast = self._fast.digest()
        self._open_temps()
        for temp in self._temps:
            temp.write(tail)
            temp.set_sum(fast)
            if group and temp.groupable:
                temp.set_mtime(mtime_ns)
            else:
                temp.sync(mtime_ns)

    def write_last(self, tail: bytes) -> Sha:
        """Spool the last part of a body whose sha was not known in advance, and return it;
        then `finish(that sha, mtime)` commits."""
        self.write(tail)
        return Sha(self._hasher.hexdigest())

    def _open_temps(self) -> None:
        if not self._temps:
            for disk in self.disks:  # one by one, so abort() finds every temp made so far
                self._temps.append(disk.new_temp())

    def abort(self) -> None:
        for temp in self._temps:
            temp.discard()


def settle(commits: list[tuple[str, bool]]) -> list[str]:
    """The paths of an upload's copies, given (path, created by this upload) for each: when
    another process won a race for some copy, every copy gets the oldest mtime among them,
    so `Last-Modified` is the same whichever copy answers."""
    paths = [path for path, _ in commits]
    if not all(created for _, created in commits):
        _align_mtimes(paths)
    return paths


def _align_mtimes(paths: list[str]) -> None:
    try:
        oldest = min(os.stat(path).st_mtime_ns for path in paths)
        for path in paths:
            os.utime(path, ns=(oldest, oldest))
    except OSError:
        pass  # cosmetic: the bytes are durable already; scrub evens mtimes out later


def leaves(pair: Pair, after: str = "") -> Iterator[str]:
    """Every `AB/CD/EF` directory of Stor's layout on any member of `pair`, in sorted order,
    those after `after` only: listed a directory at a time as it goes, so the first comes at
    once and nothing per blob is held, however large the store."""
    roots = [disk.root for disk in pair.members]
    for level1 in _union(roots, ""):
        if level1 < after[:2]:
            continue
        for level2 in _union(roots, level1):
            if f"{level1}/{level2}" < after[:5]:
                continue
            for level3 in _union(roots, f"{level1}/{level2}"):
                leaf = f"{level1}/{level2}/{level3}"
                if leaf > after:
                    yield leaf


def _union(roots: list[str], relative: str) -> list[str]:
    """The layout subdirectories of `relative` on any of `roots`, sorted."""
    return sorted(set().union(*(_subdirs(os.path.join(root, relative)) for root in roots)))


def _subdirs(path: str) -> list[str]:
    try:
        return [e.name for e in os.scandir(path) if _LEVEL.fullmatch(e.name) and e.is_dir(follow_symlinks=False)]
    except OSError:
        return []
