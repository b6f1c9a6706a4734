"""The upload pipeline, the one way bytes become a blob: plan → reserve → spool → stage →
publish, or abort.

Every writer goes through it: `POST /<sha>` (`put`), named files (`put_content`), `stor import`
(`put`), the healer and S3 refills (`restore`), `stor scrub --repair` (`repair`), `stor evacuate`
(`relocate`). So every copy gets the same guarantees: a blob an admin took down is never
written again (but by an admin's own upload, which restores it), even by an upload already in
flight when it was taken down; the digest checked before anything is visible, both copies durable
(group-committed where the filesystem allows) before either is linked, the bytes counted
against the pair's free space while in flight, the S3 queue marker durable before any copy is
visible, and the location remembered. A failure at any step removes the temps.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import KW_ONLY, dataclass
from types import TracebackType

from stor.backends.disk import Disk, now_ns
from stor.backends.groupcommit import GroupCommits
from stor.backends.pairs import Pair, PairWrite, StoragePool, settle
from stor.digest import Sha
from stor.errors import InsufficientStorage
from stor.model import PutResult
from stor.service.events import EventLog
from stor.service.health import HealthMonitor
from stor.service.lookup import Lookup
from stor.service.offload import Offload
from stor.service.publish import publish
from stor.service.s3tier import S3Part
from stor.service.takedown import Takedowns

SPOOL_BYTES = 1024 * 1024
"""Upload bytes buffered in memory before a thread hop writes them: bounds memory per upload."""
DATE_LAG_NS = 1_000_000_000
"""A new blob's mtime is its upload time less this: the servers' `Date` header lags the clock
by up to a second, and `Last-Modified` (the mtime) must never be later than `Date` (RFC 9110
§8.8.2.1). Set once at upload, it is stable for good, whichever copy answers."""


@dataclass(frozen=True)
class Plan:
    """Where an upload goes: the members of `pair` to write (none when every copy exists),
    the mtime to give them (the existing copies', so `Last-Modified` agrees; None: now), the
    paths of the copies already in place, and whether the blob is queued for S3."""

    pair: Pair
    targets: list[Disk]
    mtime_ns: int | None
    kept: list[str]
    queue_s3: bool
    restoring: bool = False
    """An admin's upload of a blob taken down: the takedown is lifted, not enforced."""
    event: str | None = None
    """The lifecycle event the upload records when it writes (`blob.stored` for a new blob,
    `blob.restored` for one an admin brings back), or None."""

    @property
    def done(self) -> bool:
        return not self.targets


class Upload:
    """One upload in flight. Its bytes are reserved on the pair from creation until the end
    of its `async with` block (or `close`); leaving that block with an error aborts it."""

    def __init__(self, pipeline: Uploads, plan: Plan, size: int) -> None:
        self.pipeline = pipeline
        self.plan = plan
        self.size = size
        self.received = 0
        self.writer = PairWrite(plan.targets)
        self._paths: list[str] | None = None
        self._event: str | None = None
        self._reserved = True
        pipeline.pool.reserve(plan.pair, size)

    async def __aenter__(self) -> Upload:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is not None and (self.writer.temps or self._event is not None):  # else nothing to undo
            await self.pipeline.offload.run(self._undo)  # one hop, run to the end even when cancelled
        self.close(failed=False)

    def _undo(self) -> None:
        """Blocking: the upload failed: its temps removed, the event it staged not published."""
        self.writer.abort()
        if self._event is not None and self._paths is None:
            self.pipeline.events.discard(self._event)
            self._event = None

    def close(self, *, failed: bool) -> None:
        """Blocking: abort (when `failed`) and release the reservation, once."""
        if failed:
            self._undo()
        if self._reserved:
            self._reserved = False
            self.pipeline.pool.release(self.plan.pair, self.size)

    async def spool(self, body: AsyncIterator[bytes]) -> bytes:
        """Write the body to the temps a MiB at a time; return the rest, for `stage`."""
        buffer = bytearray()
        async for chunk in body:
            buffer += chunk
            self.received += len(chunk)
            if len(buffer) >= SPOOL_BYTES:
                await self.pipeline.offload.run(self.writer.write, buffer)
                buffer.clear()
        return bytes(buffer)

    def stage(self, sha: Sha, tail: bytes) -> None:
        """Blocking: check the digest and complete every temp, and write the S3 queue marker
        (durable before any copy is linked: here, or by the first copy's group commit). When
        no copy can be group-committed, they are committed here too."""
        mtime = now_ns() - DATE_LAG_NS if self.plan.mtime_ns is None else self.plan.mtime_ns
        self.writer.stage(sha, mtime, tail, group=True)
        temps = self.writer.temps
        if self.plan.queue_s3:
            self.pipeline.s3.enqueue(self.writer.disks[0], sha, durable=not temps[0].groupable)
        if self.plan.event is not None:  # durable with the first copy, as the S3 marker
            self._event = self.pipeline.events.record(
                self.plan.event,
                disk=self.writer.disks[0],
                durable=not temps[0].groupable,
                sha=sha,
                size=self.size or self.received,
                pair=self.plan.pair.index,
            )
        if not any(temp.groupable for temp in temps):
            self._paths = settle([temp.commit(sha) for temp in temps])
            self.pipeline.lookup.hints.remember(sha, self.writer.disks[0].root)

    async def publish(self, sha: Sha) -> PutResult:
        """Make the staged copies durable and visible (see `publish`), then mirror."""
        if self._paths is None:
            self._paths = await publish(self.writer, sha, self.pipeline.commits, self.pipeline.offload)
            await self.pipeline.lookup.hints.remember_soon(sha, self.writer.disks[0].root)
        if not self.plan.restoring:  # taken down while it was being written: it must not win
            await self.pipeline.takedowns.check_after_write(sha, self.writer.disks)
        if self.plan.queue_s3:
            await self.pipeline.s3.published(sha, self._paths[0])
        return PutResult(True, self.plan.kept + self._paths)


@dataclass(eq=False)
class Uploads:
    pool: StoragePool
    monitor: HealthMonitor
    lookup: Lookup
    _: KW_ONLY
    commits: GroupCommits
    offload: Offload
    s3: S3Part
    takedowns: Takedowns
    events: EventLog

    def __post_init__(self) -> None:
        self._sha_locks: dict[Sha, tuple[asyncio.Lock, int]] = {}

    async def put(
        self,
        sha: Sha,
        body: AsyncIterator[bytes],
        length: int | None,
        *,
        early_answer: bool = True,
        restore_by: str | None = None,
    ) -> PutResult:
        """Store a client's body under `sha`. A blob taken down is refused (`BlobGone`), but to
        an admin (`restore_by`), whose upload lifts it. With `early_answer` (a client that waits
        for our word before it sends the body) the blob is looked up and placed before the body
        is read, and when every copy already exists it is not read at all. Without, the client
        is sending already: its first `SPOOL_BYTES` are read before anything else is done, so a
        small body is checked, placed and written in one thread hop, and an upload that never
        sends that much (a stalled or crawling client, cut by the rate floor) costs no lookup,
        no placement and no reservation."""
        async with self._sha_lock(sha):
            if restore_by is not None:
                result = await self._store(
                    sha, body, length or 0, queue_s3=True, restoring=True, new_event="blob.stored"
                )
                await self.offload.run(self.takedowns.lift, sha, restore_by)
                return result
            if early_answer:
                return await self._store(sha, body, length or 0, queue_s3=True, new_event="blob.stored")
            data, ended = await _first_spool(body)
            if not ended:
                rest = _prefixed(data, body)
                return await self._store(sha, rest, length or 0, queue_s3=True, new_event="blob.stored")
            plan, upload = await self.offload.run(self._plan_and_stage, sha, data, length or len(data))
            if upload is None:
                return PutResult(False, plan.kept)
            async with upload:
                return await upload.publish(sha)

    async def restore(self, sha: Sha, body: AsyncIterator[bytes], size: int) -> PutResult:
        """Write back copies of a blob read from a good copy or S3 (the healer, S3 refills).
        No S3 marker: the blob came from a copy that was queued when stored, or from S3."""
        async with self._sha_lock(sha):
            return await self._store(sha, body, size, queue_s3=False)

    async def repair(
        self, sha: Sha, pair: Pair, targets: list[Disk], body: AsyncIterator[bytes], size: int, mtime_ns: int
    ) -> list[str]:
        """Rewrite the copies of `sha` on `targets` (members of `pair`) from a verified source,
        with the surviving copies' mtime (`stor scrub --repair`)."""
        async with self._sha_lock(sha):
            await self.offload.run(self.takedowns.refuse, sha)
            return (await self._write(Plan(pair, targets, mtime_ns, [], queue_s3=True), sha, body, size)).paths

    async def relocate(self, sha: Sha, away: Pair, body: AsyncIterator[bytes], size: int, mtime_ns: int) -> PutResult:
        """Store `sha` on a pair other than `away` (which must take no writes), keeping its
        mtime (`stor evacuate`). Not created: it was complete on another pair already."""
        async with self._sha_lock(sha):
            plan = await self.offload.run(lambda: self.plan(sha, size, queue_s3=True, away=away, mtime_ns=mtime_ns))
            return await self._write(plan, sha, body, size)

    async def put_content(self, body: AsyncIterator[bytes], length: int | None) -> tuple[Sha, int, PutResult]:
        """Store a body whose sha is not known in advance (named files): it is hashed on the
        way in, and if the blob turns out to be stored already the new copies are dropped."""
        pair = await self.offload.run(self.pool.choose_pair, length or 0, self.monitor.pair_healthy)
        plan = Plan(pair, list(pair.members), None, [], queue_s3=True, event="blob.stored")
        async with Upload(self, plan, length or 0) as upload:
            tail = await upload.spool(body)
            sha, existing = await self.offload.run(self._content_sha, upload, tail)
            if existing is not None:
                await self.offload.run(upload.writer.abort)
                return sha, upload.received, PutResult(False, existing)
            await self.offload.run(upload.stage, sha, b"")
            return sha, upload.received, await upload.publish(sha)

    def plan(
        self,
        sha: Sha,
        size: int,
        *,
        queue_s3: bool,
        away: Pair | None = None,
        mtime_ns: int | None = None,
        restoring: bool = False,
        new_event: str | None = None,
    ) -> Plan:
        """Blocking. `BlobGone` when the blob was taken down (unless `restoring`). Nothing to
        write when it is stored on a pair already; else the missing members of a healthy pair
        that holds some copies (keeping their mtime), else every member of a pair chosen by free
        space (given `mtime_ns`, or now). Copies on `away` (a pair being evacuated, which takes
        no writes) are left out of account."""
        if restoring:
            event = "blob.restored" if self.takedowns.gone(sha) is not None else new_event
        else:
            self.takedowns.refuse(sha)
            event = new_event
        copies = self.lookup.copies(sha, skip=away)
        if copies is not None:
            if copies.complete:
                paths = [copies.present[d.root].path for d in copies.pair.members]
                return Plan(copies.pair, [], None, paths, queue_s3, restoring)  # (restoring: lifted all the same)
            if copies.pair.writable and self.monitor.pair_healthy_now(copies.pair):
                missing = [d for d in copies.pair.members if d.root not in copies.present]
                mtime = min(st.mtime_ns for st in copies.present.values())
                kept = [st.path for st in copies.present.values()]
                return Plan(copies.pair, missing, mtime, kept, queue_s3, restoring)
        pair = self.pool.choose_pair(size, self.monitor.pair_healthy)
        if pair is away:
            raise InsufficientStorage(f"pair {pair.index} takes writes: it cannot be evacuated onto itself")
        return Plan(pair, list(pair.members), mtime_ns, [], queue_s3, restoring, event)

    async def _store(
        self,
        sha: Sha,
        body: AsyncIterator[bytes],
        size: int,
        *,
        queue_s3: bool,
        restoring: bool = False,
        new_event: str | None = None,
    ) -> PutResult:
        plan = await self.offload.run(
            lambda: self.plan(sha, size, queue_s3=queue_s3, restoring=restoring, new_event=new_event)
        )
        return await self._write(plan, sha, body, size)

    async def _write(self, plan: Plan, sha: Sha, body: AsyncIterator[bytes], size: int) -> PutResult:
        """The pipeline after the plan: spool, stage, publish (or abort, on any failure)."""
        if plan.done:
            return PutResult(False, plan.kept)
        async with Upload(self, plan, size) as upload:
            tail = await upload.spool(body)
            await self.offload.run(upload.stage, sha, tail)
            return await upload.publish(sha)

    def _plan_and_stage(self, sha: Sha, data: bytes, size: int) -> tuple[Plan, Upload | None]:
        """Blocking: `plan` for `size` bytes (as declared), then `stage` of the whole body, in one
        thread hop."""
        plan = self.plan(sha, size, queue_s3=True, new_event="blob.stored")
        if plan.done:
            return plan, None
        upload = Upload(self, plan, size)
        try:
            upload.stage(sha, data)
        except BaseException:
            upload.close(failed=True)
            raise
        return plan, upload

    def _content_sha(self, upload: Upload, tail: bytes) -> tuple[Sha, list[str] | None]:
        """Spool the last bytes: the body's sha, and the paths of its copies if it is stored."""
        sha = upload.writer.write_last(tail)
        self.takedowns.refuse(sha)
        copies = self.lookup.copies(sha)
        if copies is not None and copies.complete:
            return sha, [copies.present[d.root].path for d in copies.pair.members]
        return sha, None

    @asynccontextmanager
    async def _sha_lock(self, sha: Sha) -> AsyncIterator[None]:
        """Serialise uploads of one sha in this process: the second finds the first's copies
        and answers "exists" without reading its body."""
        lock, users = self._sha_locks.get(sha, (asyncio.Lock(), 0))
        self._sha_locks[sha] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._sha_locks[sha]
            if users == 1:
                del self._sha_locks[sha]
            else:
                self._sha_locks[sha] = (lock, users - 1)


async def _first_spool(body: AsyncIterator[bytes]) -> tuple[bytes, bool]:
    """The body's first `SPOOL_BYTES` (or all of it, if shorter), and whether that was all. The
    rest stays unread in `body`."""
    buffer = bytearray()
    async for chunk in body:
        buffer += chunk
        if len(buffer) >= SPOOL_BYTES:
            return bytes(buffer), False
    return bytes(buffer), True


async def _prefixed(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The body again, from its first bytes already read."""
    yield first
    async for chunk in rest:
        yield chunk
