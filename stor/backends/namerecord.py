"""One name record on disk: a small JSON file, `{"path", "sha", "size", "mtime"}`, at a place in
the name tree that follows the name's own path (see `namestore` for the tree, `nameindex` for
how each component is spelled as an entry)."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from stor.backends import nameindex
from stor.backends.nameindex import entry_filename
from stor.digest import Sha, parse_sha
from stor.errors import InvalidDigest


@dataclass(frozen=True)
class NameRecord:
    path: str
    sha: Sha
    size: int
    mtime: float

    def encoded(self) -> bytes:
        return json.dumps(asdict(self)).encode()


def record_relpath(name: str) -> str:
    """Where the record of `name` lives below the tree root."""
    *parents, last = name.split("/")
    return "/".join(
        [*(entry_filename(part, directory=True) for part in parents), entry_filename(last, directory=False)]
    )


def read_record(path: str) -> NameRecord:
    """The record in the file `path`; `ValueError` when it is not one (OSError as `open`'s)."""
    with open(path, encoding="utf-8") as handle:
        raw = json.load(handle)
    try:
        return NameRecord(str(raw["path"]), parse_sha(str(raw["sha"])), int(raw["size"]), float(raw["mtime"]))
    except (KeyError, TypeError, InvalidDigest) as exc:
        raise ValueError(f"bad name record {path}") from exc


def read_optional(path: str) -> NameRecord | None:
    """`read_record`, None when the file is missing or not a record."""
    with contextlib.suppress(FileNotFoundError, NotADirectoryError, ValueError):
        return read_record(path)
    return None


def record_files(tree: str) -> Iterator[str]:
    """Every record file below `tree` (none when it is missing)."""
    for directory, _, filenames in os.walk(tree):
        for filename in filenames:
            if nameindex.is_entry(filename) and filename[0] in "rh":
                yield os.path.join(directory, filename)
