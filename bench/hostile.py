"""The "hostile neighbours" workload (issue 25): hundreds of slow uploaders, each declaring a
large body and sending a few bytes a second, reconnecting whenever it is cut, while the usual
GET 4 KiB and POST 4 KiB loads run. Run as `python -m bench.hostile HOST PORT COUNT` (a process
of its own, so its event loop does not share the bench's); it prints what it saw when stopped
with SIGTERM.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import hashlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bench.servers import Stor
from bench.settings import AUTH, DURATION
from bench.workloads import Result, wrk

DECLARED = 1 << 30
"""What each slow uploader promises to send: a GiB."""
TRICKLE = b"abc"
"""What it sends each second: 3 bytes/s, far under the default floor of 500."""


async def slow_uploader(host: str, port: int, seen: collections.Counter[str], stop: asyncio.Event) -> None:
    """One client, forever: a POST that declares a GiB and trickles; when the server answers or
    closes, count how and start again."""
    token = base64.b64encode(f"{AUTH[0]}:{AUTH[1]}".encode()).decode()
    while not stop.is_set():
        sha = hashlib.sha256(os.urandom(16)).hexdigest()
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            seen["connect failed"] += 1
            await asyncio.sleep(0.5)
            continue
        seen["connections"] += 1
        head = (
            f"POST /{sha} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Basic {token}\r\n"
            f"Content-Length: {DECLARED}\r\n\r\n"
        )
        writer.write(head.encode())
        answer = asyncio.ensure_future(reader.readline())
        try:
            while not stop.is_set() and not answer.done():
                writer.write(TRICKLE)
                await writer.drain()
                await asyncio.wait([answer], timeout=1.0)
            if answer.done():
                status = answer.result().split(b" ")[1:2]
                seen[status[0].decode() if status else "closed"] += 1
        except (OSError, IndexError):
            seen["reset"] += 1
        finally:
            answer.cancel()
            writer.close()
        await asyncio.sleep(0.1)


async def run(host: str, port: int, count: int) -> collections.Counter[str]:
    seen: collections.Counter[str] = collections.Counter()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    clients = [asyncio.create_task(slow_uploader(host, port, seen, stop)) for _ in range(count)]
    await stop.wait()
    await asyncio.wait(clients, timeout=3)
    return seen


def main() -> None:
    host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    # Slow uploaders run on other machines: here they share 2 cores with stor and wrk, and at
    # the default priority their 500 wake-ups a second preempt stor's workers (measured: the
    # GET runs with them lost a tenth more than stor spends on them). At SCHED_IDLE they run on
    # what the others leave idle, and still trickle, get cut and reconnect (counted below).
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    seen = asyncio.run(run(host, port, count))
    print(json.dumps(dict(seen)), flush=True)


@contextmanager
def slow_uploaders(url: str, count: int, settle: float = 3.0) -> Iterator[dict[str, int]]:
    """`count` slow uploaders against `url` for the block (after `settle` seconds, so they are
    all connected and judged); yields a dict filled, after the block, with what they saw."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.hostile", host, port, str(count)], stdout=subprocess.PIPE, text=True
    )
    seen: dict[str, int] = {}
    try:
        time.sleep(settle)
        yield seen
    finally:
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=30)
        seen.update(json.loads(out.strip().splitlines()[-1]) if out.strip() else {})


