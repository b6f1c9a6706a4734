"""Each directory of the name tree held in memory as its entries in name order, merged over the
members, and followed through a journal of changes: a listing page finds its first entry by
bisection and costs what it lists, not the size of the directory it pages through.

The journal: `.journal` in each tree directory on each member (entries all start with r/d/h/g, so
it is never taken for one): a header line of random hex that no other journal has, then one line
per change, `+` or `-` and the entry's file name as a JSON string (a torn or garbled line does not
parse). Every writer of entries appends whole lines, each with one O_APPEND `write`, which the
kernel does not interleave with another's: `+x` before the rename or mkdir that creates x (so a
reader that finds x has its line, even if the writer dies before the second), `+x` again once x
exists (for a reader that read the directory whole in between, whose offset is past the first
line), and `-x` once x is removed. The journal may say an entry exists that does not (a crash
before the rename, a failed one): a listing reads every record it lists and skips a missing one,
so that costs a failed `open`, never a wrong page. It never says an entry is absent that exists.

A reader keeps per member the directory's mtime, the journal's inode and header, and how far it
has applied the journal. Each listing stats the directory and the journal (two syscalls per
member) and applies only the complete new lines, idempotently (a set of file names, in order, so
`-x` then `+x` leaves x). It reads the directory whole instead, taking the journal's size first
(lines appended during the `listdir` are applied next time; applying a line twice is harmless),
when it has not read it yet, when the journal was replaced, removed or shrunk or its header
changed (an inode number can be reused) or a new line does not parse, when the directory's mtime
moved while the journal did not grow (a change without a line: a stor without journals, a hand),
and at least every `_REREAD_NS` (such a change made while the journal grew). After a whole read,
an mtime as recent as `_RACY_NS` is not trusted, since a later change within the same tick would
not move it; after applying lines it is kept as seen (a change without a line in the tick of one
with a line is one made while the journal grew), so pages read again right after a write cost no
whole read.

So a listing has every name whose PUT was acknowledged before it began, whichever process or node
wrote it: the PUT's first line was in the journal before the listing's `stat` of it; if this
reader had already read past that line when it read the directory whole, the PUT's second line
was appended after that read, before the acknowledgement. (Across nodes this takes the storage's
word for `stat`: a network filesystem that caches attributes delays it, as it did the mtime.)

No fsync of the journal: a line need not outlive a crash of the machine because no process trusts
a line written before it started (each reads every directory whole first), and a power cut
restarts every process on the machine; a lost, torn or zero-filled end is behind every new
reader's offset, and lines appended after it are read from their own start. A reader that outlives
its storage server's crash sees the journal shrink, a line that does not parse, or re-reads within
`_REREAD_NS`. A process killed between two steps leaves only a line for an entry that is not there.

Bound: a writer that takes a journal past `_JOURNAL_MAX` bytes replaces it with an empty one (a new
header); every reader then reads the directory whole once. A writer that finds the journal it
wrote to replaced meanwhile writes its line again to the new one, and a line lost with the old
journal is either the first of a pair (its second follows) or describes a change already made,
which the whole read finds. Blocking; an index is safe from several threads.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import hashlib
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from stor.backends import temps

log = logging.getLogger(__name__)

JOURNAL = ".journal"
ENTRY_KINDS = ("r", "d", "h", "g")
"""The first letter of an entry: a record, a directory, a hashed record, a hashed directory."""
_MAX_COMPONENT = 240
_RACY_NS = 50_000_000
"""A directory changed this recently may change again within the same mtime tick (ext4 stamps
with the kernel's coarse clock): its mtime is not trusted to show the next change."""
_REREAD_NS = 300 * 1_000_000_000
_JOURNAL_MAX = 4 << 20
_HEADER = 34
"""Bytes of a journal's header line: "#", 32 random hex digits, newline."""
_CHUNK = 128
"""Entries copied out of an index at a time while a listing walks it."""

Resolver = Callable[[str], str | None]
"""The component a hashed entry (`h…`, `g…`) stands for, or None while no record says."""


def is_entry(filename: str) -> bool:
    return filename[:1] in ENTRY_KINDS


def entry_filename(component: str, *, directory: bool) -> str:
    """The entry of a name's component in its directory (a long one by its hash)."""
    if len(component.encode()) <= _MAX_COMPONENT:
        return ("d" if directory else "r") + component
    return ("g" if directory else "h") + hashlib.sha256(component.encode()).hexdigest()


# -- writers ---------------------------------------------------------------------------------------


def before_creating(directory: str, filename: str) -> None:
    """Before an entry is created: its line. OSError if it cannot be written (then create nothing)."""
    _append(os.path.join(directory, JOURNAL), _line("+", filename))


def after_creating(directory: str, filename: str) -> None:
    """Once an entry exists: its line again (for a reader that read the directory whole between the
    first line and the creation). A failure is logged: the first line stands for it."""
    try:
        _append(os.path.join(directory, JOURNAL), _line("+", filename))
    except OSError as exc:
        log.warning("%s: names journal not written: %s", directory, exc.strerror)


def after_removing(directory: str, filename: str) -> None:
    """Once an entry is gone. A failure is logged: a reader that keeps the entry finds no record."""
    try:
        _append(os.path.join(directory, JOURNAL), _line("-", filename))
    except OSError as exc:
        log.warning("%s: names journal not written: %s", directory, exc.strerror)


def make_parents(root: str, directory: str) -> list[str]:
    """`temps.make_parents`, each new directory journaled in its parent."""
    return temps.make_parents(root, directory, before=before_creating, after=after_creating)


def _line(op: str, filename: str) -> bytes:
    return (op + json.dumps(filename, ensure_ascii=False) + "\n").encode()


def _append(path: str, line: bytes) -> None:
    """`line` at the end of the journal `path` (made if missing), again if the journal was replaced
    meanwhile (so the line is in the one readers follow); a journal past its bound is replaced."""
    for _ in range(5):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        except FileNotFoundError:
            _new_journal(path, replacing=False)
            continue
        try:
            if os.write(fd, line) != len(line):  # (a full disk): a torn line, which readers do not parse
                raise OSError(errno.ENOSPC, "journal line cut short", path)
            written = os.fstat(fd)
        finally:
            os.close(fd)
        try:
            if os.stat(path).st_ino != written.st_ino:
                continue
        except FileNotFoundError:
            continue
        if written.st_size > _JOURNAL_MAX:
            _new_journal(path, replacing=True)
        return
    raise OSError(errno.EAGAIN, "the journal keeps being replaced", path)


def _new_journal(path: str, *, replacing: bool) -> None:
    """Put an empty journal, its header only, at `path` (unless one is there, when not `replacing`)."""
    temp = f"{path}.{secrets.token_hex(8)}"  # a name no entry has, like the journal's
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, b"#" + secrets.token_hex(16).encode() + b"\n")
    finally:
        os.close(fd)
    try:
        if replacing:
            os.replace(temp, path)
        else:
            with contextlib.suppress(FileExistsError):  # another writer made it first
                os.link(temp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)


