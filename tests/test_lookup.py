"""The read algorithm (`Lookup.find`) at the service level, without HTTP: the real service built
by `build_service` on real directories, asked directly in both of its I/O modes, a worker
thread's (`ThreadMode`) and the event loop's (`LoopMode`, through `HotPath`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from stor.backends.disk import Disk
from stor.backends.pairs import Pair, PairWrite
from stor.config import config_from_mapping
from stor.digest import Sha
from stor.errors import BlobLost, BlobNotFound, StorageUnavailable
from stor.metrics import NullMetrics
from stor.model import BlobStat, DiskHealth
from stor.service import BlobService
from stor.service.lookup import ThreadMode
from stor.service.readmode import Found, WouldBlock
from stor.service.stream import OpenBlob
from stor.wiring.build import build_service
from tests.conftest import Storage
from tests.helpers import layout_path, sha256

pytestmark = pytest.mark.anyio

DATA = os.urandom(5000)
SHA = Sha(sha256(DATA))
ABSENT = Sha(sha256(b"stored nowhere, by anyone"))
MTIME = 1_600_000_000_123_456_789


# -- the service under test -------------------------------------------------------------------


class Recorder(NullMetrics):
    """The metrics events the service reports, kept for the tests to read."""

    def __init__(self) -> None:
        self.integrity_events: list[str] = []
        self.caches: list[str] = []
        self.lookups: list[int] = []

    def integrity(self, event: str) -> None:
        self.integrity_events.append(event)

    def cache(self, result: str, seconds: float, count: int = 1) -> None:
        self.caches.extend([result] * count)

    def lookup(self, seconds: float, attempts: int) -> None:
        self.lookups.append(attempts)


@dataclass
class Stor:
    service: BlobService
    metrics: Recorder
    storage: Storage

    @property
    def pairs(self) -> list[Pair]:
        return self.service.pool.pairs

    def members(self, pair: int = 0) -> tuple[Disk, ...]:
        return self.pairs[pair].members

    def store(self, data: bytes = DATA, pair: int = 0) -> list[Path]:
        """`data` written on every member of `pair` by the mirrored write (`PairWrite`), as an
        upload does, but without telling the location caches (as another process's upload)."""
        members = list(self.members(pair))
        paths = [Path(p) for p in PairWrite(members).finish(Sha(sha256(data)), MTIME, data)]
        assert paths == [layout_path(Path(disk.root), sha256(data)) for disk in members]
        return paths

    def copy(self, disk: Disk, sha: str = SHA) -> Path:
        return layout_path(Path(disk.root), sha)

    async def thread_open(self, sha: Sha = SHA) -> Found[OpenBlob]:
        """`find` in a worker thread's mode, opening (and verifying) the copy."""
        lookup = self.service.lookup
        mode: ThreadMode[OpenBlob] = lookup.threaded(lookup.open_copy)
        return await self.service.offload.run(lookup.find, sha, mode)

    async def thread_stat(self, sha: Sha = SHA) -> Found[BlobStat]:
        """`find` in a worker thread's mode, with the stat probe (`stat_checked`)."""
        lookup = self.service.lookup
        mode = lookup.threaded(lookup.stat_checked)
        return await self.service.offload.run(lookup.find, sha, mode)

    def loop_find(self, sha: Sha = SHA) -> Found[Any]:  # Found[OpenCopy]
        """`find` in the event loop's mode, as `HotPath` runs it (call it on the loop)."""
        return self.service.lookup.find(sha, self.service.hot.mode)


@pytest.fixture
async def start(storage: Storage) -> AsyncIterator[Callable[..., Awaitable[Stor]]]:
    """Build the real service on the storage directories, prepared and health-probed (which
    is how its disks learn whether their filesystem takes RWF_NOWAIT); closed afterwards."""
    started: list[Stor] = []

    async def start(**overrides: object) -> Stor:
        metrics = Recorder()
        service = build_service(config_from_mapping(storage.config(**overrides), {}), metrics)
        started.append(Stor(service, metrics, storage))
        await service.offload.run(service.prepare)
        await service.monitor.check()
        assert all(service.monitor.healthy(disk) for disk in service.pool.disks)
        return started[-1]

    yield start
    for stor in started:
        stor.service.close()


@pytest.fixture
async def stor(start: Callable[..., Awaitable[Stor]]) -> Stor:
    return await start()


@pytest.fixture
async def loop_stor(stor: Stor) -> Stor:
    """The service, on disks where the event loop's mode can work at all."""
    if not all(disk.takes_nowait for disk in stor.service.pool.disks):
        pytest.skip(f"{stor.storage.base} is on a filesystem without RWF_NOWAIT: the event loop reads nothing there")
    return stor


@contextlib.asynccontextmanager
async def healing(service: BlobService) -> AsyncIterator[None]:
    """The service's healer, running on this event loop (as `run_background` runs it)."""
    task = asyncio.get_running_loop().create_task(service.integrity.healer.run(service.heal))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    """`tests.helpers.wait_for` for the event loop: polls without holding the loop."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def flip_byte(path: Path, offset: int) -> bytes:
    """Damage one byte in place (same inode, size and mtime), as bitrot would; checks that the
    bytes on disk changed and returns them."""
    before = path.read_bytes()
    st = path.stat()
    with path.open("r+b") as handle:
        handle.seek(offset)
        handle.write(bytes([before[offset] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = path.read_bytes()
    assert len(after) == len(before) and after != before, f"{path} was not damaged"
    return after


def quarantined(disk: Disk) -> list[Path]:
    return sorted((Path(disk.root) / ".stor-quarantine").glob("*.dat"))


def unplug(stor: Stor, disk: Disk) -> None:
    """The disk goes away: its directory is no longer where the config says."""
    root = Path(disk.root)
    root.rename(stor.storage.base / f"{root.name}-unplugged")
    assert not root.exists()


def blank(stor: Stor, disk: Disk) -> None:
    """An empty directory where the disk was (a bare mountpoint: the disk is not mounted), in
    which every blob is "absent": no proof of anything."""
    root = Path(disk.root)
    for entry in root.iterdir():
        entry.rename(stor.storage.base / f"{root.name}-moved-{entry.name}")
    assert list(root.iterdir()) == []


def spy_on_blocking_calls(stor: Stor, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every blocking disk call (`stat`, `open`, `hash_copy`, quarantine look-ups) and
    every thread hop the service makes from now on."""
    calls: list[str] = []
    for disk in stor.service.pool.disks:
        for owner, name in ((disk, "stat"), (disk, "open"), (disk, "hash_copy"), (disk.quarantine, "holds")):
            real: Callable[..., object] = getattr(owner, name)

            def spy(*args: object, _real: Callable[..., object] = real, _what: str = f"{name} {disk.root}") -> object:
                calls.append(_what)
                return _real(*args)

            monkeypatch.setattr(owner, name, spy)
    run = stor.service.offload.run

    async def counted(func: Callable[..., Any], *args: Any) -> Any:
        calls.append(f"thread {getattr(func, '__name__', func)}")
        return await run(func, *args)

    monkeypatch.setattr(stor.service.offload, "run", counted)
    return calls


# -- a worker thread's mode ------------------------------------------------------------------


async def test_a_blob_on_both_members_is_a_miss_then_local(stor: Stor) -> None:
    paths = stor.store()
    first = await stor.thread_open()
    assert first.how == "miss" and first.tried >= 1
    assert first.disk in stor.members(0)
    assert first.value.data == DATA and first.value.sha == SHA
    assert first.value.stat == BlobStat(str(stor.copy(first.disk)), len(DATA), MTIME)
    assert Path(first.value.stat.path) in paths
    assert stor.service.lookup.near.get(SHA) == first.disk.root  # remembered
    assert stor.metrics.caches == ["miss"] and stor.metrics.lookups == [first.tried]

    again = await stor.thread_open()
    assert (again.how, again.disk, again.tried) == ("local", first.disk, 0)
    assert again.value.data == DATA and again.value.stat == first.value.stat
    stat = await stor.thread_stat()
    assert (stat.how, stat.disk, stat.value) == ("local", first.disk, first.value.stat)
    assert stor.metrics.caches == ["miss", "local", "local"]
    assert stor.metrics.lookups == [first.tried]  # the disks were probed once
    assert "missing_copy" not in stor.metrics.integrity_events


async def test_without_the_near_cache_every_lookup_is_a_miss(start: Callable[..., Awaitable[Stor]]) -> None:
    stor = await start(location_cache_size=0)
    stor.store()
    for _ in range(3):
        found = await stor.thread_stat()
        assert found.how == "miss" and found.value.size == len(DATA) and found.value.mtime_ns == MTIME
    assert stor.metrics.caches == ["miss"] * 3


async def test_an_upload_through_the_service_leaves_its_location_for_the_next_read(stor: Stor) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield DATA

    result = await stor.service.put(SHA, body(), len(DATA))
    assert result.created and len(result.paths) == 2
    assert all(Path(path).read_bytes() == DATA for path in result.paths)
    found = await stor.thread_open()
    assert found.how == "local" and found.value.data == DATA
    assert found.value.stat.path == result.paths[0]


async def test_a_copy_missing_on_the_partner_is_found_and_healed(stor: Stor) -> None:
    present, missing = stor.members(0)
    stor.store()
    stor.copy(missing).unlink()
    found = await stor.thread_open()
    assert found.disk is present and found.value.data == DATA
    assert stor.metrics.integrity_events == ["missing_copy"]  # recorded, and a heal requested
    assert not stor.copy(missing).exists()  # nothing heals until the healer runs
    async with healing(stor.service):
        await eventually(lambda: "healed" in stor.metrics.integrity_events)
    assert stor.copy(missing).read_bytes() == DATA
    assert stor.copy(missing).stat().st_mtime_ns == stor.copy(present).stat().st_mtime_ns == MTIME
    assert stor.copy(present).read_bytes() == DATA


async def test_a_corrupt_copy_is_quarantined_and_its_partner_answers(stor: Stor) -> None:
    bad, good = stor.members(0)
    stor.store()
    damaged = flip_byte(stor.copy(bad), 1234)
    stor.service.lookup.near.remember(SHA, bad.root)  # so the corrupt copy is asked first
    found = await stor.thread_open()
    assert found.disk is good and found.how == "miss"
    assert found.value.data == DATA and found.value.stat.path == str(stor.copy(good))
    assert not stor.copy(bad).exists()
    [moved] = quarantined(bad)
    assert moved.read_bytes() == damaged
    note = json.loads(moved.with_suffix(".json").read_text())
    assert note["expected"] == SHA and note["actual"] == sha256(damaged) and note["size"] == len(DATA)
    assert "corrupt_copy" in stor.metrics.integrity_events
    assert stor.copy(good).read_bytes() == DATA and quarantined(good) == []
    for _ in range(3):  # and from now on, whatever the order the disks are asked in
        again = await stor.thread_open()
        assert again.disk is good and again.value.data == DATA


async def test_a_copy_of_the_wrong_size_is_settled_by_hashing_when_stated(stor: Stor) -> None:
    short, whole = stor.members(0)
    stor.store()
    os.truncate(stor.copy(short), 1000)
    assert stor.copy(short).stat().st_size == 1000
    stor.service.lookup.near.remember(SHA, short.root)
    found = await stor.thread_stat()
    assert found.value == BlobStat(str(stor.copy(whole)), len(DATA), MTIME)
    assert not stor.copy(short).exists()
    [moved] = quarantined(short)
    assert moved.stat().st_size == 1000
    assert quarantined(whole) == [] and stor.copy(whole).read_bytes() == DATA


async def test_both_copies_corrupt_is_lost_and_stays_lost(stor: Stor) -> None:
    stor.store()
    for disk in stor.members(0):
        flip_byte(stor.copy(disk), 10)
    with pytest.raises(BlobLost, match="no copy passed verification"):
        await stor.thread_open()
    for disk in stor.members(0):
        assert not stor.copy(disk).exists() and len(quarantined(disk)) == 1
    for find in (stor.thread_open, stor.thread_stat):  # no copy left: lost, never absent
        with pytest.raises(BlobLost, match="quarantined"):
            await find()


async def test_a_blob_stored_nowhere_is_not_found(stor: Stor) -> None:
    stor.store()  # another blob, so the layout directories exist on one pair
    for find in (stor.thread_open, stor.thread_stat):
        with pytest.raises(BlobNotFound):
            await find(ABSENT)
    assert stor.metrics.lookups == [4, 4]  # every disk was asked


async def test_a_quarantined_copy_and_no_good_one_is_lost_not_absent(stor: Stor) -> None:
    bad, partner = stor.members(0)
    stor.store()
    stor.copy(partner).unlink()  # one copy left, and it is rotten
    flip_byte(stor.copy(bad), 0)
    with pytest.raises(BlobLost):
        await stor.thread_open()
    assert len(quarantined(bad)) == 1 and quarantined(partner) == []
    assert not stor.copy(bad).exists() and not stor.copy(partner).exists()
    for find in (stor.thread_open, stor.thread_stat):
        with pytest.raises(BlobLost, match="quarantined on"):
            await find()


@pytest.mark.parametrize("how", ["unplugged", "bare mountpoint"])
async def test_an_unreachable_disk_is_unavailable_not_absent(stor: Stor, how: str) -> None:
    stor.store()  # on pair 0
    gone = stor.members(1)[0]
    if how == "unplugged":
        unplug(stor, gone)
    else:
        blank(stor, gone)
    for find in (stor.thread_open, stor.thread_stat):
        with pytest.raises(StorageUnavailable) as info:
            await find(ABSENT)
        assert not isinstance(info.value, BlobLost | BlobNotFound)
        assert gone.root in str(info.value)
    assert (await stor.thread_open()).value.data == DATA  # a blob the other pair holds is found


async def test_a_blob_whose_only_pair_is_gone_is_unavailable(stor: Stor) -> None:
    stor.store()
    for disk in stor.members(0):
        unplug(stor, disk)
    await stor.service.monitor.check()
    assert not any(stor.service.monitor.healthy(disk) for disk in stor.members(0))
    with pytest.raises(StorageUnavailable, match="some storage was unreachable"):
        await stor.thread_open()


async def test_a_member_gone_leaves_its_partner_to_answer(stor: Stor) -> None:
    gone, partner = stor.members(0)
    stor.store()
    unplug(stor, gone)
    await stor.service.monitor.check()
    assert not stor.service.monitor.healthy(gone)
    stor.service.lookup.near.remember(SHA, gone.root)  # the hint names the disk that went away
    found = await stor.thread_open()
    assert found.disk is partner and found.value.data == DATA


async def test_a_hung_disk_is_not_asked_and_makes_absence_unprovable(
    start: Callable[..., Awaitable[Stor]], monkeypatch: pytest.MonkeyPatch
) -> None:
    stor = await start(status_timeout=0.2)
    hung = stor.members(1)[1]
    release = threading.Event()
    probe = hung.probe_health

    def hanging_probe() -> DiskHealth:
        release.wait(30)
        return probe()

    monkeypatch.setattr(hung, "probe_health", hanging_probe)
    try:
        await stor.service.monitor.check()  # the probe outruns its deadline
        await asyncio.sleep(0.05)
        assert not stor.service.monitor.responsive(hung)
        asked = spy_on_blocking_calls(stor, monkeypatch)
        with pytest.raises(StorageUnavailable, match=r"not responding \(hung\?\)") as info:
            await stor.thread_stat(ABSENT)
        assert hung.root in str(info.value)
        assert not any(call.endswith(hung.root) for call in asked)  # no thread waits on it
    finally:
        release.set()


# -- the event loop's mode ---------------------------------------------------------------------


async def test_a_copy_kept_open_by_a_thread_read_answers_on_the_loop(
    loop_stor: Stor, monkeypatch: pytest.MonkeyPatch
) -> None:
    stor = loop_stor
    stor.store()
    read = await stor.thread_open()
    kept = stor.service.open_files.get(SHA)
    assert kept is not None and kept.stat == read.value.stat and kept.disk is read.disk
    blocking = spy_on_blocking_calls(stor, monkeypatch)

    found = stor.loop_find()
    assert found.how == "kept" and found.value is kept and found.disk is read.disk and found.tried == 0
    assert stor.service.hot.stat_now(SHA) == read.value.stat
    blob = stor.service.hot.open_now(SHA)
    assert blob is not None and blob.data == DATA and blob.stat == read.value.stat
    assert blocking == []  # no disk call that might wait, no thread hop
    await asyncio.sleep(0)
    assert blocking == []  # nor one started in the background


@pytest.mark.parametrize("when", ["kept open, damaged later", "damaged, then opened on the loop"])
async def test_a_corrupt_copy_is_never_read_on_the_loop(loop_stor: Stor, when: str) -> None:
    stor = loop_stor
    stor.store()
    hot = stor.service.hot
    if when == "kept open, damaged later":
        bad = (await stor.thread_open()).disk  # verified, and kept open with its fast checksum
        assert stor.service.open_files.get(SHA) is not None
        good = next(disk for disk in stor.members(0) if disk is not bad)
    else:
        bad, good = stor.members(0)
        stor.service.lookup.near.remember(SHA, bad.root)  # the loop opens this copy first
    damaged = flip_byte(stor.copy(bad), 4000)  # in place: an open fd reads the bad bytes too
    assert hot.open_now(SHA) is None  # the thread path decides
    assert stor.service.open_files.get(SHA) is None  # and it is not kept for the next read
    found = await stor.thread_open()
    assert found.disk is good and found.value.data == DATA
    [moved] = quarantined(bad)
    assert moved.read_bytes() == damaged
    blob = hot.open_now(SHA)  # the good copy, kept open by that read
    assert blob is not None and blob.data == DATA and blob.stat.path == str(stor.copy(good))


async def test_a_copy_opened_on_the_loop_reports_its_missing_partner(loop_stor: Stor) -> None:
    stor = loop_stor
    present, missing = stor.members(0)
    stor.store()
    stor.copy(missing).unlink()  # the dentry cache now knows it is absent
    stat = stor.service.hot.stat_now(SHA)
    assert stat == BlobStat(str(stor.copy(present)), len(DATA), MTIME)
    await eventually(lambda: "missing_copy" in stor.metrics.integrity_events)
    assert stor.metrics.integrity_events == ["missing_copy"]
    async with healing(stor.service):
        await eventually(stor.copy(missing).exists)
    assert stor.copy(missing).read_bytes() == DATA


@pytest.mark.parametrize("how", ["unplugged", "bare mountpoint"])
async def test_a_blob_is_absent_on_the_loop_only_when_the_caches_prove_it(loop_stor: Stor, how: str) -> None:
    stor = loop_stor
    hot = stor.service.hot
    with pytest.raises(WouldBlock):
        stor.loop_find(ABSENT)  # the mode gives up where it would wait on a disk...
    assert hot.stat_now(ABSENT) is None  # ...and HotPath hands that to a thread
    assert hot.open_now(ABSENT) is None
    with pytest.raises(BlobNotFound):
        await stor.thread_stat(ABSENT)  # a thread looks; the kernel remembers what it saw
    with pytest.raises(BlobNotFound):
        hot.stat_now(ABSENT)
    with pytest.raises(BlobNotFound):
        hot.open_now(ABSENT)

    gone = stor.members(1)[0]  # now one disk cannot tell
    if how == "unplugged":
        unplug(stor, gone)
    else:
        blank(stor, gone)
    assert hot.stat_now(ABSENT) is None and hot.open_now(ABSENT) is None
    with pytest.raises(StorageUnavailable):
        await stor.thread_stat(ABSENT)
    # the thread's look left the disk's "no such file" in the dentry cache: still no proof
    assert hot.stat_now(ABSENT) is None and hot.open_now(ABSENT) is None
    if how == "unplugged":  # (a probe would adopt a bare directory: check_mountpoints is off here)
        await stor.service.monitor.check()
        assert not stor.service.monitor.healthy(gone)
        assert hot.stat_now(ABSENT) is None and hot.open_now(ABSENT) is None


async def test_a_lost_blob_is_never_absent_on_the_loop(loop_stor: Stor) -> None:
    stor = loop_stor
    stor.store()
    for disk in stor.members(0):
        flip_byte(stor.copy(disk), 99)
    with pytest.raises(BlobLost):
        await stor.thread_open()
    with pytest.raises(BlobLost):
        await stor.thread_stat()  # the quarantine listings are read now
    assert stor.service.hot.stat_now(SHA) is None  # a thread must answer: 500, not 404
    assert stor.service.hot.open_now(SHA) is None


async def test_partners_of_different_sizes_are_left_to_a_thread(loop_stor: Stor) -> None:
    stor = loop_stor
    short, whole = stor.members(0)
    stor.store()
    os.truncate(stor.copy(short), 1000)
    hot = stor.service.hot
    with pytest.raises(WouldBlock):
        stor.loop_find()
    assert hot.stat_now(SHA) is None and hot.open_now(SHA) is None
    assert stor.service.open_files.get(SHA) is None  # whichever copy it opened, it let go of it
    settled = await stor.thread_stat()
    assert settled.value == BlobStat(str(stor.copy(whole)), len(DATA), MTIME)
    assert len(quarantined(short)) == 1
    assert hot.stat_now(SHA) == settled.value


async def test_a_disk_that_failed_its_probe_is_not_read_on_the_loop(
    loop_stor: Stor, monkeypatch: pytest.MonkeyPatch
) -> None:
    stor = loop_stor
    down, up = stor.members(0)
    stor.store()

    def failing_probe(disk: Disk) -> Callable[[], DiskHealth]:
        return lambda: DiskHealth(disk.root, False, True, False, 0, 0, "probe failed (test)", 0, readable=True)

    monkeypatch.setattr(down, "probe_health", failing_probe(down))
    await stor.service.monitor.check()
    assert not stor.service.monitor.healthy(down) and stor.service.monitor.responsive(down)
    for _ in range(8):  # whichever order the disks come in, the one marked down is skipped
        found = stor.loop_find()
        assert found.disk is up and found.how == "miss"
        stor.service.open_files.forget(SHA)

    monkeypatch.setattr(up, "probe_health", failing_probe(up))
    await stor.service.monitor.check()
    with pytest.raises(WouldBlock):
        stor.loop_find()
    assert stor.service.hot.stat_now(SHA) is None and stor.service.hot.open_now(SHA) is None
    found_by_thread = await stor.thread_stat()  # a thread still asks a disk that answers
    assert found_by_thread.value.size == len(DATA)


@pytest.mark.parametrize("state", ["both copies", "first gone", "second gone", "nowhere"])
async def test_both_modes_find_the_same_copy(loop_stor: Stor, state: str) -> None:
    stor = loop_stor
    first, second = stor.members(0)
    stor.store()
    if state in ("first gone", "nowhere"):
        stor.copy(first).unlink()
    if state in ("second gone", "nowhere"):
        stor.copy(second).unlink()
    if state == "nowhere":
        with pytest.raises(BlobNotFound):
            await stor.thread_stat()
        with pytest.raises(BlobNotFound):
            stor.loop_find()
        with pytest.raises(BlobNotFound):
            stor.service.hot.stat_now(SHA)
        return
    thread = await stor.thread_stat()
    assert thread.value.size == len(DATA) and thread.value.mtime_ns == MTIME
    loop = stor.loop_find()  # the near cache names the disk the thread found it on
    assert loop.how == "local" and loop.disk is thread.disk
    assert loop.value.stat == thread.value
    assert stor.service.hot.stat_now(SHA) == thread.value
    if state != "both copies":
        survivor = second if state == "first gone" else first
        assert thread.value.path == str(stor.copy(survivor))
