"""memcached and S3 stopped, killed or lying, under a real server: uploads and downloads go on
within their timeouts, the S3 backlog drains after recovery, and no fd or thread leaks."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.conftest import Storage, StorProcess
from tests.faults.conftest import Servers, fault_config, post, status
from tests.faults.invariants import Ledger
from tests.helpers import wait_for
from tests.services import Memcached, MotoS3


def resources(server: StorProcess) -> tuple[int, int]:
    """(open fds, threads) of the server process."""
    pid = server.proc.pid
    return len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir(f"/proc/{pid}/task"))


def traffic(server: StorProcess, ledger: Ledger, count: int = 6) -> None:
    """Uploads and reads that must all succeed whatever the dependencies do."""
    for _ in range(count):
        data = os.urandom(4096)
        assert post(server, data, ledger, timeout=10).status_code == 201
    for sha, data in list(ledger.acked.items())[-3 * count :]:
        got = httpx.get(f"{server.url}/{sha}", timeout=10)
        assert got.status_code == 200 and got.content == data
    absent = httpx.get(f"{server.url}/{os.urandom(32).hex()}", timeout=10).status_code
    assert absent in (404, 503)  # 503 while S3, the last place to look, cannot answer


def test_dependencies_down_hung_or_lying(
    tmp_path: Path, servers: Servers, ledger: Ledger, memcached: Memcached
) -> None:
    members = [tmp_path / "a1", tmp_path / "a2"]
    for member in members:
        member.mkdir()
    ledger.pairs = [members]
    storage = Storage(tmp_path, [members])
    s3 = MotoS3(tmp_path)
    try:
        s3.reset()
        config = fault_config(
            storage,
            check_mountpoints=False,
            memcached_servers=[memcached.address],
            location_cache_size=0,  # every read asks memcached,
            open_file_cache_size=0,  # and no fd is kept open on purpose: the fds counted are leaks
            **s3.config(s3_fill_local=False),
        )
        server = servers.start(config)
        traffic(server, ledger, 12)
        assert wait_for(lambda: all(s3.object(sha) is not None for sha in ledger.acked))
        baseline = resources(server)

        steps: list[tuple[str, Callable[[], None]]] = [
            ("memcached hung", memcached.stop),
            ("memcached back", memcached.resume),
            ("memcached lies", lambda: lie(memcached, ledger, members)),
            ("memcached killed", memcached.kill),
            ("s3 hung", lambda: os.killpg(s3.proc.pid, signal.SIGSTOP)),
        ]
        for _, step in steps:
            step()
            traffic(server, ledger)
        # uploads made while S3 hung wait in the queue; /status counts it at least every second
        assert wait_for(lambda: status(server).json()["s3"]["backlog"] > 0, timeout=5)

        s3.kill()
        traffic(server, ledger)
        s3 = MotoS3(tmp_path, port=s3.port)  # S3 comes back, empty
        s3.reset()
        assert wait_for(lambda: status(server).json()["s3"]["backlog"] == 0, timeout=30)
        recent = list(ledger.acked)[-12:]
        assert all(s3.object(sha) == ledger.acked[sha] for sha in recent)

        fds, threads = baseline
        assert wait_for(lambda: resources(server)[0] <= fds + 4 and resources(server)[1] <= threads + 4)
    finally:
        s3.kill()


def lie(memcached: Memcached, ledger: Ledger, members: list[Path]) -> None:
    """Point every cached location at a disk that holds nothing: a stale cache."""
    for sha in ledger.acked:
        memcached.set(f"stor:{sha}", str(members[0] / "elsewhere").encode())
