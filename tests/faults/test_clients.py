"""Bad clients against a real server: slow ones (stalled bodies, partial heads, fifty at once),
wrong credentials, and hostile input fuzzed with hypothesis. None of these needs root."""

from __future__ import annotations

import base64
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stor.backends.clearmark import MARK_NAME
from tests.conftest import Storage, StorProcess
from tests.faults.conftest import Servers, fault_config, post
from tests.faults.invariants import Ledger
from tests.helpers import AUTH_HEADER, PASSWORD, USER, sha256, wait_for

IDLE = 1.0  # body_idle_timeout, and the deadline for a request's head


@pytest.fixture
def plain(tmp_path: Path, ledger: Ledger) -> Storage:
    members = [tmp_path / "a1", tmp_path / "a2"]
    for member in members:
        member.mkdir()
    ledger.pairs = [members]
    return Storage(tmp_path, [members])


@pytest.fixture
def server(plain: Storage, servers: Servers) -> StorProcess:
    return servers.start(fault_config(plain, check_mountpoints=False, body_idle_timeout=IDLE))


def connect(server: StorProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=15)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def answer(sock: socket.socket) -> bytes:
    """What the server sends until it closes the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response else 0


def head(method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: stor", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


# -- slow clients ------------------------------------------------------------------------------


def test_a_stalled_body_is_cut_off_and_its_temp_removed(server: StorProcess, plain: Storage) -> None:
    data = os.urandom(3 * 1024 * 1024)
    with connect(server) as sock:
        sock.sendall(head("POST", f"/{sha256(data)}", {"Authorization": AUTH_HEADER, "Content-Length": str(len(data))}))
        sock.sendall(data[: 2 * 1024 * 1024])
        assert wait_for(lambda: len(plain.temps()) == 2)
        response = answer(sock)  # the server gives up on its own
    assert status_of(response) in (0, 408)
    assert wait_for(lambda: plain.temps() == [])
    assert plain.copies(sha256(data)) == []


@pytest.mark.parametrize("sent", [b"", b"GET /", b"POST /abc HTTP/1.1\r\nHost: stor\r\nContent-Le"])
def test_a_partial_head_is_cut_off(server: StorProcess, sent: bytes) -> None:
    with connect(server) as sock:
        sock.sendall(sent)
        response = answer(sock)
    assert status_of(response) == 408


def test_fifty_slow_clients_do_not_stop_the_others(server: StorProcess, plain: Storage, ledger: Ledger) -> None:
    slow: list[socket.socket] = []
    try:
        for n in range(50):
            sock = connect(server)
            if n % 2:
                sock.sendall(b"POST /" + b"a" * 64 + b" HTTP/1.1\r\nHost: stor\r\n")  # never finishes its head
            else:
                data = os.urandom(2 * 1024 * 1024)
                headers = {"Authorization": AUTH_HEADER, "Content-Length": str(len(data))}
                sock.sendall(head("POST", f"/{sha256(data)}", headers) + data[: 1536 * 1024])
            slow.append(sock)

        def normal(n: int) -> int:
            data = os.urandom(4096 + n)
            assert post(server, data, ledger, timeout=10).status_code == 201
            return httpx.get(f"{server.url}/{sha256(data)}", timeout=10).status_code

        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(normal, range(40))) == [200] * 40
        for sock in slow:
            sock.settimeout(15)
            answer(sock)  # each is closed by the server
    finally:
        for sock in slow:
            sock.close()
    assert wait_for(lambda: plain.temps() == [])


# -- auth ----------------------------------------------------------------------------------------

WRONG_PASSWORD = "not-the-password-42"
BAD_AUTH = [
    {},
    {"Authorization": "Basic " + base64.b64encode(f"{USER}:{WRONG_PASSWORD}".encode()).decode()},
    {"Authorization": "Basic " + base64.b64encode(f"intruder:{PASSWORD}".encode()).decode()},
    {"Authorization": f"Bearer {PASSWORD}"},
    {"Authorization": "Basic !!!not-base64!!!"},
]


@pytest.mark.parametrize("auth", BAD_AUTH)
def test_401_arrives_before_the_body_and_nothing_reaches_disk(
    auth: dict[str, str], server: StorProcess, plain: Storage
) -> None:
    data = os.urandom(2 * 1024 * 1024)
    with connect(server) as sock:
        sock.sendall(head("POST", f"/{sha256(data)}", {**auth, "Content-Length": str(len(data))}))
        response = answer(sock)  # not one byte of the body was sent
    assert status_of(response) == 401
    assert b"www-authenticate: basic" in response.lower()
    assert plain.temps() == [] and plain.copies(sha256(data)) == []


def test_credentials_never_reach_the_logs(server: StorProcess, ledger: Ledger) -> None:
    for auth in BAD_AUTH:
        httpx.post(f"{server.url}/{sha256(b'x')}", content=b"x", headers=auth)
    assert post(server, b"good", ledger).status_code == 201
    log = server.log()
    secrets = [
        PASSWORD,
        WRONG_PASSWORD,
        AUTH_HEADER.split()[1],
        *(a["Authorization"].split()[-1] for a in BAD_AUTH if a),
    ]
    assert "POST /" in log  # the access log is there
    for secret in secrets:
        assert secret not in log


# -- hostile input -------------------------------------------------------------------------------

SHA = sha256(b"hostile")
PIECES = [
    SHA,
    SHA.upper(),
    SHA[:63],
    SHA + "0",
    SHA[:-1] + "g",
    "..",
    "%2e%2e",
    "%2E%2E/%2e%2e",
    "%2f",
    "%00",
    "%",
    "\u0661" * 64,  # Arabic-Indic digits
    "\uff10" * 64,  # fullwidth zeros
    "a" * 300,
    "files/../" + SHA,
    SHA + "/..",
    ";",
    "?x=1",
    "#frag",
]


def encode_path(text: str) -> str:
    return "".join(c if c.isascii() and c.isprintable() and c != " " else _pct(c) for c in text)


def _pct(c: str) -> str:
    return "".join(f"%{b:02X}" for b in c.encode())


@st.composite
def hostile_requests(draw: st.DrawFn) -> tuple[str, str, dict[str, str], bytes]:
    method = draw(st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS"]))
    path = "/" + "".join(draw(st.lists(st.sampled_from(PIECES), min_size=1, max_size=3)))
    headers: dict[str, str] = {"Connection": "close"}
    body = draw(st.binary(max_size=256))
    if method == "POST":
        headers["Authorization"] = AUTH_HEADER
    if draw(st.booleans()):
        headers["Range"] = draw(st.sampled_from(["bytes=5-1", "bytes=-0", "bytes=a-b", "items=0-1", "bytes=0-0,1-1"]))
    length = draw(st.sampled_from(["exact", "short", "none", "huge-header"]))
    if length == "exact":
        headers["Content-Length"] = str(len(body))
    elif length == "short" and body:
        headers["Content-Length"] = str(len(body) - 1)
    elif length == "huge-header":
        headers["X-Filler"] = "z" * 100_000
    return method, encode_path(path), headers, body


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=hostile_requests())
def test_hostile_requests_get_a_4xx_and_leave_no_file(
    request: tuple[str, str, dict[str, str], bytes], server: StorProcess, plain: Storage
) -> None:
    method, path, headers, body = request
    with connect(server) as sock:
        sock.sendall(head(method, path, headers) + body)
        response = answer(sock)
    code = status_of(response)
    if "X-Filler" in headers:
        assert code == 431 or code == 0, response[:200]  # 0: closed while we were still sending
    else:
        assert 0 < code < 500, response[:200]
    if code < 400:  # only a real blob may answer 2xx: none exists but the one this test never posts
        assert method in ("GET", "HEAD", "OPTIONS") and not path.startswith(f"/{SHA}"), (code, path)
    assert leftovers(plain) == []


def leftovers(storage: Storage) -> list[Path]:
    """Any file anywhere under the test's directory but the config, the logs, the temp-dir
    locks, the clear marks and the health probe's own short-lived file."""
    found = []
    for path in storage.base.rglob("*"):
        if path.name in ("owner.lock", MARK_NAME) or path.name.startswith("probe-") or path.suffix in (".json", ".log"):
            continue
        if path.is_file():
            found.append(path)
    return found


def test_a_body_that_does_not_match_its_name_is_refused(server: StorProcess, plain: Storage) -> None:
    for body in (b"", b"not hostile", os.urandom(3 * 1024 * 1024)):
        response = httpx.post(f"{server.url}/{SHA}", content=body, headers={"Authorization": AUTH_HEADER})
        assert response.status_code in (400, 412)
    assert leftovers(plain) == []
