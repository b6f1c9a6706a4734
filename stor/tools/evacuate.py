"""`stor evacuate --pair N`: empty a pair that takes no writes, so its disks can be retired.

Each blob on pair N goes through the upload pipeline onto the writable pairs (verified, both
copies durable, queued for S3, its location remembered in memcached), keeping its mtime; only
then is it removed from pair N. Copies are moved in batches, and a batch is removed from pair
N only `grace` seconds after its last copy landed elsewhere, so that a lookup that began
before a blob moved (and probed its new pair first) finds it on pair N still: reads never
fail meanwhile. Interrupted, it leaves nothing half-done (a blob is on pair N until it is
durable elsewhere); run again, it carries on with what is left. When no writable pair has
room, it stops cleanly and says how many blobs are left.

The name records live on pair 0 (the names pair): evacuating it is refused.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

from stor.backends.pairs import Pair, leaves
from stor.digest import Sha, sha_from_filename
from stor.errors import BlobGone, DigestMismatch, InsufficientStorage, StorageUnavailable
from stor.model import PutResult

log = logging.getLogger(__name__)

GRACE = 2.0
"""Seconds between a batch landing on its new pairs and its removal from the old one: far
longer than a lookup takes (a hung disk is skipped, not waited for)."""
BATCH = 256

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
    bytes: int = 0
    left: int = 0  # blobs still on the evacuated pair
    failed: list[str] = field(default_factory=list)
    stopped: str | None = None  # why it stopped early (no room elsewhere)
    interrupted: bool = False

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


class Evacuation:
    def __init__(
        self,
        pair: Pair,
        relocate: Relocate,
        *,
        progress: Callable[[int, int], None] | None = None,
        grace: float = GRACE,
        batch: int = BATCH,
    ) -> None:
        self.pair = pair
        self.relocate = relocate
        self.progress = progress or (lambda blobs, size: None)
        self.grace = grace
        self.batch = batch

    def run(self) -> EvacuationReport:
        report = EvacuationReport(self.pair.index)
        landed: list[Sha] = []
        try:
            for sha in self._blobs():
                try:
                    self._move(sha, report)
                except InsufficientStorage as exc:
                    report.stopped = f"no writable pair has room: {exc}"
                    break
                except (StorageUnavailable, DigestMismatch, OSError) as exc:
                    report.failed.append(f"{sha}: {exc}")
                    continue
                landed.append(sha)
                if len(landed) >= self.batch:
                    self._remove(landed, report)
        except KeyboardInterrupt:
            report.interrupted = True
        finally:
            self._remove(landed, report)
        report.left = sum(1 for _ in self._blobs())
        report.finished = time.time()
        return report

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
        """Store `sha` elsewhere from the first copy on the pair that passes the pipeline's
        hash check (a corrupt copy fails it; the partner's is tried next)."""
        errors: list[str] = []
        for disk in self.pair.members:
            try:
                st = disk.stat(sha)
                if st is None:
                    continue
                result = self.relocate(sha, self.pair, _read(disk.blob_path(sha)), st.size, st.mtime_ns)
            except BlobGone:
                report.taken_down += 1  # nowhere to move it: it is removed with the others
                return
            except (DigestMismatch, StorageUnavailable, OSError) as exc:
                errors.append(f"{disk.root}: {exc}")
                continue
            if result.created:
                report.moved += 1
                report.bytes += st.size
            else:
                report.already_elsewhere += 1
            self.progress(1, st.size)
            return
        raise StorageUnavailable("; ".join(errors) or "no copy left to move")

    def _remove(self, landed: list[Sha], report: EvacuationReport) -> None:
        """Remove the blobs that landed elsewhere from the pair, after the grace period."""
        if not landed:
            return
        time.sleep(self.grace)
        for sha in landed:
            removed = False
            for disk in self.pair.members:
                try:
                    removed = disk.remove(sha) or removed
                except StorageUnavailable as exc:
                    report.failed.append(f"{sha}: {exc}")
            report.removed += removed
        landed.clear()


def _read(path: str) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        while chunk := handle.read(1024 * 1024):
            yield chunk
