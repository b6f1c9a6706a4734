"""The `stor` command. The only module that configures logging, starts the server or exits."""

from __future__ import annotations

import json
import logging.config
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from stor import __version__, servers
from stor.client import ClientError, StorClient, hash_file
from stor.config import ENV_BASIC_AUTH, ENV_CONFIG_FILE, Config, load_config
from stor.digest import Sha, parse_sha
from stor.errors import ConfigError, InvalidDigest, StorError
from stor.metrics.prometheus import ENV_MULTIPROC
from stor.scrub import Scrubber, ScrubReport
from stor.wiring import ENV_DATA_DIR, build_service, embedded_config, preflight

DEFAULT_PORT = 8321


def _logging_config(level: str) -> dict[str, Any]:
    """Access lines to stdout, everything else to stderr; the same in every worker."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"},
            "access": {"format": "%(asctime)s %(message)s"},
        },
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"},
            "stdout": {"class": "logging.StreamHandler", "formatter": "access", "stream": "ext://sys.stdout"},
        },
        "loggers": {
            "stor": {"handlers": ["stderr"], "level": level, "propagate": False},
            "uvicorn": {"handlers": ["stderr"], "level": level, "propagate": False},
            "uvicorn.error": {"level": level},
            "uvicorn.access": {"handlers": ["stdout"], "level": level, "propagate": False},
            "_granian": {"handlers": ["stderr"], "level": level, "propagate": False},
            "granian.access": {"handlers": ["stdout"], "level": level, "propagate": False},
        },
    }


@click.group()
@click.version_option(__version__, prog_name="stor")
def main() -> None:
    """stor: a content-addressed SHA-256 blob store on mirrored disk pairs."""


@main.command()
@click.option(
    "--config",
    "config_path",
    envvar=ENV_CONFIG_FILE,
    type=click.Path(dir_okay=False),
    help="JSON config file [env CONFIG_FILE]. Without one, serve the embedded default from ./stor-data.",
)
@click.option("--host", envvar="STOR_HOST", default="127.0.0.1", show_default=True, help="[env STOR_HOST]")
@click.option(
    "--port",
    envvar="STOR_PORT",
    default=DEFAULT_PORT,
    type=click.IntRange(0, 65535),
    show_default=True,
    help="[env STOR_PORT]",
)
@click.option(
    "--workers",
    envvar="STOR_WORKERS",
    default=1,
    type=click.IntRange(1, 256),
    show_default=True,
    help="Worker processes [env STOR_WORKERS].",
)
@click.option(
    "--data-dir",
    envvar=ENV_DATA_DIR,
    default="stor-data",
    show_default=True,
    help="Where the embedded default keeps its pair [env STOR_DATA_DIR].",
)
@click.option(
    "--log-level",
    envvar="STOR_LOG_LEVEL",
    default="info",
    type=click.Choice(["debug", "info", "warning", "error"]),
    show_default=True,
)
@click.option(
    "--server",
    envvar="STOR_SERVER",
    default="uvicorn",
    type=click.Choice(servers.SERVERS),
    show_default=True,
    help="The HTTP server: uvicorn answers hot blobs without an ASGI cycle and slow or huge request "
    "heads with 408/431, and is what the reliability suite runs; granian is the alternative "
    "(see docs/deployment.md) [env STOR_SERVER].",
)
def serve(
    config_path: str | None, host: str, port: int, workers: int, data_dir: str, log_level: str, server: str
) -> None:
    """Serve the HTTP API."""
    logging.config.dictConfig(_logging_config(log_level.upper()))
    if config_path:
        config = _validated(config_path)
        os.environ[ENV_CONFIG_FILE] = os.path.abspath(config_path)
    else:
        config = _prepare_embedded(Path(data_dir).absolute())
    multiproc = None
    if workers > 1 and not os.environ.get(ENV_MULTIPROC):
        # each worker counts into files here; /metrics sums them
        multiproc = tempfile.mkdtemp(prefix="stor-metrics-")
        os.environ[ENV_MULTIPROC] = multiproc
    try:
        servers.serve(server, host, port, workers, _logging_config(log_level.upper()), config.body_idle_timeout)
    finally:
        if multiproc:
            shutil.rmtree(multiproc, ignore_errors=True)


@main.command("check-config")
@click.option(
    "--config",
    "config_path",
    envvar=ENV_CONFIG_FILE,
    required=True,
    type=click.Path(dir_okay=False),
    help="[env CONFIG_FILE]",
)
def check_config(config_path: str) -> None:
    """Validate a config file and its storage directories; exit 2 on error."""
    config = _validated(config_path)
    pairs = len(config.storage_pairs)
    writable = sum(config.pair_writable_by_regex(p) for p in config.storage_pairs)
    click.echo(f"{config_path}: OK ({pairs} pairs, {writable} writable, {len(config.basic_auth)} writers)")


def _validated(path: str) -> Config:
    try:
        config = load_config(path)
        preflight(config)
    except ConfigError as exc:
        click.echo(f"stor: config error: {exc}", err=True)
        sys.exit(2)
    return config


def _prepare_embedded(data_dir: Path) -> Config:
    """Create the embedded default's directories and writer credentials, and say so once."""
    for disk in ("disk1", "disk2"):
        (data_dir / disk).mkdir(parents=True, exist_ok=True)
    os.environ[ENV_DATA_DIR] = str(data_dir)
    if os.environ.get(ENV_BASIC_AUTH):
        credentials = f"from {ENV_BASIC_AUTH}"
    else:
        credentials = _embedded_credentials(data_dir / "credentials")
        os.environ[ENV_BASIC_AUTH] = credentials
    config = embedded_config(str(data_dir), os.environ)  # validate now, before the workers start
    click.echo(
        f"stor: no config given; serving the embedded default from {data_dir} (one pair: disk1 + disk2)", err=True
    )
    click.echo(f"stor: writer credentials: {credentials}", err=True)
    return config


