"""HTTP transport: Starlette routes over a `BlobService`, and the one table of errors → status.

Nothing here touches a disk; it parses requests, streams bodies and shapes responses.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager

import anyio
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from stor import __version__
from stor.auth import Authenticator
from stor.backends.disk import BlobStat
from stor.digest import Sha, parse_sha, repr_digest
from stor.errors import (
    BadRequest,
    BlobLost,
    BlobNotFound,
    ClientDisconnected,
    ClientTimeout,
    DigestMismatch,
    InsufficientStorage,
    InvalidDigest,
    PayloadTooLarge,
    StorageUnavailable,
    StorError,
    Unauthorized,
)
from stor.httpsemantics import RangeNotSatisfiable, http_date, not_modified, parse_range, range_applies
from stor.metrics import Metrics
from stor.service import BlobService, OpenBlob

log = logging.getLogger(__name__)

ERROR_STATUS: dict[type[StorError], int] = {
    BadRequest: 400,
    Unauthorized: 401,
    BlobNotFound: 404,
    ClientTimeout: 408,
    DigestMismatch: 412,
    PayloadTooLarge: 413,
    StorageUnavailable: 503,
    BlobLost: 500,
    InsufficientStorage: 507,
    ClientDisconnected: 499,  # never reaches the client; keeps the access log honest
}

_IMMUTABLE = "public, max-age=31536000, immutable"


def create_app(
    service: BlobService,
    authenticator: Authenticator,
    *,
    max_upload_size: int,
    body_idle_timeout: float,
    metrics_text: Callable[[], tuple[bytes, str]] | None = None,
    lifespan: Callable[[Starlette], AbstractAsyncContextManager[None]] | None = None,
) -> Starlette:
    async def root(request: Request) -> Response:
        return PlainTextResponse(f"This is stor {__version__}")

    async def status(request: Request) -> Response:
        report = await service.status()
        code, headers = (200 if report.ok else 503), {"Cache-Control": "no-store"}
        if request.query_params.get("format") == "json" or "application/json" in request.headers.get("accept", ""):
            return JSONResponse(dataclasses.asdict(report), status_code=code, headers=headers)
        text = "OK\n" if report.ok else "".join(f"{reason}\n" for reason in report.reasons)
        return PlainTextResponse(text, status_code=code, headers=headers)

    async def metrics(request: Request) -> Response:
        if metrics_text is None:
            raise BlobNotFound("metrics")
        body, content_type = metrics_text()
        return Response(body, headers={"Content-Type": content_type, "Cache-Control": "no-store"})

    async def read_blob(request: Request) -> Response:
        try:
            sha = parse_sha(request.path_params["name"])
        except InvalidDigest:
            raise BlobNotFound(request.path_params["name"]) from None
        if request.method == "HEAD":
            return _blob_response(request, sha, await service.stat(sha), None)
        blob = await service.open(sha)
        return _blob_response(request, sha, blob.stat, blob)

    async def write_blob(request: Request) -> Response:
        authenticator.check(request.headers.get("authorization"))
        sha = parse_sha(request.path_params["name"])
        length = _content_length(request)
        if length is not None and length > max_upload_size:
            raise PayloadTooLarge(max_upload_size, mid_stream=False)
        body = _body(request, max_upload_size, body_idle_timeout)
        result = await service.put(sha, body, length)
        headers = _close_if_body_unread(request)
        return JSONResponse(result.paths, status_code=201 if result.created else 200, headers=headers)

    async def stat_many(request: Request) -> Response:
        length = _content_length(request)
        if length is not None and length > MAX_STAT_BODY:
            raise PayloadTooLarge(MAX_STAT_BODY, mid_stream=False)
        body = b"".join([chunk async for chunk in _body(request, MAX_STAT_BODY, body_idle_timeout)])
        shas = _sha_list(body)
        answers = await service.stat_many(shas)
        return JSONResponse({sha: None if info is None else dataclasses.asdict(info) for sha, info in answers.items()})

    async def bad_path(request: Request) -> Response:
        if request.method in ("POST", "PUT"):
            authenticator.check(request.headers.get("authorization"))
            raise InvalidDigest(request.url.path.lstrip("/"))
        raise BlobNotFound(request.url.path)

    async def stor_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StorError)
        code = next(code for kind, code in ERROR_STATUS.items() if isinstance(exc, kind))
        headers = _close_if_body_unread(request)
        if isinstance(exc, Unauthorized):
            headers["WWW-Authenticate"] = 'Basic realm="stor"'
        if code >= 500:
            log.warning("%s %s: %d %s", request.method, request.url.path, code, exc)
        return PlainTextResponse(f"{exc}\n", status_code=code, headers=headers)

    routes = [
        Route("/", root, methods=["GET"]),
        Route("/status", status, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/stat", stat_many, methods=["POST"]),
        Route("/{name}", read_blob, methods=["GET"]),  # HEAD too
        Route("/{name}", write_blob, methods=["POST", "PUT"]),
        Route("/{rest:path}", bad_path, methods=["GET", "POST", "PUT"]),
    ]
    return Starlette(
        routes=routes,
        exception_handlers={StorError: stor_error},
        middleware=[Middleware(RequestMetrics, metrics=service.metrics)],
        lifespan=lifespan,
    )


MAX_STAT_SHAS = 10_000
MAX_STAT_BODY = 2 * 1024 * 1024


def _sha_list(body: bytes) -> list[Sha]:
    """A JSON array of shas: each validated (the error names it), duplicates answered once."""
    try:
        entries = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadRequest("the body must be a JSON array of sha256 strings") from None
    if not isinstance(entries, list):
        raise BadRequest("the body must be a JSON array of sha256 strings")
    if len(entries) > MAX_STAT_SHAS:
        raise PayloadTooLarge(MAX_STAT_SHAS, mid_stream=False, unit="shas")
    shas: dict[Sha, None] = {}
    for index, entry in enumerate(entries):
        if not isinstance(entry, str):
            raise BadRequest(f"entry {index} is not a string: {entry!r}"[:200])
        try:
            shas[parse_sha(entry)] = None
        except InvalidDigest as exc:
            raise BadRequest(f"entry {index}: {exc}") from None
    return list(shas)


def _content_length(request: Request) -> int | None:
    value = request.headers.get("content-length")
    if value is None:
        return None
    if not value.isascii() or not value.isdigit():
        raise BadRequest(f"invalid Content-Length: {value!r}")
    return int(value)


async def _body(request: Request, limit: int, idle_timeout: float) -> AsyncIterator[bytes]:
    """The request body, chunk by chunk, enforcing the size limit and the idle timeout."""
    total = 0
    request.state.body_done = False
    while True:
        try:
            with anyio.fail_after(idle_timeout):
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


def _close_if_body_unread(request: Request) -> dict[str, str]:
    """Answering before the body is read (exists, 4xx) leaves unread bytes on the connection,
    and an `Expect: 100-continue` client never sends them: either way, end the connection."""
    if request.method not in ("POST", "PUT") or getattr(request.state, "body_done", False):
        return {}
    if request.headers.get("content-length") == "0":
        return {}
    return {"Connection": "close"}


def _blob_headers(sha: Sha, stat: BlobStat) -> dict[str, str]:
    return {
        "ETag": f'"{sha}"',
        "Last-Modified": http_date(stat.mtime_ns),
        "Repr-Digest": repr_digest(sha),
        "Accept-Ranges": "bytes",
        "Cache-Control": _IMMUTABLE,
        "Content-Type": "application/octet-stream",
    }


def _blob_response(request: Request, sha: Sha, stat: BlobStat, blob: OpenBlob | None) -> Response:
    """HEAD (blob is None: a stat was all it took) or GET, with conditional requests and a
    single Range."""
    headers = _blob_headers(sha, stat)
    etag = headers["ETag"]
    if not_modified(
        request.headers.get("if-none-match"), request.headers.get("if-modified-since"), etag, stat.mtime_ns
    ):
        _close(blob)
        return Response(status_code=304, headers={k: headers[k] for k in ("ETag", "Last-Modified", "Cache-Control")})
    start, end, code = 0, stat.size, 200
    if range_applies(request.headers.get("if-range"), etag, stat.mtime_ns):
        try:
            wanted = parse_range(request.headers.get("range"), stat.size)
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


class RequestMetrics:
    """Counts every request once: method, route, status, time and bytes each way."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status, bytes_in, bytes_out = 500, 0, 0

        async def counting_receive() -> Message:
            nonlocal bytes_in
            message = await receive()
            bytes_in += len(message.get("body", b""))
            return message

        async def counting_send(message: Message) -> None:
            nonlocal status, bytes_out
            if message["type"] == "http.response.start":
                status = message["status"]
            else:
                bytes_out += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, counting_receive, counting_send)
        finally:
            method, route = scope["method"], route_of(scope["path"])
            outcome = stor_outcome(method, route, status)
            self.metrics.request(method, outcome, route, status, time.perf_counter() - started, bytes_in, bytes_out)


