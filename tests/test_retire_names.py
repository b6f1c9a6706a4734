"""Retiring the pair that holds the name and takedown records: `stor evacuate` moves them to the
first pair taking writes while two workers serve names, and the old pair's disks can go."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from stor.backends.namerecord import NameRecord
from stor.backends.namestore import NAMES_DIR, NameStore
from stor.backends.pairs import Pair, StoragePool
from stor.backends.recordplaces import OnePair, PoolPlaces
from stor.backends.tombstones import TOMBSTONES_DIR
from stor.digest import Sha
from tests.conftest import Storage, StorProcess
from tests.helpers import AUTH, name_record, prepared_disks, sha256, wait_for

ADMIN = ("admin", "admin-pass")
NAMES = [f"dir/n{n:03d}" for n in range(60)]


def stor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stor", *args], capture_output=True, text=True, timeout=120)


def record_files(root: Path) -> list[Path]:
    return [p for p in (root / NAMES_DIR / ".tree").rglob("r*") if p.is_file()]


def tombstone_files(root: Path) -> list[Path]:
    directory = root / TOMBSTONES_DIR
    return list(directory.glob("*.json")) if directory.exists() else []


class Traffic:
    """Two clients while the records move: one writes names (new ones, and new versions of
    old ones), one lists and reads them; every answer must be right."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.contents: dict[str, bytes] = {name: name.encode() for name in NAMES}  # acknowledged
        self.written: dict[str, set[bytes]] = {name: {name.encode()} for name in NAMES}  # ever sent
        self.failures: list[str] = []
        self.writes = self.reads = self.listings = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._write), threading.Thread(target=self._read)]
        for thread in self._threads:
            thread.start()

    def _write(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as http:
            n = 0
            while not self._stop.is_set():
                name = random.choice(NAMES) if n % 2 else f"live/k{n:04d}"
                data = f"{name} v{n}".encode()
                with self._lock:
                    self.written.setdefault(name, set()).add(data)
                answer = http.put("/file", params={"path": name}, content=data, auth=AUTH)
                if answer.status_code not in (200, 201):
                    self.failures.append(f"PUT {name}: {answer.status_code} {answer.text[:200]}")
                with self._lock:
                    self.contents[name] = data
                self.writes += 1
                n += 1

    def _read(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as http:
            while not self._stop.is_set():
                with self._lock:
                    known = dict(self.contents)
                listed = http.get("/files", params={"prefix": "dir/", "limit": 1000})
                self.listings += 1
                if listed.status_code != 200:
                    self.failures.append(f"list: {listed.status_code} {listed.text[:200]}")
                elif [f["path"] for f in listed.json()["files"]] != NAMES:
                    self.failures.append(f"list: {len(listed.json()['files'])} names")
                for name in random.sample(sorted(known), 10):
                    got = http.get("/file", params={"path": name})
                    self.reads += 1
                    with self._lock:
                        possible = set(self.written[name])
                    if got.status_code != 200 or got.content not in possible:
                        self.failures.append(f"GET {name}: {got.status_code} {got.content[:100]!r}")

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()


def test_the_records_home_pair_is_retired_while_two_workers_serve_names(storage: Storage, start_stor: Any) -> None:
    admin = {"admin_auth": f"{ADMIN[0]}:{ADMIN[1]}"}
    config = storage.write_config(**admin)  # every pair takes writes: the records live on pair 0
    server: StorProcess = start_stor("--config", str(config), "--workers", "2")
    assert wait_for(lambda: server.log().count("Application startup complete") == 2)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for name in NAMES:
            assert http.put("/file", params={"path": name}, content=name.encode(), auth=AUTH).status_code == 201
        gone = os.urandom(500)
        assert http.post(f"/{sha256(gone)}", content=gone, auth=AUTH).status_code == 201
        taken = http.delete(f"/{sha256(gone)}", auth=ADMIN, headers={"X-Stor-Reason": "test"})
        assert taken.status_code == 200
    old, new = storage.pairs
    assert all(record_files(root) for root in old) and not any(record_files(root) for root in new)
    assert all(tombstone_files(root) for root in old)

    # Pair 0 drained: pair 1 takes the writes, and with them the new records.
    config = storage.write_config(writable_pairs_regex=r"/b[12]$", **admin)
    os.kill(server.proc.pid, signal.SIGHUP)
    assert wait_for(lambda: server.log().count("config reloaded from") == 2, timeout=15)
    traffic = Traffic(server.url)
    try:
        assert wait_for(lambda: traffic.writes > 20, timeout=20)
        assert any(record_files(root) for root in new)  # new records on the new home already
        result = stor("evacuate", "--pair", "0", "--config", str(config))
        settled = traffic.reads + 50
        assert wait_for(lambda: traffic.reads > settled, timeout=20)  # reads after the move, too
    finally:
        traffic.stop()
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["names_moved"] >= len(NAMES) and report["takedowns_moved"] == 1, report
    assert report["records_left"] == 0 and report["left"] == 0 and report["failed"] == []
    assert traffic.failures == [], traffic.failures[:5]
    assert traffic.listings > 3 and traffic.writes > 40
    assert not any(record_files(root) for root in old) and not any(tombstone_files(root) for root in old)
    assert all(tombstone_files(root) for root in new)

    # The old pair's disks retired: a config without them serves every name, and the takedown.
    server.stop()
    retired = storage.base / "retired.json"
    retired.write_text(json.dumps({**storage.config(**admin), "storage_pairs": [[str(p) for p in new]]}))
    after: StorProcess = start_stor("--config", str(retired))
    with httpx.Client(base_url=after.url, timeout=30) as http:
        listed = http.get("/files", params={"limit": 10000}).json()["files"]
        assert {f["path"]: f["sha"] for f in listed} == {n: sha256(d) for n, d in traffic.contents.items()}
        for name, data in random.sample(sorted(traffic.contents.items()), 20):
            assert http.get("/file", params={"path": name}).content == data
        assert http.get(f"/{sha256(gone)}").status_code == 410


class TwoPairs:
    """Records on `old` and `home`, the home read last (as `PoolPlaces` orders them)."""

    def __init__(self, old: tuple[Any, ...], home: tuple[Any, ...]) -> None:
        self.old, self.home_members = old, home

    def home(self) -> tuple[Any, ...]:
        return self.home_members

    def readers(self) -> tuple[Any, ...]:
        return (*self.old, *self.home_members)


def test_a_name_written_on_the_new_home_is_not_undone_by_the_older_record_moved_from_the_old(tmp_path: Path) -> None:
    (tmp_path / "old").mkdir()
    (tmp_path / "home").mkdir()
    old = tuple(prepared_disks(tmp_path / "old"))
    home = tuple(prepared_disks(tmp_path / "home"))
    sha_v1, sha_v2 = Sha(sha256(b"v1")), Sha(sha256(b"v2"))
    NameStore(OnePair(old)).put(NameRecord("a/x", sha_v1, 2, 1000.0), create_only=False)
    NameStore(OnePair(old)).put(NameRecord("a/only-old", sha_v1, 2, 1000.0), create_only=False)
    store = NameStore(TwoPairs(old, home))
    store.prepare()
    assert store.get("a/x") == NameRecord("a/x", sha_v1, 2, 1000.0)  # found where it is
    store.put(NameRecord("a/x", sha_v2, 2, time.time()), create_only=False)
    assert store.get("a/x").sha == sha_v2  # type: ignore[union-attr]  # newest wins over the old pair's
    assert [r.path for r in store.listing("a/", "", 10)] == ["a/only-old", "a/x"]
    assert store.listing("a/x", "", 10)[0].sha == sha_v2  # the listing shows the newest too
    assert store.evacuate(old) == 2 and store.held_by(old) == 0
    assert store.get("a/x").sha == sha_v2 and store.get("a/only-old").sha == sha_v1  # type: ignore[union-attr]
    for member in home:
        assert name_record(Path(member.root), "a/only-old").exists() and name_record(Path(member.root), "a/x").exists()


def test_records_are_written_on_the_first_pair_taking_writes_and_read_there_last(tmp_path: Path) -> None:
    pairs = []
    for index, name in enumerate("abc"):
        (tmp_path / name).mkdir()
        pairs.append(Pair(index, tuple(prepared_disks(tmp_path / name)), writable=True))
    places = PoolPlaces(StoragePool(pairs, placement_threshold=0))
    a, b, c = (pair.members for pair in pairs)
    assert places.home() == a and places.readers() == (*b, *c, *a)
    pairs[0].writable = False  # a reload drained pair 0: the records go to pair 1, read last
    assert places.home() == b and places.readers() == (*a, *c, *b)
    for pair in pairs:
        pair.writable = False  # nothing takes writes: the records stay on the first pair
    assert places.home() == a and places.readers() == (*b, *c, *a)
