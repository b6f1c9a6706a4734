"""uvicorn's httptools protocol with the limits it lacks on a request's head, and stor's hot
path answered without an ASGI cycle.

uvicorn times out idle keep-alive connections and (through our app) stalled bodies, but not
a client that connects and sends its headers slowly or never finishes them: each such
connection would be held forever. Here the whole head must arrive within `head_timeout`
seconds (else 408 and close), and may not exceed `max_head_bytes` (else 431 and close).

A response body that the app hands over as an open file (`io.SENDFILE`: a large copy verified
already) goes from the page cache to the socket with `sendfile`, never through Python.

A GET or HEAD that the app can answer at once (`BlobRoutes.answer_now`: a hot blob) is answered
as soon as its head is parsed, with one write, instead of through a task, an ASGI cycle and
its messages, which cost several times what the answer itself does; and when its head
arrives whole in one read (as clients on kept-alive connections send it) without even the
parser's callbacks and uvicorn's per-request state: a quarter of a hot GET's CPU. Anything else (a body,
a request pipelined behind one still running, an escaped path, a cold blob) takes uvicorn's
ordinary path.

The only module that touches uvicorn's protocol internals.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import socket
from collections.abc import Callable
from typing import Any

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from stor.errors import ConfigError
from stor.http.io import HOT_TRIED, SENDFILE, Answer
from stor.http.sending import HeadHeldBack, send_bytes, send_file

AnswerNow = Callable[[str, str, list[tuple[bytes, bytes]], tuple[str, int] | None], Answer | None]
_BODY_HEADERS = (b"content-length", b"transfer-encoding")
_QUICK_STARTS = frozenset({b"GET /", b"HEAD "})
_QUICK_TARGET = re.compile(rb"/[0-9A-Fa-f]{64}")
_VERSIONS = frozenset({b"HTTP/1.1", b"HTTP/1.0"})
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
_QUICK_REFUSES = frozenset({b"content-length", b"transfer-encoding", b"upgrade", b"expect"})

MAX_HEAD_BYTES = 64 * 1024

TESTED_UVICORN = ("0.54", "0.55")
"""The uvicorn minor versions this subclass of its internal protocol was tested on (the suite
runs on the one pyproject.toml allows). Another may rename what it relies on."""


def check_uvicorn(version: str = uvicorn.__version__) -> None:
    """Refuse to serve with a uvicorn this module was not tested on, rather than misbehave."""
    minor = ".".join(version.split(".")[:2])
    if minor not in TESTED_UVICORN:
        raise ConfigError(
            f"uvicorn {version} is not a version stor's HTTP protocol was tested on "
            f"({', '.join(TESTED_UVICORN)}): install one of those, or serve with --server granian"
        )


class _HeadTooLarge(Exception):
    pass


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, head_timeout: float = 30.0, max_head_bytes: int = MAX_HEAD_BYTES, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.head_timeout = head_timeout
        self.max_head_bytes = max_head_bytes
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        self._head_too_large = False
        self._answer_now = _hot_path(self.app)
        self._answered = False
        self._between = True  # the parser is between requests (fed no part of one)
        self._asked = False  # `answer_now` was asked about the request being parsed, and could not
        self._answered_at = float("-inf")  # when the last answer given at once went out (loop time)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if (
            self._between
            and data[-4:] == b"\r\n\r\n"
            and data[:5] in _QUICK_STARTS
            and (self.cycle is None or self.cycle.response_complete)
            and self._answered_whole(data)
        ):
            return
        if self._head_timer is None and (self.cycle is None or self.cycle.response_complete):
            # the first bytes of the next request on a kept-alive connection (between requests
            # uvicorn's keep-alive timer watches the idle connection)
            self._arm()
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._between = False
        self._head_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._disarm()
        hot_tried = self._answered_now()
        if hot_tried is True:
            return
        if hot_tried is None:  # asked and could not answer: the app need not ask the caches again
            self.scope[HOT_TRIED] = True  # type: ignore[literal-required]
        super().on_headers_complete()
        if self.cycle is not None:
            self.cycle.transport = HeadHeldBack(self.transport, self.loop)  # type: ignore[assignment]
            self.scope[SENDFILE] = functools.partial(self._sendfile, self.cycle)  # type: ignore[literal-required]

    async def _sendfile(self, cycle: Any, fd: int, offset: int, count: int) -> int:
        """`io.SendFile` for the response of `cycle`: the head goes out first, then the file's
        bytes from the page cache, on a duplicate of the socket's fd (so it stays valid should
        the connection close meanwhile). The bytes sent; fewer than `count` only when the client
        went away or stopped reading (the connection is then closed: the client sees a short
        body, never a wrong one)."""
        if count > cycle.expected_content_length or cycle.response_complete:
            raise RuntimeError("sendfile: more than the response's Content-Length")
        head = cycle.transport.take_held()
        transport = self.transport
        while transport.get_write_buffer_size() and not transport.is_closing():
            await asyncio.sleep(0.001)  # an earlier response (rarely) still leaving
        sent = 0
        if not transport.is_closing():
            # a socket object over a duplicate of the connection's fd, closed when done
            with socket.socket(fileno=os.dup(transport.get_extra_info("socket").fileno())) as dup:
                try:
                    # corked, the head and the file leave in full segments, as nginx's tcp_nopush does
                    dup.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
                    if await send_bytes(self.loop, dup.fileno(), head) == len(head):
                        sent = await send_file(self.loop, dup.fileno(), fd, offset, count)
                finally:
                    with contextlib.suppress(OSError):
                        dup.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)
        cycle.expected_content_length -= sent
        if sent < count:
            cycle.disconnected = True  # the rest of the cycle's messages go nowhere
            transport.close()
        return sent

    def on_body(self, body: bytes) -> None:
        if not self._answered:
            super().on_body(body)

    def on_message_complete(self) -> None:
        self._between = True
        if self._answered:  # there is no cycle for it
            self._answered = False
            return
        super().on_message_complete()

    def _answered_whole(self, data: bytes) -> bool:
        """A GET or HEAD of a blob whose whole head, and nothing else, is `data` (what a client
        sends on a kept-alive connection), answered by the app at once without the parser's
        callbacks, uvicorn's per-request state or an ASGI cycle: True when answered. Anything
        the parser must judge (an odd request line or header, a body, an upgrade, a second
        request behind it) is left to it, as is a request the app could not answer (it is
        not asked again)."""
        if self._answer_now is None or self.limit_concurrency is not None or len(data) > self.max_head_bytes:
            return False
        lines = data[:-4].split(b"\r\n")
        request = lines[0].split(b" ")
        if len(request) != 3 or _QUICK_TARGET.fullmatch(request[1]) is None or request[2] not in _VERSIONS:
            return False
        keep_alive = request[2] == b"HTTP/1.1"
        headers = []
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or _TOKEN.fullmatch(name) is None:
                return False  # a malformed or folded header (or a second request): the parser's to judge
            name = name.lower()
            value = value.strip(b" \t")
            if name in _QUICK_REFUSES or _FIELD_VALUE.fullmatch(value) is None:
                return False
            if name == b"connection" and b"close" in value.lower():
                keep_alive = False
            headers.append((name, value))
        method = request[0].decode("ascii")
        answer = self._answer_now(method, request[1].decode("ascii"), headers, self.client)
        if answer is None:
            self._asked = True  # the parser's path goes straight to a worker thread
            return False
        self._send_answer(answer, with_body=method == "GET", keep_alive=keep_alive)
        self._disarm()
        return True

    def _answered_now(self) -> bool | None:
        """Answer the request whose head was just parsed, if the app can at once: True when
        it did, None when the app was asked and could not, False when it was not asked."""
        if self._asked:  # by `_answered_whole`, about this very request
            self._asked = False
            return None
        if self._answer_now is None or self.limit_concurrency is not None:
            return False
        if self.cycle is not None and not self.cycle.response_complete:
            return False  # pipelined behind a request still running: answers keep their order
        method = self.parser.get_method()
        if method not in (b"GET", b"HEAD") or self.parser.should_upgrade() or b"%" in self.url or b"?" in self.url:
            return False
        if any(name in _BODY_HEADERS for name, _ in self.headers):
            return False
        path = httptools.parse_url(self.url).path.decode("ascii")
        answer = self._answer_now(method.decode("ascii"), path, self.headers, self.client)
        if answer is None:
            return None
        keep_alive = self.parser.get_http_version() != "1.0" and self.parser.should_keep_alive()
        self._answered = True
        self._send_answer(answer, with_body=method == b"GET", keep_alive=keep_alive)
        return True

    def _send_answer(self, answer: Answer, *, with_body: bool, keep_alive: bool) -> None:
        """An answer the app gave at once, in one write, with the server's default headers."""
        status, headers, body = answer
        content = [STATUS_LINE[status]]
        for name, value in [*self.server_state.default_headers, *headers]:
            content.extend([name, b": ", value, b"\r\n"])
        if not keep_alive:
            content.append(b"connection: close\r\n")
        content.append(b"\r\n")
        if with_body:
            content.append(body)
        self.transport.write(b"".join(content))
        if not keep_alive:
            self.transport.close()
        self._answer_complete()

    def _answer_complete(self) -> None:
        """uvicorn's `on_response_complete` for an answer given at once (so with nothing
        pipelined behind it), but for the keep-alive timer: rather than cancelled and set again
        for every answer (a good part of a hot GET's cost), it is set once and, when it fires,
        set again for what is left if an answer was given meanwhile."""
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        self._answered_at = self.loop.time()
        if self.timeout_keep_alive_task is None:
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )

    def timeout_keep_alive_handler(self) -> None:
        idle = self.loop.time() - self._answered_at
        # answered at once since the timer was set: not idle that long yet
        if idle < self.timeout_keep_alive and not self.transport.is_closing():
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive - idle, self.timeout_keep_alive_handler
            )
            return
        super().timeout_keep_alive_handler()

    def send_400_response(self, msg: str) -> None:
        if self._head_too_large:
            self._reply_and_close(431, "Request Header Fields Too Large", "request head too large\n")
        else:
            super().send_400_response(msg)

    def _count(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > self.max_head_bytes:
            self._head_too_large = True
            raise _HeadTooLarge  # the parser stops; uvicorn answers through send_400_response

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self._reply_and_close(408, "Request Timeout", "request head not received in time\n")

    def _reply_and_close(self, status: int, reason: str, body: str) -> None:
        self.transport.write(
            f"HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n{body}".encode()
        )
        self.transport.close()


def _hot_path(app: Any) -> AnswerNow | None:
    """The app's `answer_now`, below the middleware uvicorn wraps it in (each has `.app`)."""
    for _ in range(8):
        answer = getattr(app, "answer_now", None)
        if answer is not None:
            return answer  # type: ignore[no-any-return]
        app = getattr(app, "app", None)
    return None
