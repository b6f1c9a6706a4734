"""POST /stat: batch existence for sync clients."""

from __future__ import annotations

import pytest

from tests.conftest import Storage, app_client
from tests.helpers import AUTH, sha256
from tests.services import MotoS3

pytestmark = pytest.mark.anyio


async def test_batch_stat_answers_per_sha(storage: Storage) -> None:
    async with app_client(storage.config()) as http:
        both, one = b"two copies", b"one copy left"
        for data in (both, one):
            assert (await http.post(f"/{sha256(data)}", content=data, auth=AUTH)).status_code == 201
        storage.copies(sha256(one))[0].unlink()
        absent = sha256(b"never stored")
        asked = [sha256(both), sha256(one).upper(), absent, sha256(both)]  # a duplicate, any case
        response = await http.post("/stat", json=asked)
        assert response.status_code == 200
        assert response.json() == {
            sha256(both): {"size": len(both), "copies": 2, "s3": None},
            sha256(one): {"size": len(one), "copies": 1, "s3": None},
            absent: None,
        }


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        (b"not json", 400, ["JSON array"]),
        (b'{"a": 1}', 400, ["JSON array"]),
        (b'["' + b"a" * 64 + b'", 5]', 400, ["entry 1", "5"]),
        (b'["' + b"a" * 64 + b'", "xyz"]', 400, ["entry 1", "xyz"]),
    ],
)
async def test_bad_batches_are_400_naming_the_entry(
    storage: Storage, body: bytes, status: int, words: list[str]
) -> None:
    async with app_client(storage.config()) as http:
        response = await http.post("/stat", content=body)
        assert response.status_code == status
        for word in words:
            assert word in response.text


async def test_more_than_ten_thousand_is_413(storage: Storage) -> None:
    async with app_client(storage.config()) as http:
        assert (await http.post("/stat", json=["a" * 64] * 10_000)).status_code == 200
        response = await http.post("/stat", json=["a" * 64] * 10_001)
        assert response.status_code == 413 and "10000 shas" in response.text


async def test_a_blob_only_in_s3(storage: Storage, s3: MotoS3) -> None:
    s3.put_raw(sha256(b"in s3"), b"in s3")
    async with app_client(storage.config(**s3.config())) as http:
        response = await http.post("/stat", json=[sha256(b"in s3"), sha256(b"nowhere")])
        assert response.json() == {sha256(b"in s3"): {"size": 5, "copies": 0, "s3": True}, sha256(b"nowhere"): None}
