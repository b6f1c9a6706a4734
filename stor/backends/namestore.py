"""Name → sha records for the path-named API, mirrored on one pair like blobs.

Representation: one small JSON file per name, `{"path", "sha", "size", "mtime"}`, in
`<root>/.stor-names/` on every member of the names pair (the first pair). The file is named by
the name itself with only `%` and `/` escaped (`a%2Fb.txt`): a listing needs no reads but a
directory scan, and decoding is two string replacements (full percent-decoding was 70% of a
100,000-name scan). Names whose file name would pass 240 bytes, or start with `.`, are filed
under `#<sha256 of the name>` and their name is read from the record. Writes use the blob protocol (temp on the same
filesystem, fsync, rename, directory fsync) on each member, under one of 256 striped `flock`s
chosen by the name, so two writers of one name are serialised across processes and the
members never disagree. Every process sees every change: a listing rescans the directory
whenever its mtime changed. Blocking and thread-safe.
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import hashlib
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from stor.backends.disk import Disk, now_ns
from stor.backends.temps import fsync_dir
from stor.digest import Sha, parse_sha
from stor.errors import InvalidDigest, StorageUnavailable

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
        self._index: tuple[int, list[str], dict[str, str]] | None = None  # (dir mtime, sorted names, hashed)
        self._index_lock = threading.Lock()

    def _dir(self, disk: Disk) -> str:
        return os.path.join(disk.root, NAMES_DIR)

    def prepare(self) -> None:
        for disk in self.members:
            os.makedirs(os.path.join(self._dir(disk), ".locks"), exist_ok=True)

    # -- reads -------------------------------------------------------------------------------

    def get(self, name: str) -> NameRecord | None:
        """The record of `name`, from the first member that can be read."""
        errors = []
        for disk in self.members:
            directory = self._dir(disk)
            try:
                return self._read(os.path.join(directory, _filename(name)))
            except FileNotFoundError:
                if os.path.isdir(directory):
                    return None
                errors.append(f"{directory} is missing")  # an unmounted disk: try the partner
            except (OSError, ValueError) as exc:
                errors.append(f"{directory}: {exc}")
        raise StorageUnavailable("name records unreadable: " + "; ".join(errors))

    def listing(self, prefix: str, after: str, limit: int) -> list[NameRecord]:
        """Records in name order: names starting with `prefix`, after `after`, at most `limit`."""
        names, hashed = self._names()
        start = bisect.bisect_left(names, prefix)
        if after:
            start = max(start, bisect.bisect_right(names, after))
        records: list[NameRecord] = []
        directory = self._dir(self.members[0])
        for name in names[start:]:
            if not name.startswith(prefix) or len(records) >= limit:
                break
            filename = hashed.get(name) or _filename(name)
            with contextlib.suppress(FileNotFoundError, ValueError):  # removed since the scan
                records.append(self._read(os.path.join(directory, filename)))
        return records

    def _names(self) -> tuple[list[str], dict[str, str]]:
        directory = self._dir(self.members[0])
        try:
            mtime = os.stat(directory).st_mtime_ns
        except OSError as exc:
            raise StorageUnavailable(f"name records unreadable: {exc.strerror}") from exc
        with self._index_lock:
            if self._index is not None and self._index[0] == mtime:
                return self._index[1], self._index[2]
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
        names.sort()
        with self._index_lock:
            self._index = (mtime, names, hashed)
        return names, hashed

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
            previous = self.get(record.path)
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
