"""SIGHUP: the config re-read at run time, by every worker, without refusing a connection."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import Storage, StorProcess
from tests.helpers import AUTH, PASSWORD, USER, layout_path, sha256, wait_for


def rewrite(path: Path, **changes: Any) -> None:
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))


def hup(server: StorProcess) -> None:
    os.kill(server.proc.pid, signal.SIGHUP)


def started(*args: str, start_stor: Any, workers: int = 1) -> StorProcess:
    """A server whose every worker has read the config (so none reads the next version first)."""
    server: StorProcess = start_stor(*args, "--workers", str(workers))
    assert wait_for(lambda: server.log().count("Application startup complete") == workers)
    return server


def accepted_by_fresh_connections(server: StorProcess, auth: tuple[str, str], times: int = 12) -> bool:
    """`times` uploads in a row, each on a new connection (so each worker gets some), succeed."""
    for _ in range(times):
        data = os.urandom(64)
        with httpx.Client(timeout=10) as http:
            if http.post(f"{server.url}/{sha256(data)}", content=data, auth=auth).status_code != 201:
                return False
    return True


class Uploads:
    """A stream of uploads, some on kept-alive connections and some on new ones."""

    def __init__(self, server: StorProcess) -> None:
        self.server = server
        self.failures: list[str] = []
        self.done = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with httpx.Client(base_url=self.server.url, timeout=10) as http:
                for _ in range(5):
                    data = os.urandom(512)
                    try:
                        answer = http.post(f"/{sha256(data)}", content=data, auth=AUTH)
                    except httpx.HTTPError as exc:
                        self.failures.append(repr(exc))
                        continue
                    if answer.status_code != 201:
                        self.failures.append(f"{answer.status_code} {answer.text}")
                    self.done += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def test_sighup_applies_writers_and_the_writable_regex_in_every_worker(storage: Storage, start_stor: Any) -> None:
    config = storage.write_config()
    server = started("--config", str(config), start_stor=start_stor, workers=2)
    uploads = Uploads(server)
    try:
        rewrite(config, basic_auth=[f"{USER}:{PASSWORD}", "second:pass-2"], writable_pairs_regex=r"/b[12]$")
        hup(server)
        assert wait_for(lambda: accepted_by_fresh_connections(server, ("second", "pass-2")), timeout=15)
        assert wait_for(lambda: server.log().count("config reloaded from") == 2)  # each worker
        assert "pairs taking writes: 1" in server.log() and "writers writer, second" in server.log()
        for _ in range(10):  # only pair 1 takes writes now, whichever worker answers
            data = os.urandom(100)
            with httpx.Client() as http:
                assert http.post(f"{server.url}/{sha256(data)}", content=data, auth=AUTH).status_code == 201
            assert {p.parent.parent.parent.parent.name for p in storage.copies(sha256(data))} == {"b1", "b2"}
    finally:
        uploads.stop()
    assert uploads.failures == [] and uploads.done > 0
    assert server.proc.poll() is None


def test_an_invalid_file_is_logged_and_the_running_config_stays(storage: Storage, start_stor: Any) -> None:
    config = storage.write_config()
    server = started("--config", str(config), start_stor=start_stor)  # one worker: SIGHUP must not stop it
    config.write_text('{"storage_pairs": [["/a", "/b"]], "max_upload_size": "lots"')
    hup(server)
    assert wait_for(lambda: "config reload refused" in server.log())
    rewrite_from = storage.config(basic_auth="other:pw", max_upload_sise=1)
    config.write_text(json.dumps(rewrite_from))
    hup(server)
    assert wait_for(lambda: "unknown config key 'max_upload_sise'" in server.log())
    assert accepted_by_fresh_connections(server, AUTH, times=3)  # the old writer still writes
    assert server.proc.poll() is None


def test_a_pair_added_to_the_file_is_served_after_sighup(storage: Storage, start_stor: Any) -> None:
    config = storage.write_config()
    server = started("--config", str(config), start_stor=start_stor, workers=2)
    added = [storage.base / "c1", storage.base / "c2"]
    for member in added:
        member.mkdir()
    rewrite(config, storage_pairs=[*json.loads(config.read_text())["storage_pairs"], [str(p) for p in added]])
    rewrite(config, writable_pairs_regex=r"/c[12]$", max_upload_size=12345)
    hup(server)
    assert wait_for(lambda: server.log().count("pair 2 added") == 2), server.log()
    assert "max_upload_size changed; that takes effect at the next restart" in server.log()
    for _ in range(10):
        pairs = httpx.get(f"{server.url}/status?format=json").json()["pairs"]
        assert [p["members"] for p in pairs][-1] == [str(p) for p in added]
    data = os.urandom(1000)
    assert httpx.post(f"{server.url}/{sha256(data)}", content=data, auth=AUTH).status_code == 201
    assert all(layout_path(member, sha256(data)).read_bytes() == data for member in added)
    assert storage.copies(sha256(data)) == []
    assert httpx.get(f"{server.url}/{sha256(data)}").content == data
    removed = storage.config(storage_pairs=[[str(p) for p in pair] for pair in storage.pairs[:1]])
    config.write_text(json.dumps(removed))
    hup(server)
    assert wait_for(lambda: "only pairs added at the end take effect without a restart" in server.log())
