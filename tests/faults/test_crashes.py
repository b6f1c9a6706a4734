"""Crashes at the worst moments, and failed syscalls: a SIGKILL mid-upload, between the two
copies and between a link and its directory fsync; fsync and link failing (strace); power loss
right after a 201 (a copy of the ext4 image, mounted)."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.conftest import Storage, StorProcess
from tests.faults.conftest import Mounts, Servers, fault_config, post, run
from tests.faults.invariants import Ledger, check_invariants
from tests.helpers import AUTH_HEADER, layout_path, sha256, wait_for

MiB = 1024 * 1024
Build = Callable[[list[list[Path]]], Storage]


def start_upload(server: StorProcess, data: bytes, sent: int) -> socket.socket:
    """A POST whose body stops after `sent` bytes (the socket stays open)."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    head = (
        f"POST /{sha256(data)} HTTP/1.1\r\nHost: stor\r\nAuthorization: {AUTH_HEADER}\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    sock.sendall(head.encode() + data[:sent])
    return sock


@contextmanager
def strace(server: StorProcess, *injections: str) -> Iterator[subprocess.Popen[bytes]]:
    """strace attached to the running server (every thread), injecting faults; detached after.

    When an injected SIGKILL ends the server, strace is killed too: a killed tracee's threads
    are only reaped once their tracer lets go, and strace may not notice by itself."""
    command = ["strace", "-f", "-qq", "-o", "/dev/null", "-p", str(server.proc.pid)]
    for injection in injections:
        command += ["-e", f"inject={injection}"]
    tracer = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    tasks = Path(f"/proc/{server.proc.pid}/task")

    def attached() -> bool:
        try:
            return all("TracerPid:\t0" not in (task / "status").read_text() for task in tasks.iterdir())
        except OSError:
            return False

    def dead() -> bool:
        try:
            return "State:\tZ" in Path(f"/proc/{server.proc.pid}/status").read_text()
        except OSError:
            return True

    done = threading.Event()

    def reap_when_dead() -> None:
        while not done.wait(0.02):
            if dead():
                tracer.kill()
                return

    assert wait_for(attached), "strace did not attach"
    watcher = threading.Thread(target=reap_when_dead, daemon=True)
    watcher.start()
    try:
        yield tracer
    finally:
        done.set()
        watcher.join()
        if tracer.poll() is None:
            tracer.terminate()
        try:
            tracer.wait(timeout=3)
        except subprocess.TimeoutExpired:
            tracer.kill()
            tracer.wait()


def quiet_config(storage: Storage) -> Path:
    """No periodic health probes, so the syscalls counted by strace are the upload's own."""
    return fault_config(storage, health_check_interval=3600)


def test_sigkill_mid_upload_leaves_no_final_file_and_a_restart_sweeps_the_temps(
    mounts: Mounts, servers: Servers, build: Build, ledger: Ledger
) -> None:
    storage = build([[mounts.tmpfs("a1"), mounts.tmpfs("a2")]])
    config = fault_config(storage)
    server = servers.start(config)
    for size in (4096, 300_000):
        assert post(server, os.urandom(size), ledger).status_code == 201
    data = os.urandom(4 * MiB)
    sock = start_upload(server, data, 2 * MiB)
    assert wait_for(lambda: len(storage.temps()) == 2)

    servers.kill9(server)
    sock.close()
    assert storage.copies(sha256(data)) == []
    restarted = servers.start(config)
    assert storage.temps() == []
    for sha, blob in ledger.acked.items():
        assert httpx.get(f"{restarted.url}/{sha}").content == blob
    assert post(restarted, data, ledger).status_code == 201


@pytest.mark.usefixtures("need_strace")
@pytest.mark.parametrize(
    ("kind", "injection", "before_any_link"),
    [
        ("tmpfs", "link,linkat:signal=SIGKILL:when=2", False),  # the first copy is in place, the second not yet
        ("tmpfs", "fsync:signal=SIGKILL:when=3", False),  # the first copy is linked, its directory not yet synced
        ("tmpfs", "fsync:signal=SIGKILL:when=2", True),  # both temps written, one synced
        # group-committed on ext4: each commit thread's first syncfs (no name yet), then its second
        ("ext4", "syncfs:signal=SIGKILL:when=1", True),
        ("ext4", "syncfs:signal=SIGKILL:when=2", False),
    ],
)
def test_sigkill_between_the_steps_of_a_write_leaves_valid_blobs_or_nothing(
    kind: str, injection: str, before_any_link: bool, mounts: Mounts, servers: Servers, build: Build, ledger: Ledger
) -> None:
    mount = mounts.tmpfs if kind == "tmpfs" else mounts.ext4
    storage = build([[mount("a1"), mount("a2")]])
    config = quiet_config(storage)
    server = servers.start(config)
    assert post(server, os.urandom(4096), ledger).status_code == 201
    data = os.urandom(100_000 if kind == "tmpfs" else 4096)
    sha = sha256(data)
    with strace(server, injection):
        with pytest.raises(httpx.TransportError):
            httpx.post(f"{server.url}/{sha}", content=data, headers={"Authorization": AUTH_HEADER}, timeout=20)
    assert server.proc.wait(timeout=10) != 0
    servers.kill9(server)

    assert check_invariants(Ledger(pairs=ledger.pairs, acked=ledger.acked)) == []  # each copy valid or absent
    if before_any_link:
        assert storage.copies(sha) == []
    restarted = servers.start(config)
    assert storage.temps() == []
    got = httpx.get(f"{restarted.url}/{sha}")
    if got.status_code == 200:  # one copy survived: it is served, and healed onto its partner
        assert got.content == data
        assert wait_for(lambda: len(storage.copies(sha)) == 2)
    else:
        assert got.status_code == 404
    assert post(restarted, data, ledger).status_code in (200, 201)


