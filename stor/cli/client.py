"""The client commands: `stor put`, `stor get`, `stor head`, `stor takedown`.

The server comes from `--url` or `STOR_URL`; credentials from `-u/--user USER:PASS` (as curl),
`STOR_CREDENTIALS`, or `STOR_USER` + `STOR_PASSWORD`. Connection failures and 5xx answers are
retried with backoff (`--retries`). Exit codes: 0 done, 1 not found or content mismatch, 2 usage
or credentials (a `--url` without http:// or https:// among them), 3 server unreachable or still
failing after the retries. Machine-readable output on stdout (`stor get -o -`: the verified
bytes), errors, skipped paths and progress bars (on a terminal only) on stderr.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import click
from tqdm import tqdm

from stor.cli.common import DEFAULT_PORT, fail
from stor.client import NOT_FOUND, ClientError, StorClient, hash_file, parse_credentials
from stor.client.api import check_url
from stor.digest import Sha, parse_sha
from stor.errors import InvalidDigest

BIG_FILE = 8 * 1024 * 1024
STDOUT = Path("-")
CREDENTIALS_HINT = "give credentials with -u USER:PASS or STOR_CREDENTIALS (or STOR_USER and STOR_PASSWORD)"


def _url(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    """A usage error (exit 2) now, rather than a URL httpx would read as a path and retry."""
    try:
        return check_url(value)
    except ClientError as exc:
        raise click.BadParameter(str(exc)) from None


def _client_options(command: Callable[..., None]) -> Callable[..., None]:
    options = [
        click.option(
            "--url",
            envvar="STOR_URL",
            default=f"http://127.0.0.1:{DEFAULT_PORT}",
            show_default=True,
            callback=_url,
            help="stor's URL, http:// or https:// [env STOR_URL]",
        ),
        click.option(
            "-u",
            "--user",
            "credentials",
            envvar="STOR_CREDENTIALS",
            metavar="USER:PASS",
            help="Writer credentials, as curl's -u [env STOR_CREDENTIALS, or STOR_USER and STOR_PASSWORD].",
        ),
        click.option(
            "--retries",
            default=3,
            show_default=True,
            type=click.IntRange(0, 20),
            help="Retries of a request that found the server unreachable or got a 5xx.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _client(url: str, credentials: str | None, retries: int) -> StorClient:
    logging.getLogger("stamina").setLevel(logging.ERROR)  # a retry is not news: the last failure is
    return StorClient(url, _credentials(credentials), retries=retries, credentials_hint=CREDENTIALS_HINT)


def _credentials(given: str | None) -> tuple[str, str] | None:
    if given:
        try:
            return parse_credentials(given)
        except ClientError as exc:
            raise click.BadParameter(str(exc), param_hint="-u/--user") from None
    user, password = os.environ.get("STOR_USER"), os.environ.get("STOR_PASSWORD")
    if user and password is not None:
        return user, password
    return None


def _bar(total: int, what: str, show: bool) -> tqdm[None]:
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=what, disable=not show, leave=False)


def _sha_or_usage(text: str) -> Sha:
    try:
        return parse_sha(text)
    except InvalidDigest as exc:
        raise click.BadParameter(str(exc)) from None


def _exit(error: ClientError) -> None:
    fail(str(error))
    sys.exit(error.exit_code)


# -- put ---------------------------------------------------------------------------------------


@dataclass
class _Outcome:
    file: Path
    sha: Sha | None = None
    result: str = "error"  # stored, exists, error, skipped
    error: str | None = None
    exit_code: int = 0
    reason: str | None = None  # why a path under a directory was skipped

    def line(self, as_json: bool) -> str:
        if as_json:
            fields: dict[str, Any] = {"sha": self.sha, "file": str(self.file), "result": self.result}
            if self.error:
                fields["error"] = self.error
            if self.reason:
                fields["reason"] = self.reason
            return json.dumps(fields)
        return f"{self.sha}  {self.file}  {self.result}"


def _skipped(path: Path, reason: str) -> _Outcome:
    return _Outcome(path, result="skipped", reason=reason)


def _files(arguments: tuple[Path, ...]) -> Iterator[Path | _Outcome]:
    """The files to upload: each argument, or every file under a directory (recursively)."""
    for path in arguments:
        if path.is_dir():
            yield from _walk(path)
        elif path.is_file():
            yield path
        else:
            reason = "no such file" if not path.exists() and not path.is_symlink() else "not a regular file"
            yield _Outcome(path, error=f"{path}: {reason}", exit_code=NOT_FOUND)


def _walk(directory: Path) -> Iterator[Path | _Outcome]:
    """The regular files under `directory` (symlinks to files included), sorted; what is not
    one is skipped, and said so: a broken symlink, a symlink to a directory (not followed, so no
    loop), a FIFO, socket or device. A directory that cannot be listed is an error."""
    try:
        names = sorted(os.listdir(directory))
    except OSError as exc:
        yield _Outcome(directory, error=f"{directory}: cannot list: {exc.strerror}", exit_code=NOT_FOUND)
        return
    for name in names:
        path = directory / name
        if path.is_symlink():
            if path.is_file():
                yield path
            elif path.is_dir():
                yield _skipped(path, "symlink to a directory, not followed")
            elif not path.exists():
                yield _skipped(path, "broken symlink")
            else:
                yield _skipped(path, "not a regular file")
        elif path.is_dir():
            yield from _walk(path)
        elif path.is_file():
            yield path
        else:
            yield _skipped(path, "not a regular file")


@click.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--name", help="Store the one FILE under this path name (the named-file API).")
@click.option("-j", "--jobs", default=4, show_default=True, type=click.IntRange(1, 64), help="Parallel uploads.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per file on stdout.")
@_client_options
def put(
    files: tuple[Path, ...], name: str | None, jobs: int, as_json: bool, url: str, credentials: str | None, retries: int
) -> None:
    """Upload FILES (directories: every file in them), skipping those the server has already.
    Prints `sha  file  stored|exists` per file (or JSON with --json). What a directory holds
    that is not a regular file (broken symlink, FIFO...) is skipped with a line on stderr (and
    `"result": "skipped"` with --json); skipping alone does not change the exit code."""
    if name is not None:
        _put_named(files, name, _client(url, credentials, retries))
        return
    found = list(_files(files))
    outcomes = [item for item in found if isinstance(item, _Outcome)]
    paths = [item for item in found if isinstance(item, Path)]
    total = sum(p.stat().st_size for p in paths)
    show = sys.stderr.isatty() and (len(paths) > 1 or total > BIG_FILE)
    with _client(url, credentials, retries) as client:
        hashed: list[_Outcome] = []
        with _bar(total, "hashing", show) as bar:
            for path in paths:
                try:
                    hashed.append(_Outcome(path, hash_file(path, bar.update)))
                except ClientError as exc:
                    outcomes.append(_Outcome(path, error=str(exc), exit_code=exc.exit_code))
        try:
            known = client.stat([o.sha for o in hashed if o.sha]) if hashed else {}
        except ClientError as exc:
            _exit(exc)
        todo = [o for o in hashed if not known.get(o.sha)]  # type: ignore[arg-type]
        for outcome in hashed:
            if outcome not in todo:
                outcome.result = "exists"
        with _bar(sum(o.file.stat().st_size for o in todo), "uploading", show) as bar:

            def upload(outcome: _Outcome) -> None:
                assert outcome.sha is not None
                try:
                    outcome.result = "stored" if client.put(outcome.sha, outcome.file, bar.update) else "exists"
                except ClientError as exc:
                    outcome.result, outcome.error, outcome.exit_code = "error", str(exc), exc.exit_code

            with ThreadPoolExecutor(jobs) as pool:
                list(pool.map(upload, todo))
    for outcome in outcomes + hashed:
        if outcome.error:
            fail(outcome.error)
        if outcome.reason:
            fail(f"{outcome.file}: skipped ({outcome.reason})")
        if outcome.sha is not None or as_json:
            click.echo(outcome.line(as_json))
    sys.exit(max((o.exit_code for o in outcomes + hashed), default=0))


def _put_named(files: tuple[Path, ...], name: str, client: StorClient) -> None:
    if len(files) != 1 or not files[0].is_file():
        raise click.UsageError("--name takes exactly one regular FILE")
    with client:
        try:
            sha = client.put_named(name, files[0])
        except ClientError as exc:
            _exit(exc)
    click.echo(f"{sha}  {name}")


# -- get and head ------------------------------------------------------------------------------


@click.command()
@click.argument("sha", required=False)
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path, allow_dash=True),
    help="File to write (default: ./SHA or ./NAME); - for stdout.",
)
@click.option("--name", help="Get the file stored under this path name instead of a SHA.")
@_client_options
def get(
    sha: str | None, output: Path | None, name: str | None, url: str, credentials: str | None, retries: int
) -> None:
    """Download a blob (or a named file), verify its hash and write it atomically (-o -: to
    stdout, once verified). A blob is checked against SHA itself, a named file against the sha
    its ETag (or Repr-Digest) announces."""
    if (sha is None) == (name is None):
        raise click.UsageError("give either a SHA or --name")
    what = name if name is not None else _sha_or_usage(sha or "")
    to_stdout = output == STDOUT
    target = output or Path(Path(what).name)
    if not to_stdout and target.is_dir():
        target = target / Path(what).name
    into: Path | BinaryIO = sys.stdout.buffer if to_stdout else target
    with _client(url, credentials, retries) as client:
        try:
            if name is not None:
                client.get_named(name, into)
            else:
                blob = Sha(what)
                size = client.head(blob).size
                with _bar(size, "downloading", sys.stderr.isatty() and size > BIG_FILE) as bar:
                    client.get(blob, into, bar.update)
        except ClientError as exc:
            if to_stdout:
                _quiet_stdout()
            _exit(ClientError(f"{what}: not found", 404) if exc.status == 404 else exc)
    if not to_stdout:  # stdout holds the bytes
        click.echo(f"{what}  {target}")


def _quiet_stdout() -> None:
    """After a failed write to stdout (a closed pipe), drop what is still buffered for it, so
    that exiting does not fail again on flushing it."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


