"""The durable outbox of lifecycle events waiting to be published (at least once).

One small JSON file per event, named `<time_ns>-<random>.json` (so a listing sorts oldest
first), in `<root>/.stor-events/` on a disk: for an event about a new blob, the disk its first
copy went to, so the group commit that makes the copy durable makes the event durable too
(`put(durable=False)`, as the S3 queue's marker); else a healthy disk, with its own fsyncs. A
file appears in the outbox only by a rename of a complete one, so a reader never sees half an
event. The request that caused an event is answered only after `put` returned: an outbox that
cannot be written fails that request.

To publish, a process renames events into its own directory `<outbox>/<owner>/` (see `owners`):
rename is atomic, so among several workers or nodes sharing the disks exactly one takes each.
Events claimed by a process that died go back to the outbox at the next `prepare`. An event is
removed (`done`) only after the broker confirmed it. Blocking and thread-safe.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from dataclasses import dataclass

from stor.backends.disk import Disk
from stor.backends.owners import OwnedDir, return_claims
from stor.backends.temps import disk_error, fsync_dir

OUTBOX_DIR = ".stor-events"


@dataclass(frozen=True)
class Claimed:
    disk: Disk
    name: str


class Outbox:
    def __init__(self, disks: list[Disk]) -> None:
        self.disks = disks
        self._owners = {disk.root: OwnedDir(self._dir(disk)) for disk in disks}
        self._lock = threading.Lock()
        self._closed = False

    @staticmethod
    def _dir(disk: Disk) -> str:
        return os.path.join(disk.root, OUTBOX_DIR)

    def add(self, disk: Disk) -> None:
        """A disk added at run time (a config reload); `prepare` claims it."""
        with self._lock:
            self._owners = {**self._owners, disk.root: OwnedDir(self._dir(disk))}
            self.disks = [*self.disks, disk]

    def prepare(self) -> int:
        """Claim an owner directory on every prepared disk; put dead owners' events back.
        Returns how many went back. Disks that are down are skipped."""
        returned = 0
        with self._lock:
            if self._closed:
                return 0
            for disk in self.disks:
                owner = self._owners[disk.root]
                if owner.claimed or not os.path.isdir(disk.tmp_root):  # no sentinel: disk not prepared
                    continue
                with contextlib.suppress(OSError):
                    outbox = self._dir(disk)
                    os.makedirs(outbox, exist_ok=True)
                    returned += return_claims(outbox, lambda name: name.endswith(".json"))
                    owner.claim()
        return returned

    def let_go(self, disk: Disk) -> None:
        self._owners[disk.root].release()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for owner in self._owners.values():
                owner.release()

    def put(self, disk: Disk, data: bytes, *, durable: bool = True) -> str:
        """Add an event to the outbox on `disk`; its path. Not `durable`: the caller makes it so
        with the next `syncfs` of the disk (a group commit) before it answers."""
        owner = self._owners[disk.root]
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}.json"
        final = os.path.join(self._dir(disk), name)
        try:
            if not owner.claimed:
                raise FileNotFoundError(f"{disk.root}: the event outbox is not prepared")
            temp = os.path.join(owner.path, name + ".tmp")
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                if durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(temp, final)
            if durable:
                fsync_dir(self._dir(disk))
        except OSError as exc:
            raise disk_error(disk, "writing an event to the outbox", exc) from exc
        return final

    def discard(self, path: str) -> None:
        """Remove an event that must not be published (its upload failed after all)."""
        with contextlib.suppress(OSError):
            os.unlink(path)

    def claim(self, limit: int) -> list[Claimed]:
        """Take up to `limit` events for this process, oldest first on each disk."""
        claims: list[Claimed] = []
        for disk in self.disks:
            owner = self._owners[disk.root]
            if not owner.claimed:
                continue
            try:
                names = sorted(name for name in os.listdir(self._dir(disk)) if name.endswith(".json"))
            except OSError:
                continue
            for name in names:
                try:
                    os.rename(os.path.join(self._dir(disk), name), os.path.join(owner.path, name))
                except OSError:  # another process won it, or the disk went away
                    continue
                claims.append(Claimed(disk, name))
                if len(claims) >= limit:
                    return claims
        return claims

    def read(self, claim: Claimed) -> bytes:
        with open(os.path.join(self._owners[claim.disk.root].path, claim.name), "rb") as handle:
            return handle.read()

    def done(self, claim: Claimed) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self._owners[claim.disk.root].path, claim.name))

    def backlog(self) -> tuple[int, float | None]:
        """Events waiting or claimed, by any process, on the disks that answer; and the time
        (Unix) the oldest was written."""
        count, oldest = 0, None
        for disk in self.disks:
            try:
                with os.scandir(self._dir(disk)) as entries:
                    for entry in entries:
                        names = os.listdir(entry.path) if entry.is_dir(follow_symlinks=False) else [entry.name]
                        for name in names:
                            if name.endswith(".json"):
                                count += 1
                                written = int(name.split("-", 1)[0]) / 1e9
                                oldest = written if oldest is None else min(oldest, written)
            except (OSError, ValueError):
                continue
        return count, oldest
