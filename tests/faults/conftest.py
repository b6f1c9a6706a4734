"""The reliability harness: real mounts to break, servers to kill, and the invariant checker.

Tests that mount need root and a private mount namespace (`make test` and `make test-faults`
run pytest through `scripts/private-mounts.sh`), so no mount outlives the suite; elsewhere
they skip with the reason. After every test here the invariant checker stops the servers,
lifts every fault, sweeps temps like a restart would, and walks each storage root.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from stor.backends.disk import Disk
from tests.conftest import Storage, StorProcess
from tests.faults.invariants import Ledger, check_invariants
from tests.helpers import AUTH, layout_path, sha256

ROOT_DIR = Path(__file__).resolve().parents[2]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.path).parents:
            item.add_marker(pytest.mark.faults)


def _private_mounts() -> str | None:
    """Why mount tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root to mount filesystems"
    with open("/proc/self/mountinfo") as info:
        for line in info:
            fields = line.split()
            if fields[4] == "/" and any(f.startswith("shared:") for f in fields[6 : fields.index("-")]):
                return "needs a private mount namespace: run through `make test` or `make test-faults`"
    return None


def run(*command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, check=check, capture_output=True, text=True, timeout=30)


class FuseDisk:
    """A faultfs mount: a passthrough of `source` whose mode `set` switches."""

    def __init__(self, mountpoint: Path, source: Path) -> None:
        self.path = mountpoint
        self.source = source
        self.control = source.parent / f"{mountpoint.name}.mode"
        self.set("ok")
        self.log = (source.parent / f"{mountpoint.name}.faultfs.log").open("ab")
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.faults.faultfs", str(self.source), str(self.path), str(self.control)],
            cwd=ROOT_DIR,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 10
        while not self._mounted():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"faultfs did not mount {self.path}")
            time.sleep(0.02)

    def _mounted(self) -> bool:
        with open("/proc/self/mountinfo") as info:
            return any(line.split()[4] == str(self.path) and " - fuse" in line for line in info)

    def restart(self) -> None:
        """After `kill`: the dead mount is detached and a new daemon serves the same files."""
        run("umount", "-l", str(self.path))
        self.start()

    def set(self, mode: str) -> None:
        tmp = self.control.with_suffix(".new")
        tmp.write_text(mode)
        tmp.rename(self.control)

    def kill(self) -> None:
        """The daemon dies: the mount stays, and every use of it fails (ENOTCONN)."""
        self.proc.kill()
        self.proc.wait()


class Mounts:
    """Filesystems mounted for one test, all unmounted (lazily if busy) at its end."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.mounted: list[Path] = []
        self.fuses: list[FuseDisk] = []
        self.readonly: list[Path] = []

    def _mountpoint(self, name: str) -> Path:
        path = self.base / name
        path.mkdir(parents=True)
        return path

    def tmpfs(self, name: str, size: str = "64m", inodes: int | None = None) -> Path:
        path = self._mountpoint(name)
        options = f"size={size}" + (f",nr_inodes={inodes}" if inodes else "")
        run("mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path))
        self.mounted.append(path)
        return path

    def ext4(self, name: str, size_mb: int = 64) -> Path:
        path = self._mountpoint(name)
        image = self.image_of(path)
        with image.open("wb") as f:
            f.truncate(size_mb * 1024 * 1024)
        run("mkfs.ext4", "-q", "-F", str(image))
        run("mount", "-o", "loop", str(image), str(path))
        self.mounted.append(path)
        return path

    def image_of(self, path: Path) -> Path:
        return self.base / f"{path.name}.img"

    def fuse(self, name: str) -> FuseDisk:
        source = self.base / f"{name}.source"
        source.mkdir(parents=True)
        disk = FuseDisk(self._mountpoint(name), source)
        self.fuses.append(disk)
        self.mounted.append(disk.path)
        return disk

    def remount(self, path: Path, mode: str) -> None:
        run("mount", "-o", f"remount,{mode}", str(path))
        if mode == "ro":
            self.readonly.append(path)
        elif path in self.readonly:
            self.readonly.remove(path)

    def lift_faults(self) -> None:
        """Every fault off, so the checker can read what the test left behind."""
        for fuse in self.fuses:
            fuse.set("ok")
        for path in list(self.readonly):
            self.remount(path, "rw")

    def cleanup(self) -> None:
        for fuse in self.fuses:
            fuse.set("ok")
            if fuse.proc.poll() is None:
                fuse.proc.terminate()
        for path in reversed(self.mounted):
            run("umount", "-l", str(path), check=False)
        for fuse in self.fuses:
            try:
                fuse.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                fuse.proc.kill()
                fuse.proc.wait()
            fuse.log.close()


@pytest.fixture
def mounts(tmp_path: Path, servers: Servers, ledger: Ledger) -> Iterator[Mounts]:
    """Mounts for the test. At its end: servers stopped, faults lifted, invariants checked,
    then everything unmounted."""
    reason = _private_mounts()
    if reason:
        pytest.skip(reason)
    found = Mounts(tmp_path / "mnt")
    try:
        yield found
        found.lift_faults()  # first: a server blocked on a hung disk cannot even be killed
        servers.stop_all()
        verify(ledger)
    finally:
        found.cleanup()


@pytest.fixture
def need_fuse() -> None:
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        pytest.skip("needs /dev/fuse and fuse3 (fusermount3)")


@pytest.fixture
def need_strace() -> None:
    if shutil.which("strace") is None:
        pytest.skip("needs strace")


class Servers:
    """`stor serve` processes of one test: started, killed and restarted on purpose."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.running: list[StorProcess] = []

    def start(self, config: Path, *args: str, wrapper: list[str] | None = None) -> StorProcess:
        server = StorProcess(["--config", str(config), *args], self.base, wrapper=wrapper)
        self.running.append(server)
        return server

    def kill9(self, server: StorProcess) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait()
        server.stop()

    def stop_all(self) -> None:
        for server in self.running:
            server.stop()


