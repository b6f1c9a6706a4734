"""BlobService: the blob store as the HTTP layer and the tools see it.

A small facade over parts that `wiring` builds: the hot path (answers on the event loop),
the lookup (worker threads: caches, then disks), the S3 tier (fallback and mirror, or
nothing), the upload pipeline (every write), integrity (quarantine and heal) and status.
The disks are the truth; the location cache is a hint in front of them, S3 a fallback
behind them. Blocking calls leave the event loop one hop per operation.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import KW_ONLY, dataclass
from typing import ParamSpec, TypeVar

from stor.backends.disk import Disk
from stor.backends.groupcommit import GroupCommits
from stor.backends.locations import LocationCache
from stor.backends.openfiles import OpenFiles
from stor.backends.pairs import Pair, StoragePool
from stor.backends.recordplaces import PoolPlaces
from stor.backends.refill import BATCH_BYTES, BATCH_FILES
from stor.backends.tombstones import TombstoneStore
from stor.digest import Sha
from stor.errors import BlobGone, BlobLost, BlobNotFound, StorageUnavailable
from stor.metrics import Metrics
from stor.model import BlobInfo, BlobStat, PutResult, StatusReport
from stor.service.admission import Admission, Place
from stor.service.announce import Announcer, NoAnnouncer
from stor.service.events import EventLog
from stor.service.health import HealthMonitor
from stor.service.hotpath import HotPath
from stor.service.integrity import Integrity
from stor.service.lookup import Lookup, ThreadMode
from stor.service.offload import Background, Offload, blocking_chunks
from stor.service.relocation import Landed, Relocation, relocated
from stor.service.s3tier import S3Part
from stor.service.status import StatusReporter
from stor.service.stream import OpenBlob
from stor.service.takedown import TakedownReport, Takedowns
from stor.service.upload import Uploads

log = logging.getLogger(__name__)

T = TypeVar("T")
P = ParamSpec("P")

MISSES = (BlobNotFound, StorageUnavailable, BlobLost)
"""What the disks answer when they cannot serve a blob: S3 is asked next."""
STAT_BATCH = 1000


@dataclass(eq=False)
class BlobService:
    pool: StoragePool
    monitor: HealthMonitor
    _: KW_ONLY
    lookup: Lookup
    hot: HotPath
    uploads: Uploads
    integrity: Integrity
    takedowns: Takedowns
    events: EventLog
    announcer: Announcer | NoAnnouncer
    admission: Admission
    s3: S3Part
    reporter: StatusReporter
    open_files: OpenFiles
    locations: LocationCache | None
    commits: GroupCommits
    offload: Offload
    background: Background
    metrics: Metrics

    def __post_init__(self) -> None:
        self._lost: set[Sha] = set()  # announced lost by this process (once each)

    # -- start-up and shutdown -------------------------------------------------------------

    def prepare(self, *, sweep: bool = True) -> int:
        """Blocking, at start-up: claim temp and queue directories, and (with `sweep`) remove
        the stale temps of dead processes; how many were removed."""
        swept = sum(disk.prepare(sweep=sweep) for disk in self.pool.disks)
        self.s3.prepare()
        self.takedowns.store.prepare()
        self.events.prepare()
        return swept

    @property
    def record_places(self) -> PoolPlaces:
        """Where name and takedown records are written and found (see `recordplaces`)."""
        return PoolPlaces(self.pool)

    @property
    def pairs(self) -> list[Pair]:
        """The storage pairs, in config order (a list replaced whole when a pair is added)."""
        return self.pool.pairs

    def set_writable(self, writable: Callable[[Pair], bool]) -> None:
        """Which pairs take writes from now on (a reload of `writable_pairs_regex`)."""
        for pair in self.pool.pairs:
            pair.writable = writable(pair)

    async def in_thread(self, call: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a blocking `call` in one of the service's worker threads."""
        return await self.offload.run(functools.partial(call, *args, **kwargs))

    def body_from(self, chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
        """A body for `put`, `repair` or `relocate` read from a blocking iterator, a chunk per
        thread hop."""
        return blocking_chunks(self.offload, chunks)

    async def check_health(self) -> None:
        """Probe every disk now (the tools' first look, before they judge a pair)."""
        await self.monitor.check()

    def add_pair(self, pair: Pair) -> None:
        """Blocking: serve a pair added at run time (a config reload). Its disks are prepared
        first; if one cannot be, nothing is added (`StorageUnavailable`)."""
        for disk in pair.members:
            disk.prepare()
        self.pool.add(pair)
        self.monitor.add(list(pair.members))
        for disk in pair.members:
            self.s3.add(disk)
            self.events.add(disk)
        self.s3.prepare()
        self.events.prepare()

    async def run_background(self, health_interval: float) -> None:
        """Health probes, cache checks, healing and the S3 mirror; runs until cancelled."""
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._health_loop(health_interval))
            tasks.create_task(self.integrity.healer.run(self.heal))
            tasks.create_task(self.s3.run(self.lookup.local_path))
            tasks.create_task(self.hot.flush_counts())
            tasks.create_task(self.takedowns.run())
            tasks.create_task(self.events.run())
            tasks.create_task(self.announcer.run())

    async def _health_loop(self, interval: float) -> None:
        while True:
            await self.monitor.check()
            await self.offload.run(self._let_go_of_down_disks)
            await self.offload.run(self.s3.prepare)  # a disk that came back gets a queue again
            await self.offload.run(self.events.prepare)
            await self.reporter.check_cache()
            await self.reporter.read_scrub_runs()
            await asyncio.sleep(interval)

    def _let_go_of_down_disks(self) -> None:
        """Nothing stays open on a disk that failed its probe (so a dead one can be unmounted
        at once; its own probe lets go of its temp directory)."""
        for disk in self.pool.disks:
            last = self.monitor.last(disk)
            if last is None or not last.ok:
                self.open_files.forget_disk(disk.root)
            if last is not None and not last.readable:
                self.s3.let_go(disk)
        self.open_files.close_dropped()

    def close(self) -> None:
        """Release everything the service took: threads, open copies, connections, and the
        directories it claimed on the disks (their lock files)."""
        self.s3.close()
        self.events.close()
        self.background.close()
        self.offload.close()
        self.commits.close()
        self.open_files.close()
        self.monitor.close()
        if self.locations is not None:
            self.locations.close()
        self.metrics.close()
        for disk in self.pool.disks:
            disk.close()

    # -- reads -----------------------------------------------------------------------------

    def stat_now(self, sha: Sha) -> BlobStat | None:
        """`stat`, when it takes no thread hop (a kept-open copy); else None: await `stat`."""
        return self.hot.stat_now(sha)

    def open_now(self, sha: Sha) -> OpenBlob | None:
        """`open`, when it takes no thread hop (a small hot blob); else None: await `open`."""
        return self.hot.open_now(sha)

    async def stat(self, sha: Sha, *, hot_tried: bool = False) -> BlobStat:
        """The stat of a good copy. `hot_tried`: the caller has just had None from `stat_now`."""
        found = None if hot_tried else self.hot.stat_now(sha)
        if found is not None:
            return found
        return await self.offload.run(self._stat, sha)

    async def open(self, sha: Sha, *, hot_tried: bool = False) -> OpenBlob:
        """A good copy, open (the caller closes it), as `stat`."""
        blob = None if hot_tried else self.hot.open_now(sha)
        if blob is not None:
            return blob
        blob = await self.offload.run(self._open, sha)
        if blob.from_s3:
            self.s3.fill_later(blob, self.uploads.restore)
        return blob

    def _stat(self, sha: Sha) -> BlobStat:
        try:
            return self.lookup.find(sha, self.lookup.threaded(self.lookup.stat_checked)).value
        except MISSES as miss:
            return self._from_s3(self.s3.stat, sha, miss)

    def _open(self, sha: Sha) -> OpenBlob:
        try:
            mode: ThreadMode[OpenBlob] = self.lookup.threaded(self.lookup.open_copy)
            return self.lookup.find(sha, mode).value
        except MISSES as miss:
            return self._from_s3(self.s3.open, sha, miss)

    def _from_s3(self, ask: Callable[[Sha, Exception], T], sha: Sha, miss: Exception) -> T:
        """Ask S3 after the disks missed with `miss`; a blob lost on the disks and absent from
        S3 is counted, and announced once per process."""
        try:
            return ask(sha, miss)
        except BlobLost as lost:
            self.metrics.integrity("lost")
            if sha not in self._lost:
                self._lost.add(sha)
                self.events.note("blob.lost", sha=sha, reason=str(lost))
            raise

    def record_event(
        self, event: str, *, sha: str | None = None, size: int | None = None, name: str | None = None
    ) -> None:
        """Blocking: record a lifecycle event (see `events`) before the request is answered."""
        self.events.record(event, sha=sha, size=size, name=name)

    def requested(self, sha: Sha) -> None:
        """A GET or HEAD asked for `sha` (found or not): Stor's `rabbitmq_uri` hint, off the
        request path."""
        self.announcer.announce(sha)

    async def taken_down(self, shas: list[Sha]) -> set[Sha]:
        """Which of `shas` an admin took down (one thread hop)."""
        return await self.in_thread(lambda: {sha for sha in shas if self.takedowns.gone(sha) is not None})

    async def stat_many(self, shas: list[Sha]) -> dict[Sha, BlobInfo | None]:
        """Batch existence: size and copy count per sha (None when stored nowhere), one thread
        hop per 1000 shas. At most one `stat` per copy; S3 is asked only about blobs no disk
        has (`s3` is None when it was not asked)."""
        answers: dict[Sha, BlobInfo | None] = {}
        for start in range(0, len(shas), STAT_BATCH):
            answers.update(await self.offload.run(self._stat_batch, shas[start : start + STAT_BATCH]))
        return answers

    def _stat_batch(self, shas: list[Sha]) -> dict[Sha, BlobInfo | None]:
        answers: dict[Sha, BlobInfo | None] = {}
        for sha in shas:
            if self.takedowns.gone(sha) is not None:
                answers[sha] = None  # gone: as good as never stored
                continue
            copies = self.lookup.copies(sha)
            if copies is None:
                answers[sha] = self.s3.info(sha)
            else:
                size = next(iter(copies.present.values())).size
                answers[sha] = BlobInfo(size, len(copies.present), None)
        return answers

    # -- writes ----------------------------------------------------------------------------

    async def put(
        self,
        sha: Sha,
        body: AsyncIterator[bytes],
        length: int | None,
        *,
        early_answer: bool = True,
        restore_by: str | None = None,
    ) -> PutResult:
        """Store a client's body under `sha` (see `Uploads.put`); `restore_by`: the admin whose
        upload restores a blob taken down."""
        return await self.uploads.put(sha, body, length, early_answer=early_answer, restore_by=restore_by)

    def admitted(self, declared: int | None) -> AbstractAsyncContextManager[Place]:
        """Hold one of this worker's upload places for a block, for an upload declaring
        `declared` bytes (None: not said) (`Overloaded` when none is free: see `admission`)."""
        return self.admission.admitted(declared)

    async def take_down(self, sha: Sha, admin: str, reason: str) -> TakedownReport:
        """Take `sha` down for good (see `takedown`): `BlobGone` if it was already,
        `BlobNotFound` if it was never stored."""
        return await self.in_thread(self.takedowns.take_down, sha, admin, reason, s3_holds=self._s3_holds)

    def _s3_holds(self, sha: Sha) -> bool:
        return self.s3.info(sha) is not None

    async def repair(
        self, sha: Sha, pair: Pair, targets: list[Disk], body: AsyncIterator[bytes], size: int, mtime: int
    ) -> list[str]:
        """Rewrite `sha` on `targets` of `pair` from a verified source (see `Uploads.repair`)."""
        paths = await self.uploads.repair(sha, pair, targets, body, size, mtime)
        await self.in_thread(self.events.note, "blob.repaired", sha=sha, size=size, pair=pair.index, reason="scrub")
        return paths

    async def relocate(self, sha: Sha, away: Pair, body: AsyncIterator[bytes], size: int, mtime: int) -> PutResult:
        """Store `sha` on a writable pair other than `away` (see `Uploads.relocate`)."""
        return await self.uploads.relocate(sha, away, body, size, mtime)

    def relocation(self, away: Pair, *, batch_files: int = BATCH_FILES, batch_bytes: int = BATCH_BYTES) -> Relocation:
        """Batched `relocate` for `stor evacuate`: verified copies written onto other pairs a
        batch at a time (see `relocation`); each batch then goes through `relocated`."""
        return Relocation(self.uploads, away, batch_files=batch_files, batch_bytes=batch_bytes)

    async def relocated(self, landed: list[Landed]) -> dict[Sha, Exception]:
        """A batch of a `relocation` is durable: remember, check and mirror it (see
        `relocation.relocated`); what failed, by sha (`BlobGone`: taken down meanwhile)."""
        return await relocated(self.uploads, landed)

    @property
    def tombstones(self) -> TombstoneStore:
        """The takedown records (for `stor scrub`, which removes what they name)."""
        return self.takedowns.store

    def s3_source(self, sha: Sha) -> tuple[Iterator[bytes], int, int] | None:
        """Blocking: S3's verified bytes of `sha`, its size and mtime; None when S3 lacks it or
        is off (a scrub's last source for a blob both members lost)."""
        return self.s3.source(sha)

    async def put_content(self, body: AsyncIterator[bytes], length: int | None) -> tuple[Sha, int, PutResult]:
        """Store a body whose sha is not known in advance (see `Uploads.put_content`)."""
        return await self.uploads.put_content(body, length)

    async def heal(self, sha: Sha) -> None:
        """Re-copy `sha` onto the members that lost it, from a verified copy (disk or S3);
        nothing for a blob taken down meanwhile."""
        try:
            blob = await self.open(sha)
        except BlobGone:
            return
        try:
            result = await self.uploads.restore(sha, blob.chunks(0, blob.stat.size), blob.stat.size)
        finally:
            blob.close()
        if result.created:
            self.metrics.integrity("healed")
            log.info("healed %s: %s", sha, ", ".join(result.paths))
            await self.in_thread(self.events.note, "blob.repaired", sha=sha, size=blob.stat.size, reason="healed")

    # -- status ----------------------------------------------------------------------------

    async def status(self) -> StatusReport:
        return await self.reporter.report()

    @property
    def scrub_runs(self) -> list[dict[str, object]]:
        return self.reporter.scrub_runs

    @property
    def scrubs_running(self) -> list[dict[str, object]]:
        return self.reporter.scrubs_running
