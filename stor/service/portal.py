"""A blocking door into the service, for tools (`stor import`, `stor scrub --repair`).

An event loop runs in a thread of its own and the tool's thread waits for each coroutine it
hands over, so tools store blobs through the same upload pipeline as the server (group
commit, reservations, the S3 queue) instead of a write path of their own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from concurrent.futures import Future
from types import TracebackType
from typing import Any, TypeVar

from stor.threads import start_thread

T = TypeVar("T")

CLOSE_TIMEOUT = 30.0
"""Seconds `close` waits for work still running (an interrupted upload's cleanup)."""


class Portal:
    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = start_thread(self._loop.run_forever, "stor-portal")

    def call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run `coroutine` on the portal's loop and wait for its result. When the wait is
        interrupted (Ctrl-C), the coroutine is cancelled: it cleans up as on a server."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> Future[T]:
        """Start `coroutine` on the portal's loop; its future, to wait for later (or cancel)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def close(self) -> None:
        """Let running work finish its cleanup, then stop the loop."""
        settled = asyncio.run_coroutine_threadsafe(_others_done(), self._loop)
        try:
            settled.result(CLOSE_TIMEOUT)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(CLOSE_TIMEOUT)
            if not self._thread.is_alive():
                self._loop.close()

    def __enter__(self) -> Portal:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


async def _others_done() -> None:
    current = asyncio.current_task()
    others = [task for task in asyncio.all_tasks() if task is not current]
    if others:
        await asyncio.wait(others)