def _embedded_credentials(path: Path) -> str:
    """Kept in the data directory (mode 0600), so a restart keeps the same credentials."""
    try:
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        pass
    value = f"writer:{secrets.token_urlsafe(18)}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(value + "\n")
    return value


# -- the client commands -------------------------------------------------------------------

BIG_FILE = 8 * 1024 * 1024


def _client_options(command: Callable[..., None]) -> Callable[..., None]:
    command = click.option("--password", envvar="STOR_PASSWORD", help="[env STOR_PASSWORD]")(command)
    command = click.option("--user", envvar="STOR_USER", help="[env STOR_USER]")(command)
    url_help = "stor's URL [env STOR_URL]"
    default_url = f"http://127.0.0.1:{DEFAULT_PORT}"
    return click.option("--url", envvar="STOR_URL", default=default_url, show_default=True, help=url_help)(command)


def _fail(message: str) -> None:
    click.echo(f"stor: {message}", err=True)


def _bar(total: int, what: str, show: bool) -> tqdm[None]:
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=what, disable=not show, leave=False)


def _sha_or_usage(text: str) -> Sha:
    try:
        return parse_sha(text)
    except InvalidDigest as exc:
        raise click.BadParameter(str(exc)) from None


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--name", help="Store the one FILE under this path name (the named-file API).")
@_client_options
def put(files: tuple[Path, ...], name: str | None, url: str, user: str | None, password: str | None) -> None:
    """Upload FILES, skipping those the server already has. Prints `sha  file` per file."""
    if name is not None:
        _put_named(files, name, url, user, password)
        return
    failed = 0
    readable: list[Path] = []
    for path in files:
        if not path.is_file():
            _fail(f"{path}: not a regular file")
            failed += 1
        elif not os.access(path, os.R_OK):
            _fail(f"{path}: not readable")
            failed += 1
        else:
            readable.append(path)
    total = sum(p.stat().st_size for p in readable)
    show = sys.stderr.isatty() and (len(readable) > 1 or total > BIG_FILE)
    hashed: list[tuple[Sha, Path]] = []
    with _bar(total, "hashing", show) as bar:
        for path in readable:
            try:
                hashed.append((hash_file(path, bar.update), path))
            except ClientError as exc:
                _fail(str(exc))
                failed += 1
    with StorClient(url, user, password) as client:
        try:
            known = client.stat([sha for sha, _ in hashed]) if hashed else {}
        except ClientError as exc:
            _fail(str(exc))
            sys.exit(1)
        todo = [(sha, path) for sha, path in hashed if not known.get(sha)]
        with _bar(sum(p.stat().st_size for _, p in todo), "uploading", show) as bar:
            for sha, path in hashed:
                if (sha, path) in todo:
                    try:
                        client.put(sha, path, bar.update)
                    except ClientError as exc:
                        _fail(f"{path}: {exc}")
                        failed += 1
                        continue
                click.echo(f"{sha}  {path}")
    sys.exit(1 if failed else 0)


