"""The workloads: wrk and hey runs (their Lua scripts), the physical limits measured without
HTTP (sha256, durable pair writes with stor's own code), and RSS under 1 GiB transfers."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.servers import Stor, rss
from bench.settings import AUTH, DURATION
from stor.backends.disk import Disk, now_ns
from stor.backends.groupcommit import GroupCommits
from stor.backends.pairs import PairWrite
from stor.digest import Sha


def lua_get(path: Path, shas: list[str], method: str = "GET", upper: bool = False) -> Path:
    names = ",".join(f'"{s.upper() if upper else s}"' for s in shas)
    path.write_text(
        f"shas = {{{names}}}\nrequest = function() return wrk.format('{method}', '/' .. shas[math.random(#shas)]) end\n"
    )
    return path


def post_blobs(path: Path, count: int) -> Path:
    """`count` new random 4 KiB blobs in one file, their shas beside it (`<path>.sha`)."""
    with path.open("wb") as out, Path(f"{path}.sha").open("w") as names:
        for _ in range(count):
            data = os.urandom(4096)
            out.write(data)
            names.write(hashlib.sha256(data).hexdigest() + "\n")
    return path


def lua_post(path: Path, blobs: Path, count: int) -> Path:
    """POST each blob of `blobs` once: wrk's threads take every other one (2 threads)."""
    path.write_text(
        f"""
local counter = 0
function setup(thread) thread:set("id", counter); counter = counter + 1 end
function init(args)
  local f = io.open("{blobs}", "rb"); blob = f:read("*a"); f:close()
  shas = {{}}
  for line in io.lines("{blobs}.sha") do table.insert(shas, line) end
  n = id
end
request = function()
  local i = n % {count}
  n = n + 2
  return wrk.format("POST", "/" .. shas[i + 1], {{["Authorization"] = "Basic YmVuY2g6YmVuY2gtcGFzcw=="}},
                    blob:sub(i * 4096 + 1, (i + 1) * 4096))
end
"""
    )
    return path


@dataclass
class Result:
    workload: str
    rps: float
    p50: str
    p99: str
    mbs: float
    errors: int
    rss_mib: float = 0.0


def wrk(url: str, script: Path, label: str, rss_of: list[int] | None = None, warm: Path | None = None) -> Result:
    """`warm` is the warm-up's script when it must not repeat the run's requests (POSTs)."""
    subprocess.run(["wrk", "-t2", "-c64", "-d2s", "-s", str(warm or script), url], capture_output=True, check=False)
    out = subprocess.run(
        ["wrk", "-t2", "-c64", f"-d{DURATION}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    found = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if found is None:
        raise RuntimeError(f"wrk against {url} for {label!r} printed no result:\n{out}")
    rps = float(found.group(1))
    transfer = re.search(r"Transfer/sec:\s+([\d.]+)(\w+)", out)
    unit = {"B": 1e-6, "KB": 1024 / 1e6, "MB": 1024**2 / 1e6, "GB": 1024**3 / 1e6}
    mbs = float(transfer.group(1)) * unit.get(transfer.group(2), 1) if transfer else 0.0
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.MULTILINE)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.MULTILINE)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return Result(
        label,
        rps,
        p50.group(1) if p50 else "?",
        p99.group(1) if p99 else "?",
        mbs,
        int(errors.group(1)) if errors else 0,
        rss(rss_of) if rss_of else 0.0,
    )


def hey(url: str, method: str, label: str, rss_of: list[int] | None = None) -> Result:
    """One URL with `hey` (wrk cannot measure HEAD: it waits for a body that never comes)."""
    args = ["hey", "-m", method, "-c", "64", "-disable-compression"]
    subprocess.run([*args, "-z", "2s", url], capture_output=True, check=False)  # warm
    out = subprocess.run([*args, "-z", f"{DURATION}s", url], capture_output=True, text=True, check=False).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = re.search(r"50%+ in ([\d.]+) secs", out)
    p99 = re.search(r"99%+ in ([\d.]+) secs", out)
    statuses = {int(code): int(n) for code, n in re.findall(r"\[(\d+)\]\s+(\d+) responses", out)}
    return Result(
        label,
        rps,
        f"{float(p50.group(1)) * 1000:.2f}ms" if p50 else "?",
        f"{float(p99.group(1)) * 1000:.2f}ms" if p99 else "?",
        0.0,
        sum(n for code, n in statuses.items() if not 200 <= code < 400),
        rss(rss_of) if rss_of else 0.0,
    )