@click.command()
@click.argument("sha", required=False)
@click.option("--name", help="Ask about the file stored under this path name instead of a SHA.")
@_client_options
def head(sha: str | None, name: str | None, url: str, credentials: str | None, retries: int) -> None:
    """Show a blob's (or named file's) sha, size and date: `sha  size  date`. Exit 1 if the
    server does not have it, 3 if it cannot be asked."""
    if (sha is None) == (name is None):
        raise click.UsageError("give either a SHA or --name")
    with _client(url, credentials, retries) as client:
        try:
            info = client.head_named(name) if name is not None else client.head(_sha_or_usage(sha or ""))
        except ClientError as exc:
            _exit(ClientError(f"{name or sha}: not found", 404) if exc.status == 404 else exc)
    click.echo(f"{info.sha}  {info.size}  {info.last_modified}")


# -- takedown ----------------------------------------------------------------------------------


@click.command()
@click.argument("shas", nargs=-1)
@click.option("--reason", help="Why (recorded with the takedown, and in the audit log). Required to take down.")
@click.option(
    "--restore",
    "restore",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Store FILE again and lift the takedown of its sha (instead of taking SHAs down).",
)
@_client_options
def takedown(
    shas: tuple[str, ...], reason: str | None, restore: Path | None, url: str, credentials: str | None, retries: int
) -> None:
    """Take blobs down for good (admin credentials): every copy, quarantined copy and the S3
    object removed, and from then on 410 Gone on every node. Prints one JSON object per SHA.
    With --restore FILE, store the file again and lift its takedown. Exit 1 if some SHA was
    never stored or is already down."""
    with _client(url, credentials, retries) as client:
        if restore is not None:
            if shas:
                raise click.UsageError("--restore takes a FILE, not SHAs")
            try:
                sha = hash_file(restore)
                client.put(sha, restore)
            except ClientError as exc:
                _exit(exc)
            click.echo(json.dumps({"sha": sha, "file": str(restore), "result": "restored"}))
            return
        if not shas:
            raise click.UsageError("give the SHAs to take down (or --restore FILE)")
        if not reason or not reason.strip():
            raise click.UsageError("--reason is required: it is recorded with the takedown")
        worst = 0
        for sha in [_sha_or_usage(text) for text in shas]:
            try:
                click.echo(json.dumps(client.take_down(sha, reason)))
            except ClientError as exc:
                fail(str(exc))
                worst = max(worst, exc.exit_code)
    sys.exit(worst)
