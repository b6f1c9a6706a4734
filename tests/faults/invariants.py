"""The invariant every reliability test ends with, checked on the files themselves.

- Every file under a storage root is a valid blob (its content hashes to its name, at its
  layout path), stor's own state (quarantine, names, S3 queue, scrub), or a temp of a process
  that is gone, and a sweep (what a restart does) leaves no temp at all.
- Every blob acknowledged with 201 is byte-exact on every member of one pair, except members a
  test broke on purpose.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from stor.backends.disk import Disk
from stor.backends.owners import LOCK_NAME

LAYOUT = re.compile(r"^([0-9A-F]{2})/([0-9A-F]{2})/([0-9A-F]{2})/([0-9A-F]{64})\.dat$")
STATE_DIRS = {".stor-quarantine", ".stor-names", ".stor-s3-queue", ".stor-scrub", ".stor-tombstones", "lost+found"}


@dataclass
class Ledger:
    """What a test promised the checker: its storage, the blobs acknowledged, the members broken."""

    pairs: list[list[Path]] = field(default_factory=list)
    acked: dict[str, bytes] = field(default_factory=dict)
    broken: set[Path] = field(default_factory=set)
    checked: bool = False


def check_invariants(ledger: Ledger) -> list[str]:
    problems: list[str] = []
    roots = [root for pair in ledger.pairs for root in pair]
    for root in roots:
        if root in ledger.broken and not _readable(root):
            continue
        problems += _sweep(root)
        problems += _walk(root)
    for sha, data in ledger.acked.items():
        problems += _acknowledged(ledger, sha, data)
    return problems


def _readable(root: Path) -> bool:
    try:
        os.listdir(root)
    except OSError:
        return False
    return True


def _sweep(root: Path) -> list[str]:
    disk = Disk(str(root), require_mount=False)
    if not os.path.isdir(disk.tmp_root):
        return []
    try:
        disk.sweep_temps()
    except OSError as exc:
        return [f"{root}: sweeping temps failed: {exc}"]
    return []


def _walk(root: Path) -> list[str]:
    problems = []
    for directory, _, files in os.walk(root):
        for name in files:
            path = Path(directory) / name
            rel = path.relative_to(root).as_posix()
            top = rel.split("/", 1)[0]
            if top in STATE_DIRS:
                continue
            if top == ".stor-tmp":
                if name != LOCK_NAME:
                    problems.append(f"{path}: a temp left after a sweep")
                continue
            problems += _valid_blob(path, rel)
    return problems


def _valid_blob(path: Path, rel: str) -> list[str]:
    match = LAYOUT.match(rel)
    if match is None:
        return [f"{path}: a file that is not a blob in the layout"]
    a, b, c, sha = match.groups()
    if sha[:6] != a + b + c:
        return [f"{path}: a blob under the wrong directories"]
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    if actual != sha.lower():
        return [f"{path}: content hashes to {actual}"]
    return []


def _acknowledged(ledger: Ledger, sha: str, data: bytes) -> list[str]:
    upper = sha.upper()
    rel = Path(upper[0:2], upper[2:4], upper[4:6], f"{upper}.dat")
    seen = []
    for pair in ledger.pairs:
        wanted = [member for member in pair if member not in ledger.broken]
        present = [member for member in wanted if (member / rel).is_file()]
        if not present:
            continue
        exact = [member for member in present if (member / rel).read_bytes() == data]
        if len(exact) == len(wanted):
            return []
        seen.append(f"pair {[str(m) for m in pair]}: exact on {[str(m) for m in exact]}")
    return [f"acknowledged blob {sha} is not on every member of a pair ({'; '.join(seen) or 'no copy'})"]
