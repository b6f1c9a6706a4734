"""The memcached location cache, against a real memcached."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from stor.backends.locations import CacheUnavailable, MemcachedLocations
from stor.config import config_from_mapping
from stor.digest import Sha
from stor.wiring.build import build_service
from tests.conftest import Storage, StorProcess, app_client
from tests.helpers import AUTH, layout_path, sha256
from tests.services import Memcached, StatsdSink, free_port

DATA = os.urandom(2000)
SHA = sha256(DATA)


def cache_config(
    storage: Storage, memcached: Memcached, sink: StatsdSink | None = None, **extra: object
) -> dict[str, object]:
    """memcached alone: the in-process LRU in front of it is off unless a test turns it on."""
    raw = storage.config(memcached_servers=[memcached.address], location_cache_size=0, open_file_cache_size=0)
    raw.update(extra)
    if sink is not None:
        raw["statsite"] = {"host": "127.0.0.1", "port": sink.port, "prefix": "stor"}
    return raw


@pytest.mark.anyio
async def test_hits_and_misses_are_counted(storage: Storage, memcached: Memcached, statsd_sink: StatsdSink) -> None:
    async with app_client(cache_config(storage, memcached, statsd_sink)) as http:
        assert (await http.post(f"/{SHA}", content=DATA, auth=AUTH)).status_code == 201
        root = memcached.get(f"stor:{SHA}")
        assert root is not None and layout_path(Path(root.decode()), SHA).exists()
        statsd_sink.collect()
        statsd_sink.lines.clear()
        assert (await http.get(f"/{SHA}")).content == DATA
        names = statsd_sink.names()
        assert "stor.cache.hit" in names and "stor.cache.time" in names
        assert "stor.lookup.time" not in names  # a hit needs no probe of the disks
        other = sha256(b"absent")
        assert (await http.get(f"/{other}")).status_code == 404
        names = statsd_sink.names()
        assert "stor.cache.miss" in names and "stor.lookup.time" in names
        metrics = (await http.get("/metrics")).text
        assert 'stor_cache_lookups_total{result="hit"} 1.0' in metrics
        assert 'stor_cache_lookups_total{result="miss"} 1.0' in metrics


@pytest.mark.anyio
async def test_a_stale_entry_gives_the_right_answer_and_heals(storage: Storage, memcached: Memcached) -> None:
    async with app_client(cache_config(storage, memcached)) as http:
        assert (await http.post(f"/{SHA}", content=DATA, auth=AUTH)).status_code == 201
        holder = {c.parents[3] for c in storage.copies(SHA)}
        elsewhere = next(r for r in storage.roots if r not in holder)
        memcached.set(f"stor:{SHA}", str(elsewhere).encode())  # points at a disk without it
        response = await http.get(f"/{SHA}")
        assert response.status_code == 200 and response.content == DATA
        healed = memcached.get(f"stor:{SHA}")
        assert healed is not None and Path(healed.decode()) in holder
        memcached.set(f"stor:{SHA}", b"/no/such/disk")  # points at nothing stor knows
        assert (await http.head(f"/{SHA}")).status_code == 200
        # the copy the cache names disappears: the partner answers
        storage.copies(SHA)[0].unlink()
        for _ in range(5):
            assert (await http.get(f"/{SHA}")).content == DATA


@pytest.mark.anyio
async def test_memcached_killed_requests_keep_succeeding(storage: Storage, memcached: Memcached) -> None:
    async with app_client(cache_config(storage, memcached)) as http:
        assert (await http.post(f"/{SHA}", content=DATA, auth=AUTH)).status_code == 201
        memcached.kill()
        started = time.monotonic()
        for n in range(20):
            assert (await http.get(f"/{SHA}")).content == DATA
            blob = f"after the cache died {n}".encode()
            assert (await http.post(f"/{sha256(blob)}", content=blob, auth=AUTH)).status_code == 201
        assert time.monotonic() - started < 10
        detail = (await http.get("/status?format=json")).json()
        assert detail["ok"] is True  # the cache is not a reason to leave the load balancer
        assert detail["memcached"] == {"configured": True, "reachable": False}
        metrics = (await http.get("/metrics")).text
        assert 'stor_cache_lookups_total{result="error"}' in metrics


@pytest.mark.anyio
async def test_memcached_hung_requests_answer_within_a_bound(storage: Storage, memcached: Memcached) -> None:
    async with app_client(cache_config(storage, memcached, memcached_timeout=0.05)) as http:
        assert (await http.post(f"/{SHA}", content=DATA, auth=AUTH)).status_code == 201
        memcached.stop()
        try:
            for _ in range(10):
                started = time.monotonic()
                assert (await http.get(f"/{SHA}")).content == DATA
                assert time.monotonic() - started < 1.0
        finally:
            memcached.resume()


def test_two_processes_share_disks_and_cache(
    storage: Storage, memcached: Memcached, start_stor: Callable[..., StorProcess]
) -> None:
    config = storage.write_config(memcached_servers=[memcached.address], memcached_negative_ttl=30)
    first = start_stor("--config", str(config))
    second = start_stor("--config", str(config), "--host", "127.0.0.2")
    assert second.url.startswith("http://127.0.0.2:")
    for n in range(5):
        blob = f"shared {n}".encode()
        sha = sha256(blob)
        assert httpx.get(f"{second.url}/{sha}").status_code == 404  # and now a negative entry
        assert memcached.get(f"stor:{sha}") == b"-"
        assert httpx.post(f"{first.url}/{sha}", content=blob, auth=AUTH).status_code == 201
        response = httpx.get(f"{second.url}/{sha}")
        assert response.status_code == 200 and response.content == blob


@pytest.mark.anyio
async def test_memcached_down_at_start_up_then_back(storage: Storage, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="stor.service.status")
    port = free_port()
    raw = storage.config(memcached_servers=[f"127.0.0.1:{port}"], location_cache_size=0, open_file_cache_size=0)
    async with app_client(raw) as http:
        assert (await http.post(f"/{SHA}", content=DATA, auth=AUTH)).status_code == 201
        assert (await http.get(f"/{SHA}")).content == DATA
        detail = (await http.get("/status?format=json")).json()
        assert detail["ok"] is True and detail["memcached"]["reachable"] is False
        revived = Memcached(port)
        try:
            deadline = time.monotonic() + 5
            while not (await http.get("/status?format=json")).json()["memcached"]["reachable"]:
                assert time.monotonic() < deadline, "memcached recovery not noticed"
                await asyncio.sleep(0.1)
            assert (await http.get(f"/{SHA}")).content == DATA
            assert revived.get(f"stor:{SHA}") is not None  # used again at once
        finally:
            revived.kill()
    said = [record.getMessage() for record in caplog.records]
    assert said.count("memcached is unreachable: locations come from the disks until it is back") == 1
    assert said.count("memcached is reachable again") == 1


@pytest.mark.anyio
async def test_the_in_process_lru_answers_before_memcached(
    storage: Storage, memcached: Memcached, statsd_sink: StatsdSink
) -> None:
    async with app_client(cache_config(storage, memcached, statsd_sink, location_cache_size=1000)) as http:
        assert (await http.post(f"/{SHA}", content=DATA, auth=AUTH)).status_code == 201
        statsd_sink.collect()
        statsd_sink.lines.clear()
        memcached.kill()  # not needed any more for this blob
        for _ in range(3):
            assert (await http.get(f"/{SHA}")).content == DATA
        counts = statsd_sink.counts()
        assert counts.get("stor.cache.hit") == 3  # known without probing: Stor's hit
        assert "stor.cache.error" not in counts and "stor.lookup.time" not in statsd_sink.names()
        # a location gone stale is dropped and the disks answer: never a false hit
        for copy in storage.copies(SHA):
            copy.unlink()
        assert (await http.get(f"/{SHA}")).status_code == 404
        assert "stor.cache.stale" in statsd_sink.names()


@pytest.mark.anyio
async def test_a_memcached_hit_fills_the_in_process_lru(
    storage: Storage, memcached: Memcached, statsd_sink: StatsdSink
) -> None:
    """Another node stored the blob: the first GET here asks memcached, the next ones don't."""
    async with app_client(cache_config(storage, memcached, location_cache_size=0, open_file_cache_size=0)) as writer:
        assert (await writer.post(f"/{SHA}", content=DATA, auth=AUTH)).status_code == 201
    async with app_client(cache_config(storage, memcached, statsd_sink, location_cache_size=1000)) as reader:
        for _ in range(3):
            assert (await reader.get(f"/{SHA}")).content == DATA
        metrics = (await reader.get("/metrics")).text
    assert statsd_sink.counts().get("stor.cache.hit") == 3  # memcached once, then the near cache
    assert 'stor_cache_lookups_total{result="hit"} 1.0' in metrics
    assert 'stor_cache_lookups_total{result="local"} 2.0' in metrics


