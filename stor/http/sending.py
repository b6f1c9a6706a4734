"""Sending a response's bytes from the event loop, below the transport: a head held back to
leave with the body's first part, and a file or bytes written straight to a non-blocking socket
(`sendfile` from the page cache), waiting for room between calls. Used by `http.protocol`."""

from __future__ import annotations

import asyncio
import os
from typing import Any

SEND_IDLE_TIMEOUT = 60.0
"""A `sendfile` that cannot send a byte for this long (the client stopped reading) gives up."""


class HeadHeldBack:
    """A response's transport that sends its head together with the first part of its body,
    in one `writev`, instead of one send for each: on loopback a send costs about as much as
    building a small response. A head with nothing after it in the same turn of the event
    loop (HEAD, 304, a body still being read) goes out at the end of that turn."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None
        self._first = True

    def write(self, data: bytes) -> None:
        if self._held is not None:
            held, self._held = self._held, None
            self._transport.writelines([held, data])
        elif self._first:
            self._first = False
            self._held = data
            self._loop.call_soon(self.flush)
        else:
            self._transport.write(data)

    def take_held(self) -> bytes:
        """The head held back, for the caller to send itself (nothing is held after)."""
        held, self._held = self._held, None
        return held or b""

    def flush(self) -> None:
        """Send the held head now."""
        if self._held is not None:
            held, self._held = self._held, None
            if not self._transport.is_closing():
                self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


async def send_file(loop: asyncio.AbstractEventLoop, sock: int, fd: int, offset: int, count: int) -> int:
    """`sendfile` on a non-blocking socket from the event loop, waiting for room in the socket
    between calls. The bytes sent: fewer when the peer is gone or stopped reading for
    `SEND_IDLE_TIMEOUT`, or the file ended early."""
    sent = 0
    while sent < count:
        try:
            done = os.sendfile(sock, fd, offset + sent, count - sent)
        except BlockingIOError:
            if not await _writable(loop, sock):
                break
            continue
        except OSError:  # EPIPE, ECONNRESET: the client went away
            break
        if done == 0:  # the file is shorter than it was
            break
        sent += done
    return sent


async def send_bytes(loop: asyncio.AbstractEventLoop, sock: int, data: bytes) -> int:
    """`data` written to a non-blocking socket from the event loop; the bytes written (fewer:
    see `send_file`)."""
    view = memoryview(data)
    sent = 0
    while sent < len(data):
        try:
            sent += os.write(sock, view[sent:])
        except BlockingIOError:
            if not await _writable(loop, sock):
                break
        except OSError:
            break
    return sent


async def _writable(loop: asyncio.AbstractEventLoop, sock: int) -> bool:
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(True)

    loop.add_writer(sock, wake)
    try:
        async with asyncio.timeout(SEND_IDLE_TIMEOUT):
            return await ready  # type: ignore[no-any-return]
    except TimeoutError:
        return False
    finally:
        loop.remove_writer(sock)
