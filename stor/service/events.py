"""Blob lifecycle events, published at least once (DESIGN.md §4, `events`).

`record` writes an event into the durable outbox on the disks (`backends.outbox`) before the
request that caused it is answered: `blob.stored` (a new blob), `blob.taken_down`,
`blob.restored`, `blob.lost`, `blob.quarantined`, `blob.repaired`, `name.put`, `name.deleted`,
each with a JSON body `{"event", "sha", "size", "name", "time", "node", "pair", "reason"}`. A
background task in every worker claims events (each by exactly one process of those sharing the
disks), publishes them with publisher confirms, with the event as the routing key, on a durable
topic exchange, and removes them only once confirmed. A broker that is down, slow, restarted or
unreachable at start-up loses nothing and fails nothing: the events wait on the disks. What
fails a request is an outbox that cannot be written (503, as a blob write would).

`NoEvents` is the twin when `events` is not configured: nothing recorded, nothing to run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from dataclasses import asdict, dataclass

from stor.amqpuri import AmqpTarget
from stor.backends.disk import Disk
from stor.backends.outbox import Claimed, Outbox
from stor.errors import StorageUnavailable
from stor.metrics import Metrics
from stor.service.broker import BrokerLink
from stor.service.health import HealthMonitor
from stor.service.offload import Offload

log = logging.getLogger(__name__)

BATCH = 256
IDLE_SECONDS = 0.2
BACKLOG_SECONDS = 5.0
NODE = socket.gethostname()


@dataclass(frozen=True)
class Event:
    event: str
    sha: str | None = None
    size: int | None = None
    name: str | None = None
    time: float = 0.0
    node: str = NODE
    pair: int | None = None
    reason: str | None = None

    def body(self) -> bytes:
        return json.dumps(asdict(self)).encode()


class Events:
    enabled = True

    def __init__(
        self, target: AmqpTarget, outbox: Outbox, monitor: HealthMonitor, *, offload: Offload, metrics: Metrics
    ) -> None:
        self.link = BrokerLink("events", target)
        self.outbox = outbox
        self.monitor = monitor
        self.offload = offload
        self.metrics = metrics
        self.backlog = 0
        self.oldest: float | None = None
        self.published = 0
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def record(
        self,
        event: str,
        *,
        disk: Disk | None = None,
        durable: bool = True,
        sha: str | None = None,
        size: int | None = None,
        name: str | None = None,
        pair: int | None = None,
        reason: str | None = None,
    ) -> str | None:
        """Blocking: write `event` to the outbox (on `disk`, else the first healthy disk) and
        return its path. `StorageUnavailable` when no disk takes it: the caller fails."""
        body = Event(event, sha, size, name, time.time(), NODE, pair, reason).body()
        disks = [disk] if disk is not None else [d for d in self.outbox.disks if self.monitor.healthy(d)]
        errors = []
        for target in disks:
            try:
                path = self.outbox.put(target, body, durable=durable)
            except StorageUnavailable as exc:
                errors.append(str(exc))
                continue
            if self._loop is not None and self._wake is not None:
                self._loop.call_soon_threadsafe(self._wake.set)
            return path
        raise StorageUnavailable(f"the {event} event could not be recorded: {'; '.join(errors) or 'no healthy disk'}")

    def discard(self, path: str) -> None:
        """Blocking: drop a recorded event whose cause did not happen after all (an upload
        that failed after its event was staged with it)."""
        self.outbox.discard(path)

    def add(self, disk: Disk) -> None:
        """A disk added at run time (a config reload)."""
        self.outbox.add(disk)

    def prepare(self) -> None:
        returned = self.outbox.prepare()
        if returned:
            log.info("events: %d events claimed by a process that died are queued again", returned)

    async def run(self) -> None:
        """Publish the outbox, until cancelled."""
        self._loop, self._wake = asyncio.get_running_loop(), asyncio.Event()
        counted = 0.0
        mine: list[Claimed] = []  # claimed, not yet confirmed: retried first
        try:
            while True:
                if time.monotonic() - counted >= BACKLOG_SECONDS:
                    await self._count_backlog()
                    counted = time.monotonic()
                if self.link.due:
                    if len(mine) < BATCH:
                        mine += await self.offload.run(self.outbox.claim, BATCH - len(mine))
                    if mine:
                        mine = await self._publish(mine)
                        if not mine:
                            continue  # more may wait: go on at once
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(IDLE_SECONDS if self.link.due else self.link.wait):
                        await self._wake.wait()
                self._wake.clear()
        finally:
            await self.link.close()

    async def _publish(self, claims: list[Claimed]) -> list[Claimed]:
        """Publish `claims`; the ones still to publish (all of them when the broker failed)."""
        messages, readable = [], []
        for claim in claims:
            try:
                body = await self.offload.run(self.outbox.read, claim)
                event = json.loads(body)["event"]
            except (OSError, ValueError, KeyError) as exc:  # its disk failed: it stays claimed, or goes back at restart
                log.warning("events: cannot read %s on %s: %s", claim.name, claim.disk.root, exc)
                continue
            messages.append((str(event), body, "application/json"))
            readable.append(claim)
        if not await self.link.publish(messages):
            return claims
        for claim in readable:
            await self.offload.run(self.outbox.done, claim)
        self.published += len(readable)
        return [claim for claim in claims if claim not in readable]

    async def _count_backlog(self) -> None:
        self.backlog, self.oldest = await self.offload.run(self.outbox.backlog)
        self.metrics.events_backlog(self.backlog, self.oldest_age)

    @property
    def oldest_age(self) -> float:
        return 0.0 if self.oldest is None else max(0.0, time.time() - self.oldest)

    def status(self) -> dict[str, object]:
        return {
            **self.link.status(),
            "backlog": self.backlog,
            "oldest_age": round(self.oldest_age, 1),
            "published": self.published,
        }

    def note(
        self,
        event: str,
        *,
        sha: str | None = None,
        size: int | None = None,
        name: str | None = None,
        pair: int | None = None,
        reason: str | None = None,
    ) -> None:
        """`record`, for an event that must not fail what caused it (a read that found a corrupt
        copy, a lost blob): an outbox that cannot be written is logged instead."""
        try:
            self.record(event, sha=sha, size=size, name=name, pair=pair, reason=reason)
        except StorageUnavailable as exc:
            log.error("events: %s", exc)

    def close(self) -> None:
        self.outbox.close()


class NoEvents:
    enabled = False

    def record(
        self,
        event: str,
        *,
        disk: Disk | None = None,
        durable: bool = True,
        sha: str | None = None,
        size: int | None = None,
        name: str | None = None,
        pair: int | None = None,
        reason: str | None = None,
    ) -> str | None:
        return None

    def discard(self, path: str) -> None:
        pass

    def note(
        self,
        event: str,
        *,
        sha: str | None = None,
        size: int | None = None,
        name: str | None = None,
        pair: int | None = None,
        reason: str | None = None,
    ) -> None:
        pass

    def add(self, disk: Disk) -> None:
        pass

    def prepare(self) -> None:
        pass

    async def run(self) -> None:
        pass

    def status(self) -> dict[str, object]:
        return {"enabled": False}

    def close(self) -> None:
        pass


EventLog = Events | NoEvents