def _parse(line: bytes) -> tuple[str, str] | None:
    """(op, file name) of a whole journal line, None if it is not one (a torn or garbled write)."""
    try:
        filename = json.loads(line[1:])
    except ValueError:
        return None
    if line[:1] not in (b"+", b"-") or not isinstance(filename, str) or not is_entry(filename) or "/" in filename:
        return None
    return line[:1].decode(), filename


# -- readers ---------------------------------------------------------------------------------------


@dataclass
class _Member:
    """What one reader knows of the directory on one member (beside which entries it holds)."""

    mtime: int = -1  # the directory's at the last look, -1 when not to be trusted
    journal: int = -1  # the journal's inode, 0 for none, -1 before the first whole read
    header: bytes = b""  # its first line: no other journal has it, though it may have its inode
    offset: int = 0  # how far the journal is applied
    read_at: int = 0  # monotonic ns of the last whole read


class DirectoryIndex:
    """One tree directory's entries on every member (`paths`: its path on each), merged, as keys in
    name order (the component, and "/" after it for a directory)."""

    def __init__(self, paths: list[str], resolve: Resolver) -> None:
        self._paths = paths
        self._resolve = resolve
        self._members = [_Member() for _ in paths]
        self._held: dict[str, int] = {}  # file name → bit mask of the members holding it
        self._keys: list[str] = []  # the keys of the file names held, in order
        self._hashed: dict[str, str] = {}  # hashed file name held → its key
        self._unresolved: set[str] = set()  # hashed file names held whose component no record gives yet
        self._lock = threading.Lock()

    @property
    def paths(self) -> list[str]:
        return list(self._paths)

    def refresh(self) -> list[OSError | None]:
        """Bring every member up to date; per member, None or why it did not answer (its entries
        then count for nothing until it does)."""
        outcomes: list[OSError | None] = []
        with self._lock:
            for index in range(len(self._members)):
                try:
                    self._sync(index)
                    outcomes.append(None)
                except OSError as exc:
                    self._members[index] = _Member()
                    self._release(index, self._held_by(index))
                    outcomes.append(exc)
            if self._unresolved:  # (rare: their records are read at each refresh)
                retried, self._unresolved = self._unresolved, set()
                self._key_new(retried)
        return outcomes

    def entries(self, lowest: str) -> Iterator[tuple[str, str]]:
        """(key, file name) in order from the first key not below `lowest`, copied out a chunk at
        a time: a change meanwhile neither repeats an entry nor moves the walk back."""
        with self._lock:
            start = bisect.bisect_left(self._keys, lowest)
            chunk = self._keys[start : start + _CHUNK]
        while chunk:
            for key in chunk:
                directory = key.endswith("/")
                yield key, entry_filename(key[:-1] if directory else key, directory=directory)
            with self._lock:
                start = bisect.bisect_right(self._keys, chunk[-1])
                chunk = self._keys[start : start + _CHUNK]

    # -- one member ----------------------------------------------------------------------------

    def _sync(self, index: int) -> None:
        member, path = self._members[index], self._paths[index]
        mtime = os.stat(path).st_mtime_ns
        inode, size = _journal(path)
        if (
            inode != member.journal
            or size < member.offset
            or (size == member.offset and mtime != member.mtime)
            or time.monotonic_ns() - member.read_at > _REREAD_NS
            or not self._apply_tail(index, inode, size)
        ):
            self._read_whole(index)
            return
        # Kept though racy: a change without a line in the tick of one with a line is of the kind
        # only the periodic whole read finds, like any made while the journal grew.
        member.mtime = mtime

    def _apply_tail(self, index: int, inode: int, size: int) -> bool:
        """Apply the journal's complete lines past the offset; False if they cannot be trusted."""
        member = self._members[index]
        if size == member.offset:
            return True
        try:
            fd = os.open(os.path.join(self._paths[index], JOURNAL), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            if os.fstat(fd).st_ino != inode or os.pread(fd, _HEADER, 0) != member.header:
                return False
            data = os.pread(fd, size - member.offset, member.offset)
        finally:
            os.close(fd)
        whole = data[: data.rfind(b"\n") + 1]  # a line still being written is read next time
        changes = []
        for line in whole.split(b"\n")[:-1]:
            change = _parse(line)
            if change is None:
                return False
            changes.append(change)
        for op, filename in changes:  # in order: "-x" then "+x" leaves x
            if op == "+":
                self._hold(index, [filename])
            else:
                self._release(index, [filename])
        member.offset += len(whole)
        return True

    def _read_whole(self, index: int) -> None:
        path = self._paths[index]
        inode, size, header = _journal_start(path)  # first: lines appended during the listdir are applied next time
        seen_at = time.time_ns()
        mtime = os.stat(path).st_mtime_ns
        filenames = {filename for filename in os.listdir(path) if is_entry(filename)}
        held = self._held_by(index)
        self._release(index, held - filenames)
        self._hold(index, filenames - held)
        member = self._members[index]
        member.mtime, member.journal, member.header, member.offset = _trusted(mtime, seen_at), inode, header, size
        member.read_at = time.monotonic_ns()

    # -- the merged keys -------------------------------------------------------------------------

    def _held_by(self, index: int) -> set[str]:
        bit = 1 << index
        return {filename for filename, mask in self._held.items() if mask & bit}

    def _hold(self, index: int, filenames: Iterable[str]) -> None:
        bit, new = 1 << index, []
        for filename in filenames:
            mask = self._held.get(filename, 0)
            self._held[filename] = mask | bit
            if not mask:
                new.append(filename)
        self._key_new(new)

    def _release(self, index: int, filenames: Iterable[str]) -> None:
        bit, gone = 1 << index, []
        for filename in filenames:
            mask = self._held.get(filename, 0)
            if not mask & bit:
                continue
            if mask & ~bit:
                self._held[filename] = mask & ~bit  # another member holds it still
                continue
            del self._held[filename]
            if filename in self._unresolved:
                self._unresolved.discard(filename)
            elif filename[0] in "hg":
                gone.append(self._hashed.pop(filename))
            else:
                gone.append(filename[1:] + ("/" if filename[0] == "d" else ""))
        if len(gone) > _CHUNK:
            dropped = set(gone)
            self._keys = [key for key in self._keys if key not in dropped]
        else:
            for key in gone:
                del self._keys[bisect.bisect_left(self._keys, key)]

    def _key_new(self, filenames: Iterable[str]) -> None:
        """Put the keys of newly held file names in order (a hashed one once a record gives its
        component, and only if it hashes to the file name)."""
        added = []
        for filename in filenames:
            kind, rest = filename[0], filename[1:]
            if kind in "rd":
                added.append(rest + "/" if kind == "d" else rest)
                continue
            component = self._resolve(filename)
            if component is None or entry_filename(component, directory=kind == "g") != filename:
                self._unresolved.add(filename)
                continue
            self._hashed[filename] = component + "/" if kind == "g" else component
            added.append(self._hashed[filename])
        if len(added) > _CHUNK:
            self._keys.extend(added)
            self._keys.sort()
        else:
            for key in added:
                bisect.insort(self._keys, key)


def _journal(directory: str) -> tuple[int, int]:
    """(inode, size) of a directory's journal, (0, 0) when it has none."""
    try:
        st = os.stat(os.path.join(directory, JOURNAL))
    except FileNotFoundError:
        return 0, 0
    return st.st_ino, st.st_size


def _journal_start(directory: str) -> tuple[int, int, bytes]:
    """(inode, size, header) of a directory's journal, (0, 0, b"") when it has none."""
    try:
        fd = os.open(os.path.join(directory, JOURNAL), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return 0, 0, b""
    try:
        st = os.fstat(fd)
        return st.st_ino, st.st_size, os.pread(fd, _HEADER, 0)
    finally:
        os.close(fd)


def _trusted(mtime: int, seen_at: int) -> int:
    """`mtime`, seen at `seen_at`, if every later change must move it; else -1."""
    return mtime if seen_at - mtime > _RACY_NS else -1
