"""Runtime config changes: on SIGHUP each worker re-reads the config file and applies what can
change without a restart, without refusing a connection.

Applied at once: `writable_pairs_regex` (which pairs take writes: Stor's way to drain a pair),
the credential lists (`basic_auth`, `read_auth`, `admin_auth`, `metrics_auth`; what was verified
is forgotten), and pairs added at the end of `storage_pairs` (their directories are checked and
prepared first). Any other change is logged as waiting for a restart. An invalid file
(or a new pair whose directory is missing) is logged with the key at fault, and the running
config stays whole. One log line says what changed. Under `--workers N` the supervisor
passes the signal on to every worker (`http.servers`), and each applies the same file.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
from collections.abc import Callable

from stor.backends.pairs import Pair
from stor.config import KEYS, Config, check_storage_dirs, load_config
from stor.errors import ConfigError, StorError
from stor.http.auth import CONFIG_KEYS, Authenticator, lists_of
from stor.service import BlobService

log = logging.getLogger(__name__)

LIVE_KEYS = frozenset({"writable_pairs_regex", "storage_pairs", *CONFIG_KEYS})

_WHO = {"basic_auth": "writers", "read_auth": "readers", "admin_auth": "admins", "metrics_auth": "metrics readers"}
_NOBODY = {
    "basic_auth": "none: every write is refused",
    "read_auth": "none: reads are open",
    "admin_auth": "none: no takedowns",
    "metrics_auth": "none: /metrics is open",
}

BuildPair = Callable[[Config, int, tuple[str, ...]], Pair]
"""Makes the pair at an index from its directories, as at start-up (`wiring.build_pair`)."""


class Reloader:
    def __init__(
        self,
        path: str | None,
        config: Config,
        service: BlobService,
        authenticator: Authenticator,
        build_pair: BuildPair,
    ) -> None:
        self.path = path
        self.build_pair = build_pair
        self.config = config
        self.service = service
        self.authenticator = authenticator
        self._task: asyncio.Task[list[str]] | None = None

    def install(self) -> None:
        """Reload on SIGHUP (from the event loop, in the main thread)."""
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._requested)

    def uninstall(self) -> None:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)

    def _requested(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self.reload())

    async def reload(self) -> list[str]:
        """Re-read the file and apply it; returns what changed (logged too)."""
        if self.path is None:
            log.warning("SIGHUP: serving the embedded default, which has no config file to re-read")
            return []
        try:
            new = await self.service.in_thread(load_config, self.path)
            added = self._added_pairs(new)
            await self.service.in_thread(check_storage_dirs, dataclasses.replace(new, storage_pairs=added))
        except ConfigError as exc:
            log.error("config reload refused, the running config stays: %s", exc)
            return []
        changes = self._regex(new) + self._auth(new)
        for members in added:
            changes += await self._add_pair(members, new)
        waiting = sorted(key for key in KEYS - LIVE_KEYS if getattr(new, key) != getattr(self.config, key))
        if waiting:
            log.warning("config reload: %s changed; that takes effect at the next restart", ", ".join(waiting))
        log.info("config reloaded from %s: %s", self.path, "; ".join(changes) or "nothing to apply")
        return changes

    def _added_pairs(self, new: Config) -> tuple[tuple[str, ...], ...]:
        running = self.config.storage_pairs
        if new.storage_pairs[: len(running)] != running:
            raise ConfigError(
                "'storage_pairs': only pairs added at the end take effect without a restart "
                "(a running pair was changed, removed or moved)"
            )
        return new.storage_pairs[len(running) :]

    def _regex(self, new: Config) -> list[str]:
        if new.writable_pairs_regex == self.config.writable_pairs_regex:
            return []
        self.service.set_writable(lambda pair: new.pair_writable_by_regex(tuple(disk.root for disk in pair.members)))
        self.config = dataclasses.replace(self.config, writable_pairs_regex=new.writable_pairs_regex)
        writable = [str(pair.index) for pair in self.service.pairs if pair.writable]
        taking = ", ".join(writable) or "none"
        return [f"writable_pairs_regex is {new.writable_pairs_regex!r}: pairs taking writes: {taking}"]

    def _auth(self, new: Config) -> list[str]:
        changed = [key for key in CONFIG_KEYS if getattr(new, key) != getattr(self.config, key)]
        if not changed:
            return []
        self.authenticator.replace(lists_of(new))
        self.config = dataclasses.replace(self.config, **{key: getattr(new, key) for key in changed})
        said = []
        for key in changed:
            users = ", ".join(credential.user for credential in getattr(new, key))
            said.append(f"{key}: {_WHO[key]} {users}" if users else f"{key}: {_NOBODY[key]}")
        return said

    async def _add_pair(self, members: tuple[str, ...], new: Config) -> list[str]:
        index = len(self.service.pairs)
        pair = self.build_pair(new, index, members)
        try:
            await self.service.in_thread(self.service.add_pair, pair)
        except StorError as exc:
            log.error("config reload: pair %d (%s) not added: %s", index, ", ".join(members), exc)
            return []
        self.config = dataclasses.replace(self.config, storage_pairs=(*self.config.storage_pairs, members))
        return [f"pair {index} added ({', '.join(members)}){'' if pair.writable else ', taking no writes'}"]
