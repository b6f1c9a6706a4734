"""Taking a blob down for good (DESIGN.md §1 "Takedown"): DELETE /{sha} by an admin, 410 from
then on on every worker and node, and no path that writes or serves a copy brings it back."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from stor.config import config_from_mapping
from stor.service.portal import Portal
from stor.tools.scrub import Scrubber
from stor.wiring.build import build_service
from tests.conftest import Storage, StorProcess, app_client
from tests.helpers import AUTH, layout_path, sha256, wait_for

pytestmark = pytest.mark.anyio

ADMIN = ("admin", "admin-pass")
READER = ("reader", "reader-pass")
DATA = os.urandom(10_000)
SHA = sha256(DATA)
REASON = "a customer's private document, submitted by mistake"


def config(storage: Storage, **overrides: Any) -> dict[str, Any]:
    return storage.config(admin_auth=f"{ADMIN[0]}:{ADMIN[1]}", **overrides)


async def take_down(http: httpx.AsyncClient, sha: str = SHA, reason: str = REASON) -> httpx.Response:
    return await http.delete(f"/{sha}", auth=ADMIN, headers={"X-Stor-Reason": reason})


def tombstones(storage: Storage, sha: str = SHA) -> list[Path]:
    return [p for root in storage.pairs[0] if (p := root / ".stor-tombstones" / f"{sha.upper()}.json").exists()]


async def test_a_takedown_removes_every_copy_and_answers_410_from_then_on(storage: Storage) -> None:
    async with app_client(config(storage)) as http:
        assert (await http.post(f"/{SHA}", content=DATA, auth=AUTH)).status_code == 201
        assert (await http.get(f"/{SHA}")).content == DATA  # warm: kept open, location remembered
        copies = storage.copies(SHA)
        assert len(copies) == 2
        response = await take_down(http)
        assert response.status_code == 200, response.text
        report = response.json()
        assert sorted(report["removed"]) == sorted(str(p) for p in copies)
        assert report["admin"] == "admin" and report["reason"] == REASON
        assert storage.copies(SHA) == [] and len(tombstones(storage)) == 2
        for method in ("GET", "HEAD"):
            gone = await http.request(method, f"/{SHA}")
            assert gone.status_code == 410
        body = (await http.get(f"/{SHA}")).text
        assert REASON in body and "admin" in body and "taken down" in body
        assert (await take_down(http)).status_code == 410  # twice: already gone
        stat = await http.post("/stat", json=[SHA])
        assert stat.json() == {SHA: None}


async def test_bad_takedowns(storage: Storage) -> None:
    async with app_client(config(storage, read_auth=f"{READER[0]}:{READER[1]}")) as http:
        assert (await http.post(f"/{SHA}", content=DATA, auth=AUTH)).status_code == 201
        for who in [AUTH, READER, ("admin", "wrong")]:
            refused = await http.delete(f"/{SHA}", auth=who, headers={"X-Stor-Reason": REASON})
            assert refused.status_code == 401 and refused.headers["www-authenticate"] == 'Basic realm="stor"'
        anonymous = await http.delete(f"/{SHA}", headers={"X-Stor-Reason": REASON})
        assert anonymous.status_code == 401
        assert len(storage.copies(SHA)) == 2
        assert (await http.delete(f"/{SHA}", auth=ADMIN)).status_code == 400  # no reason given
        assert (await http.delete("/not-a-sha", auth=ADMIN, headers={"X-Stor-Reason": REASON})).status_code == 400
        assert (await take_down(http, sha256(b"never stored"))).status_code == 404
        assert tombstones(storage, sha256(b"never stored")) == []
        assert len(storage.copies(SHA)) == 2


async def test_quarantined_copies_go_too_and_named_files_answer_410(storage: Storage) -> None:
    async with app_client(config(storage)) as http:
        put = await http.put("/file", params={"path": "docs/private.pdf"}, content=DATA, auth=AUTH)
        assert put.status_code == 201
        quarantine = storage.pairs[0][0] / ".stor-quarantine"
        quarantine.mkdir(exist_ok=True)
        held = quarantine / f"{SHA.upper()}.123.dat"
        held.write_bytes(DATA)
        (quarantine / f"{SHA.upper()}.123.json").write_text("{}")
        report = (await take_down(http)).json()
        assert report["quarantined_removed"] == [str(held)] and not list(quarantine.iterdir())
        assert (await http.get("/file", params={"path": "docs/private.pdf"})).status_code == 410


async def test_a_writer_cannot_store_it_again_but_an_admin_restores_it(storage: Storage) -> None:
    async with app_client(config(storage)) as http:
        assert (await http.post(f"/{SHA}", content=DATA, auth=AUTH)).status_code == 201
        assert (await take_down(http)).status_code == 200
        for method in ("POST", "PUT"):
            refused = await http.request(method, f"/{SHA}", content=DATA, auth=AUTH)
            assert refused.status_code == 410
        named = await http.put("/file", params={"path": "again"}, content=DATA, auth=AUTH)
        assert named.status_code == 410
        assert storage.copies(SHA) == [] and storage.temps() == []
        restored = await http.post(f"/{SHA}", content=DATA, auth=ADMIN)
        assert restored.status_code == 201 and len(storage.copies(SHA)) == 2
        assert tombstones(storage) == []
        assert (await http.get(f"/{SHA}")).content == DATA
        assert (await http.post(f"/{SHA}", content=DATA, auth=AUTH)).status_code == 200


async def test_a_copy_left_on_a_member_is_never_healed_or_served(storage: Storage) -> None:
    """A member away during the takedown comes back holding a copy: it is not served, not copied
    to its partner (the partner heal), and `stor scrub --repair` removes it."""
    async with app_client(config(storage)) as http:
        assert (await http.post(f"/{SHA}", content=DATA, auth=AUTH)).status_code == 201
        first = storage.copies(SHA)[0]
        kept = first.with_suffix(".kept")
        shutil.copy2(first, kept)
        assert (await take_down(http)).status_code == 200
        kept.replace(first)  # back, as if its member had been away
        for _ in range(3):
            assert (await http.get(f"/{SHA}")).status_code == 410
        await asyncio.sleep(0.3)  # a heal, if one were (wrongly) asked for, would run now
        assert storage.copies(SHA) == [first]
    report = await asyncio.to_thread(scrub, storage, repair=False)
    assert report["taken_down_copies"] == 1 and report["damage_left"] >= 1
    report = await asyncio.to_thread(scrub, storage, repair=True)
    assert report["taken_down_removed"] == 1 and storage.copies(SHA) == []


def scrub(storage: Storage, *, repair: bool) -> dict[str, Any]:
    service = build_service(config_from_mapping(config(storage), {}))
    service.prepare(sweep=False)
    try:
        with Portal() as portal:

            def rewrite(sha: Any, pair: Any, targets: Any, chunks: Any, size: int, mtime: int) -> Any:
                return portal.submit(service.repair(sha, pair, targets, service.body_from(chunks), size, mtime))

            report = Scrubber(service.pairs, tombstones=service.tombstones, repair=rewrite if repair else None).run()
    finally:
        service.close()
    return report.as_dict()


async def test_a_takedown_while_a_member_is_away_catches_up_by_scrub(storage: Storage) -> None:
    storage.pairs = storage.pairs[:1]  # the blob, and the takedown records, on the same pair
    async with app_client(config(storage)) as http:
        assert (await http.post(f"/{SHA}", content=DATA, auth=AUTH)).status_code == 201
    away = storage.pairs[0][1]
    hidden = away.with_name("away")
    async with app_client(config(storage)) as http:
        away.rename(hidden)  # the member goes away while the server runs
        try:
            for _ in range(100):
                if not (await http.get("/status")).is_success:
                    break
                await asyncio.sleep(0.05)
            response = await take_down(http)
            assert response.status_code == 200, response.text
            assert response.json()["tombstone_on"] == [str(storage.pairs[0][0])]
            assert (await http.get(f"/{SHA}")).status_code == 410
        finally:
            hidden.rename(away)
    assert len(tombstones(storage)) == 1
    assert len(storage.copies(SHA)) == 1  # on the member that was away
    report = await asyncio.to_thread(scrub, storage, repair=False)
    assert report["tombstones_stale"] == 1 and report["taken_down_copies"] == 1
    report = await asyncio.to_thread(scrub, storage, repair=True)
    assert report["tombstones_restored"] == 1 and len(tombstones(storage)) == 2
    assert report["taken_down_removed"] == 1 and storage.copies(SHA) == []


async def test_an_upload_in_flight_during_the_takedown_does_not_win(storage: Storage) -> None:
    """The blob has one copy (its partner lost); a writer re-uploads it, streaming slowly; an
    admin takes it down meanwhile. The upload must end 410 with nothing left."""
    big = os.urandom(3 * 1024 * 1024)
    sha = sha256(big)
    async with app_client(config(storage)) as http:
        assert (await http.post(f"/{sha}", content=big, auth=AUTH)).status_code == 201
        storage.copies(sha)[1].unlink()
        half_sent = asyncio.Event()
        go_on = asyncio.Event()

        async def body() -> AsyncIterator[bytes]:
            yield big[: 2 * 1024 * 1024]
            half_sent.set()
            await go_on.wait()
            yield big[2 * 1024 * 1024 :]

        upload = asyncio.create_task(
            http.post(f"/{sha}", content=body(), auth=AUTH, headers={"Content-Length": str(len(big))})
        )
        await asyncio.wait_for(half_sent.wait(), 10)
        await asyncio.sleep(0.2)
        assert (await take_down(http, sha)).status_code == 200
        go_on.set()
        answer = await asyncio.wait_for(upload, 10)
        assert answer.status_code == 410, answer.text
        assert storage.copies(sha) == [] and storage.temps() == []
        assert (await http.get(f"/{sha}")).status_code == 410


async def test_a_stale_memcached_hint_does_not_bring_it_back(storage: Storage, memcached: Any) -> None:
    async with app_client(config(storage, memcached_servers=[memcached.address])) as http:
        assert (await http.post(f"/{SHA}", content=DATA, auth=AUTH)).status_code == 201
        assert (await http.get(f"/{SHA}")).status_code == 200
    async with app_client(config(storage, memcached_servers=[memcached.address])) as other:
        assert (await take_down(other)).status_code == 200
    async with app_client(config(storage, memcached_servers=[memcached.address])) as http:
        assert (await http.get(f"/{SHA}")).status_code == 410


async def test_s3_never_serves_it_and_its_object_is_deleted(storage: Storage, s3: Any) -> None:
    async with app_client(config(storage, **s3.config())) as http:
        assert (await http.post(f"/{SHA}", content=DATA, auth=AUTH)).status_code == 201
        await eventually(lambda: s3.object(SHA) is not None)
        for copy in storage.copies(SHA):
            copy.unlink()  # only S3 has it now
        report = (await take_down(http)).json()
        assert report["s3"] == "queued for deletion"
        assert (await http.get(f"/{SHA}")).status_code == 410  # never the S3 fallback
        await eventually(lambda: s3.object(SHA) is None)
        assert (await http.get(f"/{SHA}")).status_code == 410
        await asyncio.sleep(0.5)
        assert storage.copies(SHA) == []  # no refill from S3 either


async def eventually(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


# -- real servers: several workers, several nodes ------------------------------------------------


def test_every_worker_stops_serving_it(storage: Storage, start_stor: Callable[..., StorProcess]) -> None:
    path = storage.base / "config.json"
    path.write_text(json.dumps(config(storage)))
    server = start_stor("--config", str(path), "--workers", "2")
    assert httpx.post(f"{server.url}/{SHA}", content=DATA, auth=AUTH).status_code == 201
    for _ in range(40):  # fresh connections: both workers read it (and keep it open)
        assert httpx.get(f"{server.url}/{SHA}").content == DATA
    response = httpx.delete(f"{server.url}/{SHA}", auth=ADMIN, headers={"X-Stor-Reason": REASON})
    assert response.status_code == 200
    answers = [httpx.get(f"{server.url}/{SHA}").status_code for _ in range(40)]
    assert answers == [410] * 40
    assert all(httpx.head(f"{server.url}/{SHA}").status_code == 410 for _ in range(10))


def test_another_node_sharing_the_disks_stops_within_a_second(
    storage: Storage, start_stor: Callable[..., StorProcess]
) -> None:
    path = storage.base / "config.json"
    path.write_text(json.dumps(config(storage)))
    first = start_stor("--config", str(path), "--log-format", "json")
    second = start_stor("--config", str(path))
    assert httpx.post(f"{first.url}/{SHA}", content=DATA, auth=AUTH).status_code == 201
    for _ in range(5):
        assert httpx.get(f"{second.url}/{SHA}").content == DATA
    response = httpx.delete(f"{first.url}/{SHA}", auth=ADMIN, headers={"X-Stor-Reason": REASON})
    assert response.status_code == 200
    assert wait_for(lambda: httpx.get(f"{second.url}/{SHA}").status_code == 410, timeout=1.0)
    # a copy put back by hand on the first member (a member away during the takedown): the other
    # node's memory of the tombstones refuses it on the event loop too
    layout_path(storage.pairs[0][0], SHA).parent.mkdir(parents=True, exist_ok=True)
    layout_path(storage.pairs[0][0], SHA).write_bytes(DATA)
    assert all(httpx.get(f"{second.url}/{SHA}").status_code == 410 for _ in range(10))
    audit = [json.loads(line) for line in first.log().splitlines() if '"stor.audit"' in line]
    assert [(a["action"], a["sha"], a["admin"], a["reason"]) for a in audit] == [("takedown", SHA, "admin", REASON)]


def test_the_client_takes_down_and_restores(
    storage: Storage, start_stor: Callable[..., StorProcess], tmp_path: Path
) -> None:
    path = storage.base / "config.json"
    path.write_text(json.dumps(config(storage)))
    server = start_stor("--config", str(path))
    assert httpx.post(f"{server.url}/{SHA}", content=DATA, auth=AUTH).status_code == 201

    def stor(*args: str, user: tuple[str, str] = ADMIN) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "STOR_URL": server.url, "STOR_CREDENTIALS": f"{user[0]}:{user[1]}"}
        return subprocess.run(
            [sys.executable, "-m", "stor", *args, "--retries", "0"], capture_output=True, text=True, env=env
        )

    assert stor("takedown", SHA).returncode == 2  # no reason: a usage error
    writer = stor("takedown", SHA, "--reason", REASON, user=AUTH)
    assert writer.returncode == 2 and "401" in writer.stderr
    done = stor("takedown", SHA, "--reason", REASON)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["sha"] == SHA and storage.copies(SHA) == []
    again = stor("takedown", SHA, "--reason", REASON)
    assert again.returncode == 1 and "410" in again.stderr
    sample = tmp_path / "sample.bin"
    sample.write_bytes(DATA)
    refused = stor("takedown", "--restore", str(sample), user=AUTH)
    assert refused.returncode == 1 and "410" in refused.stderr  # a writer cannot restore
    restored = stor("takedown", "--restore", str(sample))
    assert restored.returncode == 0, restored.stderr
    assert httpx.get(f"{server.url}/{SHA}").content == DATA
