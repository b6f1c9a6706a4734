"""An in-process LRU of blob locations, in front of memcached.

A memcached round trip costs more than the `stat` it saves on a local disk, so the locations
this process saw recently are kept here first. Only positive entries: a location is verified
with one `stat` before use, so a stale one costs a probe, while a remembered "absent" could
hide another node's upload. Thread-safe.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from stor.digest import Sha


class NearCache:
    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[Sha, str] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, sha: Sha) -> str | None:
        with self._lock:
            root = self._entries.get(sha)
            if root is not None:
                self._entries.move_to_end(sha)
            return root

    def remember(self, sha: Sha, root: str) -> None:
        if self.size <= 0:
            return
        with self._lock:
            self._entries[sha] = root
            self._entries.move_to_end(sha)
            if len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def forget(self, sha: Sha) -> None:
        with self._lock:
            self._entries.pop(sha, None)
