"""`make bench`: stor against nginx serving the same files, on this machine, in one run.

Builds a corpus in Stor's layout, starts stor and nginx on free loopback ports, drives both
with wrk (64 connections, random shas), measures the physical limits (sha256, durable pair
writes) and RSS under 1 GiB transfers, and writes docs/benchmarks.md. Not part of `make test`;
nothing here asserts a time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx

from stor.backends.disk import Disk, now_ns
from stor.backends.pairs import MirroredWrite
from stor.digest import Sha

ROOT = Path(__file__).resolve().parent.parent
CORPUS = {"4k": (4096, 20_000), "64k": (65536, 2_000), "8m": (8 * 1024 * 1024, 20)}
FD_LIMIT = 131_072
DURATION = int(os.environ.get("BENCH_SECONDS", "8"))
AUTH = ("bench", "bench-pass")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def layout(root: Path, sha: str) -> Path:
    up = sha.upper()
    return root / up[0:2] / up[2:4] / up[4:6] / f"{up}.dat"


def build_corpus(work: Path) -> dict[str, list[str]]:
    pair = [work / "disk1", work / "disk2"]
    shas: dict[str, list[str]] = {}
    for name, (size, count) in CORPUS.items():
        shas[name] = []
        for _ in range(count):
            data = os.urandom(size)
            sha = hashlib.sha256(data).hexdigest()
            for disk in pair:
                path = layout(disk, sha)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
            shas[name].append(sha)
    return shas


def lua_get(path: Path, shas: list[str], method: str = "GET", upper: bool = False) -> Path:
    names = ",".join(f'"{s.upper() if upper else s}"' for s in shas)
    path.write_text(
        f"shas = {{{names}}}\nrequest = function() return wrk.format('{method}', '/' .. shas[math.random(#shas)]) end\n"
    )
    return path


def lua_post(path: Path, blobs: Path, count: int) -> Path:
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
  n = n + 8
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


def wrk(url: str, script: Path, label: str, rss_of: list[int] | None = None) -> Result:
    subprocess.run(["wrk", "-t2", "-c64", "-d2s", "-s", str(script), url], capture_output=True, check=False)  # warm
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


def raise_fd_limit() -> None:
    """Let stor (a child: it inherits the limit) keep the whole small-blob corpus open
    (open_file_cache_size, a quarter of the limit): what an operator sets with systemd's
    LimitNOFILE. Root may raise the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = FD_LIMIT if os.geteuid() == 0 else hard
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), max(hard, wanted)))


def rss(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def tree(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False).stdout
    children = [int(p) for p in out.split()]
    return [pid] + [q for c in children for q in tree(c)]


class Stor:
    def __init__(self, work: Path, config: dict[str, object], workers: int = 2, server: str | None = None) -> None:
        self.port = free_port()
        path = work / f"config-{self.port}.json"
        path.write_text(json.dumps(config))
        self.log = (work / f"stor-{self.port}.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "stor", "serve", "--config", str(path), "--port", str(self.port),
             "--workers", str(workers), "--log-level", "warning", *(["--server", server] if server else [])],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/status", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("stor did not start")

    def pids(self) -> list[int]:
        return tree(self.proc.pid)

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=20)
        self.log.close()


class Nginx:
    def __init__(self, work: Path, root: Path) -> None:
        self.port = free_port()
        conf = work / "nginx.conf"
        conf.write_text(
            f"""
worker_processes 2;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    client_body_temp_path {work}/nginx-tmp;
    proxy_temp_path {work}/nginx-tmp; fastcgi_temp_path {work}/nginx-tmp;
    uwsgi_temp_path {work}/nginx-tmp; scgi_temp_path {work}/nginx-tmp;
    server {{
        listen 127.0.0.1:{self.port};
        root {root};
        # Stor's layout: /<SHA> is AB/CD/EF/<SHA>.dat (the URL carries the sha in uppercase:
        # core nginx cannot change case; the files served are the very same)
        location ~ "^/([0-9A-F]{{2}})([0-9A-F]{{2}})([0-9A-F]{{2}})([0-9A-F]{{58}})$" {{
            try_files /$1/$2/$3/$1$2$3$4.dat =404;
        }}
    }}
}}
"""
        )
        (work / "nginx-tmp").mkdir(exist_ok=True)
        self.proc = subprocess.Popen(["nginx", "-c", str(conf), "-g", "daemon off;"], start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"
        time.sleep(0.5)

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=10)


