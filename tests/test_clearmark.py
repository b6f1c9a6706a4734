"""A disk's clear mark (`backends/clearmark.py`): what lets the event loop answer a 404 in one call
per disk stops vouching as soon as another process quarantines a copy, writes a takedown record,
or the disk turns into a bare mountpoint. Two `Disk` objects on one root stand for two processes
(or nodes) sharing it: each has its own temp directory, and so its own mark."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stor.backends import syscalls
from stor.backends.disk import Disk
from stor.backends.tombstones import UNKNOWN, Tombstone, TombstoneStore
from stor.digest import Sha
from tests.helpers import layout_path, sha256

SHA = Sha(sha256(b"asked about"))


def resolve_cached_works(directory: Path) -> bool:
    return syscalls.openat2(str(directory), os.O_PATH, syscalls.RESOLVE_CACHED) >= 0


@pytest.fixture
def roots(tmp_path: Path) -> list[Path]:
    if not resolve_cached_works(tmp_path):
        pytest.skip("no openat2(RESOLVE_CACHED) here: the event loop proves no 404")
    members = [tmp_path / "m1", tmp_path / "m2"]
    for member in members:
        member.mkdir()
    return members


def process(roots: list[Path]) -> tuple[Disk, ...]:
    disks = tuple(Disk(str(root), require_mount=False) for root in roots)
    for disk in disks:
        disk.prepare()
    return disks


@pytest.fixture
def ours(roots: list[Path]) -> Iterator[tuple[Disk, ...]]:
    disks = process(roots)
    yield disks
    for disk in disks:
        disk.close()


@pytest.fixture
def theirs(roots: list[Path]) -> Iterator[tuple[Disk, ...]]:
    disks = process(roots)
    yield disks
    for disk in disks:
        disk.close()


def test_the_mark_vouches_only_once_renewed(ours: tuple[Disk, ...]) -> None:
    disk = ours[0]
    assert disk.clear.proves_absent(SHA) is None  # no mark yet: a thread must look
    assert disk.clear.renew()
    assert disk.clear.proves_absent(SHA) is True


def test_a_copy_quarantined_by_another_process_is_seen_at_once(
    ours: tuple[Disk, ...], theirs: tuple[Disk, ...], roots: list[Path]
) -> None:
    assert ours[0].clear.renew() and ours[0].clear.proves_absent(SHA) is True
    copy = layout_path(roots[0], SHA)
    copy.parent.mkdir(parents=True)
    copy.write_bytes(b"rotten")
    assert theirs[0].quarantine.move(SHA, {"reason": "test"}) is not None
    assert ours[0].clear.proves_absent(SHA) is None  # their move took our mark away
    assert ours[0].clear.renew()
    assert ours[0].clear.proves_absent(SHA) is False  # listed now: the thread finds the lost blob
    assert ours[0].clear.proves_absent(Sha(sha256(b"another"))) is True


def test_a_takedown_record_written_by_another_process_is_seen_at_once(
    ours: tuple[Disk, ...], theirs: tuple[Disk, ...]
) -> None:
    store = TombstoneStore(ours)
    store.prepare()
    assert all(disk.clear.renew() for disk in ours)
    assert store.cached(SHA) is None
    TombstoneStore(theirs).put(Tombstone(SHA, time.time(), "admin", "test"))
    assert store.cached(SHA) is UNKNOWN  # `get` reads it: a 410
    assert all(disk.clear.renew() for disk in ours)
    assert store.cached(SHA) is UNKNOWN
    assert store.get(SHA) is not None


def test_a_bare_mountpoint_proves_nothing(ours: tuple[Disk, ...], roots: list[Path]) -> None:
    assert ours[0].clear.renew()
    shutil.rmtree(roots[0] / ".stor-tmp")  # the disk's own directories are gone: unmounted
    assert ours[0].clear.proves_absent(SHA) is None
    assert not ours[0].clear.renew()


def test_a_mark_is_not_put_back_while_a_writer_adds(ours: tuple[Disk, ...], theirs: tuple[Disk, ...]) -> None:
    assert ours[0].clear.renew()
    with theirs[0].clear.adding():
        assert ours[0].clear.proves_absent(SHA) is None
        assert not ours[0].clear.renew()  # never waits for the writer: asked again later
    assert ours[0].clear.renew() and ours[0].clear.proves_absent(SHA) is True


def test_a_writer_that_knows_no_mark_is_caught_by_the_health_probe(ours: tuple[Disk, ...], roots: list[Path]) -> None:
    assert ours[0].clear.renew()
    quarantine = roots[0] / ".stor-quarantine"
    quarantine.mkdir()
    (quarantine / f"{SHA.upper()}.1.dat").write_bytes(b"rotten")  # an older stor, during an upgrade
    ours[0].probe_health()
    assert ours[0].clear.proves_absent(SHA) is False
