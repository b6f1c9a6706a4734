"""What a power cut leaves of ext4 members that a process was writing: the journal committed,
the page cache not written back, the images copied and mounted."""

from __future__ import annotations

import os
from pathlib import Path

from tests.faults.conftest import Mounts, run


def blob_files(member: Path) -> list[Path]:
    return [p for p in member.rglob("*.dat") if ".stor" not in str(p.relative_to(member))]


def power_cut(mounts: Mounts, members: list[Path], tag: str) -> list[Path]:
    """The journal committed without writing back the page cache (an `fsync` of a file of its
    own on each member), then the images copied and mounted: what a power cut leaves."""
    for member in members:
        fd = os.open(member / f"commit-{tag}", os.O_CREAT | os.O_WRONLY, 0o600)
        try:
            os.write(fd, b"x")
            os.fsync(fd)
        finally:
            os.close(fd)
    snapshots = []
    for member in members:
        image = mounts.base / f"{tag}-{member.name}.img"
        run("cp", "--sparse=always", str(mounts.image_of(member)), str(image))
        snapshots.append(image)
        (member / f"commit-{tag}").unlink()  # the live members stay as the refill left them
    after = []
    for image in snapshots:
        mountpoint = mounts.base / f"after-{image.stem}"
        mountpoint.mkdir()
        run("mount", "-o", "loop", str(image), str(mountpoint))
        mounts.mounted.append(mountpoint)
        (mountpoint / f"commit-{tag}").unlink()
        after.append(mountpoint)
    return after
