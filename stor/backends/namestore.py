"""Name → sha records for the path-named API, mirrored on one pair like blobs.

Representation: one small JSON file per name, `{"path", "sha", "size", "mtime"}`, in
`<root>/.stor-names/` on every member of the names pair (the first pair). The file is named by
the name itself with only `%` and `/` escaped (`a%2Fb.txt`): a listing needs no reads but a
directory scan, and decoding is two string replacements (full percent-decoding was 70% of a
100,000-name scan). Names whose file name would pass 240 bytes, or start with `.`, are filed
under `#<sha256 of the name>` and their name is read from the record. Either member alone
serves reads and listings (they are merged); a record found on one member only, or older on
one, is restored to the other, so a replaced disk fills in as names are read (and all at once
with `repair`, which `stor scrub --repair` runs). Writes use the blob protocol (temp on the same
filesystem, fsync, rename, directory fsync) on each member, under one of 256 striped `flock`s
chosen by the name, so two writers of one name are serialised across processes and the
members never disagree. Every process sees every change: a listing rescans a member's
directory whenever its mtime changed. Blocking and thread-safe.
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from stor.backends.disk import Disk, now_ns
from stor.backends.temps import fsync_dir
from stor.digest import Sha, parse_sha
from stor.errors import InvalidDigest, StorageUnavailable

log = logging.getLogger(__name__)

NAMES_DIR = ".stor-names"
_LOCKS = 256
_MAX_FILENAME = 240


@dataclass(frozen=True)
class NameRecord:
    path: str
    sha: Sha
    size: int
    mtime: float


class NameConflict(Exception):
    """`create` found the name taken."""


class NameStore:
    def __init__(self, members: tuple[Disk, ...]) -> None:
        self.members = members
        # per member: (dir mtime, names, hashed file names); merged: (the members' mtimes, ...)
        self._indexes: dict[str, tuple[int, list[str], dict[str, str]]] = {}
        self._merged: tuple[tuple[int, ...], list[str], dict[str, str]] | None = None
        self._index_lock = threading.Lock()

    def _dir(self, disk: Disk) -> str:
        return os.path.join(disk.root, NAMES_DIR)

    def prepare(self) -> None:
        for disk in self.members:
            os.makedirs(os.path.join(self._dir(disk), ".locks"), exist_ok=True)

    def _make_dirs(self, disk: Disk) -> None:
        """The record directories, on a disk that was replaced since start-up; never on a
        bare mountpoint (no sentinel: `StorageUnavailable`)."""
        if not os.path.isdir(disk.tmp_root):
            raise StorageUnavailable(f"{disk.root}: not a prepared storage directory (unmounted?)")
        os.makedirs(os.path.join(self._dir(disk), ".locks"), exist_ok=True)

    # -- reads -------------------------------------------------------------------------------

    def get(self, name: str) -> NameRecord | None:
        """The record of `name`: the newest any member holds. Either member alone will do; a
        member that lacks the record (a replaced disk) or holds an older one gets it back."""
        found, stale = self._find(name)
        if found is not None and stale:
            try:
                self._restore(found.path)
            except StorageUnavailable as exc:  # serving it matters more than mending it now
                log.warning("name %r not restored onto %s: %s", name, ", ".join(d.root for d in stale), exc)
        return found

    def _find(self, name: str) -> tuple[NameRecord | None, list[Disk]]:
        """The newest record of `name` on the members that answer, and the members that lack
        it or hold an older one. `StorageUnavailable` when no member answers."""
        records: dict[str, NameRecord | None] = {}
        errors = []
        for disk in self.members:
            directory = self._dir(disk)
            try:
                records[disk.root] = self._read(os.path.join(directory, _filename(name)))
            except FileNotFoundError:
                if not os.path.isdir(directory) and not os.path.isdir(disk.tmp_root):
                    errors.append(f"{directory} is missing")  # an unmounted disk: the partner answers
                    continue
                records[disk.root] = None  # (a blank disk has the sentinel, not yet the directory)
            except (OSError, ValueError) as exc:
                errors.append(f"{directory}: {exc}")
        if not records:
            raise StorageUnavailable("name records unreadable: " + "; ".join(errors))
        present = [record for record in records.values() if record is not None]
        if not present:
            return None, []
        newest = max(present, key=lambda record: record.mtime)
        stale = [disk for disk in self.members if disk.root in records and records[disk.root] != newest]
        return newest, stale

    def _restore(self, name: str) -> bool:
        """Write the newest record of `name` onto the members that lack it, under the name's
        lock (so a concurrent write or delete is not undone). True if some member changed."""
        with self._locked(name):
            found, stale = self._find(name)
            if found is None or not stale:
                return False
            data = json.dumps(asdict(found)).encode()
            for disk in stale:
                self._write(disk, _filename(name), data)
            log.info("name %r restored onto %s", name, ", ".join(d.root for d in stale))
            return True

    def reconcile(self, *, restore: bool) -> tuple[int, int]:
        """Blocking, for `stor scrub`: the names on any member, and how many some member lacks
        (or holds an older record of); with `restore`, those are written back, so every
        member holds the newest record of every name. Returns (names, stale)."""
        names, _ = self._names()
        stale = 0
        for name in names:
            found, behind = self._find(name)
            if found is not None and behind:
                stale += 1
                if restore:
                    self._restore(name)
        return len(names), stale

    def listing(self, prefix: str, after: str, limit: int) -> list[NameRecord]:
        """Records in name order: names starting with `prefix`, after `after`, at most `limit`,
        merged from the members (either alone will do)."""
        names, hashed = self._names()
        start = bisect.bisect_left(names, prefix)
        if after:
            start = max(start, bisect.bisect_right(names, after))
        records: list[NameRecord] = []
        for name in names[start:]:
            if not name.startswith(prefix) or len(records) >= limit:
                break
            record = self._first_record(hashed.get(name) or _filename(name))
            if record is not None:
                records.append(record)
        return records

    def _first_record(self, filename: str) -> NameRecord | None:
        for disk in self.members:
            with contextlib.suppress(OSError, ValueError):  # absent here, or removed since the scan
                return self._read(os.path.join(self._dir(disk), filename))
        return None

    def _names(self) -> tuple[list[str], dict[str, str]]:
        """Every name on any member, sorted, and the hashed file names of long ones."""
        indexes = []
        errors = []
        for disk in self.members:
            try:
                indexes.append(self._index_of(disk))
            except OSError as exc:
                errors.append(f"{self._dir(disk)}: {exc.strerror}")
        if not indexes:
            raise StorageUnavailable("name records unreadable: " + "; ".join(errors))
        key = tuple(mtime for mtime, _, _ in indexes)
        with self._index_lock:
            if self._merged is not None and self._merged[0] == key:
                return self._merged[1], self._merged[2]
        names = sorted(set().union(*(names for _, names, _ in indexes)))
        hashed = {name: filename for _, _, member in indexes for name, filename in member.items()}
        with self._index_lock:
            self._merged = (key, names, hashed)
        return names, hashed

    def _index_of(self, disk: Disk) -> tuple[int, list[str], dict[str, str]]:
        """One member's names, kept until its directory changes (its mtime)."""
        directory = self._dir(disk)
        try:
            mtime = os.stat(directory).st_mtime_ns
        except FileNotFoundError:
            if not os.path.isdir(disk.tmp_root):
                raise  # no sentinel either: the disk is not mounted
            return (-1, [], {})  # no name was ever stored here
        with self._index_lock:
            cached = self._indexes.get(disk.root)
            if cached is not None and cached[0] == mtime:
                return cached
        names: list[str] = []
        hashed: dict[str, str] = {}
        for filename in os.listdir(directory):
            if filename.startswith("."):
                continue
            if filename.startswith("#"):
                with contextlib.suppress(FileNotFoundError, ValueError):
                    name = self._read(os.path.join(directory, filename)).path
                    hashed[name] = filename
                    names.append(name)
            else:
                names.append(_decode(filename))
        index = (mtime, names, hashed)
        with self._index_lock:
            self._indexes[disk.root] = index
        return index

    @staticmethod
    def _read(path: str) -> NameRecord:
        with open(path, encoding="utf-8") as handle:
            raw = json.load(handle)
        try:
            return NameRecord(str(raw["path"]), parse_sha(str(raw["sha"])), int(raw["size"]), float(raw["mtime"]))
        except (KeyError, TypeError, InvalidDigest) as exc:
            raise ValueError(f"bad name record {path}") from exc

    # -- writes ------------------------------------------------------------------------------

    def put(self, record: NameRecord, *, create_only: bool) -> NameRecord | None:
        """Point `record.path` at its blob on every member. Returns the record it replaced.
        With `create_only`, a taken name raises `NameConflict` and nothing changes."""
        with self._locked(record.path):
            previous, _ = self._find(record.path)
            if previous is not None and create_only:
                raise NameConflict(record.path)
            data = json.dumps(asdict(record)).encode()
            for disk in self.members:
                self._write(disk, _filename(record.path), data)
            return previous

    def delete(self, name: str) -> bool:
        with self._locked(name):
            found = False
            for disk in self.members:
                try:
                    os.unlink(os.path.join(self._dir(disk), _filename(name)))
                    found = True
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    raise StorageUnavailable(f"{disk.root}: cannot remove name record: {exc.strerror}") from exc
                fsync_dir(self._dir(disk))
            return found

    def _write(self, disk: Disk, filename: str, data: bytes) -> None:
        self._make_dirs(disk)
        temp = disk.new_temp()
        try:
            temp.write(data)
            temp.sync(now_ns())
            temp.replace(os.path.join(self._dir(disk), filename))
        finally:
            temp.discard()

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        stripe = hashlib.sha256(name.encode()).digest()[0] % _LOCKS
        path = os.path.join(self._dir(self.members[0]), ".locks", f"{stripe:02x}")
        try:
            self._make_dirs(self.members[0])
            fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StorageUnavailable(f"name records not writable: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def _filename(name: str) -> str:
    encoded = name.replace("%", "%25").replace("/", "%2F")
    if len(encoded.encode()) <= _MAX_FILENAME and not encoded.startswith((".", "#")):
        return encoded
    return "#" + hashlib.sha256(name.encode()).hexdigest()


def _decode(filename: str) -> str:
    return filename.replace("%2F", "/").replace("%25", "%")
