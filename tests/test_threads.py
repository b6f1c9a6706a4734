"""Threads stor starts carry their names to the operating system (what `top -H` shows)."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

from stor.threads import start_thread, thread_pool

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="names threads through prctl")


def os_name(native_id: int | None) -> str:
    return Path(f"/proc/self/task/{native_id}/comm").read_text().strip()


def test_a_started_thread_and_a_pools_threads_are_named_for_the_os() -> None:
    seen: list[str] = []
    release = threading.Event()

    def look() -> None:
        seen.append(os_name(threading.get_native_id()))
        release.wait(5)

    thread = start_thread(look, "stor-commit-/a/long/disk/path")
    try:
        assert thread.daemon
    finally:
        release.set()
        thread.join(5)
    assert seen == ["stor-commit-/a/"]  # cut to the kernel's 15 bytes

    pool = thread_pool(2, "stor-io")
    try:
        names = {pool.submit(lambda: os_name(threading.get_native_id())).result(5) for _ in range(4)}
    finally:
        pool.shutdown()
    assert names <= {"stor-io_0", "stor-io_1"} and names
    assert os_name(threading.get_native_id()) != "stor-io_0"  # the caller keeps its own name
