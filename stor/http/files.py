"""Routes of the path-named API (sfss): POST /files, GET /files, GET/HEAD/PUT/DELETE /file."""

from __future__ import annotations

import mimetypes

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from stor.errors import BadRequest, PayloadTooLarge
from stor.http.auth import Authenticator
from stor.http.io import BodyLimits, blob_response, close_if_body_unread, content_length, limited, request_body
from stor.http.multipart import form_field, is_multipart
from stor.service import BlobService
from stor.service.namedfiles import NamedFiles, check_name

MAX_LISTING = 10_000
MULTIPART_SLACK = 64 * 1024
"""Room for the multipart envelope around a named file; the file itself gets the exact limit."""


def named_routes(
    service: BlobService,
    names: NamedFiles,
    authenticator: Authenticator,
    max_named_file_size: int,
    limits: BodyLimits,
) -> list[Route]:
    async def named_write(request: Request) -> Response:
        await authenticator.check(request.headers.get("authorization"))
        name = check_name(request.query_params.get("path"))
        content_type = request.headers.get("content-type")
        multipart = is_multipart(content_type)
        limit = max_named_file_size + (MULTIPART_SLACK if multipart else 0)
        length = content_length(request)
        if length is not None and length > limit:
            raise PayloadTooLarge(max_named_file_size, mid_stream=False)
        async with service.admitted(length) as place:  # a place among this worker's uploads, or 503 before the body
            body = request_body(request, limit, limits.idle_timeout, limits.min_rate, place)
            if multipart:
                body = limited(form_field(body, content_type or "", "upload_file"), max_named_file_size)
            created = await names.write(name, body, None if multipart else length, create=request.method == "POST")
        record = await names.get(name)
        answer = {"path": record.path, "sha": record.sha, "size": record.size}
        return JSONResponse(answer, status_code=201 if created else 200, headers=close_if_body_unread(request))

    async def named_read(request: Request) -> Response:
        await authenticator.check_read(request.headers.get("authorization"))
        record = await names.get(check_name(request.query_params.get("path")))
        content_type = mimetypes.guess_type(record.path)[0] or "application/octet-stream"
        if request.method == "HEAD":
            return blob_response(request.headers, record.sha, await service.stat(record.sha), None, content_type)
        blob = await service.open(record.sha)
        return blob_response(request.headers, record.sha, blob.stat, blob, content_type)

    async def named_delete(request: Request) -> Response:
        await authenticator.check(request.headers.get("authorization"))
        await names.delete(check_name(request.query_params.get("path")))
        return Response(status_code=204)

    async def named_list(request: Request) -> Response:
        await authenticator.check_read(request.headers.get("authorization"))
        params = request.query_params
        limit_text = params.get("limit", "1000")
        if not limit_text.isdigit() or not 1 <= int(limit_text) <= MAX_LISTING:
            raise BadRequest(f"'limit' must be a number from 1 to {MAX_LISTING}, got {limit_text!r}")
        limit = int(limit_text)
        records = await names.listing(params.get("prefix", ""), params.get("after", ""), limit)
        files = [{"path": r.path, "sha": r.sha, "size": r.size, "mtime": r.mtime} for r in records]
        return JSONResponse({"files": files, "next": files[-1]["path"] if len(files) == limit else None})

    return [
        Route("/files", named_write, methods=["POST"], name="files"),
        Route("/files", named_list, methods=["GET"], name="files"),
        Route("/file", named_read, methods=["GET"], name="file"),
        Route("/file", named_write, methods=["PUT"], name="file"),
        Route("/file", named_delete, methods=["DELETE"], name="file"),
    ]
