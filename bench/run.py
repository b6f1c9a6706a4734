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
from stor.backends.groupcommit import GroupCommits
from stor.backends.pairs import MirroredWrite
from stor.digest import Sha

ROOT = Path(__file__).resolve().parent.parent
CORPUS = {"4k": (4096, 20_000), "64k": (65536, 2_000), "8m": (8 * 1024 * 1024, 20)}
FD_LIMIT = 131_072
IMAGE_BYTES = 6 << 30
POST_BLOBS = 40_000
ONLY = set(filter(None, os.environ.get("BENCH_ONLY", "").split(",")))
"""Groups to run (get, hey, 404, post, rss, variants, limits): all when empty. With a choice,
docs/benchmarks.md is left alone and the report only printed."""


def wanted(group: str) -> bool:
    return not ONLY or group in ONLY


DURATION = int(os.environ.get("BENCH_SECONDS", "8"))
AUTH = ("bench", "bench-pass")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def layout(root: Path, sha: str) -> Path:
    up = sha.upper()
    return root / up[0:2] / up[2:4] / up[4:6] / f"{up}.dat"


class Members:
    """The pair stor stores on: two fresh ext4 filesystems (loop-mounted sparse images, as two
    data disks would be) when root, else two plain directories under the work directory."""

    def __init__(self, work: Path) -> None:
        self.paths = [work / "disk1", work / "disk2"]
        self.mounted: list[Path] = []
        for path in self.paths:
            path.mkdir()
        if os.geteuid() == 0 and shutil.which("mkfs.ext4") and not os.environ.get("BENCH_PLAIN_DIRS"):
            for path in self.paths:
                image = work / f"{path.name}.img"
                with image.open("wb") as f:
                    f.truncate(IMAGE_BYTES)
                subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
                subprocess.run(["mount", "-o", "loop", str(image), str(path)], check=True)
                self.mounted.append(path)
                path.chmod(0o755)
        self.kind = (
            f"two fresh ext4 filesystems, one per member (loop-mounted {IMAGE_BYTES >> 30} GiB sparse images)"
            if self.mounted
            else "two plain directories on one filesystem"
        )

    def close(self) -> None:
        for path in self.mounted:
            subprocess.run(["umount", "-l", str(path)], check=False)


def build_corpus(members: list[Path]) -> dict[str, list[str]]:
    shas: dict[str, list[str]] = {}
    for name, (size, count) in CORPUS.items():
        shas[name] = []
        for _ in range(count):
            data = os.urandom(size)
            sha = hashlib.sha256(data).hexdigest()
            for disk in members:
                path = layout(disk, sha)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
            shas[name].append(sha)
    return shas


def warm(members: list[Path], shas: list[str]) -> None:
    """Read every copy, so the run starts from the page cache (this VM drops what has gone
    untouched for about a minute)."""
    for sha in shas:
        for disk in members:
            layout(disk, sha).read_bytes()


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


