"""Load held (DESIGN.md §3 "Load"): stalled and crawling uploads never lock others out."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest

from stor.http import io
from stor.service import admission, upload
from tests.conftest import Storage, StorProcess, app_client
from tests.helpers import AUTH, sha256

pytestmark = pytest.mark.anyio

LARGE = os.urandom(admission.SMALL_BODY + 1)
"""A body large enough to need one of the worker's upload places."""


async def stalled_body(first: bytes, release: asyncio.Event) -> AsyncIterator[bytes]:
    """Some bytes, then nothing until `release` is set (then the connection goes away)."""
    yield first
    await release.wait()
    raise ConnectionResetError("the client went away")


async def status(http: httpx.AsyncClient) -> dict[str, object]:
    uploads: dict[str, object] = (await http.get("/status", params={"format": "json"})).json()["uploads"]
    return uploads


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting tmpfs needs root")
async def test_promised_bytes_steer_but_never_refuse(tmp_path: Path) -> None:
    """Uploads that promise most of a small pair and stall do not make stor refuse a small upload
    that fits (today's 507 'no room' while the disks had room)."""
    members = [tmp_path / "m1", tmp_path / "m2"]
    for member in members:
        member.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(member)], check=True)
    try:
        storage = Storage(tmp_path, [members])
        release = asyncio.Event()
        async with app_client(storage.config()) as http:
            promised = 40 * 1024 * 1024
            stalled = [
                asyncio.create_task(
                    http.post(
                        f"/{sha256(os.urandom(8))}",
                        content=stalled_body(b"x" * upload.SPOOL_BYTES, release),  # placed once a MiB came
                        auth=AUTH,
                        headers={"Content-Length": str(promised)},
                    )
                )
                for _ in range(2)  # 80 MiB promised on a 64 MiB pair
            ]
            for _ in range(100):
                if (await status(http))["in_flight"] == 2:
                    break
                await asyncio.sleep(0.02)
            assert (await status(http))["promised_bytes"] == 2 * promised
            small = os.urandom(4096)
            answer = await http.post(f"/{sha256(small)}", content=small, auth=AUTH)
            assert answer.status_code == 201, answer.text
            too_big = await http.post(
                f"/{sha256(b'y')}", content=b"y", auth=AUTH, headers={"Content-Length": str(100 << 20)}
            )
            assert too_big.status_code == 507  # more than the disks really hold: still 507
            release.set()
            for task in stalled:
                with pytest.raises((httpx.HTTPError, ConnectionResetError)):
                    await task
            for _ in range(100):
                if (await status(http))["in_flight"] == 0:
                    break
                await asyncio.sleep(0.02)
            assert (await status(http))["promised_bytes"] == 0
            assert storage.temps() == []
    finally:
        for member in members:
            subprocess.run(["umount", "-l", str(member)], check=False)


