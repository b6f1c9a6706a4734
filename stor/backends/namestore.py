"""Name → sha records for the path-named API, mirrored on one pair like blobs.

Representation: one small JSON file per name, `{"path", "sha", "size", "mtime"}`, in a tree
under `<root>/.stor-names/.tree/` on both members of the records' home pair (`recordplaces`:
the first pair taking writes, read wherever they are, so they can be moved) that
follows the name's own path: `a/b/c.txt` is the record file `rc.txt` in the directory
`da/db/`. Each entry of a directory is one letter then the component: `r` a record, `d` a
directory, and for a component over 240 bytes `h`/`g` and the sha256 of the component (a
hashed directory's component is read from any record below it). So a prefix listing reads the
directories under the prefix, in order, until its page is full: a page costs what it lists,
not the number of names stored nor the size of the directories it passes through. Each
directory's entries are kept in memory in name order (`nametree`, `nameindex`), brought up to
date from a journal that every writer of entries appends to, so a page finds its first entry by
bisection.

Either member alone serves reads and listings (they are merged, with the records any other pair
still holds); a record a member of the home lacks, or holds older, is restored to it, so a
replaced disk fills in as names are read, and records left on another pair come home (all at
once with `reconcile`, which `stor scrub --repair` runs; `evacuate` then removes them from the
old pair). Writes use the blob
protocol (temp on the same filesystem, fsync, rename, directory fsync; new directories fsynced
into their parents) on each member, under one of 256 striped `flock`s chosen by the name, so two
writers of one name are serialised across processes and the members never disagree; every entry
a write creates or a delete removes is journaled in its directory (`nameindex`), which is what
lets every process see the others' changes without reading a directory whole again. Deleting a
name leaves its (possibly empty) directories: removing them would race a writer about to
rename a record into one. Records of the flat layout of stor 0.2 (every record in
`.stor-names/` itself) are moved into the tree by `prepare`. Blocking and thread-safe.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
from collections.abc import Iterator

from stor.backends import nameindex
from stor.backends.disk import Disk, now_ns
from stor.backends.nameindex import entry_filename
from stor.backends.namerecord import NameRecord, read_optional, read_record, record_files, record_relpath
from stor.backends.nametree import TreeWalk
from stor.backends.recordplaces import OnePair, RecordPlaces
from stor.backends.temps import fsync_dir
from stor.errors import StorageUnavailable

log = logging.getLogger(__name__)

NAMES_DIR = ".stor-names"
TREE_DIR = ".tree"
_LOCKS = 256


class NameConflict(Exception):
    """`create` found the name taken."""


class NameStore:
    def __init__(self, places: RecordPlaces | tuple[Disk, ...]) -> None:
        self.places = OnePair(places) if isinstance(places, tuple) else places
        self._tree_walk = TreeWalk(self.places, self._tree)

    @property
    def members(self) -> tuple[Disk, ...]:
        """Every disk that may hold records, the home's members last."""
        return self.places.readers()

    def _dir(self, disk: Disk) -> str:
        return os.path.join(disk.root, NAMES_DIR)

    def _tree(self, disk: Disk) -> str:
        return os.path.join(disk.root, NAMES_DIR, TREE_DIR)

    def prepare(self) -> None:
        """At start-up: the record directories, and records of the flat layout moved into
        the tree."""
        for disk in self.places.home():
            os.makedirs(os.path.join(self._dir(disk), ".locks"), exist_ok=True)
            os.makedirs(self._tree(disk), exist_ok=True)
        for disk in self.members:
            if os.path.isdir(self._dir(disk)):
                self._migrate(disk)

    def _make_dirs(self, disk: Disk) -> None:
        """The record directories, on a disk that was replaced since start-up; never on a
        bare mountpoint (no sentinel: `StorageUnavailable`)."""
        if not os.path.isdir(disk.tmp_root):
            raise StorageUnavailable(f"{disk.root}: not a prepared storage directory (unmounted?)")
        os.makedirs(os.path.join(self._dir(disk), ".locks"), exist_ok=True)
        os.makedirs(self._tree(disk), exist_ok=True)

    def _migrate(self, disk: Disk) -> None:
        """Move stor 0.2's flat records into the tree: each is written to its tree place on
        this member (unless a newer record is there) before its flat file is removed, so a
        crash at any point loses nothing and the next start carries on."""
        directory = self._dir(disk)
        flat = [f for f in os.listdir(directory) if not f.startswith(".")]
        if not flat:
            return
        moved = 0
        for filename in flat:
            path = os.path.join(directory, filename)
            try:
                record = read_record(path)
            except FileNotFoundError:
                continue  # another process moved it
            except ValueError:
                log.warning("not a name record, left in place: %s", path)
                continue
            with self._locked(record.path):
                if not os.path.exists(path):
                    continue
                current = read_optional(os.path.join(self._tree(disk), record_relpath(record.path)))
                if current is None or current.mtime < record.mtime:
                    self._write(disk, record.path, record.encoded())
                os.unlink(path)
                moved += 1
        fsync_dir(directory)
        log.info("%s: %d name records moved into the tree layout", disk.root, moved)

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
        """The newest record of `name` on the disks that answer, and the members of the home
        that lack it or hold an older one. `StorageUnavailable` when no member of the home
        answers."""
        records: dict[str, NameRecord | None] = {}
        errors = []
        relpath = record_relpath(name)
        home = self.places.home()
        for disk in self.places.readers():
            tree = self._tree(disk)
            try:
                records[disk.root] = read_record(os.path.join(tree, relpath))
            except (FileNotFoundError, NotADirectoryError):
                if not os.path.isdir(tree) and not os.path.isdir(disk.tmp_root):
                    errors.append(f"{tree} is missing")  # an unmounted disk: the partner answers
                    continue
                records[disk.root] = None  # (a blank disk has the sentinel, not yet the tree)
            except (OSError, ValueError) as exc:
                errors.append(f"{tree}: {exc}")
        if not any(disk.root in records for disk in home):
            raise StorageUnavailable("name records unreadable: " + "; ".join(errors))
        present = [record for record in records.values() if record is not None]
        if not present:
            return None, []
        newest = max(present, key=lambda record: record.mtime)
        stale = [disk for disk in home if disk.root in records and records[disk.root] != newest]
        return newest, stale

    def _restore(self, name: str) -> bool:
        """Write the newest record of `name` onto the members that lack it, under the name's
        lock (so a concurrent write or delete is not undone). True if some member changed."""
        with self._locked(name):
            found, stale = self._find(name)
            if found is None or not stale:
                return False
            data = found.encoded()
            for disk in stale:
                self._write(disk, name, data)
            log.info("name %r restored onto %s", name, ", ".join(d.root for d in stale))
            return True

    def reconcile(self, *, restore: bool) -> tuple[int, int]:
        """Blocking, for `stor scrub`: the names on any member, and how many some member lacks
        (or holds an older record of); with `restore`, those are written back, so every
        member holds the newest record of every name. Returns (names, stale)."""
        names = stale = 0
        for record in self._tree_walk.walk("", "", "", ""):
            names += 1
            found, behind = self._find(record.path)
            if found is not None and behind:
                stale += 1
                if restore:
                    self._restore(record.path)
        return names, stale

    def listing(self, prefix: str, after: str, limit: int) -> list[NameRecord]:
        """Records in name order: names starting with `prefix`, after `after`, at most `limit`,
        merged from the members (either alone will do)."""
        if limit <= 0:
            return []
        *parents, partial = prefix.split("/")
        base = "/".join(entry_filename(part, directory=True) for part in parents)
        within = "".join(part + "/" for part in parents)
        records: list[NameRecord] = []
        for record in self._tree_walk.walk(base, within, partial, after):
            records.append(record)
            if len(records) >= limit:
                break
        return records

    # -- writes ------------------------------------------------------------------------------

    def put(self, record: NameRecord, *, create_only: bool) -> NameRecord | None:
        """Point `record.path` at its blob on every member. Returns the record it replaced.
        With `create_only`, a taken name raises `NameConflict` and nothing changes."""
        with self._locked(record.path):
            previous, _ = self._find(record.path)
            if previous is not None and create_only:
                raise NameConflict(record.path)
            data = record.encoded()
            for disk in self.places.home():
                self._write(disk, record.path, data)
            return previous

    def delete(self, name: str) -> bool:
        """Remove `name` from every disk that holds it; False if none did."""
        with self._locked(name):
            return bool(self._remove(name, self.members))

    def _remove(self, name: str, disks: tuple[Disk, ...]) -> int:
        """Unlink the record of `name` on `disks` (journaled, durable); how many held it."""
        removed = 0
        for disk in disks:
            path = os.path.join(self._tree(disk), record_relpath(name))
            try:
                os.unlink(path)
                removed += 1
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as exc:
                raise StorageUnavailable(f"{disk.root}: cannot remove name record: {exc.strerror}") from exc
            nameindex.after_removing(*os.path.split(path))
            fsync_dir(os.path.dirname(path))
        return removed

    def evacuate(self, members: tuple[Disk, ...]) -> int:
        """Move every name record on `members` (a pair that is not the home) onto the home:
        under the name's lock, the newest record of the name is made durable on the home's
        members before it is removed from `members`, so a reader (which asks the home last)
        never misses it. Returns how many names were moved."""
        if set(members) & set(self.places.home()):
            raise StorageUnavailable("the name records' home pair cannot be evacuated onto itself")
        moved = 0
        done: set[str] = set()
        for disk in members:
            for path in record_files(self._tree(disk)):
                record = read_optional(path)
                if record is None or record.path in done:
                    continue
                done.add(record.path)
                with self._locked(record.path):
                    found, stale = self._find(record.path)
                    if found is not None:
                        data = found.encoded()
                        for target in stale:
                            self._write(target, found.path, data)
                    moved += bool(self._remove(record.path, members))
        return moved

    def held_by(self, members: tuple[Disk, ...]) -> int:
        """How many record files `members` hold."""
        return sum(1 for disk in members for _ in record_files(self._tree(disk)))

    def _write(self, disk: Disk, name: str, data: bytes) -> None:
        """Write one record on `disk`, journaling each entry it creates (see `nameindex`)."""
        self._make_dirs(disk)
        final = os.path.join(self._tree(disk), record_relpath(name))
        directory, filename = os.path.split(final)
        temp = disk.new_temp()
        try:
            temp.write(data)
            temp.sync(now_ns())
            try:
                new_dirs = nameindex.make_parents(self._tree(disk), directory)
                nameindex.before_creating(directory, filename)
            except OSError as exc:
                raise StorageUnavailable(f"{disk.root}: name directories not writable: {exc.strerror}") from exc
            temp.replace(final)
            nameindex.after_creating(directory, filename)
            for parent in new_dirs:
                fsync_dir(parent)
        finally:
            temp.discard()

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        stripe = hashlib.sha256(name.encode()).digest()[0] % _LOCKS
        first = self.places.home()[0]
        path = os.path.join(self._dir(first), ".locks", f"{stripe:02x}")
        try:
            self._make_dirs(first)
            fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StorageUnavailable(f"name records not writable: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)
