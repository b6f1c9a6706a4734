"""The client commands (`stor put/get/head`) against a real server."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

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
