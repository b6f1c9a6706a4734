"""`stor scrub`: re-hash every copy on every pair, compare the members, repair what is damaged.

It walks each pair leaf directory by leaf directory (`AB/CD/EF`, in order) over the union of
its members' file names, so a copy missing from one member is found as surely as a corrupt
one. With `repair`, bad copies are quarantined (with the server's note schema) and every
missing or bad copy is rewritten from a verified good copy (the partner, else S3) by the
`repair` callable: the CLI hands it to the service's upload pipeline, as every writer does.
It is safe while the server runs: it only adds copies with no-replace links, moves bad ones
aside, and sweeps only the temps of dead processes.

A checkpoint (`<first member>/.stor-scrub/checkpoint.json`) records the last leaf done, so an
interrupted scrub continues where it stopped; the summary of the last complete run goes to
`.stor-scrub/last.json`, where `/status` reads it.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass

from stor.backends.disk import Disk
from stor.backends.namestore import NameStore
from stor.backends.owners import dead_owner_dirs
from stor.backends.pairs import Pair, leaves
from stor.backends.scrubstate import RUNNING, read_json, state_dir, write_json
from stor.backends.tombstones import Tombstone, TombstoneStore
from stor.checksum import FastSum
from stor.digest import Sha, sha_from_filename
from stor.errors import InsufficientStorage, StorageUnavailable
from stor.model import HashedCopy
from stor.service.integrity import quarantine_note
from stor.tools.refills import REFILL_KEEP, Refills
from stor.tools.scrubgone import remove_taken_down, scrub_takedowns
from stor.tools.scrubprogress import PairProgress
from stor.tools.scrubreport import Finding, ScrubReport

S3Source = Callable[[Sha], tuple[Iterator[bytes], int, int] | None]
"""S3's bytes of a blob (checked as they are read), its size and mtime; None when S3 lacks it."""

Repair = Callable[[Sha, Pair, list[Disk], Iterator[bytes], int, int], Future[list[str]]]
"""Start rewriting `sha` on some members of a pair: (sha, pair, targets, chunks, size,
mtime_ns) → a future of the paths written, which raises when the copies could not be made
durable."""
REPAIRS_IN_FLIGHT = 256
"""Repairs under way at once: each waits for a group commit, so one at a time would make a
refill a disk commit per blob (about 25 ms each here) instead of one per cycle."""


@dataclass
class _Pending:
    future: Future[list[str]]
    sha: Sha
    pair: int
    problems: list[tuple[Disk, str]]
    quarantined: set[str]


@dataclass(frozen=True)
class _Copy:
    disk: Disk
    state: str  # ok, corrupt, unreadable
    size: int
    mtime_ns: int
    digest: str | None
    fast: FastSum | None = None
    data: bytes | None = None  # its bytes, when small (for a batched refill)


