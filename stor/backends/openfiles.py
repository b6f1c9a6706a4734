"""Copies of small blobs kept open, so that a hot blob's GET or HEAD needs no thread hop.

Handing a call to a worker thread costs far more CPU than reading a small file (about 90 µs
against 10 µs measured here: the GIL changes hands around every syscall the thread makes).
So small copies are kept open here, with the stat of the open file, and read on the event loop
with `OpenCopy.read_cached`, which answers from the page cache or not at all. A copy gets here
two ways: a worker thread that opened and read it leaves its fd (`put`), or the event loop
opens it itself with `Disk.open_cached` when its path is in the dentry cache (`open`).
Anything short of a full answer (a miss, EAGAIN, a short read, an error) sends the request
down the thread path, which does the real work and its error handling. Only disks whose
filesystem takes RWF_NOWAIT are used (`usable`, learned by the disk's health probe); nothing
here ever waits on a disk.

A blob's bytes never change, so an open fd holds the right ones (and reads are still verified
by the caller, against the fast checksum of the bytes verified). Each use checks that the file
is still linked and whole, so a copy removed or replaced by hand stops being served at once;
entries are dropped when a copy is found corrupt or its disk stops answering. What time renews
is the check of a copy's partners: every `recheck` seconds the caller asks them again (`due`),
from the dentry cache, without reopening the copy or hashing it again. A copy pushed out of a
full cache whose file is still linked is closed on the spot (that close frees nothing); other
dropped copies are closed off the event loop (the last close of a file can do I/O): by the next
`put`, or by `close_dropped` when `closing_due` says enough have piled up.

A copy pushed out of a full cache is remembered without its fd (`vouched`, a few times as many
as are kept open, ~100 bytes each): the fast checksum of the bytes verified and when its
partners are due to be checked again. Opened again on the loop, it needs no SHA-256 (nor its
partners' check, until that is due): a working set larger than the cache costs an open, not a
verification. A small one also leaves its verified bytes, within a budget of
memory (`HeldCopies`): until they are pushed out too, its GET needs neither an open nor a read.

Thread-safe; one instance per worker process. `capacity` is bounded by the process's open
file limit (see `fd_budget`).
"""

from __future__ import annotations

import resource
import threading
import time
from collections import OrderedDict

from stor.backends.disk import Disk
from stor.backends.heldcopies import HeldCopies, HeldCopy
from stor.backends.opencopy import OpenCopy
from stor.checksum import FastSum
from stor.digest import Sha

READ_ON_LOOP_BYTES = 256 * 1024
"""Copies up to this size are read on the event loop; a bigger one would hold the loop while
it is copied and hashed (bigger copies are still kept open: a HEAD needs only their stat)."""
CLOSE_BATCH = 64
"""Dropped copies that may wait for a worker thread to close them."""
VOUCHED_PER_KEPT = 8
VOUCHED_MAX = 262_144
"""Copies remembered without their fd: `VOUCHED_PER_KEPT` per copy kept open, at most this many."""

Kept = OpenCopy[Disk] | HeldCopy
"""What the event loop may answer from: a copy kept open, or a small copy's bytes held."""


