"""Disk faults through faultfs (a FUSE passthrough): I/O errors, full, read-only mid-upload, the
daemon killed, a hung disk and a slow one."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import Storage, StorProcess
from tests.faults.conftest import (
    FuseDisk,
    Mounts,
    Servers,
    fault_config,
    post,
    reads_back,
    status,
    writes_land_on,
)
from tests.faults.invariants import Ledger
from tests.helpers import AUTH, layout_path, sha256, wait_for

pytestmark = pytest.mark.usefixtures("need_fuse")

MiB = 1024 * 1024
Build = Callable[[list[list[Path]]], Storage]


def disk_report(server: StorProcess, root: Path) -> dict[str, object]:
    report = status(server).json()
    found: dict[str, object] = next(d for d in report["disks"] if d["path"] == str(root))
    return found


def fuse_pair_and_spare(mounts: Mounts, build: Build) -> tuple[FuseDisk, list[Path], Storage]:
    """Pair A: a faultfs member and a tmpfs; pair B: two tmpfs, to take what A cannot."""
    faulty = mounts.fuse("a1")
    spare = [mounts.tmpfs("b1"), mounts.tmpfs("b2")]
    return faulty, spare, build([[faulty.path, mounts.tmpfs("a2")], spare])


def upload_until(server: StorProcess, ledger: Ledger, member: Path, count: int) -> list[bytes]:
    """Upload small blobs until `count` of them landed on `member`'s pair."""
    landed: list[bytes] = []
    while len(landed) < count:
        data = os.urandom(4096)
        assert post(server, data, ledger).status_code == 201
        if layout_path(member, sha256(data)).exists():
            landed.append(data)
    return landed