@pytest.mark.anyio
async def test_locations_are_hashed_across_several_servers(storage: Storage) -> None:
    servers = [Memcached(), Memcached()]
    try:
        raw = storage.config(
            memcached_servers=[s.address for s in servers], location_cache_size=0, open_file_cache_size=0
        )
        async with app_client(raw) as http:
            shas = []
            for n in range(40):
                blob = f"spread {n}".encode()
                shas.append(sha256(blob))
                assert (await http.post(f"/{shas[-1]}", content=blob, auth=AUTH)).status_code == 201
            held = [sum(1 for sha in shas if server.get(f"stor:{sha}") is not None) for server in servers]
            assert sum(held) == 40 and min(held) > 0  # each key on one server, both servers used
            servers[0].kill()
            for sha in shas:  # half the keys lost their server: the disks still answer
                assert (await http.head(f"/{sha}")).status_code == 200
    finally:
        for server in servers:
            server.kill()


@pytest.mark.anyio
@pytest.mark.parametrize("turns", range(8))  # where, among the answer's callbacks, the cancellation lands
async def test_the_health_loop_stops_when_cancelled_as_the_cache_check_finishes(
    turns: int, storage: Storage, memcached: Memcached
) -> None:
    """Python 3.11's asyncio.wait_for swallowed a cancellation that came just as what it
    awaited finished: a stopping server's health loop then ran on, and its shutdown hung (the
    suite's unexplained hang, always in a test with memcached configured)."""
    service = build_service(config_from_mapping(cache_config(storage, memcached), {}))
    locations = service.locations
    assert locations is not None
    asked, answered = threading.Event(), threading.Event()
    real = locations.reachable

    def reachable() -> bool | None:
        asked.set()
        try:
            return real()
        finally:
            answered.set()

    locations.reachable = reachable  # type: ignore[method-assign]
    await service.offload.run(service.prepare)
    background = asyncio.ensure_future(service.run_background(3600.0))
    try:
        while not asked.is_set():
            await asyncio.sleep(0.005)
        answered.wait(5)  # the loop is held here: the answer is queued for it, not yet seen
        time.sleep(0.05)
        for _ in range(turns):
            await asyncio.sleep(0)  # one turn of the loop: the answer's callbacks move on
        background.cancel()
        done, _ = await asyncio.wait([background], timeout=5)
        assert done and background.cancelled()
    finally:
        service.close()


