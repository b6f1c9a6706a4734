"""The fast paths: GET, HEAD, POST and PUT of `/<sha>` answered in front of Starlette's router
and middleware (which cost about as much CPU as the read itself for a small blob), and
`answer_now`, which a server (`http.protocol`) calls to answer a hot GET or HEAD without any
ASGI cycle at all. The same headers, status codes, errors and metrics as the ordinary stack;
everything else goes through it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from stor.digest import Sha
from stor.errors import StorError
from stor.http.accounting import SendCounter, is_sha_path
from stor.http.errors import error_response
from stor.http.io import HOT_TRIED, Answer, blob_response, close_if_body_unread, in_full, plain_answer
from stor.service import BlobService
from stor.service.stream import OpenBlob


class StorApp(Starlette):
    def __init__(self, service: BlobService, write: Callable[[Request], Awaitable[Response]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.service = service
        self.write = write

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and is_sha_path(scope.get("path", "")):
            if scope["method"] in ("GET", "HEAD"):
                await self._read_blob(scope, receive, send)
                return
            if scope["method"] in ("POST", "PUT"):
                await self._write_blob(scope, receive, send)
                return
        await super().__call__(scope, receive, send)

    def answer_now(self, method: str, path: str, headers: list[tuple[bytes, bytes]]) -> Answer | None:
        """GET or HEAD of `/<sha>` answered on the spot: when the blob's copy is kept open and,
        for a GET, small and in the page cache (see `HotPath`); a 404 too, when the kernel's
        caches prove the blob is absent everywhere. None: the ordinary path answers."""
        if method not in ("GET", "HEAD") or not is_sha_path(path):
            return None
        counter = SendCounter()
        sha = Sha(path[1:].lower())
        blob: OpenBlob | None = None
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
            answer = in_full(error_response(exc, method, path, {}))
        if answer is None:
            return None
        counter.status, counter.sent = answer[0], 0 if method == "HEAD" else len(answer[2])
        counter.report(self.service.metrics, method, "blob")
        return answer

    async def _read_blob(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope["method"]
        sha = Sha(scope["path"][1:].lower())
        counter = SendCounter(send)
        hot_tried = bool(scope.get(HOT_TRIED))
        try:
            try:
                if method == "HEAD":
                    stat = await self.service.stat(sha, hot_tried=hot_tried)
                    response = blob_response(Headers(scope=scope), sha, stat, None)
                else:
                    blob = await self.service.open(sha, hot_tried=hot_tried)
                    response = blob_response(Headers(scope=scope), sha, blob.stat, blob)
            except StorError as exc:
                response = error_response(exc, method, scope["path"], {})
            await response(counter.counting_sendfile(scope), receive, counter.send)
        finally:
            counter.report(self.service.metrics, method, "blob", scope)

    async def _write_blob(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The `write_blob` route, with what the stack around it does: errors mapped to
        status codes, the request counted."""
        counter = SendCounter(send, receive)
        request = Request({**scope, "path_params": {"name": scope["path"][1:]}}, counter.receive)
        try:
            try:
                response = await self.write(request)
            except StorError as exc:
                response = error_response(exc, scope["method"], scope["path"], close_if_body_unread(request))
            await response(scope, counter.receive, counter.send)
        finally:
            counter.report(self.service.metrics, scope["method"], "blob", scope)
