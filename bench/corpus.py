"""The corpus: a pair of members (plain directories on the machine's disk, or fresh ext4
images) holding random blobs in Stor's layout, each copy with the fast checksum stor gives the
copies it stores, and the page cache warmed before each run."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from bench.settings import CORPUS, IMAGE_BYTES
from stor.checksum import ATTR, fast_sum


def layout(root: Path, sha: str) -> Path:
    up = sha.upper()
    return root / up[0:2] / up[2:4] / up[4:6] / f"{up}.dat"


def can_mount_images() -> bool:
    return os.geteuid() == 0 and shutil.which("mkfs.ext4") is not None


class Members:
    """The pair stor stores on: two plain directories under the work directory (on the
    machine's own disk), or with `images` two fresh ext4 filesystems (loop-mounted sparse
    images, as two data disks would be)."""

    def __init__(self, work: Path, *, images: bool) -> None:
        self.paths = [work / "disk1", work / "disk2"]
        self.mounted: list[Path] = []
        for path in self.paths:
            path.mkdir(parents=True)
        if images:
            for path in self.paths:
                image = work / f"{path.name}.img"
                with image.open("wb") as f:
                    f.truncate(IMAGE_BYTES)
                subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
                subprocess.run(["mount", "-o", "loop", str(image), str(path)], check=True)
                self.mounted.append(path)
                path.chmod(0o755)
        self.kind = (
            f"two fresh ext4 filesystems, one per member (loop-mounted {IMAGE_BYTES >> 30} GiB sparse images)"
            if self.mounted
            else "two plain directories on the machine's own disk"
        )

    def close(self) -> None:
        for path in self.mounted:
            subprocess.run(["umount", "-l", str(path)], check=False)


def build_corpus(members: list[Path]) -> dict[str, list[str]]:
    shas: dict[str, list[str]] = {}
    for name, (size, count) in CORPUS.items():
        shas[name] = []
        for _ in range(count):
            shas[name].append(store_copies(members, os.urandom(size)))
    return shas


def store_copies(members: list[Path], data: bytes) -> str:
    """`data` in Stor's layout on every member, with the fast checksum stor gives it; its sha."""
    sha = hashlib.sha256(data).hexdigest()
    for disk in members:
        path = layout(disk, sha)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.setxattr(path, ATTR, fast_sum(data))
    return sha


def warm(members: list[Path], shas: list[str]) -> None:
    """Read every copy, so the run starts from the page cache (this VM drops what has gone
    untouched for about a minute)."""
    for sha in shas:
        for disk in members:
            layout(disk, sha).read_bytes()


def strip_sums(members: list[Path], shas: list[str]) -> None:
    """Remove every copy's fast checksum, as Stor's disks arrive (stor then verifies each copy
    with SHA-256 on its first read and records the checksum)."""
    for sha in shas:
        for disk in members:
            with contextlib.suppress(OSError):  # already without one
                os.removexattr(layout(disk, sha), ATTR)
