"""Walking the name tree in name order, for listings and the scrub: each directory's entries
merged over every disk that may hold records (`recordplaces`), from an index per directory kept in
memory and followed through its journal (`nameindex`), so a page costs what it lists.

Only the home pair's members must answer; the other pairs' are asked when they can be. A record
listed is read from the other pairs (the newest of theirs) and the first member of the home that
answers, the home last. Blocking and thread-safe.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from stor.backends import nameindex
from stor.backends.disk import Disk
from stor.backends.nameindex import DirectoryIndex
from stor.backends.namerecord import NameRecord, read_record
from stor.backends.recordplaces import RecordPlaces
from stor.errors import StorageUnavailable

_INDEXES_KEPT = 2048
"""Directory indexes kept, the most recently used (each holds the entries of every disk)."""


@dataclass(frozen=True)
class _Entry:
    key: str  # the component, and "/" after it for a directory: the order names sort in
    filename: str

    @property
    def directory(self) -> bool:
        return self.filename[0] in "dg"


class TreeWalk:
    def __init__(self, places: RecordPlaces, tree: Callable[[Disk], str]) -> None:
        self.places = places
        self.tree = tree
        """The name tree's root on a disk."""
        self._indexes: OrderedDict[str, DirectoryIndex] = OrderedDict()  # tree directory → its index
        self._indexes_lock = threading.Lock()

    def walk(self, relpath: str, within: str, start: str, after: str) -> Iterator[NameRecord]:
        """The records below the directory `relpath` (whose names start with `within`), in
        name order: those whose next component starts with `start`, named after `after`."""
        lowest = start
        if after.startswith(within):
            rest = after[len(within) :]
            slash = rest.find("/")  # the directory `after` is in sorts before it, and is walked
            lowest = max(lowest, rest[: slash + 1] if slash >= 0 else rest)
        elif after > within:
            return  # every name here sorts before `after`
        for entry in self._entries(relpath, lowest):
            if not entry.key.startswith(start):
                return
            child = f"{relpath}/{entry.filename}" if relpath else entry.filename
            named = within + entry.key
            if entry.directory:
                if after >= named and not after.startswith(named):
                    continue  # every name below sorts before `after`
                yield from self.walk(child, named, "", after)
                continue
            if named <= after:
                continue
            record = self._first_record(child)
            if record is not None:
                yield record

    def _entries(self, relpath: str, lowest: str) -> Iterator[_Entry]:
        """The entries of one tree directory on any member, in name order from the first not
        below `lowest` (a hashed one's component comes from a record below it)."""
        readers = self.places.readers()
        home = self.places.home()
        index = self._index(relpath, readers)
        errors = []
        answered = False
        for disk, failure in zip(readers, index.refresh(), strict=True):
            if disk not in home:
                continue  # another pair: asked when it can be
            if failure is None or (isinstance(failure, FileNotFoundError) and os.path.isdir(disk.tmp_root)):
                answered = True  # (not found: a blank disk, or no name under this directory here)
            elif isinstance(failure, FileNotFoundError):
                errors.append(f"{self.tree(disk)} is missing")
            else:
                errors.append(f"{self.tree(disk)}: {failure.strerror}")
        if not answered:
            raise StorageUnavailable("name records unreadable: " + "; ".join(errors))
        for key, filename in index.entries(lowest):
            yield _Entry(key, filename)

    def _index(self, relpath: str, readers: tuple[Disk, ...]) -> DirectoryIndex:
        """The index of one tree directory over `readers` (made again when they change: a pair
        was added, or the home moved)."""
        paths = [os.path.join(self.tree(disk), relpath) for disk in readers]
        with self._indexes_lock:
            index = self._indexes.get(relpath)
            if index is None or index.paths != paths:
                index = DirectoryIndex(paths, lambda filename: self._hashed_component(os.path.join(relpath, filename)))
                self._indexes[relpath] = index
                while len(self._indexes) > _INDEXES_KEPT:
                    self._indexes.popitem(last=False)
            self._indexes.move_to_end(relpath)
            return index

    def _hashed_component(self, relpath: str) -> str | None:
        """The component a hashed entry stands for, from the record at or below it."""
        depth = relpath.count("/")
        for entry_relpath in self._any_record(relpath):
            record = self._first_record(entry_relpath)
            if record is not None:
                return record.path.split("/")[depth]
        return None

    def _any_record(self, relpath: str) -> Iterator[str]:
        if relpath.rsplit("/", 1)[-1][0] in "rh":
            yield relpath
            return
        for disk in self.places.readers():
            with contextlib.suppress(OSError):
                for filename in os.listdir(os.path.join(self.tree(disk), relpath)):
                    if nameindex.is_entry(filename):
                        yield from self._any_record(f"{relpath}/{filename}")

    def _first_record(self, relpath: str) -> NameRecord | None:
        """The record at `relpath`: the newest of the other pairs' (if any holds one) and the
        first member of the home's that answers; the home is read last (see `recordplaces`)."""
        home = self.places.home()
        found: list[NameRecord] = []
        for disk in self.places.readers():
            with contextlib.suppress(OSError, ValueError):  # absent here, or removed since the scan
                found.append(read_record(os.path.join(self.tree(disk), relpath)))
                if disk in home:
                    break
        return max(found, key=lambda record: record.mtime, default=None)
