"""The hot path under uvicorn: a GET or HEAD of a hot blob answered as its head is parsed,
without an ASGI cycle; byte for byte what the ordinary path answers, in order, keep-alive
and HTTP/1.0 honoured, counted in the metrics."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from uvicorn.config import Config
from uvicorn.server import ServerState

from stor.backends.clearmark import MARK_NAME
from stor.backends.disk import Disk
from stor.backends.tombstones import Tombstone, TombstoneStore
from stor.digest import Sha
from stor.errors import ConfigError
from stor.http.protocol import GuardedHttpToolsProtocol, check_uvicorn
from tests.conftest import Storage, StorProcess, app_client
from tests.helpers import AUTH, layout_path, sha256, wait_for

pytestmark = pytest.mark.integration

DATA = os.urandom(6000)
SHA = sha256(DATA)


class _Transport(asyncio.Transport):
    """Collects what the protocol writes."""

    def __init__(self) -> None:
        super().__init__()
        self.written = b""
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += bytes(data)

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 5000), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


@pytest.mark.anyio
async def test_a_hot_get_is_answered_inside_data_received(nowait_storage: Storage) -> None:
    stor = app_client(nowait_storage.config())
    async with stor as http:
        assert (await http.post(f"/{SHA}", content=DATA, auth=AUTH)).status_code == 201
        assert (await http.get(f"/{SHA}")).content == DATA  # the copy is kept open from here on
        config = Config(app=stor.app, log_config=None)
        config.load()
        protocol = GuardedHttpToolsProtocol(config=config, server_state=ServerState(), app_state={})
        transport = _Transport()
        protocol.connection_made(transport)
        protocol.data_received(f"GET /{SHA} HTTP/1.1\r\nHost: stor\r\n\r\n".encode())
        # no await since: no task, no turn of the event loop; the whole answer is out already
        head, _, body = transport.written.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK") and body == DATA
        assert f'etag: "{SHA}"'.encode() in head.lower()
        assert not transport.closed
        escaped = f"/%{ord(SHA[0]):02x}{SHA[1:]}"  # the same sha, but the path needs unquoting
        protocol.data_received(f"HEAD {escaped} HTTP/1.1\r\nHost: stor\r\n\r\n".encode())
        assert transport.written.count(b"HTTP/1.1") == 1  # the ordinary path: a task answers
        await asyncio.sleep(0.2)
        assert transport.written.count(b"HTTP/1.1 200") == 2  # which answered it

        missing = sha256(b"not stored")
        assert (await http.get(f"/{missing}")).status_code == 404  # the kernel learns it is absent
        transport.written = b""
        protocol.data_received(f"GET /{missing} HTTP/1.1\r\nHost: stor\r\n\r\n".encode())
        assert transport.written.startswith(b"HTTP/1.1 404 ")  # proven absent from the caches alone
        protocol.connection_lost(None)


@pytest.mark.anyio
async def test_a_connection_answered_at_once_is_kept_alive_while_busy_and_closed_once_idle(
    nowait_storage: Storage,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stor = app_client(nowait_storage.config())
    async with stor as http:
        assert (await http.post(f"/{SHA}", content=DATA, auth=AUTH)).status_code == 201
        assert (await http.get(f"/{SHA}")).content == DATA  # kept open from here on
        config = Config(app=stor.app, log_config=None)
        config.load()
        protocol = GuardedHttpToolsProtocol(config=config, server_state=ServerState(), app_state={})
        monkeypatch.setattr(protocol, "timeout_keep_alive", 0.3)  # (uvicorn's Config takes whole seconds)
        transport = _Transport()
        protocol.connection_made(transport)
        request = f"GET /{SHA} HTTP/1.1\r\nHost: stor\r\n\r\n".encode()
        protocol.data_received(request)
        timer = protocol.timeout_keep_alive_task
        assert timer is not None
        protocol.data_received(request)
        assert protocol.timeout_keep_alive_task is timer  # set once, not again for every answer
        for _ in range(8):  # busy for 0.8 s, well past the keep-alive timeout
            await asyncio.sleep(0.1)
            protocol.data_received(request)
            assert not transport.closed
        assert transport.written.count(b"HTTP/1.1 200 OK") == 10
        await asyncio.sleep(0.6)  # then idle for twice the timeout
        assert transport.closed
        protocol.connection_lost(None)


@pytest.fixture
def uvicorn_server(
    nowait_storage: Storage,
    start_stor: Callable[..., StorProcess],
) -> StorProcess:
    server = start_stor("--config", str(nowait_storage.write_config()), "--server", "uvicorn")
    assert httpx.post(f"{server.url}/{SHA}", content=DATA, auth=AUTH).status_code == 201
    assert httpx.get(f"{server.url}/{SHA}").content == DATA  # hot from here on
    return server


def exchange(server: StorProcess, raw: bytes, responses: int = 1) -> list[tuple[bytes, bytes]]:
    """Send `raw` on one connection and read `responses` answers: (head, body) each."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(raw)
        buffer = b""
        answers: list[tuple[bytes, bytes]] = []
        while len(answers) < responses:
            while b"\r\n\r\n" not in buffer:
                chunk = sock.recv(65536)
                assert chunk, f"closed early after {answers!r}"
                buffer += chunk
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            length = 0 if b"HEAD" in raw.split(b"\r\n")[0] else int(_header(head, b"content-length") or b"0")
            while len(buffer) < length:
                buffer += sock.recv(65536)
            answers.append((head, buffer[:length]))
            buffer = buffer[length:]
            raw = raw.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in raw else raw
    return answers