async def test_a_crawling_upload_is_cut_and_leaves_nothing(storage: Storage, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(io, "RATE_GRACE_SECONDS", 0.5)  # 20 s in production
    data = os.urandom(1 << 20)

    async def crawl() -> AsyncIterator[bytes]:
        for offset in range(0, len(data), 64):
            yield data[offset : offset + 64]
            await asyncio.sleep(0.1)  # 640 bytes/s, under the floor set below

    async with app_client(storage.config(min_upload_rate=10_000, body_idle_timeout=5)) as http:
        started = time.monotonic()
        answer = await http.post(
            f"/{sha256(data)}", content=crawl(), auth=AUTH, headers={"Content-Length": str(len(data))}
        )
        assert answer.status_code == 408 and "slower than" in answer.text
        assert time.monotonic() - started < 3  # cut once the grace is over, not at the idle timeout
        assert storage.temps() == [] and storage.copies(sha256(data)) == []
        uploads = await status(http)
        assert uploads["in_flight"] == 0 and uploads["promised_bytes"] == 0 and uploads["cut_for_rate"] == 1
        fast = await http.post(f"/{sha256(data)}", content=data, auth=AUTH)  # a fast one is fine
        assert fast.status_code == 201


async def test_an_upload_is_placed_only_once_its_first_mib_came(storage: Storage) -> None:
    """A client that sends its body without waiting for `100-continue` has its first MiB read
    before the lookup and the placement: stalled before that, it holds a place but no
    reservation and no temp. A blob taken down is refused all the same, with nothing left."""
    release = asyncio.Event()
    admin = ("admin", "admin-pass")
    async with app_client(storage.config(admin_auth=f"{admin[0]}:{admin[1]}")) as http:
        declared = str(upload.SPOOL_BYTES * 40)
        held = asyncio.create_task(
            http.post(
                f"/{sha256(b'a')}",
                content=stalled_body(LARGE, release),
                auth=AUTH,
                headers={"Content-Length": declared},
            )
        )
        for _ in range(200):
            if (uploads := await status(http))["in_flight"] == 1:
                break
            await asyncio.sleep(0.01)
        assert uploads["in_flight"] == 1 and uploads["promised_bytes"] == 0
        assert storage.temps() == []
        release.set()
        with pytest.raises((httpx.HTTPError, ConnectionResetError)):
            await held
        data = os.urandom(3 << 20)
        assert (await http.post(f"/{sha256(data)}", content=data, auth=AUTH)).status_code == 201
        down = await http.delete(f"/{sha256(data)}", auth=admin, headers={"X-Stor-Reason": "test"})
        assert down.status_code == 200, down.text
        again = await http.post(f"/{sha256(data)}", content=data, auth=AUTH)
        assert again.status_code == 410, again.text
        assert storage.temps() == [] and storage.copies(sha256(data)) == []


async def test_uploads_beyond_the_bound_get_503_and_retry_after(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(admission, "ADMIT_WAIT", 0.3)  # how long a new upload waits for a place: 1 s
    release = asyncio.Event()
    async with app_client(storage.config(max_uploads_in_flight=2, min_upload_rate=0)) as http:  # never stalled
        held = await hold(http, release, 2)
        read = False

        async def body() -> AsyncIterator[bytes]:
            nonlocal read
            read = True
            yield LARGE

        shed = await http.post(
            f"/{sha256(LARGE)}", content=body(), auth=AUTH, headers={"Content-Length": str(len(LARGE))}
        )
        assert shed.status_code == 503 and int(shed.headers["retry-after"]) >= 1
        assert not read  # answered before its body was read
        named = await http.put("/file", params={"path": "n"}, content=LARGE, auth=AUTH)
        assert named.status_code == 503  # named files count too
        assert (await http.get("/status")).status_code == 200  # reads and probes are not bounded
        release.set()
        for task in held:
            with pytest.raises((httpx.HTTPError, ConnectionResetError)):
                await task
        for _ in range(100):
            if (await status(http))["in_flight"] == 0:
                break
            await asyncio.sleep(0.02)
        uploads = await status(http)
        assert uploads["shed"] == 2 and uploads["in_flight"] == 0
        again = await http.post(f"/{sha256(b'z' * 10)}", content=b"z" * 10, auth=AUTH)
        assert again.status_code == 201  # recovered


async def hold(http: httpx.AsyncClient, release: asyncio.Event, count: int) -> list[asyncio.Task[httpx.Response]]:
    """`count` uploads that send one byte of the MiB they declare, then nothing until
    `release`; returned once the worker holds them all."""
    held = [
        asyncio.create_task(
            http.post(
                f"/{sha256(os.urandom(8))}",
                content=stalled_body(b"x", release),
                auth=AUTH,
                headers={"Content-Length": str(1 << 20)},
            )
        )
        for _ in range(count)
    ]
    for _ in range(200):
        if (await status(http))["in_flight"] == count:
            return held
        await asyncio.sleep(0.01)
    raise AssertionError(f"the worker never held {count} uploads: {await status(http)}")


async def test_stalled_uploads_do_not_hold_places(storage: Storage, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(admission, "STALL_AGE", 0.3)  # 0.5 s in production
    release = asyncio.Event()
    async with app_client(storage.config(max_uploads_in_flight=2, min_upload_rate=1000)) as http:
        held = await hold(http, release, 2)
        data = os.urandom(admission.SMALL_BODY + 1)  # large enough to need a place
        started = time.monotonic()
        early = await http.post(f"/{sha256(data)}", content=data, auth=AUTH)
        # both places were taken by uploads too young to judge: it waited until they were judged stalled
        assert early.status_code == 201 and time.monotonic() - started >= 0.25
        assert (await status(http))["stalled"] == 2
        for _ in range(3):  # the stalled ones do not count: fast uploads go through, again and again
            data = os.urandom(admission.SMALL_BODY + 1)
            assert (await http.post(f"/{sha256(data)}", content=data, auth=AUTH)).status_code == 201
        uploads = await status(http)
        assert uploads["in_flight"] == 2 and uploads["cut_for_room"] == 0  # the stalled are still there
        release.set()
        for task in held:
            with pytest.raises((httpx.HTTPError, ConnectionResetError)):
                await task


async def test_the_slowest_stalled_upload_is_cut_when_stalled_ones_fill_their_bound(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(admission, "STALL_AGE", 0.3)
    monkeypatch.setattr(admission, "STALLED_PER_PLACE", 1)  # 8 in production
    release = asyncio.Event()
    async with app_client(storage.config(max_uploads_in_flight=2, min_upload_rate=1000)) as http:
        held = await hold(http, release, 2)
        await asyncio.sleep(0.4)
        data = os.urandom(admission.SMALL_BODY + 1)  # needs a place
        answer = await http.post(f"/{sha256(data)}", content=data, auth=AUTH)
        assert answer.status_code == 201  # one stalled upload made room
        done, pending = await asyncio.wait(held, timeout=5, return_when=asyncio.FIRST_COMPLETED)
        assert len(done) == 1 and len(pending) == 1
        cut = done.pop().result()
        assert cut.status_code == 408 and "other uploads waited" in cut.text
        uploads = await status(http)
        assert uploads["cut_for_room"] == 1 and uploads["cut_for_rate"] == 1 and uploads["in_flight"] == 1
        assert storage.temps() == []  # the cut upload left nothing
        release.set()
        with pytest.raises((httpx.HTTPError, ConnectionResetError)):
            await pending.pop()


def test_a_thousand_idle_connections_starve_no_one(storage: Storage, start_stor: Callable[..., StorProcess]) -> None:
    path = storage.base / "config.json"
    path.write_text(json.dumps(storage.config()))
    server = start_stor("--config", str(path))
    data = os.urandom(4096)
    assert httpx.post(f"{server.url}/{sha256(data)}", content=data, auth=AUTH).status_code == 201
    host, port = "127.0.0.1", server.port
    idle: list[socket.socket] = []
    try:
        for n in range(1000):
            sock = socket.create_connection((host, port), timeout=5)
            if n % 3 == 0:
                sock.sendall(b"GET /" + sha256(data).encode() + b" HTTP/1.1\r\nHost: x\r\n")  # half a head
            elif n % 3 == 1:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # a keep-alive, then silence
            idle.append(sock)
        started = time.monotonic()
        for _ in range(20):
            with httpx.Client(timeout=5) as fresh:
                assert fresh.get(f"{server.url}/{sha256(data)}").content == data
                assert fresh.post(f"{server.url}/{sha256(os.urandom(9))}", content=b"q", auth=AUTH).status_code == 412
        assert time.monotonic() - started < 10
    finally:
        for sock in idle:
            sock.close()


async def test_a_burst_of_new_uploads_waits_for_places_instead_of_failing(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many uploads arriving at once, more than the places: those beyond wait (at most
    `ADMIT_WAIT`) for the first to finish, and all succeed; none is refused."""
    monkeypatch.setattr(admission, "ADMIT_WAIT", 5.0)
    blobs = [os.urandom(admission.SMALL_BODY + 1) for _ in range(12)]
    release = asyncio.Event()

    async def slow_start(data: bytes) -> AsyncIterator[bytes]:
        await release.wait()
        yield data

    async with app_client(storage.config(max_uploads_in_flight=2, min_upload_rate=0)) as http:
        uploads = [
            asyncio.create_task(
                http.post(
                    f"/{sha256(data)}", content=slow_start(data), auth=AUTH, headers={"Content-Length": str(len(data))}
                )
            )
            for data in blobs
        ]
        for _ in range(200):
            if (await status(http))["waiting"] == 10:
                break
            await asyncio.sleep(0.01)
        uploads_now = await status(http)
        assert uploads_now["in_flight"] == 2 and uploads_now["waiting"] == 10
        release.set()
        answers = await asyncio.gather(*uploads)
        assert [answer.status_code for answer in answers] == [201] * len(blobs)
        assert (await status(http))["shed"] == 0


async def test_small_uploads_never_wait_behind_uploads_too_young_to_judge(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Slow uploaders reconnecting all at once take every place while too young to judge; a
    small upload (at most what the server buffers for any connection) goes through at once,
    a large one still waits for a place and is shed."""
    monkeypatch.setattr(admission, "STALL_AGE", 60.0)  # never judged during the test
    monkeypatch.setattr(admission, "ADMIT_WAIT", 0.3)
    release = asyncio.Event()
    async with app_client(storage.config(max_uploads_in_flight=2, min_upload_rate=1000)) as http:
        held = await hold(http, release, 2)
        small = os.urandom(admission.SMALL_BODY)
        assert (await http.post(f"/{sha256(small)}", content=small, auth=AUTH)).status_code == 201
        named = await http.put("/file", params={"path": "small"}, content=small[:4096], auth=AUTH)
        assert named.status_code == 201
        large = await http.post(f"/{sha256(LARGE)}", content=LARGE, auth=AUTH)
        assert large.status_code == 503
        uploads = await status(http)
        assert uploads["in_flight"] == 2 and uploads["shed"] == 1
        release.set()
        for task in held:
            with pytest.raises((httpx.HTTPError, ConnectionResetError)):
                await task