def _put_named(files: tuple[Path, ...], name: str, url: str, user: str | None, password: str | None) -> None:
    if len(files) != 1 or not files[0].is_file():
        raise click.UsageError("--name takes exactly one regular FILE")
    with StorClient(url, user, password) as client:
        try:
            sha = client.put_named(name, files[0])
        except ClientError as exc:
            _fail(str(exc))
            sys.exit(1)
    click.echo(f"{sha}  {name}")


@main.command()
@click.argument("sha", required=False)
@click.option("-o", "--output", type=click.Path(path_type=Path), help="File to write (default: ./SHA or ./NAME).")
@click.option("--name", help="Get the file stored under this path name instead of a SHA.")
@_client_options
def get(
    sha: str | None, output: Path | None, name: str | None, url: str, user: str | None, password: str | None
) -> None:
    """Download a blob (or a named file), verify its hash and write it atomically."""
    if (sha is None) == (name is None):
        raise click.UsageError("give either a SHA or --name")
    if name is not None:
        _get_named(name, output, url, user, password)
        return
    assert sha is not None
    blob = _sha_or_usage(sha)
    target = output or Path(blob)
    if target.is_dir():
        target = target / blob
    with StorClient(url, user, password) as client:
        try:
            size = client.head(blob).size
            with _bar(size, "downloading", sys.stderr.isatty() and size > BIG_FILE) as bar:
                client.get(blob, target, bar.update)
        except ClientError as exc:
            _fail(f"{blob}: not found" if exc.status == 404 else str(exc))
            sys.exit(1)
    click.echo(f"{blob}  {target}")


def _get_named(name: str, output: Path | None, url: str, user: str | None, password: str | None) -> None:
    target = output or Path(Path(name).name)
    if target.is_dir():
        target = target / Path(name).name
    with StorClient(url, user, password) as client:
        try:
            client.get_named(name, target)
        except ClientError as exc:
            _fail(f"{name}: not found" if exc.status == 404 else str(exc))
            sys.exit(1)
    click.echo(f"{name}  {target}")


@main.command()
@click.argument("sha")
@_client_options
def head(sha: str, url: str, user: str | None, password: str | None) -> None:
    """Show a blob's size and date; exit 1 if the server does not have it."""
    name = _sha_or_usage(sha)
    with StorClient(url, user, password) as client:
        try:
            info = client.head(name)
        except ClientError as exc:
            _fail(f"{name}: not found" if exc.status == 404 else str(exc))
            sys.exit(1)
    click.echo(f"{info.sha}  {info.size}  {info.last_modified}")


# -- operator commands ---------------------------------------------------------------------


