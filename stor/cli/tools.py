"""The operator commands that work on the disks directly: `stor scrub`, `stor import`,
`stor evacuate`."""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import click
from tqdm import tqdm

from stor.backends.disk import Disk
from stor.backends.pairs import Pair
from stor.cli.common import fail, validated
from stor.client import ClientError, hash_file
from stor.config import ENV_CONFIG_FILE
from stor.digest import Sha
from stor.errors import StorError
from stor.http import auth
from stor.model import PutResult
from stor.service import BlobService
from stor.service.namedfiles import NamedFiles
from stor.service.offload import one_piece
from stor.service.portal import Portal
from stor.service.relocation import Landed
from stor.tools.evacuate import Evacuation, Movers
from stor.tools.scrub import Repair, Scrubber
from stor.tools.scrubprogress import describe
from stor.tools.scrubreport import ScrubReport
from stor.wiring.build import build_service


@click.command()
@click.option("--config", "config_path", envvar=ENV_CONFIG_FILE, required=True, type=click.Path(dir_okay=False))
@click.option("--repair", is_flag=True, help="Quarantine bad copies and rewrite missing or bad ones.")
@click.option("--json", "as_json", is_flag=True, hidden=True, help="Accepted: the summary is always JSON.")
@click.option("--rate", type=click.FloatRange(min=0.1), help="Hash at most this many MB/s.")
@click.option("--pair", "pair_index", type=int, help="Scrub only this pair (its index in storage_pairs).")
@click.option("--restart", is_flag=True, help="Ignore the checkpoint of an interrupted scrub.")
@click.option(
    "--progress-every",
    type=click.FloatRange(min=0.5),
    default=10.0,
    show_default=True,
    help="Seconds between progress lines on stderr when it is not a terminal (a terminal gets a bar).",
)
def scrub(
    config_path: str,
    repair: bool,
    as_json: bool,
    rate: float | None,
    pair_index: int | None,
    restart: bool,
    progress_every: float,
) -> None:
    """Re-hash every copy, compare pair members, and (with --repair) fix what is damaged.

    Exit 0: clean or all repaired; 1: damage left; 2: usage or config error; 130: interrupted
    (run it again to resume)."""
    config = validated(config_path)
    service = build_service(config)
    pairs = service.pairs
    if pair_index is not None:
        if not 0 <= pair_index < len(pairs):
            raise click.BadParameter(f"there are {len(pairs)} pairs (0..{len(pairs) - 1})", param_hint="--pair")
        pairs = [pairs[pair_index]]
    try:
        service.prepare(sweep=False)  # stray temps are the scrub's to report (and, with --repair, remove)
    except StorError as exc:
        fail(str(exc))
        sys.exit(2)
    show = sys.stderr.isatty()
    with (
        Portal() as portal,
        tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc="scrub", disable=not show) as bar,
    ):
        files = 0

        def progress(count: int, size: int) -> None:
            nonlocal files
            files += count
            if show:  # (formatting it costs, even for a bar that is not shown)
                bar.update(size)
                bar.set_postfix(files=files, refresh=False)

        said = [time.monotonic()]

        def standing(progress: dict[str, object]) -> None:
            """Without a terminal (a unit's journal, a pipe): a line every `progress_every` s."""
            if not show and time.monotonic() - said[0] >= progress_every:
                said[0] = time.monotonic()
                click.echo(describe(progress), err=True)

        report = Scrubber(
            pairs,
            s3_source=service.s3_source,
            names=NamedFiles(service).store if service.record_places.home_pair() in pairs else None,
            tombstones=service.tombstones,
            repair=_repairer(service, portal) if repair else None,
            rate=rate * 1e6 if rate else None,
            progress=progress,
            restart=restart,
            standing=standing,
        ).run()
    service.close()
    click.echo(json.dumps(report.as_dict(), indent=2))  # machine-readable: stdout
    _print_scrub(report)  # for people: stderr
    if report.interrupted:
        fail("interrupted; run the same command again to continue where it stopped")
        sys.exit(130)
    sys.exit(1 if report.damage_left else 0)