def sha256_rate() -> float:
    data = os.urandom(64 * 1024 * 1024)
    started = time.perf_counter()
    for _ in range(4):
        hashlib.sha256(data).digest()
    return 4 * 64 / (time.perf_counter() - started) * 1.048576


def pair_writes(members: list[Path], threads: int, *, grouped: bool, seconds: float = 4.0) -> float | None:
    """Durable writes of both copies of 4 KiB blobs with stor's own code and no HTTP: one copy
    at a time with fsyncs (`PairWrite.finish`), or group-committed as POST does on ext4.
    None when the members' filesystem has no group commit."""
    roots = [member / f"pw-{threads}-{'g' if grouped else 'f'}" for member in members]
    for root in roots:
        root.mkdir()
    disks = [Disk(str(r), require_mount=False, max_inflight=2 * threads) for r in roots]
    for disk in disks:
        disk.prepare()
    commits = GroupCommits()
    done = [0] * threads
    refused = threading.Event()
    stop = time.monotonic() + seconds

    def run(slot: int) -> None:
        while time.monotonic() < stop and not refused.is_set():
            data = os.urandom(4096)
            sha = Sha(hashlib.sha256(data).hexdigest())
            writer = PairWrite(disks)
            if not grouped:
                writer.finish(sha, now_ns(), data)
            else:
                try:
                    writer.stage(sha, now_ns(), data, group=True)
                    if not all(temp.groupable for temp in writer.temps):
                        refused.set()
                        return
                    commits.commit(writer.temps, sha).result()
                finally:
                    writer.abort()
            done[slot] += 1

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(run, range(threads)))
    commits.close()
    return None if refused.is_set() else sum(done) / seconds


def big_transfer_rss(stor: Stor) -> tuple[float, float]:
    """Peak RSS growth (MiB) of the stor processes during a 1 GiB upload, then its download."""
    piece = os.urandom(1024 * 1024)
    digest = hashlib.sha256()
    for _ in range(1024):
        digest.update(piece)
    sha = digest.hexdigest()
    results = []
    for direction in ("up", "down"):
        base = rss(stor.pids())
        peak = [base]
        done = threading.Event()

        def sample(peak: list[float] = peak, done: threading.Event = done) -> None:
            while not done.is_set():
                peak[0] = max(peak[0], rss(stor.pids()))
                time.sleep(0.05)

        watcher = threading.Thread(target=sample)
        watcher.start()
        if direction == "up":

            def body() -> Iterator[bytes]:
                for _ in range(1024):
                    yield piece

            httpx.post(f"{stor.url}/{sha}", content=body(), auth=AUTH, timeout=300).raise_for_status()
        else:
            with httpx.stream("GET", f"{stor.url}/{sha}", timeout=300) as response:
                for _ in response.iter_raw(1024 * 1024):
                    pass
        done.set()
        watcher.join()
        results.append(peak[0] - base)
    return results[0], results[1]


@dataclass
class Refill:
    files: int
    mb: float
    cp_seconds: float
    scrub_seconds: float


def refill(members: list[Path], config: Path, warm_all: Callable[[], None]) -> Refill:
    """A blank member refilled from its partner: `cp -a` of the partner's blob directories
    onto the blank member's filesystem (then `sync`, as the copies must be durable), against
    `stor scrub --repair` (which also hashes every copy it reads and writes each through the
    upload pipeline), both from a warm page cache."""
    blank, partner = members
    layout = sorted(p for p in partner.iterdir() if re.fullmatch(r"[0-9A-F]{2}", p.name))
    files = sum(1 for d in layout for _ in d.rglob("*.dat"))
    mb = sum(f.stat().st_size for d in layout for f in d.rglob("*.dat")) / 1e6
    target = blank / ".cp-refill"
    target.mkdir()
    warm_all()
    started = time.perf_counter()
    subprocess.run(["cp", "-a", *map(str, layout), str(target)], check=True)
    subprocess.run(["sync", "-f", str(target)], check=True)
    cp_seconds = time.perf_counter() - started
    subprocess.run(["rm", "-rf", str(target), *(str(blank / d.name) for d in layout)], check=True)
    subprocess.run(["sync", "-f", str(blank)], check=True)
    warm_all()
    started = time.perf_counter()
    scrub = subprocess.run(
        [sys.executable, "-m", "stor", "scrub", "--config", str(config), "--pair", "0", "--repair", "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    scrub_seconds = time.perf_counter() - started
    if scrub.returncode != 0:
        raise RuntimeError(f"stor scrub --repair failed ({scrub.returncode}): {scrub.stderr[-2000:]}")
    return Refill(files, mb, cp_seconds, scrub_seconds)
