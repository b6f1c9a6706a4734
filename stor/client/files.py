"""Local files for the client: reading and hashing uploads, writing downloads safely."""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import select
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from stor.client.errors import NOT_FOUND, USAGE, ClientError
from stor.digest import Sha

CHUNK = 1024 * 1024
Progress = Callable[[int], None]


def hash_file(path: Path, progress: Progress | None = None) -> Sha:
    """The sha256 of a file, streamed; raises `ClientError` when it cannot be read."""
    hasher = hashlib.sha256()
    for chunk in read_file(path, progress):
        hasher.update(chunk)
    return Sha(hasher.hexdigest())


def read_file(path: Path, progress: Progress | None) -> Iterator[bytes]:
    try:
        with path.open("rb") as handle:
            while chunk := handle.read(CHUNK):
                if progress:
                    progress(len(chunk))
                yield chunk
    except FileNotFoundError:
        raise ClientError(f"{path}: no such file", exit_code=NOT_FOUND) from None
    except IsADirectoryError:
        raise ClientError(f"{path}: is a directory", exit_code=USAGE) from None
    except OSError as exc:
        raise ClientError(f"{path}: cannot read: {exc.strerror}", exit_code=NOT_FOUND) from None


def create_beside(target: Path) -> tuple[int, str]:
    """A new temp file beside `target`, opened with mode 0666 so that the umask decides its
    mode (and so the downloaded file's), as `curl -o` does; `mkstemp` would make it 0600."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    while True:
        temp = target.parent / f".{target.name}.{secrets.token_hex(6)}.part"
        try:
            return os.open(temp, flags, 0o666), str(temp)
        except FileExistsError:
            continue
        except OSError as exc:
            raise ClientError(f"{target.parent}: cannot write here: {exc.strerror}", exit_code=NOT_FOUND) from None


def write_all(target: BinaryIO, data: bytes) -> None:
    """Write all of `data`: an unbuffered stream (`sys.stdout.buffer` under PYTHONUNBUFFERED is
    a raw `FileIO`) may take part of it, or none when non-blocking, and say so only by its count."""
    view = memoryview(data)
    while view:
        written: int | None = target.write(view)
        if written is None:  # a non-blocking file, full: wait until it takes more
            select.select([], [target.fileno()], [])
            continue
        view = view[written:]


@contextlib.contextmanager
def writing(target: str) -> Iterator[None]:
    """An `OSError` while writing (disk full, a closed pipe) becomes a `ClientError`."""
    try:
        yield
    except OSError as exc:
        raise ClientError(f"{target}: cannot write: {exc.strerror or exc}", exit_code=NOT_FOUND) from None


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        raise ClientError(f"{path}: no such file", exit_code=NOT_FOUND) from None