SMALL_REPAIR = 1024 * 1024
"""Repairs of blobs up to this size read their source in the scrub's thread, in one piece."""


def _repairer(service: BlobService, portal: Portal) -> Repair:
    """Scrub's repairs, through the service's upload pipeline on the portal's event loop."""

    def repair(
        sha: Sha, pair: Pair, targets: list[Disk], chunks: Iterator[bytes], size: int, mtime: int
    ) -> Future[list[str]]:
        # a small one is read here, in the scrub's thread, in one piece: no thread hop per chunk
        small = size <= SMALL_REPAIR
        body = one_piece(b"".join(chunks)) if small else service.body_from(chunks)
        return portal.submit(service.repair(sha, pair, targets, body, size, mtime))

    return repair


REPAIRS_SHOWN = 10
"""Repaired findings printed on stderr one by one (a refill repairs every blob of a disk; the
JSON report on stdout lists them, up to its cap)."""


def _print_scrub(report: ScrubReport) -> None:
    shown = 0
    for finding in report.findings:
        if finding.action == "repaired":
            shown += 1
            if shown > REPAIRS_SHOWN:
                continue
        click.echo(f"stor: {finding.problem:<11} {finding.sha}  {finding.disk}  {finding.action}", err=True)
    if shown > REPAIRS_SHOWN:
        more = max(report.repaired, shown) - REPAIRS_SHOWN
        click.echo(f"stor: … and {more:,} more repaired (the JSON report lists the first findings)", err=True)
    seconds = (report.finished or time.time()) - report.started
    rate = report.bytes / seconds / 1e6 if seconds > 0 else 0.0
    click.echo(
        f"stor: scrubbed {report.blobs} blobs, {report.copies} copies, {report.bytes / 1e6:.1f} MB in {seconds:.1f}s"
        f" ({rate:.0f} MB/s): {report.missing} missing, {report.corrupt} corrupt, {report.truncated} truncated,"
        f" {report.unreadable} unreadable, {report.foreign} foreign, {report.stray_temps} stray temps;"
        f" {report.repaired} repaired, {report.lost} lost, {report.damage_left} damage left;"
        f" {report.names} names, {report.names_stale} missing on a member, {report.names_restored} restored;"
        f" {report.tombstones} takedowns, {report.tombstones_stale} records missing on a member,"
        f" {report.taken_down_copies} copies of taken-down blobs, {report.taken_down_removed} removed",
        err=True,
    )


async def _store_file(service: BlobService, sha: Sha, path: Path, size: int) -> PutResult:
    """A local file stored under `sha` through the upload pipeline, read a MiB at a time in
    worker threads; hashed again on the way in (`DigestMismatch` if it changed meanwhile)."""
    with path.open("rb") as source:
        chunks = iter(functools.partial(source.read, 1024 * 1024), b"")
        return await service.put(sha, service.body_from(chunks), size)


@click.command("import")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--config", "config_path", envvar=ENV_CONFIG_FILE, required=True, type=click.Path(dir_okay=False))
@click.option("--move", is_flag=True, help="Delete each source file once it is stored.")
def import_(directory: Path, config_path: str, move: bool) -> None:
    """Ingest every file under DIRECTORY into the local pairs (durably, both copies),
    named by its sha256. Safe while the server runs."""
    config = validated(config_path)
    service = build_service(config)
    try:
        service.prepare()
    except StorError as exc:
        fail(str(exc))
        sys.exit(2)
    files = sorted(p for p in directory.rglob("*") if p.is_file() and not p.is_symlink())
    stored = present = failed = 0
    with (
        Portal() as portal,
        tqdm(
            total=sum(p.stat().st_size for p in files),
            unit="B",
            unit_scale=True,
            desc="import",
            disable=not sys.stderr.isatty(),
        ) as bar,
    ):
        for path in files:
            size = path.stat().st_size
            try:
                sha = hash_file(path)
                result = portal.call(_store_file(service, sha, path, size))
            except (ClientError, StorError, OSError) as exc:
                fail(f"{path}: {exc}")
                failed += 1
                continue
            stored, present = (stored + 1, present) if result.created else (stored, present + 1)
            click.echo(f"{sha}  {path}")
            if move:
                path.unlink()
            bar.update(size)
    service.close()
    click.echo(f"imported {stored}, already stored {present}, failed {failed}", err=True)
    sys.exit(1 if failed else 0)


