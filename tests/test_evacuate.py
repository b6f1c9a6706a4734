"""`stor evacuate`, as an operator runs it beside a running server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from typing import Any

import httpx

from tests.conftest import Storage, StorProcess
from tests.helpers import blob_files, layout_path, sha256


def stor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stor", *args], capture_output=True, text=True, timeout=120)


def fill_pair_b(storage: Storage, count: int) -> list[bytes]:
    """`count` blobs stored on pair 1 (b1 + b2) alone, by `stor import` under a config that
    lets only that pair take writes."""
    source = storage.base / "incoming"
    source.mkdir()
    blobs = [os.urandom(2000 + n) for n in range(count)]
    for n, blob in enumerate(blobs):
        (source / f"f{n}").write_bytes(blob)
    config = storage.write_config(writable_pairs_regex=r"/b[12]$")
    assert stor("import", str(source), "--config", str(config)).returncode == 0
    for blob in blobs:
        assert {p.parent.parent.parent.parent.name for p in storage.copies(sha256(blob))} == {"b1", "b2"}
    return blobs


def test_evacuation_moves_every_blob_while_reads_go_on(storage: Storage, start_stor: Any) -> None:
    blobs = fill_pair_b(storage, 40)
    mtimes = {sha256(b): layout_path(storage.pairs[1][0], sha256(b)).stat().st_mtime_ns for b in blobs}
    config = storage.write_config(writable_pairs_regex=r"/a[12]$")  # pair 1 drained: it takes no writes
    server: StorProcess = start_stor("--config", str(config), "--workers", "2")
    failures: list[str] = []
    reads = [0]
    stop = threading.Event()

    def read_all() -> None:
        with httpx.Client(base_url=server.url, timeout=20) as http:
            while not stop.is_set():
                for blob in blobs:
                    got = http.get(f"/{sha256(blob)}")
                    if got.status_code != 200 or got.content != blob:
                        failures.append(f"{got.status_code} {got.text[:100]}")
                    reads[0] += 1

    readers = [threading.Thread(target=read_all) for _ in range(2)]
    for reader in readers:
        reader.start()
    try:
        result = stor("evacuate", "--pair", "1", "--config", str(config))
    finally:
        stop.set()
        for reader in readers:
            reader.join()
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["moved"] == 40 and report["removed"] == 40 and report["left"] == 0 and report["failed"] == []
    assert failures == [] and reads[0] > 80
    assert blob_files(storage.pairs[1][0]) == [] and blob_files(storage.pairs[1][1]) == []
    for blob in blobs:
        copies = storage.copies(sha256(blob))
        assert {p.parent.parent.parent.parent.name for p in copies} == {"a1", "a2"}
        assert {p.stat().st_mtime_ns for p in copies} == {mtimes[sha256(blob)]}  # Last-Modified kept
        assert httpx.get(f"{server.url}/{sha256(blob)}").content == blob
    again = stor("evacuate", "--pair", "1", "--config", str(config))
    assert again.returncode == 0 and json.loads(again.stdout)["moved"] == 0


def test_evacuation_resumes_what_another_run_left(storage: Storage) -> None:
    """A blob already on a writable pair (a run interrupted after its copy) is only removed."""
    blobs = fill_pair_b(storage, 3)
    moved = blobs[0]
    for member in storage.pairs[0]:
        target = layout_path(member, sha256(moved))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(moved)
    config = storage.write_config(writable_pairs_regex=r"/a[12]$")
    result = stor("evacuate", "--pair", "1", "--config", str(config))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["moved"], report["already_elsewhere"], report["left"]) == (2, 1, 0)


def test_evacuation_stops_cleanly_when_no_pair_has_room(storage: Storage) -> None:
    blobs = fill_pair_b(storage, 5)
    config = storage.write_config(writable_pairs_regex=r"^nowhere$")
    result = stor("evacuate", "--pair", "1", "--config", str(config))
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["left"] == 5 and report["moved"] == 0 and "no writable pair has room" in report["stopped"]
    assert "5 left" in result.stderr
    assert all(len(storage.copies(sha256(blob))) == 2 for blob in blobs)  # nothing lost


def test_evacuation_refuses_a_writable_pair_and_the_records_home_with_nowhere_to_go(storage: Storage) -> None:
    writable = stor("evacuate", "--pair", "1", "--config", str(storage.write_config()))
    assert writable.returncode == 2 and "still takes writes" in writable.stderr
    nowhere = storage.write_config(writable_pairs_regex="^nothing$")  # the records stay home: pair 0
    names = stor("evacuate", "--pair", "0", "--config", str(nowhere))
    assert names.returncode == 2 and "holds the name and takedown records" in names.stderr
    assert stor("evacuate", "--pair", "1", "--config", str(nowhere)).returncode == 0  # (empty) not the home
    unknown = stor("evacuate", "--pair", "9", "--config", str(storage.write_config()))
    assert unknown.returncode == 2
