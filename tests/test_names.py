"""Named files (the sfss API) against a real server."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Storage, StorProcess
from tests.helpers import AUTH, PASSWORD, USER, name_record, sha256


@pytest.fixture
def http(server: StorProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def test_create_read_replace_delete(http: httpx.Client, storage: Storage) -> None:
    data = b"hello named world"
    created = http.post("/files", params={"path": "docs/hello.txt"}, content=data, auth=AUTH)
    assert created.status_code == 201
    assert created.json() == {"path": "docs/hello.txt", "sha": sha256(data), "size": len(data)}
    assert len(storage.copies(sha256(data))) == 2  # an ordinary, mirrored blob
    again = http.post("/files", params={"path": "docs/hello.txt"}, content=b"other", auth=AUTH)
    assert again.status_code == 409
    got = http.get("/file", params={"path": "docs/hello.txt"})
    assert got.status_code == 200 and got.content == data
    assert got.headers["content-type"].startswith("text/plain")
    assert got.headers["etag"] == f'"{sha256(data)}"'
    head = http.head("/file", params={"path": "docs/hello.txt"})
    assert head.status_code == 200 and head.headers["content-length"] == str(len(data)) and head.content == b""
    assert http.get("/file", params={"path": "docs/hello.txt"}, headers={"Range": "bytes=0-4"}).content == b"hello"
    assert (
        http.get("/file", params={"path": "docs/hello.txt"}, headers={"If-None-Match": got.headers["etag"]}).status_code
        == 304
    )
    replaced = http.put("/file", params={"path": "docs/hello.txt"}, content=b"v2", auth=AUTH)
    assert replaced.status_code == 200
    assert http.get("/file", params={"path": "docs/hello.txt"}).content == b"v2"
    assert storage.copies(sha256(data))  # the old blob stays: blobs are immutable and shared
    assert http.put("/file", params={"path": "new.bin"}, content=b"x", auth=AUTH).status_code == 201
    assert http.get("/file", params={"path": "new.bin"}).headers["content-type"] == "application/octet-stream"
    assert http.delete("/file", params={"path": "docs/hello.txt"}, auth=AUTH).status_code == 204
    gone = http.get("/file", params={"path": "docs/hello.txt"})
    assert gone.status_code == 404 and gone.text == "no file named 'docs/hello.txt'\n"
    assert http.delete("/file", params={"path": "docs/hello.txt"}, auth=AUTH).status_code == 404
    assert storage.copies(sha256(b"v2"))  # deleting a name keeps its blob


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_multipart_upload_as_curl_sends_it(server: StorProcess, tmp_path: Path) -> None:
    source = tmp_path / "photo.png"
    source.write_bytes(os.urandom(300_000))
    result = subprocess.run(
        ["curl", "-s", "-u", f"{USER}:{PASSWORD}", "-F", f"upload_file=@{source}", "-X", "POST",
         f"{server.url}/files?path=pics/photo.png"],
        capture_output=True, timeout=30,
    )  # fmt: skip
    assert json.loads(result.stdout)["sha"] == sha256(source.read_bytes())
    got = httpx.get(f"{server.url}/file", params={"path": "pics/photo.png"})
    assert got.content == source.read_bytes() and got.headers["content-type"] == "image/png"


def test_multipart_without_upload_file_is_400(http: httpx.Client, storage: Storage) -> None:
    response = http.post("/files", params={"path": "x"}, files={"other": ("f", b"data")}, auth=AUTH)
    assert response.status_code == 400 and "upload_file" in response.text
    assert http.get("/file", params={"path": "x"}).status_code == 404
    assert storage.temps() == []


def test_multipart_with_httpx_files(http: httpx.Client) -> None:
    response = http.put("/file", params={"path": "a b/ü.json"}, files={"upload_file": ("f", b'{"k": 1}')}, auth=AUTH)
    assert response.status_code == 201
    got = http.get("/file", params={"path": "a b/ü.json"})
    assert got.content == b'{"k": 1}' and got.headers["content-type"] == "application/json"


@pytest.mark.parametrize(
    ("path", "words"),
    [
        (None, "required"),
        ("", "required"),
        ("../etc/passwd", "'..'"),
        ("a/../b", "'..'"),
        ("/abs", "start with '/'"),
        ("a\x00b", "NUL"),
        ("x" * 1025, "1024 bytes"),
        ("é" * 513, "1024 bytes"),
    ],
)
def test_bad_names_are_400(http: httpx.Client, storage: Storage, path: str | None, words: str) -> None:
    params = {} if path is None else {"path": path}
    for response in (
        http.put("/file", params=params, content=b"data", auth=AUTH),
        http.post("/files", params=params, content=b"data", auth=AUTH),
        http.get("/file", params=params),
    ):
        assert response.status_code == 400 and words in response.text
    assert storage.temps() == []


def test_a_1024_byte_name_is_fine(http: httpx.Client) -> None:
    name = "d/" + "n" * 1022
    assert http.put("/file", params={"path": name}, content=b"long", auth=AUTH).status_code == 201
    assert http.get("/file", params={"path": name}).content == b"long"
    assert [f["path"] for f in http.get("/files", params={"prefix": "d/"}).json()["files"]] == [name]


def test_writes_need_credentials(http: httpx.Client) -> None:
    assert http.put("/file", params={"path": "p"}, content=b"x").status_code == 401
    assert http.post("/files", params={"path": "p"}, content=b"x").status_code == 401
    assert http.delete("/file", params={"path": "p"}).status_code == 401


def test_size_limit_before_and_while_reading(storage: Storage, start_stor: object) -> None:
    server: StorProcess = start_stor("--config", str(storage.write_config(max_named_file_size=1000)))  # type: ignore[operator]
    with httpx.Client(base_url=server.url) as http:
        assert http.put("/file", params={"path": "big"}, content=b"x" * 1001, auth=AUTH).status_code == 413

        def chunks() -> Iterator[bytes]:
            yield from (b"y" * 400 for _ in range(5))

        assert http.put("/file", params={"path": "big"}, content=chunks(), auth=AUTH).status_code == 413
        form = http.put("/file", params={"path": "big"}, files={"upload_file": ("f", b"z" * 1001)}, auth=AUTH)
        assert form.status_code == 413
        assert http.put("/file", params={"path": "ok"}, content=b"x" * 1000, auth=AUTH).status_code == 201
    assert storage.temps() == []


def test_listing_is_sorted_and_paged(http: httpx.Client) -> None:
    names = [f"dir/{n:03d}" for n in range(25)] + ["other/z", "dir2/a"]
    for name in names:
        assert http.put("/file", params={"path": name}, content=name.encode(), auth=AUTH).status_code == 201
    page = http.get("/files", params={"prefix": "dir/", "limit": 10}).json()
    assert [f["path"] for f in page["files"]] == [f"dir/{n:03d}" for n in range(10)]
    assert page["next"] == "dir/009"
    assert page["files"][0] == {
        "path": "dir/000",
        "sha": sha256(b"dir/000"),
        "size": 7,
        "mtime": page["files"][0]["mtime"],
    }
    rest = http.get("/files", params={"prefix": "dir/", "after": page["next"], "limit": 100}).json()
    assert [f["path"] for f in rest["files"]] == [f"dir/{n:03d}" for n in range(10, 25)] and rest["next"] is None
    everything = [f["path"] for f in http.get("/files").json()["files"]]
    assert everything == sorted(names)
    assert http.get("/files", params={"limit": "0"}).status_code == 400
    assert http.get("/files", params={"limit": "lots"}).status_code == 400


def test_racing_puts_of_one_name_leave_one_whole_winner(http: httpx.Client, storage: Storage) -> None:
    bodies = [os.urandom(20_000) for _ in range(8)]
    barrier = threading.Barrier(len(bodies))
    codes: list[int] = []

    def put(body: bytes) -> None:
        with httpx.Client(base_url=str(http.base_url), timeout=30) as client:
            barrier.wait()
            codes.append(client.put("/file", params={"path": "race"}, content=body, auth=AUTH).status_code)

    threads = [threading.Thread(target=put, args=(b,)) for b in bodies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(codes) == [200] * 7 + [201]
    served = http.get("/file", params={"path": "race"}).content
    assert served in bodies  # one of them, whole
    records = [json.loads(name_record(r, "race").read_text()) for r in storage.pairs[0]]
    assert records[0] == records[1] and records[0]["sha"] == sha256(served)  # both members agree


def test_names_are_visible_to_every_process(storage: Storage, start_stor: object) -> None:
    config = str(storage.write_config())
    first: StorProcess = start_stor("--config", config)  # type: ignore[operator]
    second: StorProcess = start_stor("--config", config, "--host", "127.0.0.2")  # type: ignore[operator]
    assert httpx.put(f"{first.url}/file", params={"path": "shared"}, content=b"1", auth=AUTH).status_code == 201
    assert httpx.get(f"{second.url}/file", params={"path": "shared"}).content == b"1"
    assert [f["path"] for f in httpx.get(f"{second.url}/files").json()["files"]] == ["shared"]
    assert httpx.put(f"{second.url}/file", params={"path": "shared"}, content=b"2", auth=AUTH).status_code == 200
    assert httpx.get(f"{first.url}/file", params={"path": "shared"}).content == b"2"


def test_no_storage_is_503(http: httpx.Client, storage: Storage) -> None:
    for root in storage.pairs[0]:  # both disks of the names pair unplugged
        root.rename(root.with_name(root.name + "-gone"))
    assert http.get("/file", params={"path": "x"}).status_code == 503
    assert http.get("/files").status_code == 503


def test_client_put_and_get_by_name(server: StorProcess, tmp_path: Path) -> None:
    env = {**os.environ, "STOR_URL": server.url, "STOR_USER": USER, "STOR_PASSWORD": PASSWORD}
    source = tmp_path / "report.pdf"
    source.write_bytes(os.urandom(5000))
    put = subprocess.run(
        [sys.executable, "-m", "stor", "put", str(source), "--name", "reports/2026.pdf"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert put.returncode == 0, put.stderr
    assert put.stdout.strip() == f"{sha256(source.read_bytes())}  reports/2026.pdf"
    out = tmp_path / "copy.pdf"
    get = subprocess.run(
        [sys.executable, "-m", "stor", "get", "--name", "reports/2026.pdf", "-o", str(out)],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert get.returncode == 0, get.stderr
    assert out.read_bytes() == source.read_bytes()
