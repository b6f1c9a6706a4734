"""The workloads: wrk and hey runs (their Lua scripts), the physical limits measured without
HTTP (sha256, durable pair writes with stor's own code), and RSS under 1 GiB transfers."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.servers import Stor, cpu_seconds, rss
from bench.settings import AUTH, DURATION, ROUNDS, WRK_THREADS
from stor.backends.disk import Disk, now_ns
from stor.backends.groupcommit import GroupCommits
from stor.backends.pairs import PairWrite
from stor.checksum import fast_sum
from stor.digest import Sha


def lua_get(path: Path, shas: list[str], method: str = "GET", upper: bool = False, authorization: str = "") -> Path:
    names = ",".join(f'"{s.upper() if upper else s}"' for s in shas)
    headers = f"{{Authorization = '{authorization}'}}" if authorization else "nil"
    path.write_text(
        f"shas = {{{names}}}\nheaders = {headers}\n"
        f"request = function() return wrk.format('{method}', '/' .. shas[math.random(#shas)], headers) end\n"
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


def lua_post(path: Path, blobs: Path, count: int, *, statuses: bool = False) -> Path:
    """POST each blob of `blobs` once: each of wrk's threads takes its share. `statuses`: count
    the answers by status and print them at the end (`statuses {...}`; see `wrk_statuses`)."""
    counting = (
        """
threads = {}
function setup(thread)
  thread:set("id", counter); counter = counter + 1
  table.insert(threads, thread)
end
function response(status, headers, body)
  seen[status] = (seen[status] or 0) + 1
end
function done(summary, latency, requests)
  local out = {}
  for _, thread in ipairs(threads) do
    for status, n in pairs(thread:get("seen")) do out[status] = (out[status] or 0) + n end
  end
  local parts = {}
  for status, n in pairs(out) do table.insert(parts, '"' .. status .. '": ' .. n) end
  io.write("statuses {" .. table.concat(parts, ", ") .. "}\\n")
end
"""
        if statuses
        else """
function setup(thread) thread:set("id", counter); counter = counter + 1 end
"""
    )
    path.write_text(
        f"""
local counter = 0
{counting}
function init(args)
  local f = io.open("{blobs}", "rb"); blob = f:read("*a"); f:close()
  shas = {{}}
  seen = {{}}
  for line in io.lines("{blobs}.sha") do table.insert(shas, line) end
  n = id
end
request = function()
  local i = n % {count}
  n = n + {WRK_THREADS}
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
    cpu_seconds: float = 0.0
    """The server's CPU time during the measured run (both workers)."""
    statuses: dict[int, int] | None = None
    """The answers by status, when the script counted them (`lua_post(statuses=True)`)."""
    rounds: list[float] = field(default_factory=list)
    """Each round's rate, when the workload ran several times (`paired`); `rps` is their median."""

    @property
    def spread(self) -> str:
        """The rounds' range, as the report shows it."""
        return f"{min(self.rounds):,.0f}-{max(self.rounds):,.0f}" if len(self.rounds) > 1 else ""

    @property
    def cpu_per_gib(self) -> float | None:
        """CPU seconds per GiB of response bodies served."""
        gib = self.mbs * 1e6 * DURATION / 2**30
        return self.cpu_seconds / gib if gib > 0.1 else None


