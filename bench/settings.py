"""What every part of `make bench` shares: where the report goes, which groups run, how long."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = {"4k": (4096, 20_000), "64k": (65536, 2_000), "8m": (8 * 1024 * 1024, 20)}
FD_LIMIT = 131_072
IMAGE_BYTES = 6 << 30
POST_BLOBS = 40_000
ONLY = set(filter(None, os.environ.get("BENCH_ONLY", "").split(",")))
"""Groups to run (get, hey, 404, post, hostile, rss, logs, arrived, uncached, variants, refill, evacuate,
limits, images): all when empty. With a choice,
docs/benchmarks.md is left alone and the report only printed."""
DURATION = int(os.environ.get("BENCH_SECONDS", "8"))
WRK_THREADS = int(os.environ.get("BENCH_WRK_THREADS", "1"))
"""One client thread: on 2 cores a second one takes CPU the servers need (and each server gets
the same client)."""
AUTH = ("bench", "bench-pass")
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
"""How many times each headline workload runs (its median and spread are reported)."""


def wanted(group: str) -> bool:
    return not ONLY or group in ONLY
