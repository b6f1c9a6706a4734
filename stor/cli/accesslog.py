"""Access lines written in batches: `stor serve`'s handler for `stor.access`, one per worker.

A request's line is formatted on the spot, to the byte as `cli.logs` formats a record (text:
`%(asctime)s %(message)s`; JSON: `JsonFormatter`), without a LogRecord, and appended to a
buffer. The buffer goes out in one `os.write` when it passes `max_bytes` (64 KiB), else `delay`
(0.1 s) after its first line, on a timer of the event loop that gave that line. The app's end
(`accounting.close_sink`, in the lifespan) and logging's shutdown at exit write what is held,
and every later line is written at once: a clean stop loses none. A worker that is killed or
crashes loses what it held: at most `delay` worth of lines.

Workers share stdout, so a write holds whole lines only: a regular file takes a batch in one
write (the kernel moves a shared offset atomically); a pipe, a socket or a terminal takes it in
writes of at most `PIPE_BUF` bytes, which the kernel never interleaves with another writer's
(a single line longer than that goes out alone, and may be).
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import stat
import sys
import time
from collections.abc import Callable
from json.encoder import encode_basestring_ascii as _quoted
from typing import Any

from stor.http import accounting

MAX_BYTES = 64 * 1024
DELAY = 0.1
_TEXT_LINE = "%s " + accounting.ACCESS_MESSAGE + "\n"
"""A text line: `%(asctime)s %(message)s` of `cli.logs`, from the time and the message's fields."""
_JSON_LINE = (
    '{"time": "%s", "level": "info", "logger": "stor.access", "message": %s, "method": %s, "path": %s, '
    '"status": %d, "bytes": %d, "duration_ms": %r, "remote": %s}\n'
)


class Clock:
    """`Formatter.formatTime` for a time in seconds, the date and time kept for the second."""

    def __init__(self, convert: Callable[[float], time.struct_time], datefmt: str, msec_format: str) -> None:
        self._convert = convert
        self._datefmt = datefmt
        self._msec_format = msec_format
        self._second = -1
        self._shown = ""
        self._milli = -1
        self._stamp = ""

    def __call__(self, now: float) -> str:
        second = int(now)
        milli = int((now - second) * 1000)
        if milli != self._milli or second != self._second:  # a busy worker logs many lines a millisecond
            if second != self._second:
                self._second, self._shown = second, time.strftime(self._datefmt, self._convert(now))
            self._milli, self._stamp = milli, self._msec_format % (self._shown, milli)
        return self._stamp


class AccessSink(logging.Handler):
    """A `logging.Handler` (for the records that still come through `logging`) and an
    `accounting.AccessSink` (for the requests' lines), writing both to `fd` in one order."""

    def __init__(self, fd: int = 1, json_lines: bool = False, max_bytes: int = MAX_BYTES, delay: float = DELAY):
        super().__init__()
        self.fd = fd
        self.json_lines = json_lines
        self.max_bytes = max_bytes
        self.delay = delay
        self._held: list[str] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._failed = False
        self._text_time = Clock(time.localtime, "%Y-%m-%d %H:%M:%S", "%s,%03d")
        self._json_time = Clock(time.gmtime, "%Y-%m-%dT%H:%M:%S", "%s.%03dZ")
        try:
            self._atomic = sys.maxsize if stat.S_ISREG(os.fstat(fd).st_mode) else select.PIPE_BUF
        except OSError:
            self._atomic = select.PIPE_BUF

    def line(self, remote: str, method: str, path: str, status: int, sent: int, duration_ms: float) -> None:
        now = time.time()
        if self.json_lines:
            message = accounting.ACCESS_MESSAGE % (remote, method, path, status, sent, duration_ms)
            fields = (_quoted(message), _quoted(method), _quoted(path), status, sent, duration_ms, _quoted(remote))
            self._add(_JSON_LINE % (self._json_time(now), *fields))
        else:
            self._add(_TEXT_LINE % (self._text_time(now), remote, method, path, status, sent, duration_ms))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._add(self.format(record) + "\n")
        except Exception:
            self.handleError(record)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]  # createLock made it
            lines, self._held, self._size = self._held, [], 0
            self._write(lines)

    def close(self) -> None:
        """Write what is held; every later line is written at once (the app has ended)."""
        accounting.remove_sink(self)
        with self.lock:  # type: ignore[union-attr]
            self._closed = True
        self.flush()
        super().close()

    def _add(self, text: str) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._held.append(text)
            self._size += len(text)
            if self._size >= self.max_bytes or self._closed:
                self.flush()
            elif self._timer is None:
                try:
                    self._timer = asyncio.get_running_loop().call_later(self.delay, self._due)
                except RuntimeError:  # not on an event loop: no timer to wait for
                    self.flush()

    def _due(self) -> None:
        self._timer = None
        self.flush()

    def _write(self, lines: list[str]) -> None:
        """`lines` to `fd`, in writes of whole lines that no other writer can split."""
        if self._atomic == sys.maxsize:
            self._write_all("".join(lines).encode("utf-8", "backslashreplace"))
            return
        chunk: list[bytes] = []
        size = 0
        for text in lines:
            data = text.encode("utf-8", "backslashreplace")
            if chunk and size + len(data) > self._atomic:
                self._write_all(b"".join(chunk))
                chunk, size = [], 0
            chunk.append(data)
            size += len(data)
        if chunk:
            self._write_all(b"".join(chunk))

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError as exc:  # stdout gone (a closed pipe): say so once, never fail a request
            if not self._failed:
                self._failed = True
                sys.stderr.write(f"stor: access lines lost: cannot write to fd {self.fd}: {exc}\n")


def access_sink(fd: int = 1, json_lines: bool = False, **options: Any) -> AccessSink:
    """The handler `cli.logs` names for `stor.access` (built by `dictConfig` in each worker):
    this process's access lines go to it from now on."""
    sink = AccessSink(fd, json_lines, **options)
    accounting.install_sink(sink)
    return sink
