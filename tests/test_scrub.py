"""`stor scrub` and `stor import`, as operators run them, on real directories."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from stor.backends import refill
from stor.backends.disk import Disk
from stor.backends.pairs import Pair
from stor.config import config_from_mapping
from stor.service.portal import Portal
from stor.tools.scrub import Scrubber
from stor.tools.scrubreport import ScrubReport
from stor.wiring.build import build_service
from tests.conftest import Storage, StorProcess
from tests.helpers import AUTH, corrupt, layout_path, name_record, sha256, shorten
from tests.services import MotoS3


def stor(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stor", *args], capture_output=True, text=True, timeout=timeout)


def scrub(config: Path, *args: str) -> tuple[int, dict[str, Any]]:
    result = stor("scrub", "--config", str(config), "--json", *args)
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, json.loads(result.stdout)


def import_blobs(storage: Storage, config: Path, count: int, size: int = 2000) -> list[bytes]:
    source = storage.base / "incoming"
    (source / "nested").mkdir(parents=True, exist_ok=True)
    blobs = [os.urandom(size + n) for n in range(count)]
    for n, blob in enumerate(blobs):
        (source / ("nested" if n % 2 else "") / f"f{n}").write_bytes(blob)
    result = stor("import", str(source), "--config", str(config), "--move")
    assert result.returncode == 0, result.stderr
    assert f"imported {count}, already stored 0, failed 0" in result.stderr
    assert not [p for p in source.rglob("*") if p.is_file()]  # --move
    return blobs


def flip(path: Path) -> None:
    corrupt(path, path.stat().st_size // 2)


def test_import_stores_both_copies_and_skips_known_files(storage: Storage) -> None:
    config = storage.write_config()
    blobs = import_blobs(storage, config, 6)
    for blob in blobs:
        copies = storage.copies(sha256(blob))
        assert len(copies) == 2 and {c.read_bytes() for c in copies} == {blob}
    again = storage.base / "again"
    again.mkdir()
    (again / "x").write_bytes(blobs[0])
    result = stor("import", str(again), "--config", str(config))
    assert result.returncode == 0 and "imported 0, already stored 1" in result.stderr
    assert (again / "x").exists()  # without --move the source stays


def test_the_summary_is_json_on_stdout_and_a_line_on_stderr(storage: Storage) -> None:
    config = storage.write_config()
    import_blobs(storage, config, 2)
    result = stor("scrub", "--config", str(config))
    assert result.returncode == 0
    assert json.loads(result.stdout)["blobs"] == 2
    assert result.stderr.startswith("stor: scrubbed 2 blobs, 4 copies")


def test_a_clean_scrub(storage: Storage) -> None:
    config = storage.write_config()
    blobs = import_blobs(storage, config, 8)
    code, report = scrub(config)
    assert code == 0
    assert report["blobs"] == 8 and report["copies"] == 16 and report["damage_left"] == 0
    assert report["bytes"] == 2 * sum(len(b) for b in blobs)


def test_scrub_finds_and_repairs_damage(storage: Storage) -> None:
    config = storage.write_config()
    flipped, cut, gone, fine = (sha256(b) for b in import_blobs(storage, config, 4))
    flip(storage.copies(flipped)[0])
    shorten(storage.copies(cut)[1], 10)
    storage.copies(gone)[0].unlink()
    leaf = storage.copies(fine)[0].parent
    (leaf / "stray.txt").write_text("not a blob")  # does not belong in the layout
    dead = storage.roots[0] / ".stor-tmp" / "deadbeef"
    dead.mkdir(parents=True)
    (dead / "owner.lock").touch()
    (dead / "0.tmp").write_bytes(b"half an upload")

    code, report = scrub(config)
    assert code == 1
    assert (report["corrupt"], report["truncated"], report["missing"]) == (1, 1, 1)
    assert report["foreign"] == 1 and report["stray_temps"] == 1 and report["repaired"] == 0
    assert (dead / "0.tmp").exists()  # reported, not touched without --repair

    code, report = scrub(config, "--repair")
    assert code == 0, report
    assert report["repaired"] == 3 and report["damage_left"] == 0
    for sha in (flipped, cut, gone):
        copies = storage.copies(sha)
        assert len(copies) == 2 and copies[0].read_bytes() == copies[1].read_bytes()
        assert sha256(copies[0].read_bytes()) == sha
        assert copies[0].stat().st_mtime_ns == copies[1].stat().st_mtime_ns
    quarantine = [p for r in storage.roots for p in (r / ".stor-quarantine").glob("*.dat")]
    assert len(quarantine) == 2  # the flipped and the truncated copy, kept for a post-mortem
    assert not dead.exists() and (leaf / "stray.txt").exists()  # foreign files are never deleted
    code, report = scrub(config)
    assert code == 0 and report["corrupt"] == report["missing"] == 0


def test_a_blob_with_no_good_copy_is_damage_left(storage: Storage) -> None:
    config = storage.write_config()
    [blob] = import_blobs(storage, config, 1)
    for copy in storage.copies(sha256(blob)):
        flip(copy)
    code, report = scrub(config, "--repair")
    assert code == 1 and report["lost"] == 1 and report["damage_left"] == 2


def test_scrub_repairs_from_s3(storage: Storage, s3: MotoS3) -> None:
    config = storage.write_config(**s3.config())
    [blob] = import_blobs(storage, config, 1)
    sha = sha256(blob)
    s3.put_raw(sha, blob)
    for copy in storage.copies(sha):
        flip(copy)
    code, report = scrub(config, "--repair")
    assert code == 0 and report["repaired"] == 2
    assert [c.read_bytes() for c in storage.copies(sha)] == [blob, blob]


def test_an_unwritable_quarantine_leaves_damage(storage: Storage) -> None:
    config = storage.write_config()
    [blob] = import_blobs(storage, config, 1)
    bad = storage.copies(sha256(blob))[0]
    flip(bad)
    (bad.parents[3] / ".stor-quarantine").write_text("in the way")
    code, report = scrub(config, "--repair")
    assert code == 1 and report["damage_left"] >= 1
    assert any("failed" in f["action"] for f in report["findings"])


def test_interrupted_scrub_resumes(storage: Storage) -> None:
    config = storage.write_config()
    import_blobs(storage, config, 60, size=20_000)
    # 2.4 MB at 0.1 MB/s: a checkpoint within a second, the end far off even on a loaded machine
    # (at 0.5 MB/s, a test process starved under load saw a checkpoint only as the scrub ended)
    # Ctrl-C as at a terminal, even when the suite itself was started with SIGINT ignored (a
    # shell's background job): a child inherits "ignored", Python leaves it so, and the scrub
    # ran to its end. A handler here (not "ignored") is the default again in the child.
    ignored = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "stor", "scrub", "--config", str(config), "--json", "--rate", "0.1"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    finally:
        signal.signal(signal.SIGINT, ignored)
    checkpoints = [pair[0] / ".stor-scrub" / "checkpoint.json" for pair in storage.pairs]
    deadline = time.monotonic() + 30
    while not any(c.exists() for c in checkpoints):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "run the same command again" in err
    first = json.loads(out)
    assert first["interrupted"] is True and first["blobs"] < 60
    code, second = scrub(config)
    assert code == 0 and second["resumed_after"]
    assert first["blobs"] + second["blobs"] >= 60  # nothing skipped (a leaf may be done twice)
    assert not any(c.exists() for c in checkpoints)


def test_a_file_that_disappears_between_listing_and_hash(storage: Storage) -> None:
    disks = tuple(Disk(str(r), require_mount=False) for r in storage.pairs[0])
    for disk in disks:
        disk.prepare()
    pair = Pair(0, disks, True)
    report = ScrubReport()
    Scrubber([pair])._scrub_blob(pair, sha256(b"gone"), report)  # type: ignore[arg-type]
    assert report.vanished == 1 and report.damage_left == 0


def test_usage_and_config_errors_exit_2(storage: Storage) -> None:
    config = storage.write_config()
    assert stor("scrub", "--config", str(config), "--pair", "7").returncode == 2
    assert stor("scrub", "--config", str(storage.write_config(max_upload_size="x"))).returncode == 2


def test_the_last_scrub_shows_in_status_and_metrics(storage: Storage, start_stor: Any) -> None:
    config = storage.write_config()
    import_blobs(storage, config, 3)
    assert scrub(config)[0] == 0
    server: StorProcess = start_stor("--config", str(config))
    deadline = time.monotonic() + 10
    while not (runs := httpx.get(f"{server.url}/status?format=json").json()["scrub"]):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert {run["pair"] for run in runs} == {0, 1} and all(run["damage_left"] == 0 for run in runs)
    assert 'stor_scrub_damage_left{pair="0"} 0.0' in httpx.get(f"{server.url}/metrics").text


def test_scrub_repairs_go_through_the_upload_pipeline(storage: Storage, s3: MotoS3) -> None:
    """A copy rewritten in place of a corrupt one goes through the upload pipeline: queued for S3
    like any upload (the marker beside the first copy). (A merely missing copy is refilled in
    batches from its verified partner: see `test_a_blank_member_is_refilled_in_batches`.)"""
    config = storage.write_config(**s3.config())
    [blob] = import_blobs(storage, config, 1)
    sha = sha256(blob)
    first, second = storage.copies(sha)
    queue = first.parents[3] / ".stor-s3-queue"
    markers = list(queue.glob(sha))  # import queued it as an upload does
    assert markers
    for marker in markers:
        marker.unlink()
    corrupt(second, 10)
    code, report = scrub(config, "--repair")
    assert code == 0 and report["repaired"] == 1
    assert second.read_bytes() == blob and first.read_bytes() == blob
    assert second.stat().st_mtime_ns == first.stat().st_mtime_ns  # the surviving copy's mtime
    assert list((second.parents[3] / ".stor-s3-queue").glob(sha))


def test_scrub_refills_a_blank_member_with_blobs_and_name_records(storage: Storage, start_stor: Any) -> None:
    config = storage.write_config()
    blobs = import_blobs(storage, config, 8)
    server: StorProcess = start_stor("--config", str(config))
    for n in range(3):
        put = httpx.put(f"{server.url}/file", params={"path": f"n/{n}"}, content=b"%d" % n, auth=AUTH)
        assert put.status_code == 201
    server.stop()
    member, partner = storage.pairs[0]
    shutil.rmtree(member)
    member.mkdir()  # a new disk where the old one was
    code, report = scrub(config)
    assert code == 1 and report["missing"] > 0 and report["names_stale"] == 3
    code, report = scrub(config, "--repair")
    assert code == 0 and report["names_restored"] == 3 and report["damage_left"] == 0
    assert sorted(p.relative_to(member) for p in member.rglob("*.dat")) == sorted(
        p.relative_to(partner) for p in partner.rglob("*.dat")
    )
    assert all(name_record(member, f"n/{n}").exists() for n in range(3))
    for blob in blobs:
        assert len(storage.copies(sha256(blob))) == 2
    assert scrub(config)[0] == 0


def test_a_blank_member_is_refilled_in_batches(storage: Storage, monkeypatch: pytest.MonkeyPatch) -> None:
    """Missing copies are written from the verified partner in batches (a `syncfs` per batch,
    not a commit per blob), small ones from the bytes the hash pass read, large ones copied and
    checked against the partner's fast checksum; each is whole, with the partner's mtime and a
    fast checksum attribute."""
    monkeypatch.setattr(refill, "BATCH_FILES", 3)  # several batches, and some left for the end
    storage.pairs = storage.pairs[:1]
    config = storage.write_config()
    blobs = import_blobs(storage, config, 7) + import_blobs(storage, config, 1, size=3 * 1024 * 1024)
    member, partner = storage.pairs[0]
    shutil.rmtree(member)
    member.mkdir()
    service = build_service(config_from_mapping(json.loads(config.read_text()), {}))
    service.prepare(sweep=False)
    try:
        with Portal() as portal:

            def rewrite(sha: Any, pair: Any, targets: Any, chunks: Any, size: int, mtime: int) -> Any:
                return portal.submit(service.repair(sha, pair, targets, service.body_from(chunks), size, mtime))

            report = Scrubber(service.pairs, repair=rewrite).run()
    finally:
        service.close()
    assert report.repaired == len(blobs) and report.damage_left == 0, report.findings
    for blob in blobs:
        copy, source = layout_path(member, sha256(blob)), layout_path(partner, sha256(blob))
        assert copy.read_bytes() == blob
        assert copy.stat().st_mtime_ns == source.stat().st_mtime_ns
        assert os.getxattr(copy, "user.stor.xxh3") == os.getxattr(source, "user.stor.xxh3")
    assert storage.temps() == []
    assert scrub(config)[0] == 0


def test_a_refill_reports_its_progress_and_time_left(storage: Storage, start_stor: Any) -> None:
    """While `stor scrub --repair` refills a blank member, `/status`, `/metrics` and stderr say
    how far it is and when the pair will hold both copies again; nothing once it is done."""
    config = storage.write_config()
    import_blobs(storage, config, 60, size=20_000)
    member, _ = storage.pairs[0]
    shutil.rmtree(member)
    member.mkdir()  # a new disk
    server: StorProcess = start_stor("--config", str(config))
    # 1.2 MB to hash at 0.1 MB/s: about 12 s, progress written every second
    args = ["scrub", "--config", str(config), "--pair", "0", "--repair", "--rate", "0.1", "--progress-every", "1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "stor", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 30
        while not (running := httpx.get(f"{server.url}/status?format=json").json()["scrub_running"]):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.2)
        [progress] = running
        assert progress["pair"] == 0 and progress["repairing"] is True and progress["pid"] == proc.pid
        assert 0 < progress["fraction"] < 1 and progress["copies"] > 0
        assert progress["eta_seconds"] > 0 and progress["full_redundancy_eta_seconds"] == progress["eta_seconds"]
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'stor_pair_full_redundancy_eta_seconds{pair="0"}' in metrics
        assert 'stor_scrub_progress_ratio{pair="0"}' in metrics
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    lines = [line for line in err.splitlines() if line.startswith("stor: scrub of pair 0:")]
    assert lines and "of the sha space" in lines[0] and "left" in lines[0]
    assert json.loads(out)["damage_left"] == 0
    assert not (member / ".stor-scrub" / "running.json").exists()
    deadline = time.monotonic() + 15
    while httpx.get(f"{server.url}/status?format=json").json()["scrub_running"]:
        assert time.monotonic() < deadline  # gone once the scrub is over
        time.sleep(0.2)
    assert "stor_pair_full_redundancy_eta_seconds{" not in httpx.get(f"{server.url}/metrics").text
