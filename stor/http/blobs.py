"""The blob routes, `/<sha>`: GET and HEAD (answered from the hot path when they can be), POST
and PUT, and DELETE (an admin's takedown), in front of Starlette's router and middleware
(which cost about as much CPU as the read itself for a small blob). `StorApp` sends every
request for a sha path here, the first branch of its routing; a server that parses heads
itself (`http.protocol`) asks `answer_now` first, to answer a hot GET or HEAD without any ASGI
cycle at all. Every request for a sha path is counted here, once, whichever way it was
answered.
"""

from __future__ import annotations

import dataclasses

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from stor.digest import Sha, parse_sha
from stor.errors import BadRequest, PayloadTooLarge, StorError
from stor.http.accounting import SendCounter, is_sha_path
from stor.http.archives import Archives
from stor.http.auth import ADMINS, READERS, Authenticator
from stor.http.errors import error_answer, error_response
from stor.http.io import (
    HOT_TRIED,
    Answer,
    BodyLimits,
    blob_response,
    close_if_body_unread,
    content_length,
    in_full,
    plain_answer,
    request_body,
)
from stor.model import BlobStat
from stor.service import BlobService
from stor.service.stream import OpenBlob

Client = tuple[str, int] | None


class BlobRoutes:
    def __init__(
        self,
        service: BlobService,
        authenticator: Authenticator,
        *,
        max_upload_size: int,
        limits: BodyLimits,
        archives: Archives,
    ) -> None:
        self.service = service
        self.archives = archives
        self.authenticator = authenticator
        self.max_upload_size = max_upload_size
        self.limits = limits

    def answer_now(
        self, method: str, path: str, headers: list[tuple[bytes, bytes]], client: Client = None
    ) -> Answer | None:
        """GET or HEAD of `/<sha>` answered on the spot: when the blob's copy is kept open and,
        for a GET, small and in the page cache (see `HotPath`); a 404 too, when the kernel's
        caches prove the blob is absent everywhere. None: `__call__` answers."""
        if method not in ("GET", "HEAD") or not is_sha_path(path):
            return None
        counter = SendCounter()
        if not self.authenticator.reads_open:
            allowed = self.authenticator.check_now(_authorization(headers), READERS)
            if allowed is not True:
                return None  # refused, or a slow hash to verify: `__call__` answers
        sha = Sha(path[1:].lower())
        blob: OpenBlob | None = None
        stat: BlobStat | None = None
        try:
            if method == "HEAD":
                stat = self.service.stat_now(sha)
            else:
                blob = self.service.open_now(sha)
                stat = None if blob is None else blob.stat
            if stat is None:
                return None
            answer = plain_answer(headers, sha, stat, None if blob is None else blob.data)
            if answer is None:
                answer = in_full(blob_response(Headers(raw=headers), sha, stat, blob))
        except StorError as exc:  # a 404 the kernel's caches could prove
            answer = error_answer(exc) or in_full(error_response(exc, method, path, {}))
        if answer is None:
            return None
        self.service.requested(sha)
        counter.status, counter.sent = answer[0], 0 if method == "HEAD" else len(answer[2])
        counter.report(self.service.metrics, method, "blob", path, client, None if stat is None else stat.path)
        return answer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope["method"]
        counter = SendCounter(send, receive)
        source: str | None = None
        try:
            if method in ("GET", "HEAD"):
                response, source = await self._read(scope, method)
                scope = counter.counting_sendfile(scope)
            else:
                request = Request(scope, counter.receive)
                try:
                    response = await (self._take_down(request) if method == "DELETE" else self._write(request))
                except StorError as exc:
                    response = error_response(exc, method, scope["path"], close_if_body_unread(request))
            await response(scope, counter.receive, counter.send)
        finally:
            counter.report(self.service.metrics, method, "blob", scope["path"], scope.get("client"), source)

    async def _read(self, scope: Scope, method: str) -> tuple[Response, str | None]:
        """The answer to a GET or HEAD, and the path of the copy it comes from (None: none)."""
        sha = Sha(scope["path"][1:].lower())
        hot_tried = bool(scope.get(HOT_TRIED))
        try:
            await self.authenticator.check_read(Headers(scope=scope).get("authorization"))
            self.service.requested(sha)
            if b"format=zip" in scope.get("query_string", b""):  # the blob in a password-protected zip
                return await self.archives.one(sha, head=method == "HEAD"), None
            if method == "HEAD":
                stat = await self.service.stat(sha, hot_tried=hot_tried)
                return blob_response(Headers(scope=scope), sha, stat, None), stat.path
            blob = await self.service.open(sha, hot_tried=hot_tried)
            return blob_response(Headers(scope=scope), sha, blob.stat, blob), blob.stat.path
        except StorError as exc:
            return error_response(exc, method, scope["path"], {}), None

    async def _write(self, request: Request) -> Response:
        """POST or PUT: the body stored under the sha of the path, verified (see `Uploads.put`).
        An admin's upload of a blob taken down restores it."""
        authorization = request.headers.get("authorization")
        user = await self.authenticator.check(authorization)
        sha = parse_sha(request.url.path[1:])
        length = content_length(request)
        if length is not None and length > self.max_upload_size:
            raise PayloadTooLarge(self.max_upload_size, mid_stream=False)
        async with self.service.admitted(length) as place:  # a place (or 503 before the body)
            limits = self.limits
            body = request_body(request, self.max_upload_size, limits.idle_timeout, limits.min_rate, place)
            early = "100-continue" in request.headers.get("expect", "").lower()  # such a client waits for our word
            admin = self.authenticator.check_now(authorization, ADMINS) is True
            result = await self.service.put(sha, body, length, early_answer=early, restore_by=user if admin else None)
        headers = close_if_body_unread(request)
        return JSONResponse(result.paths, status_code=201 if result.created else 200, headers=headers)

    async def _take_down(self, request: Request) -> Response:
        """DELETE: an admin takes the blob down for good (see `takedown`); 200 with what was
        removed."""
        admin = await self.authenticator.check(request.headers.get("authorization"), ADMINS)
        sha = parse_sha(request.url.path[1:])
        reason = request.headers.get("x-stor-reason", "").strip()
        if not reason:
            raise BadRequest("a takedown needs its reason in the X-Stor-Reason header")
        report = await self.service.take_down(sha, admin, reason)
        return JSONResponse(dataclasses.asdict(report))


def _authorization(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name == b"authorization":
            return value.decode("latin-1")
    return None
