"""Takedown records ("tombstones"): which blobs an admin took down, when, by whom and why.

Representation: one small JSON file per blob, `{"sha", "time", "admin", "reason"}`, named
`<SHA>.json` in `<root>/.stor-tombstones/` on every member of the records' home pair
(`recordplaces`: read wherever they are, so they can move with the name records), written like a
name record (temp on the same filesystem, fsync, rename, directory fsync), so a tombstone is as
durable and as mirrored as a blob and every process sharing the disks sees it. Takedowns are
rare (hundreds, not millions), so the directory is flat and read whole when it changes.

Contract:
- `put` writes on every member of the home that answers and succeeds if at least one did (a
  takedown must work while a member is down; `reconcile` copies it over when the member
  returns); `StorageUnavailable` when none could be written.
- `get` asks every disk that may hold one, the home's members last; a disk that fails is
  skipped; `StorageUnavailable` when no member of the home could be asked.
- `cached` answers from the kernel's caches alone (safe on the event loop): None when every
  disk's clear mark (`clearmark`, which watches the directory on every disk that may hold one:
  `watch`; records are added inside its `adding`) proves there is none, else `UNKNOWN`.
- `all` is every tombstone of every disk, re-read only when a disk's directory changed.
- `evacuate` moves the tombstones of a pair that is not the home onto the home.
Blocking (but `cached`) and thread-safe.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from dataclasses import asdict, dataclass
from typing import Final

from stor.backends.disk import Disk, now_ns
from stor.backends.recordplaces import OnePair, RecordPlaces
from stor.backends.temps import fsync_dir
from stor.digest import Sha, parse_sha
from stor.errors import InvalidDigest, StorageUnavailable

TOMBSTONES_DIR = ".stor-tombstones"


@dataclass(frozen=True)
class Tombstone:
    sha: Sha
    time: float
    """When the blob was taken down (Unix time)."""
    admin: str
    reason: str


class _Unknown:
    def __repr__(self) -> str:
        return "UNKNOWN"


UNKNOWN: Final = _Unknown()
"""`cached` could not tell without waiting on a disk."""


def watch(disk: Disk) -> None:
    """Make `disk`'s clear mark vouch for its takedown records: before any can be written there
    (every disk of every pair, as it is made: the home may move onto any of them)."""
    disk.clear.watch(os.path.join(disk.root, TOMBSTONES_DIR))


class TombstoneStore:
    def __init__(self, places: RecordPlaces | tuple[Disk, ...]) -> None:
        self.places = OnePair(places) if isinstance(places, tuple) else places
        self._listings: dict[str, tuple[int, dict[Sha, Tombstone]]] = {}  # root -> (dir mtime, tombstones)
        self._lock = threading.Lock()
        for disk in self.places.readers():
            watch(disk)

    @property
    def members(self) -> tuple[Disk, ...]:
        """Every disk that may hold tombstones, the home's members last."""
        return self.places.readers()

    def _dir(self, disk: Disk) -> str:
        return os.path.join(disk.root, TOMBSTONES_DIR)

    def _path(self, disk: Disk, sha: Sha) -> str:
        return os.path.join(self._dir(disk), f"{sha.upper()}.json")

    def prepare(self) -> None:
        """Blocking, at start-up: the directory on every member of the home that answers."""
        for disk in self.places.home():
            with contextlib.suppress(OSError):
                self._make_dir(disk)

    def _make_dir(self, disk: Disk) -> None:
        """The directory, in a root that exists (never the root itself: a missing root is an
        unmounted disk)."""
        with contextlib.suppress(FileExistsError):
            os.mkdir(self._dir(disk))

    # -- reads -----------------------------------------------------------------------------

    def get(self, sha: Sha, members: list[Disk] | None = None) -> Tombstone | None:
        """From `members` (the ones not hung: default all), in `members`' order (the home last)."""
        home = self.places.home()
        asked = 0
        for disk in self.members if members is None else members:
            try:
                with disk.inflight.op():  # counted as the disk's operation: a hung one is seen as such
                    found = self._read(self._path(disk, sha))
            except FileNotFoundError:
                asked += disk in home
                continue
            except (OSError, ValueError):
                continue  # this member cannot say; the other may
            return found
        if not asked:
            raise StorageUnavailable("no member of the records' home pair could be asked for takedown records")
        return None

    def cached(self, sha: Sha) -> Tombstone | _Unknown | None:
        """`get` from the kernel's caches alone: every member's clear mark must prove the
        record absent; else `get` reads it (or finds it absent), off the loop."""
        if all(disk.clear.proves_absent(sha) for disk in self.members):
            return None
        return UNKNOWN

    def all(self, members: list[Disk] | None = None) -> dict[Sha, Tombstone]:
        """Every tombstone on `members` (default all) that answer (merged; the oldest wins)."""
        merged: dict[Sha, Tombstone] = {}
        for disk in self.members if members is None else members:
            with contextlib.suppress(OSError, StorageUnavailable), disk.inflight.op():
                for sha, tombstone in self._listing(disk).items():
                    if sha not in merged or tombstone.time < merged[sha].time:
                        merged[sha] = tombstone
        return merged

    def _listing(self, disk: Disk) -> dict[Sha, Tombstone]:
        directory = self._dir(disk)
        try:
            mtime = os.stat(directory).st_mtime_ns
        except FileNotFoundError:
            return {}
        with self._lock:
            known = self._listings.get(disk.root)
        if known is not None and known[0] == mtime and now_ns() - mtime > 50_000_000:
            return known[1]  # (a directory changed in the last 50 ms may change again in the same tick)
        previous = {} if known is None else known[1]
        found: dict[Sha, Tombstone] = {}
        for name in os.listdir(directory):
            sha = _sha_of(name)
            if sha is None:
                continue
            if sha in previous:
                found[sha] = previous[sha]
                continue
            with contextlib.suppress(OSError, ValueError):
                found[sha] = self._read(os.path.join(directory, name))
        with self._lock:
            self._listings[disk.root] = (mtime, found)
        return found

    @staticmethod
    def _read(path: str) -> Tombstone:
        with open(path, "rb") as handle:
            raw = json.loads(handle.read())
        return Tombstone(parse_sha(raw["sha"]), float(raw["time"]), str(raw["admin"]), str(raw["reason"]))

    # -- writes ----------------------------------------------------------------------------

    def put(self, tombstone: Tombstone) -> list[str]:
        """Write `tombstone` on every member of the home that answers; the roots written."""
        data = json.dumps(asdict(tombstone)).encode()
        written, errors = [], []
        for disk in self.places.home():
            try:
                self._write(disk, tombstone.sha, data)
            except (OSError, StorageUnavailable) as exc:
                errors.append(f"{disk.root}: {exc}")
                continue
            written.append(disk.root)
        if not written:
            raise StorageUnavailable(f"the takedown record could not be written: {'; '.join(errors)}")
        return written

    def _write(self, disk: Disk, sha: Sha, data: bytes) -> None:
        self._make_dir(disk)
        temp = disk.new_temp()
        try:
            temp.write(data)
            temp.sync(now_ns())
            with disk.clear.adding():
                temp.replace(self._path(disk, sha))
        finally:
            temp.discard()

    def remove(self, sha: Sha) -> list[str]:
        """Lift the takedown of `sha` on every member that answers; the roots it was lifted on.
        `StorageUnavailable` when a member holding it could not be changed."""
        lifted = []
        for disk in self.members:
            path = self._path(disk, sha)
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise StorageUnavailable(f"{disk.root}: cannot remove the takedown record: {exc.strerror}") from exc
            fsync_dir(os.path.dirname(path))
            lifted.append(disk.root)
        return lifted

    def reconcile(self, *, restore: bool) -> tuple[int, int]:
        """(tombstones, how many were missing on a member of the home): a member that was away
        during a takedown lacks its record (and records on another pair are not yet on the
        home); with `restore` it is written there now."""
        home = self.places.home()
        by_member = {disk.root: self._listing(disk) for disk in home}
        merged = self.all()
        missing = 0
        for disk in home:
            for sha, tombstone in merged.items():
                if sha in by_member[disk.root]:
                    continue
                missing += 1
                if restore:
                    self._write(disk, sha, json.dumps(asdict(tombstone)).encode())
        return len(merged), missing

    def evacuate(self, members: tuple[Disk, ...]) -> int:
        """Move every tombstone on `members` (a pair that is not the home) onto the home: each
        is durable on the home's members before it is removed from `members`, so a reader
        (which asks the home last) never misses it. Returns how many were moved."""
        home = self.places.home()
        if set(members) & set(home):
            raise StorageUnavailable("the takedown records' home pair cannot be evacuated onto itself")
        on_home = {disk.root: set(self._listing(disk)) for disk in home}
        moved: set[Sha] = set()
        for disk in members:
            listing = self._listing(disk)
            for sha, tombstone in listing.items():
                for target in home:
                    if sha not in on_home[target.root]:
                        self._write(target, sha, json.dumps(asdict(tombstone)).encode())
                        on_home[target.root].add(sha)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._path(disk, sha))
                    moved.add(sha)
            if listing:
                fsync_dir(self._dir(disk))
        return len(moved)

    def held_by(self, members: tuple[Disk, ...]) -> int:
        """How many tombstones `members` hold."""
        return sum(len(self._listing(disk)) for disk in members)


def _sha_of(name: str) -> Sha | None:
    if not name.endswith(".json") or len(name) != 69:
        return None
    try:
        return parse_sha(name[:64])
    except InvalidDigest:
        return None
