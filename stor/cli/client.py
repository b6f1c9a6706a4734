"""The client commands: `stor put`, `stor get`, `stor head`."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import click
from tqdm import tqdm

from stor.cli.common import DEFAULT_PORT, fail
from stor.client import ClientError, StorClient, hash_file
from stor.digest import Sha, parse_sha
from stor.errors import InvalidDigest

BIG_FILE = 8 * 1024 * 1024


def _client_options(command: Callable[..., None]) -> Callable[..., None]:
    command = click.option("--password", envvar="STOR_PASSWORD", help="[env STOR_PASSWORD]")(command)
    command = click.option("--user", envvar="STOR_USER", help="[env STOR_USER]")(command)
    url_help = "stor's URL [env STOR_URL]"
    default_url = f"http://127.0.0.1:{DEFAULT_PORT}"
    return click.option("--url", envvar="STOR_URL", default=default_url, show_default=True, help=url_help)(command)


def _bar(total: int, what: str, show: bool) -> tqdm[None]:
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=what, disable=not show, leave=False)


def _sha_or_usage(text: str) -> Sha:
    try:
        return parse_sha(text)
    except InvalidDigest as exc:
        raise click.BadParameter(str(exc)) from None


@click.command()
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
            fail(f"{path}: not a regular file")
            failed += 1
        elif not os.access(path, os.R_OK):
            fail(f"{path}: not readable")
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
                fail(str(exc))
                failed += 1
    with StorClient(url, user, password) as client:
        try:
            known = client.stat([sha for sha, _ in hashed]) if hashed else {}
        except ClientError as exc:
            fail(str(exc))
            sys.exit(1)
        todo = [(sha, path) for sha, path in hashed if not known.get(sha)]
        with _bar(sum(p.stat().st_size for _, p in todo), "uploading", show) as bar:
            for sha, path in hashed:
                if (sha, path) in todo:
                    try:
                        client.put(sha, path, bar.update)
                    except ClientError as exc:
                        fail(f"{path}: {exc}")
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
            fail(str(exc))
            sys.exit(1)
    click.echo(f"{sha}  {name}")


@click.command()
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
            fail(f"{blob}: not found" if exc.status == 404 else str(exc))
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
            fail(f"{name}: not found" if exc.status == 404 else str(exc))
            sys.exit(1)
    click.echo(f"{name}  {target}")


@click.command()
@click.argument("sha")
@_client_options
def head(sha: str, url: str, user: str | None, password: str | None) -> None:
    """Show a blob's size and date; exit 1 if the server does not have it."""
    name = _sha_or_usage(sha)
    with StorClient(url, user, password) as client:
        try:
            info = client.head(name)
        except ClientError as exc:
            fail(f"{name}: not found" if exc.status == 404 else str(exc))
            sys.exit(1)
    click.echo(f"{info.sha}  {info.size}  {info.last_modified}")
