"""statsd over a real UDP socket, Prometheus at /metrics, and the detail of /status."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from stor import __version__
from stor.metrics.prometheus import FLUSH_INTERVAL, _Tally
from stor.metrics.statsd import server_name, stor_outcome
from tests.conftest import Storage, StorProcess, app_client
from tests.helpers import AUTH, sha256, wait_for
from tests.services import MotoS3, StatsdSink

DATA = os.urandom(1500)
SHA = sha256(DATA)


def statsd_config(storage: Storage, sink: StatsdSink, **extra: object) -> dict[str, object]:
    extra.setdefault("open_file_cache_size", 0)  # every read in a thread, timed
    return storage.config(statsite={"host": "127.0.0.1", "port": sink.port, "prefix": "stor.test"}, **extra)


@pytest.mark.anyio
async def test_stors_statsd_names_arrive_over_udp(storage: Storage, statsd_sink: StatsdSink) -> None:
    async with app_client(statsd_config(storage, statsd_sink)) as http:
        await http.post(f"/{SHA}", content=DATA, auth=AUTH)  # write
        await http.post(f"/{SHA}", content=DATA, auth=AUTH)  # duplicate
        await http.post(f"/{'0' * 64}", content=DATA, auth=AUTH)  # bad sha
        await http.post("/not-a-sha", content=DATA, auth=AUTH)  # malformed
        await http.post(f"/{SHA}", content=DATA)  # unauthorized
        await http.get(f"/{SHA}")
        await http.head(f"/{SHA}")
        await http.get(f"/{sha256(b'nothing')}")
        await http.get("/status")
        free = 1 << 62
        async with app_client(statsd_config(storage, statsd_sink, max_upload_size=free * 2)) as other:
            await other.post(f"/{sha256(b'x')}", content=b"", headers={"Content-Length": str(free)}, auth=AUTH)
        names = statsd_sink.names()
    expected = {
        "request.post.count",
        "request.get.count",
        "request.head.count",
        "success.post.write.count",
        "success.post.duplicate.count",
        "error.post.bad_sha.count",
        "error.post.malformed_sha.count",
        "error.post.unauthorized.count",
        "error.post.no_space.count",
        "success.get.ok.count",
        "error.get.not_found.count",
        "healthcheck.count",
        "lookup.time",
        "lookup.attempt.4.count",
        "success.get.ok.size",
        "success.get.ok.time",
    }
    assert {f"stor.test.{name}" for name in expected} <= set(names)
    lines = statsd_sink.lines
    assert any(re.fullmatch(r"stor\.test\.lookup\.time:[\d.]+\|ms", line) for line in lines)
    assert f"stor.test.success.get.ok.size:{len(DATA)}|c" in lines


def test_the_fast_path_sends_stors_cache_and_lookup_names(
    storage: Storage, statsd_sink: StatsdSink, start_stor: Callable[..., StorProcess]
) -> None:
    """GETs answered by uvicorn's protocol on the spot (no ASGI cycle) still count as Stor did:
    the first opens the copy after probing the disks (a miss), later ones find it kept (hits)."""
    raw = storage.config(statsite={"host": "127.0.0.1", "port": statsd_sink.port, "prefix": "s"})
    config = storage.base / "statsd.json"
    config.write_text(json.dumps(raw))
    server = start_stor("--config", str(config))
    assert httpx.post(f"{server.url}/{SHA}", content=DATA, auth=AUTH).status_code == 201
    statsd_sink.counts()
    statsd_sink.lines.clear()
    with httpx.Client() as http:
        for _ in range(5):
            assert http.get(f"{server.url}/{SHA}").content == DATA
    counts = statsd_sink.counts(wait=2.5)  # the hot path's counts reach statsd within two flushes
    assert counts.get("s.request.get.count") == 5 and counts.get("s.success.get.ok.count") == 5
    assert counts.get("s.cache.hit", 0) + counts.get("s.cache.miss", 0) == 5
    assert counts.get("s.cache.hit", 0) >= 3  # kept open after the first
    attempts = sum(v for k, v in counts.items() if k.startswith("s.lookup.attempt."))
    assert attempts == counts.get("s.cache.miss", 0)
    assert any(line.startswith("s.lookup.time:") for line in statsd_sink.lines) == (attempts > 0)


@pytest.mark.anyio
async def test_build_info_and_process_metrics(storage: Storage) -> None:
    async with app_client(storage.config()) as http:
        text = (await http.get("/metrics")).text
    assert re.search(rf'stor_build_info{{python="[\d.]+",version="{re.escape(__version__)}"}} 1\.0', text)
    assert "process_resident_memory_bytes" in text and "process_open_fds" in text


def test_outcome_names() -> None:
    assert stor_outcome("PUT", "blob", 201) == "success.post.write"
    assert stor_outcome("HEAD", "blob", 304) == "success.get.not_modified"
    assert stor_outcome("GET", "other", 404) == "error.get.malformed_sha"
    assert stor_outcome("POST", "blob", 500) == "error.post.500"
    assert stor_outcome("GET", "status", 200) == ""


@pytest.mark.anyio
async def test_prometheus_metrics(storage: Storage) -> None:
    async with app_client(storage.config()) as http:
        posted = await http.post(f"/{SHA}", content=DATA, auth=AUTH)
        await http.get(f"/{SHA}")
        await http.get(f"/{SHA}")
        await http.get("/status")
        response = await http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert 'stor_http_requests_total{method="GET",route="blob",status="200"} 2.0' in text
    assert 'stor_http_requests_total{method="POST",route="blob",status="201"} 1.0' in text
    assert f'stor_http_received_bytes_total{{route="blob"}} {float(len(DATA))}' in text
    assert f'stor_http_sent_bytes_total{{route="blob"}} {float(2 * len(DATA) + len(posted.content))}' in text
    assert 'stor_http_request_duration_seconds_bucket{le="+Inf",method="GET",route="blob"} 2.0' in text
    assert "stor_healthchecks_total 1.0" in text
    for root in storage.roots:
        assert f'stor_disk_up{{disk="{root}"}} 1.0' in text
        match = re.search(rf'stor_disk_free_bytes{{disk="{root}"}} ([\d.e+]+)', text)
        assert match and float(match.group(1)) > 0
    assert "stor_s3_queue_blobs" in text


@pytest.mark.anyio
async def test_status_json_detail(storage: Storage) -> None:
    async with app_client(storage.config()) as http:
        detail = (await http.get("/status?format=json")).json()
    assert detail["version"] == __version__
    assert detail["uptime"] >= 0
    assert detail["memcached"] == {"configured": False, "reachable": None}
    assert detail["s3"] == {"enabled": False}
    disk = detail["disks"][0]
    assert set(disk) >= {"path", "ok", "mounted", "writable", "free_bytes", "total_bytes", "error"}


def test_an_unresolvable_statsd_host_is_a_startup_error(storage: Storage) -> None:
    config = storage.write_config(statsite={"host": "statsd.invalid", "port": 8125})
    result = subprocess.run(
        [sys.executable, "-m", "stor", "check-config", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "statsite.host" in result.stderr and "statsd.invalid" in result.stderr


def test_metrics_sum_over_workers(storage: Storage, start_stor: Callable[..., StorProcess], tmp_path: Path) -> None:
    shared = tmp_path / "prometheus"
    shared.mkdir()
    server = start_stor(
        "--config", str(storage.write_config()), "--workers", "2", env={"PROMETHEUS_MULTIPROC_DIR": str(shared)}
    )

    def root_requests() -> float:
        text = httpx.get(f"{server.url}/metrics", headers={"Connection": "close"}).text
        match = re.search(r'stor_http_requests_total{method="GET",route="root",status="200"} ([\d.]+)', text)
        return float(match.group(1)) if match else 0.0

    time.sleep(FLUSH_INTERVAL + 0.5)  # the readiness probes' counts, from either worker, are in
    before = root_requests()
    for _ in range(30):  # new connections spread over both workers
        assert httpx.get(f"{server.url}/", headers={"Connection": "close"}).status_code == 200
    # the answering worker's own requests count at once, the other's within a second or so
    assert wait_for(lambda: root_requests() - before == 30.0, timeout=5)
    assert len({p.name for p in shared.glob("counter_*.db")}) == 2  # both workers counted into it


def test_tallied_updates_add_up_to_the_same_values() -> None:
    """With several workers, request metrics are tallied in memory and flushed in batches:
    after a flush every counter and histogram bucket holds what one update per event gives."""

    def family(registry: CollectorRegistry) -> tuple[Counter, Histogram]:
        counter = Counter("c", "c", ["k"], registry=registry)
        histogram = Histogram("h", "h", ["k"], buckets=(0.001, 0.01, 0.1, 1), registry=registry)
        return counter, histogram

    direct, tallied = CollectorRegistry(), CollectorRegistry()
    (c1, h1), (c2, h2) = family(direct), family(tallied)
    tally = _Tally()
    c1.labels("out")  # known to both, never incremented
    values = [0.0, 0.0005, 0.001, 0.001, 0.0011, 0.01, 0.05, 0.1, 0.7, 1.0, 3.0, 99.0]
    for n, value in enumerate(values):
        key = "a" if n % 3 else "b"
        h1.labels(key).observe(value)
        if n % 2:
            c1.labels(key).inc(n)
            tally.inc(c2.labels(key), n)
            tally.observe(h2.labels(key), value)
        else:  # a request's updates in one go: count, latency, bytes in and out
            c1.labels(key).inc()
            c1.labels("in").inc(5)
            tally.request((c2.labels(key), h2.labels(key), c2.labels("in"), c2.labels("out")), value, 5, 0)

    def text(registry: CollectorRegistry) -> list[str]:
        return sorted(line for line in generate_latest(registry).decode().splitlines() if "_created" not in line)

    assert text(tallied) != text(direct)  # nothing written yet
    tally.flush()
    assert text(tallied) == text(direct)
    tally.flush()  # a second flush adds nothing
    assert text(tallied) == text(direct)


@pytest.mark.anyio
async def test_stor_1_5_2_names_arrive_beside_0_6s(storage: Storage, statsd_sink: StatsdSink, s3: MotoS3) -> None:
    """Stor 1.5.2 names reads by the storage directory that served them (and S3, its HCP)."""
    config = statsd_config(storage, statsd_sink, **s3.config(s3_fill_local=False))
    only_s3 = os.urandom(3000)
    async with app_client(config) as http:
        assert (await http.post(f"/{SHA}", content=DATA, auth=AUTH)).status_code == 201
        for _ in range(3):
            assert (await http.get(f"/{SHA}")).status_code == 200
        assert (await http.head(f"/{SHA}")).status_code == 200
        assert (await http.get(f"/{sha256(b'nothing')}")).status_code == 404
        s3.put_raw(sha256(only_s3), only_s3)
        assert (await http.get(f"/{sha256(only_s3)}")).content == only_s3
        counts = {name.removeprefix("stor.test."): n for name, n in statsd_sink.counts().items()}
    served = [name for name in counts if name.startswith("success.get.ok_old.")]
    servers = {server_name(str(root)) for root in storage.roots}
    assert served and {name.split(".")[3] for name in served} <= servers
    assert sum(v for k, v in counts.items() if k.startswith("success.get.ok_old.") and k.endswith(".count")) == 4
    assert sum(v for k, v in counts.items() if k.startswith("success.get.ok_old.") and k.endswith(".size")) == 3 * len(
        DATA
    )
    assert counts["success.get.ok_hcp.count"] == 1 and counts["success.get.ok_hcp.size"] == len(only_s3)
    assert counts["error.get.not_found_old.count"] == 1 and counts["error.get.not_found_hcp.count"] == 1
    assert counts["success.get.ok.count"] == 5  # 0.6's names stay


def test_stor_1_5_2_server_names() -> None:
    assert server_name("/mnt/data1") == "mnt-data1"
    assert server_name("/srv/stor//disk_2/") == "srv-stor-disk-2"