@main.command()
@click.option("--config", "config_path", envvar=ENV_CONFIG_FILE, required=True, type=click.Path(dir_okay=False))
@click.option("--repair", is_flag=True, help="Quarantine bad copies and rewrite missing or bad ones.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--rate", type=click.FloatRange(min=0.1), help="Hash at most this many MB/s.")
@click.option("--pair", "pair_index", type=int, help="Scrub only this pair (its index in storage_pairs).")
@click.option("--restart", is_flag=True, help="Ignore the checkpoint of an interrupted scrub.")
def scrub(
    config_path: str, repair: bool, as_json: bool, rate: float | None, pair_index: int | None, restart: bool
) -> None:
    """Re-hash every copy, compare pair members, and (with --repair) fix what is damaged.

    Exit 0: clean or all repaired; 1: damage left; 2: usage or config error; 130: interrupted
    (run it again to resume)."""
    config = _validated(config_path)
    service = build_service(config)
    pairs = service.pool.pairs
    if pair_index is not None:
        if not 0 <= pair_index < len(pairs):
            raise click.BadParameter(f"there are {len(pairs)} pairs (0..{len(pairs) - 1})", param_hint="--pair")
        pairs = [pairs[pair_index]]
    try:
        for disk in service.pool.disks:
            disk.prepare(sweep=False)  # stray temps are the scrub's to report (and, with --repair, remove)
    except StorError as exc:
        _fail(str(exc))
        sys.exit(2)
    show = sys.stderr.isatty() and not as_json
    with tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc="scrub", disable=not show) as bar:
        files = 0

        def progress(count: int, size: int) -> None:
            nonlocal files
            files += count
            bar.update(size)
            bar.set_postfix(files=files, refresh=False)

        s3 = service.s3.store if service.s3 is not None else None
        report = Scrubber(
            pairs, s3=s3, repair=repair, rate=rate * 1e6 if rate else None, progress=progress, restart=restart
        ).run()
    service.close()
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        _print_scrub(report)
    if report.interrupted:
        _fail("interrupted; run the same command again to continue where it stopped")
        sys.exit(130)
    sys.exit(1 if report.damage_left else 0)


def _print_scrub(report: ScrubReport) -> None:
    for finding in report.findings:
        click.echo(f"{finding.problem:<11} {finding.sha}  {finding.disk}  {finding.action}")
    seconds = (report.finished or time.time()) - report.started
    rate = report.bytes / seconds / 1e6 if seconds > 0 else 0.0
    click.echo(
        f"scrubbed {report.blobs} blobs, {report.copies} copies, {report.bytes / 1e6:.1f} MB in {seconds:.1f}s"
        f" ({rate:.0f} MB/s): {report.missing} missing, {report.corrupt} corrupt, {report.truncated} truncated,"
        f" {report.unreadable} unreadable, {report.foreign} foreign, {report.stray_temps} stray temps;"
        f" {report.repaired} repaired, {report.lost} lost, {report.damage_left} damage left"
    )


@main.command("import")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--config", "config_path", envvar=ENV_CONFIG_FILE, required=True, type=click.Path(dir_okay=False))
@click.option("--move", is_flag=True, help="Delete each source file once it is stored.")
def import_(directory: Path, config_path: str, move: bool) -> None:
    """Ingest every file under DIRECTORY into the local pairs (durably, both copies),
    named by its sha256. Safe while the server runs."""
    config = _validated(config_path)
    service = build_service(config)
    try:
        service.prepare()
    except StorError as exc:
        _fail(str(exc))
        sys.exit(2)
    files = sorted(p for p in directory.rglob("*") if p.is_file() and not p.is_symlink())
    stored = present = failed = 0
    with tqdm(
        total=sum(p.stat().st_size for p in files),
        unit="B",
        unit_scale=True,
        desc="import",
        disable=not sys.stderr.isatty(),
    ) as bar:
        for path in files:
            size = path.stat().st_size
            try:
                sha = hash_file(path)
                result = service.store_file(sha, str(path))
            except (ClientError, StorError, OSError) as exc:
                _fail(f"{path}: {exc}")
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
