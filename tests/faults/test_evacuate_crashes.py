"""Power cuts during `stor evacuate` of the pair that holds the name and takedown records: killed
in the middle of moving the records (at a `rename` of a record onto the new home) or of the
first batch of blobs (at its first or third `syncfs`: copies staged, or some linked), then the
journal committed and the images mounted as after a power cut. Nothing may be lost: every blob
whole on some member, every name and takedown found; whatever name a blob has holds its bytes;
and the next `stor evacuate` finishes the move."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from stor.backends.disk import Disk
from stor.backends.namerecord import NameRecord
from stor.backends.namestore import NameStore
from stor.backends.pairs import Pair, StoragePool
from stor.backends.recordplaces import PoolPlaces
from stor.backends.tombstones import Tombstone, TombstoneStore
from stor.digest import Sha
from tests.conftest import Storage
from tests.faults.conftest import Mounts, run
from tests.faults.powercut import blob_files, power_cut
from tests.helpers import layout_path, sha256

Build = Callable[[list[list[Path]]], Storage]
NAMES = [f"reports/r{n:02d}.txt" for n in range(40)]


def evacuate(config: Path, wrapper: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "stor", "evacuate", "--config", str(config), "--pair", "0"]
    return subprocess.run([*(wrapper or []), *command], capture_output=True, text=True, timeout=120)


def records_on(members: list[Path], home: list[Path] | None = None) -> tuple[NameStore, TombstoneStore, list[Disk]]:
    """The records as a server reads them: `members` (a pair) alone, or with the pair `home`
    taking the writes (the home read last)."""
    disks = [Disk(str(member), require_mount=False) for member in [*members, *(home or [])]]
    for disk in disks:
        disk.prepare()
    pairs = [Pair(0, tuple(disks[:2]), not home)]
    if home:
        pairs.append(Pair(1, tuple(disks[2:]), True))
    places = PoolPlaces(StoragePool(pairs, placement_threshold=0))
    return NameStore(places), TombstoneStore(places), disks


def record_count(member: Path) -> int:
    return sum(1 for p in (member / ".stor-names" / ".tree").rglob("r*") if p.is_file())


@pytest.mark.usefixtures("need_strace")
@pytest.mark.parametrize("cut", ["rename=41", "syncfs=1", "syncfs=3"])
def test_a_power_cut_during_an_evacuation_loses_nothing(cut: str, mounts: Mounts, build: Build, tmp_path: Path) -> None:
    old = [mounts.ext4("o1"), mounts.ext4("o2")]
    new = [mounts.ext4("n1"), mounts.ext4("n2")]
    storage = build([old, new])
    blobs = [os.urandom(4096 if n % 10 else 300_000) for n in range(60)]
    for data in blobs:
        for member in old:
            path = layout_path(member, sha256(data))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    names, tombstones, disks = records_on(old)
    for n, name in enumerate(NAMES):
        names.put(NameRecord(name, Sha(sha256(blobs[n])), len(blobs[n]), 1000.0 + n), create_only=False)
    gone = Sha(sha256(b"taken down"))
    tombstones.put(Tombstone(gone, time.time(), "admin", "legal request"))
    for disk in disks:
        disk.close()
    run("sync")
    config = storage.write_config(check_mountpoints=False, writable_pairs_regex=r"/n[12]$")

    call, when = cut.split("=")
    killed = evacuate(
        config, ["strace", "-f", "-qq", "-o", "/dev/null", "-e", f"inject={call}:signal=SIGKILL:when={when}"]
    )
    assert killed.returncode != 0 and not killed.stdout  # killed before it could report
    if call == "rename":  # the cut came in the middle of the records (live view)
        assert 0 < record_count(old[0]) < len(NAMES) and record_count(new[0]) > 0
    else:  # after the records, in the blobs
        assert record_count(old[0]) == 0 and record_count(new[0]) == len(NAMES)

    after = power_cut(mounts, old + new, cut.replace("=", ""))
    for member in after:  # whatever name survived holds its blob, whole
        for path in blob_files(member):
            assert hashlib.sha256(path.read_bytes()).hexdigest().upper() == path.stem, f"{path} is not its blob"
    for data in blobs:  # and no blob is lost
        assert any(layout_path(m, sha256(data)).exists() for m in after), "a blob was lost"
    readers, taken, disks = records_on(after[:2], home=after[2:])  # as the servers read them
    for n, name in enumerate(NAMES):
        found = readers.get(name)
        assert found is not None and found.sha == sha256(blobs[n]), f"{name} lost"
    assert taken.get(gone) is not None, "the takedown was lost"
    for disk in disks:
        disk.close()

    # the evacuation carries on from the power cut: a fresh config on the copies
    resumed = tmp_path / "after.json"
    raw = json.loads(config.read_text())
    pairs = [[str(m) for m in after[:2]], [str(m) for m in after[2:]]]
    resumed.write_text(json.dumps({**raw, "storage_pairs": pairs, "writable_pairs_regex": "after-.*-n[12]$"}))
    done = evacuate(resumed)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["left"] == 0 and report["records_left"] == 0 and report["failed"] == []
    for data in blobs:
        for member in after[2:]:
            assert layout_path(member, sha256(data)).read_bytes() == data
    assert all(blob_files(m) == [] for m in after[:2])
    home, taken, disks = records_on(after[2:])  # the new pair alone
    for n, name in enumerate(NAMES):
        assert home.get(name) == NameRecord(name, Sha(sha256(blobs[n])), len(blobs[n]), 1000.0 + n)
    assert taken.get(gone) is not None
    for disk in disks:
        disk.close()
