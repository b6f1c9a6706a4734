"""The client commands (`stor put/get/head`) against a real server."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from stor.client import ClientError, StorClient
from tests.conftest import Storage, StorProcess
from tests.helpers import PASSWORD, USER, layout_path, sha256
from tests.services import free_port


def stor(server: StorProcess, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "STOR_URL": server.url, "STOR_USER": USER, "STOR_PASSWORD": PASSWORD}
    return subprocess.run(
        [sys.executable, "-m", "stor", *args], capture_output=True, text=True, timeout=60, env=env, cwd=cwd
    )


def posts(server: StorProcess) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    return sum(
        float(v) for v in re.findall(r'stor_http_requests_total{method="POST",route="blob",[^}]*} ([\d.]+)', text)
    )


def test_put_uploads_files_and_skips_known_ones(server: StorProcess, storage: Storage, tmp_path: Path) -> None:
    files = []
    for n in range(3):
        path = tmp_path / f"file{n}.bin"
        path.write_bytes(os.urandom(1000 + n))
        files.append(path)
    result = stor(server, "put", *map(str, files), str(tmp_path / "missing"))
    assert result.returncode == 1  # one argument was no file
    assert result.stderr.strip() == f"stor: {tmp_path / 'missing'}: no such file"
    assert result.stdout.splitlines() == [f"{sha256(p.read_bytes())}  {p}  stored" for p in files]
    for path in files:
        assert len(storage.copies(sha256(path.read_bytes()))) == 2
    before = posts(server)
    again = stor(server, "put", *map(str, files))
    assert again.returncode == 0
    assert again.stdout.splitlines() == [f"{sha256(p.read_bytes())}  {p}  exists" for p in files]
    assert posts(server) == before  # asked with POST /stat, uploaded nothing


def test_put_reports_a_failed_upload(server: StorProcess, tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"data")
    env = {**os.environ, "STOR_URL": server.url, "STOR_USER": USER, "STOR_PASSWORD": "wrong"}
    result = subprocess.run([sys.executable, "-m", "stor", "put", str(path)], capture_output=True, text=True, env=env)
    assert result.returncode == 2  # credentials are the caller's to fix
    assert "401" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_get_verifies_and_writes_atomically(server: StorProcess, tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024)
    sha = sha256(data)
    assert httpx.post(f"{server.url}/{sha}", content=data, auth=(USER, PASSWORD)).status_code == 201
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    out = downloads / "out.bin"
    result = stor(server, "get", sha, "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == data
    assert [p.name for p in downloads.iterdir()] == ["out.bin"]  # no temp left behind
    default = stor(server, "get", sha.upper(), cwd=downloads)
    assert default.returncode == 0 and (downloads / sha).read_bytes() == data


def test_get_of_an_unknown_sha(server: StorProcess, tmp_path: Path) -> None:
    result = stor(server, "get", "0" * 64, "-o", str(tmp_path / "x"))
    assert result.returncode == 1
    assert result.stderr.strip() == f"stor: {'0' * 64}: not found"
    assert not (tmp_path / "x").exists()
    bad = stor(server, "get", "not-a-sha")
    assert bad.returncode == 2 and "not a sha256" in bad.stderr


def test_get_into_a_directory_that_cannot_be_written(server: StorProcess, tmp_path: Path) -> None:
    data = b"somewhere"
    assert httpx.post(f"{server.url}/{sha256(data)}", content=data, auth=(USER, PASSWORD)).status_code == 201
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = stor(server, "get", sha256(data), "-o", str(blocker / "out"))
    assert result.returncode == 1 and "cannot write here" in result.stderr


def test_head(server: StorProcess) -> None:
    data = b"head me"
    assert httpx.post(f"{server.url}/{sha256(data)}", content=data, auth=(USER, PASSWORD)).status_code == 201
    result = stor(server, "head", sha256(data))
    assert result.returncode == 0
    assert result.stdout.startswith(f"{sha256(data)}  {len(data)}  ")
    missing = stor(server, "head", "1" * 64)
    assert missing.returncode == 1 and "not found" in missing.stderr


def test_put_takes_directories_in_parallel_and_speaks_json(server: StorProcess, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "deep" / "er").mkdir(parents=True)
    blobs = {tree / f"f{n}": os.urandom(500 + n) for n in range(5)}
    blobs[tree / "deep" / "er" / "g"] = os.urandom(99)
    for path, data in blobs.items():
        path.write_bytes(data)
    result = stor(server, "put", str(tree), "-j", "3", "--json")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted(line["file"] for line in lines) == sorted(str(p) for p in blobs)
    assert {(line["sha"], line["result"]) for line in lines} == {(sha256(d), "stored") for d in blobs.values()}
    again = stor(server, "put", str(tree), "--json", str(tmp_path / "nope"))
    results = [json.loads(line) for line in again.stdout.splitlines()]
    assert again.returncode == 1
    assert {r["result"] for r in results if r["sha"]} == {"exists"}
    assert [r["error"] for r in results if r["result"] == "error"] == [f"{tmp_path / 'nope'}: no such file"]


def test_every_way_of_giving_credentials(server: StorProcess, tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(os.urandom(10))
    bare = {k: v for k, v in os.environ.items() if not k.startswith("STOR_")}

    def put(*args: str, **env: str) -> int:
        command = [sys.executable, "-m", "stor", "put", str(path), "--url", server.url, *args]
        return subprocess.run(command, capture_output=True, text=True, env={**bare, **env}).returncode

    assert put() == 2  # no credentials: 401
    assert put("-u", f"{USER}:{PASSWORD}") == 0
    assert put(STOR_CREDENTIALS=f"{USER}:{PASSWORD}") == 0
    assert put(STOR_USER=USER, STOR_PASSWORD=PASSWORD) == 0
    assert put("-u", "no-colon") == 2


def test_head_by_name_and_exit_codes(server: StorProcess, tmp_path: Path) -> None:
    source = tmp_path / "r.txt"
    source.write_bytes(b"named")
    assert stor(server, "put", str(source), "--name", "docs/r.txt").returncode == 0
    named = stor(server, "head", "--name", "docs/r.txt")
    assert named.returncode == 0 and named.stdout.startswith(f"{sha256(b'named')}  5  ")
    assert stor(server, "head", "--name", "docs/none").returncode == 1
    assert stor(server, "head").returncode == 2
    down = subprocess.run(
        [sys.executable, "-m", "stor", "head", "1" * 64, "--url", f"http://127.0.0.1:{free_port()}", "--retries", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert down.returncode == 3 and "after 2 tries" in down.stderr
    assert len(down.stderr.strip().splitlines()) == 1  # one line: no retry chatter


def test_a_server_that_comes_back_is_retried_until_it_answers(
    storage: Storage, start_stor: Callable[..., StorProcess], tmp_path: Path
) -> None:
    """503 while the blob's pair is unplugged, then 200 once it is back: the client waits it out."""
    config = storage.write_config()
    server = start_stor("--config", str(config))
    data = os.urandom(300)
    assert httpx.post(f"{server.url}/{sha256(data)}", content=data, auth=(USER, PASSWORD)).status_code == 201
    pair = next(p for p in storage.pairs if all(layout_path(m, sha256(data)).exists() for m in p))
    for member in pair:
        member.rename(member.with_name(member.name + "-away"))
    assert httpx.head(f"{server.url}/{sha256(data)}").status_code == 503
    client = subprocess.Popen(
        [sys.executable, "-m", "stor", "head", sha256(data), "--url", server.url, "--retries", "8"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.0)
    for member in pair:
        member.with_name(member.name + "-away").rename(member)
    out, err = client.communicate(timeout=60)
    assert client.returncode == 0, err
    assert out.startswith(f"{sha256(data)}  300  ")


# -- servers that send no ETag, stdout, modes, URLs, 401s, skipped paths, the Python API --------


@dataclass
class Bare:
    """A Stor-era server, or a proxy that drops headers: answers GET and HEAD from `answers`
    (keyed by the request path without its leading slash) with a Content-Length and no ETag or
    digest header (unless `etag`: then stor's ETag, the quoted sha), and records the requests."""

    url: str = ""
    answers: dict[str, bytes] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    etag: bool = False


@pytest.fixture
def bare() -> Iterator[Bare]:
    fake = Bare()

    class Handler(BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            self.answer(with_body=False)

        def do_GET(self) -> None:
            self.answer(with_body=True)

        def answer(self, *, with_body: bool) -> None:
            fake.requests.append(f"{self.command} {self.path}")
            data = fake.answers.get(self.path.lstrip("/"))
            self.send_response(200 if data is not None else 404)
            self.send_header("Content-Length", str(len(data or b"")))
            if fake.etag:
                self.send_header("ETag", f'"{self.path.lstrip("/")}"')
            self.end_headers()
            if with_body and data:
                self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def client(
    url: str, *args: str, cwd: Path | None = None, umask: int = -1, unbuffered: bool = True
) -> subprocess.CompletedProcess[bytes]:
    """`stor ARGS` against `url`, no credentials, bytes out (stdout may carry a blob)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STOR_") and k != "PYTHONUNBUFFERED"}
    if unbuffered:  # sys.stdout.buffer is then a raw FileIO, which may write only part of a chunk
        env["PYTHONUNBUFFERED"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "stor", *args, "--url", url, "--retries", "0"],
        capture_output=True,
        timeout=60,
        env=env,
        cwd=cwd,
        umask=umask,
    )


def test_get_checks_the_body_against_the_sha_when_no_etag_is_sent(bare: Bare, tmp_path: Path) -> None:
    data = os.urandom(70_000)
    bare.answers[sha256(data)] = data
    good = client(bare.url, "get", sha256(data), "-o", str(tmp_path / "good"))
    assert good.returncode == 0, good.stderr
    assert (tmp_path / "good").read_bytes() == data
    wrong = sha256(b"what was asked for")
    bare.answers[wrong] = b"something else"
    bad = client(bare.url, "get", wrong, "-o", str(tmp_path / "bad"))
    assert bad.returncode == 1
    assert bad.stderr.decode().strip() == (
        f"stor: GET /{wrong}: the bytes received hash to {sha256(b'something else')}, not {wrong}; nothing written"
    )
    bare.answers["file?path=r.txt"] = data  # by name, only an ETag or Repr-Digest can say what to expect
    named = client(bare.url, "get", "--name", "r.txt", "-o", str(tmp_path / "named"))
    assert named.returncode == 1
    assert "no ETag or Repr-Digest to check the bytes against" in named.stderr.decode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good"]  # nothing else written, no temp left


def test_get_dash_o_writes_the_verified_bytes_to_stdout(bare: Bare, tmp_path: Path) -> None:
    data = os.urandom(1024 * 1024)  # not text, and more than a pipe holds
    bare.answers[sha256(data)] = data
    bare.etag = True  # as stor does: only where the bytes go is in question here
    for unbuffered in (True, False):
        out = client(bare.url, "get", sha256(data), "-o", "-", cwd=tmp_path, unbuffered=unbuffered)
        assert out.returncode == 0, out.stderr
        assert out.stdout == data and out.stderr == b""
    wrong = sha256(b"asked")
    bare.answers[wrong] = b"not what was asked"
    bad = client(bare.url, "get", wrong, "-o", "-", cwd=tmp_path)
    assert bad.returncode == 1 and bad.stdout == b"" and b"hash to" in bad.stderr
    assert list(tmp_path.iterdir()) == []  # no file named "-"
    with subprocess.Popen(  # `stor get -o - | head -c 10`
        [sys.executable, "-m", "stor", "get", sha256(data), "-o", "-", "--url", bare.url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as reader:
        assert reader.stdout is not None and reader.stderr is not None
        assert reader.stdout.read(10) == data[:10]
        reader.stdout.close()
        assert reader.wait(timeout=60) == 1
        assert reader.stderr.read().decode().splitlines() == ["stor: <stdout>: cannot write: Broken pipe"]


def test_a_downloaded_file_gets_the_mode_the_umask_gives(bare: Bare, tmp_path: Path) -> None:
    data = b"for everyone to read"
    bare.answers[sha256(data)] = data
    bare.etag = True
    for umask, mode in ((0o022, 0o644), (0o027, 0o640)):
        target = tmp_path / f"out-{umask:o}"
        result = client(bare.url, "get", sha256(data), "-o", str(target), umask=umask)
        assert result.returncode == 0, result.stderr
        assert stat.S_IMODE(target.stat().st_mode) == mode


def test_a_url_without_a_scheme_is_a_usage_error(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x")
    url = f"127.0.0.1:{free_port()}"
    for command in (["put", str(path)], ["get", "1" * 64], ["head", "1" * 64], ["takedown", "1" * 64, "--reason", "r"]):
        result = client(url, *command, cwd=tmp_path)
        assert result.returncode == 2, (command, result.stderr)
        assert "has no scheme: add http:// (or https://)" in result.stderr.decode(), command
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_a_401_says_how_to_give_credentials(
    storage: Storage, start_stor: Callable[..., StorProcess], tmp_path: Path
) -> None:
    server = start_stor("--config", str(storage.write_config()))
    path = tmp_path / "f"
    path.write_bytes(os.urandom(10))
    none = client(server.url, "put", str(path))
    assert none.returncode == 2
    assert (
        none.stderr.decode()
        .strip()
        .endswith(": give credentials with -u USER:PASS or STOR_CREDENTIALS (or STOR_USER and STOR_PASSWORD)")
    )
    refused = client(server.url, "put", str(path), "-u", f"{USER}:wrong")
    assert refused.returncode == 2
    assert refused.stderr.decode().strip() == (
        f"stor: POST /{sha256(path.read_bytes())}: 401 the server refused the credentials of user '{USER}'"
    )


def test_put_of_a_directory_says_what_it_skips(
    storage: Storage, start_stor: Callable[..., StorProcess], tmp_path: Path
) -> None:
    server = start_stor("--config", str(storage.write_config()))
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "real").write_bytes(b"real")
    (tree / "broken").symlink_to(tmp_path / "nowhere")
    (tmp_path / "outside").write_bytes(b"outside")
    (tree / "linked").symlink_to(tmp_path / "outside")  # a symlink to a file is uploaded
    (tree / "dirlink").symlink_to(tree / "sub")
    os.mkfifo(tree / "fifo")
    skipped = {
        tree / "broken": "broken symlink",
        tree / "dirlink": "symlink to a directory, not followed",
        tree / "fifo": "not a regular file",
    }
    env = {**os.environ, "STOR_USER": USER, "STOR_PASSWORD": PASSWORD}
    result = subprocess.run(
        [sys.executable, "-m", "stor", "put", str(tree), "--url", server.url], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr  # skipping is no error
    assert result.stderr.splitlines() == [f"stor: {p}: skipped ({why})" for p, why in skipped.items()]
    assert result.stdout.splitlines() == [
        f"{sha256(b'outside')}  {tree / 'linked'}  stored",
        f"{sha256(b'real')}  {tree / 'sub' / 'real'}  stored",
    ]
    as_json = subprocess.run(
        [sys.executable, "-m", "stor", "put", str(tree), "--json", "--url", server.url],
        capture_output=True,
        text=True,
        env=env,
    )
    assert as_json.returncode == 0, as_json.stderr
    lines = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [line for line in lines if line["result"] == "skipped"] == [
        {"sha": None, "file": str(p), "result": "skipped", "reason": why} for p, why in skipped.items()
    ]
    assert {line["result"] for line in lines if line["result"] != "skipped"} == {"exists"}


def test_the_python_api_checks_shas_and_urls_before_asking(tmp_path: Path) -> None:
    asked: list[str] = []
    data = b"mocked"

    def answer(request: httpx.Request) -> httpx.Response:
        asked.append(f"{request.method} {request.url.path}")
        if request.method == "POST":
            return httpx.Response(401, text="valid Basic credentials are required to write")
        if request.url.path == "/file":
            digest = base64.b64encode(hashlib.sha256(data).digest()).decode()
            return httpx.Response(200, content=data, headers={"Repr-Digest": f"sha-256=:{digest}:"})
        return httpx.Response(200, content=data)

    with StorClient("http://stor.test", transport=httpx.MockTransport(answer), retries=0) as api:
        calls: list[Callable[[], object]] = [
            lambda: api.head("not-a-sha"),
            lambda: api.get("abc", tmp_path / "x"),
            lambda: api.stat([sha256(data), "g" * 64]),
            lambda: api.put("0" * 63, tmp_path / "x"),
            lambda: api.take_down("", "reason"),
        ]
        for call in calls:
            with pytest.raises(ClientError) as caught:
                call()
            assert caught.value.exit_code == 2 and "not a sha256" in str(caught.value)
        assert asked == []  # the server was never asked
        assert api.head(sha256(data).upper()).size == len(data)
        out = io.BytesIO()
        assert api.get(sha256(data), out) == len(data) and out.getvalue() == data
        assert api.get_named("r.txt", tmp_path / "named") == len(data)  # checked against its Repr-Digest
        with pytest.raises(ClientError) as mismatch:
            api.get(sha256(b"other"), tmp_path / "y")
        assert mismatch.value.exit_code == 1 and not (tmp_path / "y").exists()
        (tmp_path / "up").write_bytes(data)
        with pytest.raises(ClientError) as refused:
            api.put(sha256(data), tmp_path / "up")
        assert refused.value.status == 401 and "pass credentials=(USER, PASSWORD)" in str(refused.value)
    assert asked[:3] == [f"HEAD /{sha256(data)}", f"GET /{sha256(data)}", "GET /file"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["named", "up"]
    with pytest.raises(ClientError) as no_scheme:
        StorClient("127.0.0.1:8321")
    assert no_scheme.value.exit_code == 2 and "add http://" in str(no_scheme.value)
