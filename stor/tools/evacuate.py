"""`stor evacuate --pair N`: empty a pair that takes no writes, so its disks can be retired.

The blobs of pair N are read in directory order, each copy verified (SHA-256 of the bytes read;
a corrupt or unreadable copy gives way to its partner's; both bad: failed, left in place), and
written in batches onto both members of writable pairs (`service.relocation`: one `syncfs` per
batch and disk, not a commit per blob), keeping their mtime. Only once a batch is durable on
both members, its S3 markers durable and its locations remembered does it count as moved; and
it is removed from pair N `grace` seconds later (`evacremoval`), so that a lookup that began
before a blob moved (and probed its new pair first) finds it on pair N still: reads never fail
meanwhile. A blob complete elsewhere already is not copied; a blob taken down is removed and
never moved; a blob partly on a writable pair is completed by the upload pipeline.

Interrupted, it leaves nothing half-done (a blob is on pair N until it is durable elsewhere;
staged copies are dropped, and a killed run's temps swept at the next start); run again, it
carries on with what is left. When no writable pair has room, it stops cleanly and says how
many blobs are left.

The pair that was the records' home (`recordplaces`: name and takedown records) has them moved
first, each onto the new home before it is removed here; the blobs follow.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Protocol

from stor.backends.disk import Disk
from stor.backends.pairs import Pair, leaves
from stor.digest import Sha, sha_from_filename
from stor.errors import BlobGone, DigestMismatch, InsufficientStorage, StorageUnavailable
from stor.model import BlobStat, PutResult
from stor.service.relocation import Batch, Landed, Relocation
from stor.service.upload import Plan
from stor.tools.evacremoval import GRACE, Removals

log = logging.getLogger(__name__)

KEEP = 1024 * 1024
"""Copies up to this size keep the bytes they were verified from: read once, not twice."""

Relocate = Callable[[Sha, Pair, Iterator[bytes], int, int], PutResult]
"""Store a blob on another pair than the given one: (sha, pair, chunks, size, mtime_ns)."""


@dataclass
class EvacuationReport:
    pair: int
    started: float = field(default_factory=time.time)
    finished: float | None = None
    moved: int = 0  # stored on another pair by this run
    already_elsewhere: int = 0  # complete on another pair before this run got to it
    removed: int = 0  # blobs removed from the evacuated pair
    taken_down: int = 0  # copies of blobs an admin took down: removed, never moved
    names_moved: int = 0  # name records moved onto the records' home pair
    takedowns_moved: int = 0  # takedown records moved onto the records' home pair
    records_left: int = 0  # name and takedown records still on the evacuated pair
    bytes: int = 0
    left: int = 0  # blobs still on the evacuated pair
    failed: list[str] = field(default_factory=list)
    stopped: str | None = None  # why it stopped early (no room elsewhere)
    interrupted: bool = False

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


class Records(Protocol):
    """Small records kept on the records' home pair (`NameStore`, `TombstoneStore`)."""

    def evacuate(self, members: tuple[Disk, ...]) -> int:
        """Move the records on `members` onto the home; how many were moved."""
        ...

    def held_by(self, members: tuple[Disk, ...]) -> int:
        """How many records `members` hold."""
        ...


@dataclass
class Movers:
    """What an evacuation writes with (the CLI wires them to a `BlobService`)."""

    batches: Relocation
    """Verified copies staged onto other pairs, a batch at a time."""
    relocated: Callable[[list[Landed]], dict[Sha, Exception]]
    """A durable batch remembered, checked and mirrored: what failed, by sha."""
    relocate: Relocate
    """The upload pipeline, for a blob partly stored on a writable pair already."""
    names: Records | None = None
    takedowns: Records | None = None


