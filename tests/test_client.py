"""The client commands (`stor put/get/head`) against a real server."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx

from tests.conftest import Storage, StorProcess
from tests.helpers import PASSWORD, USER, sha256


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
    result = stor(server, "put", *map(str, files), str(tmp_path / "missing"), str(tmp_path))
    assert result.returncode == 1  # two arguments were not files
    assert "missing: not a regular file" in result.stderr and f"{tmp_path}: not a regular file" in result.stderr
    lines = result.stdout.splitlines()
    assert lines == [f"{sha256(p.read_bytes())}  {p}" for p in files]
    for path in files:
        assert len(storage.copies(sha256(path.read_bytes()))) == 2
    before = posts(server)
    again = stor(server, "put", *map(str, files))
    assert again.returncode == 0 and again.stdout.splitlines() == lines
    assert posts(server) == before  # asked with POST /stat, uploaded nothing


def test_put_reports_a_failed_upload(server: StorProcess, tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"data")
    env = {**os.environ, "STOR_URL": server.url, "STOR_USER": USER, "STOR_PASSWORD": "wrong"}
    result = subprocess.run([sys.executable, "-m", "stor", "put", str(path)], capture_output=True, text=True, env=env)
    assert result.returncode == 1
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
