"""HTTP plumbing shared by the route modules: request bodies with limits and an idle timeout,
and blob responses with ETag, Range and conditional requests."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.types import Receive, Scope, Send

from stor.digest import Sha, parse_sha, repr_digest
from stor.errors import (
    BadRequest,
    ClientDisconnected,
    ClientTimeout,
    InvalidDigest,
    PayloadTooLarge,
    StorError,
    UploadTooSlow,
)
from stor.http.semantics import (
    RangeNotSatisfiable,
    http_date,
    not_modified,
    parse_range,
    range_applies,
)
from stor.model import BlobStat
from stor.service.admission import Place
from stor.service.stream import DiskStream, OpenBlob

_IMMUTABLE = b"public, max-age=31536000, immutable"


async def limited(chunks: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    total = 0
    async for chunk in chunks:
        total += len(chunk)
        if total > limit:
            raise PayloadTooLarge(limit, mid_stream=True)
        yield chunk


def content_length(request: Request) -> int | None:
    value = request.headers.get("content-length")
    if value is None:
        return None
    if not value.isascii() or not value.isdigit():
        raise BadRequest(f"invalid Content-Length: {value!r}")
    return int(value)


@dataclass(frozen=True)
class BodyLimits:
    """How long an upload's body may stall (`body_idle_timeout`) and how slowly it may arrive
    (`min_upload_rate`, bytes/s; 0: no floor)."""

    idle_timeout: float
    min_rate: int = 0


RATE_GRACE_SECONDS = 20.0
"""A body is judged against `min_upload_rate` only after this long (Apache's `mod_reqtimeout`
`body=20,MinRate=500`): a client may start slowly."""


async def request_body(
    request: Request, limit: int, idle_timeout: float, min_rate: int = 0, place: Place | None = None
) -> AsyncIterator[bytes]:
    """The request body, chunk by chunk, enforcing the size limit, the idle timeout and (when
    `min_rate` is set) a floor on its average rate once `RATE_GRACE_SECONDS` have passed: a body
    that crawls below it is cut (`UploadTooSlow`, 408). `place`: the upload's place among the
    worker's uploads (see `admission`), told how many bytes arrived and able to cut the wait for
    them short to make room."""
    total = 0
    started = time.monotonic()
    request.state.body_done = False
    while True:
        wait, by_rate = idle_timeout, False
        if min_rate:
            behind = max(RATE_GRACE_SECONDS, total / min_rate) - (time.monotonic() - started)
            if behind < wait:  # nothing more by then: under the floor
                wait, by_rate = max(behind, 0.0), True
        try:
            async with asyncio.timeout(wait) as waiting:  # half the cost of anyio.fail_after
                if place is None:
                    message = await request.receive()
                else:
                    place.waiting = waiting
                    try:
                        message = await request.receive()
                    finally:
                        place.waiting = None
        except TimeoutError:
            elapsed = time.monotonic() - started
            if place is not None and place.evicted:
                place.cut()
                raise UploadTooSlow(
                    f"the body arrived slower than {min_rate} bytes/s ({total} bytes in {elapsed:.0f}s) while "
                    "other uploads waited for its place; upload cut"
                ) from None
            if by_rate:
                if place is not None:
                    place.cut()
                raise UploadTooSlow(
                    f"the body arrived slower than {min_rate} bytes/s ({total} bytes in {elapsed:.0f}s); upload cut"
                ) from None
            raise ClientTimeout(f"no body bytes received for {idle_timeout:g}s; upload abandoned") from None
        if message["type"] == "http.disconnect":
            request.state.body_done = True  # nothing to drain: the client is gone
            raise ClientDisconnected("client went away before the body was complete")
        chunk: bytes = message.get("body", b"")
        total += len(chunk)
        if place is not None:
            place.received = total
        if total > limit:
            raise PayloadTooLarge(limit, mid_stream=True)
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            request.state.body_done = True
            return


def close_if_body_unread(request: Request) -> dict[str, str]:
    """Answering before the body is read (exists, 4xx) leaves unread bytes on the connection,
    and an `Expect: 100-continue` client never sends them: either way, end the connection."""
    if request.method not in ("POST", "PUT") or getattr(request.state, "body_done", False):
        return {}
    if request.headers.get("content-length") == "0":
        return {}
    return {"Connection": "close"}


_OCTETS = "application/octet-stream"
_NOT_MODIFIED_KEEPS = frozenset({b"etag", b"last-modified", b"cache-control"})
_SHAPING = frozenset({b"range", b"if-range", b"if-none-match", b"if-modified-since"})


def blob_headers(sha: Sha, mtime_ns: int, content_type: str = _OCTETS) -> list[tuple[bytes, bytes]]:
    """The headers every answer about a blob carries, raw, as they go on the wire."""
    return [
        (b"etag", b'"' + sha.encode() + b'"'),
        (b"last-modified", http_date(mtime_ns).encode()),
        (b"repr-digest", repr_digest(sha).encode()),
        (b"accept-ranges", b"bytes"),
        (b"cache-control", _IMMUTABLE),
        (b"content-type", content_type.encode("latin-1")),
    ]


def blob_response(
    asked: Headers, sha: Sha, stat: BlobStat, blob: OpenBlob | None, content_type: str = _OCTETS
) -> Response:
    """HEAD (blob is None: a stat was all it took) or GET, with conditional requests and a
    single Range."""
    mtime = stat.mtime_ns
    headers = blob_headers(sha, mtime, content_type)
    etag = f'"{sha}"'
    if not_modified(asked.get("if-none-match"), asked.get("if-modified-since"), etag, mtime):
        _close(blob)
        return BlobResponse(304, [header for header in headers if header[0] in _NOT_MODIFIED_KEEPS])
    start, end, code = 0, stat.size, 200
    if range_applies(asked.get("if-range"), etag, mtime):
        try:
            wanted = parse_range(asked.get("range"), stat.size)
        except RangeNotSatisfiable:
            _close(blob)
            return PlainTextResponse(
                f"range not satisfiable for a blob of {stat.size} bytes\n",
                status_code=416,
                headers={"Content-Range": f"bytes */{stat.size}"},
            )
        if wanted is not None:
            start, end, code = wanted.start, wanted.end, 206
            headers.append((b"content-range", wanted.content_range(stat.size).encode()))
    headers.append((b"content-length", str(end - start).encode()))
    return BlobResponse(code, headers, blob, start, end)


Answer = tuple[int, list[tuple[bytes, bytes]], bytes]
"""A response whose bytes are all at hand: status, raw headers, body."""

SENDFILE = "stor.sendfile"
"""A scope key a server sets to a `SendFile` when it can send a file's bytes to the client
itself, zero-copy, after the response's start (`http.protocol`)."""