def route_of(path: str) -> str:
    if path in _NAMED_ROUTES:
        return _NAMED_ROUTES[path]
    return "blob" if len(path) == 65 and _HEX.fullmatch(path, 1) else "other"


_HEX = re.compile(r"[0-9a-fA-F]{64}")
_NAMED_ROUTES = {"/": "root", "/status": "status", "/metrics": "metrics", "/stat": "stat"}

_OUTCOMES = {
    ("get", 200): "success.get.ok",
    ("get", 206): "success.get.ok",
    ("get", 304): "success.get.not_modified",
    ("get", 404): "error.get.not_found",
    ("get", 416): "error.get.range_not_satisfiable",
    ("get", 503): "error.get.unavailable",
    ("post", 201): "success.post.write",
    ("post", 200): "success.post.duplicate",
    ("post", 400): "error.post.malformed_sha",
    ("post", 401): "error.post.unauthorized",
    ("post", 408): "error.post.timeout",
    ("post", 412): "error.post.bad_sha",
    ("post", 413): "error.post.too_large",
    ("post", 503): "error.post.unavailable",
    ("post", 507): "error.post.no_space",
}


def stor_outcome(method: str, route: str, status: int) -> str:
    """Stor's statsd name for a blob request's result (PUT counts as post, HEAD as get)."""
    verb = {"GET": "get", "HEAD": "get", "POST": "post", "PUT": "post"}.get(method)
    if verb is None or route not in ("blob", "other"):
        return ""
    if route == "other" and status in (400, 404):
        return f"error.{verb}.malformed_sha"
    return _OUTCOMES.get((verb, status), f"error.{verb}.{'500' if status >= 500 else status}")
