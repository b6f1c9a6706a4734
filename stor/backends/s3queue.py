"""The durable queue of blobs waiting to be mirrored to S3.

One empty marker file per blob, named by its sha, in `<root>/.stor-s3-queue/` on a disk that
holds a copy. A marker is created and its directory fsynced *before* the blob's copies are
linked into place, so a crash can leave a marker without a blob (dropped when found) but
never a stored blob without a marker.

To work on a marker a process renames it into its own directory `<queue>/<owner>/` (see
`owners`): rename is atomic, so among several workers or nodes sharing the disks exactly one
wins. Markers claimed by a process that died go back to the queue at the next `prepare`.
Everything here blocks and is thread-safe.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass

from stor.backends.disk import Disk
from stor.backends.owners import OwnedDir, return_claims
from stor.backends.temps import fsync_dir
from stor.digest import Sha, parse_sha
from stor.errors import InvalidDigest

QUEUE_DIR = ".stor-s3-queue"


@dataclass(frozen=True)
class Claim:
    disk: Disk
    sha: Sha


class S3Queue:
    def __init__(self, disks: list[Disk]) -> None:
        self.disks = disks
        self._owners = {disk.root: OwnedDir(self._dir(disk)) for disk in disks}
        self._claiming = threading.Lock()  # a claim and `close` never interleave
        self._closed = False

    def add(self, disk: Disk) -> None:
        """A disk added at run time (a config reload); `prepare` claims it."""
        self._owners = {**self._owners, disk.root: OwnedDir(self._dir(disk))}
        self.disks = [*self.disks, disk]

    @staticmethod
    def _dir(disk: Disk) -> str:
        return os.path.join(disk.root, QUEUE_DIR)

    def prepare(self) -> int:
        """Claim an owner directory on every prepared disk; put dead owners' claims back.
        Returns how many markers went back. Disks that are down are skipped."""
        with self._claiming:
            return 0 if self._closed else self._claim_all()

    def _claim_all(self) -> int:
        returned = 0
        for disk in self.disks:
            owner = self._owners[disk.root]
            if owner.claimed or not os.path.isdir(disk.tmp_root):  # no sentinel: disk not prepared
                continue
            queue = self._dir(disk)
            os.makedirs(queue, exist_ok=True)
            returned += return_claims(queue, lambda name: _sha(name) is not None)
            owner.claim()
        return returned

    def let_go(self, disk: Disk) -> None:
        """Release this process's claim on a disk that went away (`prepare` claims it again)."""
        self._owners[disk.root].release()

    def close(self) -> None:
        """Release every claim this process holds, for good (at shutdown)."""
        with self._claiming:
            self._closed = True
            for owner in self._owners.values():
                owner.release()

    def enqueue(self, disk: Disk, sha: Sha, *, durable: bool = True) -> None:
        """Record that `sha` must be mirrored (call before its copies are linked). Not
        `durable`: the caller makes it so with the next `syncfs` of the disk (a group commit)
        before any copy is linked."""
        queue = self._dir(disk)
        fd = os.open(os.path.join(queue, sha), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        os.close(fd)
        if durable:
            fsync_dir(queue)

    def claim(self, limit: int) -> list[Claim]:
        """Take up to `limit` markers for this process."""
        claims: list[Claim] = []
        for disk in self.disks:
            owner = self._owners[disk.root]
            if not owner.claimed:
                continue
            try:
                names = os.listdir(self._dir(disk))
            except OSError:
                continue
            for name in names:
                sha = _sha(name)
                if sha is None:
                    continue
                try:
                    os.rename(os.path.join(self._dir(disk), name), os.path.join(owner.path, name))
                except OSError:  # another process won it, or the disk went away
                    continue
                claims.append(Claim(disk, sha))
                if len(claims) >= limit:
                    return claims
        return claims

    def done(self, claim: Claim) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self._owners[claim.disk.root].path, claim.sha))

    def backlog(self) -> int:
        """Markers waiting or claimed, by any process, on the disks that answer."""
        total = 0
        for disk in self.disks:
            queue = self._dir(disk)
            try:
                with os.scandir(queue) as entries:
                    for entry in entries:
                        if entry.is_dir(follow_symlinks=False):
                            total += sum(1 for name in os.listdir(entry.path) if _sha(name) is not None)
                        elif _sha(entry.name) is not None:
                            total += 1
            except OSError:
                continue
        return total


def _sha(name: str) -> Sha | None:
    if len(name) != 64:
        return None
    try:
        return parse_sha(name)
    except InvalidDigest:
        return None
