"""What `/status`, `/readyz` and `/metrics` report: disks, pairs, the cache, S3, scrubs.

The disks are probed with a deadline (`HealthMonitor`) and the cache within the same one, so
a report comes back in time even when a disk or memcached hangs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import KW_ONLY, dataclass

from stor.backends.groupcommit import GroupCommits
from stor.backends.locations import LocationCache
from stor.backends.pairs import Pair, StoragePool
from stor.backends.scrubstate import last_runs, running_scrubs
from stor.metrics import Metrics
from stor.model import DiskHealth, PairState, StatusReport
from stor.service.admission import Admission
from stor.service.announce import Announcer, NoAnnouncer
from stor.service.events import EventLog
from stor.service.health import HealthMonitor
from stor.service.offload import Offload
from stor.service.s3tier import S3Part

log = logging.getLogger(__name__)


@dataclass(eq=False)
class StatusReporter:
    pool: StoragePool
    monitor: HealthMonitor
    _: KW_ONLY
    locations: LocationCache | None
    commits: GroupCommits
    s3: S3Part
    offload: Offload
    metrics: Metrics
    events: EventLog
    announcer: Announcer | NoAnnouncer
    admission: Admission

    def __post_init__(self) -> None:
        self.cache_reachable: bool | None = None
        self.scrub_runs: list[dict[str, object]] = []
        self.scrubs_running: list[dict[str, object]] = []
        self._started = time.monotonic()

    async def report(self) -> StatusReport:
        self.metrics.healthcheck()
        disks, _ = await asyncio.gather(self.monitor.check(), self.check_cache())
        by_root = {h.path: h for h in disks}
        reasons = [f"{h.path}: {h.error}" for h in disks if not h.ok]
        pairs = [self._pair_state(pair, by_root) for pair in self.pool.pairs]
        not_ready = [f"pair {p.index} is down: no member is readable" for p in pairs if p.state == "down"]
        writable = any(p.takes_writes for p in pairs)
        return StatusReport(
            ok=not reasons,
            reasons=reasons,
            ready=not not_ready,
            ready_reasons=not_ready,
            writable=writable,
            events=self.events.status(),
            rabbitmq=self.announcer.status(),
            uploads=self.admission.status(),
            disks=disks,
            pairs=pairs,
            memcached={"configured": self.locations is not None, "reachable": self.cache_reachable},
            s3=self.s3.status(),
            scrub=self.scrub_runs,
            scrub_running=self.scrubs_running,
            uptime=time.monotonic() - self._started,
            reserved_bytes={p.index: self.pool.reserved(p) for p in self.pool.pairs},
            group_commit=self.commits.stats(),
        )

    @staticmethod
    def _pair_state(pair: Pair, by_root: dict[str, DiskHealth]) -> PairState:
        members = [by_root[d.root] for d in pair.members]
        up = sum(1 for h in members if h.ok)
        readable = sum(1 for h in members if h.ok or h.readable)
        state = "healthy" if up == len(members) else "down" if readable == 0 else "degraded"
        takes_writes = pair.writable and up == len(members)
        return PairState(pair.index, [d.root for d in pair.members], pair.writable, state, takes_writes)

    async def check_cache(self) -> None:
        """Ask the cache if it answers, within the status deadline (the breaker makes a dead
        cache answer at once)."""
        if self.locations is None:
            return
        probe = asyncio.ensure_future(self.offload.run(self.locations.reachable))
        try:
            # not asyncio.wait_for: on Python 3.11 it swallows a cancellation that arrives as
            # the probe finishes, and a cancelled health loop then ran on forever
            async with asyncio.timeout(self.monitor.timeout):
                reachable = await asyncio.shield(probe)
        except TimeoutError:
            reachable = False
        # read and set with no await between: of two probes at once (the health loop's and a
        # /status request's), only the first to finish reports the change
        was, self.cache_reachable = self.cache_reachable, reachable
        if self.cache_reachable is False and was is not False:
            log.warning("memcached is unreachable: locations come from the disks until it is back")
        elif self.cache_reachable and was is False:
            log.warning("memcached is reachable again")

    async def read_scrub_runs(self) -> None:
        """The last complete scrub of each pair, and the progress of those under way (written
        by `stor scrub`, another process)."""
        self.scrub_runs = await self.offload.run(last_runs, self.pool.pairs)
        self.scrubs_running = await self.offload.run(running_scrubs, self.pool.pairs)
