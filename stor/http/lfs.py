"""The git-lfs Batch API (basic transfer) at `/lfs`, so `git config lfs.url http://<stor>/lfs` is
all a repository needs: git-lfs names every object by the SHA-256 of its content, as stor does.

`POST /lfs/objects/batch` answers, per object, where to get it (`download`: `GET /{oid}`) or
where to put it (`upload`: `PUT /{oid}`, only for objects the store lacks), both stor's own
routes, so uploads are verified and durable like any other; per-object errors as the spec
says (404 unknown, 410 taken down, 422 a bad oid or a size that disagrees with the stored
blob). `POST /lfs/locks/verify` answers an empty list, so `git push` runs without warnings
(stor keeps no locks). Credentials: an upload batch needs a writer's (or an admin's), a
download batch a reader's when `read_auth` is set; git-lfs sends them after a 401, from the
git credential helper, to this endpoint and to the action hrefs alike.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from stor.digest import Sha, parse_sha
from stor.errors import InvalidDigest, PayloadTooLarge
from stor.http.auth import WRITERS, Authenticator
from stor.http.io import BodyLimits, content_length, request_body
from stor.service import BlobService

MEDIA = "application/vnd.git-lfs+json"
MAX_BATCH_BODY = 4 * 1024 * 1024
MAX_OBJECTS = 10_000
EXPIRES_IN = 3600


def lfs_routes(service: BlobService, authenticator: Authenticator, limits: BodyLimits) -> list[Route]:
    async def batch(request: Request) -> Response:
        length = content_length(request)
        if length is not None and length > MAX_BATCH_BODY:
            raise PayloadTooLarge(MAX_BATCH_BODY, mid_stream=False)
        raw = b"".join([chunk async for chunk in request_body(request, MAX_BATCH_BODY, limits.idle_timeout)])
        try:
            operation, objects = _batch_request(raw)
        except ValueError as exc:
            return _lfs_error(422, str(exc))
        authorization = request.headers.get("authorization")
        if operation == "upload":
            await authenticator.check(authorization, WRITERS)
        else:
            await authenticator.check_read(authorization)
        valid = [Sha(oid) for oid, _ in objects if _valid_oid(oid)]
        infos = await service.stat_many(valid)
        gone = await service.taken_down(valid)
        base = str(request.base_url).rstrip("/")
        answers = [_object(operation, oid, size, infos, gone, base) for oid, size in objects]
        return JSONResponse({"transfer": "basic", "objects": answers, "hash_algo": "sha256"}, media_type=MEDIA)

    async def locks_verify(request: Request) -> Response:
        await authenticator.check(request.headers.get("authorization"), WRITERS)
        return JSONResponse({"ours": [], "theirs": [], "next_cursor": ""}, media_type=MEDIA)

    async def locks(request: Request) -> Response:
        return JSONResponse({"locks": [], "next_cursor": ""}, media_type=MEDIA)

    return [
        Route("/lfs/objects/batch", batch, methods=["POST"], name="lfs"),
        Route("/lfs/locks/verify", locks_verify, methods=["POST"], name="lfs"),
        Route("/lfs/locks", locks, methods=["GET"], name="lfs"),
    ]


def _batch_request(raw: bytes) -> tuple[str, list[tuple[str, int]]]:
    """(operation, [(oid, size)]) of a Batch API request; `ValueError` saying what is wrong."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError("the request body is not JSON") from None
    if not isinstance(body, dict):
        raise ValueError("the request body must be a JSON object")
    operation = body.get("operation")
    if operation not in ("download", "upload"):
        raise ValueError("'operation' must be 'download' or 'upload'")
    transfers = body.get("transfers", ["basic"])
    if not isinstance(transfers, list) or "basic" not in transfers:
        raise ValueError("only the 'basic' transfer is offered")
    if body.get("hash_algo", "sha256") != "sha256":
        raise ValueError("only the 'sha256' hash algorithm is offered")
    objects = body.get("objects")
    if not isinstance(objects, list) or len(objects) > MAX_OBJECTS:
        raise ValueError(f"'objects' must be a list of at most {MAX_OBJECTS} objects")
    parsed = []
    for index, item in enumerate(objects):
        if not isinstance(item, dict) or not isinstance(item.get("oid"), str):
            raise ValueError(f"object {index} has no 'oid' string")
        size = item.get("size")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"object {index} has no 'size' as a non-negative integer")
        parsed.append((item["oid"], size))
    return operation, parsed


def _valid_oid(oid: str) -> bool:
    try:
        return parse_sha(oid) == oid
    except InvalidDigest:
        return False


def _object(
    operation: str,
    oid: str,
    size: int,
    infos: dict[Sha, Any],
    gone: set[Sha],
    base: str,
) -> dict[str, object]:
    answer: dict[str, object] = {"oid": oid, "size": size}
    if not _valid_oid(oid):
        return {**answer, "error": {"code": 422, "message": "the oid is not a lowercase sha256"}}
    sha = Sha(oid)
    if sha in gone:
        return {**answer, "error": {"code": 410, "message": "the object was taken down"}}
    info = infos.get(sha)
    if info is not None and info.size != size:
        return {**answer, "error": {"code": 422, "message": f"the stored object has {info.size} bytes, not {size}"}}
    # no credentials in the answer: git-lfs asks its credential helper after a 401 from the href
    action: dict[str, object] = {"href": f"{base}/{oid}", "expires_in": EXPIRES_IN}
    if operation == "download":
        if info is None:
            return {**answer, "error": {"code": 404, "message": "object does not exist"}}
        return {**answer, "actions": {"download": action}}
    if info is not None:
        return answer  # stored already: nothing to upload
    return {**answer, "actions": {"upload": action}}


def _lfs_error(code: int, message: str) -> Response:
    return JSONResponse({"message": message}, status_code=code, media_type=MEDIA)
