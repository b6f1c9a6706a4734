"""memcached and S3 stopped, killed or lying, under a real server: uploads and downloads go on
within their timeouts, the S3 backlog drains after recovery, and no fd or thread leaks."""

from __future__ import annotations

import os
import platform
import signal
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx

from stor.service.health import PROBE_THREADS
from stor.wiring.build import IO_THREADS
from tests.conftest import Storage, StorProcess
from tests.faults.conftest import Servers, fault_config, post, status
from tests.faults.invariants import Ledger
from tests.helpers import wait_for
from tests.services import Memcached, MotoS3

POOLS = {"stor-io": IO_THREADS, "stor-health": PROBE_THREADS}  # the test's pair has two disks
"""stor's thread pools and their bounds (stor/threads.py names every thread for the OS). A pool grows
towards its bound while calls wait (on a hung memcached, say) and keeps those threads: not a leak."""

FUTEX = {"x86_64": 202, "aarch64": 98}.get(platform.machine())
"""The syscall an idle pool thread waits in, for its next call."""


def open_fds(server: StorProcess) -> int:
    return len(os.listdir(f"/proc/{server.proc.pid}/fd"))


def threads(server: StorProcess) -> dict[int, str]:
    """The server's threads by id, a pool's threads named by their pool."""
    named = {}
    for tid in os.listdir(f"/proc/{server.proc.pid}/task"):
        try:
            name = Path(f"/proc/{server.proc.pid}/task/{tid}/comm").read_text().strip()
        except FileNotFoundError:  # it ended meanwhile
            continue
        pool = name.rsplit("_", 1)[0]
        named[int(tid)] = pool if pool in POOLS else name
    return named


def idle(server: StorProcess, tid: int) -> bool:
    """Whether a thread waits for work (a futex), not in a call that may never return."""
    try:
        call = Path(f"/proc/{server.proc.pid}/task/{tid}/syscall").read_text().split()[0]
    except FileNotFoundError:
        return True
    return call == str(FUTEX)


def no_leak(server: StorProcess, fds: int, before: dict[int, str]) -> bool:
    """No fd more than a few passing sockets, no thread outside the pools that was not there
    `before`, every pool within its bound and every pool thread waiting for work."""
    now = threads(server)
    counts = Counter(now.values())
    others = Counter(name for name in now.values() if name not in POOLS)
    pools_idle = FUTEX is None or all(idle(server, tid) for tid, name in now.items() if name in POOLS)
    return (
        open_fds(server) <= fds + 4
        and not others - Counter(name for name in before.values() if name not in POOLS)
        and all(counts[pool] <= bound for pool, bound in POOLS.items())
        and pools_idle
    )


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
        fds, before = open_fds(server), threads(server)
        assert "stor-io" in before.values()  # the threads are named, or this test would see nothing

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

        assert wait_for(lambda: no_leak(server, fds, before)), (open_fds(server), fds, threads(server), before)
    finally:
        s3.kill()


def lie(memcached: Memcached, ledger: Ledger, members: list[Path]) -> None:
    """Point every cached location at a disk that holds nothing: a stale cache."""
    for sha in ledger.acked:
        memcached.set(f"stor:{sha}", str(members[0] / "elsewhere").encode())
