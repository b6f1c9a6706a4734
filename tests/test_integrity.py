"""Verify on read, quarantine, heal: a damaged copy never reaches a client as a 200."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from stor.errors import TransferAborted
from tests.conftest import Storage, app_client
from tests.helpers import AUTH, corrupt, sha256, shorten
from tests.services import MotoS3

pytestmark = pytest.mark.anyio

DATA = os.urandom(40_000)
SHA = sha256(DATA)


async def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def quarantined(root: Path) -> list[Path]:
    return sorted((root / ".stor-quarantine").glob("*.dat")) if (root / ".stor-quarantine").exists() else []


async def store(http: httpx.AsyncClient, data: bytes) -> list[Path]:
    response = await http.post(f"/{sha256(data)}", content=data, auth=AUTH)
    assert response.status_code == 201
    return [Path(p) for p in response.json()]  # the first is the copy this process reads first


async def test_a_flipped_byte_in_the_copy_read_first(storage: Storage) -> None:
    async with app_client(storage.config()) as http:
        first, partner = await store(http, DATA)
        mtime = first.stat().st_mtime_ns
        corrupt(first, 1234)
        response = await http.get(f"/{SHA}")
        assert response.status_code == 200 and response.content == DATA
        root = first.parents[3]
        [moved] = quarantined(root)
        note = json.loads(moved.with_suffix(".json").read_text())
        assert note["expected"] == SHA and note["actual"] == sha256(moved.read_bytes()) != SHA
        assert note["size"] == len(DATA) and note["mtime_ns"] == mtime and note["disk"] == str(root)
        await eventually(first.exists)  # healed from the partner
        assert first.read_bytes() == DATA and first.stat().st_mtime_ns == partner.stat().st_mtime_ns
        metrics = (await http.get("/metrics")).text
        assert 'stor_integrity_events_total{event="corrupt_copy"} 1.0' in metrics
        assert 'stor_integrity_events_total{event="healed"} 1.0' in metrics


async def test_a_truncated_copy(storage: Storage) -> None:
    async with app_client(storage.config()) as http:
        first, _ = await store(http, DATA)
        shorten(first, 1000)
        assert (await http.get(f"/{SHA}")).content == DATA
        await eventually(lambda: first.exists() and first.stat().st_size == len(DATA))
        assert len(quarantined(first.parents[3])) == 1


async def test_a_large_copy_is_verified_while_streaming(storage: Storage) -> None:
    big = os.urandom(1536 * 1024)  # over the 1 MiB read in one hop, so it streams
    sha = sha256(big)
    async with app_client(storage.config(verify_on_read_max=64 * 1024)) as http:
        first, _ = await store(http, big)
        corrupt(first, len(big) - 10)  # near the end: only the whole hash can tell
        with pytest.raises(TransferAborted, match="corrupt"):
            await http.get(f"/{sha}")  # the transfer is aborted, never completed
        assert len(quarantined(first.parents[3])) == 1
        good = await http.get(f"/{sha}")
        assert good.status_code == 200 and good.content == big
        ranged = await http.get(f"/{sha}", headers={"Range": "bytes=100-199"})
        assert ranged.status_code == 206 and ranged.content == big[100:200]
        await eventually(lambda: first.exists() and first.read_bytes() == big)


async def test_head_checks_the_partners_size(storage: Storage) -> None:
    async with app_client(storage.config()) as http:
        first, _ = await store(http, DATA)
        with first.open("ab") as handle:
            handle.write(b"trailing garbage")
        assert first.stat().st_size == len(DATA) + len(b"trailing garbage")
        head = await http.head(f"/{SHA}")
        assert head.status_code == 200 and head.headers["content-length"] == str(len(DATA))
        assert len(quarantined(first.parents[3])) == 1
        await eventually(lambda: first.exists() and first.stat().st_size == len(DATA))


async def test_all_copies_bad_is_never_a_200(storage: Storage) -> None:
    async with app_client(storage.config()) as http:
        for copy in await store(http, DATA):
            corrupt(copy, 7)
        response = await http.get(f"/{SHA}")
        assert response.status_code == 500
        assert "lost" in response.text and SHA in response.text
        assert 'stor_integrity_events_total{event="lost"}' in (await http.get("/metrics")).text
        # both bad copies are out of the layout, so nothing wrong can be served later either;
        # and later reads still say "lost", not "absent"
        assert sum(len(quarantined(r)) for r in storage.roots) == 2
        assert (await http.get(f"/{SHA}")).status_code == 500


async def test_both_copies_bad_with_s3_good(storage: Storage, s3: MotoS3) -> None:
    async with app_client(storage.config(**s3.config())) as http:
        copies = await store(http, DATA)
        await eventually(lambda: s3.object(SHA) is not None)
        for copy in copies:
            corrupt(copy, 99)
        response = await http.get(f"/{SHA}")
        assert response.status_code == 200 and response.content == DATA
        # refilled from S3: two good copies again, on whichever pair placement chose
        await eventually(lambda: [c.read_bytes() for c in storage.copies(SHA)] == [DATA, DATA])


async def test_an_unwritable_quarantine_still_never_serves_the_bad_copy(storage: Storage) -> None:
    async with app_client(storage.config()) as http:
        first, _ = await store(http, DATA)
        (first.parents[3] / ".stor-quarantine").write_text("not a directory")  # quarantine cannot be made
        corrupt(first, 5)
        for _ in range(3):
            assert (await http.get(f"/{SHA}")).content == DATA
        assert 'event="quarantine_failed"' in (await http.get("/metrics")).text


async def test_verify_on_read_off_trusts_the_disk(storage: Storage) -> None:
    """For operators who rely on scrubs: no hashing on GET (the docs say what that costs)."""
    async with app_client(storage.config(verify_on_read=False)) as http:
        first, partner = await store(http, DATA)
        corrupt(first, 3)
        partner.unlink()
        response = await http.get(f"/{SHA}")
        assert response.status_code == 200 and response.content != DATA