def pair_writes(members: list[Path], threads: int, *, grouped: bool, seconds: float = 4.0) -> float | None:
    """Durable writes of both copies of 4 KiB blobs with stor's own code and no HTTP: one copy
    at a time with fsyncs (`MirroredWrite.finish`), or group-committed as POST does on ext4.
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
            writer = MirroredWrite(disks)
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


def main() -> None:  # noqa: PLR0915 - one linear script, read top to bottom
    started = time.time()
    raise_fd_limit()
    work = Path(tempfile.mkdtemp(prefix="stor-bench-", dir=os.environ.get("BENCH_DIR")))
    work.chmod(0o755)  # nginx's workers run unprivileged: 0700 would make every answer a 403
    members = Members(work)
    try:
        print(f"building the corpus on {members.kind}…", flush=True)
        shas = build_corpus(members.paths)
        scripts = work / "lua"
        scripts.mkdir()

        def post_script(name: str, count: int) -> Path:
            return lua_post(scripts / f"{name}.lua", post_blobs(work / f"{name}.bin", count), count)

        base_config: dict[str, object] = {
            "storage_pairs": [[str(p) for p in members.paths]],
            "check_mountpoints": False,
            "basic_auth": f"{AUTH[0]}:{AUTH[1]}",
        }
        lua_get(scripts / "4k.lua", shas["4k"])  # the variants' workload too
        nginx = Nginx(work, members.paths[0])
        stor = Stor(work, base_config)
        results: list[tuple[Result, Result | None]] = []
        try:
            for name in ("4k", "64k", "8m") if wanted("get") else ():
                script = lua_get(scripts / f"{name}.lua", shas[name])
                warm(members.paths, shas[name])
                ours = wrk(stor.url, script, f"GET {name}", stor.pids())
                warm(members.paths, shas[name])
                theirs = wrk(nginx.url, lua_get(scripts / f"{name}-up.lua", shas[name], upper=True), "nginx")
                if theirs.errors:
                    print(f"  warning: nginx answered {theirs.errors} errors for {name}", flush=True)
                results.append((ours, theirs))
                print(f"  {ours.workload}: stor {ours.rps:,.0f}/s vs nginx {theirs.rps:,.0f}/s", flush=True)
            for name in ("4k", "64k", "8m") if wanted("hey") else ():
                sha = shas[name][0]
                for method in ("HEAD", "GET"):
                    ours = hey(f"{stor.url}/{sha}", method, f"{method} {name}, one blob (hey)", stor.pids())
                    theirs = hey(f"{nginx.url}/{sha.upper()}", method, "nginx")
                    results.append((ours, theirs))
                    print(f"  {ours.workload}: stor {ours.rps:,.0f}/s vs nginx {theirs.rps:,.0f}/s", flush=True)
            if wanted("404"):
                missing = [hashlib.sha256(os.urandom(8)).hexdigest() for _ in range(1000)]
                ours = wrk(stor.url, lua_get(scripts / "404.lua", missing), "GET 404", stor.pids())
                theirs = wrk(nginx.url, lua_get(scripts / "404-up.lua", missing, upper=True), "nginx")
                results.append((ours, theirs))
                print(f"  GET 404: stor {ours.rps:,.0f}/s vs nginx {theirs.rps:,.0f}/s", flush=True)
            if wanted("post"):
                label = "POST 4k (durable, both copies; group commit)"
                warm_up = post_script("post-warm", 6000)
                ours = wrk(stor.url, post_script("post", POST_BLOBS), label, stor.pids(), warm_up)
                results.append((ours, None))
                print(f"  {label}: {ours.rps:,.0f}/s", flush=True)
            up, down = big_transfer_rss(stor) if wanted("rss") else (0.0, 0.0)
        finally:
            stor.stop()
        variants: list[tuple[str, dict[str, object], str | None, Path]] = [
            ("GET 4k, verify_on_read off", {**base_config, "verify_on_read": False}, None, scripts / "4k.lua"),
            ("GET 4k, --server granian", base_config, "granian", scripts / "4k.lua"),
            (
                "GET 4k, verify_on_read off, --server granian",
                {**base_config, "verify_on_read": False},
                "granian",
                scripts / "4k.lua",
            ),
            (
                "POST 4k (durable, both copies), group_commit off",
                {**base_config, "group_commit": False},
                None,
                post_script("post-off", POST_BLOBS // 2),
            ),
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
            memcached_config = {**base_config, "memcached_servers": [f"127.0.0.1:{mc_port}"]}
            variants.append(("GET 4k, memcached", memcached_config, None, scripts / "4k.lua"))
        try:
            nginx_4k = results[0][1] if results else None
            for label, config, http_server, script in variants if wanted("variants") else []:
                posting = label.startswith("POST")
                server = Stor(work, config, server=http_server)
                try:
                    warm(members.paths, shas["4k"])
                    warm_posts = post_script("post-off-warm", 6000) if posting else None
                    ours = wrk(server.url, script, label, server.pids(), warm_posts)
                finally:
                    server.stop()
                results.append((ours, None if posting else nginx_4k))
                print(f"  {label}: {ours.rps:,.0f}/s", flush=True)
        finally:
            if mc:
                mc.kill()
            nginx.stop()
        limits = (
            {}
            if not wanted("limits")
            else {
                "sha256 (MB/s, one core)": sha256_rate(),
                "durable pair writes/s, one copy at a time with fsyncs, 1 thread": pair_writes(
                    members.paths, 1, grouped=False
                ),
                "durable pair writes/s, one copy at a time with fsyncs, 32 threads": pair_writes(
                    members.paths, 32, grouped=False
                ),
                "durable pair writes/s, group-committed, 64 at once": pair_writes(members.paths, 64, grouped=True),
                "peak RSS growth, 1 GiB upload (MiB)": up,
                "peak RSS growth, 1 GiB download (MiB)": down,
            }
        )
        write_report(results, limits, time.time() - started, members.kind)
    finally:
        members.close()
        shutil.rmtree(work, ignore_errors=True)


def write_report(
    results: list[tuple[Result, Result | None]], limits: dict[str, float | None], seconds: float, storage: str
) -> None:
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
verified, group commit on) on one pair: {storage}. nginx (2 workers, sendfile) serves the same files from the first
member. wrk: 2 threads, 64 connections, {DURATION} s after a 2 s warm-up, random shas from the corpus
({", ".join(f"{c:,} x {s // 1024} KiB" for s, c in CORPUS.values())}), every copy read into the page cache before each
run. The "one blob (hey)" rows ask for one blob over and over with `hey` (64 connections), because wrk cannot measure
HEAD (it waits for a body that never comes); their GET is there to compare HEAD with GET under the same client. wrk or
hey, stor and nginx share the 2 cores, so every figure is CPU-bound on this machine; compare ratios, not absolutes
(two runs a minute apart differ by up to ±10% here). wrk is not pinned to a core: on 2 cores, pinning it apart from the
server made no consistent difference. stor runs with an open-file limit of {FD_LIMIT:,} (an operator's
`LimitNOFILE`), so that its open-file cache, a quarter of the limit, holds every small blob of the corpus; each worker
still opens each blob once during the run (on the event loop when the kernel has its path cached, else in a thread).

| workload | stor req/s | p50 | p99 | MB/s | nginx req/s | stor/nginx | stor RSS MiB | non-2xx |
|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

nginx's URL carries the sha in uppercase (core nginx cannot change case; the files are the same). GET 404 counts
404s as non-2xx by design. Each POST stores a new 4 KiB blob (the warm-up posts others): 201 only once both copies
and their names are durable; "group_commit off" is the per-copy protocol (fsync the file, link, fsync the directory,
one copy after the other).

## Physical limits measured in the same run

Pair writes use stor's own code (`MirroredWrite`, `GroupCommits`) on the same pair, without HTTP.

| limit | value |
|---|---|
{chr(10).join(f"| {k} | {'-' if v is None else f'{v:,.1f}'} |" for k, v in limits.items())}

## What limits each figure

From profiles of the GIL holder under wrk (`py-spy record --gil`), `perf record` and `perf trace -s` on this
machine:

- **GET and HEAD of a hot blob** (4 and 64 KiB, under uvicorn) are answered as soon as the request head is parsed, on
  the event loop, without an ASGI cycle (`stor/httpserver.py`). What is left per request is uvicorn's parser
  callbacks, the lookup with its `fstat`, the `preadv2` from the page cache, the hash and one `writev`: about 45 µs of
  Python (measured in-process) and four syscalls, the `writev` the dearest (it runs loopback TCP for both ends). nginx
  does the same in C. The 20,000-blob corpus is larger than what a worker sees twice in one run, so many GETs are a
  worker's first for that blob: an `openat2` from the dentry cache and a check of the partner copy too.
- **granian** has no such shortcut (it speaks ASGI only), so its rows take the ordinary ASGI path.
- **GET 8 MiB** hashes every byte: at nginx's rate, sha256 alone (the rate above, per core) would need more than the
  two cores; a profile shows sha256 at a quarter of all CPU, the copies through Python (read, then send) and page
  faults for the read buffers at another third.
- **GET 404** of a sha asked before is proven absent from the dentry cache on the event loop; a first miss takes a
  thread (a lookup on every disk).
- **POST** with group commit runs close to the group-committed pair-write limit above (the same code without HTTP):
  both are CPU-bound here, about 0.45 ms of kernel time per copy under concurrency (ext4 inode and directory
  creation for each new `AB/CD/EF`, writeback) plus the Python of two commit threads, a thread hop and the HTTP layer.
  A cycle takes 20 to 30 ms (its `syncfs` ends in a flush of the loop device), so an upload waits about two. Without
  group commit, the journal commits are the limit (the per-copy pair-write limits).

## How to run

`make bench` (installs wrk, hey, nginx and memcached from Debian when missing, and runs in a private mount namespace
so the images it mounts vanish with it; `BENCH_SECONDS` changes the run length, `BENCH_DIR` where the work directory
is made, `BENCH_PLAIN_DIRS=1` uses plain directories instead of ext4 images). It is not part of `make test` and asserts
nothing.
"""
    if not ONLY:
        (ROOT / "docs" / "benchmarks.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