class Throttle:
    """Keeps the bytes hashed per second under `rate` (None: no limit)."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self._start = time.monotonic()
        self._done = 0

    def spent(self, size: int) -> None:
        if not self.rate:
            return
        self._done += size
        ahead = self._done / self.rate - (time.monotonic() - self._start)
        if ahead > 0:
            time.sleep(ahead)


class Scrubber:
    def __init__(
        self,
        pairs: list[Pair],
        *,
        s3_source: S3Source | None = None,
        names: NameStore | None = None,
        tombstones: TombstoneStore | None = None,
        repair: Repair | None = None,
        rate: float | None = None,
        progress: Callable[[int, int], None] | None = None,
        restart: bool = False,
        batch_refill: bool = True,
        standing: Callable[[dict[str, object]], None] | None = None,
    ) -> None:
        self.pairs = pairs
        self.batch_refill = batch_refill and repair is not None
        self._refills = Refills()
        self.s3_source = s3_source
        self.names = names
        self.tombstones = tombstones
        self._gone: dict[Sha, Tombstone] = {}
        self._pending: deque[_Pending] = deque()
        self.rewrite = repair
        self.throttle = Throttle(rate)
        self.progress = progress or (lambda files, size: None)
        self.standing = standing or (lambda progress: None)
        self.restart = restart

    def run(self) -> ScrubReport:
        report = ScrubReport(pairs=[p.index for p in self.pairs])
        try:
            if self.tombstones is not None:
                self._gone = scrub_takedowns(self.tombstones, report, repair=self.rewrite is not None)
            for pair in self.pairs:
                self._scrub_pair(pair, report)
            if self.names is not None:
                self._scrub_names(self.names, report)
        except KeyboardInterrupt:
            report.interrupted = True
        report.finished = time.time()
        if not report.interrupted:
            for pair in self.pairs:
                write_json(state_dir(pair) / "last.json", {**report.summary(), "pair": pair.index})
        return report

    # -- one pair ------------------------------------------------------------------------------

    def _scrub_names(self, names: NameStore, report: ScrubReport) -> None:
        """Every name record on both members of the records' home pair (a replaced disk lacks
        them; records left on another pair come home)."""
        try:
            report.names, report.names_stale = names.reconcile(restore=self.rewrite is not None)
        except StorageUnavailable as exc:
            report.note(Finding("", 0, "", "names unreadable", f"failed: {exc}"), damage=True)
            return
        if self.rewrite is not None:
            report.names_restored = report.names_stale
        elif report.names_stale:
            report.damage_left += report.names_stale
            report.note(Finding("", 0, "", f"{report.names_stale} name records missing on a member"), damage=False)

    def _scrub_pair(self, pair: Pair, report: ScrubReport) -> None:
        checkpoint = state_dir(pair) / "checkpoint.json"
        after = "" if self.restart else str(read_json(checkpoint).get("leaf", ""))
        if after:
            report.resumed_after[str(pair.index)] = after
        self._stray_temps(pair, report)
        last_saved, safe = time.monotonic(), after  # safe: every leaf up to it is done, repairs too
        progress = PairProgress(pair.index, self.rewrite is not None, after, report)
        running = state_dir(pair) / RUNNING
        try:
            for leaf in leaves(pair, after):
                self._scrub_leaf(pair, leaf, report)
                after = leaf
                if time.monotonic() - last_saved > 1.0:
                    self._settle(report, keep=0)
                    write_json(checkpoint, {"leaf": after, "at": time.time()})
                    last_saved, safe = time.monotonic(), after
                    standing = progress.snapshot(after)
                    write_json(running, standing)
                    self.standing(standing)
            self._settle(report, keep=0)
        except KeyboardInterrupt:
            self._cancel_pending()
            if safe:
                write_json(checkpoint, {"leaf": safe, "at": time.time()})
            raise
        finally:
            running.unlink(missing_ok=True)
        checkpoint.unlink(missing_ok=True)

    def _scrub_leaf(self, pair: Pair, leaf: str, report: ScrubReport) -> None:
        names: set[str] = set()
        for disk in pair.members:
            try:
                names.update(entry for entry in os.listdir(os.path.join(disk.root, leaf)))
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as exc:
                report.unreadable += 1
                report.note(Finding(leaf, pair.index, disk.root, f"unreadable: {exc.strerror}"), damage=True)
        prefix = leaf.replace("/", "")
        for name in sorted(names):
            sha = sha_from_filename(name)
            if sha is None or not sha.upper().startswith(prefix):
                self._foreign(pair, leaf, name, report)
                continue
            try:
                self._scrub_blob(pair, sha, report)
            except KeyboardInterrupt:
                raise
            except (StorageUnavailable, InsufficientStorage, OSError) as exc:
                report.note(Finding(sha, pair.index, "", "error", f"failed: {exc}"), damage=True)

    def _scrub_blob(self, pair: Pair, sha: Sha, report: ScrubReport) -> None:
        if sha in self._gone:
            remove_taken_down(pair, sha, report, repair=self.rewrite is not None)
            return
        good: list[_Copy] = []
        bad: list[_Copy] = []
        missing: list[Disk] = []
        for disk in pair.members:
            copy = self._check_copy(pair, disk, sha, report)
            if copy is None:
                missing.append(disk)
            elif copy.state == "ok":
                good.append(copy)
            else:
                bad.append(copy)
        if not good and not bad:
            report.vanished += 1  # deleted between the listing and the hash
            return
        report.blobs += 1
        good_size = good[0].size if good else None
        problems: list[tuple[Disk, str]] = [(d, "missing") for d in missing]
        for copy in bad:
            short = copy.state == "corrupt" and good_size is not None and copy.size < good_size
            problems.append((copy.disk, "truncated" if short else copy.state))
        for _, problem in problems:
            setattr(report, problem, getattr(report, problem) + 1)
        if not problems:
            return
        if self.rewrite is None:
            for disk, problem in problems:
                report.note(Finding(sha, pair.index, disk.root, problem), damage=True)
            return
        self._repair(self.rewrite, pair, sha, good, bad, problems, report)

    def _check_copy(self, pair: Pair, disk: Disk, sha: Sha, report: ScrubReport) -> _Copy | None:
        """The state of the copy on `disk` (hashed), or None when there is none."""
        try:
            result = disk.hash_copy(sha, keep=REFILL_KEEP if self.batch_refill else 0)
        except StorageUnavailable:
            return _Copy(disk, "unreadable", 0, 0, None)
        if result is None:
            return None
        stat = result.stat
        report.copies += 1
        report.bytes += stat.size
        self.progress(1, stat.size)
        self.throttle.spent(stat.size)
        good = result.sha == sha
        if good and result.recorded != result.fast:
            self._check_sum(pair, disk, sha, result, report)
        return _Copy(disk, "ok" if good else "corrupt", stat.size, stat.mtime_ns, result.sha, result.fast, result.data)

    def _check_sum(self, pair: Pair, disk: Disk, sha: Sha, copy: HashedCopy, report: ScrubReport) -> None:
        """A good copy whose fast checksum is absent or wrong: counted, and with --repair
        written (SHA-256 vouched for the bytes; the attribute is what was wrong)."""
        if copy.recorded is None:
            report.checksums_missing += 1
        else:
            report.checksums_wrong += 1
            report.note(Finding(sha, pair.index, disk.root, "checksum-wrong"), damage=False)
        if self.rewrite is not None and disk.record_sum(sha, copy.fast):
            report.checksums_written += 1

    # -- repair --------------------------------------------------------------------------------

    def _repair(
        self,
        rewrite: Repair,
        pair: Pair,
        sha: Sha,
        good: list[_Copy],
        bad: list[_Copy],
        problems: list[tuple[Disk, str]],
        report: ScrubReport,
    ) -> None:
        if self.batch_refill and good and not bad and all(problem == "missing" for _, problem in problems):
            self._refill(pair, sha, good[0], [disk for disk, _ in problems], report)
            return
        quarantined: set[str] = set()
        for copy in bad:
            if copy.state == "unreadable":
                continue
            note = quarantine_note(sha, actual=copy.digest, size=copy.size, mtime_ns=copy.mtime_ns, found_by="scrub")
            try:
                copy.disk.quarantine.move(sha, note)
                quarantined.add(copy.disk.root)
            except (StorageUnavailable, InsufficientStorage) as exc:
                report.note(Finding(sha, pair.index, copy.disk.root, copy.state, f"failed: {exc}"), damage=True)
        targets = [d for d, p in problems if p == "missing" or d.root in quarantined]
        try:
            source = self._source(sha, good)
        except StorageUnavailable as exc:
            source = None
            error = f"failed: no good copy, and S3 could not be asked: {exc}"
        else:
            error = "failed: no good copy anywhere"
        if source is None:
            report.lost += 1
            for disk, problem in problems:
                report.note(Finding(sha, pair.index, disk.root, problem, error), damage=True)
            return
        chunks, size, mtime = source
        try:
            future = rewrite(sha, pair, targets, chunks, size, mtime)
        except Exception as exc:  # failed before it got under way (the source unreadable, …)
            future = Future()
            future.set_exception(exc)
        self._pending.append(_Pending(future, sha, pair.index, problems, quarantined))
        self._settle(report, keep=REPAIRS_IN_FLIGHT)

    def _refill(self, pair: Pair, sha: Sha, good: _Copy, targets: list[Disk], report: ScrubReport) -> None:
        """A copy missing on `targets`, written from the verified `good` one in batches (see
        `refills`): no pipeline, no per-blob commit."""
        assert good.fast is not None
        source = good.disk.blob_path(sha)
        self._refills.add(pair.index, sha, source, good.data, good.mtime_ns, good.fast, targets, report)

    def _settle(self, report: ScrubReport, *, keep: int) -> None:
        """Wait for the oldest repairs until at most `keep` are under way; note their outcome.
        With `keep` 0, batched refills are made durable too."""
        if keep == 0:
            self._refills.flush(report)
        while len(self._pending) > keep:
            pending = self._pending[0]
            try:
                pending.future.result()
            except Exception as exc:
                for disk, problem in pending.problems:
                    report.note(Finding(pending.sha, pending.pair, disk.root, problem, f"failed: {exc}"), damage=True)
            else:
                for disk, problem in pending.problems:
                    action = "quarantined+repaired" if disk.root in pending.quarantined else "repaired"
                    report.repaired += 1
                    report.note(Finding(pending.sha, pending.pair, disk.root, problem, action), damage=False)
            self._pending.popleft()

    def _cancel_pending(self) -> None:
        self._refills.abort()
        for pending in self._pending:
            pending.future.cancel()
        self._pending.clear()

    def _source(self, sha: Sha, good: list[_Copy]) -> tuple[Iterator[bytes], int, int] | None:
        """The bytes of a good copy (the partner's, else S3's), its size and the mtime to give
        the new copies. The upload pipeline checks the hash of what it writes again."""
        if good:
            return _read_file(good[0].disk.blob_path(sha)), good[0].size, good[0].mtime_ns
        return None if self.s3_source is None else self.s3_source(sha)

    # -- other debris ----------------------------------------------------------------------------

    def _stray_temps(self, pair: Pair, report: ScrubReport) -> None:
        for disk in pair.members:
            stale = _dead_temps(disk)
            report.stray_temps += len(stale)
            removed = False
            if self.rewrite is not None and stale:
                try:
                    disk.sweep_temps()
                    removed = True
                except OSError:
                    removed = False
            for path in stale[:20]:
                report.note(
                    Finding("", pair.index, disk.root, "stray_temp", "removed" if removed else path), damage=not removed
                )

    def _foreign(self, pair: Pair, leaf: str, name: str, report: ScrubReport) -> None:
        """A file that does not belong in the layout: reported, never deleted."""
        report.foreign += 1
        for disk in pair.members:
            if os.path.exists(os.path.join(disk.root, leaf, name)):
                report.note(Finding(f"{leaf}/{name}", pair.index, disk.root, "foreign"), damage=False)


def _dead_temps(disk: Disk) -> list[str]:
    return [
        os.path.join(owner, name)
        for owner in dead_owner_dirs(disk.tmp_root)
        for name in os.listdir(owner)
        if name.endswith(".tmp")
    ]


def _read_file(path: str) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        while chunk := handle.read(1024 * 1024):
            yield chunk
