"""The HTTP API in-process (httpx ASGITransport), on real directories."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import time
from collections.abc import AsyncIterator
from email.utils import parsedate_to_datetime
from pathlib import Path

import httpx
import pytest

from stor import __version__
from tests.conftest import Storage, app_client
from tests.helpers import AUTH, debris, layout_path, sha256

pytestmark = pytest.mark.anyio

DATA = os.urandom(3000)
SHA = sha256(DATA)


async def put(client: httpx.AsyncClient, data: bytes, sha: str | None = None) -> httpx.Response:
    return await client.post(f"/{sha or sha256(data)}", content=data, auth=AUTH)


async def test_root_names_the_service(client: httpx.AsyncClient) -> None:
    response = await client.get("/")
    assert response.status_code == 200
    assert response.text == f"This is stor {__version__}\n"
    assert response.headers["content-type"].startswith("text/plain")


async def test_post_stores_both_copies_and_answers_their_paths(client: httpx.AsyncClient, storage: Storage) -> None:
    response = await put(client, DATA)
    assert response.status_code == 201
    copies = storage.copies(SHA)
    assert len(copies) == 2
    assert sorted(response.json()) == sorted(str(c) for c in copies)
    assert copies[0].parent.parent.parent.parent in {r for pair in storage.pairs for r in pair}
    assert {c.read_bytes() for c in copies} == {DATA}
    assert copies[0].stat().st_mtime_ns == copies[1].stat().st_mtime_ns
    # both copies live on the two members of one pair
    assert any({c.parents[3] for c in copies} == set(pair) for pair in storage.pairs)
    assert storage.temps() == []


async def test_post_of_a_stored_blob_is_200_with_the_existing_paths(client: httpx.AsyncClient) -> None:
    first = await put(client, DATA)
    second = await put(client, DATA)
    assert second.status_code == 200
    assert sorted(second.json()) == sorted(first.json())


async def test_put_is_post(client: httpx.AsyncClient, storage: Storage) -> None:
    response = await client.put(f"/{SHA}", content=DATA, auth=AUTH)
    assert response.status_code == 201
    assert len(storage.copies(SHA)) == 2


async def test_uppercase_sha_is_normalised(client: httpx.AsyncClient) -> None:
    assert (await put(client, DATA, SHA.upper())).status_code == 201
    response = await client.get(f"/{SHA.upper()}")
    assert response.status_code == 200
    assert response.content == DATA
    assert response.headers["etag"] == f'"{SHA}"'


async def test_get_serves_the_bytes_with_every_header(client: httpx.AsyncClient, storage: Storage) -> None:
    await put(client, DATA)
    response = await client.get(f"/{SHA}")
    assert response.status_code == 200
    assert response.content == DATA
    headers = response.headers
    assert headers["content-length"] == str(len(DATA))
    assert headers["content-type"] == "application/octet-stream"
    assert headers["etag"] == f'"{SHA}"'
    assert headers["accept-ranges"] == "bytes"
    assert headers["cache-control"] == "public, max-age=31536000, immutable"
    digest = base64.b64encode(hashlib.sha256(DATA).digest()).decode()
    assert headers["repr-digest"] == f"sha-256=:{digest}:"
    mtime = storage.copies(SHA)[0].stat().st_mtime
    assert parsedate_to_datetime(headers["last-modified"]).timestamp() == int(mtime)
    assert mtime < time.time() - 1  # a second early, so Last-Modified never runs ahead of Date


async def test_last_modified_is_the_same_whichever_copy_answers(client: httpx.AsyncClient) -> None:
    await put(client, DATA)
    seen = {(await client.head(f"/{SHA}")).headers["last-modified"] for _ in range(30)}
    assert len(seen) == 1


async def test_head_has_the_get_headers_and_no_body(client: httpx.AsyncClient) -> None:
    await put(client, DATA)
    get = await client.get(f"/{SHA}")
    head = await client.head(f"/{SHA}")
    assert head.status_code == 200
    assert head.content == b""
    for name in ("content-length", "etag", "last-modified", "repr-digest", "accept-ranges", "cache-control"):
        assert head.headers[name] == get.headers[name]


async def test_get_and_head_of_an_absent_blob_are_404(client: httpx.AsyncClient) -> None:
    assert (await client.get(f"/{SHA}")).status_code == 404
    assert (await client.head(f"/{SHA}")).status_code == 404


@pytest.mark.parametrize(
    "path",
    ["/abc", "/" + "g" * 64, "/" + SHA + "0", "/" + SHA[:-1] + "\u0661", "/%2e%2e", "/a%2fb", "/x%00y"],
)
async def test_a_malformed_sha_is_404_on_read_and_400_on_write(client: httpx.AsyncClient, path: str) -> None:
    assert (await client.get(path)).status_code == 404
    assert (await client.head(path)).status_code == 404
    response = await client.post(path, content=b"data", auth=AUTH)
    assert response.status_code == 400
    assert "not a sha256" in response.text


async def test_path_tricks_create_nothing(client: httpx.AsyncClient, storage: Storage) -> None:
    for path in ("/%2e%2e/" + SHA, "/" + SHA + "%2f..", "/" + SHA + "%00", "/.stor-tmp"):
        response = await client.post(path, content=DATA, auth=AUTH)
        assert response.status_code in (400, 404), path
    assert debris(storage.base) == []


async def test_write_without_valid_credentials_is_401(client: httpx.AsyncClient, storage: Storage) -> None:
    responses = [await client.post(f"/{SHA}", content=DATA)]
    for auth in (("writer", "wrong"), ("nobody", "s3cret-pass")):
        responses.append(await client.post(f"/{SHA}", content=DATA, auth=auth))
    for response in responses:
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == 'Basic realm="stor"'
    bearer = await client.post(f"/{SHA}", content=DATA, headers={"Authorization": "Bearer abc"})
    assert bearer.status_code == 401
    garbage = await client.post(f"/{SHA}", content=DATA, headers={"Authorization": "Basic !!!notbase64"})
    assert garbage.status_code == 401
    assert storage.copies(SHA) == [] and storage.temps() == []


async def test_no_configured_writers_refuses_every_write(storage: Storage) -> None:
    raw = storage.config()
    del raw["basic_auth"]
    async with app_client(raw) as http:
        assert (await http.post(f"/{SHA}", content=DATA, auth=AUTH)).status_code == 401
        assert (await http.post(f"/{SHA}", content=DATA)).status_code == 401


async def test_a_body_that_does_not_match_is_412_naming_both(client: httpx.AsyncClient, storage: Storage) -> None:
    other = "0" * 64
    response = await put(client, DATA, other)
    assert response.status_code == 412
    assert other in response.text and SHA in response.text
    assert storage.copies(other) == [] and storage.copies(SHA) == [] and storage.temps() == []


async def test_a_big_body_that_does_not_match_leaves_nothing(client: httpx.AsyncClient, storage: Storage) -> None:
    big = os.urandom(3 * 1024 * 1024 + 5)  # spooled to temp files before the hash is known
    response = await put(client, big, "1" * 64)
    assert response.status_code == 412
    assert storage.copies("1" * 64) == [] and storage.temps() == []


async def test_the_empty_body_is_the_empty_blob(client: httpx.AsyncClient, storage: Storage) -> None:
    empty = sha256(b"")
    assert (await put(client, b"")).status_code == 201
    assert [c.stat().st_size for c in storage.copies(empty)] == [0, 0]
    response = await client.get(f"/{empty}")
    assert response.status_code == 200 and response.content == b""
    assert response.headers["content-length"] == "0"


async def test_content_length_over_the_limit_is_413(storage: Storage) -> None:
    async with app_client(storage.config(max_upload_size=1000)) as http:
        response = await http.post(f"/{SHA}", content=DATA, auth=AUTH)
        assert response.status_code == 413
        assert "1000" in response.text
        assert storage.temps() == [] and storage.copies(SHA) == []
        small = b"y" * 1000
        assert (await http.post(f"/{sha256(small)}", content=small, auth=AUTH)).status_code == 201


async def test_a_streamed_body_over_the_limit_is_413(storage: Storage) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"z" * 500

    async with app_client(storage.config(max_upload_size=2000)) as http:
        response = await http.post(f"/{SHA}", content=chunks(), auth=AUTH)  # chunked: no length
        assert response.status_code == 413
        assert storage.temps() == [] and storage.copies(SHA) == []


async def test_no_pair_with_room_is_507(storage: Storage) -> None:
    free = shutil.disk_usage(storage.base).free
    async with app_client(storage.config(max_upload_size=free * 8)) as http:
        response = await http.post(f"/{SHA}", content=b"", headers={"Content-Length": str(free * 4)}, auth=AUTH)
        assert response.status_code == 507
        assert "no writable storage pair has room" in response.text
    assert storage.temps() == []


async def test_range_requests(client: httpx.AsyncClient) -> None:
    await put(client, DATA)
    partial = await client.get(f"/{SHA}", headers={"Range": "bytes=10-19"})
    assert partial.status_code == 206
    assert partial.content == DATA[10:20]
    assert partial.headers["content-range"] == f"bytes 10-19/{len(DATA)}"
    assert partial.headers["content-length"] == "10"
    suffix = await client.get(f"/{SHA}", headers={"Range": "bytes=-5"})
    assert suffix.status_code == 206 and suffix.content == DATA[-5:]
    malformed = await client.get(f"/{SHA}", headers={"Range": "bytes=zz"})
    assert malformed.status_code == 200 and malformed.content == DATA
    unsatisfiable = await client.get(f"/{SHA}", headers={"Range": f"bytes={len(DATA)}-"})
    assert unsatisfiable.status_code == 416
    assert unsatisfiable.headers["content-range"] == f"bytes */{len(DATA)}"
    head = await client.head(f"/{SHA}", headers={"Range": "bytes=0-99"})
    assert head.status_code == 206 and head.headers["content-length"] == "100"
    stale = await client.get(f"/{SHA}", headers={"Range": "bytes=0-9", "If-Range": '"not-it"'})
    assert stale.status_code == 200 and stale.content == DATA


async def test_conditional_requests_are_304(client: httpx.AsyncClient) -> None:
    await put(client, DATA)
    first = await client.get(f"/{SHA}")
    etag, modified = first.headers["etag"], first.headers["last-modified"]
    for headers in ({"If-None-Match": etag}, {"If-None-Match": "*"}, {"If-Modified-Since": modified}):
        response = await client.get(f"/{SHA}", headers=headers)
        assert response.status_code == 304, headers
        assert response.content == b""
        assert response.headers["etag"] == etag
        assert (await client.head(f"/{SHA}", headers=headers)).status_code == 304
    changed = await client.get(f"/{SHA}", headers={"If-None-Match": '"something-else"'})
    assert changed.status_code == 200
    old = await client.get(f"/{SHA}", headers={"If-Modified-Since": "Thu, 01 Jan 1970 00:00:00 GMT"})
    assert old.status_code == 200


async def test_a_blob_bigger_than_one_read_streams_whole(client: httpx.AsyncClient) -> None:
    big = os.urandom(2 * 1024 * 1024 + 17)
    assert (await put(client, big)).status_code == 201
    response = await client.get(f"/{sha256(big)}")
    assert response.status_code == 200 and response.content == big
    tail = await client.get(f"/{sha256(big)}", headers={"Range": "bytes=1048570-1048590"})
    assert tail.content == big[1048570:1048591]


async def test_a_missing_copy_is_served_from_the_partner(client: httpx.AsyncClient, storage: Storage) -> None:
    await put(client, DATA)
    storage.copies(SHA)[0].unlink()
    for _ in range(10):  # whichever member is probed first
        response = await client.get(f"/{SHA}")
        assert response.status_code == 200 and response.content == DATA
        assert (await client.head(f"/{SHA}")).status_code == 200


async def test_an_upload_fills_in_a_missing_copy_keeping_the_mtime(client: httpx.AsyncClient, storage: Storage) -> None:
    await put(client, DATA)
    kept, lost = storage.copies(SHA)
    lost.unlink()
    response = await put(client, DATA)
    assert response.status_code == 201
    assert sorted(response.json()) == sorted([str(kept), str(lost)])
    assert lost.read_bytes() == DATA
    assert lost.stat().st_mtime_ns == kept.stat().st_mtime_ns


async def test_404_only_when_every_disk_answered(client: httpx.AsyncClient, storage: Storage) -> None:
    await put(client, DATA)
    holder = {c.parents[3] for c in storage.copies(SHA)}
    other_pair = next(pair for pair in storage.pairs if set(pair) != holder)
    other_pair[0].rename(storage.base / "unplugged")  # a disk that may hold blobs is gone
    absent = sha256(b"never stored")
    for _ in range(5):
        assert (await client.get(f"/{absent}")).status_code == 503
        assert (await client.head(f"/{absent}")).status_code == 503
        assert (await client.get(f"/{SHA}")).status_code == 200  # what survives is served


async def test_status_ok_then_503_when_a_directory_goes_missing(client: httpx.AsyncClient, storage: Storage) -> None:
    ok = await client.get("/status")
    assert ok.status_code == 200 and ok.text == "OK\n"
    detail = (await client.get("/status", params={"format": "json"})).json()
    assert detail["ok"] is True and detail["version"] == __version__
    assert [d["path"] for d in detail["disks"]] == [str(r) for r in storage.roots]
    assert all(d["writable"] and d["free_bytes"] > 0 for d in detail["disks"])
    assert [p["state"] for p in detail["pairs"]] == ["healthy", "healthy"]
    storage.pairs[1][1].rename(storage.base / "gone")
    down = await client.get("/status")
    assert down.status_code == 503
    assert str(storage.pairs[1][1]) in down.text and "missing" in down.text
    detail = (await client.get("/status", headers={"Accept": "application/json"})).json()
    assert detail["ok"] is False
    assert [p["state"] for p in detail["pairs"]] == ["healthy", "degraded"]


async def test_writes_avoid_an_unhealthy_pair(client: httpx.AsyncClient, storage: Storage) -> None:
    storage.pairs[1][0].rename(storage.base / "gone")
    await client.get("/status")  # the probe that notices
    for n in range(10):
        data = f"blob {n}".encode()
        response = await put(client, data)
        assert response.status_code == 201
        assert all(str(storage.pairs[0][0]) in p or str(storage.pairs[0][1]) in p for p in response.json())


async def test_writable_pairs_regex_keeps_writes_off_other_pairs(storage: Storage) -> None:
    async with app_client(storage.config(writable_pairs_regex="/b[12]$")) as http:
        for n in range(10):
            response = await http.post(f"/{sha256(bytes([n]))}", content=bytes([n]), auth=AUTH)
            assert response.status_code == 201
            assert {Path(p).parents[3].name for p in response.json()} == {"b1", "b2"}


async def test_lifespan_sweeps_temps_of_dead_processes(storage: Storage) -> None:
    dead = storage.roots[0] / ".stor-tmp" / "0123abcd"
    dead.mkdir(parents=True)
    (dead / "owner.lock").touch()
    (dead / "3.tmp").write_bytes(b"partial upload")
    async with app_client(storage.config()):
        assert not dead.exists()


async def test_the_layout_is_stors(client: httpx.AsyncClient, storage: Storage) -> None:
    await put(client, DATA)
    for copy in storage.copies(SHA):
        assert copy == layout_path(copy.parents[3], SHA)
        assert copy.name == SHA.upper() + ".dat"
