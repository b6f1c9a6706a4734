"""The read algorithm's vocabulary (see `lookup.Lookup.find`): what an I/O mode must answer, what
a find returns, and how the event loop's mode says it would have to wait."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, NamedTuple, Protocol, TypeVar

from stor.backends.disk import Disk
from stor.digest import Sha

T = TypeVar("T")


class WouldBlock(Exception):
    """The event loop's mode cannot go on without waiting on a disk: a thread must look."""


class Found(NamedTuple, Generic[T]):
    value: T
    disk: Disk
    how: str
    """kept (a copy kept open), local (where the location hint said) or miss (disks probed)."""
    tried: int
    """Disks probed after the hint, for a miss."""


@dataclass
class Seen:
    """What the disks asked so far answered, short of a copy."""

    missed: set[str] = field(default_factory=set)
    unreachable: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)


class Mode(Protocol[T]):
    """How one read may touch the disks. `find` calls these in this order."""

    def refuse(self, sha: Sha) -> None:
        """`BlobGone` when an admin took the blob down (before any disk is asked)."""

    def kept(self, sha: Sha) -> Found[T] | None:
        """A copy already open, or None."""

    def hint(self, sha: Sha) -> str | None:
        """The disk root the location caches name, or None; `BlobNotFound` when a cache knows
        the blob is absent."""

    def may_ask(self, disk: Disk) -> bool:
        """Whether `disk` may be asked at all (else it counts as unreachable)."""

    def ask(self, disk: Disk, sha: Sha) -> T | None:
        """The copy on `disk`, or None when it has none. Raises `CorruptCopy`,
        `StorageUnavailable` or `WouldBlock` (both count as unreachable)."""

    def stale(self, sha: Sha) -> None:
        """The hinted disk had no copy."""

    def located(self, sha: Sha, found: Found[T], missed: set[str]) -> None:
        """A copy was found (`missed`: the disks that said they have none): remember it, check
        its partners."""

    def probed(self, tried: int, elapsed: float) -> None:
        """The disks were probed (the hint was not enough), found or not."""

    def unreachable(self, sha: Sha, reasons: list[str]) -> Exception:
        """What to raise when no copy was found and some disk could not answer."""

    def absent(self, sha: Sha) -> None:
        """Every disk answered "no copy": return if the blob is absent (404), else raise."""