class OpenFiles:
    def __init__(self, capacity: int, recheck: float, held_bytes: int = 0) -> None:
        """`recheck`: seconds between two checks of a copy's partners; `held_bytes`: the memory for
        the bytes of small copies pushed out (`HeldCopies`)."""
        self.capacity = capacity
        self.recheck = recheck
        self.held_copies = HeldCopies(held_bytes if capacity > 0 else 0)
        self._entries: OrderedDict[Sha, OpenCopy[Disk]] = OrderedDict()
        self._dropped: list[OpenCopy[Disk]] = []
        self._vouched: OrderedDict[Sha, tuple[str, int, FastSum, float]] = OrderedDict()  # root, size, sum, recheck_at
        self._vouched_max = min(capacity * VOUCHED_PER_KEPT, VOUCHED_MAX)
        self._lock = threading.Lock()

    def usable(self, disk: Disk) -> bool:
        """Whether copies on `disk` may be kept open: its filesystem takes RWF_NOWAIT."""
        return self.capacity > 0 and disk.takes_nowait

    def get(self, sha: Sha) -> Kept | None:
        """The open copy of `sha`, checked with one `fstat` (see `OpenCopy.current`), else its
        held bytes (see `HeldCopies.get`): None when there is neither, or the file was removed,
        replaced or truncated since. Safe on the loop."""
        with self._lock:
            copy = self._entries.get(sha)
            if copy is not None:
                if not copy.current():
                    del self._entries[sha]
                    self._dropped.append(copy)
                    return None
                self._entries.move_to_end(sha)
                return copy
        return self.held_copies.get(sha)  # outside the lock: it asks the dentry cache

    def due(self, kept: Kept) -> bool:
        """Whether the partners of `kept` (from `get`) are to be checked again, `recheck` seconds
        after they last were: then it counts as done from now, and the caller checks them. (Its
        bytes need no second verification: every read of them is checked against the fast
        checksum of the bytes verified.) Safe on the loop."""
        now = time.monotonic()
        if kept.recheck_at >= now:
            return False
        kept.recheck_at = now + self.recheck
        return True

    def open(self, sha: Sha, disk: Disk) -> OpenCopy[Disk] | None:
        """Open the copy of `sha` on `disk` from the kernel's caches alone (`Disk.open_cached`)
        and keep it; None when that cannot be done without waiting. FileNotFoundError as
        `Disk.open_cached`. Safe on the loop."""
        if not self.usable(disk):
            return None
        copy = disk.open_cached(sha)
        if copy is not None:
            self._vouch(sha, copy)
            self._keep(sha, copy)
        return copy

    def _vouch(self, sha: Sha, copy: OpenCopy[Disk]) -> None:
        """Give a copy opened again what this process knew of it (see the module docstring)."""
        with self._lock:
            known = self._vouched.pop(sha, None)
        if known is None:
            return
        root, size, fast, recheck_at = known
        if root == copy.disk.root and size == copy.stat.size:
            copy.fast, copy.recheck_at = fast, recheck_at  # its partners' check is `due` as before

    def put(self, sha: Sha, copy: OpenCopy[Disk]) -> None:
        """Keep `copy`, opened by a worker thread (it is this cache's from now on, kept or
        closed), its partners just checked. Call from a worker thread: it closes what was
        dropped."""
        if self.usable(copy.disk):
            copy.recheck_at = time.monotonic() + self.recheck
            self._keep(sha, copy)
        else:
            copy.close()
        self.close_dropped()

    def _keep(self, sha: Sha, copy: OpenCopy[Disk]) -> None:
        evicted: list[tuple[Sha, OpenCopy[Disk]]] = []
        with self._lock:
            old = self._entries.pop(sha, None)
            if old is not None:
                self._dropped.append(old)
            self._entries[sha] = copy
            while len(self._entries) > self.capacity:
                old_sha, old_copy = self._entries.popitem(last=False)
                evicted.append((old_sha, old_copy))
                if old_copy.fast is not None and self._vouched_max:
                    self._vouched[old_sha] = (
                        old_copy.disk.root,
                        old_copy.stat.size,
                        old_copy.fast,
                        old_copy.recheck_at,
                    )
                    if len(self._vouched) > self._vouched_max:
                        self._vouched.popitem(last=False)
        for old_sha, old_copy in evicted:
            self._hold(old_sha, old_copy)
            self._close_or_drop(old_copy)

    def _hold(self, sha: Sha, copy: OpenCopy[Disk]) -> None:
        """Keep the bytes of a small copy pushed out whose bytes were verified (`fast` is their
        checksum), read from the page cache alone: a copy whose bytes are not in memory is
        simply not held. They are not hashed here: every answer from them checks them against
        `fast` (`HotPath._intact`), as every read of a copy kept open is checked."""
        if copy.fast is None or not self.held_copies.takes(copy.stat.size):
            return
        data = copy.read_cached()
        if data is not None:
            self.held_copies.put(sha, HeldCopy(copy.disk, copy.stat, data, copy.fast, copy.recheck_at))

    def _close_or_drop(self, copy: OpenCopy[Disk]) -> None:
        """Close a copy pushed out of the cache at once when that cannot do I/O: its file is
        still linked, so this close is not the last reference that frees it (and the disk's
        filesystem is local: `usable`). Else leave it to a worker thread (`close_dropped`):
        closing from one costs the event loop a GIL hand-over at each of its system calls
        while the thread runs."""
        if copy.current():
            copy.close()
        else:
            with self._lock:
                self._dropped.append(copy)

    def read(self, copy: Kept) -> bytes | None:
        """The whole copy from the page cache (or memory, when held), or None when it is too big
        to read on the loop, that would mean waiting, or it fails (the thread path finds out
        what is wrong)."""
        if isinstance(copy, HeldCopy):
            return copy.data
        if copy.stat.size > READ_ON_LOOP_BYTES:
            return None
        return copy.read_cached()

    def forget(self, sha: Sha) -> None:
        """Drop the entry of `sha`: a copy was found corrupt."""
        with self._lock:
            self._vouched.pop(sha, None)
            copy = self._entries.pop(sha, None)
            if copy is not None:
                self._dropped.append(copy)
        self.held_copies.forget(sha)

    def forget_disk(self, root: str) -> None:
        """Drop every entry on a disk that stopped answering (or went away)."""
        with self._lock:
            for sha, known in list(self._vouched.items()):
                if known[0] == root:
                    del self._vouched[sha]
            for sha, copy in list(self._entries.items()):
                if copy.disk.root == root:
                    del self._entries[sha]
                    self._dropped.append(copy)
        self.held_copies.forget_disk(root)

    @property
    def closing_due(self) -> bool:
        """Enough dropped copies wait that a worker thread should run `close_dropped`."""
        return len(self._dropped) >= CLOSE_BATCH

    def close_dropped(self) -> None:
        """Close the dropped copies. Blocking: call from a worker thread."""
        with self._lock:
            dropped, self._dropped = self._dropped, []
        for copy in dropped:
            copy.close()

    def close(self) -> None:
        with self._lock:
            self._dropped.extend(self._entries.values())
            self._entries.clear()
        self.held_copies.clear()
        self.close_dropped()

    @property
    def held(self) -> int:
        """How many copies are kept open now."""
        return len(self._entries)


def fd_budget(wanted: int) -> int:
    """How many fds the cache may hold: `wanted`, leaving the rest of this process's open-file
    limit (raised to its hard limit first) for sockets, uploads and everything else: a quarter
    of it, at least 4,096 fds, but never more than half."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    reserve = min(max(soft // 4, 4096), soft // 2)
    return max(0, min(wanted, soft - reserve))
