"""`make bench-scale`: how stor's costs grow with the store, each measured at two sizes 10x apart.

The store is built fast by placing files in Stor's layout directly on one pair of plain
directories on the machine's disk (4 KiB blobs, each copy with its fast checksum; name records
in their tree), then `sync`ed. Measured, with stor serving it on a free loopback port:

- start-up (process start to `/readyz` answering 200) and RSS once ready: 0, N and 10N blobs;
- GET 4 KiB over random blobs of the store (wrk, one thread) with the dentry and inode caches
  dropped first (cold), then again (warm);
- `stor scrub` for a fixed time (interrupted, as an operator may): blobs/s and MB/s;
- named files: a listing page right after a `PUT /file` into the directory it lists, and the
  `PUT /file` rate, at M and 10M names (1,000 names per directory), and with every name in one
  directory (the case a tree cannot help).

Writes docs/benchmarks-scale.md. Asserts nothing. `BENCH_SCALE_ONLY=names` measures the named
files alone and only prints their rows.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.servers import free_port, raise_fd_limit, rss, tree
from bench.settings import AUTH, ROOT
from bench.workloads import lua_get, wrk
from stor.backends.namerecord import record_relpath
from stor.backends.namestore import NAMES_DIR, TREE_DIR
from stor.checksum import ATTR, fast_sum

BLOBS = int(os.environ.get("BENCH_SCALE_BLOBS", "100000"))
NAMES = int(os.environ.get("BENCH_SCALE_NAMES", "10000"))
PER_DIRECTORY = 1000
SCRUB_SECONDS = 20
SAMPLE = 20_000
ONLY_NAMES = os.environ.get("BENCH_SCALE_ONLY") == "names"


@dataclass
class Report:
    rows: list[tuple[str, str, str, str]] = field(default_factory=list)  # what, small, large, ratio

    def add(self, what: str, small: float, large: float, unit: str, *, higher_is_worse: bool) -> None:
        ratio = (large / small if higher_is_worse else small / large) if small and large else float("nan")
        self.rows.append((what, f"{small:,.1f} {unit}", f"{large:,.1f} {unit}", f"{ratio:.2f}"))
        print(f"  {what}: {small:,.1f} vs {large:,.1f} {unit} (cost ratio {ratio:.2f})", flush=True)


def main() -> None:
    started = time.time()
    raise_fd_limit()
    work = Path(tempfile.mkdtemp(prefix="stor-scale-", dir=os.environ.get("BENCH_DIR")))
    members = [work / "m1", work / "m2"]
    for member in members:
        member.mkdir()
    config = work / "config.json"
    config.write_text(
        json.dumps(
            {
                "storage_pairs": [[str(m) for m in members]],
                "check_mountpoints": False,
                "basic_auth": f"{AUTH[0]}:{AUTH[1]}",
            }
        )
    )
    report = Report()
    try:
        if ONLY_NAMES:
            names_part(config, members, work, report)
            return
        empty_start = start_up(config)
        shas = add_blobs(members, [], BLOBS)
        small = blob_costs(config, members, shas, work)
        shas = add_blobs(members, shas, 9 * BLOBS)
        large = blob_costs(config, members, shas, work)
        report.rows.append(("start-up, empty store (s)", f"{empty_start[0]:.2f}", "", ""))
        report.add("start-up to ready", small.start[0], large.start[0], "s", higher_is_worse=True)
        report.add("RSS once ready, both workers", small.start[1], large.start[1], "MiB", higher_is_worse=True)
        report.add("GET 4k, random blobs, cold dentry cache", small.cold, large.cold, "req/s", higher_is_worse=False)
        report.add("GET 4k, random blobs, warm", small.warm, large.warm, "req/s", higher_is_worse=False)
        report.add("stor scrub", small.scrub[0], large.scrub[0], "blobs/s", higher_is_worse=False)
        report.add("stor scrub", small.scrub[1], large.scrub[1], "MB/s", higher_is_worse=False)
        names_part(config, members, work, report)
        write(report, time.time() - started)
    finally:
        # millions of files take minutes to remove: that goes on in the background
        subprocess.Popen(["rm", "-rf", str(work)], start_new_session=True)


def names_part(config: Path, members: list[Path], work: Path, report: Report) -> None:
    for layout, per_directory in (("1,000 per directory", PER_DIRECTORY), ("all in one directory", 0)):
        names_small = name_costs(config, members, NAMES, per_directory, work)
        names_large = name_costs(config, members, 10 * NAMES, per_directory, work)
        report.add(
            f"listing page after a PUT, {layout}",
            names_small[0] * 1000,
            names_large[0] * 1000,
            "ms",
            higher_is_worse=True,
        )
        report.add(f"PUT /file, {layout}", names_small[1], names_large[1], "/s", higher_is_worse=False)


# -- building the store ----------------------------------------------------------------------


def add_blobs(members: list[Path], shas: list[str], count: int) -> list[str]:
    """`count` more random 4 KiB blobs on both members, as stor would have stored them."""
    print(f"placing {count:,} blobs (store: {len(shas) + count:,})…", flush=True)
    added = []
    for _ in range(count):
        data = os.urandom(4096)
        sha = hashlib.sha256(data).hexdigest().upper()
        fast = fast_sum(data)
        for member in members:
            directory = member / sha[0:2] / sha[2:4] / sha[4:6]
            directory.mkdir(parents=True, exist_ok=True)
            path = directory / f"{sha}.dat"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, data)
                os.setxattr(fd, ATTR, fast)
            finally:
                os.close(fd)
        added.append(sha.lower())
    subprocess.run(["sync"], check=True)
    return shas + added


def place_names(members: list[Path], count: int, per_directory: int) -> list[str]:
    """`count` name records in the tree, `per_directory` names to a directory (0: one directory)."""
    names = [f"p/{n // per_directory:05d}/{n:08d}" if per_directory else f"p/{n:08d}" for n in range(count)]
    sha = hashlib.sha256(b"named").hexdigest()
    for member in members:
        base = member / NAMES_DIR / TREE_DIR
        made: set[Path] = set()
        for name in names:
            path = base / record_relpath(name)
            if path.parent not in made:
                path.parent.mkdir(parents=True, exist_ok=True)
                made.add(path.parent)
            path.write_text(json.dumps({"path": name, "sha": sha, "size": 5, "mtime": 1.0}))
    subprocess.run(["sync"], check=True)
    return names


# -- measurements ------------------------------------------------------------------------------


@dataclass
class BlobCosts:
    start: tuple[float, float]
    cold: float
    warm: float
    scrub: tuple[float, float]


class Server:
    def __init__(self, config: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        began = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "stor", "serve", "--config", str(config), "--port", str(self.port),
             "--workers", "2", "--log-level", "warning"],
            start_new_session=True,
        )  # fmt: skip
        while True:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() - began > 120:
                raise RuntimeError("stor did not become ready")
            time.sleep(0.01)
        self.ready_after = time.perf_counter() - began
        time.sleep(1)  # both workers up
        self.rss = rss(tree(self.proc.pid))

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=30)


def start_up(config: Path) -> tuple[float, float]:
    server = Server(config)
    server.stop()
    return server.ready_after, server.rss


def drop_caches(what: str = "2") -> None:
    """2: dentries and inodes; 3: the page cache too."""
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text(f"{what}\n")


def blob_costs(config: Path, members: list[Path], shas: list[str], work: Path) -> BlobCosts:
    print(f"measuring with {len(shas):,} blobs…", flush=True)
    start = start_up(config)
    script = lua_get(work / "sample.lua", random.sample(shas, min(SAMPLE, len(shas))))
    drop_caches()
    server = Server(config)
    try:
        cold = wrk(server.url, script, "cold", warm_up=False).rps
        warm = wrk(server.url, script, "warm").rps
    finally:
        server.stop()
    return BlobCosts(start, cold, warm, scrub_rate(config))


def scrub_rate(config: Path) -> tuple[float, float]:
    """Blobs/s and MB/s of `stor scrub` over `SCRUB_SECONDS` (then interrupted, as an operator
    may; the summary still comes out), from cold caches: at either size, what was placed last
    may or may not still be cached, and that would decide the rate."""
    drop_caches("3")
    began = time.perf_counter()
    scrub = subprocess.Popen(
        [sys.executable, "-m", "stor", "scrub", "--config", str(config), "--restart"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        out, _ = scrub.communicate(timeout=SCRUB_SECONDS)
    except subprocess.TimeoutExpired:
        scrub.send_signal(signal.SIGINT)
        out, _ = scrub.communicate(timeout=60)
    seconds = time.perf_counter() - began
    summary = json.loads(out)
    return summary["blobs"] / seconds, summary["bytes"] / 1e6 / seconds


def name_costs(config: Path, members: list[Path], count: int, per_directory: int, work: Path) -> tuple[float, float]:
    """(The median seconds of a listing page right after a PUT into the directory it lists,
    PUT /file per second with 8 clients) at `count` names."""
    for member in members:
        subprocess.run(["rm", "-rf", str(member / NAMES_DIR)], check=True)
    print(f"measuring with {count:,} names ({per_directory or 'all'} per directory)…", flush=True)
    place_names(members, count, per_directory)
    listed = "p/00000/" if per_directory else "p/"
    server = Server(config)
    try:
        with httpx.Client(base_url=server.url, auth=AUTH, timeout=60) as client:
            client.get("/files", params={"prefix": listed, "limit": 100}).raise_for_status()
            pages = []
            for n in range(40):
                put = client.put("/file", params={"path": f"{listed}new-{n:04d}"}, content=b"x%d" % n)
                put.raise_for_status()
                began = time.perf_counter()
                page = client.get("/files", params={"prefix": listed, "limit": 100})
                pages.append(time.perf_counter() - began)
                assert page.status_code == 200 and len(page.json()["files"]) == 100
        began = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            done = sum(pool.map(lambda n: put_names(server.url, listed, n), range(8)))
        rate = done / (time.perf_counter() - began)
    finally:
        server.stop()
    return statistics.median(pages), rate


def put_names(url: str, directory: str, worker: int, seconds: float = 5.0) -> int:
    done = 0
    stop = time.monotonic() + seconds
    with httpx.Client(base_url=url, auth=AUTH, timeout=60) as client:
        while time.monotonic() < stop:
            client.put("/file", params={"path": f"{directory}w{worker}-{done:06d}"}, content=os.urandom(64))
            done += 1
    return done


def write(report: Report, seconds: float) -> None:
    rows = "\n".join(f"| {what} | {small} | {large} | {ratio} |" for what, small, large, ratio in report.rows)
    text = f"""# Costs as the store grows

Written by `make bench-scale` ({time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, {seconds:.0f} s) on
{os.cpu_count()} cores, one pair of plain directories on the machine's disk. Blobs: {BLOBS:,} against
{10 * BLOBS:,} 4 KiB blobs, placed in Stor's layout with their fast checksums (as stor would have stored them).
Names: {NAMES:,} against {10 * NAMES:,}. stor: 2 workers, default config; wrk: one thread, 64 connections,
{SAMPLE:,} random blobs of the store. "Cold" drops the kernel's dentry and inode caches first (the page cache of the
directories stays). The scrub runs {SCRUB_SECONDS} s from cold caches (page cache too) and is interrupted. A listing
page is `GET /files?prefix=…&limit=100` right after a `PUT /file` into the directory it lists (median of 40).

The cost ratio is large over small for costs and small over large for rates: 1.00 is flat, above 1 grows.

| measure | small store | large store (10x) | cost ratio |
|---|---|---|---|
{rows}
"""
    (ROOT / "docs" / "benchmarks-scale.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
