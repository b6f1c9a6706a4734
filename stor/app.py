"""HTTP transport: Starlette routes over a `BlobService`, and the one table of errors → status.

Nothing here touches a disk; it parses requests, streams bodies and shapes responses.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from stor import __version__
from stor.auth import Authenticator
from stor.blobs import OpenBlob
from stor.digest import Sha, parse_sha
from stor.errors import (
    BadRequest,
    BlobLost,
    BlobNotFound,
    ClientDisconnected,
    ClientTimeout,
    DigestMismatch,
    InsufficientStorage,
    InvalidDigest,
    NameExists,
    PayloadTooLarge,
    StorageUnavailable,
    StorError,
    Unauthorized,
)
from stor.httpio import (
    Answer,
    blob_response,
    close_if_body_unread,
    content_length,
    in_full,
    plain_answer,
    request_body,
)
from stor.metrics import Metrics
from stor.names import NamedFiles
from stor.names_http import named_routes
from stor.service import BlobService

log = logging.getLogger(__name__)

ERROR_STATUS: dict[type[StorError], int] = {
    BadRequest: 400,
    Unauthorized: 401,
    BlobNotFound: 404,
    ClientTimeout: 408,
    NameExists: 409,
    DigestMismatch: 412,
    PayloadTooLarge: 413,
    StorageUnavailable: 503,
    BlobLost: 500,
    InsufficientStorage: 507,
    ClientDisconnected: 499,  # never reaches the client; keeps the access log honest
}


def create_app(
    service: BlobService,
    authenticator: Authenticator,
    *,
    max_upload_size: int,
    body_idle_timeout: float,
    metrics_text: Callable[[], tuple[bytes, str]] | None = None,
    names: NamedFiles | None = None,
    max_named_file_size: int = 2 * 1024 * 1024,
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

    async def write_blob(request: Request) -> Response:
        authenticator.check(request.headers.get("authorization"))
        sha = parse_sha(request.path_params["name"])
        length = content_length(request)
        if length is not None and length > max_upload_size:
            raise PayloadTooLarge(max_upload_size, mid_stream=False)
        body = request_body(request, max_upload_size, body_idle_timeout)
        early = "100-continue" in request.headers.get("expect", "").lower()  # such a client waits for our word
        result = await service.put(sha, body, length, early_answer=early)
        headers = close_if_body_unread(request)
        return JSONResponse(result.paths, status_code=201 if result.created else 200, headers=headers)

    async def stat_many(request: Request) -> Response:
        length = content_length(request)
        if length is not None and length > MAX_STAT_BODY:
            raise PayloadTooLarge(MAX_STAT_BODY, mid_stream=False)
        body = b"".join([chunk async for chunk in request_body(request, MAX_STAT_BODY, body_idle_timeout)])
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
        return error_response(exc, request.method, request.url.path, close_if_body_unread(request))

    routes = [
        Route("/", root, methods=["GET"]),
        Route("/status", status, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/stat", stat_many, methods=["POST"]),
        *named_routes(service, names, authenticator, max_named_file_size, body_idle_timeout),
        Route("/{name}", write_blob, methods=["POST", "PUT"]),
        Route("/{rest:path}", bad_path, methods=["GET", "POST", "PUT"]),
    ]
    return StorApp(
        service,
        write_blob,
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


def error_response(exc: StorError, method: str, path: str, headers: dict[str, str]) -> Response:
    """The one table at work: a domain error as a status and a one-line explanation."""
    code = next(code for kind, code in ERROR_STATUS.items() if isinstance(exc, kind))
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = 'Basic realm="stor"'
    if code >= 500:
        log.warning("%s %s: %d %s", method, path, code, exc)
    return PlainTextResponse(f"{exc}\n", status_code=code, headers=headers)


class StorApp(Starlette):
    """Starlette, with the hot paths in front of it: GET, HEAD, POST and PUT of `/<sha>` are
    answered here, without the router and middleware layers (which cost about as much CPU as
    the read itself for a small blob). Everything else goes through the ordinary stack."""

    def __init__(self, service: BlobService, write: Callable[[Request], Awaitable[Response]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.service = service
        self.write = write

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and _is_sha_path(path):
            if scope["method"] in ("GET", "HEAD"):
                await self._read_blob(scope, receive, send)
                return
            if scope["method"] in ("POST", "PUT"):
                await self._write_blob(scope, receive, send)
                return
        await super().__call__(scope, receive, send)

    async def _write_blob(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The `write_blob` route, with what the stack around it does: errors mapped to
        status codes, the request counted."""
        started = time.perf_counter()
        counter = SendCounter(send, receive)
        request = Request({**scope, "path_params": {"name": scope["path"][1:]}}, counter.receive)
        try:
            try:
                response = await self.write(request)
            except StorError as exc:
                response = error_response(exc, scope["method"], scope["path"], close_if_body_unread(request))
            await response(scope, counter.receive, counter.send)
        finally:
            method, status = scope["method"], counter.status
            outcome = stor_outcome(method, "blob", status)
            self.service.metrics.request(
                method, outcome, "blob", status, time.perf_counter() - started, counter.received, counter.sent
            )

    def answer_now(self, method: str, path: str, headers: list[tuple[bytes, bytes]]) -> Answer | None:
        """GET or HEAD of `/<sha>` answered on the spot, for a server that can send it without
        an ASGI cycle (`httpserver`): when the blob's copy is kept open and, for a GET, small
        and in the page cache (see `BlobService.open_now`). None: the ordinary path answers.
        The same headers, status codes and metrics as `_read_blob`; a 404 too, when the
        kernel's caches prove the blob is absent everywhere (see `BlobService._kept`)."""
        if method not in ("GET", "HEAD") or not _is_sha_path(path):
            return None
        started = time.perf_counter()
        sha = Sha(path[1:].lower())
        blob: OpenBlob | None = None
        try:
            if method == "HEAD":
                blob, stat = None, self.service.stat_now(sha)
            else:
                blob = self.service.open_now(sha)
                stat = None if blob is None else blob.stat
            if stat is None:
                return None
            answer = plain_answer(headers, sha, stat, None if blob is None else blob.data)
            if answer is None:
                answer = in_full(blob_response(Headers(raw=headers), sha, stat, blob))
        except StorError as exc:  # a 404 the kernel's caches could prove
            answer = in_full(error_response(exc, method, path, {}))
        if answer is None:
            return None
        status, sent = answer[0], 0 if method == "HEAD" else len(answer[2])
        seconds = time.perf_counter() - started
        self.service.metrics.request(method, stor_outcome(method, "blob", status), "blob", status, seconds, 0, sent)
        return answer

    async def _read_blob(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        method = scope["method"]
        sha = Sha(scope["path"][1:].lower())
        counter = SendCounter(send)

        try:
            try:
                if method == "HEAD":
                    response = blob_response(Headers(scope=scope), sha, await self.service.stat(sha), None)
                else:
                    blob = await self.service.open(sha)
                    response = blob_response(Headers(scope=scope), sha, blob.stat, blob)
            except StorError as exc:
                response = error_response(exc, method, scope["path"], {})
            await response(scope, receive, counter.send)
        finally:
            seconds, status = time.perf_counter() - started, counter.status
            outcome = stor_outcome(method, "blob", status)
            self.service.metrics.request(method, outcome, "blob", status, seconds, 0, counter.sent)


def _is_sha_path(path: str) -> bool:
    return len(path) == 65 and _HEX.fullmatch(path, 1) is not None


class SendCounter:
    """Wraps an ASGI `send` to note the status and the body bytes that went out (and a
    `receive`, to count those that came in)."""

    def __init__(self, send: Send, receive: Receive | None = None) -> None:
        self._send = send
        self._receive = receive
        self.status = 500
        self.sent = 0
        self.received = 0

    async def receive(self) -> Message:
        assert self._receive is not None
        message = await self._receive()
        self.received += len(message.get("body", b""))
        return message

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        else:
            self.sent += len(message.get("body", b""))
        await self._send(message)


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
        counter = SendCounter(send, receive)
        try:
            await self.app(scope, counter.receive, counter.send)
        finally:
            method, route = scope["method"], route_of(scope["path"])
            outcome = stor_outcome(method, route, counter.status)
            self.metrics.request(
                method, outcome, route, counter.status, time.perf_counter() - started, counter.received, counter.sent
            )


def route_of(path: str) -> str:
    if path in _NAMED_ROUTES:
        return _NAMED_ROUTES[path]
    return "blob" if len(path) == 65 and _HEX.fullmatch(path, 1) else "other"


_HEX = re.compile(r"[0-9a-fA-F]{64}")
_NAMED_ROUTES = {
    "/": "root",
    "/status": "status",
    "/metrics": "metrics",
    "/stat": "stat",
    "/file": "file",
    "/files": "files",
}

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
