"""Disk faults on real filesystems: full (bytes, inodes), read-only, unmounted, renamed away."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

from stor.backends.disk import Disk
from stor.service.health import RECHECK_AFTER
from tests.conftest import Storage
from tests.faults.conftest import Mounts, Servers, fault_config, post, reads_back, run, status, writes_land_on
from tests.faults.invariants import Ledger
from tests.helpers import AUTH, layout_path, sha256, wait_for

MiB = 1024 * 1024


def chunks(data: bytes, size: int = 256 * 1024) -> Iterator[bytes]:
    """A body without Content-Length (chunked), so placement cannot see its size coming."""
    for start in range(0, len(data), size):
        yield data[start : start + size]


def test_disk_full_mid_upload_gives_507_and_leaves_nothing(
    mounts: Mounts, servers: Servers, build: Callable[[list[list[Path]]], Storage], ledger: Ledger
) -> None:
    small, roomy = mounts.tmpfs("a1", size="8m"), mounts.tmpfs("a2", size="64m")
    storage = build([[small, roomy]])
    server = servers.start(fault_config(storage))
    before = post(server, os.urandom(4096), ledger)
    assert before.status_code == 201

    big = os.urandom(12 * MiB)
    response = httpx.post(f"{server.url}/{sha256(big)}", content=chunks(big), auth=AUTH, timeout=20)
    assert response.status_code == 507, response.text
    assert storage.copies(sha256(big)) == [] and storage.temps() == []

    after = post(server, os.urandom(4096), ledger)
    assert after.status_code == 201


def test_inodes_exhausted_gives_507_then_recovers(
    mounts: Mounts, servers: Servers, build: Callable[[list[list[Path]]], Storage], ledger: Ledger
) -> None:
    first, second = mounts.tmpfs("a1", size="64m", inodes=64), mounts.tmpfs("a2")
    storage = build([[first, second]])
    server = servers.start(fault_config(storage))
    filler = first / "filler"
    filler.mkdir()
    made = 0
    try:
        while True:
            (filler / str(made)).touch()
            made += 1
    except OSError:
        pass
    data = os.urandom(4096)
    response = post(server, data, ledger)
    assert response.status_code == 507, response.text
    assert storage.copies(sha256(data)) == [] and storage.temps() == []

    for name in os.listdir(filler):
        (filler / name).unlink()
    filler.rmdir()
    assert post(server, data, ledger).status_code == 201


def test_placement_sends_large_uploads_to_the_pair_with_room(
    mounts: Mounts, servers: Servers, build: Callable[[list[list[Path]]], Storage], ledger: Ledger
) -> None:
    tight = [mounts.tmpfs("a1", size="8m"), mounts.tmpfs("a2", size="64m")]
    roomy = [mounts.tmpfs("b1", size="64m"), mounts.tmpfs("b2", size="64m")]
    storage = build([tight, roomy])
    server = servers.start(fault_config(storage, placement_threshold=1 << 30))
    for _ in range(5):
        data = os.urandom(12 * MiB)
        assert post(server, data, ledger).status_code == 201
        assert {p.parent.parent.parent.parent for p in storage.copies(sha256(data))} == set(roomy)


def test_read_only_member_stops_writes_not_reads(
    mounts: Mounts, servers: Servers, build: Callable[[list[list[Path]]], Storage], ledger: Ledger
) -> None:
    pair_a = [mounts.tmpfs("a1"), mounts.tmpfs("a2")]
    pair_b = [mounts.tmpfs("b1"), mounts.tmpfs("b2")]
    storage = build([pair_a, pair_b])
    server = servers.start(fault_config(storage))
    on_a: list[bytes] = []
    while len(on_a) < 3:
        data = os.urandom(4096)
        assert post(server, data, ledger).status_code == 201
        if layout_path(pair_a[0], sha256(data)).exists():
            on_a.append(data)

    mounts.remount(pair_a[0], "ro")
    assert wait_for(lambda: status(server).status_code == 503)
    report = status(server).json()
    broken = next(d for d in report["disks"] if d["path"] == str(pair_a[0]))
    assert not broken["writable"] and "Read-only" in broken["error"]

    reads_back(server, on_a)
    writes_land_on(server, ledger, pair_b, 10, storage)

    mounts.remount(pair_a[0], "rw")
    assert wait_for(lambda: status(server).status_code == 200)


def test_unmounted_member_gets_no_bytes_and_comes_back_without_a_restart(
    mounts: Mounts, servers: Servers, build: Callable[[list[list[Path]]], Storage], ledger: Ledger
) -> None:
    backing = mounts.tmpfs("backing")
    members = []
    for name in ("a1", "a2", "b1", "b2"):
        (backing / name).mkdir()
        members.append(mounts.base / name)
        members[-1].mkdir()
        run("mount", "--bind", str(backing / name), str(members[-1]))
        mounts.mounted.append(members[-1])
    a1 = members[0]
    storage = build([members[:2], members[2:]])
    server = servers.start(fault_config(storage))
    on_a: list[bytes] = []
    while len(on_a) < 3:
        data = os.urandom(4096)
        assert post(server, data, ledger).status_code == 201
        if layout_path(a1, sha256(data)).exists():
            on_a.append(data)

    run("umount", "-l", str(a1))
    assert wait_for(lambda: status(server).status_code == 503)
    reads_back(server, on_a)
    for _ in range(10):
        data = os.urandom(4096)
        assert post(server, data, ledger).status_code in (201, 503)
    assert httpx.get(f"{server.url}/{'0' * 64}").status_code in (404, 503)
    assert list(a1.iterdir()) == [], "bytes landed on the bare mountpoint"

    run("mount", "--bind", str(backing / "a1"), str(a1))
    assert wait_for(lambda: status(server).status_code == 200)
    data = os.urandom(4096)
    for _ in range(20):  # until placement picks the pair that came back
        assert post(server, data, ledger).status_code == 201
        if layout_path(a1, sha256(data)).exists():
            break
        data = os.urandom(4096)
    assert layout_path(a1, sha256(data)).exists()


def test_member_renamed_away_answers_503_and_recovers(
    tmp_path: Path, servers: Servers, build: Callable[[list[list[Path]]], Storage], ledger: Ledger
) -> None:
    members = [tmp_path / name for name in ("a1", "a2")]
    for member in members:
        member.mkdir()
    storage = build([members])
    server = servers.start(fault_config(storage, check_mountpoints=False))
    data = os.urandom(4096)
    assert post(server, data, ledger).status_code == 201

    members[0].rename(tmp_path / "away")
    assert wait_for(lambda: status(server).status_code == 503)
    assert httpx.get(f"{server.url}/{sha256(data)}").content == data
    assert post(server, os.urandom(4096), ledger).status_code == 503
    assert not members[0].exists(), "stor created a storage root"

    (tmp_path / "away").rename(members[0])
    assert wait_for(lambda: status(server).status_code == 200)
    assert post(server, os.urandom(4096), ledger).status_code == 201


def test_a_miss_the_kernel_remembers_turns_503_when_a_member_is_unmounted(
    mounts: Mounts, servers: Servers, build: Callable[[list[list[Path]]], Storage], ledger: Ledger
) -> None:
    """On ext4 a repeated miss is answered from the dentry cache alone (no thread): that must
    not outlive the mount it was learned on."""
    members = [mounts.ext4("a1"), mounts.ext4("a2")]
    server = servers.start(fault_config(build([members]), health_check_interval=3600))
    missing = f"{server.url}/{'ab' * 32}"
    assert [httpx.get(missing).status_code for _ in range(3)] == [404, 404, 404]
    assert [httpx.head(missing).status_code for _ in range(2)] == [404, 404]

    run("umount", "-l", str(members[0]))  # no health probe runs meanwhile: only the request path can tell
    assert httpx.get(missing).status_code == 503
    assert httpx.head(missing).status_code == 503
    assert list(members[0].iterdir()) == []
    run("mount", "-o", "loop", str(mounts.image_of(members[0])), str(members[0]))
    assert httpx.get(missing).status_code == 404


def test_a_disk_that_goes_away_is_let_go_of_so_it_can_be_unmounted(
    mounts: Mounts, servers: Servers, build: Callable[[list[list[Path]]], Storage], ledger: Ledger
) -> None:
    first, second = mounts.ext4("a1"), mounts.ext4("a2")
    storage = build([[first, second]])
    server = servers.start(fault_config(storage))
    blobs = [os.urandom(4096) for _ in range(20)]
    for data in blobs:
        assert post(server, data, ledger).status_code == 201
    for _ in range(2):
        reads_back(server, blobs)  # small copies are kept open now, on both disks
    image = mounts.image_of(first)

    def attached() -> bool:
        return bool(run("losetup", "-j", str(image)).stdout.strip())

    assert attached()
    run("umount", "-l", str(first))  # the disk goes away; the filesystem lives on while files are open
    assert wait_for(lambda: not attached(), timeout=8), "stor still holds files on the disk that went away"
    reads_back(server, blobs)  # from the partner
    run("mount", "-o", "loop", str(image), str(first))  # back, for the invariant checker
    assert wait_for(lambda: status(server).status_code == 200)


def test_a_blank_disk_in_place_of_a_dead_one_is_healed_onto_before_its_next_probe(
    mounts: Mounts, servers: Servers, build: Callable[[list[list[Path]]], Storage], ledger: Ledger
) -> None:
    """A member's last probe failed (its disk died: here, read-only and emptied) and a blank,
    healthy disk is now in its place; before the health check runs again, a read of a blob
    whose copy survived on the partner heals it onto the new disk, not onto a fresh pair of
    copies on another pair."""
    a1, a2, b1, b2 = (mounts.tmpfs(name) for name in ("a1", "a2", "b1", "b2"))
    storage = build([[a1, a2], [b1, b2]])
    server = servers.start(fault_config(storage, health_check_interval=3600))  # probes: at start, on /status
    on_a: list[bytes] = []
    while len(on_a) < 3:
        data = os.urandom(4096)
        assert post(server, data, ledger).status_code == 201
        if layout_path(a1, sha256(data)).exists():
            on_a.append(data)
    for data in on_a:
        layout_path(a1, sha256(data)).unlink()  # the new disk holds none of them
    mounts.remount(a1, "ro")
    assert status(server).status_code == 503  # the probe saw the member fail
    time.sleep(RECHECK_AFTER)  # replacing a disk takes longer than this
    mounts.remount(a1, "rw")  # the new disk, healthy: no probe since
    for data in on_a:
        got = httpx.get(f"{server.url}/{sha256(data)}", timeout=10)
        assert got.status_code == 200 and got.content == data  # from the partner
    for data in on_a:
        healed = layout_path(a1, sha256(data))
        assert wait_for(healed.exists), "not healed onto the new disk"
        assert healed.read_bytes() == data
        sha = sha256(data)
        assert not layout_path(b1, sha).exists() and not layout_path(b2, sha).exists()


def test_an_evacuation_whose_target_runs_out_of_inodes_stops_cleanly(
    mounts: Mounts, build: Callable[[list[list[Path]]], Storage], tmp_path: Path
) -> None:
    """The writable pair's ext4 filesystems have room in bytes but few inodes: a batch made
    durable there fails with ENOSPC. The evacuation stops with its JSON summary (exit 1,
    `stopped`), and every blob is whole on one pair or the other, no temp left."""
    targets = []
    for name in ("t1", "t2"):
        image, mountpoint = mounts.base / f"{name}.img", mounts.base / name
        mountpoint.mkdir(parents=True)
        with image.open("wb") as f:
            f.truncate(64 * 1024 * 1024)
        run("mkfs.ext4", "-q", "-F", "-N", "128", str(image))  # 128 inodes: a few dozen blobs with their directories
        run("mount", "-o", "loop", str(image), str(mountpoint))
        mounts.mounted.append(mountpoint)
        targets.append(mountpoint)
    sources = [tmp_path / "s1", tmp_path / "s2"]
    blobs = [os.urandom(2048 + n) for n in range(300)]
    for source in sources:
        for data in blobs:
            path = layout_path(source, sha256(data))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    storage = build([targets, sources])
    config = storage.write_config(check_mountpoints=False, writable_pairs_regex="/t[12]$")
    result = run(sys.executable, "-m", "stor", "evacuate", "--pair", "1", "--config", str(config), check=False)
    assert result.returncode == 1, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert "no writable pair has room" in (report["stopped"] or "") and report["left"] > 0
    for data in blobs:  # each whole where it is
        sha = sha256(data)
        where = [p for p in (*targets, *sources) if layout_path(p, sha).exists()]
        assert where, f"{sha} is nowhere"
        assert all(layout_path(p, sha).read_bytes() == data for p in where)
    assert storage.temps() == []


def test_a_disk_replaced_by_another_filesystem_type_gets_temps_of_that_type(mounts: Mounts) -> None:
    """Whether temps wait for a `syncfs` (real on ext4, not on tmpfs) is asked once per device,
    so a member remounted with another filesystem is asked again."""
    path = mounts.ext4("swap")
    disk = Disk(str(path), require_mount=False)
    disk.prepare()
    first = disk.new_temp()
    assert first.groupable
    first.discard()
    disk.close()
    run("umount", str(path))
    mounts.mounted.remove(path)
    run("mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(path))
    mounts.mounted.append(path)
    disk.prepare()
    second = disk.new_temp()
    try:
        assert not second.groupable  # tmpfs: each copy is committed on its own
    finally:
        second.discard()
        disk.close()
