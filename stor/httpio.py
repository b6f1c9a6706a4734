"""HTTP plumbing shared by the route modules: request bodies with limits and an idle timeout,
and blob responses with ETag, Range and conditional requests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.types import Receive, Scope, Send

from stor.backends.disk import BlobStat
from stor.blobs import OpenBlob
from stor.digest import Sha, repr_digest
from stor.errors import BadRequest, ClientDisconnected, ClientTimeout, PayloadTooLarge
from stor.httpsemantics import RangeNotSatisfiable, http_date, not_modified, parse_range, range_applies

IMMUTABLE = "public, max-age=31536000, immutable"


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


async def request_body(request: Request, limit: int, idle_timeout: float) -> AsyncIterator[bytes]:
    """The request body, chunk by chunk, enforcing the size limit and the idle timeout."""
    total = 0
    request.state.body_done = False
    while True:
        try:
            async with asyncio.timeout(idle_timeout):  # half the cost of anyio.fail_after
                message = await request.receive()
        except TimeoutError:
            raise ClientTimeout(f"no body bytes received for {idle_timeout:g}s; upload abandoned") from None
        if message["type"] == "http.disconnect":
            request.state.body_done = True  # nothing to drain: the client is gone
            raise ClientDisconnected("client went away before the body was complete")
        chunk: bytes = message.get("body", b"")
        total += len(chunk)
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


def blob_headers(sha: Sha, stat: BlobStat, content_type: str) -> dict[str, str]:
    return {
        "ETag": f'"{sha}"',
        "Last-Modified": http_date(stat.mtime_ns),
        "Repr-Digest": repr_digest(sha),
        "Accept-Ranges": "bytes",
        "Cache-Control": IMMUTABLE,
        "Content-Type": content_type,
    }


def blob_response(
    asked: Headers, sha: Sha, stat: BlobStat, blob: OpenBlob | None, content_type: str = "application/octet-stream"
) -> Response:
    """HEAD (blob is None: a stat was all it took) or GET, with conditional requests and a
    single Range."""
    headers = blob_headers(sha, stat, content_type)
    etag = headers["ETag"]
    if not_modified(asked.get("if-none-match"), asked.get("if-modified-since"), etag, stat.mtime_ns):
        _close(blob)
        return Response(status_code=304, headers={k: headers[k] for k in ("ETag", "Last-Modified", "Cache-Control")})
    start, end, code = 0, stat.size, 200
    if range_applies(asked.get("if-range"), etag, stat.mtime_ns):
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
            headers["Content-Range"] = wanted.content_range(stat.size)
    headers["Content-Length"] = str(end - start)
    if blob is None:
        return Response(status_code=code, headers=headers)
    return BlobResponse(blob, start, end, code, headers)


Answer = tuple[int, list[tuple[bytes, bytes]], bytes]
"""A response whose bytes are all at hand: status, raw headers, body."""

_SHAPING = frozenset({b"range", b"if-range", b"if-none-match", b"if-modified-since"})
_FIXED = [
    (b"accept-ranges", b"bytes"),
    (b"cache-control", IMMUTABLE.encode()),
    (b"content-type", b"application/octet-stream"),
]


def plain_answer(asked: list[tuple[bytes, bytes]], sha: Sha, stat: BlobStat, data: bytes | None) -> Answer | None:
    """What `blob_response` answers to a GET (`data`: the whole blob) or HEAD (None) with
    none of the headers that shape the answer (Range, If-*), built without its generality;
    None when some such header was sent."""
    if any(name in _SHAPING for name, _ in asked):
        return None
    headers = [
        (b"etag", b'"' + sha.encode() + b'"'),
        (b"last-modified", http_date(stat.mtime_ns).encode()),
        (b"repr-digest", repr_digest(sha).encode()),
        *_FIXED,
        (b"content-length", str(stat.size).encode()),
    ]
    return 200, headers, b"" if data is None else data


def in_full(response: Response) -> Answer | None:
    """`response` as an `Answer`, or None when its body is still to be read (a stream)."""
    if isinstance(response, BlobResponse):
        if response.blob.data is None:
            return None
        return response.status_code, response.raw_headers, response.blob.data[response.start : response.end]
    return response.status_code, response.raw_headers, bytes(response.body)


def _close(blob: OpenBlob | None) -> None:
    if blob is not None:
        blob.close()


class BlobResponse(Response):
    """Streams [start, end) of an open copy; the bytes never sit whole in memory."""

    def __init__(self, blob: OpenBlob, start: int, end: int, status_code: int, headers: dict[str, str]) -> None:
        self.blob, self.start, self.end = blob, start, end
        self.status_code = status_code
        self.background = None
        self.raw_headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        if self.blob.data is not None:  # read already: one message
            await send({"type": "http.response.body", "body": self.blob.data[self.start : self.end]})
            return
        chunks = self.blob.chunks(self.start, self.end)
        try:
            async for chunk in chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await chunks.aclose()
            self.blob.close()
