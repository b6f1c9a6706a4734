"""Helpers shared by the tests: credentials, hashing, where files land on disk."""

from __future__ import annotations

import base64
import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path

from stor.backends.disk import Disk
from stor.backends.namerecord import record_relpath
from stor.backends.namestore import NAMES_DIR, TREE_DIR

USER, PASSWORD = "writer", "s3cret-pass"
AUTH = (USER, PASSWORD)
AUTH_HEADER = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def layout_path(root: Path, sha: str) -> Path:
    upper = sha.upper()
    return root / upper[0:2] / upper[2:4] / upper[4:6] / f"{upper}.dat"


def name_record(member: Path, name: str) -> Path:
    """Where the record of `name` lives on a member of the names pair."""
    return member / NAMES_DIR / TREE_DIR / record_relpath(name)


def temp_files(root: Path) -> list[Path]:
    """Upload temp files under a storage root (not the lock files, nor a health probe's file)."""
    tmp = root / ".stor-tmp"
    if not tmp.exists():
        return []
    return [p for p in tmp.rglob("*.tmp") if p.is_file()]


def blob_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*.dat") if ".stor-tmp" not in p.parts]


def debris(base: Path) -> list[Path]:
    """Blob files and upload temps anywhere under `base` (config files and logs aside)."""
    files = [p for p in base.rglob("*") if p.is_file() and ".stor-tmp" not in p.parts]
    return [p for p in files if p.suffix not in (".json", ".log")] + [
        p for p in base.rglob(".stor-tmp/**/*.tmp") if p.is_file()
    ]


def corrupt(path: Path, offset: int = 0) -> bytes:
    """Flip every bit of the byte at `offset` of `path` in place, as silent bitrot would: the same
    inode, size and mtime. Checks that the bytes on disk changed; returns them."""
    before = path.read_bytes()
    assert 0 <= offset < len(before), f"offset {offset} is outside {path} ({len(before)} bytes)"
    st = path.stat()
    fd = os.open(path, os.O_WRONLY)
    try:
        assert os.pwrite(fd, bytes([before[offset] ^ 0xFF]), offset) == 1
    finally:
        os.close(fd)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = path.read_bytes()
    assert len(after) == len(before) and after != before, f"{path} was not damaged"
    return after


def shorten(path: Path, size: int) -> None:
    """Truncate `path` in place to `size` bytes, checking that it really got shorter."""
    before = path.stat().st_size
    assert size < before, f"{path} has {before} bytes: truncating it to {size} would not damage it"
    os.truncate(path, size)
    assert path.stat().st_size == size, f"{path} was not truncated"


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll `predicate` until it holds or `timeout` passes; its last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def prepared_disks(base: Path, names: tuple[str, ...] = ("m1", "m2")) -> list[Disk]:
    """A `Disk` for each new directory `base/<name>`, its temp directory claimed."""
    made = []
    for name in names:
        (base / name).mkdir()
        disk = Disk(str(base / name), require_mount=False)
        disk.prepare()
        made.append(disk)
    return made