def sha256_rate() -> float:
    data = os.urandom(64 * 1024 * 1024)
    started = time.perf_counter()
    for _ in range(4):
        hashlib.sha256(data).digest()
    return 4 * 64 / (time.perf_counter() - started) * 1.048576


def pair_writes(work: Path, threads: int, seconds: float = 4.0) -> float:
    """Durable writes of both copies of 4 KiB blobs: stor's own MirroredWrite, as POST does."""
    roots = [work / f"pw-{threads}-{n}" for n in (1, 2)]
    for root in roots:
        root.mkdir()
    disks = [Disk(str(r), require_mount=False) for r in roots]
    for disk in disks:
        disk.prepare()
    done = [0] * threads
    stop = time.monotonic() + seconds

    def run(slot: int) -> None:
        while time.monotonic() < stop:
            data = os.urandom(4096)
            MirroredWrite(disks).finish(Sha(hashlib.sha256(data).hexdigest()), now_ns(), data)
            done[slot] += 1

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(run, range(threads)))
    return sum(done) / seconds


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


def main() -> None:  # noqa: PLR0915 - one linear script, read top to bottom
    started = time.time()
    raise_fd_limit()
    work = Path(tempfile.mkdtemp(prefix="stor-bench-", dir=os.environ.get("BENCH_DIR")))
    work.chmod(0o755)  # nginx's workers run unprivileged: 0700 would make every answer a 403
    try:
        print("building the corpus…", flush=True)
        shas = build_corpus(work)
        subprocess.run(["sh", "-c", f"find {work}/disk1 -name '*.dat' -exec cat {{}} + > /dev/null"], check=False)
        scripts = work / "lua"
        scripts.mkdir()
        post_blobs = work / "post.bin"
        with post_blobs.open("wb") as out, Path(f"{post_blobs}.sha").open("w") as names:
            for _ in range(60_000):
                data = os.urandom(4096)
                out.write(data)
                names.write(hashlib.sha256(data).hexdigest() + "\n")
        base_config: dict[str, object] = {
            "storage_pairs": [[str(work / "disk1"), str(work / "disk2")]],
            "check_mountpoints": False,
            "basic_auth": f"{AUTH[0]}:{AUTH[1]}",
        }
        nginx = Nginx(work, work / "disk1")
        stor = Stor(work, base_config)
        results: list[tuple[Result, Result | None]] = []
        try:
            for name in ("4k", "64k", "8m"):
                script = lua_get(scripts / f"{name}.lua", shas[name])
                ours = wrk(stor.url, script, f"GET {name}", stor.pids())
                theirs = wrk(nginx.url, lua_get(scripts / f"{name}-up.lua", shas[name], upper=True), "nginx")
                if theirs.errors:
                    print(f"  warning: nginx answered {theirs.errors} errors for {name}", flush=True)
                results.append((ours, theirs))
                print(f"  {ours.workload}: stor {ours.rps:,.0f}/s vs nginx {theirs.rps:,.0f}/s", flush=True)
            for name in ("4k", "64k", "8m"):
                sha = shas[name][0]
                for method in ("HEAD", "GET"):
                    ours = hey(f"{stor.url}/{sha}", method, f"{method} {name}, one blob (hey)", stor.pids())
                    theirs = hey(f"{nginx.url}/{sha.upper()}", method, "nginx")
                    results.append((ours, theirs))
                    print(f"  {ours.workload}: stor {ours.rps:,.0f}/s vs nginx {theirs.rps:,.0f}/s", flush=True)
            missing = [hashlib.sha256(os.urandom(8)).hexdigest() for _ in range(1000)]
            ours = wrk(stor.url, lua_get(scripts / "404.lua", missing), "GET 404", stor.pids())
            theirs = wrk(nginx.url, lua_get(scripts / "404-up.lua", missing, upper=True), "nginx")
            results.append((ours, theirs))
            ours = wrk(
                stor.url,
                lua_post(scripts / "post.lua", post_blobs, 60_000),
                "POST 4k (durable, both copies)",
                stor.pids(),
            )
            results.append((ours, None))
            print(f"  POST 4k: {ours.rps:,.0f}/s", flush=True)
            up, down = big_transfer_rss(stor)
        finally:
            stor.stop()
        variants: list[tuple[str, dict[str, object], str | None]] = [
            ("GET 4k, verify_on_read off", {**base_config, "verify_on_read": False}, None),
            ("GET 4k, --server granian", base_config, "granian"),
            ("GET 4k, verify_on_read off, --server granian", {**base_config, "verify_on_read": False}, "granian"),
        ]
        memcached = shutil.which("memcached")
        mc_port = free_port()
        mc = None
        if memcached:
            mc = subprocess.Popen(
                [
                    memcached,
                    "-l",
                    "127.0.0.1",
                    "-p",
                    str(mc_port),
                    "-m",
                    "64",
                    *(["-u", "root"] if os.geteuid() == 0 else []),
                ]
            )
            variants.append(("GET 4k, memcached", {**base_config, "memcached_servers": [f"127.0.0.1:{mc_port}"]}, None))
        try:
            nginx_4k = results[0][1]
            for label, config, http_server in variants:
                server = Stor(work, config, server=http_server)
                try:
                    ours = wrk(server.url, scripts / "4k.lua", label, server.pids())
                finally:
                    server.stop()
                results.append((ours, nginx_4k))
                print(f"  {label}: {ours.rps:,.0f}/s", flush=True)
        finally:
            if mc:
                mc.kill()
            nginx.stop()
        limits = {
            "sha256 (MB/s, one core)": sha256_rate(),
            "durable pair writes/s, 1 thread": pair_writes(work, 1),
            "durable pair writes/s, 32 threads": pair_writes(work, 32),
            "peak RSS growth, 1 GiB upload (MiB)": up,
            "peak RSS growth, 1 GiB download (MiB)": down,
        }
        write_report(results, limits, time.time() - started)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def write_report(results: list[tuple[Result, Result | None]], limits: dict[str, float], seconds: float) -> None:
    rows = []
    for ours, theirs in results:
        ratio = f"{100 * ours.rps / theirs.rps:.0f}%" if theirs and theirs.rps else "-"
        nginx = f"{theirs.rps:,.0f}" if theirs else "-"
        rows.append(
            f"| {ours.workload} | {ours.rps:,.0f} | {ours.p50} | {ours.p99} | {ours.mbs:,.1f} | {nginx} | {ratio} "
            f"| {ours.rss_mib:.0f} | {ours.errors} |"
        )
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "?")
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    text = f"""# Benchmarks

Written by `make bench` ({when}, {seconds:.0f} s). Machine: {os.cpu_count()} cores
({cpu}), {platform.system()} {platform.release()}, Python {platform.python_version()}. stor runs with 2 workers under
its default server (uvicorn; the rows marked `--server granian` under granian) and the default config (every GET
verified) on one pair of plain directories; nginx (2 workers, sendfile) serves the
same files from the same directory. wrk: 2 threads, 64 connections, {DURATION} s after a 2 s warm-up, random shas
from the corpus ({", ".join(f"{c:,} x {s // 1024} KiB" for s, c in CORPUS.values())}). The "one blob (hey)" rows
ask for one blob over and over with `hey` (64 connections), because wrk cannot measure HEAD (it waits for a body
that never comes); their GET is there to compare HEAD with GET under the same client. wrk or hey, stor and nginx
share the 2 cores, so every figure is CPU-bound on this machine; compare ratios, not absolutes. stor runs with an
open-file limit of {FD_LIMIT:,} (an operator's `LimitNOFILE`), so that its open-file cache, a quarter of the limit,
holds every small blob of the corpus; each worker still opens each blob once during the run (on the event loop when
the kernel has its path cached, else in a thread).

| workload | stor req/s | p50 | p99 | MB/s | nginx req/s | stor/nginx | stor RSS MiB | non-2xx |
|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

nginx's URL carries the sha in uppercase (core nginx cannot change case; the files are the same). GET 404 counts
404s as non-2xx by design. POST writes new 4 KiB blobs, both copies fsynced, renamed and their directories fsynced.

## Physical limits measured in the same run

| limit | value |
|---|---|
{chr(10).join(f"| {k} | {v:,.1f} |" for k, v in limits.items())}

## How to run

`make bench` (installs wrk, hey, nginx and memcached from Debian when missing; `BENCH_SECONDS` changes the run length,
`BENCH_DIR` where the corpus is built). It is not part of `make test` and asserts nothing.
"""
    (ROOT / "docs" / "benchmarks.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
