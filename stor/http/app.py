"""HTTP routes over a `BlobService`: parse requests, stream bodies, shape responses.

Nothing here touches a disk or a backend. Domain errors become status codes in one table
(`http.errors`). `StorApp` is the one door: a sha path goes to the blob routes (`http.blobs`),
its first branch, in front of Starlette's router and middleware; everything else goes through
them, counted by `RequestMetrics`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from stor import __version__
from stor.errors import BlobNotFound, InvalidDigest, PayloadTooLarge, StorError
from stor.http.accounting import RequestMetrics, is_sha_path
from stor.http.archives import Archives, ArchiveSettings, archive_routes
from stor.http.auth import ADMINS, METRICS_READERS, WRITERS, Authenticator, Role
from stor.http.blobs import BlobRoutes
from stor.http.errors import error_response
from stor.http.files import named_routes
from stor.http.io import BodyLimits, close_if_body_unread, content_length, request_body, sha_list
from stor.http.lfs import lfs_routes
from stor.model import StatusReport
from stor.service import BlobService
from stor.service.namedfiles import NamedFiles

MAX_STAT_SHAS = 10_000
DEFAULT_ARCHIVES = ArchiveSettings(b"infected", 1000)
MAX_STAT_BODY = 2 * 1024 * 1024


def create_app(
    service: BlobService,
    authenticator: Authenticator,
    *,
    max_upload_size: int,
    body_idle_timeout: float,
    names: NamedFiles,
    min_upload_rate: int = 0,
    archive: ArchiveSettings = DEFAULT_ARCHIVES,
    metrics_text: Callable[[], tuple[bytes, str]] | None = None,
    max_named_file_size: int = 2 * 1024 * 1024,
    lifespan: Callable[[Starlette], AbstractAsyncContextManager[None]] | None = None,
) -> Starlette:
    limits = BodyLimits(body_idle_timeout, min_upload_rate)
    archives = Archives(service, archive)

    async def root(request: Request) -> Response:
        return PlainTextResponse(f"This is stor {__version__}\n")

    async def status(request: Request) -> Response:
        """Stor's meaning, for alerting: 503 as soon as any storage directory is unavailable."""
        report = await service.status()
        return _health_answer(request, report, report.ok, report.reasons)

    async def readyz(request: Request) -> Response:
        """For load balancers: 503 only when some pair has no readable member (a degraded pair,
        one member down, still serves); `?writes=1` also when no pair takes writes."""
        report = await service.status()
        reasons = list(report.ready_reasons)
        if request.query_params.get("writes") in ("1", "true", "yes") and not report.writable:
            reasons.append("no pair takes writes")
        return _health_answer(request, report, not reasons, reasons)

    async def healthz(request: Request) -> Response:
        """Liveness: the process answers. Touches no disk."""
        return PlainTextResponse("OK\n", headers={"Cache-Control": "no-store"})

    async def metrics(request: Request) -> Response:
        if authenticator.enabled(Role.METRICS):
            await authenticator.check(request.headers.get("authorization"), METRICS_READERS)
        if metrics_text is None:
            raise BlobNotFound("metrics")
        body, content_type = metrics_text()
        return Response(body, headers={"Content-Type": content_type, "Cache-Control": "no-store"})

    async def stat_many(request: Request) -> Response:
        await authenticator.check_read(request.headers.get("authorization"))
        length = content_length(request)
        if length is not None and length > MAX_STAT_BODY:
            raise PayloadTooLarge(MAX_STAT_BODY, mid_stream=False)
        body = b"".join([chunk async for chunk in request_body(request, MAX_STAT_BODY, body_idle_timeout)])
        shas = sha_list(
            body, MAX_STAT_SHAS, lambda count: PayloadTooLarge(MAX_STAT_SHAS, mid_stream=False, unit="shas")
        )
        answers = await service.stat_many(shas)
        return JSONResponse({sha: None if info is None else dataclasses.asdict(info) for sha, info in answers.items()})

    async def bad_path(request: Request) -> Response:
        """Not a sha: a write or a takedown is a 400 (once its credentials pass), a read a 404."""
        if request.method in ("POST", "PUT", "DELETE"):
            allowed = ADMINS if request.method == "DELETE" else WRITERS
            await authenticator.check(request.headers.get("authorization"), allowed)
            raise InvalidDigest(request.url.path.lstrip("/"))
        await authenticator.check_read(request.headers.get("authorization"))
        raise BlobNotFound(request.url.path)

    async def stor_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StorError)
        return error_response(exc, request.method, request.url.path, close_if_body_unread(request))

    routes = [
        Route("/", root, methods=["GET"], name="root"),
        Route("/status", status, methods=["GET"], name="status"),
        Route("/readyz", readyz, methods=["GET"], name="readyz"),
        Route("/healthz", healthz, methods=["GET"], name="healthz"),
        Route("/metrics", metrics, methods=["GET"], name="metrics"),
        Route("/stat", stat_many, methods=["POST"], name="stat"),
        *named_routes(service, names, authenticator, max_named_file_size, limits),
        *lfs_routes(service, authenticator, limits),
        *archive_routes(service, authenticator, archives, limits),
        Route("/{rest:path}", bad_path, methods=["GET", "POST", "PUT", "DELETE"]),
    ]
    route_names = {route.path: route.name for route in routes if "{" not in route.path}
    blobs = BlobRoutes(service, authenticator, max_upload_size=max_upload_size, limits=limits, archives=archives)
    return StorApp(
        blobs,
        routes=routes,
        exception_handlers={StorError: stor_error},
        middleware=[Middleware(RequestMetrics, metrics=service.metrics, routes=route_names)],
        lifespan=lifespan,
    )


class StorApp(Starlette):
    """Starlette, with the blob routes as the first branch of its routing."""

    def __init__(self, blobs: BlobRoutes, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.blobs = blobs
        self.service = blobs.service
        self.answer_now = blobs.answer_now

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and is_sha_path(scope.get("path", "")) and scope["method"] in _BLOB_METHODS:
            await self.blobs(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


_BLOB_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE"})


def _health_answer(request: Request, report: StatusReport, ok: bool, reasons: list[str]) -> Response:
    """200 or 503, as plain text (`OK`, or the reasons) or, asked for, the whole report in JSON."""
    code, headers = (200 if ok else 503), {"Cache-Control": "no-store"}
    if request.query_params.get("format") == "json" or "application/json" in request.headers.get("accept", ""):
        return JSONResponse(dataclasses.asdict(report), status_code=code, headers=headers)
    text = "OK\n" if ok else "".join(f"{reason}\n" for reason in reasons)
    return PlainTextResponse(text, status_code=code, headers=headers)