def _header(head: bytes, name: bytes) -> bytes | None:
    found = re.search(rb"\r\n" + name + rb": ([^\r]*)", head, re.IGNORECASE)
    return found.group(1) if found else None


def _without_date(head: bytes) -> bytes:
    return re.sub(rb"\r\ndate: [^\r]*", b"", head, flags=re.IGNORECASE)


@pytest.mark.parametrize(
    ("method", "headers"),
    [
        ("GET", ""),
        ("GET", "404"),
        ("HEAD", "404"),
        ("HEAD", ""),
        ("GET", "Range: bytes=10-99\r\n"),
        ("GET", "Range: bytes=9999999-\r\n"),
        ("GET", f'If-None-Match: "{SHA}"\r\n'),
    ],
)
def test_the_hot_path_answers_as_the_ordinary_path_does(uvicorn_server: StorProcess, method: str, headers: str) -> None:
    sha = SHA
    if headers == "404":  # asked for once before, so the kernel has cached its absence
        sha, headers = sha256(b"never stored"), ""
        assert httpx.get(f"{uvicorn_server.url}/{sha}").status_code == 404
    hot = f"{method} /{sha} HTTP/1.1\r\nHost: stor\r\n{headers}\r\n".encode()
    # a %-escape in the path is left to the ordinary path (it unquotes to the same sha)
    ordinary = f"{method} /%{ord(sha[0]):02x}{sha[1:]} HTTP/1.1\r\nHost: stor\r\n{headers}\r\n".encode()
    [(hot_head, hot_body)] = exchange(uvicorn_server, hot)
    [(head, body)] = exchange(uvicorn_server, ordinary)
    assert _without_date(hot_head) == _without_date(head)
    assert hot_body == body
    assert _header(hot_head, b"date") is not None


def test_a_blob_absent_a_moment_ago_is_found_once_stored(uvicorn_server: StorProcess) -> None:
    data = os.urandom(2000)
    url = f"{uvicorn_server.url}/{sha256(data)}"
    assert [httpx.get(url).status_code for _ in range(3)] == [404, 404, 404]
    assert httpx.post(url, content=data, auth=AUTH).status_code == 201
    assert httpx.get(url).content == data and httpx.head(url).status_code == 200


def test_a_404_answered_on_the_loop_hears_at_once_what_another_process_did(
    uvicorn_server: StorProcess,
    nowait_storage: Storage,
) -> None:
    """The loop proves a 404 from the kernel's caches and the disks' clear marks: a takedown
    record, a quarantined copy or a bare mountpoint, from another process (this one), count
    from the next request on, not from a refresh later."""
    names_pair = [Disk(str(root), require_mount=False) for root in nowait_storage.pairs[0]]
    for disk in names_pair:
        disk.prepare()
    try:
        gone, lost = sha256(b"taken down"), sha256(b"rotted")
        for sha in (gone, lost):
            assert [httpx.get(f"{uvicorn_server.url}/{sha}").status_code for _ in range(3)] == [404] * 3

        def marks_back() -> bool:  # the server's (this process never made its own)
            ours = {Path(disk.clear.path).parent for disk in names_pair}
            owners = [d for disk in names_pair for d in Path(disk.tmp_root).iterdir() if d not in ours]
            return all((owner / MARK_NAME).exists() for owner in owners)

        assert marks_back()
        TombstoneStore(tuple(names_pair)).put(Tombstone(Sha(gone), time.time(), "admin", "elsewhere"))
        assert not marks_back()
        assert httpx.get(f"{uvicorn_server.url}/{gone}").status_code == 410

        assert wait_for(marks_back)  # so the loop would answer a 404 again, were it not told
        for disk in names_pair:  # copies that another process found corrupt, and moved aside
            copy = layout_path(Path(disk.root), lost)
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy.write_bytes(b"rotten")
            assert disk.quarantine.move(Sha(lost), {"reason": "test"}) is not None
            assert not copy.exists()  # (and the kernel caches its absence again)
        assert httpx.get(f"{uvicorn_server.url}/{lost}").status_code == 500

        missing = sha256(b"never stored anywhere")
        assert [httpx.get(f"{uvicorn_server.url}/{missing}").status_code for _ in range(3)] == [404] * 3
        shutil.rmtree(nowait_storage.pairs[1][0] / ".stor-tmp")  # a bare mountpoint now
        assert httpx.get(f"{uvicorn_server.url}/{missing}").status_code == 503
    finally:
        for disk in names_pair:
            disk.close()


