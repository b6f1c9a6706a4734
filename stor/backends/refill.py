"""Refilling a member at disk speed: copies of verified blobs written onto one disk in batches.

What a refill does not need is the per-upload protocol of a POST (a thread hop, a plan, an
answer per blob): the source copy was just verified by the scrub that asks for the refill, and
nothing waits on each blob. What it keeps: each copy written holds bytes checked on the way
(their fast checksum must match the verified source's), becomes visible only once durable, and
never replaces a copy that is there. Per batch, on each target filesystem:

1. every copy written to a temp file in the process's own temp directory (its bytes, its
   mtime, its fast checksum attribute), nothing synced;
2. one `syncfs`: every file's data durable (each file's own writeback errors then checked on
   its fd, as the group commit does);
3. every temp linked to its blob name (no-replace; new `AB/CD/EF` directories made);
4. one more `syncfs`: the names durable. Only now do the copies count.

A crash before 3 leaves temps only (swept at the next start, as an upload's); between 3 and 4
some names, each pointing at bytes made durable in 2, or none; after 4 everything. (Anonymous
`O_TMPFILE` files would leave nothing at all, but each costs ~230 µs to create on ext4 while the
journal is busy with the batch, against ~20 µs for a named temp: the refill ran at half speed.) On filesystems whose
`syncfs` is not real (tmpfs, FUSE, NFS) each copy is fsynced and committed on its own.
Blocking; one `Refill` per target disk, used from one thread.
"""

from __future__ import annotations

from dataclasses import dataclass

from stor.backends import syscalls
from stor.backends.disk import Disk
from stor.backends.temps import TempFile, disk_error
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
    size: int


class Refill:
    def __init__(self, disk: Disk, *, batch_files: int | None = None, batch_bytes: int | None = None) -> None:
        self.disk = disk
        self.batch_files = batch_files or BATCH_FILES
        self.batch_bytes = batch_bytes or BATCH_BYTES
        self._staged: list[_Staged] = []
        self._bytes = 0

    @property
    def staged(self) -> int:
        """Copies staged, not yet durable."""
        return len(self._staged)

    def add(self, sha: Sha, source: str, data: bytes | None, mtime_ns: int, fast: FastSum) -> list[Sha]:
        """Stage a copy of `sha` (bytes: `data`, or read from the file `source`, which must hash
        to the fast checksum `fast` of the verified copy). The shas made durable by a batch this
        completed (usually none). A source that no longer matches raises `StorageUnavailable`."""
        temp = self.disk.new_temp()
        try:
            written = self._fill(temp, source, data, fast)
            temp.set_sum(fast)
            if not temp.groupable:  # no real syncfs here (tmpfs, FUSE, NFS): each copy on its own
                temp.sync(mtime_ns)
                temp.commit(sha)
                temp.discard()
                return [sha]
            temp.set_mtime(mtime_ns)
        except BaseException:
            temp.discard()
            raise
        self._staged.append(_Staged(sha, temp, written))
        self._bytes += written
        if len(self._staged) >= self.batch_files or self._bytes >= self.batch_bytes:
            return self.flush()
        return []

    @staticmethod
    def _fill(temp: TempFile, source: str, data: bytes | None, fast: FastSum) -> int:
        if data is not None:
            temp.write(data)
            return len(data)
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
        if temp.groupable:
            temp.start_writeback()  # the batch's syncfs finds less to write
        return size

    def flush(self) -> list[Sha]:
        """Make the staged copies durable and visible (steps 2 to 4); their shas. On a failure
        nothing staged counts, every temp is removed, and `StorageUnavailable` says why (a copy
        linked already stays: its bytes were durable before its name)."""
        staged, self._staged, self._bytes = self._staged, [], 0
        if not staged:
            return []
        try:
            syscalls.syncfs(staged[0].temp.fd)
            for item in staged:  # each file's own writeback errors, without another commit
                item.temp.check_written()
            for item in staged:
                item.temp.link(item.sha)  # no-replace; a copy there already is kept
            syscalls.syncfs(staged[0].temp.fd)
        except OSError as exc:
            raise disk_error(self.disk, "refill", exc) from exc
        finally:
            for item in staged:
                item.temp.discard()
        return [item.sha for item in staged]

    def drop(self, sha: Sha) -> None:
        """Unstage the copy of `sha` (its temp removed): it must not be linked after all."""
        for item in [item for item in self._staged if item.sha == sha]:
            self._staged.remove(item)
            self._bytes -= item.size
            item.temp.discard()

    def abort(self) -> None:
        staged, self._staged, self._bytes = self._staged, [], 0
        for item in staged:
            item.temp.discard()
