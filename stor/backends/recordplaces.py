"""Where the small records (name records, takedown records) are written, and where they are read.

Records are written on both members of the *home* pair: the first pair, in config order, that
takes writes by `writable_pairs_regex` (the first pair when none does). They are read wherever
they are: every member of every pair, the home's members last. So every worker and node sharing
the disks follows a move of the home without being told: when the regex leaves a pair out, new
records go to the next one at once and the old ones are still found; `stor evacuate` of the old
home then moves each of them (written on the home first, removed from the old pair after), and
its disks can be retired.

Why the home is read last: a record being moved is written on the home before it is removed
from its old pair. A reader that asks the old pair and finds it gone asks the home afterwards,
so it finds the copy written before the removal; asking the other way round, it could miss both.
(A reader whose config disagrees about the home, during a reload, may read the new home early:
the runbook reloads every server before evacuating.)

Absence is only as good as the home's answer: a reader must hear from some member of the home;
the other pairs are asked when they can be (a pair that is being retired may be dead).
"""

from __future__ import annotations

from typing import Protocol

from stor.backends.disk import Disk
from stor.backends.pairs import Pair, StoragePool


class RecordPlaces(Protocol):
    def home(self) -> tuple[Disk, ...]:
        """The members records are written on (and the per-record locks live on the first)."""
        ...

    def readers(self) -> tuple[Disk, ...]:
        """Every disk that may hold records, the home's members last."""
        ...


class OnePair:
    """Records on one pair's members only (tests, and tools given one pair)."""

    def __init__(self, members: tuple[Disk, ...]) -> None:
        self.members = members

    def home(self) -> tuple[Disk, ...]:
        return self.members

    def readers(self) -> tuple[Disk, ...]:
        return self.members


class PoolPlaces:
    """Records on the pairs of a pool, which a reload may add to or make writable."""

    def __init__(self, pool: StoragePool) -> None:
        self.pool = pool

    def home_pair(self) -> Pair:
        pairs = self.pool.pairs
        return next((pair for pair in pairs if pair.writable), pairs[0])

    def home(self) -> tuple[Disk, ...]:
        return self.home_pair().members

    def readers(self) -> tuple[Disk, ...]:
        home = self.home_pair()
        others = [disk for pair in self.pool.pairs if pair is not home for disk in pair.members]
        return (*others, *home.members)