class HeldMemcached:
    """A listener that speaks just enough memcached: each `get` waits for `answer()`, then
    misses. It records every connection, and whether the client closed it."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.connections: list[socket.socket] = []
        self.asked = threading.Event()
        self.go = threading.Event()
        self.closed_by_client = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                connection, _ = self.listener.accept()
                self.connections.append(connection)
                threading.Thread(target=self._answer, args=(connection,), daemon=True).start()

    def _answer(self, connection: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while connection.recv(4096):
                self.asked.set()
                self.go.wait()
                connection.sendall(b"END\r\n")
        self.closed_by_client.set()

    def close(self) -> None:
        self.listener.close()
        for connection in self.connections:
            connection.close()


def test_close_waits_for_a_call_in_flight_and_leaves_no_connection_open() -> None:
    server = HeldMemcached()
    host, port = server.address.split(":")
    cache = MemcachedLocations(((host, int(port)),), timeout=5.0, ttl=60, negative_ttl=0)
    try:
        call = threading.Thread(target=cache.get, args=(Sha(SHA),))
        call.start()
        assert server.asked.wait(5)
        closing = threading.Thread(target=cache.close)
        closing.start()
        closing.join(0.3)
        assert closing.is_alive()  # still waiting for the call, which holds a connection
        server.go.set()
        closing.join(5)
        call.join(5)
        assert not closing.is_alive() and not call.is_alive()
        assert server.closed_by_client.wait(5)  # the call's connection was closed, not left to the GC
        with pytest.raises(CacheUnavailable):
            cache.get(Sha(SHA))
        assert cache.reachable() is False
        time.sleep(0.1)
        assert len(server.connections) == 1  # a call after close opened no new connection
    finally:
        server.go.set()
        server.close()