@dataclass
class Neighbours:
    """The hostile-neighbours row: each round's rates without and with the slow uploaders."""

    count: int
    get_quiet: list[float] = field(default_factory=list)
    get_hostile: list[float] = field(default_factory=list)
    post_quiet: list[float] = field(default_factory=list)
    post_hostile: list[float] = field(default_factory=list)
    post_statuses: collections.Counter[int] = field(default_factory=collections.Counter)
    rss_quiet: list[float] = field(default_factory=list)
    rss_hostile: list[float] = field(default_factory=list)
    seen: collections.Counter[str] = field(default_factory=collections.Counter)
    cpu: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))
    """The server's CPU µs per request, by load and whether the slow uploaders ran ("GET 4k
    quiet", ...): what they cost stor, free of the machine's drift in rates."""

    def add(self, quiet: tuple[Result, Result], hostile: tuple[Result, Result], seen: dict[str, int]) -> None:
        """One round: (GET, POST) without and with the slow uploaders, and what those saw."""
        self.get_quiet.append(quiet[0].rps)
        self.post_quiet.append(quiet[1].rps)
        self.rss_quiet.append(quiet[1].rss_mib)
        self.get_hostile.append(hostile[0].rps)
        self.post_hostile.append(hostile[1].rps)
        self.rss_hostile.append(hostile[1].rss_mib)
        self.post_statuses.update(hostile[1].statuses or {})
        self.seen.update(seen)
        for when, results in (("quiet", quiet), ("hostile", hostile)):
            for load, result in zip(("GET 4k", "POST 4k"), results, strict=True):
                self.cpu[f"{load} {when}"].append(1e6 * result.cpu_seconds / max(result.rps * DURATION, 1.0))

    def markdown(self) -> str:
        def ratios(quiet: list[float], hostile: list[float]) -> str:
            each = [h / q for q, h in zip(quiet, hostile, strict=True)]
            return f"**{statistics.median(each):.2f}x** (rounds: {', '.join(f'{r:.2f}' for r in each)})"

        def rates(values: list[float]) -> str:
            return f"{statistics.median(values):,.0f}/s (spread {min(values):,.0f}-{max(values):,.0f})"

        def cpu(load: str) -> str:
            quiet, hostile = self.cpu[f"{load} quiet"], self.cpu[f"{load} hostile"]
            return f"{statistics.median(quiet):,.0f} -> {statistics.median(hostile):,.0f} µs"

        def line(load: str, quiet: list[float], hostile: list[float]) -> str:
            return f"| {load} | {rates(quiet)} | {rates(hostile)} | {ratios(quiet, hostile)} | {cpu(load)} |"

        statuses = ", ".join(f"{n:,} x {code}" for code, n in sorted(self.post_statuses.items()))
        seen = ", ".join(f"{n:,} {what}" for what, n in sorted(self.seen.items()))
        return f"""### Hostile neighbours: {self.count} slow uploaders

{self.count} clients each POST a body declared as 1 GiB and send {len(TRICKLE)} bytes a second, reconnecting when
cut (`bench/hostile.py`, one process at `SCHED_IDLE`: such clients run on other machines, and at the default
priority their wake-ups preempt stor's workers on these 2 cores), while wrk runs the usual loads;
{len(self.get_quiet)} rounds, each measuring both loads without and with them, a load's two runs back to back
(quiet, then the slow uploaders with both loads, then the other load quiet; which load goes first alternates).
stor's defaults: `max_uploads_in_flight` 128 and `min_upload_rate` 500 bytes/s per worker (uploads below the floor
after half a second are *stalled* and do not hold a place; a new upload waits up to a second for a place among
uploads too young to judge; one declaring at most 64 KiB, as these POSTs, needs no place). The slow uploaders all
start together, so the floor cuts them all at once ~20 s later, inside the second load's run, and they all
reconnect.

| load | without | with the slow uploaders | with / without, median | stor's CPU per request, without -> with |
|---|---|---|---|---|
{line("GET 4k", self.get_quiet, self.get_hostile)}
{line("POST 4k", self.post_quiet, self.post_hostile)}

The rates of this machine drift by more than ±20% from one run to the next; the CPU stor spends per request (all
its processes, over the run) drifts far less, and says what the slow uploaders cost it.

POST answers with the slow uploaders: {statuses or "none counted"} (a 507 there would be a false "disks full").
RSS of stor's processes after the run: {statistics.median(self.rss_quiet):.0f} MiB without,
{statistics.median(self.rss_hostile):.0f} MiB with them. What the slow uploaders saw: {seen or "nothing"}.
"""


def neighbours(
    stor: Stor, get_script: Path, post_script: Callable[[str, bool], Path], count: int = 500, rounds: int = 9
) -> Neighbours:
    """GET 4k and POST 4k without and with `count` slow uploaders, `rounds` times. Each load's
    two runs are back to back (the first load's quiet run, the slow uploaders' block with both
    loads, the second load's quiet run), so a drift of the machine between them is small; which
    load goes first alternates from round to round, and with it whether a load's quiet run
    comes before or after its hostile one, and which load the floor's mass cut (~20 s after the
    slow uploaders start) falls in."""
    row = Neighbours(count)
    for n in range(rounds):
        first, second = ("GET", "POST") if n % 2 == 0 else ("POST", "GET")
        quiet = {first: _load(stor, first, get_script, post_script, f"q{n}")}
        with slow_uploaders(stor.url, count) as seen:
            hostile = {load: _load(stor, load, get_script, post_script, f"h{n}") for load in (first, second)}
        quiet[second] = _load(stor, second, get_script, post_script, f"q{n}")
        row.add((quiet["GET"], quiet["POST"]), (hostile["GET"], hostile["POST"]), seen)
        print(
            f"  hostile round {n + 1} ({first} first): GET {quiet['GET'].rps:,.0f} -> {hostile['GET'].rps:,.0f}/s, "
            f"POST {quiet['POST'].rps:,.0f} -> {hostile['POST'].rps:,.0f}/s {hostile['POST'].statuses}, slow: {seen}",
            flush=True,
        )
    return row


def _load(stor: Stor, load: str, get_script: Path, post_script: Callable[[str, bool], Path], tag: str) -> Result:
    """One GET 4k run, or one POST 4k run (new blobs, counted by status, after a warm-up of
    others)."""
    if load == "GET":
        return wrk(stor.url, get_script, "GET 4k", stor.pids())
    warm_posts = post_script(f"h{tag}w", False)
    return wrk(stor.url, post_script(f"h{tag}", True), "POST 4k", stor.pids(), warm_posts)


if __name__ == "__main__":
    main()
