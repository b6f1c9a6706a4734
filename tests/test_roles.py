"""Credential roles (DESIGN.md §1 "Who may do what"): writers (`basic_auth`), readers
(`read_auth`), admins (`admin_auth`) and metrics readers (`metrics_auth`). Without `read_auth`
reads are open; with it every read needs a credential of any role but metrics. Every refusal is
a 401 with a Basic challenge, decided before a body byte is read or a disk touched; the hot
path (`BlobRoutes.answer_now`) refuses what the ordinary path refuses; a slow hash is verified
once, remembered (bounded) and forgotten on reload; the environment overrides the file; SIGHUP
re-reads every list."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt
import httpx
import pytest

from stor.config import ROLE_KEYS, Config, Credential, config_from_mapping
from stor.errors import ConfigError, Unauthorized
from stor.http import auth
from stor.http.app import StorApp
from stor.http.auth import READERS, UNKNOWN, Authenticator, Role, hash_password
from stor.service import BlobService
from stor.service.namedfiles import NamedFiles
from stor.wiring.build import build_app, build_pair
from stor.wiring.reload import Reloader
from tests.conftest import Storage, StorProcess, app_client
from tests.helpers import AUTH, PASSWORD, USER, sha256, wait_for

DATA = os.urandom(3000)
SHA = sha256(DATA)
MISSING = sha256(b"never stored by test_roles")
NAME = "docs/readme.txt"

READER = ("reader", "read-pass")
ADMIN = ("admin", "admin-pass")
METRICS = ("scraper", "metrics-pass")
CHALLENGE = 'Basic realm="stor"'


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def entry(credential: tuple[str, str]) -> str:
    return f"{credential[0]}:{credential[1]}"


def fast_bcrypt(password: str) -> str:
    """A real bcrypt entry at the lowest cost (`hash_password` takes half a second here)."""
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()


AS_WRITER = basic(*AUTH)
AS_READER = basic(*READER)
AS_ADMIN = basic(*ADMIN)
AS_METRICS = basic(*METRICS)
READING = {"reader": AS_READER, "writer": AS_WRITER, "admin": AS_ADMIN}
NOT_READING: dict[str, str | None] = {
    "no credential": None,
    "the reader's user with a wrong password": basic(READER[0], "wrong"),
    "the reader's user with the admin's password": basic(READER[0], ADMIN[1]),
    "an unknown user with the reader's password": basic("mallory", READER[1]),
    "a metrics-only credential": AS_METRICS,
    "an empty password": basic(READER[0], ""),
    "no colon": "Basic " + base64.b64encode(b"readerread-pass").decode(),
    "not base64": "Basic !!!not-base64!!!",
    "another scheme": "Bearer " + base64.b64encode(entry(READER).encode()).decode(),
}


def roles_config(storage: Storage, **overrides: Any) -> dict[str, Any]:
    """Every role set: writer (the conftest's), reader, admin and metrics reader."""
    raw = {"read_auth": entry(READER), "admin_auth": entry(ADMIN), "metrics_auth": entry(METRICS)}
    raw.update(overrides)
    return storage.config(**raw)


def headers_for(authorization: str | None, **more: str) -> dict[str, str]:
    return {**({} if authorization is None else {"Authorization": authorization}), **more}


@dataclass(frozen=True)
class Call:
    method: str
    url: str
    expected: int = 200
    body: bytes | None = None

    async def send(self, http: httpx.AsyncClient, authorization: str | None) -> httpx.Response:
        return await http.request(self.method, self.url, content=self.body, headers=headers_for(authorization))

    def __str__(self) -> str:
        return f"{self.method} {self.url}"


READS = [
    Call("GET", f"/{SHA}"),
    Call("HEAD", f"/{SHA}"),
    Call("GET", f"/{SHA.upper()}"),
    Call("GET", f"/{MISSING}", 404),
    Call("HEAD", f"/{MISSING}", 404),
    Call("GET", f"/file?path={NAME}"),
    Call("HEAD", f"/file?path={NAME}"),
    Call("GET", "/file?path=docs/absent.txt", 404),
    Call("GET", "/files"),
    Call("GET", "/files?prefix=docs/"),
    Call("POST", "/stat", body=json.dumps([SHA, MISSING]).encode()),
    Call("GET", "/favicon.ico", 404),
    Call("HEAD", "/not-a-sha", 404),
    Call("GET", f"/{SHA[:-1]}", 404),
]
PROBES = ["/", "/status", "/healthz", "/readyz"]


async def stored(http: httpx.AsyncClient) -> None:
    """DATA as a blob and as the named file NAME, stored by the writer."""
    assert (await http.post(f"/{SHA}", content=DATA, auth=AUTH)).status_code == 201
    assert (await http.put(f"/file?path={NAME}", content=DATA, auth=AUTH)).status_code == 201


def refused(answer: httpx.Response) -> str | None:
    """What is wrong with `answer` as a refusal, or None."""
    if answer.status_code != 401:
        return f"{answer.status_code} {answer.text[:80]!r}"
    if answer.headers.get("www-authenticate") != CHALLENGE:
        return f"401 with WWW-Authenticate {answer.headers.get('www-authenticate')!r}"
    if DATA in answer.content:
        return "401 with the blob's bytes"
    return None


class env_app_client(app_client):
    """`app_client` for a config read with `env` as the environment."""

    def __init__(self, raw: dict[str, Any], env: dict[str, str]) -> None:
        self.app = build_app(config_from_mapping(raw, env))


def stor_app(client: app_client) -> StorApp:
    assert isinstance(client.app, StorApp)
    return client.app


@pytest.fixture
def verified(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The passwords that go through a slow hash verification, in order."""
    calls: list[str] = []
    real = auth._verify

    def counted(hashed: str, password: str) -> bool:
        calls.append(password)
        return real(hashed, password)

    monkeypatch.setattr(auth, "_verify", counted)
    return calls


# -- reads -----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_with_read_auth_a_missing_or_wrong_credential_reads_nothing(storage: Storage) -> None:
    async with app_client(roles_config(storage)) as http:
        await stored(http)
        wrong = []
        for call in READS:
            for what, authorization in NOT_READING.items():
                problem = refused(await call.send(http, authorization))
                if problem:
                    wrong.append(f"{call} with {what}: {problem}")
    assert wrong == []


@pytest.mark.anyio
async def test_with_read_auth_readers_writers_and_admins_read(storage: Storage) -> None:
    async with app_client(roles_config(storage)) as http:
        await stored(http)
        wrong = []
        for call in READS:
            for who, authorization in READING.items():
                answer = await call.send(http, authorization)
                if answer.status_code != call.expected:
                    wrong.append(f"{call} as {who}: {answer.status_code} {answer.text[:80]!r}")
        for who, authorization in READING.items():
            as_who = headers_for(authorization)
            assert (await http.get(f"/{SHA}", headers=as_who)).content == DATA, who
            assert (await http.get(f"/file?path={NAME}", headers=as_who)).content == DATA, who
            ranged = await http.get(f"/{SHA}", headers={**as_who, "Range": "bytes=5-9"})
            assert ranged.status_code == 206 and ranged.content == DATA[5:10], who
            assert (await http.get("/files", headers=as_who)).json()["files"][0]["sha"] == SHA, who
            stat = (await http.post("/stat", content=json.dumps([SHA, MISSING]), headers=as_who)).json()
            assert stat[SHA]["size"] == len(DATA) and stat[MISSING] is None, who
    assert wrong == []


@pytest.mark.anyio
async def test_without_read_auth_reads_are_open(storage: Storage) -> None:
    raw = storage.config(admin_auth=entry(ADMIN), metrics_auth=entry(METRICS))
    async with app_client(raw) as http:
        await stored(http)
        wrong = []
        for call in READS:
            for what, authorization in {"no credential": None, **NOT_READING, **READING}.items():
                answer = await call.send(http, authorization)
                if answer.status_code != call.expected:
                    wrong.append(f"{call} with {what}: {answer.status_code} {answer.text[:80]!r}")
        assert (await http.get(f"/{SHA}")).content == DATA
        assert (await http.get(f"/file?path={NAME}")).content == DATA
    assert wrong == []


@pytest.mark.anyio
async def test_probes_stay_open_whatever_roles_are_set(storage: Storage) -> None:
    async with app_client(roles_config(storage)) as http:
        for path in PROBES:
            for authorization in (None, basic("mallory", "nope"), AS_METRICS, AS_READER):
                answer = await http.get(path, headers=headers_for(authorization))
                assert answer.status_code == 200, (path, authorization, answer.text)
                assert "www-authenticate" not in answer.headers


@pytest.mark.anyio
async def test_the_hot_path_refuses_what_the_ordinary_path_refuses(nowait_storage: Storage) -> None:
    """`answer_now` (what uvicorn's protocol asks before any ASGI cycle) never serves a hot
    blob, nor proves one absent, to a request the ordinary path would refuse."""
    hashed_reader = ("hashed", "hashed-pass")
    raw = roles_config(nowait_storage, read_auth=[entry(READER), f"{hashed_reader[0]}:{fast_bcrypt(hashed_reader[1])}"])
    client = app_client(raw)
    async with client as http:
        answer_now = stor_app(client).answer_now
        await stored(http)
        assert (await http.get(f"/{SHA}", auth=READER)).content == DATA  # kept open from here on
        assert (await http.get(f"/{MISSING}", auth=READER)).status_code == 404  # the kernel learns it

        def now(method: str, sha: str, authorization: str | None) -> int | None:
            head = [(b"host", b"stor")]
            if authorization is not None:
                head.append((b"authorization", authorization.encode("latin-1")))
            answer = answer_now(method, f"/{sha}", head, None)
            return None if answer is None else answer[0]

        # the blob is hot: a reader's GET and HEAD are answered on the spot...
        hot = answer_now("GET", f"/{SHA}", [(b"authorization", AS_READER.encode())], None)
        assert hot is not None and hot[0] == 200 and hot[2] == DATA
        assert now("HEAD", SHA, AS_READER) == 200
        assert now("GET", SHA, AS_ADMIN) == 200 and now("GET", SHA, AS_WRITER) == 200
        # ...and a refused request is left to the ordinary path, which answers 401
        for what, authorization in NOT_READING.items():
            for method, sha in [("GET", SHA), ("HEAD", SHA), ("GET", MISSING), ("HEAD", MISSING)]:
                assert now(method, sha, authorization) is None, (method, sha, what)
                assert refused(await http.request(method, f"/{sha}", headers=headers_for(authorization))) is None
        # a bcrypt reader not yet verified: the ordinary path verifies it (off the loop)...
        as_hashed = basic(*hashed_reader)
        assert now("GET", SHA, as_hashed) is None
        assert (await http.get(f"/{SHA}", headers={"Authorization": as_hashed})).content == DATA
        # ...and from then on it is answered on the spot; a wrong password never is
        assert now("GET", SHA, as_hashed) == 200
        assert now("GET", SHA, basic(hashed_reader[0], "wrong")) is None


# -- writes ----------------------------------------------------------------------------------

NOT_WRITING: dict[str, str | None] = {
    "no credential": None,
    "a reader": AS_READER,
    "a metrics reader": AS_METRICS,
    "the writer's user with a wrong password": basic(USER, "wrong"),
    "the admin's user with the writer's password": basic(ADMIN[0], PASSWORD),
}


@pytest.mark.anyio
async def test_writes_need_a_writer_or_an_admin(storage: Storage) -> None:
    async with app_client(roles_config(storage)) as http:
        await stored(http)
        new = os.urandom(500)
        wrong = []
        for what, authorization in NOT_WRITING.items():
            for method, url, body in [
                ("POST", f"/{sha256(new)}", new),
                ("PUT", f"/{sha256(new)}", new),
                ("PUT", "/file?path=new.txt", new),
                ("POST", "/files?path=new.txt", new),
                ("DELETE", f"/file?path={NAME}", None),
            ]:
                answer = await http.request(method, url, content=body, headers=headers_for(authorization))
                problem = refused(answer)
                if problem:
                    wrong.append(f"{method} {url} by {what}: {problem}")
        assert wrong == []
        assert storage.copies(sha256(new)) == [] and storage.temps() == []
        assert (await http.get("/file?path=new.txt", auth=READER)).status_code == 404
        assert (await http.get(f"/file?path={NAME}", auth=READER)).content == DATA

        for who, credential in [("writer", AUTH), ("admin", ADMIN)]:
            data = os.urandom(700)
            assert (await http.post(f"/{sha256(data)}", content=data, auth=credential)).status_code == 201, who
            other = os.urandom(700)
            assert (await http.put(f"/{sha256(other)}", content=other, auth=credential)).status_code == 201, who
            assert len(storage.copies(sha256(data))) == 2 and len(storage.copies(sha256(other))) == 2
            put = await http.put(f"/file?path={who}/put.txt", content=data, auth=credential)
            assert put.status_code == 201, (who, put.text)
            posted = await http.post(f"/files?path={who}/posted.txt", content=data, auth=credential)
            assert posted.status_code == 201, (who, posted.text)
            assert (await http.get(f"/file?path={who}/posted.txt", auth=READER)).content == data
            assert (await http.delete(f"/file?path={who}/put.txt", auth=credential)).status_code == 204, who
            assert (await http.get(f"/file?path={who}/put.txt", auth=READER)).status_code == 404


@pytest.mark.anyio
async def test_a_refusal_comes_before_any_body_byte_is_read_or_any_disk_touched(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each request announces a large body that never comes: the 401 is the answer at once, the
    body is never asked for, and nothing below the HTTP layer is called."""
    touched: list[str] = []
    for cls, method in [
        (BlobService, "put"),
        (BlobService, "stat_many"),
        (BlobService, "take_down"),
        (NamedFiles, "write"),
        (NamedFiles, "delete"),
    ]:
        real = getattr(cls, method)

        def spy(*args: Any, _real: Any = real, _name: str = method, **kwargs: Any) -> Any:
            touched.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(cls, method, spy)

    pulled: list[str] = []

    async def never_sent(label: str) -> AsyncIterator[bytes]:
        pulled.append(label)
        await asyncio.Event().wait()  # the client never sends a byte
        yield b""

    new = sha256(b"announced but never sent")
    requests: list[tuple[str, str, int, str | None]] = [
        ("POST", f"/{new}", 1_000_000_000, None),
        ("POST", f"/{new}", 1_000_000_000, AS_READER),
        ("PUT", f"/{new}", 1_000_000_000, AS_METRICS),
        ("PUT", "/file?path=big.bin", 1_000_000, AS_READER),
        ("POST", "/files?path=big.bin", 1_000_000, None),
        ("POST", "/stat", 1_000_000, None),
        ("POST", "/stat", 1_000_000, AS_METRICS),
        ("POST", "/not-a-sha", 1_000_000, AS_READER),
    ]
    async with app_client(roles_config(storage)) as http:
        for method, url, length, authorization in requests:
            label = f"{method} {url} with {authorization}"
            answer = await asyncio.wait_for(
                http.request(
                    method,
                    url,
                    content=never_sent(label),
                    headers=headers_for(authorization, **{"Content-Length": str(length)}),
                ),
                timeout=5,
            )
            assert refused(answer) is None, (label, answer.status_code, answer.text)
            assert answer.headers.get("connection") == "close", label  # the unread body ends the connection
            assert pulled == [] and touched == [], label
            assert storage.temps() == [] and storage.copies(new) == []
        assert (await http.get("/file?path=big.bin", auth=READER)).status_code == 404


@pytest.mark.integration
def test_a_refused_upload_announcing_a_huge_body_is_answered_at_once_by_a_real_server(
    storage: Storage, start_stor: Callable[..., StorProcess]
) -> None:
    """Over a socket, no body byte sent: the 401 comes at once, not after the 30 s idle timeout."""
    config = storage.write_config(read_auth=entry(READER), admin_auth=entry(ADMIN))
    server = start_stor("--config", str(config), "--server", "uvicorn", "--workers", "1")
    for authorization in (None, AS_READER):
        head = "" if authorization is None else f"Authorization: {authorization}\r\n"
        raw = f"POST /{SHA} HTTP/1.1\r\nHost: stor\r\nContent-Length: 1000000000\r\n{head}\r\n"
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(raw.encode())
            received = b""
            while b"\r\n\r\n" not in received:
                chunk = sock.recv(65536)
                assert chunk, f"closed without an answer: {received!r}"
                received += chunk
        status_line, *lines = received.split(b"\r\n\r\n")[0].decode().split("\r\n")
        assert status_line.startswith("HTTP/1.1 401 "), (authorization, received)
        assert f"www-authenticate: {CHALLENGE}".lower() in [line.lower() for line in lines]
        assert "connection: close" in [line.lower() for line in lines]
    assert storage.temps() == [] and storage.copies(SHA) == []


# -- takedowns -------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_takedown_needs_an_admin_and_a_reason(storage: Storage, monkeypatch: pytest.MonkeyPatch) -> None:
    taken: list[tuple[Any, ...]] = []
    real = BlobService.take_down

    async def spy(self: BlobService, sha: Any, admin: str, reason: str) -> Any:
        taken.append((sha, admin, reason))
        return await real(self, sha, admin, reason)

    monkeypatch.setattr(BlobService, "take_down", spy)
    async with app_client(roles_config(storage)) as http:
        await stored(http)
        wrong = []
        for what, authorization in {
            **NOT_WRITING,
            "the writer": AS_WRITER,
            "the admin's user with a wrong password": basic(ADMIN[0], "wrong"),
        }.items():
            for url in (f"/{SHA}", f"/{MISSING}", "/not-a-sha"):
                answer = await http.delete(url, headers=headers_for(authorization, **{"X-Stor-Reason": "dmca"}))
                problem = refused(answer)
                if problem:
                    wrong.append(f"DELETE {url} by {what}: {problem}")
        assert wrong == []
        for reason in (None, "", "   "):
            extra = {} if reason is None else {"X-Stor-Reason": reason}
            answer = await http.delete(f"/{SHA}", headers=headers_for(AS_ADMIN, **extra))
            assert answer.status_code == 400 and "X-Stor-Reason" in answer.text, (reason, answer.text)
        bad = await http.delete("/not-a-sha", headers=headers_for(AS_ADMIN, **{"X-Stor-Reason": "dmca"}))
        assert bad.status_code == 400, bad.text  # an admin's takedown of a non-sha: credentials pass, then 400
        assert taken == []
        assert len(storage.copies(SHA)) == 2
        assert (await http.get(f"/{SHA}", auth=READER)).content == DATA


# -- metrics ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_with_metrics_auth_metrics_need_a_metrics_or_admin_credential(storage: Storage) -> None:
    async with app_client(roles_config(storage)) as http:
        for what, authorization in {
            "no credential": None,
            "a reader": AS_READER,
            "the writer": AS_WRITER,
            "the metrics user with a wrong password": basic(METRICS[0], "wrong"),
            "an unknown user": basic("mallory", METRICS[1]),
        }.items():
            assert refused(await http.get("/metrics", headers=headers_for(authorization))) is None, what
        for who, authorization in {"metrics": AS_METRICS, "admin": AS_ADMIN}.items():
            answer = await http.get("/metrics", headers=headers_for(authorization))
            assert answer.status_code == 200 and "stor_" in answer.text, (who, answer.status_code)


@pytest.mark.anyio
async def test_without_metrics_auth_metrics_are_open(storage: Storage) -> None:
    async with app_client(roles_config(storage, metrics_auth=None)) as http:
        for authorization in (None, basic("mallory", "nope"), AS_READER):
            answer = await http.get("/metrics", headers=headers_for(authorization))
            assert answer.status_code == 200 and "stor_" in answer.text, authorization
        assert refused(await http.get(f"/{SHA}")) is None  # reads are still closed


# -- the environment -------------------------------------------------------------------------


@pytest.mark.parametrize(("key", "variable"), sorted(ROLE_KEYS.items()))
def test_the_environment_overrides_the_file_for_each_role(storage: Storage, key: str, variable: str) -> None:
    assert set(ROLE_KEYS) == set(auth.CONFIG_KEYS)
    raw = roles_config(storage, **{key: "file-user:file-pass"})
    others = {other: getattr(config_from_mapping(raw, {}), other) for other in ROLE_KEYS if other != key}
    assert getattr(config_from_mapping(raw, {}), key) == (Credential("file-user", "file-pass"),)

    def read(env: dict[str, str], file: dict[str, Any] = raw) -> Config:
        return config_from_mapping(file, env)

    assert getattr(read({variable: "env-user:env:pass"}), key) == (Credential("env-user", "env:pass"),)
    hashed = fast_bcrypt("pw")
    listed = read({variable: json.dumps(["one:1", f"two:{hashed}"])})
    assert getattr(listed, key) == (Credential("one", "1"), Credential("two", hashed))
    assert {other: getattr(listed, other) for other in others} == others  # the other roles: the file's
    assert getattr(read({variable: ""}), key) == (Credential("file-user", "file-pass"),)  # empty: the file's
    without = {k: v for k, v in raw.items() if k != key}
    assert getattr(read({variable: "env-only:pw"}, without), key) == (Credential("env-only", "pw"),)
    for bad in ("no-colon", ":no-user", "no-password:", '["ok:1", "bad"]', "[not json"):
        with pytest.raises(ConfigError, match=variable):
            read({variable: bad})


@pytest.mark.anyio
async def test_an_app_takes_every_role_from_the_environment(storage: Storage) -> None:
    env = {
        "STOR_BASIC_AUTH": "env-writer:w",
        "STOR_READ_AUTH": "env-reader:r",
        "STOR_ADMIN_AUTH": json.dumps(["env-admin:a", f"env-admin2:{fast_bcrypt('a2')}"]),
        "STOR_METRICS_AUTH": "env-metrics:m",
    }
    async with env_app_client(roles_config(storage), env) as http:
        data = os.urandom(100)
        for file_credential in (AUTH, ADMIN):  # the file's writer and admin write no more
            assert refused(await http.post(f"/{sha256(data)}", content=data, auth=file_credential)) is None
        assert (await http.post(f"/{SHA}", content=DATA, auth=("env-writer", "w"))).status_code == 201
        for file_credential in (READER, AUTH, ADMIN, METRICS):
            assert refused(await http.get(f"/{SHA}", auth=file_credential)) is None, file_credential
        for env_credential in (("env-reader", "r"), ("env-writer", "w"), ("env-admin", "a"), ("env-admin2", "a2")):
            assert (await http.get(f"/{SHA}", auth=env_credential)).content == DATA, env_credential
        assert refused(await http.delete(f"/{SHA}", auth=ADMIN, headers={"X-Stor-Reason": "x"})) is None
        for env_admin in (("env-admin", "a"), ("env-admin2", "a2")):
            assert (await http.delete(f"/{SHA}", auth=env_admin)).status_code == 400  # past the credentials
        assert refused(await http.get("/metrics", auth=METRICS)) is None
        assert (await http.get("/metrics", auth=("env-metrics", "m"))).status_code == 200
        assert (await http.get("/metrics", auth=("env-admin2", "a2"))).status_code == 200


# -- slow hashes, remembered -----------------------------------------------------------------


@pytest.mark.anyio
async def test_a_bcrypt_reader_is_verified_once_for_many_reads(storage: Storage, verified: list[str]) -> None:
    hashed = hash_password(READER[1], "bcrypt")
    assert hashed.startswith("$2b$")
    async with app_client(roles_config(storage, read_auth=f"{READER[0]}:{hashed}")) as http:
        await stored(http)
        assert verified == []  # a plain-text writer costs no verification
        for _ in range(20):
            answer = await http.get(f"/{SHA}", auth=READER)
            assert answer.status_code == 200 and answer.content == DATA
        assert verified == [READER[1]]
        for _ in range(2):
            assert refused(await http.get(f"/{SHA}", auth=(READER[0], "wrong"))) is None
        assert verified == [READER[1], "wrong", "wrong"]  # a wrong password is never remembered
        for call in READS:
            assert (await call.send(http, AS_READER)).status_code == call.expected, str(call)
        assert refused(await http.post(f"/{sha256(b'x')}", content=b"x", auth=READER)) is None  # a reader still
        assert verified == [READER[1], "wrong", "wrong"]


@pytest.mark.anyio
async def test_a_reload_forgets_what_was_verified(storage: Storage, verified: list[str]) -> None:
    hashed_reader = f"{READER[0]}:{fast_bcrypt(READER[1])}"
    path = storage.base / "config.json"
    raw = roles_config(storage, read_auth=hashed_reader)
    path.write_text(json.dumps(raw))
    client = app_client(raw)
    async with client as http:
        app = stor_app(client)
        reloader = Reloader(str(path), config_from_mapping(raw, {}), app.service, app.blobs.authenticator, build_pair)
        await stored(http)
        for _ in range(3):
            assert (await http.get(f"/{SHA}", auth=READER)).status_code == 200
        assert verified == [READER[1]]
        path.write_text(json.dumps({**raw, "read_auth": [hashed_reader, "other:pw"]}))
        assert any(change.startswith("read_auth") for change in await reloader.reload())
        for _ in range(3):
            assert (await http.get(f"/{SHA}", auth=READER)).status_code == 200
        assert verified == [READER[1], READER[1]]
        assert (await http.get(f"/{SHA}", auth=("other", "pw"))).status_code == 200


@pytest.mark.anyio
async def test_the_remembered_credentials_are_bounded(verified: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "REMEMBERED", 2)
    users = {f"u{n}": f"p{n}" for n in range(3)}
    checker = Authenticator({Role.READER: tuple(Credential(u, fast_bcrypt(p)) for u, p in users.items())})
    try:
        for user in ("u0", "u1", "u2", "u1", "u0", "u2", "u0"):
            assert await checker.check(basic(user, users[user]), READERS) == user
    finally:
        checker.close()
    # u0 was the least recently used when u2 came; then u2, once u1 had been used again;
    # then u1, and u0 (just used) was still remembered
    assert verified == ["p0", "p1", "p2", "p0", "p2"]


@pytest.mark.anyio
async def test_a_verification_in_flight_during_a_reload_is_not_remembered_after_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    entered, release = threading.Event(), threading.Event()
    real = auth._verify

    def slow(hashed: str, password: str) -> bool:
        entered.set()
        release.wait(10)
        return real(hashed, password)

    monkeypatch.setattr(auth, "_verify", slow)
    old = basic(READER[0], "old-pass")
    checker = Authenticator({Role.READER: (Credential(READER[0], fast_bcrypt("old-pass")),)})
    try:
        in_flight = asyncio.get_running_loop().create_task(checker.check(old, READERS))
        assert await asyncio.to_thread(entered.wait, 10)
        # the reload: the reader's password is changed while the old one is being verified
        checker.replace({Role.READER: (Credential(READER[0], fast_bcrypt("new-pass")),)})
        release.set()
        with pytest.raises(Unauthorized):  # judged by the credentials in force when it is answered
            await in_flight
        assert checker.check_now(old, READERS) is not True  # the hot path
        with pytest.raises(Unauthorized):
            await checker.check(old, READERS)
        assert await checker.check(basic(READER[0], "new-pass"), READERS) == READER[0]
    finally:
        release.set()
        checker.close()


def test_check_now_cannot_tell_a_slow_hash_it_has_not_verified() -> None:
    checker = Authenticator(
        {Role.READER: (Credential("hashed", fast_bcrypt("pw")),), Role.METRICS: (Credential(*METRICS),)}
    )
    try:
        assert checker.check_now(basic("hashed", "pw"), READERS) is UNKNOWN
        assert checker.check_now(AS_METRICS, READERS) is UNKNOWN  # might be a hashed reader's too
        assert checker.check_now(AS_METRICS, frozenset({Role.METRICS})) is True
        assert checker.check_now(None, frozenset({Role.ADMIN})) is False  # no admin at all
    finally:
        checker.close()


# -- real servers: the hot path, SIGHUP ------------------------------------------------------


def rewrite(path: Path, **changes: Any) -> None:
    """The config file with keys changed (None: removed)."""
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps({k: v for k, v in raw.items() if v is not None}))


def fresh(method: str, url: str, authorization: str | None, **more: str) -> httpx.Response:
    """One request on a new connection."""
    with httpx.Client(timeout=10) as http:
        return http.request(method, url, headers=headers_for(authorization, **more))


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["bcrypt", "plain"])
def test_a_real_server_refuses_a_hot_blob_without_a_read_credential(
    nowait_storage: Storage, start_stor: Callable[..., StorProcess], kind: str
) -> None:
    password = hash_password(READER[1], "bcrypt") if kind == "bcrypt" else READER[1]
    config = nowait_storage.write_config(
        read_auth=f"{READER[0]}:{password}", admin_auth=entry(ADMIN), metrics_auth=entry(METRICS)
    )
    server = start_stor("--config", str(config), "--server", "uvicorn", "--workers", "1")
    blob, missing = f"{server.url}/{SHA}", f"{server.url}/{MISSING}"
    with httpx.Client(timeout=10) as kept:
        assert kept.post(blob, content=DATA, auth=AUTH).status_code == 201
        for _ in range(3):  # the first opens the copy and keeps it open (and verifies a hash)
            warm = kept.get(blob, auth=READER)
            assert warm.status_code == 200 and warm.content == DATA
        assert kept.get(missing, auth=READER).status_code == 404  # the kernel learns it is absent
        assert refused(kept.get(blob)) is None  # the same kept-alive connection, no credential

    wrong = []
    for what, authorization in NOT_READING.items():
        requests: list[tuple[str, str, dict[str, str]]] = [
            ("GET", blob, {}),
            ("HEAD", blob, {}),
            ("GET", missing, {}),
            ("HEAD", missing, {}),
        ]
        if what == "no credential":
            requests.append(("GET", blob, {"Range": "bytes=0-9"}))
            requests.append(("GET", blob, {"If-None-Match": f'"{SHA}"'}))
        for method, url, more in requests:
            problem = refused(fresh(method, url, authorization, **more))
            if problem:
                wrong.append(f"{method} {url} {more} with {what}: {problem}")
    assert wrong == []

    for who, authorization in READING.items():
        got = fresh("GET", blob, authorization)
        assert got.status_code == 200 and got.content == DATA, who
        head = fresh("HEAD", blob, authorization)
        assert head.status_code == 200 and head.headers["content-length"] == str(len(DATA)), who
        assert fresh("GET", missing, authorization).status_code == 404, who
    assert fresh("GET", f"{server.url}/healthz", None).status_code == 200
    assert server.proc.poll() is None


@pytest.mark.integration
def test_sighup_applies_new_read_credentials_and_forgets_the_old(
    nowait_storage: Storage, start_stor: Callable[..., StorProcess]
) -> None:
    old, new = ("old", "old-pass"), ("new", "new-pass")
    config = nowait_storage.write_config(read_auth=f"{old[0]}:{fast_bcrypt(old[1])}")
    server = start_stor("--config", str(config), "--server", "uvicorn", "--workers", "1")
    assert wait_for(lambda: "Application startup complete" in server.log())
    blob = f"{server.url}/{SHA}"
    with httpx.Client(timeout=10) as kept:
        assert kept.post(blob, content=DATA, auth=AUTH).status_code == 201
        for _ in range(3):  # verified, remembered, and the blob hot
            assert kept.get(blob, auth=old).content == DATA
        assert refused(kept.get(blob, auth=new)) is None

        rewrite(config, read_auth=[f"{new[0]}:{fast_bcrypt(new[1])}"])
        os.kill(server.proc.pid, signal.SIGHUP)
        assert wait_for(lambda: server.log().count("config reloaded from") == 1), server.log()
        assert "read_auth: readers new" in server.log()
        assert refused(kept.get(blob, auth=old)) is None  # the kept-alive connection too
        assert kept.get(blob, auth=new).content == DATA
    for method in ("GET", "HEAD"):
        assert refused(fresh(method, blob, basic(*old))) is None, method
        assert refused(fresh(method, blob, None)) is None, method
        assert fresh(method, blob, basic(*new)).status_code == 200, method
    assert fresh("GET", blob, basic(*new)).content == DATA
    assert fresh("GET", f"{server.url}/metrics", None).status_code == 200

    # every list: reads open again, and /metrics and takedowns under credentials of their own
    rewrite(config, read_auth=None, metrics_auth=entry(METRICS), admin_auth=entry(ADMIN))
    os.kill(server.proc.pid, signal.SIGHUP)
    assert wait_for(lambda: server.log().count("config reloaded from") == 2), server.log()
    assert fresh("GET", blob, None).content == DATA
    assert refused(fresh("GET", f"{server.url}/metrics", None)) is None
    assert fresh("GET", f"{server.url}/metrics", AS_METRICS).status_code == 200
    assert fresh("DELETE", blob, AS_ADMIN).status_code == 400  # past the credentials: no reason given
    assert refused(fresh("DELETE", blob, AS_WRITER, **{"X-Stor-Reason": "x"})) is None
    assert server.proc.poll() is None
