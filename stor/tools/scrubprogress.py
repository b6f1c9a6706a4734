"""A running scrub's progress, and its estimate of the time left: for the pair being scrubbed,
the share of the sha space walked (shas are uniform, so it is the share of blobs), copies and
bytes checked, copies found missing and refilled, and — while it repairs — when the pair will
hold both copies of everything again. Written beside the checkpoint (`scrubstate`), where
`/status` and `/metrics` of every worker read it, and given to the CLI for stderr.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field

from stor.tools.scrubreport import ScrubReport

_LEAF_SPACE = 16**6
"""Leaves are `AB/CD/EF`: six hex digits of the sha."""


def leaf_fraction(leaf: str) -> float:
    """The share of the sha space up to and including `leaf` ("" before the first)."""
    digits = leaf.replace("/", "")
    if not digits:
        return 0.0
    return (int(digits, 16) + 1) / _LEAF_SPACE


@dataclass
class PairProgress:
    """One pair's scrub, from where it started (a resumed scrub starts part way)."""

    pair: int
    repairing: bool
    after: str
    report: ScrubReport
    started: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.start_fraction = leaf_fraction(self.after)
        self.base = (self.report.copies, self.report.bytes, self.report.missing, self.report.repaired)

    def snapshot(self, leaf: str) -> dict[str, object]:
        """Where the scrub stands once every leaf up to `leaf` is done."""
        now = time.time()
        fraction = leaf_fraction(leaf)
        walked = fraction - self.start_fraction
        elapsed = now - self.started
        eta = elapsed * (1.0 - fraction) / walked if walked > 0 else None
        copies, size, missing, repaired = self.base
        missing_now = self.report.missing - missing
        return {
            "pair": self.pair,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": self.started,
            "updated": now,
            "repairing": self.repairing,
            "fraction": round(fraction, 6),
            "copies": self.report.copies - copies,
            "bytes": self.report.bytes - size,
            "bytes_per_second": round((self.report.bytes - size) / elapsed) if elapsed > 0 else 0,
            "missing": missing_now,
            "missing_expected": round(missing_now / walked * (1.0 - self.start_fraction)) if walked > 0 else None,
            "repaired": self.report.repaired - repaired,
            "eta_seconds": round(eta, 1) if eta is not None else None,
            # a refill ends single-copy exposure when the walk ends; a check alone ends none
            "full_redundancy_eta_seconds": round(eta, 1) if eta is not None and self.repairing else None,
        }


def describe(progress: dict[str, object]) -> str:
    """One line for stderr."""
    eta = progress.get("eta_seconds")
    left = f", about {_duration(float(eta))} left" if isinstance(eta, float | int) else ""
    refilled = f", {progress['repaired']:,} copies repaired" if progress.get("repairing") else ""
    return (
        f"stor: scrub of pair {progress['pair']}: {float(progress['fraction']):.1%} of the sha space"  # type: ignore[arg-type]
        f", {progress['copies']:,} copies ({int(progress['bytes']) / 1e6:,.0f} MB"  # type: ignore[call-overload]
        f", {int(progress['bytes_per_second']) / 1e6:,.0f} MB/s), {progress['missing']:,} missing"  # type: ignore[call-overload]
        f"{refilled}{left}"
    )


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"