def median_of(runs: list[Result]) -> Result:
    """The run with the median rate, carrying every round's rate."""
    ordered = sorted(runs, key=lambda run: run.rps)
    middle = ordered[len(ordered) // 2]
    return dataclasses.replace(middle, rounds=[run.rps for run in runs])


def paired(
    ours: Callable[[], Result], theirs: Callable[[], Result] | None, rounds: int = ROUNDS
) -> tuple[Result, Result | None]:
    """Each workload `rounds` times, stor's and its ceiling's runs alternating (this VM drifts
    by more than 10% between runs a minute apart): the median runs, each with every round."""
    mine: list[Result] = []
    ceiling: list[Result] = []
    for _ in range(rounds):
        mine.append(ours())
        if theirs is not None:
            ceiling.append(theirs())
    return median_of(mine), median_of(ceiling) if ceiling else None


def wrk(
    url: str, script: Path, label: str, pids: list[int] | None = None, warm: Path | None = None, *, warm_up: bool = True
) -> Result:
    """`warm` is the warm-up's script when it must not repeat the run's requests (POSTs);
    `pids`, the server's processes (their RSS after the run, their CPU time during it)."""
    threads = f"-t{WRK_THREADS}"
    if warm_up:
        warm_run = ["wrk", threads, "-c64", "-d2s", "-s", str(warm or script), url]
        subprocess.run(warm_run, capture_output=True, check=False)
    if warm is not None:
        subprocess.run(["sync"], check=True)  # the warm-up's uploads written back: the run starts clean
    cpu_before = cpu_seconds(pids) if pids else 0.0
    out = subprocess.run(
        ["wrk", threads, "-c64", f"-d{DURATION}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    cpu = cpu_seconds(pids) - cpu_before if pids else 0.0
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
    counted = re.search(r"^statuses (\{.*\})$", out, re.MULTILINE)
    return Result(
        label,
        rps,
        p50.group(1) if p50 else "?",
        p99.group(1) if p99 else "?",
        mbs,
        int(errors.group(1)) if errors else 0,
        rss(pids) if pids else 0.0,
        cpu,
        {int(k): v for k, v in json.loads(counted.group(1)).items()} if counted else None,
    )


def hey(url: str, method: str, label: str, pids: list[int] | None = None) -> Result:
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
        rss(pids) if pids else 0.0,
    )


def hash_rates() -> dict[str, float]:
    """MB/s on one core over 64 MiB: SHA-256 (names and decides), xxh3-128 (the fast checksum
    stor keeps per copy), and BLAKE3 when its package is installed (the alternative measured)."""
    data = os.urandom(64 * 1024 * 1024)
    hashes: dict[str, Callable[[bytes], object]] = {
        "sha256": lambda d: hashlib.sha256(d).digest(),
        "xxh3-128": fast_sum,
    }
    try:
        import blake3  # type: ignore[import-not-found]  # noqa: PLC0415 - measured only when installed
    except ImportError:
        pass
    else:
        hashes["blake3"] = lambda d: blake3.blake3(d).digest()
    rates = {}
    for name, digest in hashes.items():
        started = time.perf_counter()
        for _ in range(4):
            digest(data)
        rates[name] = 4 * 64 * 1.048576 / (time.perf_counter() - started)
    return rates


def bare_protocol(members: list[Path], threads: int = 32, seconds: float = 4.0) -> float:
    """Pair writes/s of the per-copy protocol of DESIGN.md §2 in plain Python, no stor code and no
    HTTP: each of `threads` threads writes new 4 KiB files to both members, each copy an
    O_EXCL temp, write, fsync, rename into a new `AB/CD/EF` directory, fsync of the
    directories. What POST is measured against."""
    roots = [member / f"bare-{threads}" for member in members]
    for root in roots:
        (root / "tmp").mkdir(parents=True, exist_ok=True)  # (run again: new names, same directories)
    subprocess.run(["sync"], check=True)  # nothing dirty left by what ran before
    done = [0] * threads
    stop = time.monotonic() + seconds

    def fsync_dir(path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def one_copy(root: Path, name: str, data: bytes) -> None:
        temp = root / "tmp" / name
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        levels = [root / name[0:2], root / name[0:2] / name[2:4], root / name[0:2] / name[2:4] / name[4:6]]
        made = []
        for level in levels:
            try:
                level.mkdir()
                made.append(str(level.parent))
            except FileExistsError:
                pass
        os.rename(temp, levels[-1] / f"{name}.dat")
        for directory in [str(levels[-1]), *reversed(made)]:
            fsync_dir(directory)

    def run(slot: int) -> None:
        while time.monotonic() < stop:
            data = os.urandom(4096)
            name = hashlib.sha256(data).hexdigest().upper()
            for root in roots:
                one_copy(root, name, data)
            done[slot] += 1

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(run, range(threads)))
    return sum(done) / seconds


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
