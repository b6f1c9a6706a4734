"""The refill measurement: a replaced member of a pair refilled from its partner by `stor scrub
--repair`, against `cp -a` of the partner's blob directories + `sync`, the same files, rounds
alternating, from a warm page cache of the partner.

A replaced disk arrives as a new filesystem: as root, each run (cp's and stor's alike) gets a
fresh ext4 image, mkfs'd and mounted over the blank member. (Until stop 20 the bench wiped the
member with `rm -rf` instead, right after `cp -a` had run: on ext4 freshly emptied of ~270,000
files, every create then waited ~400 us against ~25 us on a new one, which only stor's runs paid.)
Without root, the member's blob directories are removed and synced before each run.
"""

from __future__ import annotations

import contextlib
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.corpus import can_mount_images, store_copies
from bench.settings import IMAGE_BYTES, ROUNDS

LAYOUT = re.compile(r"[0-9A-F]{2}")
SMALL = 30_000
"""The small corpus: 30,000 x 4 KiB (the issue's case a)."""


@dataclass
class Refill:
    label: str
    files: int
    mb: float
    cp_seconds: list[float]
    scrub_seconds: list[float]
    fresh: bool
    """Each run on a new filesystem (else onto the wiped member)."""

    def ratios(self) -> list[float]:
        return [cp / scrub for cp, scrub in zip(self.cp_seconds, self.scrub_seconds, strict=True)]

    def ratio(self) -> float:
        """Of the medians: stor's rate over cp's."""
        return statistics.median(self.cp_seconds) / statistics.median(self.scrub_seconds)

    def summary(self) -> str:
        each = ", ".join(f"{r:.2f}" for r in self.ratios())
        return f"refill, {self.label}: stor scrub --repair at {self.ratio():.2f}x cp -a + sync ({each})"

    def row(self) -> str:
        cp, scrub = statistics.median(self.cp_seconds), statistics.median(self.scrub_seconds)
        each = ", ".join(f"{r:.2f}" for r in self.ratios())
        return (
            f"| {self.label} | {self.files:,} | {self.mb:,.0f} | {cp:.1f} | {scrub:.1f} | "
            f"{self.files / scrub:,.0f} | **{self.ratio():.2f}x** ({each}) |"
        )


def markdown(refills: list[Refill]) -> str:
    if not refills:
        return ""
    how = (
        "each run onto a new filesystem (a fresh ext4 image mounted over the blank member)"
        if all(r.fresh for r in refills)
        else "each run onto the member emptied with `rm -rf` and `sync`"
    )
    rows = "\n".join(refill.row() for refill in refills)
    return f"""## Refilling a replaced disk

The first member of a pair replaced by a blank disk and refilled from its partner, {how}, from a
warm page cache of the partner; {ROUNDS} rounds, `cp -a` and stor alternating (`bench/refill.py`).

| corpus | blobs | MB | `cp -a` + `sync` s (median) | `stor scrub --repair` s | blobs/s | stor / cp (rounds) |
|---|---|---|---|---|---|---|
{rows}

`stor scrub --repair` also hashes every copy it reads (the partner's) with SHA-256, then writes the missing
copies in batches (`backends/refill.py`): each to a temp file with its mtime and fast checksum, one `syncfs`,
no-replace links into the new `AB/CD/EF` directories, one more `syncfs`; `cp -a` then one `sync` orders nothing
and makes nothing durable until the end. Its time includes the process's start (~0.5 s).
"""


def refill(label: str, members: list[Path], config: Path, warm: Callable[[], None], work: Path) -> Refill:
    """`members[0]` refilled from `members[1]` under `config`, `ROUNDS` times each way."""
    member, partner = members
    dirs = sorted(p for p in partner.iterdir() if LAYOUT.fullmatch(p.name))
    files = [f for d in dirs for f in d.rglob("*.dat")]
    mb = sum(f.stat().st_size for f in files) / 1e6
    cp_seconds: list[float] = []
    scrub_seconds: list[float] = []
    fresh: list[bool] = []
    for _ in range(ROUNDS):
        with blank(member, work) as made:
            fresh.append(made)
            warm()
            started = time.perf_counter()
            subprocess.run(["cp", "-a", *map(str, dirs), str(member)], check=True)
            subprocess.run(["sync", "-f", str(member)], check=True)
            cp_seconds.append(time.perf_counter() - started)
        with blank(member, work):
            warm()
            scrub_seconds.append(timed_stor("scrub", "--config", str(config), "--pair", "0", "--repair", "--json")[0])
    return Refill(label, len(files), mb, cp_seconds, scrub_seconds, all(fresh))


@contextlib.contextmanager
def blank(member: Path, work: Path, *, image: str = "blank.img") -> Iterator[bool]:
    """`member` blank for one run: as root a new ext4 filesystem (`work/image`) mounted over it
    and unmounted after (True); else its blob directories removed (False)."""
    if not can_mount_images():
        subprocess.run(["rm", "-rf", *(str(p) for p in member.iterdir() if LAYOUT.fullmatch(p.name))], check=True)
        subprocess.run(["sync", "-f", str(member)], check=True)
        yield False
        return
    path = work / image
    path.unlink(missing_ok=True)
    with path.open("wb") as handle:
        handle.truncate(IMAGE_BYTES)
    # an inode per 4 KiB, not per 16 KiB: the members hold every 4 KiB blob the POST rows stored, each in a
    # directory of its own, more than the default's ~390,000 inodes
    subprocess.run(["mkfs.ext4", "-q", "-F", "-i", "4096", str(path)], check=True)
    subprocess.run(["mount", "-o", "loop", str(path), str(member)], check=True)
    try:
        member.chmod(0o755)
        subprocess.run(["sync"], check=True)
        yield True
    finally:
        subprocess.run(["umount", str(member)], check=True)
        path.unlink()


def timed_stor(*args: str) -> tuple[float, str]:
    """`stor *args` run to its end: its seconds and its stdout (`RuntimeError` when it fails)."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "stor", *args], capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"stor {args[0]} failed ({done.returncode}): {done.stderr[-2000:]}")
    return seconds, done.stdout


def small_pair(base: Path, count: int = SMALL) -> list[Path]:
    """A pair under `base` whose members hold `count` random 4 KiB blobs, as stor writes them."""
    members = [base / "r1", base / "r2"]
    for member in members:
        member.mkdir(parents=True)
    for _ in range(count):
        store_copies(members, os.urandom(4096))
    return members


def warm_files(members: list[Path]) -> None:
    """Every blob file of `members` read once (into the page cache)."""
    for member in members:
        for path in member.rglob("*.dat"):
            path.read_bytes()
