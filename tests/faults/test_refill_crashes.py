"""Power cuts between the steps of a batched refill (`backends.refill`): `stor scrub --repair`
refilling a blank ext4 member is killed at its first `syncfs` (temps written, nothing durable)
or its second (names linked, not yet durable); the journal is then committed by an unrelated
`fsync` (what the kernel's periodic commit would do at any moment), and the images are copied
at once and mounted as after a power cut. Every name on the refilled member must hold its
blob's bytes (a name linked before its data was durable would come back empty), and the next
`stor scrub --repair` must finish the refill."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Storage
from tests.faults.conftest import Mounts, run
from tests.faults.powercut import blob_files, power_cut
from tests.helpers import layout_path, sha256

Build = Callable[[list[list[Path]]], Storage]


def scrub(config: Path, *args: str, wrapper: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "stor", "scrub", "--config", str(config), "--pair", "0", "--json", *args]
    return subprocess.run([*(wrapper or []), *command], capture_output=True, text=True, timeout=120)


@pytest.mark.usefixtures("need_strace")
@pytest.mark.parametrize(("step", "names_expected"), [(1, False), (2, True)])
def test_a_power_cut_between_refill_steps_leaves_valid_copies_or_none(
    step: int, names_expected: bool, mounts: Mounts, build: Build, tmp_path: Path
) -> None:
    members = [mounts.ext4("r1"), mounts.ext4("r2")]
    storage = build([members])
    blobs = [os.urandom(4096 if n % 10 else 300_000) for n in range(120)]
    blank, partner = members
    for data in blobs:  # the partner's copies, as stor writes them (the scrub verifies them)
        path = layout_path(partner, sha256(data))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    run("sync")
    config = storage.write_config(check_mountpoints=False)
    before = scrub(config)
    assert before.returncode == 1 and json.loads(before.stdout)["missing"] == len(blobs), before.stderr

    killed = scrub(
        config,
        "--repair",
        wrapper=["strace", "-f", "-qq", "-o", "/dev/null", "-e", f"inject=syncfs:signal=SIGKILL:when={step}"],
    )
    assert killed.returncode != 0 and not killed.stdout  # killed before it could report
    linked = blob_files(blank)
    assert bool(linked) == names_expected  # the kill came where it was meant to (live view)

    after = power_cut(mounts, members, f"step{step}")
    survivors = blob_files(after[0])
    for path in survivors:  # whatever name survived holds its blob, whole
        assert hashlib.sha256(path.read_bytes()).hexdigest().upper() == path.stem, f"{path} is not its blob"
    if not names_expected:
        assert survivors == []

    # the refill carries on from the power cut: a fresh config on the copies
    resumed = tmp_path / "after.json"
    resumed.write_text(json.dumps({**json.loads(config.read_text()), "storage_pairs": [[str(m) for m in after]]}))
    done = scrub(resumed, "--repair")
    assert done.returncode == 0, done.stderr
    assert json.loads(scrub(resumed).stdout)["damage_left"] == 0
    for data in blobs:
        assert layout_path(after[0], sha256(data)).read_bytes() == data
    leftovers = [p for p in after[0].rglob("*") if p.is_file() and ".stor-tmp" in str(p)]
    assert not [p for p in leftovers if p.name != "owner.lock"]  # temps swept
    shutil.rmtree(after[0] / ".stor-scrub", ignore_errors=True)
