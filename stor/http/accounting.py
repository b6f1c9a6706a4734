"""Every request counted once: method, route, status, time and bytes each way; and logged
once on `stor.access` (at INFO) with `method`, `path`, `status`, `bytes`, `duration_ms` and
`remote` as fields (`stor serve --log-format json` prints them as such).

`RequestMetrics` wraps the ordinary ASGI stack; the blob routes (`http.blobs`), in front of it,
count theirs with the same `SendCounter.report`, whichever way they were answered.

A LogRecord per request costs a hot GET a good part of its time, so the application (the CLI, in
each worker) may install an `AccessSink` that takes the line's fields directly and writes lines
in batches; without one, the line is an ordinary `logging` call.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Protocol

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from stor.http.io import SENDFILE, SendFile
from stor.metrics import Metrics

_SHA_PATH = re.compile(r"/[0-9a-fA-F]{64}")
ACCESS = logging.getLogger("stor.access")
ACCESS_MESSAGE = '%s "%s %s" %d %d %.1fms'
"""An access line's message, from (remote, method, path, status, bytes, duration_ms)."""


class AccessSink(Protocol):
    """Where access lines go instead of a `logging` call. `line` is called once per request,
    on the event loop, and must not wait on I/O; `close` writes whatever is held back."""

    def line(self, remote: str, method: str, path: str, status: int, sent: int, duration_ms: float) -> None: ...

    def close(self) -> None: ...


_sink: AccessSink | None = None


def install_sink(sink: AccessSink) -> None:
    """Send this process's access lines to `sink`. It still only gets the lines `stor.access`
    enables at INFO."""
    global _sink  # noqa: PLW0603  # one per process, as the logger it stands in for
    _sink = sink


def remove_sink(sink: AccessSink) -> None:
    """Back to `logging`, if `sink` is the one installed."""
    global _sink  # noqa: PLW0603
    if _sink is sink:
        _sink = None


def close_sink() -> None:
    """At the app's end: write the access lines held back, so a clean stop loses none."""
    if _sink is not None:
        _sink.close()


def access(method: str, path: str, status: int, sent: int, seconds: float, client: tuple[str, int] | None) -> None:
    """One access line (when INFO is on for `stor.access`: formatting costs a hot GET's time)."""
    if ACCESS.isEnabledFor(logging.INFO):
        remote = f"{client[0]}:{client[1]}" if client else "-"  # the peer: no proxy headers here
        duration_ms = round(seconds * 1000, 3)
        if _sink is not None:
            _sink.line(remote, method, path, status, sent, duration_ms)
            return
        fields = {"method": method, "path": path, "status": status, "bytes": sent, "duration_ms": duration_ms}
        ACCESS.info(
            ACCESS_MESSAGE,
            remote,
            method,
            path,
            status,
            sent,
            duration_ms,
            extra={**fields, "remote": remote},
        )


def is_sha_path(path: str) -> bool:
    return len(path) == 65 and _SHA_PATH.fullmatch(path) is not None


class SendCounter:
    """Wraps an ASGI `send` to note the status and the body bytes that went out (and a
    `receive`, to count those that came in)."""

    def __init__(self, send: Send | None = None, receive: Receive | None = None) -> None:
        self._send = send
        self._receive = receive
        self.started = time.perf_counter()
        self.status = 500
        self.sent = 0
        self.received = 0

    async def receive(self) -> Message:
        assert self._receive is not None
        message = await self._receive()
        self.received += len(message.get("body", b""))
        return message

    async def send(self, message: Message) -> None:
        assert self._send is not None
        if message["type"] == "http.response.start":
            self.status = message["status"]
        else:
            self.sent += len(message.get("body", b""))
        await self._send(message)

    def counting_sendfile(self, scope: Scope) -> Scope:
        """`scope`, with the bytes its server's `SENDFILE` (if any) sends counted too."""
        sendfile: SendFile | None = scope.get(SENDFILE)
        if sendfile is None:
            return scope

        async def counted(fd: int, offset: int, count: int) -> int:
            sent = await sendfile(fd, offset, count)
            self.sent += sent
            return sent

        return {**scope, SENDFILE: counted}

    def report(
        self,
        metrics: Metrics,
        method: str,
        route: str,
        path: str | None = None,
        client: tuple[str, int] | None = None,
        source: str | None = None,
    ) -> None:
        """Count the request (`source`: the path of the copy that answered); log it too, given
        its `path`."""
        seconds = time.perf_counter() - self.started
        metrics.request(method, route, self.status, seconds, self.received, self.sent, source)
        if path is not None:
            access(method, path, self.status, self.sent, seconds, client)


class RequestMetrics:
    """ASGI middleware: counts every request under its route's name (`routes`: path → name;
    a sha path, for a method the blob routes do not take, is `blob`; anything else `other`)."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: dict[str, str]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        counter = SendCounter(send, receive)
        try:
            await self.app(scope, counter.receive, counter.send)
        finally:
            counter.report(
                self.metrics,
                scope["method"],
                self.routes.get(scope["path"], "other"),
                scope["path"],
                scope.get("client"),
            )
