"""The scrub's batched refills: copies missing on a member, written from the verified partner in
batches (`backends.refill`: one `syncfs` per batch, not a commit per blob), and noted in the
scrub's report once they are durable, or failed."""

from __future__ import annotations

from dataclasses import dataclass

from stor.backends.disk import Disk
from stor.backends.refill import Refill
from stor.checksum import FastSum
from stor.digest import Sha
from stor.errors import InsufficientStorage, StorageUnavailable
from stor.tools.scrubreport import Finding, ScrubReport

REFILL_KEEP = 1024 * 1024
"""Good copies up to this size keep their bytes from the hash pass for a batched refill: a blank
member is refilled without reading the partner twice."""


@dataclass
class _Waiting:
    sha: Sha
    pair: int
    disk: Disk


class Refills:
    def __init__(self) -> None:
        self._refills: dict[str, Refill] = {}
        self._waiting: dict[str, list[_Waiting]] = {}  # staged on each disk, in order

    def add(
        self,
        pair: int,
        sha: Sha,
        source: str,
        data: bytes | None,
        mtime_ns: int,
        fast: FastSum,
        targets: list[Disk],
        report: ScrubReport,
    ) -> None:
        """Stage a copy of `sha` on each of `targets` from the verified `source` (its bytes
        `data` when kept); whatever a batch made durable meanwhile is noted."""
        for disk in targets:
            refill = self._refills.setdefault(disk.root, Refill(disk))
            waiting = self._waiting.setdefault(disk.root, [])
            try:
                done = refill.add(sha, source, data, mtime_ns, fast)
            except (StorageUnavailable, InsufficientStorage) as exc:
                report.note(Finding(sha, pair, disk.root, "missing", f"failed: {exc}"), damage=True)
                if not refill.staged:  # the batch this copy completed failed: so did every copy in it
                    self._finished(disk.root, len(waiting), report, str(exc))
                continue
            waiting.append(_Waiting(sha, pair, disk))
            if done:
                self._finished(disk.root, len(done), report)

    def flush(self, report: ScrubReport) -> None:
        """Make every staged copy durable (before a checkpoint, and at the end)."""
        for root, refill in self._refills.items():
            count = len(self._waiting.get(root, []))
            try:
                refill.flush()
            except StorageUnavailable as exc:
                self._finished(root, count, report, str(exc))
            else:
                self._finished(root, count, report)

    def abort(self) -> None:
        for refill in self._refills.values():
            refill.abort()
        self._waiting.clear()

    def _finished(self, root: str, count: int, report: ScrubReport, error: str | None = None) -> None:
        """The first `count` copies staged on `root` are durable (or, with `error`, failed)."""
        waiting = self._waiting.get(root, [])
        finished, self._waiting[root] = waiting[:count], waiting[count:]
        for item in finished:
            if error is None:
                report.repaired += 1
                report.note(Finding(item.sha, item.pair, item.disk.root, "missing", "repaired"), damage=False)
            else:
                report.note(Finding(item.sha, item.pair, item.disk.root, "missing", f"failed: {error}"), damage=True)