@click.command()
@click.option("--config", "config_path", envvar=ENV_CONFIG_FILE, required=True, type=click.Path(dir_okay=False))
@click.option("--pair", "pair_index", type=int, required=True, help="The pair to empty (its index in storage_pairs).")
def evacuate(config_path: str, pair_index: int) -> None:
    """Move every blob of a pair that takes no writes onto the writable pairs, then remove it
    from that pair, so its disks can be retired; name and takedown records it holds go first,
    onto the first pair taking writes. Safe while the servers run; run it again to resume.
    Prints a JSON summary.

    Exit 0: the pair holds no blob and no record; 1: blobs or records left (no room elsewhere,
    failures); 2: usage or config error; 130: interrupted."""
    config = validated(config_path)
    service = build_service(config)
    pairs = service.pairs
    if not 0 <= pair_index < len(pairs):
        raise click.BadParameter(f"there are {len(pairs)} pairs (0..{len(pairs) - 1})", param_hint="--pair")
    pair = pairs[pair_index]
    if pair.writable:
        fail(
            f"pair {pair_index} still takes writes: make writable_pairs_regex leave out its directories "
            "(and reload the servers with SIGHUP) first"
        )
        sys.exit(2)
    if service.record_places.home_pair() is pair:
        fail(
            f"pair {pair_index} holds the name and takedown records and no other pair takes writes "
            "to move them to: make writable_pairs_regex match another pair first"
        )
        sys.exit(2)
    try:
        service.prepare()
    except StorError as exc:
        fail(str(exc))
        sys.exit(2)
    with (
        Portal() as portal,
        tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc="evacuate", disable=not sys.stderr.isatty()) as bar,
    ):
        portal.call(service.check_health())

        def relocate(sha: Sha, away: Pair, chunks: Iterator[bytes], size: int, mtime: int) -> PutResult:
            return portal.call(service.relocate(sha, away, service.body_from(chunks), size, mtime))

        def relocated(landed: list[Landed]) -> dict[Sha, Exception]:
            return portal.call(service.relocated(landed))

        names, takedowns = NamedFiles(service).store, service.tombstones
        movers = Movers(service.relocation(pair), relocated, relocate, names=names, takedowns=takedowns)
        report = Evacuation(pair, movers, progress=lambda count, size: bar.update(size)).run()
    service.close()
    click.echo(json.dumps(report.as_dict(), indent=2))
    records_moved = report.names_moved or report.takedowns_moved
    click.echo(
        f"stor: pair {pair_index}: {report.moved} blobs moved ({report.bytes / 1e6:.1f} MB), "
        f"{report.already_elsewhere} already elsewhere, {report.removed} removed, {report.left} left"
        + (f"; {report.names_moved} names and {report.takedowns_moved} takedowns moved" if records_moved else "")
        + (f"; {report.records_left} records left" if report.records_left else "")
        + (f"; stopped: {report.stopped}" if report.stopped else "")
        + (f"; {len(report.failed)} failed" if report.failed else ""),
        err=True,
    )
    if report.interrupted:
        fail("interrupted; run the same command again to continue")
        sys.exit(130)
    sys.exit(0 if report.left == 0 and report.records_left == 0 else 1)


@click.command("hash-password")
@click.option("--bcrypt", "use_bcrypt", is_flag=True, help="A bcrypt hash instead of argon2id.")
def hash_password(use_bcrypt: bool) -> None:
    """Read a password on stdin (asked for, twice and unechoed, on a terminal) and print its
    hash, for `basic_auth` as `user:<hash>` (htpasswd-style)."""
    if sys.stdin.isatty():
        password = click.prompt("password", hide_input=True, confirmation_prompt=True, err=True)
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        fail("the password is empty")
        sys.exit(2)
    click.echo(auth.hash_password(password, "bcrypt" if use_bcrypt else "argon2"))
