"""Refilling a member at disk speed: copies of verified blobs written onto one disk in batches.

What a refill does not need is the per-upload protocol of a POST (a thread hop, a plan, an
answer per blob): the source copy was just verified by the scrub that asks for the refill, and
nothing waits on each blob. What it keeps: each copy written holds bytes checked on the way
(their fast checksum must match the verified source's), becomes visible only once durable, and
never replaces a copy that is there. Per batch, on each target filesystem:

1. every temp written (its bytes, its mtime, its fast checksum attribute), nothing synced;
2. one `syncfs`: every temp's data durable (each temp's own writeback errors then checked on its
   fd, as the group commit does);
3. every temp linked to its blob name (no-replace; new `AB/CD/EF` directories made);
4. one more `syncfs`: the names durable. Only now do the copies count.

A crash before 2 leaves temps only (swept at the next start); between 2 and 4 it leaves some
names, each pointing at durable bytes, or none; after 4 everything. On filesystems whose
`syncfs` is not real (tmpfs, FUSE, NFS) each copy is fsynced and committed on its own.
Blocking; one `Refill` per target disk, used from one thread.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from stor.backends import syscalls
from stor.backends.disk import Disk
from stor.backends.temps import TempFile
from stor.checksum import FastHasher, FastSum
from stor.digest import Sha
from stor.errors import StorageUnavailable

BATCH_FILES = 2048
BATCH_BYTES = 256 * 1024 * 1024
CHUNK = 1024 * 1024


@dataclass
class _Staged:
    sha: Sha
    temp: TempFile


class Refill:
    def __init__(self, disk: Disk, *, batch_files: int = BATCH_FILES, batch_bytes: int = BATCH_BYTES) -> None:
        self.disk = disk
        self.batch_files = batch_files
        self.batch_bytes = batch_bytes
        self._staged: list[_Staged] = []
        self._bytes = 0

    def add(self, sha: Sha, source: str, data: bytes | None, mtime_ns: int, fast: FastSum) -> list[Sha]:
        """Stage a copy of `sha` (bytes: `data`, or read from the file `source`, which must hash
        to the fast checksum `fast` of the verified copy). The shas made durable by a batch this
        completed (usually none). A source that no longer matches raises `StorageUnavailable`."""
        temp = self.disk.new_temp()
        try:
            if data is not None:
                temp.write(data)
                written = len(data)
            else:
                written = self._copy(source, temp, fast)
            temp.set_sum(fast)
            if temp.groupable:
                temp.set_mtime(mtime_ns)
            else:
                temp.sync(mtime_ns)  # no real syncfs here: each copy on its own
                temp.commit(sha)
                return [sha]
        except BaseException:
            temp.discard()
            raise
        self._staged.append(_Staged(sha, temp))
        self._bytes += written
        if len(self._staged) >= self.batch_files or self._bytes >= self.batch_bytes:
            return self.flush()
        return []

    @staticmethod
    def _copy(source: str, temp: TempFile, fast: FastSum) -> int:
        hasher, size = FastHasher(), 0
        try:
            with open(source, "rb", buffering=0) as handle:
                while chunk := handle.read(CHUNK):
                    hasher.update(chunk)
                    temp.write(chunk)
                    size += len(chunk)
        except OSError as exc:
            raise StorageUnavailable(f"{source}: cannot read the source copy: {exc.strerror}") from exc
        if hasher.digest() != fast:
            raise StorageUnavailable(f"{source}: the source copy changed since it was verified; not copied")
        temp.start_writeback()
        return size

    def flush(self) -> list[Sha]:
        """Make the staged copies durable and visible (steps 2 to 4); their shas. On a failure
        nothing staged counts, every temp is removed, and `StorageUnavailable` says why."""
        staged, self._staged, self._bytes = self._staged, [], 0
        if not staged:
            return []
        try:
            syscalls.syncfs(staged[0].temp.fd)
            for item in staged:
                item.temp.check_written()
            for item in staged:
                item.temp.link(item.sha)
            syscalls.syncfs(staged[0].temp.fd)
        except OSError as exc:
            raise StorageUnavailable(f"{self.disk.root}: refill batch failed: {exc}") from exc
        finally:
            for item in staged:
                with contextlib.suppress(Exception):
                    item.temp.discard()
        return [item.sha for item in staged]

    def abort(self) -> None:
        staged, self._staged, self._bytes = self._staged, [], 0
        for item in staged:
            item.temp.discard()
