"""Where blobs were seen: this process's near cache in front of memcached (`LocationCache`), as
the read algorithm and the upload pipeline ask and tell them. Hints, never the truth: every
answer is checked on the disk it names; memcached failing costs a probe, never an error. Each
event is counted under Stor's cache names."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from stor.backends.locations import ABSENT, CacheUnavailable, LocationCache
from stor.digest import Sha
from stor.metrics import Metrics
from stor.service.nearcache import NearCache
from stor.service.offload import Offload


@dataclass(eq=False)
class Hints:
    near: NearCache
    locations: LocationCache | None
    metrics: Metrics
    offload: Offload

    def get(self, sha: Sha) -> str | None:
        """The location hint for `sha` (near cache, then memcached), counted as Stor counts
        cache events; `ABSENT` when memcached remembers it is stored nowhere."""
        near = self.near.get(sha)
        if near is not None:
            self.metrics.cache("local", 0.0)
            return near
        if self.locations is None:
            self.metrics.cache("miss", 0.0)  # Stor's meaning: the disks must be probed
            return None
        started = time.monotonic()
        try:
            hint = self.locations.get(sha)
        except CacheUnavailable:
            self.metrics.cache("error", time.monotonic() - started)
            return None
        result = "miss" if hint is None else "negative" if hint == ABSENT else "hit"
        self.metrics.cache(result, time.monotonic() - started)
        return hint

    def forget(self, sha: Sha) -> None:
        """The hint for `sha` proved stale: dropped from both caches."""
        self.metrics.cache("stale", 0.0)
        self.near.forget(sha)
        if self.locations is not None:
            self._cache_do(self.locations.forget, sha)

    def remember_absent(self, sha: Sha) -> None:
        if self.locations is not None:
            self._cache_do(self.locations.remember_absent, sha)

    def remember(self, sha: Sha, root: str) -> None:
        self.near.remember(sha, root)
        if self.locations is not None:
            self._cache_do(self.locations.remember, sha, root)

    async def remember_soon(self, sha: Sha, root: str) -> None:
        """`remember`, from the event loop: a thread hop only for memcached."""
        self.near.remember(sha, root)
        if self.locations is not None:
            await self.offload.run(self._cache_do, self.locations.remember, sha, root)

    def _cache_do(self, call: Callable[..., None], *args: object) -> None:
        try:
            call(*args)
        except CacheUnavailable:
            self.metrics.cache("error", 0.0)
