"""Taking a blob down for good, and the question every read and every write asks first: is it
gone?

A takedown writes a tombstone (`TombstoneStore`: durable, on both members of the records' home pair),
then removes every copy and quarantined copy on every disk that answers, drops the blob from
every cache this process holds, and queues the S3 object for deletion (the mirror deletes
what it finds taken down). The order makes a racing upload lose: an upload checks again after
its copies are linked (`check_after_write`), so either it sees the tombstone and removes its
copies, or its copies were linked before the tombstone was written and the takedown's removal
finds them.

Who asks: the read algorithm (`Lookup.find`, before any disk), so no path that reads or heals
a copy (the partner heal, S3 fallback and refill, scrub, evacuation, stale cache hints) can
serve or copy it; the upload pipeline (`Uploads.plan`), so no writer stores it again but an
admin, whose upload lifts the tombstone (`lift`). A worker thread reads the tombstone file;
the event loop asks this process's memory of them, refreshed from the disks every
`REFRESH_SECONDS` (so another worker or node sees a takedown within that), and the kernel's
caches before it answers 404. A copy kept open elsewhere stops being served as soon as its
file is unlinked (`OpenCopy.current`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from stor.backends.disk import Disk
from stor.backends.locations import CacheUnavailable, LocationCache
from stor.backends.openfiles import OpenFiles
from stor.backends.pairs import StoragePool
from stor.backends.tombstones import Tombstone, TombstoneStore
from stor.digest import Sha
from stor.errors import BlobGone, BlobNotFound, StorageUnavailable
from stor.service.events import EventLog
from stor.service.health import HealthMonitor
from stor.service.nearcache import NearCache
from stor.service.offload import Offload
from stor.service.s3tier import S3Part

log = logging.getLogger(__name__)
audit = logging.getLogger("stor.audit")

REFRESH_SECONDS = 0.5


@dataclass
class TakedownReport:
    """What a takedown did, as `DELETE /{sha}` answers it."""

    sha: Sha
    time: float
    admin: str
    reason: str
    removed: list[str] = field(default_factory=list)
    quarantined_removed: list[str] = field(default_factory=list)
    s3: str = "off"
    tombstone_on: list[str] = field(default_factory=list)
    unreachable: list[str] = field(default_factory=list)


def gone(tombstone: Tombstone) -> BlobGone:
    return BlobGone(tombstone.sha, tombstone.time, tombstone.admin, tombstone.reason)


class Takedowns:
    def __init__(
        self,
        store: TombstoneStore,
        pool: StoragePool,
        monitor: HealthMonitor,
        *,
        near: NearCache,
        open_files: OpenFiles,
        locations: LocationCache | None,
        s3: S3Part,
        offload: Offload,
        events: EventLog,
    ) -> None:
        self.store = store
        self.pool = pool
        self.monitor = monitor
        self.near = near
        self.open_files = open_files
        self.locations = locations
        self.s3 = s3
        self.offload = offload
        self.events = events
        self._known: dict[Sha, Tombstone] = {}  # replaced whole: safe to read from any thread

    # -- is it gone? -------------------------------------------------------------------------

    def gone_now(self, sha: Sha) -> Tombstone | None:
        """From this process's memory of the tombstones (no I/O: for the event loop)."""
        return self._known.get(sha) if self._known else None

    def _answering(self) -> list[Disk]:
        return [disk for disk in self.store.members if self.monitor.responsive(disk)]

    def gone(self, sha: Sha) -> Tombstone | None:
        """Blocking: from the tombstone files (memory, if no member of the records' home pair answers)."""
        try:
            found = self.store.get(sha, self._answering())
        except StorageUnavailable:
            return self.gone_now(sha)
        if found is not None and sha not in self._known:
            self._known = {**self._known, sha: found}
        return found

    def refuse(self, sha: Sha) -> None:
        """Blocking: `BlobGone` if `sha` was taken down."""
        found = self.gone(sha)
        if found is not None:
            raise gone(found)

    def proven_absent(self, sha: Sha) -> bool:
        """From the kernel's caches alone: whether they prove `sha` has no tombstone."""
        return self.gone_now(sha) is None and self.store.cached(sha) is None

    async def check_after_write(self, sha: Sha, written: list[Disk]) -> None:
        """After an upload linked copies of `sha` on `written`: if it was taken down meanwhile,
        remove them and raise `BlobGone`. Usually answered from the kernel's caches."""
        if self.proven_absent(sha):
            return
        found = await self.offload.run(self.gone, sha)
        if found is None:
            return
        await self.offload.run(self._remove_copies, sha, written)
        raise gone(found)

    @staticmethod
    def _remove_copies(sha: Sha, disks: list[Disk]) -> None:
        for disk in disks:
            with contextlib.suppress(StorageUnavailable):
                disk.remove(sha)

    async def run(self) -> None:
        """Keep the memory of the tombstones fresh (until cancelled)."""
        while True:
            with contextlib.suppress(Exception):  # a disk that fails is retried at the next turn
                self._known = await self.offload.run(self.store.all, self._answering())
            await asyncio.sleep(REFRESH_SECONDS)

    # -- takedown and restore ----------------------------------------------------------------

    def take_down(self, sha: Sha, admin: str, reason: str, *, s3_holds: Callable[[Sha], bool]) -> TakedownReport:
        """Blocking. `BlobGone` when it was taken down already; `BlobNotFound` when every disk
        answered and neither they, their quarantines nor S3 hold it."""
        previous = self.gone(sha)
        if previous is not None:
            raise gone(previous)
        disks = [disk for disk in self.pool.disks if self.monitor.responsive(disk)]
        unreachable = [disk.root for disk in self.pool.disks if disk not in disks]
        if not unreachable and not self._stored_somewhere(sha, disks) and not s3_holds(sha):
            raise BlobNotFound(sha)
        tombstone = Tombstone(sha, time.time(), admin, reason)
        report = TakedownReport(sha, tombstone.time, admin, reason, unreachable=unreachable)
        report.tombstone_on = self.store.put(tombstone)
        self._known = {**self._known, sha: tombstone}
        self.events.record("blob.taken_down", sha=sha, reason=reason)
        for disk in disks:
            try:
                if disk.remove(sha):
                    report.removed.append(disk.blob_path(sha))
                report.quarantined_removed += disk.quarantine.purge(sha)
            except StorageUnavailable as exc:
                report.unreachable.append(f"{disk.root}: {exc}")
        self.near.forget(sha)
        self.open_files.forget(sha)
        if self.locations is not None:
            with contextlib.suppress(CacheUnavailable):  # a stale hint costs a probe, never a read
                self.locations.forget(sha)
        if self.s3.may_hold:
            self.s3.enqueue(self._queue_disk(disks), sha, durable=True)
            report.s3 = "queued for deletion"
        audit.info(
            "takedown %s by %s: %s",
            sha,
            admin,
            reason,
            extra={"action": "takedown", "sha": sha, "admin": admin, "reason": reason},
        )
        return report

    def _stored_somewhere(self, sha: Sha, disks: list[Disk]) -> bool:
        for disk in disks:
            with contextlib.suppress(StorageUnavailable):
                if disk.stat(sha) is not None or disk.quarantine.holds(sha):
                    return True
        return False

    def _queue_disk(self, disks: list[Disk]) -> Disk:
        healthy = [disk for disk in disks if self.monitor.healthy(disk)]
        if not healthy:
            raise StorageUnavailable("no disk can take the S3 deletion's queue marker")
        return healthy[0]

    def lift(self, sha: Sha, admin: str) -> bool:
        """Blocking: lift the takedown of `sha` (an admin stored it again). True if it was."""
        lifted = self.store.remove(sha)
        if sha in self._known:
            self._known = {key: value for key, value in self._known.items() if key != sha}
        if lifted:
            audit.info(
                "restore %s by %s", sha, admin, extra={"action": "restore", "sha": sha, "admin": admin, "reason": ""}
            )
        return bool(lifted)
