"""Degraded pairs and replaced disks, in-process on real directories: health for load
balancers, reads from either member alone, name records restored, lost blobs told apart."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import Storage, app_client
from tests.helpers import AUTH, corrupt, layout_path, name_record, sha256

pytestmark = pytest.mark.anyio

DATA = os.urandom(3000)
SHA = sha256(DATA)


def replace_with_blank(member: Path) -> None:
    """A new, empty disk mounted where the old one was."""
    shutil.rmtree(member)
    member.mkdir()


async def test_healthz_is_liveness_and_readyz_survives_a_degraded_pair(storage: Storage) -> None:
    async with app_client(storage.config()) as http:
        assert (await http.get("/healthz")).text == "OK\n"
        assert (await http.get("/readyz")).text == "OK\n"
        storage.pairs[0][0].rename(storage.base / "unplugged")
        assert (await http.get("/status")).status_code == 503  # Stor's meaning, for alerting
        ready = await http.get("/readyz", params={"format": "json"})
        assert ready.status_code == 200 and ready.json()["ready"] is True
        assert [(p["state"], p["takes_writes"]) for p in ready.json()["pairs"]] == [
            ("degraded", False),
            ("healthy", True),
        ]
        storage.pairs[0][1].rename(storage.base / "unplugged-too")
        down = await http.get("/readyz")
        assert down.status_code == 503 and "pair 0 is down" in down.text
        assert (await http.get("/healthz")).status_code == 200  # the process still answers


async def test_readyz_serves_without_writes_unless_asked_for_them(storage: Storage) -> None:
    """A node whose pairs take no writes still serves every blob: ready (DESIGN §1); a pool
    that only takes uploads asks `?writes=1`."""
    async with app_client(storage.config(writable_pairs_regex="^nothing$")) as http:
        ready = await http.get("/readyz", params={"format": "json"})
        assert ready.status_code == 200 and ready.json()["writable"] is False
        answer = await http.get("/readyz", params={"writes": "1"})
        assert answer.status_code == 503 and "no pair takes writes" in answer.text
        assert (await http.get("/status")).status_code == 200
    async with app_client(storage.config()) as http:
        assert (await http.get("/readyz", params={"writes": "1"})).text == "OK\n"


async def test_a_blob_whose_copies_are_all_quarantined_is_lost_not_absent(storage: Storage) -> None:
    async with app_client(storage.config()) as http:
        assert (await http.post(f"/{SHA}", content=DATA, auth=AUTH)).status_code == 201
        for copy in storage.copies(SHA):
            corrupt(copy)  # bitrot on both copies
        assert (await http.get(f"/{SHA}")).status_code == 500  # found corrupt, both quarantined
        assert storage.copies(SHA) == []
        for _ in range(2):  # later: still a 500, never a 404
            answer = await http.get(f"/{SHA}")
            assert answer.status_code == 500 and "lost" in answer.text and "quarantined" in answer.text
            assert (await http.head(f"/{SHA}")).status_code == 500
        assert (await http.get(f"/{sha256(b'never stored')}")).status_code == 404


async def test_a_replaced_member_serves_from_its_partner(storage: Storage) -> None:
    async with app_client(storage.config()) as http:
        assert (await http.post(f"/{SHA}", content=DATA, auth=AUTH)).status_code == 201
        holder = layout_path(storage.pairs[0][0], SHA).exists()
        member = storage.pairs[0][0] if holder else storage.pairs[1][0]
        replace_with_blank(member)
        for _ in range(4):
            assert (await http.get(f"/{SHA}")).content == DATA
            assert (await http.head(f"/{SHA}")).headers["content-length"] == str(len(DATA))
        assert all(copy.read_bytes() == DATA for copy in storage.copies(SHA))  # stor scrub refills it


async def test_name_records_are_read_from_either_member_and_restored(storage: Storage) -> None:
    member_a, member_b = storage.pairs[0]
    async with app_client(storage.config()) as http:
        for name in ("docs/one.txt", "docs/two.txt"):
            created = await http.put("/file", params={"path": name}, content=name.encode(), auth=AUTH)
            assert created.status_code == 201
        shutil.rmtree(name_record(member_a, "docs/one.txt").parent)  # member a replaced by a blank disk
        got = await http.get("/file", params={"path": "docs/one.txt"})
        assert got.status_code == 200 and got.content == b"docs/one.txt"
        assert json.loads(name_record(member_a, "docs/one.txt").read_text())["path"] == "docs/one.txt"  # restored
        name_record(member_b, "docs/one.txt").unlink()  # now a alone has one, b alone has two
        listing = (await http.get("/files", params={"prefix": "docs/"})).json()
        assert [f["path"] for f in listing["files"]] == ["docs/one.txt", "docs/two.txt"]  # merged
        names_a = member_a / ".stor-names"
        names_a.rename(names_a.with_name("unplugged"))  # member a's records unreadable altogether
        assert (await http.get("/file", params={"path": "docs/two.txt"})).content == b"docs/two.txt"


async def test_a_name_deleted_stays_deleted(storage: Storage) -> None:
    async with app_client(storage.config()) as http:
        assert (await http.put("/file", params={"path": "n"}, content=b"v", auth=AUTH)).status_code == 201
        assert (await http.delete("/file", params={"path": "n"}, auth=AUTH)).status_code == 204
        for _ in range(2):
            assert (await http.get("/file", params={"path": "n"})).status_code == 404
        assert not any(name_record(member, "n").exists() for member in storage.pairs[0])
