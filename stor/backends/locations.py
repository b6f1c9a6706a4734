"""Where blobs live, remembered in memcached: a hint, never the truth.

The only module that imports `pymemcache`. Contract:
- `get` returns the storage root that held the blob, `ABSENT` for a short-lived "not stored"
  entry, or None. Callers verify a root with one `stat` and treat a wrong one as a miss.
- Any cache failure (dead, hung, refused) raises `CacheUnavailable`, after at most the
  configured timeout. After `failures_to_open` failures in a row the breaker opens and every
  call raises at once for `cooldown` seconds, so a dead cache costs no timeout per request.
- Safe to call from several threads (a pooled client; the breaker holds a lock).
- `close` waits for the calls still running (each bounded by the timeout), then closes every
  connection; calls after it raise `CacheUnavailable`. (A call still running when the pool is
  cleared would reconnect, and its socket would be left to the garbage collector.)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Final, Protocol

from pymemcache.client.hash import HashClient

from stor.digest import Sha

ABSENT: Final = "-"


class CacheUnavailable(Exception):
    """The cache could not be asked; count it and carry on as if it had missed."""


class LocationCache(Protocol):
    def get(self, sha: Sha) -> str | None: ...

    def remember(self, sha: Sha, root: str) -> None: ...

    def remember_absent(self, sha: Sha) -> None: ...

    def forget(self, sha: Sha) -> None: ...

    def reachable(self) -> bool | None:
        """True/False for a configured cache, None when there is none."""
        ...

    def close(self) -> None: ...


class Breaker:
    """Opens after `threshold` failures in a row; lets one call through after `cooldown`."""

    def __init__(self, threshold: int, cooldown: float) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self._failures = 0
        self._open_until = 0.0
        self._lock = threading.Lock()

    def allow(self) -> bool:
        with self._lock:
            return time.monotonic() >= self._open_until

    def success(self) -> None:
        with self._lock:
            self._failures = 0

    def close(self) -> None:
        with self._lock:
            self._failures = 0
            self._open_until = 0.0

    def failure(self) -> None:
        with self._lock:
            self._failures += 1
            if self._failures >= self.threshold:
                self._open_until = time.monotonic() + self.cooldown


class MemcachedLocations:
    def __init__(
        self,
        servers: tuple[tuple[str, int], ...],
        *,
        timeout: float,
        ttl: int,
        negative_ttl: int,
        failures_to_open: int = 3,
        cooldown: float = 5.0,
    ) -> None:
        self._client = HashClient(
            list(servers),
            connect_timeout=timeout,
            timeout=timeout,
            use_pooling=True,
            max_pool_size=64,
            key_prefix=b"stor:",
            retry_attempts=1,
            retry_timeout=0,
            dead_timeout=1.0,  # a dead server leaves the hash ring briefly; the breaker guards requests
            ignore_exc=False,
            default_noreply=False,
        )
        self.timeout = timeout
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.breaker = Breaker(failures_to_open, cooldown)
        self._running = 0
        self._closed = False
        self._quiet = threading.Condition()

    def get(self, sha: Sha) -> str | None:
        value = self._call(self._client.get, sha)
        return value.decode() if isinstance(value, bytes) else None

    def remember(self, sha: Sha, root: str) -> None:
        self._call(self._client.set, sha, root.encode(), self.ttl)

    def remember_absent(self, sha: Sha) -> None:
        if self.negative_ttl:
            # add, not set: never overwrite a location another process just stored
            self._call(self._client.add, sha, ABSENT.encode(), self.negative_ttl)

    def forget(self, sha: Sha) -> None:
        self._call(self._client.delete, sha)

    def reachable(self) -> bool | None:
        """Asks memcached even while the breaker is open (one call, bounded by the timeout),
        and closes the breaker when it answers: recovery is noticed at the next check."""
        try:
            self._running_call(self._client.get, "stor-status-probe")
        except Exception:  # see _call
            return False
        self.breaker.close()
        return True

    def close(self) -> None:
        with self._quiet:
            self._closed = True
            self._quiet.wait_for(lambda: self._running == 0, timeout=self.timeout * 2 + 1)
        self._client.close()

    def _call(self, method: Callable[..., object], *args: object) -> object:
        if not self.breaker.allow():
            raise CacheUnavailable("memcached circuit breaker is open")
        try:
            result = self._running_call(method, *args)
        except CacheUnavailable:
            raise
        except Exception as exc:
            # A dead server raises MemcacheError or OSError. HashClient's bookkeeping of dead
            # servers is not thread-safe either: two threads failing at once can raise
            # KeyError from inside it. The cache is a hint, so any failure is just a miss.
            self.breaker.failure()
            raise CacheUnavailable(f"memcached: {exc!r}") from exc
        self.breaker.success()
        return result

    def _running_call(self, method: Callable[..., object], *args: object) -> object:
        """`method(*args)`, counted so that `close` can wait for it."""
        with self._quiet:
            if self._closed:
                raise CacheUnavailable("memcached client is closed")
            self._running += 1
        try:
            return method(*args)
        finally:
            with self._quiet:
                self._running -= 1
                self._quiet.notify_all()
