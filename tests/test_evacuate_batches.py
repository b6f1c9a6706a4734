"""`stor evacuate` writing in batches: sizes, corrupt sources, takedowns, S3 markers, Ctrl-C."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from stor.backends.disk import Disk
from stor.backends.tombstones import Tombstone, TombstoneStore
from stor.cli.common import validated
from stor.digest import Sha
from stor.model import PutResult
from stor.service.portal import Portal
from stor.service.relocation import Landed
from stor.tools.evacuate import Evacuation, Movers
from stor.wiring.build import build_service
from tests.conftest import Storage
from tests.helpers import blob_files, layout_path, sha256
from tests.services import MotoS3
from tests.test_evacuate import stor

MTIME = 1_600_000_000_123_456_789


def put_on_pair_b(storage: Storage, blobs: list[bytes], *, corrupt_on: dict[bytes, list[int]] | None = None) -> None:
    """`blobs` written straight into pair 1's members, as Stor left them (no checksum attribute),
    with one mtime; `corrupt_on`: the members (0, 1) whose copy of a blob has a flipped byte."""
    for blob in blobs:
        for n, member in enumerate(storage.pairs[1]):
            path = layout_path(member, sha256(blob))
            path.parent.mkdir(parents=True, exist_ok=True)
            bad = n in (corrupt_on or {}).get(blob, [])
            path.write_bytes(bytes([blob[0] ^ 1]) + blob[1:] if bad else blob)
            os.utime(path, ns=(MTIME, MTIME))


def members_holding(storage: Storage, blob: bytes) -> set[str]:
    return {p.parent.parent.parent.parent.name for p in storage.copies(sha256(blob))}


def evacuate(storage: Storage, **config: object) -> tuple[int, dict[str, Any]]:
    path = storage.write_config(writable_pairs_regex=r"/a[12]$", **config)
    result = stor("evacuate", "--pair", "1", "--config", str(path))
    return result.returncode, json.loads(result.stdout)


def test_a_batch_of_mixed_sizes_lands_whole_on_both_members_with_its_s3_markers(storage: Storage, s3: MotoS3) -> None:
    sizes = [1, 100, 4096, 1024 * 1024, 1024 * 1024 + 1, 3 * 1024 * 1024 + 7]
    blobs = [os.urandom(size) for size in sizes] + [os.urandom(50) for _ in range(60)]
    put_on_pair_b(storage, blobs)
    code, report = evacuate(storage, **s3.config())
    assert code == 0, report
    assert (report["moved"], report["removed"], report["left"], report["failed"]) == (66, 66, 0, [])
    assert report["bytes"] == sum(map(len, blobs))
    a1 = storage.pairs[0][0]
    for blob in blobs:
        assert members_holding(storage, blob) == {"a1", "a2"}
        for member in storage.pairs[0]:
            copy = layout_path(member, sha256(blob))
            assert copy.read_bytes() == blob and copy.stat().st_mtime_ns == MTIME
        assert list(a1.glob(f".stor-s3-queue/**/{sha256(blob)}")), "no S3 marker"
    assert blob_files(storage.pairs[1][0]) == [] and blob_files(storage.pairs[1][1]) == []
    assert not [p for member in storage.pairs[0] for p in member.rglob("*.tmp")]  # no temp left


def test_a_corrupt_copy_is_moved_from_its_partner_and_two_are_left_in_place(storage: Storage) -> None:
    first_bad, second_bad, both_bad = (os.urandom(5000) for _ in range(3))
    big_bad = os.urandom(2 * 1024 * 1024)  # read twice: hashed, then copied against the fast checksum
    put_on_pair_b(
        storage,
        [first_bad, second_bad, both_bad, big_bad],
        corrupt_on={first_bad: [0], second_bad: [1], both_bad: [0, 1], big_bad: [0]},
    )
    code, report = evacuate(storage)
    assert code == 1
    assert (report["moved"], report["left"]) == (3, 1)
    assert len(report["failed"]) == 1 and sha256(both_bad) in str(report["failed"][0])
    for blob in (first_bad, second_bad, big_bad):
        assert members_holding(storage, blob) == {"a1", "a2"}
        assert all(layout_path(m, sha256(blob)).read_bytes() == blob for m in storage.pairs[0])
    assert members_holding(storage, both_bad) == {"b1", "b2"}  # neither copy is good: left for the operator


def test_a_taken_down_blob_is_removed_and_never_moved(storage: Storage) -> None:
    kept, gone = os.urandom(3000), os.urandom(3000)
    put_on_pair_b(storage, [kept, gone])
    names_pair = tuple(Disk(str(member), require_mount=False) for member in storage.pairs[0])
    for disk in names_pair:
        disk.prepare()
    TombstoneStore(names_pair).put(Tombstone(Sha(sha256(gone)), time.time(), "admin", "test"))
    for disk in names_pair:
        disk.close()
    code, report = evacuate(storage)
    assert code == 0, report
    assert (report["moved"], report["taken_down"], report["removed"], report["left"]) == (1, 1, 2, 0)
    assert members_holding(storage, kept) == {"a1", "a2"}
    assert storage.copies(sha256(gone)) == []


def test_an_interrupted_evacuation_leaves_nothing_half_done_and_resumes(storage: Storage) -> None:
    blobs = [os.urandom(1000 + n) for n in range(30)]
    put_on_pair_b(storage, blobs)
    config = validated(str(storage.write_config(writable_pairs_regex=r"/a[12]$")))
    service = build_service(config)
    service.prepare()
    staged = [0]

    def progress(count: int, size: int) -> None:
        staged[0] += count
        if staged[0] == 13:  # in the middle of the fourth batch, three landed
            raise KeyboardInterrupt

    try:
        with Portal() as portal:
            pair = service.pairs[1]

            def relocated(landed: list[Landed]) -> dict[Sha, Exception]:
                return portal.call(service.relocated(landed))

            def relocate(*args: object) -> PutResult:
                raise AssertionError("no blob is partly on a writable pair")

            movers = Movers(service.relocation(pair, batch_files=4), relocated, relocate)
            report = Evacuation(pair, movers, progress=progress, grace=0.1).run()
    finally:
        service.close()
    assert report.interrupted and report.moved == 12 and report.removed == 12 and report.left == 18
    for blob in blobs:  # each blob whole on one pair or the other, never half-moved
        assert members_holding(storage, blob) in ({"a1", "a2"}, {"b1", "b2"})
    assert not [p for member in storage.pairs[0] for p in member.rglob("*.tmp")]  # staged copies dropped
    code, again = evacuate(storage)
    assert code == 0 and (again["moved"], again["left"]) == (18, 0)
    assert all(members_holding(storage, blob) == {"a1", "a2"} for blob in blobs)


def test_a_blob_already_partly_on_a_writable_pair_is_completed_there(storage: Storage) -> None:
    blob = os.urandom(4000)
    put_on_pair_b(storage, [blob])
    half = layout_path(storage.pairs[0][1], sha256(blob))
    half.parent.mkdir(parents=True)
    half.write_bytes(blob)
    os.utime(half, ns=(MTIME, MTIME))
    code, report = evacuate(storage)
    assert code == 0 and (report["moved"], report["removed"]) == (1, 1)
    assert members_holding(storage, blob) == {"a1", "a2"}
    assert {p.stat().st_mtime_ns for p in storage.copies(sha256(blob))} == {MTIME}