@pytest.fixture
def ledger() -> Ledger:
    return Ledger()


@pytest.fixture
def servers(tmp_path: Path, ledger: Ledger) -> Iterator[Servers]:
    """Servers for the test; at its end they are stopped and the invariants checked."""
    found = Servers(tmp_path)
    try:
        yield found
        found.stop_all()
        verify(ledger)
    finally:
        found.stop_all()


def verify(ledger: Ledger) -> None:
    """The invariant checker, once per test (see `invariants`)."""
    if ledger.checked:
        return
    ledger.checked = True
    problems = check_invariants(ledger)
    assert not problems, "invariants broken:\n" + "\n".join(problems)


def fault_config(storage: Storage, **overrides: Any) -> Path:
    settings: dict[str, Any] = {
        "check_mountpoints": True,
        "health_check_interval": 0.2,
        "status_timeout": 1.0,
        "body_idle_timeout": 2.0,
    }
    settings.update(overrides)
    return storage.write_config(**settings)


def post(server: StorProcess, data: bytes, ledger: Ledger, **kwargs: Any) -> httpx.Response:
    """POST a blob; a 201 goes into the ledger, which the invariant checker holds us to."""
    sha = sha256(data)
    response = httpx.post(f"{server.url}/{sha}", content=data, auth=AUTH, timeout=kwargs.pop("timeout", 20), **kwargs)
    if response.status_code == 201:
        ledger.acked[sha] = data
    return response


def reads_back(server: StorProcess, blobs: list[bytes]) -> None:
    for data in blobs:
        got = httpx.get(f"{server.url}/{sha256(data)}", timeout=20)
        assert got.status_code == 200 and got.content == data


def writes_land_on(server: StorProcess, ledger: Ledger, pair: list[Path], count: int, storage: Storage | None) -> None:
    """`count` new uploads all succeed, with both copies on `pair` (and, given `storage`, nowhere
    else: without it, other members are not looked at, for when one cannot be read at all)."""
    for _ in range(count):
        data = os.urandom(4096)
        sha = sha256(data)
        assert post(server, data, ledger).status_code == 201
        assert all(layout_path(member, sha).exists() for member in pair)
        if storage is not None:
            assert set(storage.copies(sha)) == {layout_path(member, sha) for member in pair}


def sweep(roots: list[Path]) -> None:
    """What a restart does to temps: remove those of processes that are gone."""
    for root in roots:
        disk = Disk(str(root), require_mount=False)
        if os.path.isdir(disk.tmp_root):
            disk.sweep_temps()


@pytest.fixture
def build(tmp_path: Path, ledger: Ledger) -> Callable[[list[list[Path]]], Storage]:
    """A Storage over the given members, registered with the invariant checker."""

    def make(pairs: list[list[Path]]) -> Storage:
        ledger.pairs = pairs
        return Storage(tmp_path, pairs)

    return make


def status(server: StorProcess) -> httpx.Response:
    return httpx.get(f"{server.url}/status?format=json", timeout=5)
