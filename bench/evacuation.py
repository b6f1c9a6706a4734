"""The evacuation measurement, beside `refill`: a pair's blobs moved onto another pair by `stor
evacuate`, against `cp -a` of the same files onto the other pair's members + `sync`, rounds
alternating. As root the target members are fresh ext4 filesystems for every run, cp's and
stor's alike (until stop 20 stor wrote onto members from which `rm -rf` had just removed cp's
20,000 files, which cost every create there several times over).

(Its own module: `workloads.py` is at the size where the style splits a module.)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from bench.refill import blank, timed_stor
from bench.settings import ROUNDS

LAYOUT = re.compile(r"[0-9A-F]{2}")
EVACUATION_SIZES = [4096] * 10_000 + [4 * 1024 * 1024] * 20
"""The corpus `make bench` moves: 10,000 x 4 KiB and 20 x 4 MiB (124 MB)."""


@dataclass
class Evacuated:
    files: int
    mb: float
    cp_seconds: list[float]
    mv_seconds: list[float]
    """`cp -a` + `sync`, then `rm -rf` of the sources + `sync`: a move by hand."""
    evacuate_seconds: list[float]
    report: dict[str, object]

    def ratios(self, ceiling: list[float]) -> list[float]:
        return [theirs / ours for theirs, ours in zip(ceiling, self.evacuate_seconds, strict=True)]

    def ratio(self, ceiling: list[float]) -> float:
        return statistics.median(ceiling) / statistics.median(self.evacuate_seconds)

    def _ratios(self, ceiling: list[float]) -> str:
        each = ", ".join(f"{r:.2f}" for r in self.ratios(ceiling))
        return f"{self.ratio(ceiling):.2f}x ({each})"

    def summary(self) -> str:
        each = ", ".join(f"{r:.2f}" for r in self.ratios(self.mv_seconds))
        return (
            f"evacuate: {self.files} blobs, {self.mb:,.0f} MB: {self.ratio(self.mv_seconds):.2f}x "
            f"cp -a + sync + rm -rf + sync ({each}), {self.ratio(self.cp_seconds):.2f}x cp -a + sync"
        )

    def markdown(self) -> str:
        cp, mv, ours = (statistics.median(t) for t in (self.cp_seconds, self.mv_seconds, self.evacuate_seconds))
        to_cp, to_mv = (self._ratios(ceiling) for ceiling in (self.cp_seconds, self.mv_seconds))
        targets = "fresh ext4 filesystems each run" if self.report.get("fresh") else "emptied each run"
        return f"""### Evacuating a pair

{self.files:,} blobs ({self.mb:,.0f} MB: 10,000 x 4 KiB and 20 x 4 MiB) stored on pair 1, moved onto pair 0 by
`stor evacuate --pair 1` (verified, both copies durable, in batches, then removed from pair 1), against `cp -a` of
pair 1's blob directories onto pair 0's members and one `sync`, then the sources removed (`bench/evacuation.py`),
from a warm page cache, {len(self.cp_seconds)} rounds, the targets {targets}.

| how | seconds (median) | blobs/s | stor / it (rounds) |
|---|---|---|---|
| `cp -a` + `sync` | {cp:.1f} | {self.files / cp:,.0f} | {to_cp} |
| … then `rm -rf` of the sources + `sync` (a move by hand) | {mv:.1f} | {self.files / mv:,.0f} | **{to_mv}** |
| `stor evacuate --pair 1` | {ours:.1f} | {self.files / ours:,.0f} | |

Its time includes its start and the last batch's 2 s grace before the removal.
"""


def evacuation(base: Path, sizes: list[int]) -> Evacuated:
    """Blobs of `sizes` stored on pair 1 (`b1`, `b2` under `base`) moved to pair 0 (`a1`, `a2`),
    `ROUNDS` times: `cp -a` of pair 1's blob directories onto pair 0's members and `sync` (both
    copies durable, as the evacuation makes them), then `stor evacuate --pair 1`, each onto
    blank targets and from a warm page cache; pair 1 is filled again for every round."""
    a1, a2, b1, b2 = (base / name for name in ("a1", "a2", "b1", "b2"))
    for member in (a1, a2, b1, b2):
        member.mkdir(parents=True)
    config = base / "evacuate.json"
    config.write_text(
        json.dumps(
            {
                "storage_pairs": [[str(a1), str(a2)], [str(b1), str(b2)]],
                "check_mountpoints": False,
                "writable_pairs_regex": "/a[12]$",
            }
        )
    )
    cp_seconds: list[float] = []
    mv_seconds: list[float] = []
    evacuate_seconds: list[float] = []
    report: dict[str, object] = {}
    for _ in range(ROUNDS):
        _fill([b1, b2], sizes)
        with blank(a1, base) as fresh, blank(a2, base, image="evacuate-a2.img"):
            _warm([b1, b2])
            started = time.perf_counter()
            for source, target in ((b1, a1), (b2, a2)):
                layout = sorted(str(p) for p in source.iterdir() if LAYOUT.fullmatch(p.name))
                subprocess.run(["cp", "-a", *layout, str(target)], check=True)
            subprocess.run(["sync", "-f", str(a1)], check=True)
            subprocess.run(["sync", "-f", str(a2)], check=True)
            cp_seconds.append(time.perf_counter() - started)
            for source in (b1, b2):  # then the sources removed: a move by hand
                layout = sorted(str(p) for p in source.iterdir() if LAYOUT.fullmatch(p.name))
                subprocess.run(["rm", "-rf", *layout], check=True)
                subprocess.run(["sync", "-f", str(source)], check=True)
            mv_seconds.append(time.perf_counter() - started)
        _fill([b1, b2], sizes)
        with blank(a1, base), blank(a2, base, image="evacuate-a2.img"):
            _warm([b1, b2])
            seconds, out = timed_stor("evacuate", "--pair", "1", "--config", str(config))
            evacuate_seconds.append(seconds)
            report = {**json.loads(out), "fresh": fresh}
    return Evacuated(len(sizes), sum(sizes) / 1e6, cp_seconds, mv_seconds, evacuate_seconds, report)


def _fill(members: list[Path], sizes: list[int]) -> None:
    """`members` holding blobs of `sizes`, nothing else in their blob directories."""
    mtime = time.time_ns() - 10**9
    for member in members:
        for path in member.iterdir():
            if LAYOUT.fullmatch(path.name):
                subprocess.run(["rm", "-rf", str(path)], check=True)
    for n, size in enumerate(sizes):
        data = n.to_bytes(8, "big") + os.urandom(size - 8)
        name = hashlib.sha256(data).hexdigest().upper()
        for member in members:
            path = member / name[0:2] / name[2:4] / name[4:6] / f"{name}.dat"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            os.utime(path, ns=(mtime, mtime))
    subprocess.run(["sync"], check=True)


def _warm(members: list[Path]) -> None:
    for member in members:
        for path in member.rglob("*.dat"):
            path.read_bytes()