SendFile = Callable[[int, int, int], Awaitable[int]]
"""Send `count` bytes of the open file `fd` from `offset` as (part of) the response body; the
bytes sent (fewer: the client went away, and the server has ended the response)."""

HOT_TRIED = "stor.hot_tried"
"""A scope key a server sets when `answer_now` was asked and could not answer: the ordinary
path then goes straight to a worker thread instead of asking the kernel's caches again."""


def plain_answer(asked: list[tuple[bytes, bytes]], sha: Sha, stat: BlobStat, data: bytes | None) -> Answer | None:
    """What `blob_response` answers to a GET (`data`: the whole blob) or HEAD (None) with
    none of the headers that shape the answer (Range, If-*), without its generality; None
    when some such header was sent."""
    if any(name in _SHAPING for name, _ in asked):
        return None
    headers = [*blob_headers(sha, stat.mtime_ns), (b"content-length", str(stat.size).encode())]
    return 200, headers, b"" if data is None else data


def in_full(response: Response) -> Answer | None:
    """`response` as an `Answer`, or None when its body is still to be read (a stream)."""
    if isinstance(response, BlobResponse):
        if response.blob is None:
            return response.status_code, response.raw_headers, b""
        if response.blob.data is None:
            return None
        return response.status_code, response.raw_headers, response.blob.data[response.start : response.end]
    return response.status_code, response.raw_headers, bytes(response.body)


def _close(blob: OpenBlob | None) -> None:
    if blob is not None:
        blob.close()


class BlobResponse(Response):
    """An answer about a blob, with its raw headers: none (HEAD, 304) or [start, end) of an
    open copy, streamed (the bytes never sit whole in memory) unless read already; a copy
    verified whole goes by the server's `SENDFILE` when it offers one."""

    def __init__(
        self,
        status_code: int,
        raw_headers: list[tuple[bytes, bytes]],
        blob: OpenBlob | None = None,
        start: int = 0,
        end: int = 0,
    ) -> None:
        self.blob, self.start, self.end = blob, start, end
        self.status_code = status_code
        self.background = None
        self.raw_headers = raw_headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        if self.blob is None:
            await send({"type": "http.response.body", "body": b""})
            return
        if self.blob.data is not None:  # read already: one message
            await send({"type": "http.response.body", "body": self.blob.data[self.start : self.end]})
            return
        sendfile: SendFile | None = scope.get(SENDFILE)
        if sendfile is not None and isinstance(self.blob, DiskStream) and self.blob.zero_copy:
            try:
                await sendfile(self.blob.copy.fileno(), self.start, self.end - self.start)
            finally:
                self.blob.close()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        chunks = self.blob.chunks(self.start, self.end)
        try:
            async for chunk in chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await chunks.aclose()
            self.blob.close()


def sha_list(body: bytes, limit: int, too_many: Callable[[int], StorError]) -> list[Sha]:
    """A JSON array of shas: each validated (the error names the first bad entry), duplicates
    answered once; `too_many(count)` is raised past `limit` entries."""
    try:
        entries = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadRequest("the body must be a JSON array of sha256 strings") from None
    if not isinstance(entries, list):
        raise BadRequest("the body must be a JSON array of sha256 strings")
    if len(entries) > limit:
        raise too_many(len(entries))
    shas: dict[Sha, None] = {}
    for index, entry in enumerate(entries):
        if not isinstance(entry, str):
            raise BadRequest(f"entry {index} is not a string: {entry!r}"[:200])
        try:
            shas[parse_sha(entry)] = None
        except InvalidDigest as exc:
            raise BadRequest(f"entry {index}: {exc}") from None
    return list(shas)
