"""The evacuation's removals: blobs durable elsewhere (or taken down) removed from the evacuated
pair in batches, each batch `grace` seconds after it landed, while the next batches are copied.

The grace is what keeps reads from failing: a lookup that began before a blob moved, and
probed its new pair before the copies landed there, still finds it on the old pair.
"""

from __future__ import annotations

import time
from collections import deque

from stor.backends.pairs import Pair
from stor.backends.removal import remove_copies
from stor.digest import Sha
from stor.errors import InsufficientStorage, StorageUnavailable

GRACE = 2.0
"""Seconds between a batch landing on its new pairs and its removal from the old one: far
longer than a lookup takes (a hung disk is skipped, not waited for)."""
READY_MAX = 2048
"""Blobs found elsewhere already wait for removal in groups of at most this many."""


class Removals:
    def __init__(self, pair: Pair, grace: float = GRACE) -> None:
        self.pair = pair
        self.grace = grace
        self._ready: list[Sha] = []
        self._due: deque[tuple[float, list[Sha]]] = deque()

    def ready(self, sha: Sha) -> None:
        """`sha` may go from the pair (it is durable elsewhere, or taken down) once its group
        has landed (`landed`)."""
        self._ready.append(sha)
        if len(self._ready) >= READY_MAX:
            self.landed()

    def landed(self) -> None:
        """The blobs made ready so far are removed `grace` seconds from now."""
        if self._ready:
            self._due.append((time.monotonic() + self.grace, self._ready))
            self._ready = []

    def remove_due(self, failed: list[str]) -> int:
        """Remove the groups whose grace is over; how many blobs went (failures noted)."""
        removed = 0
        while self._due and self._due[0][0] <= time.monotonic():
            removed += self._remove(self._due.popleft()[1], failed)
        return removed

    def finish(self, failed: list[str]) -> int:
        """Remove every group, waiting out the grace of the last ones."""
        self.landed()
        removed = 0
        while self._due:
            deadline, shas = self._due.popleft()
            time.sleep(max(0.0, deadline - time.monotonic()))
            removed += self._remove(shas, failed)
        return removed

    def _remove(self, shas: list[Sha], failed: list[str]) -> int:
        gone: set[Sha] = set()
        for disk in self.pair.members:
            try:
                removed, errors = remove_copies(disk, shas)
            except (StorageUnavailable, InsufficientStorage) as exc:
                failed.extend(f"{sha}: {exc}" for sha in shas)
                continue
            gone.update(removed)
            failed.extend(f"{sha}: {error}" for sha, error in errors)
        return len(gone)
