"""Archives for analysts: blobs in zips encrypted with the password `infected`, opened by the
tools analysts use (7-Zip, Info-ZIP unzip, Python's zipfile), streamed and verified."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import Storage, StorProcess, app_client
from tests.helpers import AUTH, corrupt, sha256

needs_7z = pytest.mark.skipif(shutil.which("7z") is None, reason="7z is not installed (make test installs p7zip-full)")


def open_zip(data: bytes, password: bytes = b"infected") -> zipfile.ZipFile:
    archive = zipfile.ZipFile(io.BytesIO(data))
    archive.setpassword(password)
    return archive


@pytest.mark.anyio
async def test_one_blob_in_a_zip_that_every_tool_opens(storage: Storage, tmp_path: Path) -> None:
    data = os.urandom(300_000)
    sha = sha256(data)
    async with app_client(storage.config()) as http:
        assert (await http.post(f"/{sha}", content=data, auth=AUTH)).status_code == 201
        answer = await http.get(f"/{sha}", params={"format": "zip"})
        assert answer.status_code == 200 and answer.headers["content-type"] == "application/zip"
        assert int(answer.headers["content-length"]) == len(answer.content)
        head = await http.head(f"/{sha}", params={"format": "zip"})
        assert head.headers["content-length"] == answer.headers["content-length"]
        assert (await http.get(f"/{sha256(b'absent')}", params={"format": "zip"})).status_code == 404
    archive = open_zip(answer.content)
    assert archive.namelist() == [sha] and archive.read(sha) == data
    with pytest.raises(RuntimeError, match="password"):
        open_zip(answer.content, b"wrong").read(sha)
    path = tmp_path / "sample.zip"
    path.write_bytes(answer.content)
    if shutil.which("7z"):
        out = tmp_path / "7z"
        done = subprocess.run(["7z", "x", "-pinfected", f"-o{out}", str(path)], capture_output=True, check=False)
        assert done.returncode == 0 and (out / sha).read_bytes() == data
        wrong = subprocess.run(
            ["7z", "x", "-pwrong", f"-o{tmp_path / 'w'}", str(path)], capture_output=True, check=False
        )
        assert wrong.returncode != 0
    if shutil.which("unzip"):
        out = tmp_path / "unzip"
        done = subprocess.run(["unzip", "-P", "infected", "-d", str(out), str(path)], capture_output=True, check=False)
        assert done.returncode == 0 and (out / sha).read_bytes() == data


@pytest.mark.anyio
async def test_many_blobs_and_a_manifest_of_the_rest(storage: Storage) -> None:
    blobs = [os.urandom(n) for n in (0, 10, 70_000, 1_500_000)]
    absent = sha256(b"never stored")
    async with app_client(storage.config(admin_auth="admin:admin-pass", archive_password="s3cret")) as http:
        for data in blobs:
            assert (await http.post(f"/{sha256(data)}", content=data, auth=AUTH)).status_code == 201
        gone = os.urandom(99)
        assert (await http.post(f"/{sha256(gone)}", content=gone, auth=AUTH)).status_code == 201
        taken = await http.delete(f"/{sha256(gone)}", auth=("admin", "admin-pass"), headers={"X-Stor-Reason": "x"})
        assert taken.status_code == 200
        asked = [sha256(d) for d in blobs] + [absent, sha256(gone), sha256(blobs[0])]
        answer = await http.post("/archive", json=asked)
        assert answer.status_code == 200, answer.text
    archive = open_zip(answer.content, b"s3cret")
    assert sorted(archive.namelist()) == sorted([sha256(d) for d in blobs] + ["manifest.json"])
    for data in blobs:
        assert archive.read(sha256(data)) == data
    manifest = json.loads(archive.read("manifest.json"))
    assert manifest["absent"] == [absent] and manifest["taken_down"] == [sha256(gone)]
    assert [f["size"] for f in manifest["files"]] == [len(d) for d in blobs]


@pytest.mark.anyio
async def test_bad_archive_requests(storage: Storage) -> None:
    async with app_client(storage.config(archive_max_blobs=3, read_auth="reader:reader-pass")) as http:
        three = [sha256(bytes([n])) for n in range(3)]
        assert (await http.post("/archive", json=three)).status_code == 401  # read credentials first
        reader = ("reader", "reader-pass")
        assert (await http.post("/archive", json=three, auth=reader)).status_code == 200
        too_many = await http.post("/archive", json=[*three, sha256(b"4")], auth=reader)
        assert too_many.status_code == 400 and "archive_max_blobs" in too_many.text
        bad = await http.post("/archive", json=[three[0], "nope"], auth=reader)
        assert bad.status_code == 400 and "entry 1" in bad.text
        for body in (b"not json", b'{"a": 1}'):
            assert (await http.post("/archive", content=body, auth=reader)).status_code == 400
        assert (await http.get(f"/{three[0]}", params={"format": "zip"})).status_code == 401


@pytest.mark.anyio
async def test_a_corrupt_copy_is_never_zipped(storage: Storage) -> None:
    data = os.urandom(2 * 1024 * 1024)  # checked whole before the first byte: answered from the partner
    sha = sha256(data)
    async with app_client(storage.config()) as http:
        assert (await http.post(f"/{sha}", content=data, auth=AUTH)).status_code == 201
        for copy in storage.copies(sha)[:1]:
            corrupt(copy, 1000)
        answer = await http.get(f"/{sha}", params={"format": "zip"})
    assert open_zip(answer.content).read(sha) == data


def test_a_client_that_goes_away_mid_archive_frees_everything(
    storage: Storage, start_stor: Callable[..., StorProcess]
) -> None:
    path = storage.base / "config.json"
    path.write_text(json.dumps(storage.config()))
    server = start_stor("--config", str(path), "--workers", "1")
    blobs = [os.urandom(3 * 1024 * 1024) for _ in range(3)]
    for data in blobs:
        assert httpx.post(f"{server.url}/{sha256(data)}", content=data, auth=AUTH).status_code == 201
    children = subprocess.run(["pgrep", "-P", str(server.proc.pid)], capture_output=True, text=True).stdout.split()
    worker = int(children[0]) if children else server.proc.pid  # one worker: the process itself

    def blob_fds() -> int:
        count = 0
        for fd in os.listdir(f"/proc/{worker}/fd"):
            with contextlib.suppress(FileNotFoundError):  # closed between the listing and the look
                count += os.readlink(f"/proc/{worker}/fd/{fd}").endswith(".dat")
        return count

    for data in blobs:  # each copy's stat kept open (the hot path's cache, not a leak)
        assert httpx.head(f"{server.url}/{sha256(data)}").status_code == 200
    before = blob_fds()
    with httpx.stream("POST", f"{server.url}/archive", json=[sha256(d) for d in blobs], timeout=30) as response:
        assert response.status_code == 200
        next(response.iter_bytes(64 * 1024))  # some of it, then gone
    for _ in range(100):
        if blob_fds() <= before:
            break
        time.sleep(0.05)
    assert blob_fds() <= before
    assert storage.temps() == []
    assert httpx.get(f"{server.url}/{sha256(blobs[0])}").content == blobs[0]  # the worker serves on
