"""The evacuation measurement, beside `workloads.refill`: a pair's blobs moved onto another pair
by `stor evacuate`, against `cp -a` of the same files onto the other pair's members + `sync`.

(Its own module: `workloads.py` is at the size where the style splits a module.)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

LAYOUT = re.compile(r"[0-9A-F]{2}")
EVACUATION_SIZES = [4096] * 10_000 + [4 * 1024 * 1024] * 20
"""The corpus `make bench` moves: 10,000 x 4 KiB and 20 x 4 MiB (124 MB)."""


@dataclass
class Evacuated:
    files: int
    mb: float
    cp_seconds: float
    evacuate_seconds: float
    report: dict[str, object]

    def summary(self) -> str:
        return (
            f"evacuate: {self.files} blobs, {self.mb:,.0f} MB: cp -a + sync {self.files / self.cp_seconds:,.0f} "
            f"blobs/s, stor evacuate {self.files / self.evacuate_seconds:,.0f} blobs/s "
            f"({self.cp_seconds / self.evacuate_seconds:.2f} of cp -a)"
        )

    def markdown(self) -> str:
        cp = self.files / self.cp_seconds
        moved = self.files / self.evacuate_seconds
        return f"""### Evacuating a pair

{self.files:,} blobs ({self.mb:,.0f} MB: 10,000 x 4 KiB and 20 x 4 MiB) stored on pair 1, moved onto pair 0 by
`stor evacuate --pair 1` (verified, both copies durable, in batches, then removed from pair 1), against `cp -a` of
pair 1's blob directories onto pair 0's members and one `sync` (`bench/evacuation.py`), from a warm page cache.

| how | seconds | blobs/s |
|---|---|---|
| `cp -a` + `sync` | {self.cp_seconds:.1f} | {cp:,.0f} |
| `stor evacuate --pair 1` | {self.evacuate_seconds:.1f} | {moved:,.0f} |

`stor evacuate` runs at **{moved / cp:.2f}x** the rate of `cp -a` (its time includes its start and the last batch's
2 s grace before the removal).
"""


def evacuation(base: Path, sizes: list[int]) -> Evacuated:
    """Blobs of `sizes` stored on pair 1 (`b1`, `b2` under `base`) moved to pair 0 (`a1`, `a2`):
    first `cp -a` of pair 1's blob directories onto pair 0's members and `sync` (both copies
    durable, as the evacuation makes them), then `stor evacuate --pair 1`, from a warm page
    cache each time."""
    a1, a2, b1, b2 = (base / name for name in ("a1", "a2", "b1", "b2"))
    for member in (a1, a2, b1, b2):
        member.mkdir(parents=True)
    mtime = time.time_ns() - 10**9
    for n, size in enumerate(sizes):
        data = n.to_bytes(8, "big") + os.urandom(size - 8)
        name = hashlib.sha256(data).hexdigest().upper()
        for member in (b1, b2):
            path = member / name[0:2] / name[2:4] / name[4:6] / f"{name}.dat"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            os.utime(path, ns=(mtime, mtime))
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
    subprocess.run(["sync"], check=True)
    _warm([b1, b2])
    started = time.perf_counter()
    for source, target in ((b1, a1), (b2, a2)):
        layout = sorted(str(p) for p in source.iterdir() if LAYOUT.fullmatch(p.name))
        (target / ".cp-evacuate").mkdir()
        subprocess.run(["cp", "-a", *layout, str(target / ".cp-evacuate")], check=True)
    subprocess.run(["sync", "-f", str(a1)], check=True)
    subprocess.run(["sync", "-f", str(a2)], check=True)
    cp_seconds = time.perf_counter() - started
    subprocess.run(["rm", "-rf", str(a1 / ".cp-evacuate"), str(a2 / ".cp-evacuate")], check=True)
    subprocess.run(["sync"], check=True)
    _warm([b1, b2])
    started = time.perf_counter()
    evacuate = subprocess.run(
        [sys.executable, "-m", "stor", "evacuate", "--pair", "1", "--config", str(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    evacuate_seconds = time.perf_counter() - started
    if evacuate.returncode != 0:
        raise RuntimeError(f"stor evacuate failed ({evacuate.returncode}): {evacuate.stderr[-2000:]}")
    return Evacuated(len(sizes), sum(sizes) / 1e6, cp_seconds, evacuate_seconds, json.loads(evacuate.stdout))


def _warm(members: list[Path]) -> None:
    for member in members:
        for path in member.rglob("*.dat"):
            path.read_bytes()
