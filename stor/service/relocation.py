"""Evacuation's writes at disk speed: the blobs of a pair that takes no writes copied onto
both members of other pairs in batches (`backends.refill`: one `syncfs` per batch and disk),
not one upload at a time.

What the upload pipeline gives a relocated blob, it gets here too, batch by batch:

- the plan is the pipeline's (`Uploads.plan`): a blob taken down is refused (`BlobGone`); one
  complete on another pair is not written again; a new one goes to both members of a writable
  pair other than the evacuated one, chosen by free space, its bytes reserved on that pair until
  its batch is done ("no writable pair has room": `InsufficientStorage`);
- each copy holds the verified source's bytes (checked on the way) and keeps its mtime;
- the S3 queue marker is written beside the first member's copy before the batch's first
  `syncfs` there (fsynced at once where no `syncfs` is real), so it is durable before any copy
  is linked;
- a copy counts only once the copies on both members are durable and linked; a copy that was
  there already is kept (no-replace), and the mtimes of the two are aligned if they differ;
- then (`relocated`, on the event loop) the location is remembered, a blob taken down
  meanwhile has its new copies removed, and the blob is mirrored to S3 now or soon.

Blocking but `relocated`; one `Relocation` per evacuation, used from one thread.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from stor.backends.disk import Disk
from stor.backends.pairs import Pair, settle
from stor.backends.refill import BATCH_BYTES, BATCH_FILES, Refill
from stor.checksum import FastSum
from stor.digest import Sha
from stor.errors import BlobGone, StorageUnavailable
from stor.service.upload import Plan, Uploads

NEVER = 1 << 62
"""The per-disk refills never complete a batch on their own: `Relocation` flushes them all."""


@dataclass(frozen=True)
class Landed:
    """A blob whose copies are durable on both members of `disks`' pair."""

    sha: Sha
    size: int
    disks: tuple[Disk, ...]


@dataclass
class Batch:
    landed: list[Landed] = field(default_factory=list)
    failed: list[tuple[Sha, str]] = field(default_factory=list)


@dataclass(frozen=True)
class _Staged:
    sha: Sha
    size: int
    pair: Pair


class Relocation:
    def __init__(
        self, uploads: Uploads, away: Pair, *, batch_files: int = BATCH_FILES, batch_bytes: int = BATCH_BYTES
    ) -> None:
        self.uploads = uploads
        self.away = away
        self.batch_files = batch_files
        self.batch_bytes = batch_bytes
        self._refills: dict[str, Refill] = {}
        self._staged: list[_Staged] = []
        self._bytes = 0
        self._grouped: dict[str, bool] = {}  # a disk's copies wait for their batch's syncfs

    def plan(self, sha: Sha, size: int) -> Plan:
        """Where `sha` goes (`Uploads.plan`, leaving the evacuated pair out): done when it is
        complete elsewhere; copies kept when a writable pair holds some (the pipeline then
        completes it: `Uploads.relocate`); else both members of a pair chosen by free space."""
        return self.uploads.plan(sha, size, queue_s3=True, away=self.away)

    @property
    def full(self) -> bool:
        """Time to `flush`."""
        return len(self._staged) >= self.batch_files or self._bytes >= self.batch_bytes

    def add(
        self, plan: Plan, sha: Sha, size: int, source: str, data: bytes | None, mtime_ns: int, fast: FastSum
    ) -> None:
        """Stage copies of `sha` on both members of `plan.pair` (a plan that keeps no copy) from
        the verified copy at `source` (`size` bytes, fast checksum `fast`; its bytes `data` when
        kept), with mtime `mtime_ns`.
        On a failure nothing of it stays staged; `StorageUnavailable` (the source changed, a
        target failed) or `InsufficientStorage`."""
        pair, members = plan.pair, plan.pair.members
        durable = not all(self._grouped.get(disk.root, False) for disk in members)
        self.uploads.s3.enqueue(members[0], sha, durable=durable)
        self.uploads.pool.reserve(pair, size)
        staged: list[Refill] = []
        try:
            for disk in members:
                refill = self._refills.setdefault(disk.root, Refill(disk, batch_files=NEVER, batch_bytes=NEVER))
                before = refill.staged
                refill.add(sha, source, data, mtime_ns, fast)
                self._grouped[disk.root] = refill.staged > before  # else committed already, alone
                staged.append(refill)
        except BaseException:
            for refill in staged:
                refill.drop(sha)  # (a copy committed alone stays: a whole blob, completed later)
            self.uploads.pool.release(pair, size)
            raise
        self._staged.append(_Staged(sha, size, pair))
        self._bytes += size

    def flush(self) -> Batch:
        """Make the staged copies durable and visible, pair by pair: the first member's (with
        the S3 markers), then the second's. A blob lands only when both are."""
        staged, self._staged, self._bytes = self._staged, [], 0
        batch = Batch()
        try:
            failed = self._flush_pairs({item.pair.index: item.pair for item in staged})
            for item in staged:
                error = failed.get(item.pair.index) or self._check_landed(item)
                if error is None:
                    batch.landed.append(Landed(item.sha, item.size, item.pair.members))
                else:
                    batch.failed.append((item.sha, error))
        finally:
            self._release(staged)
        return batch

    def _flush_pairs(self, pairs: dict[int, Pair]) -> dict[int, str]:
        failed: dict[int, str] = {}
        for index, pair in pairs.items():
            first, *others = [self._refills[disk.root] for disk in pair.members]
            try:
                first.flush()
            except StorageUnavailable as exc:
                for refill in others:  # the markers may not be durable: no copy may be linked
                    refill.abort()
                failed[index] = str(exc)
                continue
            for refill in others:
                try:
                    refill.flush()
                except StorageUnavailable as exc:
                    failed[index] = str(exc)
        return failed

    def _check_landed(self, item: _Staged) -> str | None:
        """Both copies in place (another process may have linked one first: the mtimes are
        then aligned, as the pipeline's `settle` does); else why not."""
        present = self.uploads.lookup.present_on(item.pair, item.sha)
        if len(present) < len(item.pair.members):
            return f"pair {item.pair.index}: a copy written is gone"
        if len({found.mtime_ns for found in present.values()}) > 1:
            settle([(found.path, False) for found in present.values()])
        return None

    def abort(self) -> None:
        """Drop every staged copy (an interrupted evacuation): nothing of them stays."""
        staged, self._staged, self._bytes = self._staged, [], 0
        try:
            for refill in self._refills.values():
                refill.abort()
        finally:
            self._release(staged)

    def _release(self, staged: list[_Staged]) -> None:
        for item in staged:
            self.uploads.pool.release(item.pair, item.size)


async def relocated(uploads: Uploads, landed: list[Landed]) -> dict[Sha, Exception]:
    """After `Relocation.flush`, what `Upload.publish` does after its commit, for each blob:
    its location remembered, its new copies removed if it was taken down meanwhile (`BlobGone`),
    the S3 mirror told (`StorageUnavailable` when a synchronous mirror fails: it stays queued).
    What failed, by sha."""
    await uploads.offload.run(_remember, uploads, landed)
    failed: dict[Sha, Exception] = {}
    for item in landed:
        try:
            await uploads.takedowns.check_after_write(item.sha, list(item.disks))
            await uploads.s3.published(item.sha, item.disks[0].blob_path(item.sha))
        except (BlobGone, StorageUnavailable) as exc:
            failed[item.sha] = exc
    return failed


def _remember(uploads: Uploads, landed: list[Landed]) -> None:
    for item in landed:
        uploads.lookup.hints.remember(item.sha, item.disks[0].root)