@pytest.mark.usefixtures("need_strace")
@pytest.mark.parametrize(
    ("kind", "injection", "before_any_link"),
    [
        ("tmpfs", "fsync:error=EIO:when=1", True),  # the first temp's fsync: stor must not retry it and succeed
        ("tmpfs", "fsync:error=EIO:when=3", False),  # the directory fsync after the first link
        ("tmpfs", "link,linkat:error=EIO:when=1", True),
        ("tmpfs", "link,linkat:error=EIO:when=2", False),
        # On ext4 small uploads are group-committed. strace counts calls per thread, and each
        # filesystem's commit thread calls syncfs once per phase of an upload: when=1 is the
        # first phase (the data), when=2 the second (the names, linked already).
        ("ext4", "syncfs:error=EIO:when=1", True),
        ("ext4", "syncfs:error=EIO:when=2", False),
        ("ext4", "sync_file_range:error=EIO:when=1", True),  # a copy's own writeback reported failed
    ],
)
def test_a_failed_sync_or_link_is_never_acknowledged(
    kind: str, injection: str, before_any_link: bool, mounts: Mounts, servers: Servers, build: Build, ledger: Ledger
) -> None:
    mount = mounts.tmpfs if kind == "tmpfs" else mounts.ext4
    storage = build([[mount("a1"), mount("a2")]])
    server = servers.start(quiet_config(storage))
    data = os.urandom(100_000 if kind == "tmpfs" else 4096)
    sha = sha256(data)
    with strace(server, injection):
        response = httpx.post(f"{server.url}/{sha}", content=data, headers={"Authorization": AUTH_HEADER}, timeout=20)
    assert response.status_code == 503, response.text
    assert storage.temps() == []
    if before_any_link:
        assert storage.copies(sha) == []
    assert post(server, data, ledger).status_code in (200, 201)  # a retry by the client works


def test_every_acknowledged_blob_survives_power_loss(
    mounts: Mounts, servers: Servers, build: Build, ledger: Ledger
) -> None:
    members = [mounts.ext4("a1"), mounts.ext4("a2")]
    storage = build([members])
    server = servers.start(fault_config(storage))
    for n in range(12):
        data = os.urandom(4096 if n % 3 else 700_000)
        assert post(server, data, ledger).status_code == 201
    assert_acknowledged_survive_power_loss(mounts, members, ledger)


def assert_acknowledged_survive_power_loss(mounts: Mounts, members: list[Path], ledger: Ledger) -> None:
    """The power goes off now: copies of the members' ext4 images, taken at once, are
    mounted (replaying their journals) and must hold every acknowledged blob, whole."""
    snapshots = [mounts.base / f"snap-{member.name}.img" for member in members]
    for member, snapshot in zip(members, snapshots, strict=True):
        run("cp", "--sparse=always", str(mounts.image_of(member)), str(snapshot))
    for snapshot in snapshots:
        mountpoint = mounts.base / f"after-{snapshot.stem}"
        mountpoint.mkdir()
        run("mount", "-o", "loop", str(snapshot), str(mountpoint))
        mounts.mounted.append(mountpoint)
        for sha, data in ledger.acked.items():
            copy = layout_path(mountpoint, sha)
            assert copy.is_file(), f"acknowledged {sha} is missing after power loss"
            assert copy.read_bytes() == data


def test_every_acknowledged_blob_of_concurrent_uploads_survives_power_loss(
    mounts: Mounts, servers: Servers, build: Build, ledger: Ledger
) -> None:
    """Many uploads at once, so they share group commits; then the power goes off."""
    members = [mounts.ext4("a1"), mounts.ext4("a2")]
    storage = build([members])
    server = servers.start(fault_config(storage))
    blobs = [os.urandom(4096 if n % 8 else 1_200_000) for n in range(48)]
    codes: list[int] = []

    def upload(part: list[bytes]) -> None:
        with httpx.Client(timeout=30) as http:
            for data in part:
                response = http.post(
                    f"{server.url}/{sha256(data)}", content=data, headers={"Authorization": AUTH_HEADER}
                )
                codes.append(response.status_code)
                if response.status_code == 201:
                    ledger.acked[sha256(data)] = data

    threads = [threading.Thread(target=upload, args=(blobs[n::12],)) for n in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert codes == [201] * len(blobs)
    commits = httpx.get(f"{server.url}/status?format=json").json()["group_commit"]
    assert any(c["largest"] > 2 for c in commits.values())  # uploads did share cycles
    assert_acknowledged_survive_power_loss(mounts, members, ledger)
