"""What the scrub does about takedowns: the records themselves, on both members of the records'
home pair (one away during a takedown lacks it; records left on another pair come home), and
copies of blobs taken down that a member held while it was away — removed with --repair, never
hashed, never copied anywhere."""

from __future__ import annotations

from stor.backends.pairs import Pair
from stor.backends.tombstones import Tombstone, TombstoneStore
from stor.digest import Sha
from stor.errors import StorageUnavailable
from stor.tools.scrubreport import Finding, ScrubReport


def scrub_takedowns(tombstones: TombstoneStore, report: ScrubReport, *, repair: bool) -> dict[Sha, Tombstone]:
    """Every takedown record (copied to the member that lacks it, with `repair`); the blobs
    they name."""
    try:
        gone = tombstones.all()
        report.tombstones, report.tombstones_stale = tombstones.reconcile(restore=repair)
    except (StorageUnavailable, OSError) as exc:
        report.note(Finding("", 0, "", "takedown records unreadable", f"failed: {exc}"), damage=True)
        return {}
    if repair:
        report.tombstones_restored = report.tombstones_stale
    elif report.tombstones_stale:
        report.damage_left += report.tombstones_stale
        stale = report.tombstones_stale
        report.note(Finding("", 0, "", f"{stale} takedown records missing on a member"), damage=False)
    return gone


def remove_taken_down(pair: Pair, sha: Sha, report: ScrubReport, *, repair: bool) -> None:
    """The copies of a taken-down blob on `pair`: reported, and removed with `repair`."""
    for disk in pair.members:
        try:
            if disk.stat(sha) is None:
                continue
            report.taken_down_copies += 1
            if not repair:
                report.note(Finding(sha, pair.index, disk.root, "taken down"), damage=True)
                continue
            disk.remove(sha)
            disk.quarantine.purge(sha)
        except StorageUnavailable as exc:
            report.note(Finding(sha, pair.index, disk.root, "taken down", f"failed: {exc}"), damage=True)
            continue
        report.taken_down_removed += 1
        report.note(Finding(sha, pair.index, disk.root, "taken down", "removed"), damage=False)