class Evacuation:
    def __init__(
        self,
        pair: Pair,
        movers: Movers,
        *,
        progress: Callable[[int, int], None] | None = None,
        grace: float = GRACE,
    ) -> None:
        self.pair = pair
        self.movers = movers
        self.progress = progress or (lambda blobs, size: None)
        self.removals = Removals(pair, grace)

    def run(self) -> EvacuationReport:
        report = EvacuationReport(self.pair.index)
        try:
            self._move_records(report)
            for sha in self._blobs():
                try:
                    self._move(sha, report)
                except InsufficientStorage as exc:
                    report.stopped = f"no writable pair has room: {exc}"
                    break
                except (StorageUnavailable, DigestMismatch, OSError) as exc:
                    report.failed.append(f"{sha}: {exc}")
                if self.movers.batches.full and not self._flushed(report):
                    break
                report.removed += self.removals.remove_due(report.failed)
            self._flushed(report)
        except KeyboardInterrupt:
            report.interrupted = True
        finally:
            self.movers.batches.abort()
            report.removed += self.removals.finish(report.failed)
        report.left = sum(1 for _ in self._blobs())
        report.records_left = sum(records.held_by(self.pair.members) for records in self._records())
        report.finished = time.time()
        return report

    def _records(self) -> list[Records]:
        return [records for records in (self.movers.names, self.movers.takedowns) if records is not None]

    def _move_records(self, report: EvacuationReport) -> None:
        """The name and takedown records on the pair, onto the records' home pair."""
        report.names_moved = self._moved("names", self.movers.names, report)
        report.takedowns_moved = self._moved("takedowns", self.movers.takedowns, report)

    def _moved(self, kind: str, records: Records | None, report: EvacuationReport) -> int:
        if records is None:
            return 0
        try:
            return records.evacuate(self.pair.members)
        except (StorageUnavailable, OSError) as exc:
            report.failed.append(f"{kind} records: {exc}")
            return 0

    def _flushed(self, report: EvacuationReport) -> bool:
        """Make the staged batch durable and land it; False when the target ran out of room
        (bytes or inodes) while it was written: the run stops there, as when no pair has room."""
        try:
            self._land(self.movers.batches.flush(), report)
        except InsufficientStorage as exc:
            report.stopped = f"no writable pair has room: {exc}"
            return False
        return True

    def _blobs(self) -> Iterator[Sha]:
        """Every blob with a copy on some member of the pair, leaf by leaf."""
        for leaf in leaves(self.pair):
            names: set[str] = set()
            for disk in self.pair.members:
                try:
                    names.update(os.listdir(os.path.join(disk.root, leaf)))
                except (FileNotFoundError, NotADirectoryError):
                    continue
            for name in sorted(names):
                sha = sha_from_filename(name)
                if sha is not None:
                    yield sha

    def _move(self, sha: Sha, report: EvacuationReport) -> None:
        """Stage `sha` for the next batch, or note why it needs no copy."""
        found = self._stat(sha)
        try:
            plan = self.movers.batches.plan(sha, found.size)
        except BlobGone:
            report.taken_down += 1  # nowhere to move it: it is removed with the others
            self.removals.ready(sha)
            return
        if plan.done:
            report.already_elsewhere += 1
            self.removals.ready(sha)
            self.progress(1, found.size)
        elif plan.kept:
            self._complete(sha, report)
        else:
            self._stage(sha, plan)

    def _stat(self, sha: Sha) -> BlobStat:
        errors: list[str] = []
        for disk in self.pair.members:
            try:
                found = disk.stat(sha)
            except StorageUnavailable as exc:
                errors.append(str(exc))
                continue
            if found is not None:
                return found
        raise StorageUnavailable("; ".join(errors) or "no copy left to move")

    def _stage(self, sha: Sha, plan: Plan) -> None:
        """Stage a copy of the first copy on the pair that hashes to `sha` (a corrupt one gives
        way to its partner's); it counts once its batch lands."""
        errors: list[str] = []
        for disk in self.pair.members:
            try:
                copy = disk.hash_copy(sha, keep=KEEP)
                if copy is None:
                    continue
                if copy.sha != sha:
                    errors.append(f"{disk.root}: the copy is corrupt (its sha256 is {copy.sha})")
                    continue
                source = disk.blob_path(sha)
                size = copy.stat.size
                self.movers.batches.add(plan, sha, size, source, copy.data, copy.stat.mtime_ns, copy.fast)
            except StorageUnavailable as exc:
                errors.append(str(exc))
                continue
            self.progress(1, size)
            return
        raise StorageUnavailable("; ".join(errors) or "no copy left to move")

    def _complete(self, sha: Sha, report: EvacuationReport) -> None:
        """A blob partly on a writable pair: the pipeline completes it there from the first
        copy that passes its hash check (a corrupt copy fails it; the partner's is tried next)."""
        errors: list[str] = []
        for disk in self.pair.members:
            try:
                found = disk.stat(sha)
                if found is None:
                    continue
                result = self.movers.relocate(sha, self.pair, _read(disk.blob_path(sha)), found.size, found.mtime_ns)
            except BlobGone:
                report.taken_down += 1
                self.removals.ready(sha)
                return
            except (DigestMismatch, StorageUnavailable, OSError) as exc:
                errors.append(f"{disk.root}: {exc}")
                continue
            if result.created:
                report.moved += 1
                report.bytes += found.size
            else:
                report.already_elsewhere += 1
            self.removals.ready(sha)
            self.progress(1, found.size)
            return
        raise StorageUnavailable("; ".join(errors) or "no copy left to move")

    def _land(self, batch: Batch, report: EvacuationReport) -> None:
        """A flushed batch: what landed is remembered, checked and mirrored, then counted and
        due for removal after the grace period; what failed stays on the pair."""
        report.failed.extend(f"{sha}: {error}" for sha, error in batch.failed)
        failed = self.movers.relocated(batch.landed) if batch.landed else {}
        for item in batch.landed:
            error = failed.get(item.sha)
            if isinstance(error, BlobGone):
                report.taken_down += 1
            elif error is not None:
                report.failed.append(f"{item.sha}: {error}")
                continue
            else:
                report.moved += 1
                report.bytes += item.size
            self.removals.ready(item.sha)
        self.removals.landed()


def _read(path: str) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        while chunk := handle.read(1024 * 1024):
            yield chunk
