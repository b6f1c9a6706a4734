"""The S3 mirror and fallback, against a real S3 endpoint (moto in server mode)."""

from __future__ import annotations

import asyncio
import inspect
import os
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import Storage, StorProcess, app_client
from tests.helpers import AUTH, sha256
from tests.services import MotoS3, free_port, s3_config

DATA = os.urandom(5000)
SHA = sha256(DATA)


async def eventually(check: Callable[[], object], timeout: float = 15.0) -> None:
    """Poll `check` (sync or async) until it is true."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def backlog_is(http: httpx.AsyncClient, expected: int) -> bool:
    return int((await http.get("/status?format=json")).json()["s3"]["backlog"]) == expected


def wait_for(check: Callable[[], object], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


@pytest.mark.anyio
async def test_a_stored_blob_is_mirrored_with_identical_bytes(storage: Storage, s3: MotoS3) -> None:
    async with app_client(storage.config(**s3.config())) as http:
        assert (await http.post(f"/{SHA}", content=DATA, auth=AUTH)).status_code == 201
        await eventually(lambda: s3.object(SHA) is not None)
        assert s3.object(SHA) == DATA
        await eventually(lambda: not list(storage.base.rglob(f".stor-s3-queue/**/{SHA}")))  # the marker goes
        await eventually(lambda: backlog_is(http, 0))
        detail = (await http.get("/status?format=json")).json()
        assert detail["s3"]["enabled"] is True and detail["s3"]["reachable"] is True
        assert 'stor_s3_requests_total{operation="put",result="ok"} 1.0' in (await http.get("/metrics")).text


@pytest.mark.anyio
async def test_reads_fall_back_to_s3_and_refill_the_disks(storage: Storage, s3: MotoS3) -> None:
    async with app_client(storage.config(**s3.config())) as http:
        assert (await http.post(f"/{SHA}", content=DATA, auth=AUTH)).status_code == 201
        await eventually(lambda: s3.object(SHA) is not None)
        for copy in storage.copies(SHA):
            copy.unlink()
        head = await http.head(f"/{SHA}")
        assert head.status_code == 200 and head.headers["content-length"] == str(len(DATA))
        response = await http.get(f"/{SHA}")
        assert response.status_code == 200 and response.content == DATA
        assert response.headers["etag"] == f'"{SHA}"'
        await eventually(lambda: len(storage.copies(SHA)) == 2)  # s3_fill_local
        assert {c.read_bytes() for c in storage.copies(SHA)} == {DATA}


@pytest.mark.anyio
async def test_a_large_blob_streams_from_s3_verified(storage: Storage, s3: MotoS3) -> None:
    big = os.urandom(6 * 1024 * 1024 + 11)
    sha = sha256(big)
    s3.put_raw(sha, big)
    async with app_client(storage.config(**s3.config(s3_fill_local=False))) as http:
        response = await http.get(f"/{sha}")
        assert response.status_code == 200 and response.content == big
        ranged = await http.get(f"/{sha}", headers={"Range": "bytes=5000000-5000099"})
        assert ranged.status_code == 206 and ranged.content == big[5000000:5000100]


@pytest.mark.anyio
async def test_a_corrupt_s3_object_is_never_a_200(storage: Storage, s3: MotoS3) -> None:
    s3.put_raw(SHA, b"not the right bytes at all")
    async with app_client(storage.config(**s3.config())) as http:
        response = await http.get(f"/{SHA}")
        assert response.status_code == 503
        assert "corrupt" in response.text
        assert 'stor_integrity_events_total{event="s3_corrupt"} 1.0' in (await http.get("/metrics")).text
    assert storage.copies(SHA) == []  # nothing corrupt was written back


def test_a_corrupt_large_s3_object_breaks_the_transfer(
    storage: Storage, s3: MotoS3, start_stor: Callable[..., StorProcess]
) -> None:
    good = os.urandom(5 * 1024 * 1024)
    sha = sha256(good)
    bad = bytearray(good)
    bad[-1] ^= 0xFF  # same size, last byte flipped: only the full hash can tell
    s3.put_raw(sha, bytes(bad))
    server = start_stor("--config", str(storage.write_config(**s3.config())))
    received = b""
    with pytest.raises(httpx.HTTPError), httpx.stream("GET", f"{server.url}/{sha}", timeout=30) as response:
        assert response.status_code == 200  # headers go out before the hash is known
        for chunk in response.iter_raw():
            received += chunk
    assert len(received) < len(good)  # the client never got a complete body
    assert storage.copies(sha) == []


@pytest.mark.anyio
async def test_absent_everywhere_is_404(storage: Storage, s3: MotoS3) -> None:
    async with app_client(storage.config(**s3.config())) as http:
        assert (await http.get(f"/{SHA}")).status_code == 404
        assert (await http.head(f"/{SHA}")).status_code == 404


@pytest.mark.anyio
async def test_s3_unreachable_is_503_not_404_and_writes_go_on(storage: Storage) -> None:
    async with app_client(storage.config(**s3_config(free_port()))) as http:  # nothing listens there
        response = await http.get(f"/{SHA}")
        assert response.status_code == 503 and "S3" in response.text
        assert (await http.post(f"/{SHA}", content=DATA, auth=AUTH)).status_code == 201  # never waits on S3
        assert (await http.get(f"/{SHA}")).content == DATA

        async def status() -> dict[str, object]:
            detail = (await http.get("/status?format=json")).json()
            assert detail["ok"] is True  # S3 trouble alone keeps the node in the load balancer
            s3_detail: dict[str, object] = detail["s3"]
            return s3_detail

        deadline = time.monotonic() + 10
        while (current := await status())["backlog"] != 1 or current["reachable"] is not False:
            assert time.monotonic() < deadline, current
            await asyncio.sleep(0.1)
        assert current["last_error"]


def test_s3_down_during_post_is_mirrored_after_recovery_and_restart(
    storage: Storage, tmp_path: Path, start_stor: Callable[..., StorProcess]
) -> None:
    moto = MotoS3(tmp_path)
    moto.reset()
    config = storage.write_config(**moto.config())
    server = start_stor("--config", str(config))
    moto.kill()
    blobs = [os.urandom(3000 + n) for n in range(3)]
    for blob in blobs:
        started = time.monotonic()
        assert httpx.post(f"{server.url}/{sha256(blob)}", content=blob, auth=AUTH, timeout=10).status_code == 201
        assert time.monotonic() - started < 2  # did not wait for S3's timeouts
    wait_for(lambda: httpx.get(f"{server.url}/status?format=json").json()["s3"]["backlog"] == 3)
    server.stop()
    revived = MotoS3(tmp_path, port=moto.port)
    revived.reset()
    try:
        again = start_stor("--config", str(config))
        wait_for(lambda: all(revived.object(sha256(b)) == b for b in blobs))
        wait_for(lambda: httpx.get(f"{again.url}/status?format=json").json()["s3"]["backlog"] == 0)
    finally:
        revived.kill()


@pytest.mark.anyio
async def test_sync_writes_wait_for_s3(storage: Storage, s3: MotoS3) -> None:
    async with app_client(storage.config(**s3.config(s3_sync_writes=True))) as http:
        assert (await http.post(f"/{SHA}", content=DATA, auth=AUTH)).status_code == 201
        assert s3.object(SHA) == DATA  # already there when the 201 arrived


@pytest.mark.anyio
async def test_bad_s3_credentials_are_reported_and_the_queue_holds(storage: Storage, tmp_path: Path) -> None:
    strict = MotoS3(tmp_path, check_credentials=True)
    try:
        async with app_client(storage.config(**strict.config())) as http:
            assert (await http.post(f"/{SHA}", content=DATA, auth=AUTH)).status_code == 201

            async def reported() -> bool:
                s3_detail = (await http.get("/status?format=json")).json()["s3"]
                return bool(s3_detail["reachable"] is False and s3_detail["backlog"] == 1 and s3_detail["last_error"])

            await eventually(reported)
            error = (await http.get("/status?format=json")).json()["s3"]["last_error"]
            assert "InvalidAccessKeyId" in error or "403" in error
            assert "test-secret" not in error
    finally:
        strict.kill()