@pytest.mark.parametrize(("mode", "expected"), [("eio-write", 503), ("enospc", 507), ("erofs", 503)])
def test_a_write_fault_mid_upload_fails_it_cleanly(
    mode: str, expected: int, mounts: Mounts, servers: Servers, build: Build, ledger: Ledger
) -> None:
    faulty = mounts.fuse("a1")
    storage = build([[faulty.path, mounts.tmpfs("a2")]])
    server = servers.start(fault_config(storage))
    data = os.urandom(3 * MiB)
    sha = sha256(data)

    def body() -> Iterator[bytes]:
        yield data[: 3 * MiB // 2]
        time.sleep(0.3)  # both temps exist by now
        faulty.set(mode)
        yield data[3 * MiB // 2 :]

    response = httpx.post(f"{server.url}/{sha}", content=body(), auth=AUTH, timeout=20)
    assert response.status_code == expected, response.text
    assert storage.copies(sha) == []
    if mode != "erofs":  # a read-only disk cannot lose its temp until it takes writes again
        assert storage.temps() == []
    errors = disk_report(server, faulty.path)["io_errors"]
    assert isinstance(errors, int) and errors >= 1

    faulty.set("ok")
    assert wait_for(lambda: status(server).status_code == 200)
    assert wait_for(lambda: storage.temps() == [])
    assert post(server, data, ledger).status_code == 201


def test_read_errors_on_one_copy_are_served_from_the_other(
    mounts: Mounts, servers: Servers, build: Build, ledger: Ledger
) -> None:
    faulty = mounts.fuse("a1")
    storage = build([[faulty.path, mounts.tmpfs("a2")]])
    server = servers.start(fault_config(storage))
    blobs = [os.urandom(size) for size in (4096, 100_000, 6 * MiB)]
    for data in blobs:
        assert post(server, data, ledger).status_code == 201
    faulty.set("eio-read")
    for _ in range(3):  # whichever copy is asked first
        for data in blobs:
            got = httpx.get(f"{server.url}/{sha256(data)}", timeout=20)
            assert got.status_code == 200 and got.content == data


def test_a_read_only_member_mid_upload_sends_later_writes_elsewhere(
    mounts: Mounts, servers: Servers, build: Build, ledger: Ledger
) -> None:
    faulty, pair_b, storage = fuse_pair_and_spare(mounts, build)
    server = servers.start(fault_config(storage))
    on_a = upload_until(server, ledger, faulty.path, 2)
    faulty.set("erofs")
    assert wait_for(lambda: status(server).status_code == 503)
    assert disk_report(server, faulty.path)["writable"] is False
    reads_back(server, on_a)
    writes_land_on(server, ledger, pair_b, 10, storage)


def test_a_killed_fuse_daemon_is_survived_and_recovered_without_a_restart(
    mounts: Mounts, servers: Servers, build: Build, ledger: Ledger
) -> None:
    faulty, pair_b, storage = fuse_pair_and_spare(mounts, build)
    server = servers.start(fault_config(storage))
    on_a = upload_until(server, ledger, faulty.path, 3)

    faulty.kill()
    assert wait_for(lambda: status(server).status_code == 503)
    reads_back(server, on_a)
    writes_land_on(server, ledger, pair_b, 5, None)  # the dead member cannot even be listed
    assert httpx.get(f"{server.url}/{'0' * 64}").status_code == 503  # not a false 404

    faulty.restart()
    assert wait_for(lambda: status(server).status_code == 200)
    upload_until(server, ledger, faulty.path, 1)


def test_a_hung_disk_holds_no_request_for_healthy_pairs(
    mounts: Mounts, servers: Servers, build: Build, ledger: Ledger
) -> None:
    hung, pair_b, storage = fuse_pair_and_spare(mounts, build)
    config = fault_config(storage)
    first = servers.start(config)
    on_b = upload_until(first, ledger, pair_b[0], 10)
    first.stop()
    server = servers.start(config)  # nothing cached in-process: every GET has to look

    hung.set("hang")
    stuck: list[int] = []

    def doomed_get() -> None:  # sent before stor can know: may wait on the hung disk
        try:
            stuck.append(httpx.get(f"{server.url}/{os.urandom(32).hex()}", timeout=60).status_code)
        except httpx.HTTPError:
            stuck.append(0)

    doomed = [threading.Thread(target=doomed_get) for _ in range(40)]
    for thread in doomed:
        thread.start()

    response = httpx.get(f"{server.url}/status?format=json", timeout=5)  # its deadline is 1 s
    assert response.status_code == 503
    assert wait_for(lambda: "hung" in str(disk_report(server, hung.path)["error"]))

    def healthy_request(n: int) -> int:
        if n % 2:
            data = on_b[n // 2]
            got = httpx.get(f"{server.url}/{sha256(data)}", timeout=15)
            return got.status_code if got.content == data else -1
        return post(server, os.urandom(4096), ledger, timeout=15).status_code

    with ThreadPoolExecutor(20) as pool:
        codes = list(pool.map(healthy_request, range(20)))
    assert codes == [201, 200] * 10
    assert httpx.get(f"{server.url}/{'0' * 64}", timeout=15).status_code == 503  # not a false 404

    hung.set("ok")
    for thread in doomed:
        thread.join(timeout=30)
    assert len(stuck) == 40 and set(stuck) <= {404, 503}
    assert wait_for(lambda: status(server).status_code == 200)


def test_a_slow_disk_slows_but_fails_nothing(mounts: Mounts, servers: Servers, build: Build, ledger: Ledger) -> None:
    slow = mounts.fuse("a1")
    storage = build([[slow.path, mounts.tmpfs("a2")], [mounts.tmpfs("b1"), mounts.tmpfs("b2")]])
    server = servers.start(fault_config(storage))
    on_a = upload_until(server, ledger, slow.path, 2)
    slow.set("slow")
    assert httpx.get(f"{server.url}/status", timeout=5).status_code in (200, 503)
    for data in on_a:
        assert httpx.get(f"{server.url}/{sha256(data)}", timeout=15).content == data
    for _ in range(5):
        assert post(server, os.urandom(4096), ledger, timeout=30).status_code == 201
