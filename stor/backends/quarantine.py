"""A disk's quarantine: copies moved out of the layout into `<root>/.stor-quarantine/`, each
with a JSON note beside it, and the question "was a copy of this blob quarantined here?".

Contract: nothing is ever deleted (but by `purge`, for a takedown); a move is durable (note fsynced, both directories
fsynced) before `move` returns, and made inside the disk's `ClearMark.adding` (which watches
the directory: the event loop proves a blob is not here with it). Failures are
`StorageUnavailable` (or `InsufficientStorage`) through `disk_error`. `holds` costs one `stat` of
the directory: its listing is read again only when the directory changed. Blocking;
thread-safe.
"""

from __future__ import annotations

import json
import os
import threading
import time

from stor.backends.inflight import guarded
from stor.backends.temps import Home, disk_error, fsync_dir
from stor.digest import Sha

QUARANTINE_DIR = ".stor-quarantine"


class Quarantine:
    def __init__(self, disk: Home) -> None:
        self.disk = disk
        self.inflight = disk.inflight
        self.root = os.path.join(disk.root, QUARANTINE_DIR)
        self._listing: tuple[int, frozenset[str]] = (-1, frozenset())  # (dir mtime, SHAs)
        self._lock = threading.Lock()
        disk.clear.watch(self.root)

    @guarded
    def holds(self, sha: Sha) -> bool:
        """Whether a copy of `sha` was moved to quarantine here."""
        try:
            mtime = os.stat(self.root).st_mtime_ns
            return sha.upper() in self._shas(mtime)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise disk_error(self.disk, "reading the quarantine", exc) from exc

    def _shas(self, mtime: int) -> frozenset[str]:
        with self._lock:
            if self._listing[0] != mtime:
                names = os.listdir(self.root)
                self._listing = (mtime, frozenset(name.split(".", 1)[0] for name in names if name.endswith(".dat")))
            return self._listing[1]

    def move(self, sha: Sha, note: dict[str, object]) -> str | None:
        """Move the copy of `sha` out of the layout into the quarantine, with `note` (and where
        it came from) beside it. Returns the new path, or None if the copy was already gone."""
        source = self.disk.blob_path(sha)
        stem = os.path.join(self.root, f"{sha.upper()}.{time.time_ns()}")
        try:
            with self.disk.clear.adding():
                os.makedirs(self.root, exist_ok=True)
                try:
                    os.rename(source, stem + ".dat")
                except FileNotFoundError:
                    return None
            fd = os.open(stem + ".json", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump({**note, "disk": self.disk.root, "path": source, "quarantined_at": time.time()}, handle)
                handle.flush()
                os.fsync(handle.fileno())
            fsync_dir(self.root)
            fsync_dir(os.path.dirname(source))
        except OSError as exc:
            raise disk_error(self.disk, "quarantine", exc) from exc
        return stem + ".dat"

    @guarded
    def purge(self, sha: Sha) -> list[str]:
        """Remove every quarantined copy of `sha` here, with its note, durably (a takedown):
        the one exception to "nothing is ever deleted". The paths of the copies removed."""
        prefix = sha.upper() + "."
        try:
            names = [name for name in os.listdir(self.root) if name.startswith(prefix)]
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise disk_error(self.disk, "reading the quarantine", exc) from exc
        removed = []
        try:
            for name in names:
                os.unlink(os.path.join(self.root, name))
                if name.endswith(".dat"):
                    removed.append(os.path.join(self.root, name))
            if names:
                fsync_dir(self.root)
        except OSError as exc:
            raise disk_error(self.disk, "purging the quarantine", exc) from exc
        return removed
