"""Pipelines hear from stor (DESIGN.md §4): Stor's `rabbitmq_uri` stream of requested shas, and
blob lifecycle events published at least once, against a real RabbitMQ broker."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import aiormq
import httpx
import pytest

from stor.config import config_from_mapping
from stor.errors import ConfigError
from tests.conftest import Storage, StorProcess, app_client
from tests.helpers import AUTH, sha256
from tests.services import RabbitMQ, free_port

ADMIN = ("admin", "admin-pass")

pytestmark = pytest.mark.anyio


class Queue:
    """A queue of our own bound to `exchange` (declared as stor declares it) with `binding`,
    read with `basic_get`. Durable, so it keeps what arrives while the broker restarts."""

    def __init__(self, broker: RabbitMQ, exchange: str, binding: str) -> None:
        self.broker, self.exchange, self.binding = broker, exchange, binding
        self.name = f"test-{uuid.uuid4().hex}"

    async def __aenter__(self) -> Queue:
        connection = await aiormq.connect(self.broker.url)
        channel = await connection.channel()
        await channel.exchange_declare(self.exchange, exchange_type="topic", durable=True)
        await channel.queue_declare(self.name, durable=True)
        await channel.queue_bind(self.name, self.exchange, routing_key=self.binding)
        await connection.close()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.broker.proc is None:
            return
        connection = await aiormq.connect(self.broker.url)
        channel = await connection.channel()
        await channel.queue_delete(self.name)
        await connection.close()

    async def take(self, count: int, timeout: float = 20.0) -> list[tuple[str, bytes]]:
        """`count` messages (routing key, body), or fewer when `timeout` passes first."""
        got: list[tuple[str, bytes]] = []
        deadline = time.monotonic() + timeout
        connection = await aiormq.connect(self.broker.url)
        try:
            channel = await connection.channel()
            while len(got) < count and time.monotonic() < deadline:
                message = await channel.basic_get(self.name, no_ack=True)
                if message.delivery is None or (message.body == b"" and message.routing_key is None):
                    await asyncio.sleep(0.05)
                    continue
                got.append((str(message.routing_key), bytes(message.body)))
        finally:
            await connection.close()
        return got


def events_of(messages: list[tuple[str, bytes]]) -> list[dict[str, Any]]:
    bodies = [json.loads(body) for _, body in messages]
    assert [key for key, _ in messages] == [body["event"] for body in bodies]  # routed by the event
    return bodies


async def test_requested_shas_are_published_as_stor_did(storage: Storage, rabbitmq: RabbitMQ) -> None:
    data = os.urandom(3000)
    present, absent = sha256(data), sha256(b"wanted, not stored")
    async with Queue(rabbitmq, "stor", "sha") as queue, app_client(storage.config(rabbitmq_uri=rabbitmq.url)) as http:
        assert (await http.post(f"/{present}", content=data, auth=AUTH)).status_code == 201
        assert (await http.get(f"/{present}")).status_code == 200
        assert (await http.get(f"/{absent}")).status_code == 404  # a miss is announced too
        assert (await http.head(f"/{present.upper()}")).status_code == 200
        got = await queue.take(3)
        assert got == [("sha", present.encode()), ("sha", absent.encode()), ("sha", present.encode())]
        status = (await http.get("/status", params={"format": "json"})).json()
        assert status["rabbitmq"]["reachable"] is True and status["rabbitmq"]["published"] == 3


async def test_the_uri_chooses_exchange_and_routing_key(storage: Storage, rabbitmq: RabbitMQ) -> None:
    uri = f"{rabbitmq.url}?exchange=samples-wanted&routing_key=wanted&heartbeat=10"
    sha = sha256(b"asked for")
    async with (
        Queue(rabbitmq, "samples-wanted", "wanted") as queue,
        app_client(storage.config(rabbitmq_uri=uri)) as http,
    ):
        assert (await http.get(f"/{sha}")).status_code == 404
        assert await queue.take(1) == [("wanted", sha.encode())]


async def test_the_blob_lifecycle_is_published(storage: Storage, rabbitmq: RabbitMQ) -> None:
    config = storage.config(events={"amqp_uri": rabbitmq.url}, admin_auth=f"{ADMIN[0]}:{ADMIN[1]}")
    data, named = os.urandom(5000), os.urandom(700)
    sha = sha256(data)
    async with Queue(rabbitmq, "stor.events", "#") as queue, app_client(config) as http:
        assert (await http.post(f"/{sha}", content=data, auth=AUTH)).status_code == 201
        assert (await http.post(f"/{sha}", content=data, auth=AUTH)).status_code == 200  # a duplicate: no event
        assert (await http.put("/file", params={"path": "a/b.txt"}, content=named, auth=AUTH)).status_code == 201
        assert (await http.delete("/file", params={"path": "a/b.txt"}, auth=AUTH)).status_code == 204
        taken = await http.delete(f"/{sha}", auth=ADMIN, headers={"X-Stor-Reason": "legal request"})
        assert taken.status_code == 200
        assert (await http.post(f"/{sha}", content=data, auth=ADMIN)).status_code == 201
        events = events_of(await queue.take(7))
        assert [e["event"] for e in events] == [
            "blob.stored",
            "blob.stored",
            "name.put",
            "name.deleted",
            "blob.taken_down",
            "blob.restored",
        ]
        stored = events[0]
        assert stored["sha"] == sha and stored["size"] == len(data) and stored["pair"] in (0, 1)
        assert stored["node"] and abs(stored["time"] - time.time()) < 60
        assert events[1]["sha"] == sha256(named) and events[2] == {**events[2], "name": "a/b.txt", "sha": sha256(named)}
        assert events[4]["reason"] == "legal request" and events[5]["sha"] == sha
        assert await queue.take(1, timeout=1.0) == []  # and nothing more
        status = (await http.get("/status", params={"format": "json"})).json()["events"]
        assert status["reachable"] is True and status["published"] == 6


async def test_a_broker_away_at_start_up_and_during_uploads_loses_nothing(storage: Storage, rabbitmq: RabbitMQ) -> None:
    config = storage.config(events={"amqp_uri": rabbitmq.url}, rabbitmq_uri=rabbitmq.url)
    blobs = [os.urandom(2000) for _ in range(12)]
    async with Queue(rabbitmq, "stor.events", "blob.stored") as queue, Queue(rabbitmq, "stor", "sha") as hints:
        rabbitmq.stop()  # away before stor starts
        try:
            async with app_client(config) as http:
                for data in blobs[:6]:
                    assert (await http.post(f"/{sha256(data)}", content=data, auth=AUTH)).status_code == 201
                    assert (await http.get(f"/{sha256(data)}")).status_code == 200  # hints wait in memory
                await asyncio.sleep(1.5)
                status = (await http.get("/status", params={"format": "json"})).json()
                assert status["events"]["reachable"] is False and status["events"]["last_error"]
                assert status["rabbitmq"]["reachable"] is False and status["rabbitmq"]["buffered"] == 6
                rabbitmq.start()
                first = events_of(await queue.take(6, timeout=40))
                assert sorted(e["sha"] for e in first) == sorted(sha256(d) for d in blobs[:6])
                assert sorted(body for _, body in await hints.take(6)) == sorted(sha256(d).encode() for d in blobs[:6])
                rabbitmq.stop()  # an outage during uploads
                for data in blobs[6:]:
                    assert (await http.post(f"/{sha256(data)}", content=data, auth=AUTH)).status_code == 201
                rabbitmq.start()
                rest = events_of(await queue.take(6, timeout=40))
                assert sorted(e["sha"] for e in rest) == sorted(sha256(d) for d in blobs[6:])
        finally:
            if rabbitmq.proc is None:
                rabbitmq.start()


async def test_refused_credentials_fail_no_request(storage: Storage, rabbitmq: RabbitMQ) -> None:
    wrong = rabbitmq.url.replace(RabbitMQ.PASSWORD, "wrong-password")
    async with app_client(storage.config(events={"amqp_uri": wrong}, rabbitmq_uri=wrong)) as http:
        data = os.urandom(1000)
        assert (await http.post(f"/{sha256(data)}", content=data, auth=AUTH)).status_code == 201
        assert (await http.get(f"/{sha256(data)}")).status_code == 200
        for _ in range(100):
            status = (await http.get("/status", params={"format": "json"})).json()
            if status["events"]["last_error"] and status["rabbitmq"]["last_error"]:
                break
            await asyncio.sleep(0.1)
        assert "credentials" in status["events"]["last_error"] and status["events"]["backlog"] >= 0
        assert status["rabbitmq"]["reachable"] is False


def test_events_in_the_outbox_survive_sigkill(
    storage: Storage, rabbitmq: RabbitMQ, start_stor: Callable[..., StorProcess]
) -> None:
    dead_broker = f"amqp://stor:stor-pass@127.0.0.1:{free_port()}/%2f"
    path = storage.base / "config.json"
    path.write_text(json.dumps(storage.config(events={"amqp_uri": dead_broker})))
    server = start_stor("--config", str(path), "--workers", "2")
    blobs = [os.urandom(1500) for _ in range(10)]
    for data in blobs:
        assert httpx.post(f"{server.url}/{sha256(data)}", content=data, auth=AUTH).status_code == 201
    os.killpg(server.proc.pid, signal.SIGKILL)  # no goodbye: the events are only on the disks
    server.proc.wait()
    outbox = [p for root in storage.roots for p in (root / ".stor-events").rglob("*.json")]
    assert len(outbox) == 10

    async def consume() -> list[dict[str, Any]]:
        async with Queue(rabbitmq, "stor.events", "blob.stored") as queue:
            path.write_text(json.dumps(storage.config(events={"amqp_uri": rabbitmq.url})))
            start_stor("--config", str(path), "--workers", "2")
            return events_of(await queue.take(10, timeout=30))

    events = asyncio.run(consume())
    assert sorted(e["sha"] for e in events) == sorted(sha256(d) for d in blobs)


def test_two_workers_publish_each_event_once(
    storage: Storage, rabbitmq: RabbitMQ, start_stor: Callable[..., StorProcess]
) -> None:
    path = storage.base / "config.json"
    path.write_text(json.dumps(storage.config(events={"amqp_uri": rabbitmq.url}, rabbitmq_uri=rabbitmq.url)))
    blobs = [os.urandom(1200) for _ in range(30)]

    async def run() -> tuple[list[dict[str, Any]], list[tuple[str, bytes]]]:
        async with Queue(rabbitmq, "stor.events", "#") as queue, Queue(rabbitmq, "stor", "sha") as hints:
            server = start_stor("--config", str(path), "--workers", "2")
            async with httpx.AsyncClient() as http:
                for data in blobs:
                    answer = await http.post(f"{server.url}/{sha256(data)}", content=data, auth=AUTH)
                    assert answer.status_code == 201
                for data in blobs:  # fresh connections: both workers, the hot path too
                    async with httpx.AsyncClient() as fresh:
                        for _ in range(2):
                            assert (await fresh.get(f"{server.url}/{sha256(data)}")).content == data
            events = events_of(await queue.take(31, timeout=10))
            return events, await hints.take(60)

    events, hints = asyncio.run(run())
    assert sorted(e["sha"] for e in events) == sorted(sha256(d) for d in blobs)  # each once, none lost
    assert sorted(body for _, body in hints) == sorted(sha256(d).encode() for d in blobs for _ in range(2))


@pytest.mark.parametrize(
    ("raw", "named"),
    [
        ({"rabbitmq_uri": "http://127.0.0.1/"}, "rabbitmq_uri"),
        ({"rabbitmq_uri": "amqp://127.0.0.1:70000/"}, "rabbitmq_uri"),
        ({"rabbitmq_uri": "amqp://127.0.0.1/?exchnage=x"}, "rabbitmq_uri"),
        ({"rabbitmq_uri": "amqp://127.0.0.1/?heartbeat=soon"}, "rabbitmq_uri"),
        ({"rabbitmq_uri": 5}, "rabbitmq_uri"),
        ({"events": "amqp://127.0.0.1/"}, "events"),
        ({"events": {"amqp_uri": "amqp://127.0.0.1/", "exchang": "x"}}, "events.exchang"),
        ({"events": {"amqp_uri": "amqps://127.0.0.1:0/"}}, "events.amqp_uri"),
        ({"events": {}}, "events.amqp_uri"),
    ],
)
def test_a_malformed_broker_setting_is_a_start_up_error(storage: Storage, raw: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        config_from_mapping({**storage.config(), **raw}, {})


def test_a_stor_config_with_rabbitmq_uri_loads_unchanged(tmp_path: Path) -> None:
    (tmp_path / "d1").mkdir()
    (tmp_path / "d2").mkdir()
    stor_config = {
        "storage_pairs": [[str(tmp_path / "d1"), str(tmp_path / "d2")]],
        "basic_auth": "user:pass",
        "rabbitmq_uri": "amqp://guest:guest@localhost:5672/%2f?exchange=stor&routing_key=sha",
        "secret": "mojolicious",
        "check_mountpoints": False,
    }
    config = config_from_mapping(stor_config, {})
    assert config.rabbitmq_uri is not None and config.rabbitmq_uri.exchange == "stor"
    assert "guest:guest" not in repr(config.rabbitmq_uri)  # the password is not logged
