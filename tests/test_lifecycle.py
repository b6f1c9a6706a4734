"""Whatever the app takes it gives back: started and stopped in-process many times, it leaves
no file descriptor behind (lock files of claimed directories, kept-open copies, S3 queue
claims, sockets)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stor.backends.disk import Disk
from tests.conftest import Storage, app_client
from tests.helpers import AUTH, sha256
from tests.services import MotoS3

LIFECYCLES = 50


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def start_stop(config: dict[str, object], data: bytes) -> None:
    sha = sha256(data)
    async with app_client(config) as http:
        assert (await http.post(f"/{sha}", content=data, auth=AUTH)).status_code in (200, 201)
        assert (await http.get(f"/{sha}")).content == data  # a kept-open copy, where the disk takes it


@pytest.mark.anyio
async def test_starting_and_stopping_the_app_leaks_no_fd(storage: Storage) -> None:
    data = os.urandom(4096)
    await start_stop(storage.config(), data)  # the first run loads modules and caches
    before = open_fds()
    for _ in range(LIFECYCLES):
        await start_stop(storage.config(), data)
    assert open_fds() - before <= 2  # a few may be the runtime's own (the anyio thread pool)


@pytest.mark.anyio
async def test_with_s3_the_queue_claims_are_released_too(storage: Storage, s3: MotoS3) -> None:
    config = storage.config(**s3.config())
    data = os.urandom(4096)
    await start_stop(config, data)
    before = open_fds()
    for _ in range(10):
        await start_stop(config, data)
    assert open_fds() - before <= 2


def test_a_closed_disk_lets_go_of_its_lock(tmp_path: Path) -> None:

    (tmp_path / "m").mkdir()
    disk = Disk(str(tmp_path / "m"), require_mount=False)
    disk.prepare()
    held = open_fds()
    disk.close()
    assert open_fds() == held - 1
    disk.prepare()  # claimed again
    assert open_fds() == held
    disk.close()
