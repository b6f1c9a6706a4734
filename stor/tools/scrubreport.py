"""What a `stor scrub` found: its findings and counts, the JSON the CLI prints and
`.stor-scrub/last.json` keeps (`/status` reads it)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

MAX_FINDINGS = 1000
"""Findings kept in a report; the counts go on beyond them."""


@dataclass
class Finding:
    sha: str
    pair: int
    disk: str
    problem: str  # missing, corrupt, truncated, foreign, stray_temp, unreadable, lost, taken down
    action: str = "none"  # quarantined+repaired, repaired, removed, none, failed: …


@dataclass
class ScrubReport:
    started: float = field(default_factory=time.time)
    finished: float | None = None
    pairs: list[int] = field(default_factory=list)
    blobs: int = 0
    copies: int = 0
    bytes: int = 0
    missing: int = 0
    corrupt: int = 0
    truncated: int = 0
    unreadable: int = 0
    foreign: int = 0
    stray_temps: int = 0
    vanished: int = 0
    names: int = 0
    names_stale: int = 0  # name records some member of the home pair lacks (or holds older)
    names_restored: int = 0
    taken_down_copies: int = 0  # copies of blobs an admin took down (a member away during the takedown)
    taken_down_removed: int = 0  # of those, removed (with --repair)
    tombstones: int = 0
    tombstones_stale: int = 0  # takedown records some member of the home pair lacks
    tombstones_restored: int = 0
    checksums_missing: int = 0  # good copies without a fast checksum (Stor's, imported, no xattrs)
    checksums_wrong: int = 0  # good copies whose fast checksum disagrees with them (a damaged attribute)
    checksums_written: int = 0  # of those, given one (with --repair)
    repaired: int = 0
    lost: int = 0
    damage_left: int = 0
    interrupted: bool = False
    resumed_after: dict[str, str] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)

    def note(self, finding: Finding, *, damage: bool) -> None:
        """Record a finding; `damage` ones that stay unrepaired make the exit code 1."""
        if damage:
            self.damage_left += 1
        if len(self.findings) < MAX_FINDINGS:
            self.findings.append(finding)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    def summary(self) -> dict[str, object]:
        """The counts, without the findings (what `.stor-scrub/last.json` keeps)."""
        summary = self.as_dict()
        summary.pop("findings")
        return summary
