"""The /status deadline. A real hung disk needs FUSE (the reliability suite); here a disk whose
probe blocks on an event stands in for it, to test the deadline and the thread bound."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from stor.backends.disk import Disk
from stor.model import DiskHealth
from stor.service.health import HealthMonitor

pytestmark = pytest.mark.anyio


class HangingDisk(Disk):
    def __init__(self, root: str) -> None:
        super().__init__(root, require_mount=False)
        self.release = threading.Event()
        self.calls = 0

    def probe_health(self) -> DiskHealth:
        self.calls += 1
        self.release.wait(30)
        return super().probe_health()


async def test_a_hung_disk_misses_the_deadline_and_ties_up_one_thread(tmp_path: Path) -> None:
    (tmp_path / "ok").mkdir()
    (tmp_path / "hung").mkdir()
    good = Disk(str(tmp_path / "ok"), require_mount=False)
    good.prepare()
    hung = HangingDisk(str(tmp_path / "hung"))
    hung.prepare()
    monitor = HealthMonitor([good, hung], timeout=0.3)
    try:
        for _ in range(3):
            started = time.monotonic()
            results = await monitor.check()
            assert time.monotonic() - started < 1.0
            assert results[0].ok
            assert not results[1].ok and "not finished" in (results[1].error or "")
        assert hung.calls == 1  # no pile-up of threads on the hung disk
        assert not monitor.healthy(hung) and monitor.healthy(good)
        hung.release.set()
        for _ in range(50):  # the late answer is recorded when it comes
            if monitor.healthy(hung):
                break
            time.sleep(0.02)
        assert monitor.healthy(hung)
        assert (await monitor.check())[1].ok
    finally:
        hung.release.set()
        monitor.close()