def test_pipelined_and_kept_alive_requests_are_answered_in_order(uvicorn_server: StorProcess) -> None:
    cold = os.urandom(3000)
    assert httpx.post(f"{uvicorn_server.url}/{sha256(cold)}", content=cold, auth=AUTH).status_code == 201
    missing = sha256(b"nothing")
    requests = [
        f"GET /{SHA} HTTP/1.1\r\nHost: stor\r\n\r\n",
        f"GET /{missing} HTTP/1.1\r\nHost: stor\r\n\r\n",  # the ordinary path: 404
        f"GET /{SHA} HTTP/1.1\r\nHost: stor\r\nRange: bytes=0-9\r\n\r\n",  # hot, queued behind it
        f"GET /{SHA} HTTP/1.1\r\nHost: stor\r\nContent-Length: 3\r\n\r\nabc",  # a body: ordinary
        f"GET /{SHA} HTTP/1.1\r\nHost: stor\r\n\r\n",
    ]
    answers = exchange(uvicorn_server, "".join(requests).encode(), responses=len(requests))
    assert [int(head.split(b" ")[1]) for head, _ in answers] == [200, 404, 206, 200, 200]
    assert answers[0][1] == DATA and answers[2][1] == DATA[:10] and answers[4][1] == DATA


def test_http_1_0_and_connection_close_end_the_connection(uvicorn_server: StorProcess) -> None:
    for raw in (f"GET /{SHA} HTTP/1.0\r\n\r\n", f"GET /{SHA} HTTP/1.1\r\nHost: s\r\nConnection: close\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", uvicorn_server.port), timeout=10) as sock:
            sock.sendall(raw.encode())
            received = b""
            while chunk := sock.recv(65536):  # the server closes: recv returns b""
                received += chunk
        head, _, body = received.partition(b"\r\n\r\n")
        assert b" 200 " in head.split(b"\r\n")[0] and body == DATA
        assert b"connection: close" in head.lower()


def test_hot_answers_are_counted(uvicorn_server: StorProcess) -> None:
    def served() -> float:
        text = httpx.get(f"{uvicorn_server.url}/metrics").text
        total = 0.0
        for labels, value in re.findall(r"^stor_http_requests_total\{([^}]*)\} (\S+)$", text, re.MULTILINE):
            if {'method="GET"', 'route="blob"', 'status="200"'} <= set(labels.split(",")):
                total += float(value)
        return total

    before = served()
    with httpx.Client() as http:
        for _ in range(20):
            assert http.get(f"{uvicorn_server.url}/{SHA}").content == DATA
    assert served() - before == 20


def test_the_installed_uvicorn_is_one_the_protocol_was_tested_on() -> None:
    check_uvicorn()  # fails here, loudly, when a dependency update brings an untested uvicorn


def test_an_untested_uvicorn_is_refused_with_a_clear_message() -> None:
    with pytest.raises(ConfigError, match=r"uvicorn 0\.99\.1 .*--server granian"):
        check_uvicorn("0.99.1")


@pytest.mark.parametrize(
    "headers",
    [
        "X-Odd: a\x00b\r\n",  # a NUL in a value: the parser refuses it
        "Bad Name: x\r\n",  # a space in a name
        "X-Folded: a\r\n b\r\n",  # obsolete line folding
        ": no name\r\n",
        "Upgrade: websocket\r\nConnection: upgrade\r\n",
        "Expect: 100-continue\r\n",
        "x-lower: ok\r\nACCEPT:  */*  \r\n",  # odd case and spaces are fine
    ],
)
def test_a_head_read_whole_is_judged_as_the_parser_judges_it(uvicorn_server: StorProcess, headers: str) -> None:
    """A head that arrives whole is answered without the parser only when the parser would
    take it as it is; else the parser judges it, as it judges the same head on the ordinary
    path (a %-escaped path)."""

    def status(path: str) -> int:
        raw = f"GET {path} HTTP/1.1\r\nHost: stor\r\n{headers}\r\n".encode()
        with socket.create_connection(("127.0.0.1", uvicorn_server.port), timeout=10) as sock:
            sock.sendall(raw)
            head = b""
            while b"\r\n" not in head and (chunk := sock.recv(65536)):
                head += chunk
        return int(head.split(b" ")[1])

    assert status(f"/{SHA}") == status(f"/%{ord(SHA[0]):02x}{SHA[1:]}")
