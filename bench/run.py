"""`make bench`: stor against nginx serving the same files, on this machine, in one run.

Builds a corpus in Stor's layout (`corpus`), starts stor and nginx on free loopback ports
(`servers`), drives both with wrk (one client thread, 64 connections, random shas), measures
the physical limits (hashes, the bare durable-write protocol, stor's pair writes) and RSS under
1 GiB transfers (`workloads`), and writes docs/benchmarks.md (`report`). Everything runs on two
plain directories on the machine's own disk; the headline rows run again on two loop-mounted
ext4 images. Not part of `make test`; nothing here asserts a time.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from bench.corpus import Members, build_corpus, can_mount_images, strip_sums, warm
from bench.evacuation import EVACUATION_SIZES, evacuation
from bench.hostile import neighbours
from bench.refill import Refill, refill, small_pair, warm_files
from bench.report import (
    ARRIVED_ROW,
    BARE_ROW,
    LOGGED_ROW,
    RABBITMQ_ROW,
    READ_AUTH_ROW,
    UNCACHED_FILES,
    UNCACHED_ROW,
    UNHELD_ROW,
    Section,
    kept_4k_blobs,
    write_report,
)
from bench.servers import Nginx, Stor, free_port, raise_fd_limit
from bench.settings import AUTH, POST_BLOBS, wanted
from bench.workloads import (
    Result,
    bare_protocol,
    big_transfer_rss,
    hash_rates,
    hey,
    lua_get,
    lua_post,
    pair_writes,
    paired,
    post_blobs,
    wrk,
)
from stor.http.auth import hash_password
from tests.services import RabbitMQ


def main() -> None:
    started = time.time()
    raise_fd_limit()
    work = Path(tempfile.mkdtemp(prefix="stor-bench-", dir=os.environ.get("BENCH_DIR")))
    work.chmod(0o755)  # nginx's workers run unprivileged: 0700 would make every answer a 403
    try:
        sections = [run_on(work / "plain", images=False, full=True)]
        if can_mount_images() and wanted("images"):
            sections.append(run_on(work / "images", images=True, full=False))
        write_report(sections, hash_rates() if wanted("limits") else {}, time.time() - started)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_on(base: Path, *, images: bool, full: bool) -> Section:  # noqa: PLR0915 - one linear script
    """Every workload (`full`), or the headline ones: GET 4k and 8m, POST, the write limits."""
    members = Members(base, images=images)
    try:
        print(f"building the corpus on {members.kind}…", flush=True)
        corpus = build_corpus(members.paths)
        # the rows of copies kept open ask for what each worker can keep open; UNCACHED_ROW asks for all
        shas = {**corpus, "4k": corpus["4k"][: kept_4k_blobs()]}
        scripts = base / "lua"
        scripts.mkdir()

        def post_script(name: str, count: int, *, statuses: bool = False) -> Path:
            blobs = post_blobs(base / f"{name}.bin", count)
            return lua_post(scripts / f"{name}.lua", blobs, count, statuses=statuses)

        base_config: dict[str, object] = {
            "storage_pairs": [[str(p) for p in members.paths]],
            "check_mountpoints": False,
            "basic_auth": f"{AUTH[0]}:{AUTH[1]}",
        }
        lua_get(scripts / "4k.lua", shas["4k"])  # the variants' workload too
        nginx = Nginx(base, members.paths[0])
        stor = Stor(base, base_config)
        results: list[tuple[Result, Result | None]] = []
        extra: list[str] = []

        def get_pair(
            label: str, name: str, server: Stor, ceiling: Nginx, asked: list[str] | None = None
        ) -> tuple[Result, Result | None]:
            """`asked`: the shas the clients ask for (`shas[name]` when None)."""
            blobs, stem = (shas[name], name) if asked is None else (asked, f"{name}-all")
            script = lua_get(scripts / f"{stem}.lua", blobs)
            upper = lua_get(scripts / f"{stem}-up.lua", blobs, upper=True)

            def ours() -> Result:
                warm(members.paths, blobs)
                return wrk(server.url, script, label, server.pids())

            def theirs() -> Result:
                warm(members.paths, blobs)
                return wrk(ceiling.url, upper, "nginx", ceiling.pids())

            return report(paired(ours, theirs))

        try:
            for name in ("4k", "64k", "8m") if full else ("4k", "8m"):
                if wanted("get"):
                    results.append(get_pair(f"GET {name}", name, stor, nginx))
            for name in ("4k", "64k", "8m") if wanted("hey") and full else ():
                sha = shas[name][0]
                for method in ("HEAD", "GET"):
                    ours = hey(f"{stor.url}/{sha}", method, f"{method} {name}, one blob (hey)", stor.pids())
                    theirs = hey(f"{nginx.url}/{sha.upper()}", method, "nginx")
                    results.append(report((ours, theirs)))
            if wanted("404") and full:
                missing = [hashlib.sha256(os.urandom(8)).hexdigest() for _ in range(20_000)]
                absent, absent_up = (
                    lua_get(scripts / "404.lua", missing),
                    lua_get(scripts / "404-up.lua", missing, upper=True),
                )
                results.append(
                    report(
                        paired(
                            lambda: wrk(stor.url, absent, "GET 404 (random absent shas)", stor.pids()),
                            lambda: wrk(nginx.url, absent_up, "nginx"),
                        )
                    )
                )
                gone = missing[0]
                results.append(
                    report(
                        paired(
                            lambda: hey(f"{stor.url}/{gone}", "HEAD", "HEAD 404, one absent sha (hey)", stor.pids()),
                            lambda: hey(f"{nginx.url}/{gone.upper()}", "HEAD", "nginx"),
                        )
                    )
                )
            if wanted("post"):
                label = "POST 4k (durable, both copies; group commit)"
                posts = iter(range(100))

                def post_round() -> Result:
                    n = next(posts)
                    warm_up = post_script(f"post-warm-{n}", 6000)
                    return wrk(stor.url, post_script(f"post-{n}", POST_BLOBS), label, stor.pids(), warm_up)

                def bare_round() -> Result:
                    subprocess.run(["sync"], check=True)
                    return Result(BARE_ROW, bare_protocol(members.paths, 32), "-", "-", 0.0, 0)

                results.append(report(paired(post_round, bare_round)))
            if wanted("hostile") and full:
                # more blobs than a POST run posts (up to 1,800/s here): past them its script re-posts them (200s)
                hostile = neighbours(
                    stor,
                    scripts / "4k.lua",
                    lambda name, counted: post_script(name, 20_000, statuses=counted),
                )
                extra.append(hostile.markdown())
            up, down = big_transfer_rss(stor) if wanted("rss") and full else (0.0, 0.0)
        finally:
            stor.stop()
        if wanted("logs"):
            results.append(logged_pair(base, base_config, members, scripts, shas["4k"]))
        if wanted("arrived") and full:
            results.append(arrived_pair(base, base_config, members, nginx, scripts, shas["4k"]))
        if wanted("uncached") and full:
            small_cache = {**base_config, "open_file_cache_size": UNCACHED_FILES}
            for label, config in (
                (UNCACHED_ROW, small_cache),
                (UNHELD_ROW, {**small_cache, "small_blob_cache_bytes": 0}),
            ):
                uncached = Stor(base, config)
                try:
                    results.append(get_pair(label, "4k", uncached, nginx, corpus["4k"]))
                finally:
                    uncached.stop()
        reader = base64.b64encode(b"reader:reader-pass").decode()
        read_auth = {**base_config, "read_auth": f"reader:{hash_password('reader-pass', 'bcrypt')}"}
        variants: list[tuple[str, dict[str, object], str | None, Path]] = [
            (
                READ_AUTH_ROW,
                read_auth,
                None,
                lua_get(scripts / "4k-auth.lua", shas["4k"], authorization=f"Basic {reader}"),
            ),
            ("GET 4k, verify_on_read off", {**base_config, "verify_on_read": False}, None, scripts / "4k.lua"),
            ("GET 4k, --server granian", base_config, "granian", scripts / "4k.lua"),
            ("GET 8m, --server granian (no sendfile)", base_config, "granian", scripts / "8m.lua"),
            (
                "GET 8m, checked while streaming (verify_on_read_max 0)",
                {**base_config, "verify_on_read_max": 0},
                None,
                scripts / "8m.lua",
            ),
            (
                "POST 4k (durable, both copies), group_commit off",
                {**base_config, "group_commit": False},
                None,
                post_script("post-off", POST_BLOBS // 2),
            ),
        ]
        broker = RabbitMQ(base / "rabbitmq") if wanted("variants") and full and has_rabbitmq() else None
        if broker is not None:
            variants.append((RABBITMQ_ROW, {**base_config, "rabbitmq_uri": broker.url}, None, scripts / "4k.lua"))
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
            nginx_of = {result.workload: theirs for result, theirs in results}
            for label, config, http_server, script in variants if wanted("variants") and full else []:
                posting = label.startswith("POST")
                server = Stor(base, config, server=http_server)
                try:
                    asked = shas["8m" if "8m" in label else "4k"]
                    warm(members.paths, asked)
                    warm_posts = post_script("post-off-warm", 6000) if posting else None
                    ours = wrk(server.url, script, label, server.pids(), warm_posts)
                finally:
                    server.stop()
                results.append((ours, None if posting else nginx_of.get(label.split(",")[0])))
                print(f"  {label}: {ours.rps:,.0f}/s", flush=True)
        finally:
            if mc:
                mc.kill()
            if broker is not None:
                broker.close()
            nginx.stop()
        refilled: list[Refill] = []
        if wanted("refill") and full:
            config_path = base / "refill.json"
            config_path.write_text(json.dumps(base_config))
            partner = members.paths[1:]
            refilled.append(
                refill("the bench's corpus (mixed)", members.paths, config_path, lambda: warm_files(partner), base)
            )
            print(f"  {refilled[-1].summary()}", flush=True)
            small = small_pair(base / "refill-small")
            small_config = base / "refill-small.json"
            small_config.write_text(json.dumps({**base_config, "storage_pairs": [[str(p) for p in small]]}))
            refilled.append(
                refill("30,000 x 4 KiB", small, small_config, lambda: warm_files(small[1:]), base / "refill-small")
            )
            print(f"  {refilled[-1].summary()}", flush=True)
        if wanted("evacuate") and full:
            evacuated = evacuation(base / "evacuate", EVACUATION_SIZES)
            print(f"  {evacuated.summary()}", flush=True)
            extra.append(evacuated.markdown())
        limits: dict[str, float | None] = {}
        if wanted("limits"):
            limits = {
                "the bare protocol: pair writes/s, plain Python, 32 threads": bare_protocol(members.paths, 32),
                "the bare protocol: pair writes/s, plain Python, 1 thread": bare_protocol(members.paths, 1),
                "stor's pair writes/s (`PairWrite`), one copy at a time with fsyncs, 32 threads": pair_writes(
                    members.paths, 32, grouped=False
                ),
                "stor's pair writes/s, group-committed (`GroupCommits`), 64 at once": pair_writes(
                    members.paths, 64, grouped=True
                ),
            }
            if full:
                limits["peak RSS growth, 1 GiB upload (MiB)"] = up
                limits["peak RSS growth, 1 GiB download (MiB)"] = down
        return Section(members.kind, results, limits, refilled, extra)
    finally:
        members.close()


def report(pair: tuple[Result, Result | None]) -> tuple[Result, Result | None]:
    ours, theirs = pair
    versus = f" vs {theirs.workload} {theirs.rps:,.0f}/s ({theirs.spread})" if theirs else ""
    print(f"  {ours.workload}: stor {ours.rps:,.0f}/s ({ours.spread}){versus}", flush=True)
    return pair


def logged_pair(
    base: Path, config: dict[str, object], members: Members, scripts: Path, shas: list[str]
) -> tuple[Result, Result | None]:
    """GET 4k with access logs on for both, as production runs: stor's default access lines
    (to a file), nginx's combined log through a 64 KiB buffer."""
    stor = Stor(base, config, access_log=True)
    nginx = Nginx(base, members.paths[0], access_log=True)
    try:

        def ours() -> Result:
            warm(members.paths, shas)
            return wrk(stor.url, scripts / "4k.lua", LOGGED_ROW, stor.pids())

        def theirs() -> Result:
            warm(members.paths, shas)
            return wrk(nginx.url, scripts / "4k-up.lua", "nginx, access log buffer=64k", nginx.pids())

        return report(paired(ours, theirs))
    finally:
        stor.stop()
        nginx.stop()


def arrived_pair(
    base: Path, config: dict[str, object], members: Members, nginx: Nginx, scripts: Path, shas: list[str]
) -> tuple[Result, Result | None]:
    """GET 4k on copies without their fast checksum, as Stor's disks arrive: each round strips
    them, starts a fresh stor and measures without a warm-up (stor verifies each copy with
    SHA-256 on its first read and records the checksum, so a warm-up would measure what it left)."""

    def ours() -> Result:
        strip_sums(members.paths, shas)
        warm(members.paths, shas)
        stor = Stor(base, config)
        try:
            return wrk(stor.url, scripts / "4k.lua", ARRIVED_ROW, stor.pids(), warm_up=False)
        finally:
            stor.stop()

    def theirs() -> Result:
        warm(members.paths, shas)
        return wrk(nginx.url, scripts / "4k-up.lua", "nginx", nginx.pids(), warm_up=False)

    return report(paired(ours, theirs))


def has_rabbitmq() -> bool:
    return any(os.access(os.path.join(d, "rabbitmq-server"), os.X_OK) for d in ("/usr/sbin", "/usr/bin"))


if __name__ == "__main__":
    main()
