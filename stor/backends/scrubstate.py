"""Where `stor scrub` keeps its state: `<first member of a pair>/.stor-scrub/`.

`checkpoint.json` (the last leaf done by an interrupted run), `last.json` (the summary of
the last complete run) and `running.json` (the progress of a run under way, rewritten every
second or so), which `/status` and `/metrics` show. Blocking; call off the loop.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from stor.backends.pairs import Pair

SCRUB_DIR = ".stor-scrub"


def state_dir(pair: Pair) -> Path:
    return Path(pair.members[0].root) / SCRUB_DIR


def read_json(path: Path) -> dict[str, object]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def write_json(path: Path, value: dict[str, object]) -> None:
    path.parent.mkdir(exist_ok=True)
    temp = path.with_suffix(".tmp")
    temp.write_text(json.dumps(value))
    os.replace(temp, path)


RUNNING = "running.json"
RUNNING_STALE_SECONDS = 30.0
"""A progress not rewritten for this long is a scrub that died (killed, crashed): not shown."""


def running_scrubs(pairs: list[Pair]) -> list[dict[str, object]]:
    """The progress of the scrubs under way on `pairs` (see `tools.scrubprogress`)."""
    now = time.time()
    found = []
    for pair in pairs:
        progress = read_json(state_dir(pair) / RUNNING)
        updated = progress.get("updated")
        if isinstance(updated, float | int) and now - updated < RUNNING_STALE_SECONDS:
            found.append(progress)
    return found


def last_runs(pairs: list[Pair]) -> list[dict[str, object]]:
    """The last complete scrub of each pair that has one."""
    return [run for pair in pairs if (run := read_json(state_dir(pair) / "last.json"))]
