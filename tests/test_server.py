"""A real `stor serve` subprocess on a free port, driven over real sockets; files checked on disk."""

from __future__ import annotations

import base64
import email.utils
import hashlib
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from stor.backends import syscalls
from stor.backends.disk import GROUP_COMMIT_FILESYSTEMS
from tests.conftest import Storage, StorProcess
from tests.helpers import (
    AUTH,
    AUTH_HEADER,
    PASSWORD,
    USER,
    corrupt,
    debris,
    layout_path,
    sha256,
    temp_files,
    wait_for,
)

pytestmark = pytest.mark.integration

BIG = os.urandom(1536 * 1024)  # over one spool buffer, so a temp file exists mid-upload
BIG_SHA = sha256(BIG)


def connect(server: StorProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def request_head(method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: stor", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def read_response(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything the server sends until it closes or goes quiet after a full head."""
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        if not chunk:
            break
        data += chunk
        if b"\r\n\r\n" in data:
            sock.settimeout(0.3)
    return data


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def test_post_writes_both_copies_durably_and_get_reads_them(server: StorProcess, storage: Storage) -> None:
    data = os.urandom(100_000)
    sha = sha256(data)
    response = httpx.post(f"{server.url}/{sha}", content=data, auth=AUTH)
    assert response.status_code == 201
    copies = storage.copies(sha)
    assert len(copies) == 2 and {c.read_bytes() for c in copies} == {data}
    assert copies[0].stat().st_mtime_ns == copies[1].stat().st_mtime_ns
    assert storage.temps() == []
    got = httpx.get(f"{server.url}/{sha}")
    assert got.status_code == 200 and got.content == data
    assert httpx.head(f"{server.url}/{sha}").headers["content-length"] == str(len(data))


def test_big_blobs_stream_both_ways(server: StorProcess, storage: Storage) -> None:
    data = os.urandom(5 * 1024 * 1024 + 3)
    sha = sha256(data)

    def body() -> Iterator[bytes]:
        for offset in range(0, len(data), 100_000):
            yield data[offset : offset + 100_000]

    assert httpx.post(f"{server.url}/{sha}", content=body(), auth=AUTH, timeout=30).status_code == 201
    with httpx.stream("GET", f"{server.url}/{sha}") as response:
        assert response.status_code == 200
        assert b"".join(response.iter_bytes()) == data


def test_large_blobs_go_out_whole_in_ranges_and_back_to_back(server: StorProcess, storage: Storage) -> None:
    """Over 1 MiB a copy is checked whole, then sent from the file (uvicorn: `sendfile`)."""
    data = os.urandom(8 * 1024 * 1024 + 5)
    sha = sha256(data)
    assert httpx.post(f"{server.url}/{sha}", content=data, auth=AUTH, timeout=30).status_code == 201
    with httpx.Client(base_url=server.url, timeout=30) as client:  # one kept-alive connection
        for _ in range(3):
            response = client.get(f"/{sha}")
            assert response.status_code == 200 and response.content == data
            ranged = client.get(f"/{sha}", headers={"Range": "bytes=1048570-3145727"})
            assert ranged.status_code == 206 and ranged.content == data[1048570:3145728]
    metrics = httpx.get(f"{server.url}/metrics").text
    line = next(x for x in metrics.splitlines() if x.startswith('stor_http_sent_bytes_total{route="blob"}'))
    sent = float(line.split()[-1]) - (3 * len(data) + 3 * 2097158)  # what `sendfile` sent is counted
    assert 0 < sent < 1000  # and the POST's answer


def test_a_client_that_stops_reading_a_large_body(server: StorProcess) -> None:
    data = os.urandom(8 * 1024 * 1024)
    sha = sha256(data)
    assert httpx.post(f"{server.url}/{sha}", content=data, auth=AUTH, timeout=30).status_code == 201
    fds = len(os.listdir(f"/proc/{server.proc.pid}/fd"))
    for _ in range(5):
        sock = connect(server)
        sock.sendall(request_head("GET", f"/{sha}", {}))
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        sock.close()  # with most of the body unread
    response = httpx.get(f"{server.url}/{sha}", timeout=30)
    assert response.status_code == 200 and response.content == data
    assert wait_for(lambda: len(os.listdir(f"/proc/{server.proc.pid}/fd")) <= fds + 2)


def test_a_corrupt_large_copy_is_answered_from_its_partner(server: StorProcess, storage: Storage) -> None:
    """Checked whole before the first header, a bad copy costs no broken transfer."""
    data = os.urandom(3 * 1024 * 1024)
    sha = sha256(data)
    assert httpx.post(f"{server.url}/{sha}", content=data, auth=AUTH, timeout=30).status_code == 201
    first = storage.copies(sha)[0]
    corrupt(first, len(data) - 7)  # keeps its fast checksum: the attribute names the good bytes
    for _ in range(4):
        response = httpx.get(f"{server.url}/{sha}", timeout=30)
        assert response.status_code == 200 and response.content == data
    quarantine = first.parents[3] / ".stor-quarantine"
    assert wait_for(lambda: quarantine.exists() and len(list(quarantine.glob("*.dat"))) == 1)


def test_exists_is_answered_before_the_body(server: StorProcess) -> None:
    data = b"already here"
    sha = sha256(data)
    assert httpx.post(f"{server.url}/{sha}", content=data, auth=AUTH).status_code == 201
    with connect(server) as sock:  # an Expect: 100-continue client never has to send the body
        sock.sendall(
            request_head(
                "POST",
                f"/{sha}",
                {"Authorization": AUTH_HEADER, "Content-Length": "1000000", "Expect": "100-continue"},
            )
        )
        response = read_response(sock)
    assert response.startswith(b"HTTP/1.1 200 ")
    assert b"100 Continue" not in response
    assert sha.upper().encode() in response


def test_401_comes_before_any_byte_of_the_body(server: StorProcess, storage: Storage) -> None:
    for auth in ({}, {"Authorization": "Basic " + base64.b64encode(b"writer:nope").decode()}):
        with connect(server) as sock:
            sock.sendall(request_head("POST", f"/{BIG_SHA}", {"Content-Length": str(len(BIG)), **auth}))
            started = time.monotonic()
            response = read_response(sock, timeout=5)
            assert time.monotonic() - started < 4  # not the body idle timeout, nor ours
        assert status_of(response) == 401
        assert b'www-authenticate: Basic realm="stor"' in response.lower().replace(b"basic", b"Basic")
    assert storage.temps() == [] and storage.copies(BIG_SHA) == []


def test_a_stalled_upload_is_dropped_and_its_temp_removed(server: StorProcess, storage: Storage) -> None:
    with connect(server) as sock:
        sock.sendall(
            request_head("POST", f"/{BIG_SHA}", {"Authorization": AUTH_HEADER, "Content-Length": str(len(BIG))})
        )
        sock.sendall(BIG[: 1200 * 1024])  # then silence
        assert wait_for(lambda: len(storage.temps()) == 2, timeout=5)
        response = read_response(sock, timeout=10)  # body_idle_timeout is 1 s in this fixture
    assert status_of(response) == 408
    assert b"connection: close" in response.lower()
    assert wait_for(lambda: storage.temps() == [], timeout=5)
    assert storage.copies(BIG_SHA) == []
    assert httpx.post(f"{server.url}/{BIG_SHA}", content=BIG, auth=AUTH).status_code == 201


def test_a_client_that_disconnects_mid_body_leaves_nothing(server: StorProcess, storage: Storage) -> None:
    with connect(server) as sock:
        sock.sendall(
            request_head("POST", f"/{BIG_SHA}", {"Authorization": AUTH_HEADER, "Content-Length": str(len(BIG))})
        )
        sock.sendall(BIG[: 1200 * 1024])
        assert wait_for(lambda: len(storage.temps()) == 2, timeout=5)
    assert wait_for(lambda: storage.temps() == [], timeout=5)
    assert storage.copies(BIG_SHA) == []
    assert httpx.get(f"{server.url}/").status_code == 200


def test_a_chunked_body_growing_past_the_limit_is_413_mid_stream(
    storage: Storage, start_stor: Callable[..., StorProcess]
) -> None:
    server = start_stor("--config", str(storage.write_config(max_upload_size=2 * 1024 * 1024)))
    sent = 0

    def body() -> Iterator[bytes]:
        nonlocal sent
        for _ in range(40):
            sent += 100_000
            yield b"q" * 100_000

    try:
        response = httpx.post(f"{server.url}/{BIG_SHA}", content=body(), auth=AUTH, timeout=10)
        status = response.status_code
    except httpx.WriteError:  # the server may close while we are still sending
        status = 413
    assert status == 413
    assert sent < 40 * 100_000 or status == 413
    assert wait_for(lambda: storage.temps() == [], timeout=5)
    assert storage.copies(BIG_SHA) == []


def test_sixteen_concurrent_uploads_of_one_sha(server: StorProcess, storage: Storage) -> None:
    data = os.urandom(300_000)
    sha = sha256(data)
    codes: list[int] = []
    barrier = threading.Barrier(16)

    def upload() -> None:
        with httpx.Client(timeout=30) as http:
            barrier.wait()
            codes.append(http.post(f"{server.url}/{sha}", content=data, auth=AUTH).status_code)

    threads = [threading.Thread(target=upload) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(set(codes)) in ([200, 201], [201])
    assert codes.count(201) >= 1
    copies = storage.copies(sha)
    assert len(copies) == 2 and {c.read_bytes() for c in copies} == {data}
    for root in storage.roots:
        assert len([p for p in root.rglob("*.dat")]) == (1 if layout_path(root, sha) in copies else 0)
    assert storage.temps() == []


def test_concurrent_uploads_are_group_committed_and_all_land(server: StorProcess, storage: Storage) -> None:
    """Small and spooled bodies, raw and kept-alive: every 201 has both copies, byte-exact; on
    ext4 (xfs, btrfs) several uploads share one syncfs."""
    blobs = [os.urandom(4096) for _ in range(40)] + [os.urandom(1_300_000) for _ in range(4)]
    codes: list[int] = []
    barrier = threading.Barrier(8)

    def upload(part: list[bytes]) -> None:
        with httpx.Client(timeout=30) as http:
            barrier.wait()
            codes.extend(http.post(f"{server.url}/{sha256(d)}", content=d, auth=AUTH).status_code for d in part)

    threads = [threading.Thread(target=upload, args=(blobs[n::8],)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert codes == [201] * len(blobs)
    for data in blobs:
        copies = storage.copies(sha256(data))
        assert len(copies) == 2 and {c.read_bytes() for c in copies} == {data}
    assert storage.temps() == []
    commits = httpx.get(f"{server.url}/status?format=json").json()["group_commit"]
    if _groupable(storage.roots[0]):  # each worker reports its own; this one served some uploads
        assert commits and all(c["cycles"] < c["copies"] for c in commits.values())
    else:
        assert commits == {}


def _groupable(root: Path) -> bool:
    fd = os.open(root, os.O_RDONLY)
    try:
        return syscalls.fs_magic(fd) in GROUP_COMMIT_FILESYSTEMS
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    "path",
    [
        "/../{sha}",
        "/%2e%2e/{sha}",
        "/{sha}%2f..",
        "/%2e%2e%2f%2e%2e%2f{sha}",
        "/{sha}%00",
        "/{sha}/..",
        "/.stor-tmp",
        "/" + "\u0661" * 64,
    ],
)
def test_path_tricks_are_refused_and_create_nothing(server: StorProcess, storage: Storage, path: str) -> None:
    data = b"tricky"
    target = path.format(sha=sha256(data))
    with connect(server) as sock:
        sock.sendall(
            request_head(
                "POST",
                target.encode("utf-8").decode("latin-1"),
                {"Authorization": AUTH_HEADER, "Content-Length": str(len(data))},
            )
            + data
        )
        response = read_response(sock)
    assert status_of(response) in (400, 404)
    with connect(server) as sock:
        sock.sendall(request_head("GET", target.encode("utf-8").decode("latin-1"), {}))
        assert status_of(read_response(sock)) in (400, 404)
    assert debris(storage.base) == []


def test_status_turns_503_when_a_directory_disappears(server: StorProcess, storage: Storage) -> None:
    assert httpx.get(f"{server.url}/status").text == "OK\n"
    storage.pairs[0][0].rename(storage.base / "unplugged")
    response = httpx.get(f"{server.url}/status", timeout=3)
    assert response.status_code == 503
    assert str(storage.pairs[0][0]) in response.text
    (storage.base / "unplugged").rename(storage.pairs[0][0])
    assert wait_for(lambda: httpx.get(f"{server.url}/status").status_code == 200, timeout=5)


def test_a_missing_directory_stops_start_up(storage: Storage, tmp_path: Path) -> None:
    storage.pairs[1][1].rmdir()
    config = storage.write_config()
    result = subprocess.run(
        [sys.executable, "-m", "stor", "serve", "--config", str(config), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert str(storage.pairs[1][1]) in result.stderr and "does not exist" in result.stderr
    assert not storage.pairs[1][1].exists()  # never created


def test_check_config(storage: Storage, tmp_path: Path) -> None:
    good = subprocess.run(
        [sys.executable, "-m", "stor", "check-config", "--config", str(storage.write_config())],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert good.returncode == 0 and "OK (2 pairs, 2 writable, 1 writers)" in good.stdout
    bad = storage.write_config(max_upload_size="big")
    result = subprocess.run(
        [sys.executable, "-m", "stor", "check-config", "--config", str(bad)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2 and "'max_upload_size'" in result.stderr and "big" in result.stderr


def test_the_embedded_default(tmp_path: Path, start_stor: Callable[..., StorProcess]) -> None:
    server = start_stor(cwd=tmp_path)
    data_dir = tmp_path / "stor-data"
    assert (data_dir / "disk1").is_dir() and (data_dir / "disk2").is_dir()
    credentials = (data_dir / "credentials").read_text().strip()
    assert oct((data_dir / "credentials").stat().st_mode & 0o777) == "0o600"
    assert server.log().count(credentials) == 1  # printed once
    config = data_dir / "stor.json"  # for the operator commands
    assert oct(config.stat().st_mode & 0o777) == "0o600" and str(config) in server.log()
    checked = subprocess.run(
        [sys.executable, "-m", "stor", "check-config", "--config", str(config)], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stderr
    user, password = credentials.split(":", 1)
    data = b"embedded"
    sha = sha256(data)
    assert httpx.post(f"{server.url}/{sha}", content=data, auth=(user, "wrong")).status_code == 401
    assert httpx.post(f"{server.url}/{sha}", content=data, auth=(user, password)).status_code == 201
    assert layout_path(data_dir / "disk1", sha).read_bytes() == data
    assert layout_path(data_dir / "disk2", sha).read_bytes() == data
    assert httpx.get(f"{server.url}/status").status_code == 200
    server.stop()
    again = start_stor(cwd=tmp_path)  # the same credentials after a restart
    assert httpx.post(f"{again.url}/{sha256(b'2')}", content=b"2", auth=(user, password)).status_code == 201


def test_several_workers_share_the_disks(storage: Storage, start_stor: Callable[..., StorProcess]) -> None:
    server = start_stor("--config", str(storage.write_config()), "--workers", "2")
    blobs = [os.urandom(1000 + n) for n in range(20)]
    with httpx.Client(base_url=server.url) as http:
        for blob in blobs:
            assert (
                http.post(f"/{sha256(blob)}", content=blob, auth=AUTH, headers={"Connection": "close"}).status_code
                == 201
            )
        for blob in blobs:
            assert http.get(f"/{sha256(blob)}", headers={"Connection": "close"}).content == blob
        assert http.get("/status").status_code == 200

    def owners() -> set[str]:
        return {p.parent.name for root in storage.roots for p in (root / ".stor-tmp").glob("*/owner.lock")}

    # each worker claims its own temp directory per disk as it starts (the second may still be
    # starting when the first answers)
    assert wait_for(lambda: len(owners()) == 2 * len(storage.roots))
    assert all(temp_files(root) == [] for root in storage.roots)


def peak_rss(pid: int) -> int:
    """The process's high-water resident set (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_memory_stays_bounded_for_a_big_blob(server: StorProcess) -> None:
    """128 MiB up and down through a server whose peak RSS may grow by less than 64 MiB."""
    size, piece = 128 * 1024 * 1024, os.urandom(1024 * 1024)
    digest = hashlib.sha256()
    for _ in range(size // len(piece)):
        digest.update(piece)
    sha = digest.hexdigest()
    httpx.get(f"{server.url}/status")
    before = peak_rss(server.proc.pid)

    def body() -> Iterator[bytes]:
        for _ in range(size // len(piece)):
            yield piece

    assert httpx.post(f"{server.url}/{sha}", content=body(), auth=AUTH, timeout=60).status_code == 201
    received = 0
    with httpx.stream("GET", f"{server.url}/{sha}", timeout=60) as response:
        for chunk in response.iter_raw():
            received += len(chunk)
    assert received == size
    growth = peak_rss(server.proc.pid) - before
    assert growth < 64 * 1024 * 1024, f"peak RSS grew by {growth / 2**20:.0f} MiB"


def test_config_file_comes_from_the_environment_too(storage: Storage, start_stor: Callable[..., StorProcess]) -> None:
    server = start_stor(env={"CONFIG_FILE": str(storage.write_config())})
    data = b"via CONFIG_FILE"
    assert httpx.post(f"{server.url}/{sha256(data)}", content=data, auth=AUTH).status_code == 201
    assert len(storage.copies(sha256(data))) == 2


def test_json_logs_carry_the_access_fields(storage: Storage, start_stor: Callable[..., StorProcess]) -> None:
    server = start_stor("--config", str(storage.write_config()), "--log-format", "json")
    data = b"logged"
    assert httpx.post(f"{server.url}/{sha256(data)}", content=data, auth=(USER, PASSWORD)).status_code == 201
    for _ in range(2):  # the second is answered on the spot by the server's protocol
        assert httpx.get(f"{server.url}/{sha256(data)}").content == data
    assert httpx.get(f"{server.url}/status").status_code == 200

    def logged() -> list[dict[str, Any]]:
        return [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]

    # the last request's line, not a count: the ready check's own line counts too
    assert wait_for(lambda: any(line.get("path") == "/status" for line in logged()))
    lines = logged()
    access = [line for line in lines if line["logger"] == "stor.access" and line["path"] != "/"]  # not the ready check
    assert [(a["method"], a["status"]) for a in access] == [("POST", 201), ("GET", 200), ("GET", 200), ("GET", 200)]
    assert [a["bytes"] for a in access[1:3]] == [len(data), len(data)] and access[3]["path"] == "/status"
    assert all(a["remote"].startswith("127.0.0.1:") and a["duration_ms"] >= 0 for a in access)
    assert not any(line["logger"].startswith("uvicorn") for line in lines)
    assert any(line["logger"] == "stor.server" and line["level"] == "info" for line in lines)


@pytest.mark.parametrize("http_server", ["uvicorn", "granian"])
def test_tls_with_a_certificate_made_here(
    storage: Storage, start_stor: Callable[..., StorProcess], tmp_path: Path, http_server: str
) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    config = str(storage.write_config())
    args = ["--config", config, "--ssl-certfile", str(cert), "--ssl-keyfile", str(key), "--server", http_server]
    server = start_stor(*args)
    assert server.url.startswith("https://")
    data = b"over tls"
    with httpx.Client(verify=ssl.create_default_context(cafile=str(cert))) as https:
        assert https.post(f"{server.url}/{sha256(data)}", content=data, auth=(USER, PASSWORD)).status_code == 201
        assert https.get(f"{server.url}/{sha256(data)}").content == data
    with pytest.raises(httpx.TransportError):
        httpx.get(server.url.replace("https://", "http://") + "/", timeout=5)
    half = subprocess.run(
        [sys.executable, "-m", "stor", "serve", "--config", config, "--ssl-certfile", str(cert)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert half.returncode == 2 and "go together" in half.stderr


def test_last_modified_is_never_later_than_date(server: StorProcess) -> None:
    data = os.urandom(100)
    assert httpx.post(f"{server.url}/{sha256(data)}", content=data, auth=(USER, PASSWORD)).status_code == 201
    for _ in range(2):  # the thread path, then the server's answer on the spot
        answer = httpx.get(f"{server.url}/{sha256(data)}")
        shown = email.utils.parsedate_to_datetime(answer.headers["last-modified"])
        assert shown <= email.utils.parsedate_to_datetime(answer.headers["date"])
